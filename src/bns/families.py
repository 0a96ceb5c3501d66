"""Solver families: parameterizations that map free parameters to an :class:`NSSolver`.

The trainer optimizes a family's parameters and never looks inside: it calls ``solver()`` to
build a differentiable NSSolver and ``param_groups()`` for the optimizer, and
:func:`usable_inits` keeps the initial solvers a family can start from. Each family is one
class registered in :data:`FAMILIES`; the restricted ones are the learned solvers BNS is
compared with, trained on the same pairs, loss and validation:

- ``bns``: the full non-stationary family (docs/math.md, section 2).
- ``time``: the time grid of a fixed classical solver (any of :data:`bns.solvers.METHODS`:
  Runge-Kutta and multistep, each also preconditioned, and the exponential integrators DDIM,
  DPM-Solver++ and UniPC), its coefficients the classical formula on the learned grid (as
  LD3, GITS, DMN learn grids).
- ``scale-time``: a scale-time transformation of Euler or midpoint, with ``t_r``, ``t_r'``,
  ``s_r`` and ``s_r'/s_r`` free at every evaluation (the Bespoke solvers, BES, arXiv
  2310.19075; docs/math.md, section 3).
- ``multistep``: ``x_{i+1} = x_i + sum_{j<=i} c_ij u_j`` with free ``c`` and grid: linear
  multistep coefficients over the whole history, with no ``x_0`` term after the first step
  (as S4S and GAS's generalized solver learn them).

The restricted families build their coefficients by running the classical method of
:data:`bns.solvers.METHODS` through the symbolic tracer of :mod:`bns.solvers` (the one
implementation the classical solvers use), with ``differentiable=True``: on torch scalars
that carry gradients to the grid and the scale-time values.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from .errors import InputError
from .schedules import schedule_from_config
from .solver import NSSolver
from .solvers import METHODS
from .solvers._trace import Sym, Tracer, trace
from .transforms import ScheduleChange

__all__ = [
    "Family",
    "BNSFamily",
    "TimeFamily",
    "ScaleTimeFamily",
    "MultistepFamily",
    "FAMILIES",
    "make_family",
    "usable_inits",
]

F64 = torch.float64


# The smallest share of the range one step may take. An optimizer step can push a logit so far
# down that its increment rounds away and two times coincide (a step of length zero, which no
# solver file may hold); shares below this are raised to it and the rest scaled down. Above it
# (every grid a classical solver or a sane step gives) the times are the plain softmax's.
MIN_SHARE = 1e-9


def _increasing(logits: Tensor, ends: Tensor) -> Tensor:
    """Strictly increasing points from ``ends[0]`` to ``ends[1]``: a softmax of ``logits`` as
    increments, each at least :data:`MIN_SHARE` of the range; both ends exact, not rounded
    sums."""
    t0, t1 = ends
    share = torch.softmax(logits, 0)
    floored = share.clamp(min=MIN_SHARE)
    # no data-dependent branch (torch.func.vmap); where nothing is below the floor, the plain
    # softmax itself is selected, bit for bit
    share = torch.where((share < MIN_SHARE).any(), floored / floored.sum(), share)
    inner = t0 + torch.cumsum(share * (t1 - t0), 0)[:-1]
    return torch.cat([t0[None], inner, t1[None]])


class Family(nn.Module):
    """Free parameters of a solver family, initialized from a classical solver.

    Subclasses set ``name``, build their parameters from ``init`` and implement
    :meth:`solver`. With the parameters at their initial values, ``solver()`` must equal
    ``init`` (to rounding): zero training steps return the initial solver. A family that
    cannot start from every solver overrides :meth:`check_init`.
    """

    name = "family"
    # Whether the family can end with a step to the data (end="data"): a free last row. The
    # restricted families keep their classical last step, so they end on the model's range.
    ends_on_data = False

    def __init__(self, init: NSSolver) -> None:
        super().__init__()
        type(self).check_init(init)
        self.register_buffer("t_ends", init.times[[0, -1]].clone())

    @classmethod
    def check_init(cls, init: NSSolver) -> None:
        """Raise ValueError unless the family can start from ``init``."""

    def solver(self) -> NSSolver:
        raise NotImplementedError

    def forward(self) -> NSSolver:
        """:meth:`solver` (so that ``torch.func.functional_call`` can run the map)."""
        return self.solver()

    def param_groups(self, lr: float, coef_lr_mult: float) -> list[dict[str, Any]]:
        """Adam parameter groups, each with its ``lr_mult``: its learning rate relative to the
        time logits' (``coef_lr_mult``, :func:`bns.train.coef_lr_mult`, for the groups of step-size
        numbers); ``lr`` is unused (the loop sets each group's rate every step)."""
        raise NotImplementedError

    def _times(self, logits: Tensor) -> Tensor:
        """Strictly increasing times with fixed ends: a softmax of ``logits`` as increments."""
        return _increasing(logits, self.t_ends)


def _log_increments(points: Tensor) -> Tensor:
    """The logits of :func:`_increasing` that give ``points`` back (to rounding)."""
    return torch.log(points[1:] - points[:-1])


class BNSFamily(Family):
    """The full non-stationary family: ``n`` time increments (softmax of free logits), ``a``
    (``n`` values) and the lower triangle of ``b``: ``(n^2 + 5n - 2) / 2`` free numbers."""

    name = "bns"
    ends_on_data = True

    def __init__(self, init: NSSolver) -> None:
        super().__init__(init)
        n = init.nfe
        self.logits = nn.Parameter(_log_increments(init.times))
        self.a = nn.Parameter(init.a.clone())
        self.b = nn.Parameter(init.b.clone())
        self.register_buffer("mask", torch.tril(torch.ones(n, n, dtype=F64)))

    def solver(self) -> NSSolver:
        return NSSolver(self._times(self.logits), self.a, self.b * self.mask)

    def param_groups(self, lr: float, coef_lr_mult: float) -> list[dict[str, Any]]:
        # The time logits are relative already; a and b are of the size of a step.
        return [
            {"params": [self.logits], "lr_mult": 1.0},
            {"params": [self.a, self.b], "lr_mult": coef_lr_mult},
        ]


class MultistepFamily(Family):
    """Linear multistep over the whole history on a learned grid:
    ``x_{i+1} = x_i + sum_{j<=i} c_ij u_j``, so ``a_i = 1`` and ``b`` holds the cumulative
    sums of the rows of ``c``. ``n`` time increments and ``n(n+1)/2`` coefficients ``c``.
    Starts from any solver with ``a_i = 1`` (Euler, midpoint, Adams-Bashforth, iPNDM)."""

    name = "multistep"

    def __init__(self, init: NSSolver) -> None:
        super().__init__(init)
        n = init.nfe
        self.logits = nn.Parameter(_log_increments(init.times))
        self.c = nn.Parameter(torch.diff(init.b, dim=0, prepend=torch.zeros(1, n, dtype=F64)))
        self.register_buffer("mask", torch.tril(torch.ones(n, n, dtype=F64)))

    @classmethod
    def check_init(cls, init: NSSolver) -> None:
        if not torch.all(init.a == 1):
            raise InputError(
                f"family multistep starts from a solver with a_i = 1 (x_(i+1) = x_i + ...):"
                f" euler, midpoint, ab2, ab3 or ipndm, not preconditioned; not"
                f" {init.meta.get('init', 'this solver')}"
            )

    def solver(self) -> NSSolver:
        b = torch.cumsum(self.c * self.mask, 0)
        a = torch.ones(b.shape[0], dtype=F64, device=b.device)
        return NSSolver(self._times(self.logits), a, b)

    def param_groups(self, lr: float, coef_lr_mult: float) -> list[dict[str, Any]]:
        return [
            {"params": [self.logits], "lr_mult": 1.0},
            {"params": [self.c], "lr_mult": coef_lr_mult},
        ]


# -- learned grids of the classical methods -----------------------------------------------------
def _transform_of(init: NSSolver) -> ScheduleChange | None:
    cfg = init.meta.get("transform")
    if cfg is None:
        return None
    return ScheduleChange(schedule_from_config(cfg["source"]), schedule_from_config(cfg["target"]))


def _method_kwargs(family: str, init: NSSolver) -> dict[str, Any]:
    """What the method of ``init`` takes besides the grid: its registry's arguments, the
    schedule an exponential integrator steps (``meta["schedule"]``) and its recorded
    ``lower_order_final``."""
    method = METHODS[init.meta["solver"]]
    kw = dict(method.kwargs)
    if "lower_order_final" in kw and "lower_order_final" in init.meta:
        kw["lower_order_final"] = bool(init.meta["lower_order_final"])
    if method.needs_schedule:
        if not isinstance(init.meta.get("schedule"), dict):
            raise InputError(
                f"family {family}: {init.meta['solver']} records no schedule (meta['schedule']);"
                " build it with bns.solvers"
            )
        kw["schedule"] = schedule_from_config(init.meta["schedule"])
    return kw


def _check_method(family: str, init: NSSolver, names: tuple[str, ...]) -> None:
    name = init.meta.get("solver")
    if name not in names:
        raise InputError(
            f"family {family} starts from {', '.join(names)} (each also preconditioned), not"
            f" {init.meta.get('init', name or 'a solver without a classical method')}"
        )
    if init.nfe % METHODS[name].per_step:
        raise InputError(f"{name} cannot make nfe = {init.nfe}")
    try:
        _transform_of(init)
        _method_kwargs(family, init)
    except (KeyError, TypeError, ValueError) as e:
        raise InputError(
            f"family {family}: unreadable transform or schedule of {name}: {e}"
        ) from None


class TimeFamily(Family):
    """The time grid of a fixed classical solver: ``m`` increments of its step grid (``m``
    steps) are free, and its coefficients are the classical formula on the learned grid: the
    method of :data:`bns.solvers.METHODS` traced with gradients. Every method can learn its
    grid; an exponential integrator takes the log-SNR of the learned times from the schedule
    its initial solver records.

    A preconditioned solver keeps its change of scheduler and learns its grid in the new time
    ``r``: the scale-time values follow the transform at the learned points.
    """

    name = "time"
    METHODS = tuple(METHODS)

    def __init__(self, init: NSSolver) -> None:
        super().__init__(init)
        self.method = init.meta["solver"]
        self.transform = _transform_of(init)
        self.kwargs = _method_kwargs(self.name, init)
        grid = init.times[:: METHODS[self.method].per_step]
        if self.transform is not None:
            grid = self.transform.r_of_t(grid)
        self.register_buffer("grid_ends", grid[[0, -1]].clone())
        self.logits = nn.Parameter(_log_increments(grid))

    @classmethod
    def check_init(cls, init: NSSolver) -> None:
        _check_method(cls.name, init, cls.METHODS)

    def grid(self) -> Tensor:
        """The learned step grid of the classical solver (in ``r`` if it is preconditioned)."""
        return _increasing(self.logits, self.grid_ends)

    def solver(self) -> NSSolver:
        fn = METHODS[self.method].fn
        s = trace(fn, self.grid(), transform=self.transform, differentiable=True, **self.kwargs)
        # The ends exactly on the model's range (a transform rounds them at the last ulp).
        times = torch.cat([self.t_ends[:1], s.times[1:-1], self.t_ends[1:]])
        return NSSolver(times, s.a, s.b)

    def param_groups(self, lr: float, coef_lr_mult: float) -> list[dict[str, Any]]:
        return [{"params": [self.logits], "lr_mult": 1.0}]


class ScaleTimeFamily(Family):
    """A scale-time transformation of Euler or midpoint (BES): the method runs in ``r`` on a
    uniform grid of ``[0, 1]`` on ``ubar_r(x) = (s_r'/s_r) x + t_r' s_r u_{t_r}(x / s_r)``, with
    ``t_r`` (increasing), ``t_r' > 0``, ``s_r > 0`` and ``s_r'/s_r`` free at each of the ``n``
    evaluations, and ``s`` at the end; the sample is ``xbar(1) / s_1``. ``s`` at the start is 1
    (a common factor of all scales changes nothing): ``4n`` free numbers.

    It starts from plain Euler or midpoint (``t_r`` the grid, ``s = 1``) or from their
    preconditioned versions (the values of the change of scheduler at the evaluations).
    """

    name = "scale-time"
    METHODS = ("euler", "midpoint")

    def __init__(self, init: NSSolver) -> None:
        super().__init__(init)
        self.method = init.meta["solver"]
        per_step = METHODS[self.method].per_step
        steps = init.nfe // per_step
        self.register_buffer("r_grid", torch.linspace(0, 1, steps + 1, dtype=F64))
        t, dt, s, dlog_s = self._initial_values(init, per_step, steps)
        self.logits = nn.Parameter(_log_increments(t))
        self.log_dt = nn.Parameter(torch.log(dt))
        self.log_s = nn.Parameter(torch.log(s[1:] / s[0]))
        self.dlog_s = nn.Parameter(dlog_s.clone())

    @staticmethod
    def _initial_values(init: NSSolver, per_step: int, steps: int):
        """``t`` at the evaluations and the end, ``t'`` and ``s'/s`` (per unit of the ``r`` of
        [0, 1]) at the evaluations, and ``s`` at the evaluations and the end."""
        tr = _transform_of(init)
        t = init.times
        if tr is None:
            step = torch.diff(t[::per_step]).repeat_interleave(per_step)
            n = init.nfe
            return t, step * steps, torch.ones(n + 1, dtype=F64), torch.zeros(n, dtype=F64)
        r = tr.r_of_t(t)
        r_span = r[-1] - r[0]
        _, dt, s, dlog_s = tr(r)
        return t, dt[:-1] * r_span, s, dlog_s[:-1] * r_span

    @classmethod
    def check_init(cls, init: NSSolver) -> None:
        _check_method(cls.name, init, cls.METHODS)

    def values(self) -> dict[str, Tensor]:
        """The scale-time values: ``t`` ``[n + 1]`` (evaluations and end), ``dt`` and ``dlog_s``
        ``[n]`` (at the evaluations, per unit of ``r``), ``s`` ``[n + 1]``; ``r_grid``."""
        s = torch.cat([torch.ones_like(self.log_s[:1]), torch.exp(self.log_s)])
        t = self._times(self.logits)
        return {
            "t": t,
            "dt": torch.exp(self.log_dt),
            "s": s,
            "dlog_s": self.dlog_s,
            "r_grid": self.r_grid,
        }

    def solver(self) -> NSSolver:
        v = self.values()
        run = Tracer(differentiable=True)

        def f(xbar: Sym, r: Tensor) -> Sym:
            j = len(run.times)  # the j-th evaluation has its own values, whatever r is
            u = run.velocity(xbar / v["s"][j], v["t"][j])
            return v["dlog_s"][j] * xbar + (v["dt"][j] * v["s"][j]) * u

        out = METHODS[self.method].fn(f, run.x0, tuple(self.r_grid.unbind())) / v["s"][-1]
        return run.to_ns(out, v["t"][-1], {})

    def param_groups(self, lr: float, coef_lr_mult: float) -> list[dict[str, Any]]:
        # All relative or per unit of r: of the size of the time logits.
        params = [self.logits, self.log_dt, self.log_s, self.dlog_s]
        return [{"params": params, "lr_mult": 1.0}]


FAMILIES: dict[str, type[Family]] = {
    f.name: f for f in (BNSFamily, TimeFamily, ScaleTimeFamily, MultistepFamily)
}


def _family_class(name: str) -> type[Family]:
    if name not in FAMILIES:
        raise InputError(f"unknown solver family {name!r}; known: {', '.join(FAMILIES)}")
    return FAMILIES[name]


def make_family(name: str, init: NSSolver) -> Family:
    """The family ``name`` initialized at the solver ``init`` (strictly increasing times)."""
    return _family_class(name)(init)


def usable_inits(name: str, candidates: list[NSSolver]) -> list[NSSolver]:
    """The initial solvers of ``candidates`` that family ``name`` can start from; ValueError
    (saying what the family starts from) if none."""
    cls = _family_class(name)
    out, errors = [], []
    for c in candidates:
        try:
            cls.check_init(c)
            out.append(c)
        except ValueError as e:
            errors.append(str(e))
    if not out:
        raise InputError(errors[0] if len(errors) == 1 else f"{errors[0]} (nor any other)")
    return out
