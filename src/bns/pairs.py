"""Ground-truth pairs ``(x_0, y, x(1))`` for training, validating and testing a solver.

Each pair is seeded on its own (``seed``, split, index), so any pair can be regenerated alone,
and the train / val / test splits never share a noise. Pairs are cached on disk under
``$BNS_CACHE_DIR`` (default ``~/.cache/bns``) in one safetensors file per (model, guidance,
tolerances, seed, split). A file is written atomically, carries a checksum of its tensors and
the full key, and is verified when read: a stale or corrupt file is regenerated, never used.
Asking for more pairs than a file holds computes only the missing ones.

The ground truth is solved in batches of ``batch_size`` pairs, each one adaptive solve (its step
sizes follow the batch's worst sample). Every finished batch is kept as a verified shard file
until the cache file holds it, so a rerun after a crash computes only the missing batches. Under
``torchrun`` the batches are shared out round-robin over the workers, each batch computed once
with the boundaries one worker would use, then sent to every worker: K workers return, and
cache, bit for bit the pairs of one. Two jobs on one cache folder never corrupt it: every file
is written atomically and verified when read, and a cache file is never replaced by a shorter
one.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from . import executor
from ._hashing import hash_tensor
from ._io import atomic_write, make_folder, remove_stale_tmp
from .errors import InputError, StorageError
from .ground_truth import default_tolerance, ground_truth
from .model import Model, NetworkError, in_phase, prediction_coefficients

__all__ = [
    "Pairs",
    "make_pairs",
    "cached_pairs",
    "cache_dir",
    "pair_noise",
    "start_states",
    "SPLITS",
    "CACHE_VERSION",
]

SPLITS = ("train", "val", "test")
CACHE_VERSION = 1


@dataclass
class Pairs:
    """``x0`` and ``x1`` of shape ``[N, *sample_shape]`` (float32), labels ``y [N]`` or None.

    ``end`` says where ``x1`` is: ``"range"`` (the solution at ``t_max``) or ``"data"`` (then
    the data prediction there, :mod:`bns.solvers.ends`)."""

    x0: Tensor
    x1: Tensor
    y: Tensor | None
    nfe_per_sample: float = float("nan")
    end: str = "range"

    def __len__(self) -> int:
        return self.x0.shape[0]

    def __getitem__(self, idx: Any) -> Pairs:
        y = None if self.y is None else self.y[idx]
        return Pairs(self.x0[idx], self.x1[idx], y, self.nfe_per_sample, self.end)

    def to(self, device: torch.device | str | None) -> Pairs:
        """The pairs on ``device`` (themselves where they are already, or for None)."""
        if device is None or self.x0.device == torch.device(device):
            return self
        y = None if self.y is None else self.y.to(device)
        return Pairs(self.x0.to(device), self.x1.to(device), y, self.nfe_per_sample, self.end)


def cache_dir() -> Path:
    """``$BNS_CACHE_DIR`` or ``~/.cache/bns``."""
    return Path(os.environ.get("BNS_CACHE_DIR") or Path.home() / ".cache" / "bns")


def _sample_seed(seed: int, split: str, index: int) -> int:
    h = hashlib.sha256(f"bns-pair:{seed}:{split}:{index}".encode()).hexdigest()
    return int(h[:15], 16)


def pair_noise(
    model: Model, seed: int, split: str, indices: range | list[int], labels: str | None = None
) -> tuple[Tensor, Tensor | None]:
    """The noise ``x_0`` (float64) and labels of the pairs at ``indices`` of a split.

    The labels are drawn from ``model.labels_for(labels or split)`` (all classes by default):
    ``labels="train"`` gives test noise with training labels (prompts)."""
    if split not in SPLITS:
        raise InputError(f"split must be one of {SPLITS}, got {split!r}")
    pool = model.labels_for(labels or split) if model.num_classes is not None else None
    xs, ys = [], []
    for i in indices:
        g = torch.Generator().manual_seed(_sample_seed(seed, split, i))
        xs.append(torch.randn(model.sample_shape, generator=g, dtype=torch.float64))
        if pool is not None:
            ys.append(pool[int(torch.randint(len(pool), (1,), generator=g))])
        elif model.num_classes is not None:
            ys.append(int(torch.randint(model.num_classes, (1,), generator=g)))
    x0 = torch.stack(xs) if xs else torch.zeros((0, *model.sample_shape), dtype=torch.float64)
    y = torch.tensor(ys, dtype=torch.long) if model.num_classes is not None else None
    return x0, y


def _key(
    model: Model,
    guidance: float,
    seed: int,
    split: str,
    rtol: float,
    atol: float,
    labels: str | None = None,
) -> dict:
    extra: dict[str, Any] = {}
    if model.num_classes is not None and model.label_splits is not None:
        extra["labels"] = model.labels_for(labels or split)
    elif labels is not None and labels != split:
        extra["labels_from"] = labels
    conditioning = model.conditioning_digest(extra.get("labels"))
    if conditioning is not None:  # prompt embeddings: data, not the model's fingerprint
        extra["conditioning"] = conditioning
    return {
        **extra,
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
        nfe = float(meta.get("nfe_per_sample", "nan"))
        ok = (
            stored_key == key
            and meta.get("digest") == _digest(tensors)
            and _well_formed(tensors, key)
            and (math.isnan(nfe) or 0 <= nfe < math.inf)
            # files of older versions have no digest of their metadata
            and meta.get("meta_digest", _meta_digest(meta)) == _meta_digest(meta)
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
    return {"tensors": tensors, "nfe": nfe}


def _well_formed(tensors: dict[str, Tensor], key: dict) -> bool:
    """What :func:`_write_cache` writes: float32 ``x0``, ``x1`` of ``[N, *sample_shape]`` and
    int64 labels ``y [N]`` or none, nothing else (the digest alone takes any tensors)."""
    x0, x1, y = tensors.get("x0"), tensors.get("x1"), tensors.get("y")
    if x0 is None or x1 is None or not set(tensors) <= {"x0", "x1", "y"} or x0.dim() == 0:
        return False
    shape = (x0.shape[0], *key.get("sample_shape", x0.shape[1:]))
    return (
        x0.dtype == x1.dtype == torch.float32
        and x0.shape == x1.shape == shape
        and (y is None or (y.dtype == torch.long and y.shape == shape[:1]))
    )


def _meta_digest(meta: dict[str, str]) -> str:
    """sha256 of the metadata the tensors' digest does not cover (the key, the ODE solver's
    evaluations per sample), and of that digest."""
    body = [meta.get(k) for k in ("key", "digest", "nfe_per_sample")]
    return hashlib.sha256(json.dumps(body).encode()).hexdigest()


def _write_cache(path: Path, key: dict, tensors: dict[str, Tensor], nfe: float) -> None:
    from safetensors.torch import save_file

    meta = {
        "key": json.dumps(key, sort_keys=True),
        "digest": _digest(tensors),
        "nfe_per_sample": repr(nfe),
    }
    meta["meta_digest"] = _meta_digest(meta)
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
    labels: str | None = None,
    end: str = "range",
) -> Pairs:
    """``n`` ground-truth pairs of ``split``, from the cache where possible.

    ``labels`` names the split whose labels (prompts) the pairs draw, default ``split``'s own
    (see :attr:`bns.Model.label_splits`): ``make_pairs(model, n, "test", labels="train")`` is
    test noise on training prompts. ``end="data"`` ends the ground truth on the data: the
    solution at ``t_max``, then the model's data prediction there (:mod:`bns.solvers.ends`).

    ``cache`` is True (use :func:`cache_dir`), False (no cache) or a folder. The noise is drawn
    per pair index on the CPU (the same on every device); the ground truth is solved on
    ``device`` (default: the model's) in batches of ``batch_size``; the pairs are returned and
    cached as CPU float32 tensors. ``rtol``/``atol`` default to
    :func:`bns.default_tolerance` of the network's dtype. Under ``torchrun`` every
    worker computes its share of the batches and returns all ``n`` pairs.
    """
    if n < 1:
        raise InputError(f"need at least one pair, got n = {n}")
    if split not in SPLITS:
        raise InputError(f"split must be one of {SPLITS}, got {split!r}")
    tol = default_tolerance(model.precision)
    rtol = tol if rtol is None else float(rtol)
    atol = rtol if atol is None else float(atol)
    device = device if device is not None else model.device
    ex = executor.current(device)
    if end not in ("range", "data"):
        raise InputError(f"end must be range or data, got {end!r}")
    key = _key(model, guidance, seed, split, rtol, atol, labels)
    folder, stem, path = _cache_place(model, split, key, labels, cache)
    if folder is not None:  # what writers killed mid-write (kill -9) left in this job's places
        remove_stale_tmp(folder)
        remove_stale_tmp(folder / "shards" / stem)
    found = _read_cache(path, key) if path is not None else None
    have: dict[str, Tensor] = found["tensors"] if found is not None else {}
    # Every worker extends the same prefix, so that all draw the same batches.
    start = ex.all_min(have["x0"].shape[0] if have else 0)
    have = {k: v[:start] for k, v in have.items()} if start else {}
    nfe_total = found["nfe"] * start if start else 0.0
    if start < n:
        shards = None if folder is None else _Shards(folder / "shards" / stem, key)
        starts = None
        if model.starts_from_data:  # img2img: from noised samples of the whole range
            common = dict(seed=seed, guidance=guidance, rtol=rtol, atol=atol, cache=cache)
            common.update(batch_size=batch_size, progress=progress, device=device, labels=labels)
            starts = start_states(model, n, split, **common)
            nfe_total += starts.nfe_per_sample * (n - start)
        run = dict(seed=seed, guidance=guidance, rtol=rtol, atol=atol, device=device, labels=labels)
        run["starts"] = starts
        batches = [(lo, min(lo + batch_size, n)) for lo in range(start, n, batch_size)]
        try:
            with in_phase(f"ground truth ({split})"):
                new = _solve_batches(model, split, batches, shards, ex, progress, run)
        except NetworkError:
            # The network failed (NaN, inf, an exception): what it gave before is not kept
            # either, so a fixed network (same weights, so the same cache key) never reuses it.
            if shards is not None:
                shards.remove(batches)
            raise
        nfe_total += sum(float(t["nfe"]) * (hi - lo) for t, (lo, hi) in zip(new, batches))
        parts = ([have] if have else []) + new
        have = {k: torch.cat([t[k] for t in parts]) for k in parts[-1] if k != "nfe"}
        if path is not None and ex.local_rank == 0:  # one writer per host (the same bytes)
            try:
                _write_if_longer(path, key, have, nfe_total / have["x0"].shape[0])
                shards.remove(batches)
            except StorageError as e:
                _not_cached(e, folder)
    m = have["x0"].shape[0]
    pairs = Pairs(
        have["x0"][:n].clone(),
        have["x1"][:n].clone(),
        have["y"][:n].clone() if "y" in have else None,
        nfe_total / m,
    )
    # The step to sigma = 0 costs one evaluation per pair: done on the cached solutions at
    # t_max, so both ends share one cache (and switching end solves no ODE again).
    if end == "range":
        return pairs
    with in_phase(f"ground truth ({split})"):
        return _to_data(model, pairs, guidance, batch_size, device)


def _to_data(model: Model, pairs: Pairs, guidance: float, batch_size: int, device) -> Pairs:
    """``pairs`` (solutions at ``t_max``) moved on to the data by the model's data prediction."""
    out = []
    for lo in range(0, len(pairs), batch_size):
        part = pairs[lo : lo + batch_size].to(device)
        x = part.x1.double()
        x1 = data_prediction(model, x, model.t_range[1], part.y, guidance)
        out.append(x1.float().cpu())
    return Pairs(pairs.x0, torch.cat(out), pairs.y, pairs.nfe_per_sample + 1, "data")


def _cache_place(model: Model, split: str, key: dict, labels: str | None, cache) -> tuple:
    """``(folder, stem, path)`` of the cache file of ``key`` (None, stem, None without a cache)."""
    folder = None if not cache else cache_dir() if cache is True else Path(cache)
    name = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]
    stem = f"pairs-{model.name}-{split}{'-' + labels if labels else ''}-{name}"
    return folder, stem, None if folder is None else folder / f"{stem}.safetensors"


