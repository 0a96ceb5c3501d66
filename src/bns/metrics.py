"""Sample-quality metrics against ground truth (bns-math.md, section 5)."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["psnr", "mse"]


def mse(x: Tensor, reference: Tensor) -> Tensor:
    """Per-sample mean squared error, shape ``[B]``, in at least float32."""
    if x.shape != reference.shape:
        raise ValueError(f"shapes differ: {list(x.shape)} vs {list(reference.shape)}")
    dt = torch.promote_types(torch.promote_types(x.dtype, reference.dtype), torch.float32)
    d = (x.to(dt) - reference.to(dt)).reshape(x.shape[0], -1)
    return (d * d).mean(dim=1)


def psnr(x: Tensor, reference: Tensor, data_range: float = 2.0) -> Tensor:
    """Per-sample PSNR in dB, ``10 log10(R^2 / MSE)``, shape ``[B]``.

    ``data_range`` R is 2 for data in [-1, 1]. Identical samples give +inf.
    """
    return 10 * torch.log10(data_range**2 / mse(x, reference))
