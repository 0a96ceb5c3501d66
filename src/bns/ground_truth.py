"""Ground truth: the model's ODE solved by an accurate adaptive solver (torchdiffeq's dopri5)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

__all__ = ["ground_truth"]


def ground_truth(
    model: Any,
    x0: Tensor,
    y: Tensor | None = None,
    guidance: float = 1.0,
    rtol: float = 1e-5,
    atol: float = 1e-5,
    *,
    method: str = "dopri5",
    dtype: torch.dtype = torch.float64,
    return_stats: bool = False,
) -> Tensor | tuple[Tensor, dict[str, Any]]:
    """Solve ``dx/dt = u_t(x)`` from ``x0`` over the model's ``t_range`` with RK45 (dopri5).

    The whole batch is one adaptive solve whose error norm is the largest per-sample RMS, so
    every sample meets the tolerances (a plain RMS over the batch would let one sample drift).
    The state is kept in ``dtype`` (float64 by default); the network runs in ``model.dtype``.

    Returns ``x(t_max)`` with the shape of ``x0``; with ``return_stats`` also
    ``{"nfe": velocity evaluations for the batch, "forwards": network forwards per sample}``.
    """
    try:
        from torchdiffeq import odeint
    except ImportError as e:  # pragma: no cover - torchdiffeq is a dependency
        raise ImportError("bns.ground_truth needs torchdiffeq: pip install torchdiffeq") from e

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
    with torch.no_grad():
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
        per_sample = 2 if (getattr(model, "num_classes", None) and guidance != 1.0) else 1
        return out, {"nfe": nfe, "forwards": nfe * per_sample}
    return out