def cached_pairs(
    model: Model,
    split: str = "train",
    *,
    seed: int = 0,
    guidance: float = 1.0,
    rtol: float | None = None,
    atol: float | None = None,
    cache: bool | str | os.PathLike = True,
    labels: str | None = None,
) -> tuple[int, float]:
    """How many pairs of ``split`` the cache holds for these settings, and their dopri5
    evaluations per sample (``(0, nan)`` for none); what :func:`make_pairs` would not solve."""
    rtol = default_tolerance(model.precision) if rtol is None else float(rtol)
    atol = rtol if atol is None else float(atol)
    key = _key(model, guidance, seed, split, rtol, atol, labels)
    _, _, path = _cache_place(model, split, key, labels, cache)
    found = _read_cache(path, key) if path is not None else None
    if found is None:
        return 0, math.nan
    return int(found["tensors"]["x0"].shape[0]), float(found["nfe"])


_NOT_CACHED: set[str] = set()  # cache folders already said to be unwritable


def _not_cached(e: OSError, folder: Path) -> None:
    """A cache folder that cannot take the ground truth (full, read-only): said once, and the
    run goes on with the pairs in memory (a later run solves them again)."""
    if str(folder) not in _NOT_CACHED:
        _NOT_CACHED.add(str(folder))
        warnings.warn(f"bns: {e}; the ground truth is used without being cached", stacklevel=3)


