"""Sample-quality metrics against ground truth (bns-math.md, section 5)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["psnr", "mse"]


def mse(x: Tensor, reference: Tensor) -> Tensor:
    """Per-sample mean squared error, shape ``[B]``, in at least float32."""
    if x.shape != reference.shape:
        raise ValueError(f"shapes differ: {list(x.shape)} vs {list(reference.shape)}")
    if x.dim() < 1:
        raise ValueError("expected a batch [B, ...] of samples, got a 0-d tensor")
    dt = torch.promote_types(torch.promote_types(x.dtype, reference.dtype), torch.float32)
    per_sample = math.prod(x.shape[1:])  # explicit, so that an empty batch works too
    d = (x.to(dt) - reference.to(dt)).reshape(x.shape[0], per_sample)
    return (d * d).mean(dim=1)


def psnr(x: Tensor, reference: Tensor, data_range: float = 2.0) -> Tensor:
    """Per-sample PSNR in dB, ``10 log10(R^2 / MSE)``, shape ``[B]``.

    ``data_range`` R is 2 for data in [-1, 1]. Identical samples give +inf.
    """
    if not (math.isfinite(data_range) and data_range > 0):
        raise ValueError(f"data_range must be a finite number > 0, got {data_range}")
    return 10 * torch.log10(data_range**2 / mse(x, reference))
