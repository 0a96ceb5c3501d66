"""Runge-Kutta solvers as NS solvers: Euler, midpoint, Heun, RK4.

Each stage is one velocity evaluation, so ``m`` steps of an ``s``-stage method are an NS solver
with ``n = s m`` (midpoint on m steps: NFE 2m). ``grid`` is the method's own step grid.
"""

from __future__ import annotations

from torch import Tensor

from ..solver import NSSolver
from ..transforms import ScheduleChange
from ._trace import trace

__all__ = [
    "euler",
    "midpoint",
    "heun",
    "rk4",
    "euler_method",
    "midpoint_method",
    "heun_method",
    "rk4_method",
]


def _steps(grid: Tensor):
    for i in range(len(grid) - 1):
        yield float(grid[i]), float(grid[i + 1]) - float(grid[i])


def euler_method(f, x, grid):
    for t, h in _steps(grid):
        x = x + h * f(x, t)
    return x


def midpoint_method(f, x, grid):
    for t, h in _steps(grid):
        k1 = f(x, t)
        x = x + h * f(x + (0.5 * h) * k1, t + 0.5 * h)
    return x


def heun_method(f, x, grid):
    for t, h in _steps(grid):
        k1 = f(x, t)
        k2 = f(x + h * k1, t + h)
        x = x + (0.5 * h) * (k1 + k2)
    return x


def rk4_method(f, x, grid):
    for t, h in _steps(grid):
        k1 = f(x, t)
        k2 = f(x + (0.5 * h) * k1, t + 0.5 * h)
        k3 = f(x + (0.5 * h) * k2, t + 0.5 * h)
        k4 = f(x + h * k3, t + h)
        x = x + (h / 6) * (k1 + 2 * k2 + 2 * k3 + k4)
    return x


def _export(method, name: str, grid: Tensor, transform: ScheduleChange | None) -> NSSolver:
    return trace(method, grid, transform=transform, meta={"solver": name})


def euler(grid: Tensor, *, transform: ScheduleChange | None = None) -> NSSolver:
    """Euler on ``grid`` (NFE = steps)."""
    return _export(euler_method, "euler", grid, transform)


def midpoint(grid: Tensor, *, transform: ScheduleChange | None = None) -> NSSolver:
    """Explicit midpoint (RK2) on ``grid`` (NFE = 2 steps)."""
    return _export(midpoint_method, "midpoint", grid, transform)


def heun(grid: Tensor, *, transform: ScheduleChange | None = None) -> NSSolver:
    """Heun's method (RK2, trapezoidal) on ``grid`` (NFE = 2 steps; stages share times)."""
    return _export(heun_method, "heun", grid, transform)


def rk4(grid: Tensor, *, transform: ScheduleChange | None = None) -> NSSolver:
    """Classical fourth-order Runge-Kutta on ``grid`` (NFE = 4 steps)."""
    return _export(rk4_method, "rk4", grid, transform)
