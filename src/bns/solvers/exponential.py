"""Exponential integrators in data prediction as NS solvers: DDIM, DPM-Solver++, UniPC.

These solvers step ``x`` in the log-SNR ``lambda = log(alpha / sigma)`` and combine ``x`` with
data predictions ``m = x1_hat``. An NS solver only sees velocities, so every data prediction
is formed from the velocity at the point where it was evaluated,
``x1_hat = (u - beta x) / gamma`` with ``(beta, gamma) = prediction_coefficients("x1", schedule, t)``;
this is exact because ``u = beta x + gamma x1_hat`` on the model's path (docs/math.md, section 1).
The update formulas follow diffusers' ``DDIMScheduler``, ``DPMSolverMultistepScheduler``
(``algorithm_type="dpmsolver++"``) and ``UniPCMultistepScheduler`` (``bh2``, ``predict_x0``), which
the oracle tests run side by side.

``schedule`` is the scheduler of the ODE the solver steps. Without a transform that is the
model's scheduler. With ``transform=ScheduleChange(source, target)`` the solver runs on the
transformed ODE in ``r``, whose path has the *target* scheduler, so ``schedule`` must be the
target (it defaults to it). Exponential integrators in data prediction are invariant under a
change of scheduler, so such a run equals the untransformed solver on the grid ``t_r``.

Ends with an infinite log-SNR are allowed, so these solvers run on the full [0, 1] of a CondOT
flow model:

- a start where ``alpha = 0`` (``lambda = -inf``): the first step is the limit ``h -> inf`` of
  the first-order update, ``x_1 = (sigma_1/sigma_0) x_0 + alpha_1 x1_hat_0``. Later steps take the
  exact limit of their formulas as ``lambda_0 -> -inf``: a history point at ``-inf`` carries
  zero weight (its divided difference vanishes) and drops out of UniPC's linear system.
- an end where ``sigma = 0`` (``lambda = +inf``): the last step is first order whatever the
  order (higher-order terms diverge there; diffusers does the same with
  ``final_sigmas_type="zero"``); it lands on ``x_n = alpha_n x1_hat_{n-1}``.

Interior grid points need a finite log-SNR, and the log-SNR must increase along the grid.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from ..errors import InputError
from ..grids import GridError, check_grid
from ..model import prediction_coefficients
from ..schedules import Schedule
from ..solver import NSSolver
from ..transforms import ScheduleChange
from ._trace import points, trace

__all__ = [
    "ddim",
    "dpm_solver_pp",
    "unipc",
    "ddim_method",
    "dpm_solver_pp_method",
    "unipc_method",
    "phi",
]


@dataclass(frozen=True)
class _Node:
    """Scheduler values at one grid point: Python floats, or 0-dim tensors in a
    differentiable trace (a grid given as a sequence of tensors, :func:`points`)."""

    t: float
    alpha: float
    sigma: float
    lam: float
    beta: float  # u = beta x + gamma x1_hat (meaningful where sigma > 0)
    gamma: float


def _nodes(grid, schedule: Schedule) -> list[_Node]:
    tensors = not isinstance(grid, Tensor)
    g = torch.stack(points(grid)) if tensors else check_grid(grid)
    lo, hi = float(g[0].detach()), float(g[-1].detach())
    if lo < 0.0 or hi > 1.0:
        raise GridError(
            f"the grid [{lo:.6g}, {hi:.6g}] leaves [0, 1], where the scheduler is defined"
        )
    v = schedule(g)
    a, s = v.alpha, v.sigma
    lam = schedule.log_snr(g)
    beta, gamma = prediction_coefficients("x1", schedule, g[:-1])
    n = g.numel() - 1
    if torch.any(torch.isnan(lam)) or torch.any(~torch.isfinite(lam[1:-1])):
        raise GridError(
            "an exponential solver needs a finite log-SNR at every interior grid point (only"
            " the start may have alpha = 0 and the end sigma = 0); got log-SNR"
            f" {[round(float(v), 4) for v in lam.detach()]}"
        )
    if not torch.all(lam[1:] > lam[:-1]):
        raise GridError("the log-SNR must increase strictly along the grid (noise to data)")
    if not (torch.all(torch.isfinite(beta)) and torch.all(torch.isfinite(gamma[:n]))):
        raise GridError("the data prediction is undefined at a grid point where sigma = 0")
    val = (lambda x: x) if tensors else float
    return [
        _Node(
            val(g[i]),
            val(a[i]),
            val(s[i]),
            val(lam[i]),
            val(beta[i]) if i < n else math.nan,
            val(gamma[i]) if i < n else math.nan,
        )
        for i in range(n + 1)
    ]


def _float(v) -> float:
    """A value for a test (a tensor's value without its gradient)."""
    return float(v.detach()) if isinstance(v, Tensor) else v


def _exp(z):
    return torch.exp(z) if isinstance(z, Tensor) else math.exp(z)


def _expm1(z):
    return torch.expm1(z) if isinstance(z, Tensor) else math.expm1(z)


def phi(k: int, z: float) -> float:
    """``phi_k(z) = sum_{j>=0} z^j / (j+k)!`` (``phi_0 = e^z``, ``phi_{k+1} = (phi_k - 1/k!) / z``).

    A power series for small ``|z|`` avoids the cancellation of the recurrence. ``z`` may be
    a 0-dim tensor (then differentiable).
    """
    if abs(z) < 0.5:
        term = 1.0 / math.factorial(k)
        total = term
        for j in range(1, 40):
            term *= z / (j + k)
            total += term
            if abs(term) < 1e-18 * abs(total):
                break
        return total
    p = _exp(z)
    for j in range(k):
        p = (p - 1.0 / math.factorial(j)) / z
    return p


def _x1_hat(f, x, node: _Node):
    """Data prediction from the velocity at ``(x, t)``: ``(u - beta x) / gamma``."""
    u = f(x, node.t)
    return (1.0 / node.gamma) * u - (node.beta / node.gamma) * x


def _sum(terms):
    """``sum c * v`` over ``(c, v)`` pairs, skipping zero weights (limits at infinite log-SNR)."""
    out = None
    for c, v in terms:
        if c == 0.0:
            continue
        out = c * v if out is None else out + c * v
    return out


def _first_order(x, m0, s: _Node, t: _Node):
    """One DDIM / DPM-Solver++(1) step from ``s`` to ``t``:
    ``x_t = (sigma_t/sigma_s) x + alpha_t (1 - e^{-h}) m0`` with ``h = lambda_t - lambda_s``."""
    h = t.lam - s.lam
    return _sum([(t.sigma / s.sigma, x), (-t.alpha * _expm1(-h), m0)])


def _final_is_sigma_zero(nodes: list[_Node]) -> bool:
    return math.isinf(_float(nodes[-1].lam))


# -- DDIM ---------------------------------------------------------------------------------------


def ddim_method(f, x, grid, schedule: Schedule):
    nodes = _nodes(grid, schedule)
    for s, t in zip(nodes[:-1], nodes[1:]):
        x = _first_order(x, _x1_hat(f, x, s), s, t)
    return x


def _resolve_schedule(schedule: Schedule | None, transform: ScheduleChange | None) -> Schedule:
    if transform is None:
        if schedule is None:
            raise InputError("an exponential solver needs the model's schedule")
        return schedule
    if schedule is None:
        return transform.target
    if schedule != transform.target:
        raise InputError(
            f"with a transform the solver steps the transformed ODE, whose scheduler is the"
            f" target {transform.target!r}; got schedule={schedule!r}"
        )
    return schedule


def ddim(
    grid: Tensor, schedule: Schedule | None = None, *, transform: ScheduleChange | None = None
) -> NSSolver:
    """Deterministic DDIM (the first-order exponential integrator in data prediction), NFE = steps.

    Args:
        grid: the step grid, increasing flow times (in ``r`` with a transform).
        schedule: the scheduler of the ODE being stepped: the model's, or the transform's target
            (the default with a transform).
        transform: run on a scheduler-changed ODE and export in the original coordinates.
    """
    schedule = _resolve_schedule(schedule, transform)
    meta = {"solver": "ddim", "schedule": schedule.config()}
    return trace(ddim_method, grid, transform=transform, meta=meta, schedule=schedule)


# -- DPM-Solver++ (multistep) -------------------------------------------------------------------


def _dpmpp_orders(n: int, order: int, lower_order_final: bool, sigma_zero_end: bool) -> list[int]:
    """The order of each step, as diffusers' DPMSolverMultistepScheduler chooses it."""
    small = lower_order_final and n < 15
    out = []
    for i in range(n):
        k = min(order, i + 1)  # warm-up: step i has i + 1 data predictions
        if i == n - 1 and (small or sigma_zero_end):
            k = 1
        elif i == n - 2 and small:
            k = min(k, 2)
        out.append(k)
    return out


def dpm_solver_pp_method(
    f, x, grid, schedule: Schedule, order: int = 2, lower_order_final: bool = True
):
    nodes = _nodes(grid, schedule)
    n = len(nodes) - 1
    orders = _dpmpp_orders(n, order, lower_order_final, _final_is_sigma_zero(nodes))
    ms: list = []
    for i in range(n):
        s0, t = nodes[i], nodes[i + 1]
        ms.append(_x1_hat(f, x, s0))
        k = orders[i]
        base = _first_order(x, ms[-1], s0, t)
        if k == 1:
            x = base
            continue
        h = t.lam - s0.lam
        s1 = nodes[i - 1]
        r0 = (s0.lam - s1.lam) / h  # inf when s1 is a start at lambda = -inf
        m0, m1 = ms[-1], ms[-2]
        if k == 2:
            # diffusers' default "midpoint" form: x += alpha_t (1 - e^{-h}) / 2 * D1.
            c = 0.5 * t.alpha * h * phi(1, -h) / r0
            x = _sum([(1.0, base), (c, m0), (-c, m1)])
            continue
        s2 = nodes[i - 2]
        r1 = (s1.lam - s2.lam) / h
        # D1_0 = (m0 - m1)/r0, D1_1 = (m1 - m2)/r1, D1 = D1_0 + r0/(r0+r1) (D1_0 - D1_1),
        # D2 = (D1_0 - D1_1)/(r0+r1); x += alpha_t h phi_2(-h) D1 + alpha_t h phi_3(-h) D2.
        c1 = t.alpha * h * phi(2, -h)
        if math.isinf(_float(r1)):  # s2 at lambda = -inf: the limit below, where D1_1 drops out
            x = _sum([(1.0, base), (c1 / r0, m0), (-c1 / r0, m1)])
            continue
        c2 = t.alpha * h * phi(3, -h)
        w_d10 = c1 * (1 + r0 / (r0 + r1)) + c2 / (r0 + r1)  # weight of D1_0
        w_d11 = -c1 * r0 / (r0 + r1) - c2 / (r0 + r1)  # weight of D1_1
        m2 = ms[-3]
        x = _sum(
            [
                (1.0, base),
                (w_d10 / r0, m0),
                (-w_d10 / r0 + w_d11 / r1, m1),
                (-w_d11 / r1, m2),
            ]
        )
    return x


def dpm_solver_pp(
    grid: Tensor,
    schedule: Schedule | None = None,
    order: int = 2,
    *,
    lower_order_final: bool = True,
    transform: ScheduleChange | None = None,
) -> NSSolver:
    """Multistep DPM-Solver++ (Lu et al., 2022) in data prediction, NFE = steps.

    Step ``i`` uses order ``min(order, i + 1)`` (warm-up). ``lower_order_final`` follows
    diffusers' default: with fewer than 15 steps the last step is first order and, for order 3,
    the one before it second order. The second-order update is diffusers' default ``"midpoint"``
    form. A grid ending where ``sigma = 0`` always ends with a first-order step.

    The third-order update reproduces diffusers' DPMSolverMultistepScheduler exactly; its
    second divided difference enters with half the weight a third-order Taylor match needs, so
    ``order=3`` converges at order 2 (measured in tests/test_solvers.py).

    Args:
        grid: the step grid (in ``r`` with a transform).
        schedule: the scheduler of the ODE being stepped (see the module docstring).
        order: 1, 2 or 3 (``dpmpp2m`` is order 2, ``dpmpp3m`` order 3).
        lower_order_final: lower the final steps' orders for short grids, as diffusers does.
        transform: run on a scheduler-changed ODE and export in the original coordinates.
    """
    return _export_multistep(
        dpm_solver_pp_method,
        "DPM-Solver++",
        f"dpmpp{order}m",
        grid,
        schedule,
        order,
        lower_order_final,
        transform,
    )


# -- UniPC (bh2, data prediction) ---------------------------------------------------------------


def _unipc_b(p: int, h: float) -> list[float]:
    """Right-hand side ``b_k = k! phi_{k+1}(-h) / phi_1(-h)``, k = 1..p, of UniPC's B(h) = e^{-h}-1
    ("bh2") order conditions."""
    return [math.factorial(k) * phi(k + 1, -h) / phi(1, -h) for k in range(1, p + 1)]


def _solve(nodes: list, b: list) -> list:
    """Solve ``sum_j rho_j nodes_j^(k-1) = b_k`` for k = 1..len(nodes) (a Vandermonde system)."""
    m = len(nodes)
    if m == 0:
        return []
    if any(isinstance(v, Tensor) for v in [*nodes, *b[:m]]):  # differentiable
        t = [torch.as_tensor(r, dtype=torch.float64) for r in nodes]
        R = torch.stack([torch.stack([r ** (k - 1) for r in t]) for k in range(1, m + 1)])
        rhs = torch.stack([torch.as_tensor(v, dtype=torch.float64) for v in b[:m]])
        return list(torch.linalg.solve(R, rhs).unbind())
    R = torch.tensor([[r ** (k - 1) for r in nodes] for k in range(1, m + 1)], dtype=torch.float64)
    rhs = torch.tensor(b[:m], dtype=torch.float64)
    return [float(v) for v in torch.linalg.solve(R, rhs)]


def _unipc_update(x, ms: list, nodes: list[_Node], i: int, p: int, m_new=None):
    """UniP-p from ``nodes[i]`` to ``nodes[i+1]`` (``m_new is None``), or UniC-p for the same step
    using the data prediction ``m_new`` at ``nodes[i+1]``. ``ms[j]`` is the prediction at node j."""
    s0, t = nodes[i], nodes[i + 1]
    h = t.lam - s0.lam
    m0 = ms[i]
    base = _first_order(x, m0, s0, t)
    # History nodes r_k = (lambda_{i-k} - lambda_i) / h, k = 1..p-1. One at lambda = -inf gives
    # rho_k D1_k -> 0 and removes one order condition (the exact limit of the linear system).
    hist = [(k, (nodes[i - k].lam - s0.lam) / h) for k in range(1, p)]
    hist = [(k, r) for k, r in hist if math.isfinite(_float(r))]
    scale = -t.alpha * _expm1(-h)  # -alpha_t B(h), B(h) = e^{-h} - 1
    terms = [(1.0, base)]
    if m_new is None:
        if not hist:
            return base
        if p == 2:
            rhos = [0.5]  # diffusers' simplified second-order predictor
        else:
            rhos = _solve([r for _, r in hist], _unipc_b(len(hist), h))
    else:
        rs = [r for _, r in hist] + [1.0]
        rhos = [0.5] if p == 1 else _solve(rs, _unipc_b(len(rs), h))
        terms += [(scale * rhos[-1], m_new), (-scale * rhos[-1], m0)]
    for (k, r), rho in zip(hist, rhos):
        # D1_k = (m_{i-k} - m_i) / r_k
        terms += [(scale * rho / r, ms[i - k]), (-scale * rho / r, m0)]
    return _sum(terms)


def _unipc_orders(n: int, order: int, lower_order_final: bool, sigma_zero_end: bool) -> list[int]:
    """The predictor order of each step, as diffusers' UniPCMultistepScheduler chooses it."""
    out = []
    for i in range(n):
        k = min(order, n - i) if lower_order_final else order
        k = min(k, i + 1)
        if i == n - 1 and sigma_zero_end:
            k = 1
        out.append(k)
    return out


def unipc_method(f, x, grid, schedule: Schedule, order: int = 2, lower_order_final: bool = True):
    nodes = _nodes(grid, schedule)
    n = len(nodes) - 1
    orders = _unipc_orders(n, order, lower_order_final, _final_is_sigma_zero(nodes))
    ms: list = []
    x_prev = None
    for i in range(n):
        m = _x1_hat(f, x, nodes[i])
        if i > 0:
            # UniC: correct x_i with the prediction just evaluated at the predicted x_i; the
            # evaluation itself stays where it was made.
            x = _unipc_update(x_prev, ms, nodes, i - 1, orders[i - 1], m_new=m)
        ms.append(m)
        x_prev = x
        x = _unipc_update(x, ms, nodes, i, orders[i])
    return x


def unipc(
    grid: Tensor,
    schedule: Schedule | None = None,
    order: int = 2,
    *,
    lower_order_final: bool = True,
    transform: ScheduleChange | None = None,
) -> NSSolver:
    """UniPC (Zhao et al., 2023), ``bh2`` variant in data prediction, NFE = steps.

    Each step predicts with UniP of ``order`` (lower while the history is short) and, after the
    next evaluation, corrects the point with UniC using that new evaluation, as diffusers'
    ``UniPCMultistepScheduler`` default configuration does; there is no corrector after the last
    step, so no extra evaluation. ``lower_order_final`` (diffusers' default) lowers the order of
    the last steps to the number of steps left. A grid ending where ``sigma = 0`` always ends
    with a first-order step.

    Args:
        grid: the step grid (in ``r`` with a transform).
        schedule: the scheduler of the ODE being stepped (see the module docstring).
        order: 1, 2 or 3 (``unipc2``, ``unipc3``).
        lower_order_final: lower the final steps' orders, as diffusers does.
        transform: run on a scheduler-changed ODE and export in the original coordinates.
    """
    return _export_multistep(
        unipc_method, "UniPC", f"unipc{order}", grid, schedule, order, lower_order_final, transform
    )


def _export_multistep(method, title, name, grid, schedule, order, lower_order_final, transform):
    """Trace a multistep exponential integrator of ``order`` (1-3) into an NSSolver."""
    if order not in (1, 2, 3):
        raise InputError(f"{title} order must be 1, 2 or 3, got {order!r}")
    schedule = _resolve_schedule(schedule, transform)
    return trace(
        method,
        grid,
        transform=transform,
        meta={
            "solver": name,
            "lower_order_final": bool(lower_order_final),
            "schedule": schedule.config(),  # what a learned time grid needs (bns.families)
        },
        schedule=schedule,
        order=order,
        lower_order_final=bool(lower_order_final),
    )
