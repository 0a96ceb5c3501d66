"""The classical solvers a BNS solver can start from (bns-math.md, section 4).

A BNS solver needs strictly increasing times (its grid is parameterized by positive
increments), so Heun and RK4, whose stages share times, are no starting points. Every other
classical solver is, on its best grid (:func:`bns.solvers.by_name`), and the Runge-Kutta and
multistep ones also on the model's ODE preconditioned to the CondOT(sigma0) scheduler.
Which one is best depends on the model: the trainer measures them on validation pairs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ..schedules import CondOT
from ..solver import NSSolver
from .ends import with_data_end

if TYPE_CHECKING:
    from ..model import Model

__all__ = ["init_candidates", "initial_solver", "solver_from_label", "AUTO_SIGMA0"]

AUTO_SIGMA0 = (
    1.0  # the paper's sigma0; best of 0.5, 1, 2 in benchmarks/results/precondition_gmm-vp.md
)


def _label(name: str, precondition: float | None) -> str:
    return name if precondition is None else f"{name}+pc{precondition:g}"


def initial_solver(
    model: Model,
    nfe: int,
    init: str = "midpoint",
    precondition: float | None = None,
    end: str = "range",
) -> NSSolver:
    """The classical solver ``init`` with ``nfe`` evaluations, as an NS solver that BNS can
    start from: strictly increasing times, ends exactly on ``model.t_range``; with
    ``end="data"`` its last step is the step to sigma = 0 (:func:`bns.solvers.with_data_end`).

    ``precondition = sigma0`` runs it on the model's ODE changed to the scheduler
    ``(r, sigma0 (1 - r))``. Raises ValueError for an unknown name, an NFE the solver cannot
    make, or a solver with repeated times.
    """
    from . import by_name

    solver = by_name(init, nfe, model, precondition=precondition)
    if not torch.all(solver.times[1:] > solver.times[:-1]):
        raise ValueError(
            f"init {init} evaluates twice at one time (stages share times); BNS needs strictly"
            " increasing times: use euler, midpoint or a multistep/exponential solver"
        )
    solver.times[0], solver.times[-1] = model.t_range
    solver.meta["init"] = _label(init, precondition)
    return with_data_end(solver, model.schedule) if end == "data" else solver


def init_candidates(
    model: Model,
    nfe: int,
    init: str = "best",
    precondition: float | str | None = "auto",
    end: str = "range",
) -> list[NSSolver]:
    """The solvers that ``init`` and ``precondition`` allow at ``nfe``, to be measured.

    ``init="best"`` takes every classical solver that can start BNS at this NFE; a name takes
    that one. ``precondition="auto"`` adds, to each Runge-Kutta and multistep solver, its
    version preconditioned with sigma0 = 1 (except on a CondOT model, where that is the
    identity); a number uses only the preconditioned versions
    (exponential integrators are invariant: they stay as they are); None none. Each solver's
    ``meta["init"]`` names it (``"midpoint+pc1"`` for a preconditioned one).
    """
    from . import SOLVER_NAMES, preconditionable

    if init != "best" and init not in SOLVER_NAMES:
        raise ValueError(f"unknown init {init!r}; use best or one of {', '.join(SOLVER_NAMES)}")
    names = SOLVER_NAMES if init == "best" else (init,)
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
            try:
                out.append(initial_solver(model, nfe, name, pc, end))
            except ValueError as e:  # an NFE it cannot make, repeated times
                errors.append(str(e))
    if not out:
        raise ValueError(f"no initial solver {init!r} at nfe = {nfe}: {'; '.join(errors)}")
    return out


def solver_from_label(model: Model, nfe: int, label: str, end: str = "range") -> NSSolver:
    """The initial solver a label of ``meta["init"]`` names (``"ipndm"``, ``"midpoint+pc1"``)."""
    name, _, pc = label.partition("+pc")
    return initial_solver(model, nfe, name, float(pc) if pc else None, end)
