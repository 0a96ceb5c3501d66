"""How ComfyUI's model sampling maps onto bns's flow time, and the NS sampler in its convention.

ComfyUI samplers follow k-diffusion's convention: ``sampler(model, x, sigmas, extra_args,
callback, disable)``, where ``model(x, sigma, **extra_args)`` returns the denoised (data)
prediction. What ``x`` and ``sigma`` mean depends on the model's ``model_sampling``:

- discrete epsilon / v models (SD 1.x/2.x, SDXL: ``ModelSamplingDiscrete`` with ``EPS`` or
  ``V_PREDICTION``): ``x = x_1 + s eps`` with ``s = sqrt((1 - ac) / ac)``, the log of ``s``
  interpolated linearly between integer timesteps. bns sees the same path as
  :class:`bns.schedules.DiscreteVP` over the same ``alphas_cumprod``: its state is
  ``x / sqrt(1 + s^2)``, and its log-SNR ``lambda = -log s`` is linear between timesteps, so
  flow time ``t`` and ``s`` map exactly both ways (``s = exp(-lambda(t))``);
- flow models (SD3, Flux, Wan, ...: ``CONST``): ``x = (1 - s) x_1 + s eps`` with ``s`` in
  [0, 1]; that is :class:`bns.schedules.CondOT` with ``t = 1 - s`` and the same state.

The sampler turns the denoised output ``D`` at ``t_i`` into the flow-time velocity
``u_i = beta_i x_i + gamma_i D`` (the data-prediction coefficients of
:func:`bns.model.prediction_coefficients`) and runs ``x_{i+1} = a_i x_0 + sum_j b_ij u_j``
(:func:`bns.solver.ns_step`) in float32 or better.

Nothing here imports ComfyUI at import time; :func:`model_kind` imports
``comfy.model_sampling`` when it is called (inside ComfyUI).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ...errors import BNSError
from ...model import prediction_coefficients
from ...schedules import CondOT, DiscreteVP, Schedule, noise_level, schedule_from_config
from ...solver import NSSolver, ns_step
from ...solvers.ends import solver_noise_levels

__all__ = [
    "ComfyUIError",
    "ModelKind",
    "model_kind",
    "solver_kind",
    "solver_schedule",
    "check_sigmas",
    "check_guidance",
    "sample_ns",
]

log = logging.getLogger("bns.integrations.comfyui")

# The model kinds this integration runs, by what the ComfyUI model's network predicts.
KIND_NAMES = {
    "eps": "an epsilon-prediction model (EPS)",
    "v": "a v-prediction model (V_PREDICTION)",
    "flow": "a flow model (CONST)",
}
# bns's (prediction, scheduler name) of each kind.
_BNS_OF_KIND = {
    "eps": ("eps", "discrete_vp"),
    "v": ("v", "discrete_vp"),
    "flow": ("velocity", "condot"),
}
# Relative tolerance between the solver's DDPM sigmas and the model's. diffusers computes
# alphas_cumprod in float32, ComfyUI in float64: SD's schedules differ by 1.3e-5 between
# them; another schedule (linear DDPM, zero terminal SNR) differs by far more.
_SCHEDULE_RTOL = 1e-4
# Relative tolerance between connected sigmas and the solver's own grid: the grid reaches
# ComfyUI as float32.
_SIGMAS_RTOL = 1e-5


class ComfyUIError(BNSError, ValueError):
    """A solver, model or sigmas that do not fit together (shown in ComfyUI as one line)."""


@dataclass(frozen=True)
class ModelKind:
    """What bns needs of a ComfyUI ``model_sampling``: the kind (``"eps"``, ``"v"`` or
    ``"flow"``) and, for the discrete kinds, the model's noise levels ``sigmas`` (float64, by
    timestep, increasing) and ``sigma_max``."""

    kind: str
    sigmas: Tensor | None = None

    @property
    def name(self) -> str:
        return KIND_NAMES[self.kind]


def _overrides(cls: type, base: type, names: tuple[str, ...]) -> bool:
    """Whether ``cls`` has another implementation than ``base`` of any of ``names``."""
    return any(getattr(cls, n, None) is not getattr(base, n, None) for n in names)


def model_kind(model_sampling: Any) -> ModelKind:
    """The kind of a ComfyUI ``model_sampling`` object, or :class:`ComfyUIError`.

    ComfyUI builds it as ``class ModelSampling(sampling_base, prediction_mixin)``
    (comfy/model_base.py, ``model_sampling``). Supported: the ``EPS`` and ``V_PREDICTION``
    mixins on ``ModelSamplingDiscrete``'s sigma/timestep maps, and the ``CONST`` mixin with a
    noise scale of 1 (its sigma/timestep maps are internal to the model: the network is called
    with ``s`` and the path is ``(1 - s) x_1 + s eps`` whatever the shift). Subclasses that
    change how the input, the denoised output or the noise are computed (``EDM``, ``X0``,
    ``IMG_TO_IMG``, ``COSMOS_RFLOW``, ...) are refused.
    """
    import comfy.model_sampling as cms  # noqa: PLC0415 - only inside ComfyUI

    cls = type(model_sampling)
    maps = ("calculate_input", "calculate_denoised", "noise_scaling", "inverse_noise_scaling")
    described = " + ".join(c.__name__ for c in cls.__mro__[1:] if c.__module__ == cms.__name__)
    unsupported = ComfyUIError(
        "BNS Sampler runs discrete epsilon / v-prediction models (SD 1.x/2.x, SDXL) and flow"
        f" models (SD3, Flux, Wan); this model samples as {described or cls.__name__}"
    )
    if isinstance(model_sampling, cms.CONST):
        if _overrides(cls, cms.CONST, maps):
            raise unsupported
        scale = float(getattr(model_sampling, "noise_scale", 1.0))
        if scale != 1.0:
            raise ComfyUIError(
                f"BNS Sampler: this flow model scales its noise by {scale:g}; bns solvers start"
                " from unit noise"
            )
        return ModelKind("flow")
    if isinstance(model_sampling, cms.V_PREDICTION):
        kind, mixin = "v", cms.V_PREDICTION
    elif isinstance(model_sampling, cms.EPS):
        kind, mixin = "eps", cms.EPS
    else:
        raise unsupported
    if (
        _overrides(cls, mixin, maps)
        or not isinstance(model_sampling, cms.ModelSamplingDiscrete)
        or _overrides(cls, cms.ModelSamplingDiscrete, ("sigma", "timestep"))
        or float(getattr(model_sampling, "sigma_data", 1.0)) != 1.0
    ):
        raise unsupported
    sigmas = torch.as_tensor(model_sampling.sigmas).detach().to("cpu", torch.float64).flatten()
    return ModelKind(kind, sigmas)


def solver_kind(solver: NSSolver) -> tuple[str | None, Schedule | None]:
    """The kind of model the solver was made for and its scheduler, from its metadata
    (``(None, None)`` where it does not say)."""
    settings = solver.meta.get("model_settings")
    if not isinstance(settings, dict) or not isinstance(settings.get("schedule"), dict):
        return None, None
    prediction = settings.get("prediction")
    try:
        schedule = schedule_from_config(settings["schedule"])
    except ValueError as e:
        raise ComfyUIError(f"BNS Sampler: the solver's model_settings are malformed: {e}") from None
    for kind, (pred, name) in _BNS_OF_KIND.items():
        if prediction == pred and schedule.name == name:
            if isinstance(schedule, CondOT) and schedule.sigma0 != 1.0:
                break
            return kind, schedule
    raise ComfyUIError(
        f"BNS Sampler: the solver was made for a {prediction} model with scheduler"
        f" {schedule!r}; ComfyUI models are discrete epsilon / v (DiscreteVP) or flow (CondOT)"
    )


def starts_from_data(solver: NSSolver) -> bool:
    """Whether the solver was made for a span that starts from noised data (image-to-image,
    :meth:`bns.Model.span`) rather than from noise."""
    span = solver.meta.get("span")
    return isinstance(span, dict) and span.get("start") == "noised data"


def _ddpm_sigmas(schedule: DiscreteVP) -> Tensor:
    ac = schedule.alphas_cumprod.to(torch.float64)
    return torch.sqrt((1 - ac) / ac)


def solver_schedule(solver: NSSolver, model: ModelKind) -> Schedule:
    """The bns scheduler that maps the solver's times to the model's sigmas; refuses a solver
    made for another kind of model or another DDPM schedule (:class:`ComfyUIError`).

    A solver that does not record its model (``meta["model_settings"]``) is taken to be made
    for this model: flow models use CondOT, discrete ones the DDPM schedule of the model's own
    sigmas.
    """
    kind, schedule = solver_kind(solver)
    if kind is not None and kind != model.kind:
        raise ComfyUIError(
            f"BNS Sampler: the solver was made for {KIND_NAMES[kind]} but this model is"
            f" {model.name}"
        )
    if model.kind == "flow":
        schedule = CondOT()
    elif schedule is None:
        s2 = model.sigmas**2
        schedule = DiscreteVP(1.0 / (1.0 + s2))
    else:
        mine, theirs = _ddpm_sigmas(schedule), model.sigmas
        if mine.numel() != theirs.numel() or not torch.allclose(
            mine, theirs, rtol=_SCHEDULE_RTOL, atol=0
        ):
            raise ComfyUIError(
                "BNS Sampler: the solver was made for a model with another noise schedule"
                f" ({mine.numel()} timesteps, sigma {float(mine[0]):.4g} to {float(mine[-1]):.4g})"
                f" than this model's ({theirs.numel()} timesteps, sigma"
                f" {float(theirs[0]):.4g} to {float(theirs[-1]):.4g})"
            )
    t0, tn = solver.t_range
    if not (0.0 <= t0 and tn <= 1.0):
        raise ComfyUIError("BNS Sampler: the solver's times must lie in [0, 1]")
    return schedule


def check_sigmas(sigmas: Tensor, expected: Tensor, nfe: int) -> None:
    """Refuse sigmas that are not the solver's grid (:class:`ComfyUIError`)."""
    got = torch.as_tensor(sigmas).detach().to("cpu", torch.float64).flatten()
    if got.numel() - 1 != nfe:
        raise ComfyUIError(
            f"BNS Sampler: got {got.numel()} sigmas ({got.numel() - 1} steps) but the solver takes"
            f" {nfe} steps; connect BNS Sigmas (with the same solver) to the sigmas input"
        )
    if not torch.allclose(got, expected, rtol=_SIGMAS_RTOL, atol=1e-7):
        raise ComfyUIError(
            "BNS Sampler: these sigmas are not the solver's own grid (its times are learned"
            " with its coefficients); connect BNS Sigmas (with the same solver) to the sigmas"
            " input"
        )


