"""Running a classical solver symbolically to read off its NS coefficients.

Every vector a solver builds is represented as a row of float64 coefficients over the basis
``(x_0, u_0, u_1, ...)``; each velocity evaluation records its time and point and returns a
new basis vector. The rows of the evaluated points and of the output give ``a_i`` and
``b_{i,j}`` exactly (docs/math.md, section 2). The same method code runs on real tensors, so a
classical solver has one implementation and two uses.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from ..grids import check_grid
from ..solver import NSSolver
from ..transforms import ScheduleChange

__all__ = ["Sym", "Tracer", "trace", "run"]


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

    def __mul__(self, k: float) -> Sym:
        return Sym(self.c * float(k))

    __rmul__ = __mul__

    def __truediv__(self, k: float) -> Sym:
        return Sym(self.c / float(k))

    def __neg__(self) -> Sym:
        return Sym(-self.c)


class Tracer:
    """Records the velocity evaluations of a symbolic run."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self.points: list[Sym] = []
        self.x0 = Sym(torch.ones(1, dtype=torch.float64))

    def velocity(self, x: Sym, t: float) -> Sym:
        j = len(self.times)
        self.times.append(float(t))
        self.points.append(x)
        e = torch.zeros(j + 2, dtype=torch.float64)
        e[j + 1] = 1.0
        return Sym(e)

    def to_ns(self, out: Sym, t_end: float, meta: dict[str, Any]) -> NSSolver:
        n = len(self.times)
        if n == 0:
            raise ValueError("the solver made no velocity evaluation")
        first = self.points[0].c
        if first.numel() < 1 or abs(float(first[0]) - 1) > 1e-12 or torch.any(first[1:] != 0):
            raise ValueError("an NS solver must evaluate its first velocity at x_0")
        a = torch.zeros(n, dtype=torch.float64)
        b = torch.zeros(n, n, dtype=torch.float64)
        rows = self.points[1:] + [out]
        for i, row in enumerate(rows):
            c = row.c
            if c.numel() > i + 2 and torch.any(c[i + 2 :] != 0):
                raise ValueError(f"point {i + 1} uses a velocity not yet evaluated")
            a[i] = c[0]
            m = min(c.numel() - 1, i + 1)
            b[i, :m] = c[1 : 1 + m]
        times = torch.tensor(self.times + [float(t_end)], dtype=torch.float64)
        return NSSolver(times, a, b, meta)


Method = Callable[..., Any]


def trace(
    method: Method,
    grid: Tensor,
    *,
    transform: ScheduleChange | None = None,
    meta: dict[str, Any] | None = None,
    **kwargs: Any,
) -> NSSolver:
    """Export ``method(f, x0, grid, **kwargs)`` as an exact NS solver.

    With ``transform``, the method runs on the transformed ODE in ``r``; ``grid`` is then in
    ``r`` and the exported times are ``t_r``.
    """
    grid = check_grid(grid)
    tr = Tracer()
    f, x0, finish, t_end = _setup(tr.velocity, tr.x0, grid, transform)
    out = finish(method(f, x0, grid, **kwargs))
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


def _setup(velocity, x0, grid, transform):
    if transform is None:
        return velocity, x0, (lambda x: x), float(grid[-1])
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
