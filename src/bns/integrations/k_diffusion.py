"""k-diffusion (crowsonkb/k-diffusion) integration: its sampler convention and its denoisers.

k-diffusion works in variance-exploding coordinates: ``x = x_1 + s eps`` at noise level ``s``,
a denoiser ``model(x, sigma, **extra_args)`` returns ``E[x_1 | x]``, and a sampler starts from
``x = sigmas[0] * noise``. bns sees the same path through :class:`bns.schedules.EDM`: the
rescaled state ``x_bns = x / sqrt(1 + s^2)`` follows ``alpha = 1/sqrt(1+s^2)``,
``sigma = s/sqrt(1+s^2)``, with flow time log-linear in ``s`` from ``sigma_max`` (t = 0) to
``sigma_min`` (t = 1), and the denoiser is a data (``x1``) prediction. The conversion is exact
both ways (a scale per noise level, computed in float64).

k-diffusion's sigma grids end with 0; the rescaled schedule reaches ``s = 0`` only at infinite
flow time, so a bns solver stops at ``sigma_min``. The last k-diffusion step, from the last
nonzero sigma to 0, is a denoising step (Euler, DPM-Solver++ and the others all land on
``model(x, sigma_last)``): :func:`sample_bns` takes it too when ``sigmas`` ends with 0, at the
cost of one more network call. So k-diffusion's ``sigmas = [s_0, ..., s_{m}, 0]`` correspond to
the bns grid ``t_i = EDM.t(s_i)``, ``t_m = 1`` (``sigma_min = s_m``) plus that final denoising.

Only the calling convention is needed here; k-diffusion itself is not imported.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from ..errors import BNSError
from ..model import Model, prediction_coefficients
from ..schedules import EDM, schedule_from_config
from ..solver import NSSolver, sample
from ._extras import ExtrasNet

__all__ = ["sample_bns", "model_from_denoiser", "KDiffusionError"]


class KDiffusionError(BNSError, ValueError):
    """Sigmas, schedule and solver that do not fit together."""


def _denoise(
    denoiser: Callable[..., Tensor], schedule: EDM, x: Tensor, t: Tensor, extra_args: dict
) -> Tensor:
    """``denoiser(x * sqrt(1 + s^2), s)`` for a rescaled ``x`` at flow times ``t`` (``[B]``)."""
    s = schedule.noise_level(t.to(torch.float64))
    scale = torch.sqrt(1 + s * s).to(x.dtype).reshape((-1,) + (1,) * (x.dim() - 1))
    return denoiser(x * scale, s.to(x.dtype), **extra_args)


class _DenoiserNet(ExtrasNet):
    def __init__(self, denoiser, schedule: EDM, label_key: str | None, extra_args: dict):
        super().__init__(denoiser, label_key, extra_args)
        self.schedule = schedule

    def forward(self, x: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        return _denoise(self.fn, self.schedule, x, t, self.extras_for(y))


def model_from_denoiser(
    denoiser: Callable[..., Tensor],
    sigma_min: float,
    sigma_max: float,
    sample_shape: Sequence[int],
    *,
    num_classes: int | None = None,
    label_key: str = "class_cond",
    extra_args: dict[str, Any] | None = None,
    name: str = "k_diffusion",
    dtype: torch.dtype | None = None,
) -> Model:
    """A :class:`bns.Model` of a k-diffusion denoiser ``denoiser(x, sigma, **extra_args)``.

    The model has the :class:`bns.schedules.EDM` scheduler over ``[sigma_min, sigma_max]`` (flow
    time 1 to 0), data prediction and ``t_range = (0, 1)``; its state is k-diffusion's ``x``
    divided by ``sqrt(1 + s^2)``.

    Args:
        denoiser: returns the denoised ``x`` (``E[x_1 | x]``), k-diffusion's convention.
        sigma_min, sigma_max: the noise levels at flow times 1 and 0.
        sample_shape: the shape of one sample.
        num_classes: ``K`` for a class-conditional denoiser: bns's label ``y`` goes in as
            ``extra_args[label_key]`` and the label ``K`` must be its unconditional class.
        extra_args: fixed keyword arguments passed on every call.
        name: the model's name in artifacts.
        dtype: the dtype the denoiser runs in (``x`` and ``sigma`` reach it in it). Default:
            that of its weights (an ``nn.Module`` denoiser, or one holding modules), else
            float32; pass it for a plain function, e.g. ``torch.float64`` for an exact one.
    """
    if not callable(denoiser):
        raise TypeError(f"denoiser must be callable, got {type(denoiser).__name__}")
    schedule = EDM(sigma_min, sigma_max)
    net = _DenoiserNet(
        denoiser, schedule, label_key if num_classes is not None else None, extra_args or {}
    )
    return Model(
        net,
        prediction="x1",
        schedule=schedule,
        sample_shape=tuple(sample_shape),
        t_range=(0.0, 1.0),
        num_classes=num_classes,
        name=name,
        dtype=dtype,
    )


def _schedule_for(solver: NSSolver, sigmas: Tensor | None, schedule: EDM | None) -> EDM:
    if schedule is not None:
        if not isinstance(schedule, EDM):
            raise KDiffusionError(f"schedule must be a bns.schedules.EDM, got {schedule!r}")
        return schedule
    settings = solver.meta.get("model_settings")
    if isinstance(settings, dict) and isinstance(settings.get("schedule"), dict):
        found = schedule_from_config(settings["schedule"])
        if not isinstance(found, EDM):
            raise KDiffusionError(
                f"the solver was trained for a model with scheduler {found!r}, not a k-diffusion"
                " (EDM) model"
            )
        return found
    if sigmas is None:
        raise KDiffusionError(
            "cannot tell the noise levels of the solver's times: pass sigmas (k-diffusion's"
            " grid, from sigma_max to sigma_min, optionally ending with 0) or schedule=EDM(...)"
        )
    nonzero = sigmas[sigmas > 0]
    return EDM(float(nonzero.min()), float(nonzero.max()))


def _check_sigmas(sigmas: Tensor, s_start: float, s_end: float) -> bool:
    """Check k-diffusion's ``sigmas`` against the solver's ends; True if it ends with 0."""
    if sigmas.dim() != 1 or sigmas.numel() < 2 or not torch.all(torch.isfinite(sigmas)):
        raise KDiffusionError("sigmas must be a 1-D tensor of at least 2 finite noise levels")
    ends_at_zero = float(sigmas[-1]) == 0.0
    last = float(sigmas[-2] if ends_at_zero else sigmas[-1])
    # k-diffusion's sigmas are usually float32: compare to that precision.
    for what, got, want in (("first", float(sigmas[0]), s_start), ("last nonzero", last, s_end)):
        if not math.isclose(got, want, rel_tol=1e-5):
            raise KDiffusionError(
                f"the {what} sigma is {got:.6g} but the solver's times map to {want:.6g}: the"
                " solver runs from its own sigma_max to its sigma_min (its interior sigmas are"
                " learned and replace yours)"
            )
    return ends_at_zero


@torch.no_grad()
def sample_bns(
    model: Callable[..., Tensor],
    x: Tensor,
    sigmas: Tensor | None = None,
    extra_args: dict[str, Any] | None = None,
    callback: Callable[[dict[str, Any]], None] | None = None,
    disable: bool | None = None,
    *,
    solver: NSSolver,
    schedule: EDM | None = None,
) -> Tensor:
    """Sample with an NS solver in k-diffusion's sampler convention.

    ``model(x, sigma, **extra_args)`` is a k-diffusion denoiser and ``x`` the starting noise
    scaled by the first noise level (``sigmas[0] * noise``). The solver's flow times map to
    noise levels through ``schedule`` (default: the EDM scheduler of the model it was trained
    for, from its metadata, else the ends of ``sigmas``). ``sigmas``, if given, must start at the
    solver's first noise level and end at its last or at 0; its interior values are ignored (the
    solver's times are its own). Ending with 0 adds k-diffusion's final denoising step (one
    more call). ``callback`` receives k-diffusion's dict (``x``, ``i``, ``sigma``,
    ``sigma_hat``, ``denoised``) at each call. Returns ``x`` at the last sigma, in k-diffusion's
    coordinates and ``x``'s dtype.

    NFE: ``solver.nfe`` (+ 1 with a final 0 in ``sigmas``).
    """
    if not isinstance(solver, NSSolver):
        raise TypeError(f"solver must be a bns.NSSolver, got {type(solver).__name__}")
    extra_args = {} if extra_args is None else extra_args
    if sigmas is not None:
        sigmas = torch.as_tensor(sigmas).detach().to("cpu", torch.float64)
    sched = _schedule_for(solver, sigmas, schedule)
    solver.validate()
    times = solver.times
    if float(times[0]) < 0 or float(times[-1]) > 1:
        raise KDiffusionError("solver times must lie in [0, 1] (the EDM scheduler's range)")
    s_start, s_end = (float(v) for v in sched.noise_level(times[[0, -1]]))
    denoise_last = _check_sigmas(sigmas, s_start, s_end) if sigmas is not None else False

    from tqdm.auto import tqdm

    acc = torch.promote_types(x.dtype, torch.float32)
    bar = tqdm(total=solver.nfe + int(denoise_last), disable=disable)
    calls = [0]

    def call(xr: Tensor, t: Tensor) -> Tensor:
        # t is rounded to the state's dtype (float32 or wider), as bns.Model rounds it for a
        # network of that dtype: the same noise levels as sampling through model_from_denoiser.
        t = t.to(acc).to(torch.float64).expand(xr.shape[0])
        d = _denoise(model, sched, xr, t, extra_args)
        if callback is not None:
            s = sched.noise_level(t[:1]).to(xr.dtype)[0]
            scale = float(torch.sqrt(1 + sched.noise_level(t[:1]) ** 2))
            callback({"x": xr * scale, "i": calls[0], "sigma": s, "sigma_hat": s, "denoised": d})
        calls[0] += 1
        bar.update(1)
        return d

    def velocity(xr: Tensor, t: Tensor) -> Tensor:
        d = call(xr, torch.as_tensor(t, dtype=torch.float64, device=xr.device).reshape(1))
        beta, gamma = prediction_coefficients(
            "x1", sched, torch.as_tensor(t, dtype=torch.float64, device=xr.device).reshape(1)
        )
        # The same operations as bns.Model.velocity for an x1 model.
        return beta.to(acc) * xr.to(acc) + gamma.to(acc) * d.to(acc)

    x0 = x.to(acc) / math.sqrt(1 + s_start * s_start)
    xn = sample(velocity, x0, solver)
    try:
        if denoise_last:
            t_end = times[-1].reshape(1).to(x.device)
            return call(xn, t_end).to(x.dtype)
        return (xn * math.sqrt(1 + s_end * s_end)).to(x.dtype)
    finally:
        bar.close()
