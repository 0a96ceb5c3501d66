"""Ground truth: the model's ODE solved by an accurate adaptive solver (torchdiffeq's dopri5)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

if TYPE_CHECKING:
    from .model import Model

__all__ = ["ground_truth", "default_tolerance"]

# What a network of each dtype can resolve: its velocity carries rounding noise of about its unit
# roundoff, and an adaptive solver asked for less error than that shrinks its steps chasing it.
# Measured on fmnist-cfg (benchmarks/results/halfprec_fmnist-cfg.md): a bf16 network's ground
# truth stops improving at 1e-4 (50.5 dB against float32's; 1e-5 costs 4 times the evaluations
# for nothing); fp16 tracks float32 down to 1e-5 on the CPU, 1e-4 is kept as the safe side.
_TOLERANCE = {torch.bfloat16: 1e-4, torch.float16: 1e-4}
DEFAULT_TOLERANCE = 1e-5


def default_tolerance(dtype: torch.dtype) -> float:
    """The default ``rtol = atol`` of ground truth for a network running in ``dtype``: 1e-5
    for float32 and wider, 1e-4 for float16 and bfloat16."""
    return _TOLERANCE.get(dtype, DEFAULT_TOLERANCE)


def ground_truth(
    model: Model,
    x0: Tensor,
    y: Tensor | None = None,
    guidance: float = 1.0,
    rtol: float | None = None,
    atol: float | None = None,
    *,
    method: str = "dopri5",
    dtype: torch.dtype = torch.float64,
    return_stats: bool = False,
) -> Tensor | tuple[Tensor, dict[str, Any]]:
    """Solve ``dx/dt = u_t(x)`` from ``x0`` over the model's ``t_range`` with RK45 (dopri5).

    The network is frozen and in eval mode meanwhile (:func:`bns.model.frozen`: dropout off),
    then restored. The whole batch is one adaptive solve whose error norm is the largest per-sample RMS, so
    every sample meets the tolerances (a plain RMS over the batch would let one sample drift).
    The state is kept in ``dtype`` (float64 by default) on ``x0``'s device; the network runs in
    its own dtype (``model.dtype``). ``rtol`` and ``atol`` default to
    :func:`default_tolerance` of its precision (``model.precision``; ``atol`` to ``rtol``
    when only that is given).

    Returns ``x(t_max)`` with the shape of ``x0``; with ``return_stats`` also
    ``{"nfe": velocity evaluations for the batch, "forwards": network forwards per sample}``.
    """
    from torchdiffeq import odeint

    from .model import frozen, in_phase

    rtol = default_tolerance(model.precision) if rtol is None else float(rtol)
    atol = rtol if atol is None else float(atol)
    b = x0.shape[0]
    t_min, t_max = model.t_range
    nfe = 0

    def f(t: Tensor, x: Tensor) -> Tensor:
        nonlocal nfe
        nfe += 1
        return model.velocity(x, t, y, guidance).to(dtype)

    def norm(v: Tensor) -> Tensor:
        # torchdiffeq flattens the state; restore the batch to take the worst sample.
        return v.reshape(b, -1).pow(2).mean(1).sqrt().max()

    times = torch.tensor([t_min, t_max], dtype=torch.float64, device=x0.device)
    # A network that returns NaN or inf raises NetworkError inside odeint, before its step
    # size collapses ("underflow in dt").
    with torch.no_grad(), frozen(model), in_phase("ground truth"):
        out = odeint(
            f,
            x0.to(dtype),
            times,
            rtol=rtol,
            atol=atol,
            method=method,
            options={"norm": norm, "step_t": times},
        )[-1]
    if not torch.all(torch.isfinite(out)):
        raise FloatingPointError("ground truth produced non-finite values; check the model")
    if return_stats:
        return out, {"nfe": nfe, "forwards": nfe * model.forwards_per_evaluation(guidance)}
    return out
