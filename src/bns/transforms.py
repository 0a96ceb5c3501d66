"""Scale-time transformations, and the scheduler change that BNS uses as preconditioning.

For an increasing ``t_r`` and a scale ``s_r > 0`` the path ``xbar(r) = s_r x(t_r)`` solves
``dxbar/dr = ubar_r(xbar)`` with ``ubar_r(x) = (s_r'/s_r) x + t_r' s_r u_{t_r}(x / s_r)``
(docs/math.md, section 3). Both ``xbar`` and ``ubar`` are linear in the original points and
velocities, so a solver run in ``r`` is still an NS solver in ``t``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from .schedules import CondOT, Schedule

__all__ = ["ScheduleChange", "precondition"]


class ScheduleChange:
    """Change a model's scheduler ``(alpha, sigma)`` to ``(abar, sigmabar)``.

    ``t_r = snr^{-1}(snrbar(r))`` and ``s_r = sigmabar_r / sigma_{t_r} = abar_r / alpha_{t_r}``.
    The formulas below pick whichever ratio is finite, so both ends of [0, 1] are safe.
    """

    def __init__(self, source: Schedule, target: Schedule) -> None:
        self.source = source
        self.target = target

    def t_of_r(self, r: Tensor | float) -> Tensor:
        r = torch.as_tensor(r, dtype=torch.float64)
        return self.source.t_from_log_snr(self.target.log_snr(r))

    def r_of_t(self, t: Tensor | float) -> Tensor:
        t = torch.as_tensor(t, dtype=torch.float64)
        return self.target.t_from_log_snr(self.source.log_snr(t))

    def r_range(self, t_range: tuple[float, float]) -> tuple[float, float]:
        """The interval of ``r`` that maps onto the model's ``t_range``."""
        ends = self.r_of_t(torch.tensor(t_range, dtype=torch.float64))
        return float(ends[0]), float(ends[1])

    def __call__(self, r: Tensor | float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``(t_r, dt/dr, s_r, (ds/dr) / s_r)`` at ``r``."""
        r = torch.as_tensor(r, dtype=torch.float64)
        t = self.t_of_r(r)
        a, s, da, ds = self.source(t)
        ab, sb, dab, dsb = self.target(r)
        use_alpha = a >= s
        scale = torch.where(use_alpha, ab / a, sb / s)
        # t' = Wbar / (W s^2) with W = alpha' sigma - sigma' alpha: finite where the log-SNR's
        # derivative is not (the ends of CondOT, say).
        dt = (dab * sb - dsb * ab) / ((da * s - ds * a) * scale * scale)
        dlog_scale = torch.where(use_alpha, dab / ab - da / a * dt, dsb / sb - ds / s * dt)
        return t, dt, scale, dlog_scale

    def velocity(self, u: Callable[[Any, float], Any], xbar: Any, r: float) -> Any:
        """``ubar_r(xbar)`` given the original velocity ``u(x, t)`` (tensors or symbolic rows)."""
        t, dt, s, dlog_s = (float(v) for v in self(r))
        return dlog_s * xbar + (dt * s) * u(xbar * (1.0 / s), t)

    def scale(self, r: float) -> float:
        return float(self(r)[2])

    def config(self) -> dict[str, Any]:
        return {"source": self.source.config(), "target": self.target.config()}


def precondition(schedule: Schedule, sigma0: float = 1.0) -> ScheduleChange:
    """The BNS preconditioning: change the model's scheduler to ``abar = r``,
    ``sigmabar = sigma0 (1 - r)`` (CondOT for ``sigma0 = 1``)."""
    return ScheduleChange(schedule, CondOT(sigma0))