def _write_if_longer(path: Path, key: dict, tensors: dict[str, Tensor], nfe: float) -> None:
    """Write the cache file unless it holds as many pairs already (another job may have just
    written more: a cache file never shrinks). The read and the write hold a lock on the folder, so two jobs
    cannot both read the short file and then write in turn."""
    with _locked(path):
        current = _read_cache(path, key)
        if current is None or current["tensors"]["x0"].shape[0] < tensors["x0"].shape[0]:
            _write_cache(path, key, tensors, nfe)


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive lock on the folder of ``path`` (POSIX ``flock`` on the directory itself,
    so no lock file is left behind; no lock where that is not available)."""
    try:
        import fcntl
    except ImportError:  # not POSIX: writes stay atomic, only the never-shrinks rule is lost
        yield
        return
    make_folder(path.parent)
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


class _Shards:
    """The finished batches of one cache file: one verified file per batch of pairs
    ``[lo, hi)``, kept until the cache file holds them."""

    def __init__(self, folder: Path, key: dict) -> None:
        self.folder, self.key = folder, key
        self.failed = False  # a write failed (a full or read-only place): no more are tried

    def _path(self, lo: int, hi: int) -> Path:
        return self.folder / f"{lo:09d}-{hi:09d}.safetensors"

    def read(self, lo: int, hi: int) -> dict[str, Tensor] | None:
        found = _read_cache(self._path(lo, hi), {**self.key, "rows": [lo, hi]})
        if found is None or found["tensors"]["x0"].shape[0] != hi - lo:
            return None
        return {**found["tensors"], "nfe": torch.tensor([found["nfe"]], dtype=torch.float64)}

    def write(self, lo: int, hi: int, batch: dict[str, Tensor]) -> None:
        if self.failed:
            return
        tensors = {k: v for k, v in batch.items() if k != "nfe"}
        for attempt in range(3):  # another job may remove the emptied folder meanwhile
            try:
                key = {**self.key, "rows": [lo, hi]}
                _write_cache(self._path(lo, hi), key, tensors, float(batch["nfe"]))
                return
            except FileNotFoundError:
                if attempt == 2:
                    raise
            except StorageError as e:
                self.failed = True
                _not_cached(e, self.folder.parent.parent)  # the cache folder: shards/<stem>
                return

    def remove(self, batches: list[tuple[int, int]]) -> None:
        for lo, hi in batches:
            self._path(lo, hi).unlink(missing_ok=True)
        for folder in (self.folder, self.folder.parent):
            with contextlib.suppress(OSError):  # not empty: another job's shards are there
                folder.rmdir()


def _solve_batches(model, split, batches, shards, ex, progress, run) -> list[dict[str, Tensor]]:
    """The ground truth of each batch ``[lo, hi)``: read from a shard, or solved (and kept as a
    shard) by the worker :meth:`bns.executor.Executor.map_batches` gives it to."""
    held = {}
    for b in batches if shards is not None else []:
        t = shards.read(*b)
        if t is not None:
            held[b] = t
    labels = model.num_classes is not None
    ex.watch(model)
    return ex.map_batches(
        batches,
        lambda b: _solve(model, split, *b, **run),
        held=held,
        keep=(lambda b, t: shards.write(*b, t)) if shards is not None else (lambda b, t: None),
        empty=lambda b: _empty(model, b[1] - b[0], labels),
        desc=f"ground truth ({split})",
        progress=progress,
        postfix=lambda t: {"nfe": int(t["nfe"])},
    )


def data_prediction(
    model: Model, x: Tensor, t: float, y: Tensor | None = None, guidance: float = 1.0
) -> Tensor:
    """The model's (guided) data prediction ``x1_hat = (u - beta x) / gamma`` at time ``t``."""
    tt = torch.full((x.shape[0],), float(t), dtype=torch.float64, device=x.device)
    with torch.no_grad():
        u = model.velocity(x, tt, y, guidance)
    beta, gamma = prediction_coefficients("x1", model.schedule, tt)
    shape = (-1,) + (1,) * (x.dim() - 1)
    beta, gamma = beta.to(u.dtype).reshape(shape), gamma.to(u.dtype).reshape(shape)
    return (u - beta * x.to(u.dtype)) / gamma


