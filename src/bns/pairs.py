"""Ground-truth pairs ``(x_0, y, x(1))`` for training, validating and testing a solver.

Each pair is seeded on its own (``seed``, split, index), so any pair can be regenerated alone,
and the train / val / test splits never share a noise. Pairs are cached on disk under
``$BNS_CACHE_DIR`` (default ``~/.cache/bns``) in one safetensors file per (model, guidance,
tolerances, seed, split). A file is written atomically, carries a checksum of its tensors and
the full key, and is verified when read: a stale or corrupt file is regenerated, never used.
Asking for more pairs than a file holds computes only the missing ones.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ._hashing import hash_tensor
from ._io import atomic_write
from .ground_truth import default_tolerance, ground_truth
from .model import Model

__all__ = ["Pairs", "make_pairs", "cache_dir", "pair_noise", "SPLITS", "CACHE_VERSION"]

SPLITS = ("train", "val", "test")
CACHE_VERSION = 1


@dataclass
class Pairs:
    """``x0`` and ``x1`` of shape ``[N, *sample_shape]`` (float32), labels ``y [N]`` or None."""

    x0: Tensor
    x1: Tensor
    y: Tensor | None
    nfe_per_sample: float = float("nan")

    def __len__(self) -> int:
        return self.x0.shape[0]

    def __getitem__(self, idx: Any) -> Pairs:
        y = None if self.y is None else self.y[idx]
        return Pairs(self.x0[idx], self.x1[idx], y, self.nfe_per_sample)

    def to(self, device: torch.device | str | None) -> Pairs:
        """The pairs on ``device`` (themselves where they are already, or for None)."""
        if device is None or self.x0.device == torch.device(device):
            return self
        y = None if self.y is None else self.y.to(device)
        return Pairs(self.x0.to(device), self.x1.to(device), y, self.nfe_per_sample)


def cache_dir() -> Path:
    """``$BNS_CACHE_DIR`` or ``~/.cache/bns``."""
    return Path(os.environ.get("BNS_CACHE_DIR") or Path.home() / ".cache" / "bns")


def _sample_seed(seed: int, split: str, index: int) -> int:
    h = hashlib.sha256(f"bns-pair:{seed}:{split}:{index}".encode()).hexdigest()
    return int(h[:15], 16)


def pair_noise(
    model: Model, seed: int, split: str, indices: range | list[int]
) -> tuple[Tensor, Tensor | None]:
    """The noise ``x_0`` (float64) and labels of the pairs at ``indices`` of a split."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    xs, ys = [], []
    for i in indices:
        g = torch.Generator().manual_seed(_sample_seed(seed, split, i))
        xs.append(torch.randn(model.sample_shape, generator=g, dtype=torch.float64))
        if model.num_classes is not None:
            ys.append(int(torch.randint(model.num_classes, (1,), generator=g)))
    x0 = torch.stack(xs) if xs else torch.zeros((0, *model.sample_shape), dtype=torch.float64)
    y = torch.tensor(ys, dtype=torch.long) if model.num_classes is not None else None
    return x0, y


def _key(model: Model, guidance: float, seed: int, split: str, rtol: float, atol: float) -> dict:
    return {
        "version": CACHE_VERSION,
        "model": model.fingerprint(),
        "model_name": model.name,
        "guidance": float(guidance),
        "seed": int(seed),
        "split": split,
        "rtol": float(rtol),
        "atol": float(atol),
        "sample_shape": list(model.sample_shape),
        "t_range": list(model.t_range),
        "net_dtype": str(model.dtype).removeprefix("torch."),
    }


