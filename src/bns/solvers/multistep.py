"""Linear multistep solvers as NS solvers: variable-step Adams-Bashforth and iPNDM.

Both start with lower orders (one velocity gives order 1, two give order 2, ...), use one
velocity evaluation per step, and so have NFE = steps.
"""

from __future__ import annotations

from torch import Tensor

from ..errors import InputError
from ..solver import NSSolver
from ..transforms import ScheduleChange
from ._trace import points, trace

__all__ = ["adams_bashforth", "ipndm", "adams_bashforth_method", "ipndm_method", "ab_weights"]

# Constant-step Adams-Bashforth weights, newest velocity first (iPNDM uses them on any grid).
_AB_CONSTANT = {
    1: (1.0,),
    2: (3 / 2, -1 / 2),
    3: (23 / 12, -16 / 12, 5 / 12),
    4: (55 / 24, -59 / 24, 37 / 24, -9 / 24),
}


def _check_order(order: int) -> int:
    if order not in _AB_CONSTANT:
        raise InputError(f"order must be 1, 2, 3 or 4, got {order!r}")
    return order


def ab_weights(past: list, t0, t1) -> list:
    """Weights ``w_k`` with ``int_{t0}^{t1} p(t) dt = sum_k w_k u_k``, where ``p`` interpolates the
    velocities ``u_k`` at times ``past[k]`` (newest first): exact integrals of the Lagrange basis,
    expanded in ``tau = t - t0``. Python floats or 0-dim tensors (then differentiable)."""
    h = t1 - t0
    d = [p - t0 for p in past]
    out = []
    for k in range(len(d)):
        coef = [1.0]  # polynomial in tau, lowest degree first
        for j in range(len(d)):
            if j == k:
                continue
            scale = 1.0 / (d[k] - d[j])
            nxt = [0.0] * (len(coef) + 1)
            for p, c in enumerate(coef):
                nxt[p + 1] += c * scale
                nxt[p] -= c * d[j] * scale
            coef = nxt
        out.append(sum(c * h ** (p + 1) / (p + 1) for p, c in enumerate(coef)))
    return out


def adams_bashforth_method(f, x, grid, order: int = 2):
    g = points(grid)
    past_t: list = []
    past_u: list = []
    for i in range(len(g) - 1):
        t0, t1 = g[i], g[i + 1]
        past_t.insert(0, t0)
        past_u.insert(0, f(x, t0))
        k = min(order, len(past_t))
        w = ab_weights(past_t[:k], t0, t1)
        for wk, uk in zip(w, past_u[:k]):
            x = x + wk * uk
        del past_t[order:], past_u[order:]
    return x


def ipndm_method(f, x, grid, order: int = 4):
    g = points(grid)
    past_u: list = []
    for i in range(len(g) - 1):
        t0, t1 = g[i], g[i + 1]
        past_u.insert(0, f(x, t0))
        k = min(order, len(past_u))
        d = None
        for c, uk in zip(_AB_CONSTANT[k], past_u[:k]):
            d = c * uk if d is None else d + c * uk
        x = x + (t1 - t0) * d
        del past_u[order:]
    return x


def adams_bashforth(
    grid: Tensor, order: int = 2, *, transform: ScheduleChange | None = None
) -> NSSolver:
    """Variable-step Adams-Bashforth of ``order`` (1-4) on ``grid`` (NFE = steps); the first
    steps use the orders their history allows."""
    order = _check_order(order)
    return trace(
        adams_bashforth_method,
        grid,
        transform=transform,
        order=order,
        meta={"solver": f"ab{order}"},
    )


def ipndm(grid: Tensor, order: int = 4, *, transform: ScheduleChange | None = None) -> NSSolver:
    """Improved PNDM (Zhang & Chen, 2023): Adams-Bashforth with constant-step weights on any grid,
    lower order while the history is short (NFE = steps)."""
    order = _check_order(order)
    # Named as in bns.solvers.METHODS, whichever way it is built: "ipndm" is order 4.
    name = "ipndm" if order == 4 else f"ipndm{order}"
    return trace(ipndm_method, grid, transform=transform, order=order, meta={"solver": name})