def start_states(
    model: Model,
    n: int,
    split: str = "train",
    *,
    seed: int = 0,
    guidance: float = 1.0,
    **kw: Any,
) -> Pairs:
    """The first ``n`` start states of a span that starts inside the path, as pairs
    ``(x_start, y, x_1)``: ``x_start = alpha(t_0) x_1 + sigma(t_0) eps``, where ``x_1`` is the
    whole-range model's sample from the pair's noise (:func:`make_pairs` of
    ``model.parent``, cached as usual, ending on the data where the model stops short of it)
    and ``eps`` fresh noise of its own seed. ``nfe_per_sample`` is what making ``x_1`` cost;
    the whole range's forwards are counted on ``model`` too. ``kw`` as for make_pairs."""
    from .solvers.ends import resolve_end

    parent = model.parent
    if parent is None or not model.starts_from_data:
        raise InputError(f"{model.name} starts from noise, not from noised data")
    before = parent.forwards
    data = make_pairs(
        parent, n, split, seed=seed, guidance=guidance, end=resolve_end(parent, "auto"), **kw
    )
    model.forwards += parent.forwards - before
    eps = torch.stack(
        [
            torch.randn(
                model.sample_shape,
                generator=torch.Generator().manual_seed(_sample_seed(seed, f"{split}/start", i)),
                dtype=torch.float64,
            )
            for i in range(n)
        ]
    )
    x = model.start_state(data.x1.double(), eps).float()
    return Pairs(x, data.x1, data.y, data.nfe_per_sample, data.end)


