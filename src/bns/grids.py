"""Time grids for classical solvers: uniform in time, uniform in log-SNR, and EDM's rho grid.

Each returns ``steps + 1`` float64 times from ``t_min`` to ``t_max`` (flow time, noise to data).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .schedules import Schedule

__all__ = ["uniform", "logsnr", "edm", "check_grid", "GridError"]


class GridError(ValueError):
    """A time grid that no solver can use."""


def _check_steps(steps: int) -> int:
    ok = not isinstance(steps, bool)
    try:
        ok = ok and int(steps) == steps and steps >= 1
    except (TypeError, ValueError, OverflowError):
        ok = False
    if not ok:
        raise GridError(f"steps must be a positive integer, got {steps!r}")
    return int(steps)


def _range(t_range: tuple[float, float]) -> tuple[float, float]:
    try:
        lo, hi = (float(v) for v in t_range)
    except (TypeError, ValueError):
        raise GridError(f"t_range must be two numbers (t_min, t_max), got {t_range!r}") from None
    if not (0.0 <= lo < hi <= 1.0):
        raise GridError(f"t_range must satisfy 0 <= t_min < t_max <= 1, got {t_range}")
    return lo, hi


def _pin_ends(grid: Tensor, lo: float, hi: float) -> Tensor:
    # Inverse maps round; the ends must be exactly the model's range.
    grid = grid.clone()
    grid[0], grid[-1] = lo, hi
    return grid


def uniform(steps: int, t_range: tuple[float, float] = (0.0, 1.0)) -> Tensor:
    """``steps + 1`` times equally spaced over ``t_range``."""
    lo, hi = _range(t_range)
    return _pin_ends(torch.linspace(lo, hi, _check_steps(steps) + 1, dtype=torch.float64), lo, hi)


def logsnr(steps: int, schedule: Schedule, t_range: tuple[float, float] = (0.0, 1.0)) -> Tensor:
    """Times equally spaced in log-SNR (DPM-Solver's "logSNR" grid).

    An end where the log-SNR is infinite (alpha = 0 or sigma = 0) cannot be spaced in log-SNR;
    such a range must be shrunk first (the model's ``t_range`` usually is).
    """
    lo, hi = _range(t_range)
    steps = _check_steps(steps)
    ends = schedule.log_snr(torch.tensor([lo, hi], dtype=torch.float64))
    if not torch.all(torch.isfinite(ends)):
        raise GridError(
            f"the log-SNR is infinite at an end of {t_range}; use a t_range inside (0, 1) for a"
            " log-SNR grid"
        )
    lam = torch.linspace(float(ends[0]), float(ends[1]), steps + 1, dtype=torch.float64)
    return _pin_ends(schedule.t_from_log_snr(lam), lo, hi)


def edm(
    steps: int, schedule: Schedule, t_range: tuple[float, float] = (0.0, 1.0), rho: float = 7.0
) -> Tensor:
    """EDM's grid: noise levels ``s = sigma/alpha`` spaced uniformly in ``s^(1/rho)``."""
    lo, hi = _range(t_range)
    steps = _check_steps(steps)
    if not (isinstance(rho, (int, float)) and math.isfinite(rho) and rho > 0):
        raise GridError(f"rho must be a finite number > 0, got {rho!r}")
    ends = schedule.log_snr(torch.tensor([lo, hi], dtype=torch.float64))
    if not torch.all(torch.isfinite(ends)):
        raise GridError(
            f"the noise level is 0 or infinite at an end of {t_range}; use a t_range inside (0, 1)"
            " for an EDM grid"
        )
    s_max, s_min = torch.exp(-ends[0]), torch.exp(-ends[1])
    r = torch.linspace(0, 1, steps + 1, dtype=torch.float64)
    s = (s_max ** (1 / rho) + r * (s_min ** (1 / rho) - s_max ** (1 / rho))) ** rho
    return _pin_ends(schedule.t_from_log_snr(-torch.log(s)), lo, hi)


def check_grid(grid: Tensor, t_range: tuple[float, float] | None = None) -> Tensor:
    """Return ``grid`` as float64 after checking it is 1-D, finite, strictly increasing and,
    given ``t_range``, inside it."""
    g = torch.as_tensor(grid, dtype=torch.float64)
    if g.dim() != 1 or g.numel() < 2:
        raise GridError(
            f"a grid must be a 1-D tensor of at least 2 times, got shape {list(g.shape)}"
        )
    if not torch.all(torch.isfinite(g)):
        raise GridError("the grid holds non-finite values")
    if not torch.all(g[1:] > g[:-1]):
        raise GridError("the grid must be strictly increasing (noise at t_min to data at t_max)")
    if t_range is not None and (g[0] < t_range[0] - 1e-12 or g[-1] > t_range[1] + 1e-12):
        raise GridError(
            f"the grid [{float(g[0]):.6g}, {float(g[-1]):.6g}] leaves the model's range {t_range}"
        )
    return g
