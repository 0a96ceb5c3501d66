"""Where a solver ends: at the end of the model's range, or on the data (sigma = 0).

A model whose range stops short of the data (a discrete DDPM model at sigma =
sqrt(1 - alphas_cumprod[0]), 0.01 to 0.03; a VP or EDM epsilon model at sigma_min) leaves that
much noise in every sample when a solver stops at ``t_max``. diffusers' multistep schedulers end
instead with a step to sigma = 0 (``final_sigmas_type="zero"``): the last step is the model's
data prediction at the last evaluated point, ``x_n = x1_hat(x_{n-1}, t_{n-1})``. Since
``x1_hat = (u - beta x) / gamma`` is linear in ``x`` and ``u`` (``(beta, gamma)`` of the data
prediction, docs/math.md, section 1), that step is one more row of an NS solver: ``end="data"``.

The ground truth of such a solver ends the same way: the adaptive solution at ``t_max``, then
the data prediction there (one more network evaluation). With ``end="data"`` the last time of
the solver, ``t_n = t_max``, only marks the end: the step lands on sigma = 0.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from ..errors import InputError
from ..model import prediction_coefficients
from ..schedules import Schedule, noise_level
from ..solver import NSSolver

if TYPE_CHECKING:
    from ..model import Model

__all__ = [
    "ENDS",
    "with_data_end",
    "resolve_end",
    "ends_short_of_data",
    "solver_end",
    "solver_noise_levels",
]

ENDS = ("auto", "range", "data")

# sigma(t_max) above which a model is said to stop short of the data: below it, the residual
# noise is under the float32 resolution of the samples and a final step changes nothing.
_SHORT = 1e-6


def ends_short_of_data(model: Model) -> bool:
    """Whether the model's range stops where noise remains (sigma(t_max) > 0), at the end of
    the path: a span that ends inside the path (:meth:`bns.Model.span`) hands its state on."""
    if getattr(model, "ends_inside", False):
        return False
    t = torch.tensor([model.t_range[1]], dtype=torch.float64)
    return float(model.schedule(t).sigma) > _SHORT


def resolve_end(model: Model, end: str) -> str:
    """``"range"`` or ``"data"`` for the option ``end`` (``"auto"``: ``"data"`` on a model
    that stops short of the data, measured in benchmarks/results/ends_fmnist-ddpm.md)."""
    if end not in ENDS:
        raise InputError(f"end must be one of {', '.join(ENDS)}, got {end!r}")
    if end == "auto":
        return "data" if ends_short_of_data(model) else "range"
    if end == "data" and getattr(model, "ends_inside", False):
        raise InputError(
            f"this span of {model.name} ends inside the path (t = {model.t_range[1]:g}), where"
            " the next part takes over: it has no final step to the data; use end range (or"
            " auto)"
        )
    if end == "data" and not ends_short_of_data(model):
        raise InputError(
            f"{model.name} reaches the data at t_max = {model.t_range[1]:g} (sigma = 0): there is"
            " no final step to add; use end range (or auto)"
        )
    return end


def solver_end(solver: NSSolver) -> str:
    """Where a solver ends, from its metadata (``"range"`` unless it says ``"data"``)."""
    return "data" if solver.meta.get("end") == "data" else "range"


def solver_noise_levels(solver: NSSolver, schedule: Schedule) -> Tensor:
    """The solver's times as a sampler's noise levels (:func:`bns.schedules.noise_level`,
    float64, ``nfe + 1`` values), 0 last where its last step lands on the data."""
    sig = noise_level(schedule, solver.times.to(torch.float64))
    if solver_end(solver) == "data":
        sig = sig.clone()
        sig[-1] = 0.0
    return sig


def data_end_row(a: Tensor, b: Tensor, t_last: Tensor, schedule: Schedule) -> tuple[Tensor, Tensor]:
    """The row ``(a_{n-1}, b_{n-1, :})`` of the step to sigma = 0 from the point ``x_{n-1}``
    that rows ``0..n-2`` of ``(a, b)`` reach (``x_0`` itself for ``n = 1``), evaluated at
    ``t_last``. Differentiable in ``a``, ``b`` and ``t_last``."""
    n = b.shape[0]
    beta, gamma = prediction_coefficients("x1", schedule, t_last.reshape(1).to(torch.float64))
    c, d = (-beta / gamma).to(b.dtype)[0], (1.0 / gamma).to(b.dtype)[0]
    if n == 1:
        prev_a, prev_b = torch.ones((), dtype=b.dtype), torch.zeros(1, dtype=b.dtype)
    else:
        prev_a, prev_b = a[n - 2], b[n - 2]
    last = torch.zeros(n, dtype=b.dtype)
    last[n - 1] = 1.0
    return c * prev_a, c * prev_b + d * last


def with_data_end(solver: NSSolver, schedule: Schedule | Any) -> NSSolver:
    """``solver`` with its last step replaced by the step to sigma = 0 from ``x_{n-1}``.

    ``schedule`` is the model's scheduler (or the model). The evaluation times stay; the result
    is exact in float64 and, on a DPM-Solver++ grid, equals diffusers' scheduler with
    ``final_sigmas_type="zero"``.
    """
    schedule = getattr(schedule, "schedule", schedule)
    n = solver.nfe
    t_last = solver.times[n - 1].to(torch.float64)
    sigma = float(schedule(t_last.reshape(1)).sigma)
    if not sigma > 0:
        raise InputError(
            f"the last evaluation (t = {float(t_last):g}) has sigma = 0: no data prediction there"
        )
    a, b = solver.a.clone(), solver.b.clone()
    a[n - 1], b[n - 1] = data_end_row(a, b, t_last, schedule)
    return NSSolver(solver.times.clone(), a, b, {**solver.meta, "end": "data"})
