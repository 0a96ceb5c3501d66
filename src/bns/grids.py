"""Time grids for classical solvers: every grid a user could pick.

- :func:`uniform`: equal steps in flow time.
- :func:`logsnr`: equal steps in log-SNR (DPM-Solver's grid).
- :func:`edm`: EDM/Karras's rho grid of noise levels.
- :func:`spacing`: diffusers' ``timestep_spacing`` (linspace, leading, trailing) of a model with
  discrete timesteps, as its multistep schedulers (DPM-Solver++, UniPC, DEIS) compute it.
- :func:`ays`: NVIDIA's Align Your Steps noise levels (SD 1.x, SDXL, SVD), interpolated to the
  step count as ComfyUI does.

Each returns ``steps + 1`` float64 times ending at ``t_max`` (flow time, noise to data). All but
``leading`` start at ``t_min``; diffusers' leading spacing starts below the top timestep, and the
noise is then taken as the sample at that time, as diffusers does.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .errors import BNSError
from .schedules import Schedule

__all__ = [
    "uniform",
    "logsnr",
    "edm",
    "spacing",
    "ays",
    "ays_applies",
    "SPACINGS",
    "AYS_NOISE_LEVELS",
    "check_grid",
    "GridError",
]

SPACINGS = ("linspace", "leading", "trailing")

# Align Your Steps (Sabour et al., 2024): 10-step noise levels s = sigma / alpha, from
# NVIDIA's published schedules as ComfyUI ships them (SD 1.x, SDXL: their scaled-linear DDPM
# schedule; SVD: EDM noise levels 0.002 to 700).
AYS_NOISE_LEVELS: dict[str, tuple[float, ...]] = {
    "sd1": (14.6146412293, 6.4745760956, 3.8636745985, 2.6946151520, 1.8841921177,
            1.3943805092, 0.9642583904, 0.6523686016, 0.3977456272, 0.1515232662,
            0.0291671582),
    "sdxl": (14.6146412293, 6.3184485287, 3.7681790315, 2.1811480769, 1.3405244945,
             0.8620721141, 0.5550693289, 0.3798540708, 0.2332364134, 0.1114188177,
             0.0291671582),
    "svd": (700.00, 54.5, 15.886, 7.977, 4.248, 1.789, 0.981, 0.403, 0.173, 0.034, 0.002),
}  # fmt: skip


class GridError(BNSError, ValueError):
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


def _timesteps(kind: str, n: int, n_train: int) -> list[int]:
    # diffusers' multistep schedulers' set_timesteps (DPMSolverMultistepScheduler, UniPC, DEIS;
    # steps_offset 0, no lambda clipping), in Python floats: the same IEEE operations as
    # numpy's linspace/arange, so the rounding at .5 agrees (tested against diffusers).
    if kind == "linspace":  # n + 1 points from n_train - 1 down to 0; the 0 dropped
        step = (n_train - 1) / n
        pts = [i * step for i in range(n + 1)]
        pts[-1] = float(n_train - 1)
        return [int(round(v)) for v in reversed(pts)][:-1]
    if kind == "leading":
        ratio = n_train // (n + 1)
        return [i * ratio for i in range(n, 0, -1)]
    ratio = n_train / n  # trailing
    count = math.ceil(-n_train / -ratio)
    delta = (n_train - ratio) - n_train  # numpy's arange steps by its first difference
    return [int(round(n_train + i * delta)) - 1 for i in range(count)]


def spacing(
    steps: int,
    schedule: Schedule,
    t_range: tuple[float, float] = (0.0, 1.0),
    kind: str = "linspace",
) -> Tensor:
    """diffusers' ``timestep_spacing`` grid of a discrete-timestep model.

    The ``steps`` timesteps that diffusers' multistep schedulers evaluate (``kind`` linspace,
    leading or trailing), as flow times, then ``t_max``: the last step goes to the end of the
    range (diffusers' ``final_sigmas_type="sigma_min"``; with a data end, to sigma = 0).
    """
    from .schedules import DiscreteVP

    lo, hi = _range(t_range)
    steps = _check_steps(steps)
    if kind not in SPACINGS:
        raise GridError(f"unknown timestep spacing {kind!r}; known: {', '.join(SPACINGS)}")
    if not isinstance(schedule, DiscreteVP):
        raise GridError(
            f"a {kind} timestep spacing needs a model with discrete timesteps, not a"
            f" {schedule.name} scheduler"
        )
    ks = _timesteps(kind, steps, schedule.num_train_timesteps)
    t = schedule.flow_time(torch.tensor(ks, dtype=torch.float64))
    if len(ks) != steps or not bool(torch.all(t[1:] > t[:-1])):
        raise GridError(f"{kind} spacing gives no {steps} distinct timesteps ({ks})")
    if float(t[0]) < lo - 1e-12 or float(t[-1]) >= hi:
        raise GridError(f"{kind} spacing with {steps} steps leaves the range {t_range}")
    grid = torch.cat([t, torch.tensor([hi], dtype=torch.float64)])
    grid[0] = max(float(grid[0]), lo)
    return grid


def _noise_range(schedule: Schedule, t_range: tuple[float, float]) -> tuple[float, float]:
    """Noise levels ``s = sigma / alpha`` at the ends of the range (``s_max``, ``s_min``)."""
    lam = schedule.log_snr(torch.tensor(t_range, dtype=torch.float64))
    return float(torch.exp(-lam[0])), float(torch.exp(-lam[1]))


def ays_applies(kind: str, schedule: Schedule, t_range: tuple[float, float]) -> bool:
    """Whether the Align Your Steps levels ``kind`` were made for this noise range: the
    model's highest and lowest noise levels are the schedule's first and last, within 1%."""
    levels = AYS_NOISE_LEVELS[kind]
    s_max, s_min = _noise_range(schedule, t_range)
    if not (math.isfinite(s_max) and s_min > 0):
        return False
    return abs(s_max / levels[0] - 1) < 0.01 and abs(s_min / levels[-1] - 1) < 0.01


def ays(
    steps: int, schedule: Schedule, t_range: tuple[float, float] = (0.0, 1.0), kind: str = "sd1"
) -> Tensor:
    """Align Your Steps noise levels (``kind`` sd1, sdxl or svd) as flow times.

    The ten-step levels are interpolated linearly in log noise level to ``steps + 1`` values
    (ComfyUI's ``AlignYourStepsScheduler``); the last marks the end of the range (ComfyUI sets
    it to 0: with a data end, the last step goes to sigma = 0).
    """
    lo, hi = _range(t_range)
    steps = _check_steps(steps)
    if kind not in AYS_NOISE_LEVELS:
        raise GridError(f"unknown AYS schedule {kind!r}; known: {', '.join(AYS_NOISE_LEVELS)}")
    if not ays_applies(kind, schedule, (lo, hi)):
        raise GridError(
            f"the AYS {kind} levels run from {AYS_NOISE_LEVELS[kind][0]:g} to"
            f" {AYS_NOISE_LEVELS[kind][-1]:g}; this model's noise levels do not"
        )
    levels = torch.tensor(AYS_NOISE_LEVELS[kind], dtype=torch.float64)
    if steps + 1 != len(levels):
        xs = torch.linspace(0, 1, len(levels), dtype=torch.float64)
        new = torch.linspace(0, 1, steps + 1, dtype=torch.float64)
        ys = torch.log(levels.flip(0))  # increasing
        j = torch.searchsorted(xs, new).clamp(1, len(xs) - 1)
        w = (new - xs[j - 1]) / (xs[j] - xs[j - 1])
        levels = torch.exp(ys[j - 1] + w * (ys[j] - ys[j - 1])).flip(0)
    t = schedule.t_from_log_snr(-torch.log(levels))
    grid = _pin_ends(t, lo, hi)
    if not bool(torch.all(grid[1:] > grid[:-1])):
        raise GridError(f"AYS {kind} with {steps} steps gives repeated times")
    return grid


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
