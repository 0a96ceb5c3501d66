"""Runge-Kutta solvers as NS solvers: Euler, midpoint, Heun, RK4 (classical and 3/8 rule).

Each stage is one velocity evaluation, so ``m`` steps of an ``s``-stage method are an NS solver
with ``n = s m`` (midpoint on m steps: NFE 2m). ``grid`` is the method's own step grid.
"""

from __future__ import annotations

from torch import Tensor

from ..errors import InputError
from ..solver import NSSolver
from ..transforms import ScheduleChange
from ._trace import points, trace

__all__ = [
    "euler",
    "midpoint",
    "heun",
    "rk4",
    "euler_method",
    "midpoint_method",
    "heun_method",
    "rk4_method",
    "rk38_method",
]


def _steps(grid: Tensor):
    g = points(grid)
    for i in range(len(g) - 1):
        yield g[i], g[i + 1] - g[i]


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


def rk38_method(f, x, grid):
    # Kutta's 3/8 rule: torchdiffeq's fixed-grid "rk4" is this variant (rk4_alt_step_func).
    for t, h in _steps(grid):
        k1 = f(x, t)
        k2 = f(x + (h / 3) * k1, t + h / 3)
        k3 = f(x + h * (k2 - k1 / 3), t + 2 * h / 3)
        k4 = f(x + h * (k1 - k2 + k3), t + h)
        x = x + (h / 8) * (k1 + 3 * (k2 + k3) + k4)
    return x


_RK4_VARIANTS = {"classic": (rk4_method, "rk4"), "3/8": (rk38_method, "rk4_38")}


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


def rk4(
    grid: Tensor, variant: str = "classic", *, transform: ScheduleChange | None = None
) -> NSSolver:
    """Fourth-order Runge-Kutta on ``grid`` (NFE = 4 steps).

    ``variant="classic"`` is the classical RK4 (stages at 0, 1/2, 1/2, 1; weights 1, 2, 2, 1 / 6);
    ``"3/8"`` is Kutta's 3/8 rule (stages at 0, 1/3, 2/3, 1; weights 1, 3, 3, 1 / 8), which is
    what torchdiffeq's fixed-grid ``method="rk4"`` runs.
    """
    if variant not in _RK4_VARIANTS:
        raise InputError(f"rk4 variant must be one of {sorted(_RK4_VARIANTS)}, got {variant!r}")
    method, name = _RK4_VARIANTS[variant]
    return _export(method, name, grid, transform)
