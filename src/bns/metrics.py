"""Sample-quality metrics (docs/math.md, section 5): PSNR against ground truth, and the Frechet
distance between two Gaussians that FID (:mod:`bns.fid`) applies to Inception features."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .errors import InputError

__all__ = ["psnr", "mse", "frechet_distance", "psd_sqrt"]


def mse(x: Tensor, reference: Tensor) -> Tensor:
    """Per-sample mean squared error, shape ``[B]``, in at least float32."""
    if x.shape != reference.shape:
        raise InputError(f"shapes differ: {list(x.shape)} vs {list(reference.shape)}")
    if x.dim() < 1:
        raise InputError("expected a batch [B, ...] of samples, got a 0-d tensor")
    dt = torch.promote_types(torch.promote_types(x.dtype, reference.dtype), torch.float32)
    per_sample = math.prod(x.shape[1:])  # explicit, so that an empty batch works too
    d = (x.to(dt) - reference.to(dt)).reshape(x.shape[0], per_sample)
    return (d * d).mean(dim=1)


def psnr(x: Tensor, reference: Tensor, data_range: float = 2.0) -> Tensor:
    """Per-sample PSNR in dB, ``10 log10(R^2 / MSE)``, shape ``[B]``.

    ``data_range`` R is 2 for data in [-1, 1]. Identical samples give +inf.
    """
    if not (math.isfinite(data_range) and data_range > 0):
        raise InputError(f"data_range must be a finite number > 0, got {data_range}")
    return 10 * torch.log10(data_range**2 / mse(x, reference))


def _psd_eigvals(w: Tensor) -> Tensor:
    """The eigenvalues ``w`` of a symmetric positive semi-definite matrix, with those that
    rounding alone could make (below ``D eps`` times the largest) set to zero: the square root
    of a rounding error is not one any more."""
    tol = w.numel() * torch.finfo(w.dtype).eps * w.abs().max()
    return torch.where(w > tol, w, torch.zeros_like(w))


def psd_sqrt(m: Tensor) -> Tensor:
    """The symmetric square root of a symmetric positive semi-definite matrix (float64)."""
    m = torch.as_tensor(m, dtype=torch.float64)
    w, v = torch.linalg.eigh(0.5 * (m + m.T))
    return (v * _psd_eigvals(w).sqrt()) @ v.T


def frechet_distance(
    mean1: Tensor, cov1: Tensor, mean2: Tensor, cov2: Tensor, *, sqrt_cov1: Tensor | None = None
) -> float:
    """The squared Frechet (2-Wasserstein) distance between ``N(mean1, cov1)`` and
    ``N(mean2, cov2)``, in float64:

        ||mean1 - mean2||^2 + tr(cov1) + tr(cov2) - 2 tr sqrt(cov1 cov2).

    ``tr sqrt(cov1 cov2)`` is taken as ``tr sqrt(R cov2 R)`` with ``R = cov1^(1/2)``: the two
    matrices are similar, and the second is symmetric positive semi-definite, so symmetric
    eigendecompositions give it without the complex square root of a non-symmetric product.
    Means ``[D]``, covariances ``[D, D]``; ``sqrt_cov1`` is :func:`psd_sqrt` of ``cov1``, for
    a caller that measures many sets against one reference. FID is this distance between
    Inception feature statistics.
    """
    m1, m2 = (torch.as_tensor(v, dtype=torch.float64).reshape(-1) for v in (mean1, mean2))
    c1, c2 = (torch.as_tensor(v, dtype=torch.float64) for v in (cov1, cov2))
    d = m1.numel()
    if m2.numel() != d or c1.shape != (d, d) or c2.shape != (d, d):
        raise InputError(
            f"shapes do not fit: means {m1.numel()} and {m2.numel()}, covariances"
            f" {list(c1.shape)} and {list(c2.shape)}"
        )
    r = psd_sqrt(c1) if sqrt_cov1 is None else torch.as_tensor(sqrt_cov1, dtype=torch.float64)
    inner = r @ c2 @ r
    tr_sqrt = _psd_eigvals(torch.linalg.eigvalsh(0.5 * (inner + inner.T))).sqrt().sum()
    diff = m1 - m2
    return float(diff @ diff + torch.trace(c1) + torch.trace(c2) - 2 * tr_sqrt)