def _solve(
    model, split, lo, hi, *, seed, guidance, rtol, atol, device, labels, starts=None
) -> dict[str, Tensor]:
    if starts is None:
        x0, y = pair_noise(model, seed, split, range(lo, hi), labels)
    else:
        part = starts[lo:hi]
        x0, y = part.x0, part.y
    x0 = x0.float().double()  # the stored float32 noise is exactly what was integrated
    if device is not None:
        x0, y = x0.to(device), (None if y is None else y.to(device))
    x1, stats = ground_truth(model, x0, y, guidance, rtol=rtol, atol=atol, return_stats=True)
    out = {"x0": x0.float().cpu(), "x1": x1.float().cpu()}
    if y is not None:
        out["y"] = y.cpu()
    out["nfe"] = torch.tensor([float(stats["nfe"])], dtype=torch.float64)
    return out


def _empty(model: Model, m: int, labels: bool) -> dict[str, Tensor]:
    """A batch of ``m`` pairs as uninitialized tensors: x0, x1 (float32), y (int64), nfe."""
    shape = (m, *model.sample_shape)
    out = {"x0": torch.empty(shape), "x1": torch.empty(shape)}
    if labels:
        out["y"] = torch.empty(m, dtype=torch.long)
    out["nfe"] = torch.empty(1, dtype=torch.float64)
    return out
