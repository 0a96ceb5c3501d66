"""Running a classical solver symbolically to read off its NS coefficients.

Every vector a solver builds is represented as a row of float64 coefficients over the basis
``(x_0, u_0, u_1, ...)``; each velocity evaluation records its time and point and returns a
new basis vector. The rows of the evaluated points and of the output give ``a_i`` and
``b_{i,j}`` exactly (docs/math.md, section 2). The same method code runs on real tensors, so a
classical solver has one implementation and two uses.

A method reads its grid with :func:`points`: Python floats from a tensor grid (the float64
export and numerical runs), or the 0-dim tensors of a grid given as a sequence of them. With
``differentiable=True`` the tracer passes the grid that way, so every coefficient is a torch
scalar that carries gradients to the grid: the learned families (:mod:`bns.families`) build
their solvers with the same methods and the same tracer.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from ..errors import InputError
from ..grids import check_grid
from ..solver import NSSolver
from ..transforms import ScheduleChange

__all__ = ["Sym", "Tracer", "trace", "run", "points"]


def points(grid: Tensor | Sequence[Tensor]) -> list:
    """The grid's points: Python floats from a tensor, the elements of a sequence of 0-dim
    tensors as they are (a differentiable trace)."""
    if isinstance(grid, Tensor):
        return [float(v) for v in grid]
    return list(grid)


class Sym:
    """A vector known by its coefficients over ``(x_0, u_0, u_1, ...)``."""

    __slots__ = ("c",)

    def __init__(self, c: Tensor) -> None:
        self.c = c

    def _binary(self, other: Sym, sign: float) -> Sym:
        n = max(self.c.numel(), other.c.numel())
        out = torch.zeros(n, dtype=torch.float64)
        out[: self.c.numel()] += self.c
        out[: other.c.numel()] += sign * other.c
        return Sym(out)

    def __add__(self, other: Sym) -> Sym:
        return self._binary(other, 1.0)

    def __sub__(self, other: Sym) -> Sym:
        return self._binary(other, -1.0)

    def __mul__(self, k: float | Tensor) -> Sym:
        return Sym(self.c * (k if isinstance(k, Tensor) else float(k)))

    __rmul__ = __mul__

    def __truediv__(self, k: float | Tensor) -> Sym:
        return Sym(self.c / (k if isinstance(k, Tensor) else float(k)))

    def __neg__(self) -> Sym:
        return Sym(-self.c)


class Tracer:
    """Records the velocity evaluations of a symbolic run; ``differentiable`` keeps the times
    as the tensors the method passes (coefficients are then whatever the method computed)."""

    def __init__(self, differentiable: bool = False) -> None:
        self.differentiable = differentiable
        self.times: list = []
        self.points: list[Sym] = []
        self.x0 = Sym(torch.ones(1, dtype=torch.float64))

    def velocity(self, x: Sym, t: float | Tensor) -> Sym:
        j = len(self.times)
        self.times.append(t if self.differentiable else float(t))
        self.points.append(x)
        e = torch.zeros(j + 2, dtype=torch.float64)
        e[j + 1] = 1.0
        return Sym(e)

    def to_ns(self, out: Sym, t_end: float | Tensor, meta: dict[str, Any]) -> NSSolver:
        n = len(self.times)
        if n == 0:
            raise InputError("the solver made no velocity evaluation")
        first = self.points[0].c.detach()
        if first.numel() < 1 or abs(float(first[0]) - 1) > 1e-12 or torch.any(first[1:] != 0):
            raise InputError("an NS solver must evaluate its first velocity at x_0")
        a = torch.zeros(n, dtype=torch.float64)
        b = torch.zeros(n, n, dtype=torch.float64)
        rows = self.points[1:] + [out]
        for i, row in enumerate(rows):
            c = row.c
            if c.numel() > i + 2 and torch.any(c[i + 2 :] != 0):
                raise InputError(f"point {i + 1} uses a velocity not yet evaluated")
            a[i] = c[0]
            m = min(c.numel() - 1, i + 1)
            b[i, :m] = c[1 : 1 + m]
        if self.differentiable:
            times = torch.stack([*self.times, torch.as_tensor(t_end, dtype=torch.float64)])
        else:
            times = torch.tensor(self.times + [float(t_end)], dtype=torch.float64)
        return NSSolver(times, a, b, meta)


Method = Callable[..., Any]


def trace(
    method: Method,
    grid: Tensor,
    *,
    transform: ScheduleChange | None = None,
    meta: dict[str, Any] | None = None,
    differentiable: bool = False,
    **kwargs: Any,
) -> NSSolver:
    """Export ``method(f, x0, grid, **kwargs)`` as an exact NS solver.

    With ``transform``, the method runs on the transformed ODE in ``r``; ``grid`` is then in
    ``r`` and the exported times are ``t_r``. With ``differentiable``, the method computes on
    the grid's 0-dim tensors and the solver's times and coefficients carry their gradients.
    """
    grid = check_grid(grid)
    tr = Tracer(differentiable)
    f, x0, finish, t_end = _setup(tr.velocity, tr.x0, grid, transform, differentiable)
    out = finish(method(f, x0, tuple(grid.unbind()) if differentiable else grid, **kwargs))
    meta = dict(meta or {})
    if transform is not None:
        meta["transform"] = transform.config()
    return tr.to_ns(out, t_end, meta)


def run(
    method: Method,
    velocity: Callable[[Tensor, float], Tensor],
    x0: Tensor,
    grid: Tensor,
    *,
    transform: ScheduleChange | None = None,
    **kwargs: Any,
) -> Tensor:
    """Run ``method`` numerically, step by step, with ``velocity(x, t)`` (the reference path)."""
    grid = check_grid(grid)
    f, x, finish, _ = _setup(velocity, x0, grid, transform)
    return finish(method(f, x, grid, **kwargs))


def _setup(velocity, x0, grid, transform, differentiable=False):
    if transform is None:
        return velocity, x0, (lambda x: x), grid[-1] if differentiable else float(grid[-1])
    if differentiable:  # the scale-time values at tensor points, with their gradients

        def fd(xbar, r):
            t, dt, s, dlog_s = transform(r)
            return dlog_s * xbar + (dt * s) * velocity(xbar / s, t)

        start, end = transform(grid[0]), transform(grid[-1])
        return fd, x0 * start[2], (lambda xbar: xbar / end[2]), end[0]
    r0, r1 = float(grid[0]), float(grid[-1])

    def f(xbar, r):
        return transform.velocity(velocity, xbar, r)

    s1 = transform.scale(r1)
    return (
        f,
        x0 * transform.scale(r0),
        (lambda xbar: xbar * (1.0 / s1)),
        float(transform.t_of_r(r1)),
    )
