"""The distillation loss: a pure function of a solver family's parameters and a batch.

``loss = mean_k log ||x_n(x_0^k) - x(1; x_0^k)||^2 / D`` (docs/math.md, section 4), end to end
through every step, the network's inputs and its times. :func:`loss_and_grad` is the only
thing that micro-batching and data-parallel workers (:mod:`bns.distributed`) wrap: gradients are taken for
the family's parameters alone with ``torch.autograd.grad``, so no network weight ever gets a
``.grad`` and no work is spent on weight gradients, however the network is wrapped.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .families import Family
from .model import Model, in_phase
from .pairs import Pairs
from .solver import sample

__all__ = ["log_mse", "mse", "l1", "LOSSES", "SUM_OF_SQUARES", "solver_loss", "loss_and_grad"]


def log_mse(x: Tensor, ref: Tensor) -> Tensor:
    """Per-sample ``log MSE(x, ref)``, shape ``[B]`` (the paper's loss: the mean PSNR)."""
    d = (x - ref.to(x.dtype)).reshape(x.shape[0], -1)
    return torch.log((d * d).mean(1))


def mse(x: Tensor, ref: Tensor) -> Tensor:
    """Per-sample mean squared error, shape ``[B]`` (weighs the worst samples most)."""
    d = (x - ref.to(x.dtype)).reshape(x.shape[0], -1)
    return (d * d).mean(1)


def l1(x: Tensor, ref: Tensor) -> Tensor:
    """Per-sample mean absolute error, shape ``[B]``."""
    return (x - ref.to(x.dtype)).reshape(x.shape[0], -1).abs().mean(1)


# The per-sample losses distillation can minimize (DistillConfig.loss), by name.
LOSSES = {"log-mse": log_mse, "mse": mse, "l1": l1}
# Those that are (reweighted) sums of squares: what Gauss-Newton steps can minimize.
SUM_OF_SQUARES = ("log-mse", "mse")


def solver_loss(
    family: Family,
    model: Model,
    batch: Pairs,
    guidance: float,
    checkpoint: bool = False,
    loss: str = "log-mse",
) -> Tensor:
    """The summed per-sample loss (log-MSE by default) of the family's solver on ``batch``."""
    x = sample(model, batch.x0, family.solver(), batch.y, guidance, checkpoint=checkpoint)
    return LOSSES[loss](x, batch.x1).sum()


def loss_and_grad(
    family: Family,
    model: Model,
    batch: Pairs,
    guidance: float,
    *,
    micro_batch: int = 0,
    checkpoint: bool = False,
    loss: str = "log-mse",
) -> tuple[float, list[Tensor] | None]:
    """The mean loss over ``batch`` and its gradient for each of ``family.parameters()``.

    With ``micro_batch = k > 0`` the batch is run ``k`` pairs at a time and the gradients are
    summed: the same result as the whole batch at once, to rounding, in the memory of ``k``.
    Returns ``(nan, None)`` if the loss or a gradient is not finite (diverged solver
    coefficients: the step is skipped); a network that returns NaN or inf for finite states
    raises :class:`bns.model.NonFiniteVelocity` instead.
    """
    with in_phase("an optimizer step"):
        return _loss_and_grad(family, model, batch, guidance, micro_batch, checkpoint, loss)


def _loss_and_grad(family, model, batch, guidance, micro_batch, checkpoint, loss):
    params = [p for p in family.parameters() if p.requires_grad]
    n = len(batch)
    size = micro_batch if micro_batch > 0 else n
    total = 0.0
    grads = [torch.zeros_like(p) for p in params]
    for s in range(0, n, size):
        part = solver_loss(family, model, batch[s : s + size], guidance, checkpoint, loss) / n
        if not torch.isfinite(part):
            return math.nan, None
        for g, gi in zip(grads, torch.autograd.grad(part, params)):
            g += gi
        total += float(part.detach())
    if not all(torch.all(torch.isfinite(g)) for g in grads):
        return math.nan, None
    return total, grads