def _digest(tensors: dict[str, Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        v = tensors[name].contiguous()
        h.update(name.encode() + str(v.dtype).encode() + str(tuple(v.shape)).encode())
        hash_tensor(h, v)
    return h.hexdigest()


def _read_cache(path: Path, key: dict) -> dict[str, Any] | None:
    """The cached tensors, or None (with a warning) if the file is missing, stale or corrupt."""
    if not path.exists():
        return None
    from safetensors import safe_open
    from safetensors.torch import load_file

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        tensors = load_file(str(path))
        stored_key = json.loads(meta.get("key", "null"))
        ok = (
            stored_key == key
            and meta.get("digest") == _digest(tensors)
            and {"x0", "x1"} <= set(tensors)
            and tensors["x0"].shape == tensors["x1"].shape
        )
    except Exception as e:  # any unreadable file is regenerated  # noqa: BLE001
        warnings.warn(
            f"bns: ground-truth cache {path} is unreadable ({e}); regenerating", stacklevel=3
        )
        return None
    if not ok:
        warnings.warn(
            f"bns: ground-truth cache {path} is stale or corrupt; regenerating", stacklevel=3
        )
        return None
    return {"tensors": tensors, "nfe": float(meta.get("nfe_per_sample", "nan"))}


def _write_cache(path: Path, key: dict, tensors: dict[str, Tensor], nfe: float) -> None:
    from safetensors.torch import save_file

    meta = {
        "key": json.dumps(key, sort_keys=True),
        "digest": _digest(tensors),
        "nfe_per_sample": repr(nfe),
    }
    body = {k: v.contiguous() for k, v in tensors.items()}
    atomic_write(path, lambda tmp: save_file(body, str(tmp), metadata=meta))


def make_pairs(
    model: Model,
    n: int,
    split: str = "train",
    *,
    seed: int = 0,
    guidance: float = 1.0,
    rtol: float | None = None,
    atol: float | None = None,
    batch_size: int = 128,
    cache: bool | str | os.PathLike = True,
    progress: bool = True,
    device: torch.device | str | None = None,
) -> Pairs:
    """``n`` ground-truth pairs of ``split``, from the cache where possible.

    ``cache`` is True (use :func:`cache_dir`), False (no cache) or a folder. The noise is drawn
    per pair index on the CPU (the same on every device); the ground truth is solved on
    ``device`` (default: the model's) in batches of ``batch_size``; the pairs are returned and
    cached as CPU float32 tensors. ``rtol``/``atol`` default to
    :func:`bns.ground_truth.default_tolerance` of the network's dtype.
    """
    if n < 1:
        raise ValueError(f"need at least one pair, got n = {n}")
    tol = default_tolerance(model.dtype)
    rtol = tol if rtol is None else float(rtol)
    atol = rtol if atol is None else float(atol)
    device = device if device is not None else model.device
    key = _key(model, guidance, seed, split, rtol, atol)
    path = None
    have: dict[str, Tensor] = {}
    nfe_total = 0.0
    if cache:
        folder = cache_dir() if cache is True else Path(cache)
        name = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]
        path = folder / f"pairs-{model.name}-{split}-{name}.safetensors"
        found = _read_cache(path, key)
        if found is not None:
            have = found["tensors"]
            nfe_total = found["nfe"] * have["x0"].shape[0]
    start = have["x0"].shape[0] if have else 0
    if start < n:
        new = _generate(
            model, range(start, n), split, seed, guidance, rtol, atol, batch_size, progress, device
        )
        nfe_total += new.pop("nfe_sum")
        have = new if not have else {k: torch.cat([have[k], new[k]]) for k in new}
        if path is not None:
            _write_cache(path, key, have, nfe_total / have["x0"].shape[0])
    m = have["x0"].shape[0]
    return Pairs(
        have["x0"][:n].clone(),
        have["x1"][:n].clone(),
        have["y"][:n].clone() if "y" in have else None,
        nfe_total / m,
    )


def _generate(model, indices, split, seed, guidance, rtol, atol, batch_size, progress, device):
    from tqdm.auto import tqdm

    idx = list(indices)
    x0s, x1s, ys = [], [], []
    nfe_sum = 0.0
    bar = tqdm(
        total=len(idx),
        desc=f"ground truth ({split})",
        unit="pair",
        disable=not progress,
        leave=False,
    )
    for s in range(0, len(idx), batch_size):
        chunk = idx[s : s + batch_size]
        x0, y = pair_noise(model, seed, split, chunk)
        x0 = x0.float().double()  # the stored float32 noise is exactly what was integrated
        if device is not None:
            x0, y = x0.to(device), (None if y is None else y.to(device))
        x1, stats = ground_truth(model, x0, y, guidance, rtol=rtol, atol=atol, return_stats=True)
        x0s.append(x0.float().cpu())
        x1s.append(x1.float().cpu())
        if y is not None:
            ys.append(y.cpu())
        nfe_sum += stats["nfe"] * len(chunk)
        bar.update(len(chunk))
        bar.set_postfix(nfe=stats["nfe"])
    bar.close()
    out = {"x0": torch.cat(x0s), "x1": torch.cat(x1s), "nfe_sum": nfe_sum}
    if ys:
        out["y"] = torch.cat(ys)
    return out
