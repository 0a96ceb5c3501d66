"""Classical solvers, each returned as an exact :class:`bns.NSSolver`.

``grid`` is always the classical solver's own step grid (midpoint on m steps: NFE 2m). Pass
``transform=ScheduleChange(...)`` (or :func:`bns.transforms.precondition`) to run the solver on
a scheduler-changed ODE and export it in the model's original coordinates; the grid is then in
the new time ``r``.

:func:`by_name` builds a named solver with an exact NFE on a model's range (the names of
``bns eval --baselines``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from torch import Tensor

from .. import grids as _grids
from ..errors import InputError
from ..solver import NSSolver
from ..transforms import ScheduleChange
from ..transforms import precondition as _precondition
from ._trace import trace
from .ends import with_data_end
from .exponential import (
    ddim,
    ddim_method,
    dpm_solver_pp,
    dpm_solver_pp_method,
    unipc,
    unipc_method,
)
from .multistep import adams_bashforth, adams_bashforth_method, ipndm, ipndm_method
from .runge_kutta import (
    euler,
    euler_method,
    heun,
    heun_method,
    midpoint,
    midpoint_method,
    rk4,
    rk4_method,
)

if TYPE_CHECKING:
    from ..model import Model
    from ..schedules import Schedule

__all__ = [
    "euler",
    "midpoint",
    "heun",
    "rk4",
    "adams_bashforth",
    "ipndm",
    "ddim",
    "dpm_solver_pp",
    "unipc",
    "by_name",
    "build",
    "Method",
    "METHODS",
    "with_data_end",
    "preconditionable",
    "initial_solver",
    "init_candidates",
    "solver_from_label",
    "SOLVER_NAMES",
    "GRID_NAMES",
    "grid_names",
]


@dataclass(frozen=True)
class Method:
    """A classical method as :func:`bns.solvers._trace.trace` runs it, the one implementation
    that both the classical solvers (:func:`by_name`) and the learned time grids
    (:mod:`bns.families`) use: ``fn(f, x, grid, **kwargs)``, ``per_step`` velocity evaluations
    per step; ``kind`` is ``"rk"``, ``"multistep"`` or ``"exponential"`` (these need the
    model's schedule, ``schedule=``, and are invariant under a change of scheduler)."""

    per_step: int
    fn: Callable[..., Any]
    kind: str
    kwargs: dict[str, Any] = field(default_factory=dict)

    @property
    def needs_schedule(self) -> bool:
        return self.kind == "exponential"


_LOF = {"lower_order_final": True}  # diffusers' default
METHODS: dict[str, Method] = {
    "euler": Method(1, euler_method, "rk"),
    "midpoint": Method(2, midpoint_method, "rk"),
    "heun": Method(2, heun_method, "rk"),
    "rk4": Method(4, rk4_method, "rk"),
    "ab2": Method(1, adams_bashforth_method, "multistep", {"order": 2}),
    "ab3": Method(1, adams_bashforth_method, "multistep", {"order": 3}),
    "ipndm": Method(1, ipndm_method, "multistep", {"order": 4}),
    "ddim": Method(1, ddim_method, "exponential"),
    "dpmpp2m": Method(1, dpm_solver_pp_method, "exponential", {"order": 2, **_LOF}),
    "dpmpp3m": Method(1, dpm_solver_pp_method, "exponential", {"order": 3, **_LOF}),
    "unipc2": Method(1, unipc_method, "exponential", {"order": 2, **_LOF}),
    "unipc3": Method(1, unipc_method, "exponential", {"order": 3, **_LOF}),
}


def build(
    name: str,
    grid: Tensor,
    schedule: Schedule | None = None,
    transform: ScheduleChange | None = None,
    **kwargs: Any,
) -> NSSolver:
    """The classical solver ``name`` of :data:`METHODS` on the step ``grid`` (``kwargs`` go to
    :func:`trace`: ``differentiable=True`` for a learned grid). An exponential integrator
    records its schedule in ``meta["schedule"]``."""
    m = METHODS[name]
    meta: dict[str, Any] = {"solver": name}
    kw = dict(m.kwargs)
    if m.needs_schedule:
        if schedule is None:
            raise InputError(f"{name} needs the model's schedule")
        if "lower_order_final" in kw:
            meta["lower_order_final"] = kw["lower_order_final"]
        meta["schedule"] = schedule.config()
        kw["schedule"] = schedule
    return trace(m.fn, grid, transform=transform, meta=meta, **kw, **kwargs)


SOLVER_NAMES: tuple[str, ...] = tuple(METHODS)
# Every grid by_name can build; "default" is a fixed rule (below), "best" its former name.
GRID_NAMES: tuple[str, ...] = (
    "default",
    "uniform",
    "logsnr",
    "edm",
    *_grids.SPACINGS,
    *(f"ays-{k}" for k in _grids.AYS_NOISE_LEVELS),
    "best",
)


def _steps_of(name: str, nfe: int) -> int:
    if isinstance(nfe, bool) or int(nfe) != nfe or nfe < 1:
        raise InputError(f"nfe must be a positive integer, got {nfe!r}")
    per_step = METHODS[name].per_step
    if nfe % per_step:
        raise InputError(
            f"{name} uses {per_step} velocity evaluations per step, so its NFE must be a multiple"
            f" of {per_step}; got nfe = {nfe}"
        )
    return int(nfe) // per_step


# Schedulers whose time is already close to uniform in difficulty (flow models): time-stepping
# solvers do best on a uniform grid there; on VP-type schedulers a log-SNR grid wins.
_FLOW_SCHEDULES = ("condot", "cosine")


def _default_grid(name: str, schedule: Schedule | None, t_range: tuple[float, float]) -> str:
    """The rule's grid for solver ``name`` on a model, when nothing is measured (:func:`by_name`)."""
    import torch

    ends = schedule.log_snr(torch.tensor(t_range, dtype=torch.float64))
    if not bool(torch.all(torch.isfinite(ends))):
        return "uniform"  # the only named grid that reaches an end with alpha = 0 or sigma = 0
    if METHODS[name].needs_schedule:
        return "logsnr"
    return "uniform" if getattr(schedule, "name", "") in _FLOW_SCHEDULES else "logsnr"


def grid_names(model: Model) -> tuple[str, ...]:
    """The grids a user could pick for ``model``, each of which :func:`by_name` can build.

    Uniform time always; log-SNR and EDM where the log-SNR is finite at both ends of the range;
    diffusers' timestep spacings on a model with discrete timesteps; the Align Your Steps levels
    made for the model's noise range (SD 1.x and SDXL's DDPM schedule, SVD's EDM range).
    """
    import torch

    from ..schedules import DiscreteVP

    t_range = tuple(model.t_range)
    schedule = model.schedule
    out = ["uniform"]
    if bool(
        torch.all(torch.isfinite(schedule.log_snr(torch.tensor(t_range, dtype=torch.float64))))
    ):
        out += ["logsnr", "edm"]
        out += [
            f"ays-{k}" for k in _grids.AYS_NOISE_LEVELS if _grids.ays_applies(k, schedule, t_range)
        ]
    if isinstance(schedule, DiscreteVP):
        out += list(_grids.SPACINGS)
    return tuple(out)


def _grid(kind: str, steps: int, schedule: Schedule, t_range: tuple[float, float]):
    if kind == "uniform":
        return _grids.uniform(steps, t_range)
    if kind == "logsnr":
        return _grids.logsnr(steps, schedule, t_range)
    if kind == "edm":
        return _grids.edm(steps, schedule, t_range)
    if kind in _grids.SPACINGS:
        return _grids.spacing(steps, schedule, t_range, kind)
    return _grids.ays(steps, schedule, t_range, kind.removeprefix("ays-"))


def preconditionable(name: str) -> bool:
    """Whether a change of scheduler changes solver ``name`` (not for exponential integrators)."""
    return not METHODS[name].needs_schedule


def by_name(
    name: str, nfe: int, model: Model, grid: str = "default", precondition: float | None = None
) -> NSSolver:
    """Build the classical solver ``name`` with exactly ``nfe`` velocity evaluations on
    ``model.t_range``.

    Args:
        name: one of :data:`SOLVER_NAMES`: ``euler``, ``midpoint``, ``heun``, ``rk4`` (Runge-Kutta;
            NFE a multiple of 1, 2, 2, 4), ``ab2``, ``ab3``, ``ipndm`` (multistep), ``ddim``,
            ``dpmpp2m``, ``dpmpp3m``, ``unipc2``, ``unipc3`` (exponential integrators, with
            diffusers' default ``lower_order_final``).
        nfe: velocity evaluations per sample.
        model: a :class:`bns.Model` (its ``schedule`` and ``t_range`` are used).
        grid: one of :func:`grid_names` (``"uniform"``, ``"logsnr"``, ``"edm"``, ``"linspace"``,
            ``"leading"``, ``"trailing"``, ``"ays-sd1"``, ...; see :mod:`bns.grids`) or
            ``"default"``, a fixed rule that measures nothing: uniform time wherever an end of
            the range has an infinite log-SNR, else log-SNR for the exponential solvers, and
            for the time-stepping solvers uniform time on CondOT and Cosine schedulers and
            log-SNR on the others. The rule can be far from the best grid of a given model (5
            to 9 dB at NFE 6 on some VP models): :func:`bns.classical.best_classical` measures
            every grid instead. ``"best"`` is the rule's former name.
        precondition: ``sigma0`` to run a Runge-Kutta or multistep solver on the model's ODE
            changed to the scheduler ``(r, sigma0 (1 - r))`` (docs/math.md, section 3), on a
            uniform grid in ``r``; None for none.

    Raises:
        ValueError: an unknown name or grid, or an NFE the solver cannot make.
        bns.grids.GridError: a log-SNR or EDM grid on a range with an infinite log-SNR end.
    """
    if name not in METHODS:
        raise InputError(f"unknown solver {name!r}; known: {', '.join(SOLVER_NAMES)}")
    if grid not in GRID_NAMES:
        raise InputError(f"unknown grid {grid!r}; known: {', '.join(GRID_NAMES)}")
    steps = _steps_of(name, nfe)
    t_range = tuple(model.t_range)
    schedule = model.schedule
    if precondition is not None:
        if not preconditionable(name):
            raise InputError(f"{name} is invariant under a change of scheduler: no precondition")
        transform = _precondition(schedule, float(precondition))
        solver = build(name, _grids.uniform(steps, transform.r_range(t_range)), None, transform)
        solver.meta.update({"solver": name, "grid": "uniform-r", "precondition": precondition})
        # Pin the ends to the model's range exactly (the transform rounds at the last ulp).
        solver.times[0], solver.times[-1] = t_range
        return solver
    kind = _default_grid(name, schedule, t_range) if grid in ("default", "best") else grid
    solver = build(name, _grid(kind, steps, schedule, t_range), schedule)
    solver.meta.update({"solver": name, "grid": kind})
    assert solver.nfe == nfe
    return solver


from .initial import init_candidates, initial_solver, solver_from_label  # noqa: E402 - uses by_name
