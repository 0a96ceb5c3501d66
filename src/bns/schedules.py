"""Schedulers of Gaussian paths in flow time.

A scheduler gives ``x_t = alpha_t x_1 + sigma_t eps`` for flow time ``t`` in [0, 1], where
``t = 0`` is noise and ``t = 1`` is data (docs/math.md, section 1). Every scheduler returns
alpha, sigma and their time derivatives together, computed with torch operations so that
gradients flow through ``t`` (BNS learns its time grid), and knows its log-SNR
``lambda_t = log(alpha_t / sigma_t)`` and the inverse map from log-SNR back to time.

Example:
    >>> s = CondOT()
    >>> v = s(torch.tensor([0.25], dtype=torch.float64))   # v.alpha, v.sigma, v.d_alpha, v.d_sigma
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import Any, NamedTuple

import torch
from torch import Tensor

from .errors import BNSError

__all__ = [
    "Schedule",
    "ScheduleValues",
    "CondOT",
    "VP",
    "Cosine",
    "DiscreteVP",
    "EDM",
    "schedule_from_config",
    "noise_level",
    "ScheduleError",
]


class ScheduleError(BNSError, ValueError):
    """A scheduler was given parameters it cannot take (or a config that names none)."""


def _as_tensor(t: Tensor | float) -> Tensor:
    if isinstance(t, Tensor):
        return t if t.is_floating_point() else t.to(torch.float64)
    return torch.tensor(float(t), dtype=torch.float64)


def _positive(owner: str, **values: float) -> None:
    for key, v in values.items():
        try:
            ok = math.isfinite(float(v)) and float(v) > 0
        except (TypeError, ValueError):
            ok = False
        if not ok:
            raise ScheduleError(f"{owner} needs a finite {key} > 0, got {v!r}")


def _increasing(owner: str, **values: float) -> tuple[float, float]:
    """Two finite positive settings, the first below the second, as floats."""
    _positive(owner, **values)
    (k0, v0), (k1, v1) = values.items()
    if not v0 < v1:
        raise ScheduleError(f"{owner} needs 0 < {k0} < {k1}, got {v0}, {v1}")
    return float(v0), float(v1)


class ScheduleValues(NamedTuple):
    """A scheduler at some times: ``alpha``, ``sigma`` and their flow-time derivatives."""

    alpha: Tensor
    sigma: Tensor
    d_alpha: Tensor
    d_sigma: Tensor


class Schedule(ABC):
    """A scheduler (alpha_t, sigma_t) in flow time, with alpha increasing and sigma decreasing."""

    name: str = "schedule"

    @abstractmethod
    def __call__(self, t: Tensor | float) -> ScheduleValues:
        """Return ``(alpha, sigma, d_alpha, d_sigma)`` (d/dt in flow time) at ``t`` (same shape as ``t``)."""

    @abstractmethod
    def config(self) -> dict[str, Any]:
        """A JSON-able description that :func:`schedule_from_config` turns back into this object."""

    def alpha(self, t: Tensor | float) -> Tensor:
        return self(t).alpha

    def sigma(self, t: Tensor | float) -> Tensor:
        return self(t).sigma

    def log_snr(self, t: Tensor | float) -> Tensor:
        """``log(alpha_t / sigma_t)``; -inf where alpha is 0 and +inf where sigma is 0."""
        v = self(t)
        return torch.log(v.alpha) - torch.log(v.sigma)

    def d_log_snr(self, t: Tensor | float) -> Tensor:
        """Time derivative of the log-SNR."""
        v = self(t)
        return v.d_alpha / v.alpha - v.d_sigma / v.sigma

    def t_from_log_snr(self, lam: Tensor | float) -> Tensor:
        """Inverse of :meth:`log_snr` (float64), clamped to [0, 1].

        The default bisects, which any monotone scheduler allows; the gradient with respect to
        ``lam`` is ``1 / lambda'(t)`` (implicit function theorem), so it stays differentiable.
        """
        lam = _as_tensor(lam).to(torch.float64)
        target = lam.detach()
        lo = torch.zeros_like(target)
        hi = torch.ones_like(target)
        with torch.no_grad():
            for _ in range(80):
                mid = 0.5 * (lo + hi)
                below = self.log_snr(mid) < target
                lo = torch.where(below, mid, lo)
                hi = torch.where(below, hi, mid)
            t = 0.5 * (lo + hi)
        if not lam.requires_grad:
            return t
        slope = self.d_log_snr(t).detach()
        # Zero in value, 1 / lambda'(t) in gradient; where lambda is infinite the slope is too.
        step = (lam - target) / slope
        return t + torch.where(torch.isfinite(step), step, torch.zeros_like(step))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Schedule) and self.config() == other.config()

    def __hash__(self) -> int:
        return hash(repr(sorted(self.config().items())))

    def __repr__(self) -> str:
        def short(v: Any) -> str:
            # A discrete schedule's 1000 alphas_cumprod would make every repr pages long.
            if isinstance(v, list) and len(v) > 6:
                return f"[{v[0]!r}, ..., {v[-1]!r}] ({len(v)} values)"
            return repr(v)

        args = ", ".join(f"{k}={short(v)}" for k, v in self.config().items() if k != "name")
        return f"{type(self).__name__}({args})"


class CondOT(Schedule):
    """Conditional optimal transport / rectified flow: ``alpha = t``, ``sigma = 1 - t``.

    ``sigma0`` scales the noise: ``sigma = sigma0 (1 - t)`` (the preconditioning scheduler of
    docs/math.md, section 3; ``sigma0 = 1`` is plain CondOT).
    """

    name = "condot"

    def __init__(self, sigma0: float = 1.0) -> None:
        _positive("CondOT", sigma0=sigma0)
        self.sigma0 = float(sigma0)

    def __call__(self, t):
        t = _as_tensor(t)
        one = torch.ones_like(t)
        return ScheduleValues(t, self.sigma0 * (1 - t), one, -self.sigma0 * one)

    def log_snr(self, t):
        t = _as_tensor(t)
        return torch.log(t) - torch.log1p(-t) - math.log(self.sigma0)

    def t_from_log_snr(self, lam):
        return torch.sigmoid(_as_tensor(lam) + math.log(self.sigma0))

    def config(self):
        return {"name": self.name, "sigma0": self.sigma0}


class Cosine(Schedule):
    """Cosine scheduler: ``alpha = sin(pi t / 2)``, ``sigma = cos(pi t / 2)``."""

    name = "cosine"

    def __call__(self, t):
        t = _as_tensor(t)
        h = 0.5 * math.pi
        # sigma as sin(h (1 - t)): exactly 0 at t = 1 (cos(pi / 2) rounds to 6e-17) and accurate
        # near it, so the log-SNR is +inf there as for every other scheduler.
        alpha, sigma = torch.sin(h * t), torch.sin(h * (1 - t))
        return ScheduleValues(alpha, sigma, h * sigma, -h * alpha)

    def t_from_log_snr(self, lam):
        lam = _as_tensor(lam)
        # t = (2/pi) atan(e^lam) = 1 - (2/pi) atan(e^-lam): take the form without cancellation.
        k = 2.0 / math.pi
        return torch.where(
            lam > 0, 1 - k * torch.atan(torch.exp(-lam)), k * torch.atan(torch.exp(lam))
        )

    def config(self):
        return {"name": self.name}


class VP(Schedule):
    """Variance preserving scheduler with a linear beta (DDPM in continuous time).

    With diffusion time ``s = 1 - t``: ``alpha = exp(-B(s))``, ``B(s) = s^2 (b1 - b0)/4 + s b0/2``,
    ``sigma = sqrt(1 - alpha^2)``.
    """

    name = "vp"

    def __init__(self, beta_min: float = 0.1, beta_max: float = 20.0) -> None:
        self.beta_min, self.beta_max = _increasing("VP", beta_min=beta_min, beta_max=beta_max)

    def _B(self, s: Tensor) -> tuple[Tensor, Tensor]:
        d = self.beta_max - self.beta_min
        return s * s * d / 4 + s * self.beta_min / 2, s * d / 2 + self.beta_min / 2

    def __call__(self, t):
        t = _as_tensor(t)
        B, dB_ds = self._B(1 - t)
        alpha = torch.exp(-B)
        # sigma = sqrt(1 - exp(-2B)) written with expm1 for accuracy near t = 1.
        sigma = torch.sqrt(-torch.expm1(-2 * B))
        d_alpha = alpha * dB_ds  # ds/dt = -1
        d_sigma = -alpha * d_alpha / sigma
        return ScheduleValues(alpha, sigma, d_alpha, d_sigma)

    def log_snr(self, t):
        B, _ = self._B(1 - _as_tensor(t))
        return -B - 0.5 * torch.log(-torch.expm1(-2 * B))

    def t_from_log_snr(self, lam):
        lam = _as_tensor(lam)
        B = 0.5 * torch.nn.functional.softplus(-2 * lam)
        d = self.beta_max - self.beta_min
        b0 = self.beta_min
        # The root of s^2 d/4 + s b0/2 = B, written without cancellation for small B (t near 1).
        s = 2 * B / (b0 / 2 + torch.sqrt(b0 * b0 / 4 + d * B))
        s = torch.where(torch.isinf(B), torch.full_like(B, math.inf), s)
        # Log-SNRs below lambda(0) have no time in [0, 1]: clamp, as every scheduler does.
        return (1 - s).clamp(0.0, 1.0)

    def config(self):
        return {"name": self.name, "beta_min": self.beta_min, "beta_max": self.beta_max}


class DiscreteVP(Schedule):
    """A discrete DDPM schedule given by ``alphas_cumprod`` (as diffusers models use it).

    Discrete timestep ``k`` (0 = least noise, N-1 = most) sits at flow time
    ``t = 1 - k / (N - 1)``; between timesteps the log-SNR is interpolated linearly, so
    ``alpha^2 = sigmoid(2 lambda)`` and ``sigma^2 = sigmoid(-2 lambda)``. :meth:`timestep`
    gives the (fractional) diffusers timestep of a flow time.
    """

    name = "discrete_vp"

    def __init__(self, alphas_cumprod: Tensor | list[float]) -> None:
        ac = torch.as_tensor(alphas_cumprod, dtype=torch.float64).detach().cpu()
        if ac.dim() != 1:
            raise ScheduleError(f"alphas_cumprod must be 1-D, got shape {list(ac.shape)}")
        if ac.numel() < 2 or not torch.all((ac > 0) & (ac < 1)):
            raise ScheduleError("alphas_cumprod must hold at least 2 values in (0, 1)")
        lam = 0.5 * (torch.log(ac) - torch.log1p(-ac))
        if not torch.all(lam[1:] < lam[:-1]):
            raise ScheduleError("alphas_cumprod must be strictly decreasing")
        self.alphas_cumprod = ac
        self._lam = lam  # indexed by timestep k, decreasing in k
        self._dlam = lam[1:] - lam[:-1]

    @property
    def num_train_timesteps(self) -> int:
        return self.alphas_cumprod.numel()

    def timestep(self, t: Tensor | float) -> Tensor:
        """Fractional diffusers timestep ``k = (1 - t)(N - 1)`` of flow time ``t``."""
        return (1 - _as_tensor(t)) * (self.num_train_timesteps - 1)

    def flow_time(self, k: Tensor | float) -> Tensor:
        """Flow time of a (possibly fractional) diffusers timestep."""
        return 1 - _as_tensor(k) / (self.num_train_timesteps - 1)

    def _lam_and_slope(self, t: Tensor) -> tuple[Tensor, Tensor]:
        n = self.num_train_timesteps
        k = self.timestep(t).clamp(0, n - 1)
        i0 = torch.floor(k.detach()).long().clamp(0, n - 2)
        w = k - i0.to(k.dtype)
        # Differences taken in float64 before any cast: neighbouring log-SNRs are close, and
        # subtracting them in float32 would cost the slope (and alpha') four digits.
        l0 = self._lam.to(t.device)[i0].to(k.dtype)
        dl = self._dlam.to(t.device)[i0].to(k.dtype)
        lam = l0 + w * dl
        dlam_dt = -dl * (n - 1)  # dk/dt = -(N - 1)
        return lam, dlam_dt

    def __call__(self, t):
        t = _as_tensor(t)
        lam, dlam = self._lam_and_slope(t)
        alpha = torch.sqrt(torch.sigmoid(2 * lam))
        sigma = torch.sqrt(torch.sigmoid(-2 * lam))
        # d alpha/dlam = alpha sigma^2, d sigma/dlam = -sigma alpha^2 (for alpha^2 + sigma^2 = 1).
        return ScheduleValues(alpha, sigma, alpha * sigma**2 * dlam, -sigma * alpha**2 * dlam)

    def log_snr(self, t):
        return self._lam_and_slope(_as_tensor(t))[0]

    def t_from_log_snr(self, lam):
        lam = _as_tensor(lam).to(torch.float64)
        tab = self._lam.to(lam.device)
        inc = tab.flip(0)  # increasing in position j = N-1-k
        j = torch.searchsorted(inc, lam.clamp(inc[0], inc[-1]).contiguous()).clamp(1, len(inc) - 1)
        l0, l1 = inc[j - 1], inc[j]
        pos = (j - 1).to(lam.dtype) + (lam.clamp(inc[0], inc[-1]) - l0) / (l1 - l0)
        k = (self.num_train_timesteps - 1) - pos
        return self.flow_time(k)

    def config(self):
        return {"name": self.name, "alphas_cumprod": [float(v) for v in self.alphas_cumprod]}


class EDM(Schedule):
    """Variance exploding / EDM noise levels ``s`` rescaled to a Gaussian path.

    ``x = x_1 + s eps`` becomes ``alpha = 1/sqrt(1+s^2)``, ``sigma = s/sqrt(1+s^2)`` after dividing
    by ``sqrt(1 + s^2)``. Flow time runs log-linearly from ``s_max`` (t = 0) to ``s_min`` (t = 1):
    ``log s_t = (1 - t) log s_max + t log s_min``. :meth:`noise_level` gives ``s`` at ``t``.
    """

    name = "edm"

    def __init__(self, sigma_min: float = 0.002, sigma_max: float = 80.0) -> None:
        self.sigma_min, self.sigma_max = _increasing(
            "EDM", sigma_min=sigma_min, sigma_max=sigma_max
        )
        self._lmax = math.log(sigma_max)
        self._lmin = math.log(sigma_min)

    def noise_level(self, t: Tensor | float) -> Tensor:
        t = _as_tensor(t)
        return torch.exp((1 - t) * self._lmax + t * self._lmin)

    def __call__(self, t):
        t = _as_tensor(t)
        s = self.noise_level(t)
        ds = s * (self._lmin - self._lmax)
        r = torch.rsqrt(1 + s * s)
        alpha, sigma = r, s * r
        d_alpha = -s * r**3 * ds
        d_sigma = r**3 * ds
        return ScheduleValues(alpha, sigma, d_alpha, d_sigma)

    def log_snr(self, t):
        return -torch.log(self.noise_level(t))

    def t_from_log_snr(self, lam):
        t = (-_as_tensor(lam) - self._lmax) / (self._lmin - self._lmax)
        return t.clamp(0.0, 1.0)

    def config(self):
        return {"name": self.name, "sigma_min": self.sigma_min, "sigma_max": self.sigma_max}


_REGISTRY: dict[str, type[Schedule]] = {c.name: c for c in (CondOT, VP, Cosine, DiscreteVP, EDM)}


def noise_level(schedule: Schedule, t: Tensor | float) -> Tensor:
    """The noise level by which samplers index the path at flow times ``t``: flow matching's
    ``sigma_t`` on :class:`CondOT` (``1 - t``: diffusers' flow schedulers, ComfyUI's flow
    models), else the Karras ``sigma_t / alpha_t`` (k-diffusion, diffusers' ``sigmas``,
    ComfyUI's discrete models)."""
    v = schedule(t)
    return v.sigma if isinstance(schedule, CondOT) else v.sigma / v.alpha


def schedule_from_config(config: dict[str, Any]) -> Schedule:
    """Rebuild a scheduler from :meth:`Schedule.config`."""
    if not isinstance(config, dict):
        raise ScheduleError(f"a scheduler config must be a dict, got {type(config).__name__}")
    cfg = dict(config)
    name = cfg.pop("name", None)
    if name not in _REGISTRY:
        raise ScheduleError(f"unknown scheduler {name!r}; known: {sorted(_REGISTRY)}")
    try:
        return _REGISTRY[name](**cfg)
    except TypeError as e:
        raise ScheduleError(f"bad config for scheduler {name!r}: {e}") from None