def check_guidance(solver: NSSolver, guider: Any) -> float | None:
    """Warn (log) when the guider's CFG scale is not the one the solver was trained for.

    The scale is ``guider.cfg`` of ComfyUI's ``CFGGuider`` (what SamplerCustom, the CFGGuider
    node and BasicGuider (cfg 1) build). A guider with two scales (DualCFGGuider: ``cfg1``,
    ``cfg2``) or none is not checked. Returns the scale found, or None.
    """
    trained = solver.meta.get("guidance")
    if trained is None or guider is None:
        return None
    if hasattr(guider, "cfg1") or hasattr(guider, "cfg2"):
        return None
    cfg = getattr(guider, "cfg", None)
    try:
        used, trained = float(cfg), float(trained)
    except (TypeError, ValueError):
        return None
    if not math.isclose(used, trained, rel_tol=1e-6, abs_tol=1e-9):
        log.warning(
            "BNS Sampler: this solver was trained for guidance %g but the sampler guides with"
            " cfg %g; samples will be further from the model's. Set cfg to %g, or distill a"
            " solver for %g (bns distill --guidance %g)",
            trained,
            used,
            trained,
            used,
            used,
        )
    return used


@torch.no_grad()
def sample_ns(
    model: Callable[..., Tensor],
    x: Tensor,
    sigmas: Tensor,
    extra_args: dict[str, Any] | None,
    callback: Callable[[dict[str, Any]], None] | None,
    disable: bool | None,
    *,
    solver: NSSolver,
    schedule: Schedule,
    max_denoise: bool,
) -> Tensor:
    """Run ``solver`` in ComfyUI's sampler convention; returns ``x`` at ``sigmas[-1]``.

    ``model(x, sigma, **extra_args)`` returns the denoised prediction; ``sigmas`` must be the
    solver's grid (:func:`check_sigmas`). ``x`` is what ComfyUI's noise scaling made of the
    noise at ``sigmas[0]``: ``noise * sqrt(1 + s^2)`` (``max_denoise``) or ``noise * s`` for a
    discrete model, ``noise * s`` for a flow model (plus the latent image). bns solvers start
    from the noise itself, so ``x`` is divided by that factor; a solver for a span that starts
    from noised data (image-to-image) starts from ComfyUI's noised latent, rescaled to bns's
    state (``x / sqrt(1 + s^2)``, or ``x`` itself on a flow model). ``callback`` gets k-diffusion's
    dict (``x``, ``i``, ``sigma``, ``sigma_hat``, ``denoised``) after each evaluation.
    """
    extra_args = {} if extra_args is None else extra_args
    flow = isinstance(schedule, CondOT)
    n = solver.nfe
    times = solver.times.to(torch.float64)  # stays on the CPU (float64: not on every device)
    grid = solver_noise_levels(solver, schedule)
    s_eval = noise_level(schedule, times)  # noise level at every evaluation (none is 0)
    s0 = float(s_eval[0])
    if starts_from_data(solver):
        # Image-to-image: ComfyUI noised the latent image to sigmas[0] (``latent + s noise``,
        # or ``(1 - s) latent + s noise`` for flow); bns's state there is that, rescaled.
        start_scale = 1.0 if flow else math.sqrt(1.0 + s0 * s0)
    elif flow or not max_denoise:
        start_scale = s0
    else:
        start_scale = math.sqrt(1.0 + s0 * s0)
    if not start_scale > 0:
        raise ComfyUIError("BNS Sampler: the solver starts at sigma 0 (on the data)")
    # ComfyUI state = scale_i * bns state (1 for flow models, sqrt(1 + s^2) for DDPM ones).
    scales = torch.ones_like(s_eval) if flow else torch.sqrt(1.0 + s_eval * s_eval)
    end_scale = 1.0 if flow else math.sqrt(1.0 + float(grid[-1]) ** 2)
    beta, gamma = prediction_coefficients("x1", schedule, times[:n])

    acc = torch.promote_types(x.dtype, torch.float32)
    shape = x.shape
    x0 = (x.to(acc) / start_scale).reshape(-1)
    b = solver.b.to(device=x.device, dtype=acc)
    a = solver.a.tolist()
    s_in = x.new_ones([shape[0]])
    buf = torch.empty((n, x0.numel()), dtype=acc, device=x.device)
    bar = _progress(n, disable)
    try:
        cur = x0
        for i in range(n):
            xc = cur.reshape(shape) * float(scales[i])
            denoised = model(xc.to(x.dtype), sigmas[i] * s_in, **extra_args)
            if callback is not None:
                callback(
                    {
                        "x": xc.to(x.dtype),
                        "i": i,
                        "sigma": sigmas[i],
                        "sigma_hat": sigmas[i],
                        "denoised": denoised,
                    }
                )
            u = float(beta[i]) * cur + float(gamma[i]) * denoised.to(acc).reshape(-1)
            buf[i] = u
            cur = ns_step(x0, buf[: i + 1], a[i], b[i, : i + 1])
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    return (cur.reshape(shape) * end_scale).to(x.dtype)


def _progress(total: int, disable: bool | None) -> Any:
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover - ComfyUI ships tqdm
        return None
    return tqdm(total=total, disable=disable)
