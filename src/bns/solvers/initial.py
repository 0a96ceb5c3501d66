"""The classical solvers a BNS solver can start from (docs/math.md, section 4).

A BNS solver needs strictly increasing times (its grid is parameterized by positive
increments), so Heun and RK4, whose stages share times, are no starting points. Every other
classical solver is, on every grid of the model (:func:`bns.solvers.grid_names`) that starts at
``t_min``, and the Runge-Kutta and multistep ones also on the model's ODE preconditioned to the
CondOT(sigma0) scheduler. Which one is best depends on the model: the trainer measures them on
validation pairs (:func:`bns.classical.rank`).

A candidate's label (``meta["init"]``) names it: ``ab3@uniform`` (solver and grid),
``midpoint+pc1`` (preconditioned, on a uniform grid in the new time). A label without a grid,
as files written before grids were measured hold, means the grid rule of
:func:`bns.solvers.by_name` (``grid="default"``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ..errors import InputError
from ..schedules import CondOT
from ..solver import NSSolver
from .ends import with_data_end

if TYPE_CHECKING:
    from ..model import Model

__all__ = [
    "init_candidates",
    "initial_solver",
    "solver_from_label",
    "distinct_solvers",
    "AUTO_SIGMA0",
]

AUTO_SIGMA0 = (
    1.0  # the paper's sigma0; best of 0.5, 1, 2 in benchmarks/results/precondition_gmm-vp.md
)


def _label(name: str, precondition: float | None, grid: str) -> str:
    return f"{name}@{grid}" if precondition is None else f"{name}+pc{precondition:g}"


def initial_solver(
    model: Model,
    nfe: int,
    init: str = "midpoint",
    precondition: float | None = None,
    end: str = "range",
    grid: str = "default",
) -> NSSolver:
    """The classical solver ``init`` with ``nfe`` evaluations on ``grid``, as an NS solver
    that BNS can start from: strictly increasing times, ends exactly on ``model.t_range``; with
    ``end="data"`` its last step is the step to sigma = 0 (:func:`bns.solvers.with_data_end`).

    ``precondition = sigma0`` runs it on the model's ODE changed to the scheduler
    ``(r, sigma0 (1 - r))`` (on a uniform grid in the new time). Raises ValueError for an
    unknown name or grid, an NFE the solver cannot make, a solver with repeated times, or a
    grid that starts after ``t_min`` (diffusers' leading spacing).
    """
    from . import by_name

    solver = by_name(init, nfe, model, grid=grid, precondition=precondition)
    if not torch.all(solver.times[1:] > solver.times[:-1]):
        raise InputError(
            f"init {init} evaluates twice at one time (stages share times); BNS needs strictly"
            " increasing times: use euler, midpoint or a multistep/exponential solver"
        )
    if abs(float(solver.times[0]) - model.t_range[0]) > 1e-9:
        raise InputError(
            f"the {solver.meta['grid']} grid starts at t = {float(solver.times[0]):.6g}, after"
            f" t_min = {model.t_range[0]:g}: a BNS solver starts on the noise"
        )
    solver.times[0], solver.times[-1] = model.t_range
    solver.meta["init"] = _label(init, precondition, solver.meta["grid"])
    return with_data_end(solver, model.schedule) if end == "data" else solver


def init_candidates(
    model: Model,
    nfe: int,
    init: str = "best",
    precondition: float | str | None = "auto",
    end: str = "range",
) -> list[NSSolver]:
    """The solvers that ``init`` and ``precondition`` allow at ``nfe``, to be measured.

    ``init="best"`` takes every classical solver that can start BNS at this NFE, each on every
    grid of the model that starts at ``t_min``; a name takes that solver on every such grid; a
    label (``ab3@uniform``, ``midpoint+pc1``) takes that one solver. ``precondition="auto"`` adds, to each Runge-Kutta and multistep solver, its
    version preconditioned with sigma0 = 1 (except on a CondOT model, where that is the
    identity); a number uses only the preconditioned versions
    (exponential integrators are invariant: they stay as they are); None none. Each solver's
    ``meta["init"]`` names it (``"midpoint+pc1"`` for a preconditioned one).
    """
    from . import GRID_NAMES, SOLVER_NAMES, grid_names, preconditionable

    if "@" in init or "+pc" in init:
        name, grid, pc = _parse(init)
        if name not in SOLVER_NAMES or grid not in GRID_NAMES:
            raise InputError(
                f"unknown init {init!r}: solver@grid with a solver of"
                f" {', '.join(SOLVER_NAMES)} and a grid of {', '.join(GRID_NAMES)}"
            )
        return [initial_solver(model, nfe, name, pc, end, grid)]
    if init != "best" and init not in SOLVER_NAMES:
        raise InputError(f"unknown init {init!r}; use best or one of {', '.join(SOLVER_NAMES)}")
    names = SOLVER_NAMES if init == "best" else (init,)
    grids = grid_names(model)
    if precondition == "auto" and model.schedule == CondOT(AUTO_SIGMA0):
        precondition = None  # the change of scheduler is the identity: nothing to compare
    out, errors = [], []
    for name in names:
        if precondition == "auto":
            variants = [None, AUTO_SIGMA0] if preconditionable(name) else [None]
        elif precondition is None or not preconditionable(name):
            variants = [None]
        else:
            variants = [float(precondition)]
        for pc in variants:
            for grid in grids if pc is None else ("default",):
                try:
                    out.append(initial_solver(model, nfe, name, pc, end, grid))
                except ValueError as e:  # an NFE it cannot make, repeated times, a late start
                    errors.append(str(e))
    if not out:
        raise InputError(f"no initial solver {init!r} at nfe = {nfe}: {'; '.join(errors)}")
    return out


def _parse(label: str) -> tuple[str, str, float | None]:
    name, _, pc = label.partition("+pc")
    name, _, grid = name.partition("@")
    return name, grid or "default", float(pc) if pc else None


def solver_from_label(model: Model, nfe: int, label: str, end: str = "range") -> NSSolver:
    """The initial solver a label of ``meta["init"]`` names (``"ab3@uniform"``,
    ``"midpoint+pc1"``; ``"ipndm"``, from files before grids were measured: the default grid)."""
    name, grid, pc = _parse(label)
    return initial_solver(model, nfe, name, pc, end, grid)


def distinct_solvers(solvers: list[NSSolver]) -> list[NSSolver]:
    """``solvers`` less those whose times and coefficients equal an earlier one's (at low NFE
    some methods coincide: DPM-Solver++ 2M and 3M, UniPC-2 and -3, iPNDM and AB3)."""
    out: list[NSSolver] = []
    for s in solvers:
        if not any(_same_solver(s, o) for o in out):
            out.append(s)
    return out


def _same_solver(s: NSSolver, o: NSSolver) -> bool:
    return all(torch.equal(getattr(s, k), getattr(o, k)) for k in ("times", "a", "b"))
