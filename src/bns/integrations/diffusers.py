"""diffusers integration: a BNS scheduler for pipelines, and pipelines as :class:`bns.Model`.

Two directions:

- :class:`BNSScheduler` runs a trained :class:`bns.NSSolver` inside an ordinary diffusers
  pipeline: ``pipe.scheduler = BNSScheduler.from_solver(solver, pipe.scheduler)``.
- :func:`model_from_pipeline` turns a pipeline (a local folder or an object) into a
  :class:`bns.Model`, so that a solver can be distilled for it (``bns distill --model
  diffusers:PATH``).

Conventions (bns-math.md, section 1; flow time ``t``: 0 = noise, 1 = data):

- Flow-matching pipelines (SD3, Flux: ``FlowMatchEulerDiscreteScheduler``) work in
  ``sigma = 1 - t``; the transformer's output is ``dx/dsigma`` at ``timestep = sigma * N``
  (``N = num_train_timesteps``, 1000). The bns velocity is ``u = dx/dt = -output`` and the path is
  CondOT. The scheduler's ``shift`` / ``mu`` (resolution-dependent shifting) only choose
  diffusers' *inference grid* ``sigma -> shift sigma / (1 + (shift - 1) sigma)``; they are not
  part of the model, so the bns model ignores them and a BNS solver uses its own learned times.
  (The shifted Euler grid is ``bns.solvers.euler(1 - shifted_sigmas)``, a natural init.)
- DDPM-style pipelines (epsilon, v_prediction or sample prediction over ``alphas_cumprod``, e.g.
  DiT) use :class:`bns.schedules.DiscreteVP`: diffusers timestep ``k = (1 - t)(N - 1)``,
  fractional between the trained integers, with the log-SNR interpolated linearly.
- Both start from ``x_0 ~ N(0, I)`` at ``t = 0`` (``init_noise_sigma = 1``) and feed the network
  the sample itself (``scale_model_input`` is the identity), as these pipelines expect.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import SchedulerMixin, SchedulerOutput
from torch import Tensor, nn

from ..model import Model, prediction_coefficients
from ..schedules import CondOT, DiscreteVP, Schedule
from ..solver import NSSolver, SolverFileError

__all__ = ["BNSScheduler", "model_from_pipeline", "DiffusersError"]

# diffusers' prediction_type -> bns prediction.
_PREDICTIONS = {"epsilon": "eps", "v_prediction": "v", "sample": "x1", "flow": "velocity"}


class DiffusersError(ValueError):
    """A pipeline or scheduler that this integration cannot use, or a misuse of the scheduler."""


# -- how a scheduler's model output and timesteps map onto flow time ---------------------------


def _is_flow_scheduler(scheduler: Any) -> bool:
    name = type(scheduler).__name__
    config = getattr(scheduler, "config", scheduler)
    return "FlowMatch" in name or (
        isinstance(config, dict)
        and ("shift" in config or "use_dynamic_shifting" in config)
        and "beta_start" not in config
    )


def _alphas_cumprod(scheduler: Any) -> Tensor:
    ac = getattr(scheduler, "alphas_cumprod", None)
    if ac is None:
        # A bare config: let diffusers' own DDPM scheduler build the betas the same way.
        from diffusers import DDPMScheduler

        config = dict(getattr(scheduler, "config", scheduler))
        ac = DDPMScheduler.from_config(config).alphas_cumprod
    return torch.as_tensor(ac, dtype=torch.float64).flatten()


def _describe_scheduler(scheduler: Any) -> dict[str, Any]:
    """``prediction_type``, ``num_train_timesteps`` and (DDPM-style) ``alphas_cumprod``."""
    config = getattr(scheduler, "config", scheduler)
    n_train = int(config.get("num_train_timesteps", 1000))
    if _is_flow_scheduler(scheduler):
        return {"prediction_type": "flow", "num_train_timesteps": n_train, "alphas_cumprod": None}
    prediction = config.get("prediction_type", "epsilon")
    if prediction not in ("epsilon", "v_prediction", "sample"):
        raise DiffusersError(
            f"{type(scheduler).__name__} has prediction_type {prediction!r}; bns supports"
            " epsilon, v_prediction, sample and flow matching"
        )
    ac = _alphas_cumprod(scheduler)
    return {
        "prediction_type": prediction,
        "num_train_timesteps": ac.numel(),
        "alphas_cumprod": [float(v) for v in ac],
    }


def _schedule(prediction_type: str, alphas_cumprod: Sequence[float] | None) -> Schedule:
    if prediction_type == "flow":
        return CondOT()
    if alphas_cumprod is None:
        raise DiffusersError(f"prediction_type {prediction_type!r} needs alphas_cumprod")
    return DiscreteVP(torch.tensor(list(alphas_cumprod), dtype=torch.float64))


def _timestep(prediction_type: str, num_train_timesteps: int, t: Tensor) -> Tensor:
    """The diffusers timestep of flow time ``t`` (float64, fractional)."""
    t = t.to(torch.float64)
    if prediction_type == "flow":
        return (1 - t) * num_train_timesteps
    return (1 - t) * (num_train_timesteps - 1)


def _settings_from_meta(solver: NSSolver) -> dict[str, Any] | None:
    """Scheduler settings implied by the model a solver was trained for, where it says."""
    settings = solver.meta.get("model_settings")
    if not isinstance(settings, dict) or not isinstance(settings.get("schedule"), dict):
        return None
    name = settings["schedule"].get("name")
    prediction = settings.get("prediction")
    if name == "condot" and prediction == "velocity":
        return {"prediction_type": "flow", "alphas_cumprod": None}
    if name == "discrete_vp" and prediction in ("eps", "v", "x1"):
        inverse = {v: k for k, v in _PREDICTIONS.items()}
        return {
            "prediction_type": inverse[prediction],
            "alphas_cumprod": list(settings["schedule"]["alphas_cumprod"]),
        }
    return None


# -- the scheduler ------------------------------------------------------------------------------


class BNSScheduler(SchedulerMixin, ConfigMixin):
    """A diffusers scheduler that samples with a (trained) non-stationary solver.

    Step ``i`` receives the network output at ``t_i``, turns it into the flow-time velocity
    ``u_i`` (in float32 or better), stores it, and returns
    ``x_{i+1} = a_i x_0 + sum_{j<=i} b_ij u_j`` cast back to the model output's dtype. The
    scheduler keeps ``x_0`` and every velocity of the current run in that precision, so
    rounding the pipeline's latents to half precision between steps does not accumulate.

    The solver is part of the config (``solver``: the JSON of :meth:`bns.NSSolver.to_dict`), so
    ``save_pretrained`` / ``from_pretrained`` round-trip it exactly. It only runs the step count
    it was trained for: ``set_timesteps`` refuses any other. Call the pipeline with the guidance
    scale the solver was trained for (``solver.meta["guidance"]``): the scheduler cannot see
    it. A pipeline saved with this scheduler
    is reloaded with ``DiffusionPipeline.from_pretrained(path, scheduler=
    BNSScheduler.from_pretrained(path, subfolder="scheduler"))`` (``import bns`` does not export
    the class, so diffusers cannot find it by name).

    Args:
        solver: :meth:`bns.NSSolver.to_dict` of the solver.
        prediction_type: what the pipeline's network returns: ``"flow"`` (flow-matching
            ``dx/dsigma``), ``"epsilon"``, ``"v_prediction"`` or ``"sample"``.
        num_train_timesteps: ``N`` of the timestep convention (see the module docstring).
        alphas_cumprod: the DDPM schedule (not for ``"flow"``).

    Example:
        >>> solver = bns.NSSolver.load("dit_nfe8.json")
        >>> pipe.scheduler = BNSScheduler.from_solver(solver, pipe.scheduler)
        >>> images = pipe(class_labels=[207], num_inference_steps=8).images
    """

    order = 1
    _compatibles: list[str] = []

    @register_to_config
    def __init__(
        self,
        solver: dict[str, Any] | None = None,
        prediction_type: str = "flow",
        num_train_timesteps: int = 1000,
        alphas_cumprod: list[float] | None = None,
    ) -> None:
        if solver is None:
            raise DiffusersError(
                "BNSScheduler needs a solver: build it with BNSScheduler.from_solver(solver, ...)"
                " (a config of another scheduler holds none)"
            )
        if prediction_type not in _PREDICTIONS:
            raise DiffusersError(
                f"unknown prediction_type {prediction_type!r}; expected one of {list(_PREDICTIONS)}"
            )
        try:
            self.solver = NSSolver.from_dict(dict(solver))
        except SolverFileError as e:
            raise DiffusersError(f"BNSScheduler config holds an invalid solver: {e}") from None
        self.bns_schedule = _schedule(prediction_type, alphas_cumprod)
        t_max = float(self.solver.times[-1])
        if not (0.0 <= float(self.solver.times[0]) and t_max <= 1.0):
            raise DiffusersError("solver times must lie in [0, 1]")
        self.init_noise_sigma = 1.0
        self.num_inference_steps: int | None = None
        self.timesteps = torch.empty(0)
        self.sigmas = torch.empty(0)
        self._step_index: int | None = None
        self._x0: Tensor | None = None
        self._us: list[Tensor] = []

    # -- building ---------------------------------------------------------------------------
    @classmethod
    def from_solver(
        cls,
        solver: NSSolver | str | os.PathLike,
        scheduler: Any = None,
        *,
        prediction_type: str | None = None,
        alphas_cumprod: Sequence[float] | Tensor | None = None,
        num_train_timesteps: int | None = None,
    ) -> BNSScheduler:
        """A scheduler running ``solver`` (an NSSolver or the path of its JSON file).

        The pipeline's conventions come from ``scheduler`` (the pipeline's original scheduler or
        its config), else from the model the solver was trained for (``meta["model_settings"]``,
        written by :func:`bns.distill`), else from the keyword arguments. Where both say, they
        must agree.
        """
        if not isinstance(solver, NSSolver):
            solver = NSSolver.load(solver, force=True)
        settings: dict[str, Any] = {"num_train_timesteps": 1000}
        from_meta = _settings_from_meta(solver)
        if from_meta is not None:
            settings.update(from_meta)
            if from_meta["alphas_cumprod"] is not None:
                settings["num_train_timesteps"] = len(from_meta["alphas_cumprod"])
        if scheduler is not None:
            described = _describe_scheduler(scheduler)
            if from_meta is not None:
                _check_agree(from_meta, described)
            settings.update(described)
        if prediction_type is not None:
            settings["prediction_type"] = prediction_type
        if alphas_cumprod is not None:
            ac = torch.as_tensor(alphas_cumprod, dtype=torch.float64).flatten()
            settings["alphas_cumprod"] = [float(v) for v in ac]
            settings["num_train_timesteps"] = ac.numel()
        if num_train_timesteps is not None:
            settings["num_train_timesteps"] = int(num_train_timesteps)
        if "prediction_type" not in settings:
            raise DiffusersError(
                "cannot tell the pipeline's conventions: pass its scheduler"
                " (BNSScheduler.from_solver(solver, pipe.scheduler)) or prediction_type=..."
            )
        if settings["prediction_type"] == "flow":
            settings["alphas_cumprod"] = None
        return cls(solver=solver.to_dict(), **settings)

    # -- the diffusers scheduler interface --------------------------------------------------
    @property
    def nfe(self) -> int:
        return self.solver.nfe

    @property
    def step_index(self) -> int | None:
        return self._step_index

    @property
    def begin_index(self) -> int:
        return 0

    def set_begin_index(self, begin_index: int = 0) -> None:
        if begin_index != 0:
            raise DiffusersError(
                "a BNS solver runs from pure noise over all its steps; it cannot start at step"
                f" {begin_index} (img2img / strength < 1 is not supported)"
            )

    def __len__(self) -> int:
        return self.config.num_train_timesteps

    def set_timesteps(
        self,
        num_inference_steps: int | None = None,
        device: str | torch.device | None = None,
        sigmas: Sequence[float] | None = None,
        mu: float | None = None,
        timesteps: Sequence[float] | None = None,
        **kwargs: Any,
    ) -> None:
        """Prepare a run of the solver's ``nfe`` steps.

        Flow pipelines pass ``sigmas`` (their default grid) and ``mu`` (shifting): only the
        length of ``sigmas`` is used, as the step count; their values and ``mu`` are ignored
        because the solver's times are learned. Custom ``timesteps`` are refused.
        """
        n = self.solver.nfe
        if timesteps is not None:
            raise DiffusersError(
                "BNSScheduler cannot take custom timesteps: its times are part of the trained"
                " solver"
            )
        asked = num_inference_steps
        if sigmas is not None:
            if asked is not None and len(sigmas) != asked:
                raise DiffusersError(
                    f"got {len(sigmas)} sigmas for num_inference_steps={num_inference_steps}"
                )
            asked = len(sigmas)
        if asked is None:
            asked = n
        if int(asked) != n:
            raise DiffusersError(
                f"this BNSScheduler holds a solver trained for {n} steps (NFE {n}); it cannot run"
                f" num_inference_steps={asked}. Call the pipeline with num_inference_steps={n},"
                f" or distill a solver for {asked} steps (bns distill --nfe {asked})."
            )
        cfg = self.config
        times = self.solver.times
        ts = _timestep(cfg.prediction_type, cfg.num_train_timesteps, times[:-1])
        self.timesteps = ts.to(torch.float32).to(device)
        a, s, _, _ = self.bns_schedule(times)
        if cfg.prediction_type == "flow":
            sig = 1 - times  # the flow-matching sigma
        else:
            sig = s / a  # the noise level of Karras-style schedulers
        self.sigmas = sig.to(torch.float32).to(device)
        self.num_inference_steps = n
        self._step_index = 0
        self._x0 = None
        self._us = []

    def scale_model_input(self, sample: Tensor, timestep: Any = None) -> Tensor:
        """The network takes the sample itself (no Karras-style input scaling)."""
        return sample

    def step(
        self,
        model_output: Tensor,
        timestep: float | Tensor,
        sample: Tensor,
        return_dict: bool = True,
        **kwargs: Any,
    ) -> SchedulerOutput | tuple[Tensor]:
        """One NS step: ``x_{i+1} = a_i x_0 + sum_{j<=i} b_ij u_j``.

        ``model_output`` is the network's (guided) output at the current timestep and
        ``sample`` the current latents. Returns ``prev_sample`` in ``model_output``'s dtype.
        """
        i = self._step_index
        if i is None:
            raise DiffusersError("call set_timesteps before step")
        n = self.solver.nfe
        if i >= n:
            raise DiffusersError(f"the solver has {n} steps; step was called a {i + 1}th time")
        expected = float(self.timesteps[i])
        got = float(timestep.flatten()[0]) if isinstance(timestep, Tensor) else float(timestep)
        if not math.isclose(got, expected, rel_tol=1e-5, abs_tol=1e-3):
            raise DiffusersError(
                f"step {i} expects timestep {expected:.6g}, got {got:.6g}: a BNS solver must run"
                " all its steps in order"
            )
        acc = torch.promote_types(model_output.dtype, torch.float32)
        x = sample.to(acc)
        if i == 0:
            self._x0 = x
            self._us = []
        elif x.shape != self._x0.shape:
            raise DiffusersError(
                f"the sample changed shape during the run: {list(self._x0.shape)} then"
                f" {list(x.shape)}"
            )
        u = self._velocity(model_output.to(acc), x, i)
        self._us.append(u)
        # The same operations, in the same order, as bns.sample: equal results to rounding.
        a = self.solver.a.to(device=x.device, dtype=acc)
        b = self.solver.b.to(device=x.device, dtype=acc)
        nxt = a[i] * self._x0
        for j in range(i + 1):
            nxt = nxt + b[i, j] * self._us[j]
        self._step_index = i + 1
        prev = nxt.to(model_output.dtype)
        if not return_dict:
            return (prev,)
        return SchedulerOutput(prev_sample=prev)

    def _velocity(self, f: Tensor, x: Tensor, i: int) -> Tensor:
        prediction = self.config.prediction_type
        if prediction == "flow":
            return -f  # dx/dt = -dx/dsigma
        t = self.solver.times[i].reshape(1).to(x.device)
        beta, gamma = prediction_coefficients(_PREDICTIONS[prediction], self.bns_schedule, t)
        return beta.to(x.dtype) * x + gamma.to(x.dtype) * f

    def add_noise(self, *args: Any, **kwargs: Any) -> Tensor:
        raise DiffusersError("BNSScheduler samples from pure noise; img2img is not supported")

    scale_noise = add_noise


def _check_agree(from_meta: dict[str, Any], described: dict[str, Any]) -> None:
    if from_meta["prediction_type"] != described["prediction_type"]:
        raise DiffusersError(
            f"the solver was trained for a {from_meta['prediction_type']} model but the"
            f" pipeline's scheduler says {described['prediction_type']}"
        )
    ac_meta, ac_pipe = from_meta["alphas_cumprod"], described["alphas_cumprod"]
    if ac_meta is not None and ac_pipe is not None:
        if len(ac_meta) != len(ac_pipe) or not torch.allclose(
            torch.tensor(ac_meta, dtype=torch.float64),
            torch.tensor(ac_pipe, dtype=torch.float64),
            rtol=1e-6,
            atol=0,
        ):
            raise DiffusersError(
                "the solver was trained on another alphas_cumprod than the pipeline's scheduler"
            )


# -- pipelines as bns models --------------------------------------------------------------------


class _PipelineNet(nn.Module):
    """``net(x, t, y)`` over a diffusers denoiser: flow time in, the model's target out.

    The bns Model hands ``x`` and ``t`` over in float64 (its ``dtype``) so that the timestep is
    computed from the exact flow time; the net casts ``x`` to the denoiser's own dtype.
    """

    def __init__(self, denoiser: nn.Module, prediction_type: str, num_train_timesteps: int):
        super().__init__()
        self.denoiser = denoiser
        self.prediction_type = prediction_type
        self.num_train_timesteps = num_train_timesteps

    @property
    def net_dtype(self) -> torch.dtype:
        return self.denoiser.dtype

    def timestep(self, t: Tensor) -> Tensor:
        # float32, as the pipeline's scheduler hands it over; rounded from the float64 value.
        return _timestep(self.prediction_type, self.num_train_timesteps, t).to(torch.float32)

    def finish(self, out: Tensor, x: Tensor) -> Tensor:
        out = out[:, : x.shape[1]]  # DiT-style learned variance: keep the prediction channels
        return -out if self.prediction_type == "flow" else out


class _ClassNet(_PipelineNet):
    """DiT-style class-conditional transformer: ``y`` is the class label, ``K`` the null label."""

    def forward(self, x: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        out = self.denoiser(x.to(self.net_dtype), timestep=self.timestep(t), class_labels=y)
        return self.finish(out.sample if hasattr(out, "sample") else out[0], x)


class _UncondNet(_PipelineNet):
    """Unconditional UNet (DDPM / DDIM pipelines)."""

    def forward(self, x: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        out = self.denoiser(x.to(self.net_dtype), self.timestep(t))
        return self.finish(out.sample if hasattr(out, "sample") else out[0], x)


class _SD3Net(_PipelineNet):
    """SD3-style joint transformer over prompt embeddings encoded once: ``y`` indexes them."""

    def __init__(self, denoiser, prediction_type, num_train_timesteps, embeds, pooled):
        super().__init__(denoiser, prediction_type, num_train_timesteps)
        self.register_buffer("embeds", embeds)
        self.register_buffer("pooled", pooled)

    def forward(self, x: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        if y is None:
            y = torch.full((x.shape[0],), self.embeds.shape[0] - 1, device=x.device)
        out = self.denoiser(
            hidden_states=x.to(self.net_dtype),
            timestep=self.timestep(t),
            encoder_hidden_states=self.embeds[y],
            pooled_projections=self.pooled[y],
            return_dict=False,
        )[0]
        return self.finish(out, x)


def _load_pipeline(path_or_pipeline: Any, device: Any, dtype: torch.dtype | None) -> Any:
    if isinstance(path_or_pipeline, (str, os.PathLike)):
        path = Path(path_or_pipeline)
        if not (path / "model_index.json").is_file():
            raise DiffusersError(f"not a diffusers pipeline folder (no model_index.json): {path}")
        from diffusers import DiffusionPipeline

        kwargs: dict[str, Any] = {"local_files_only": True}
        # Components saved as absent ([null, null], e.g. SD3 without T5 or a VAE) must be
        # passed as None explicitly, or diffusers refuses to build the pipeline.
        try:
            index = json.loads((path / "model_index.json").read_text())
        except (OSError, ValueError) as e:
            raise DiffusersError(f"cannot read {path / 'model_index.json'}: {e}") from None
        for key, value in index.items():
            if not key.startswith("_") and isinstance(value, list) and value[:1] == [None]:
                kwargs[key] = None
        if dtype is not None:
            kwargs["torch_dtype"] = dtype
        pipe = DiffusionPipeline.from_pretrained(str(path), **kwargs)
    else:
        pipe = path_or_pipeline
        if dtype is not None:
            pipe = pipe.to(dtype=dtype)
    if device is not None:
        pipe = pipe.to(device)
    return pipe


def _encode_prompts(pipe: Any, prompts: list[str], negative: str) -> tuple[Tensor, Tensor]:
    """Embeddings ``[K + 1, ...]``: the prompts, then the negative prompt (the null label)."""
    with torch.no_grad():
        pe, ne, ppe, npe = pipe.encode_prompt(
            prompt=prompts,
            prompt_2=None,
            prompt_3=None,
            device=pipe._execution_device,
            do_classifier_free_guidance=True,
            negative_prompt=negative,
        )
    # The pipeline repeats the negative prompt for every prompt; all rows are the same.
    return torch.cat([pe, ne[:1]]), torch.cat([ppe, npe[:1]])


def model_from_pipeline(
    path_or_pipeline: str | os.PathLike | Any,
    prompts: list[str] | None = None,
    guidance_labels: str | None = None,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    *,
    sample_shape: Sequence[int] | None = None,
    name: str | None = None,
) -> Model:
    """A :class:`bns.Model` of a diffusers pipeline (a local folder or a pipeline object).

    Supported: class-conditional DiT-style pipelines (``DiTPipeline``: ``y`` is the class label,
    ``num_classes`` is the number of classes, 1000 for DiT, and the label 1000 is the null
    class), SD3-style text pipelines (``StableDiffusion3Pipeline``: the ``prompts`` are encoded
    once, ``y`` indexes them, ``num_classes = len(prompts)`` and the label ``len(prompts)`` is
    the negative prompt), and unconditional UNet pipelines (DDPM / DDIM). Classifier-free
    guidance then comes from ``bns.Model(..., guidance=w)`` with diffusers' convention.

    The prediction type and schedule come from the pipeline's scheduler (see the module
    docstring: flow matching -> CondOT velocity, shift/mu ignored as an inference-grid choice;
    epsilon / v_prediction / sample -> DiscreteVP). The network's weights are frozen (``eval``,
    no grad); gradients still flow through its inputs, as BNS training needs.

    Args:
        path_or_pipeline: a pipeline folder (loaded offline) or a pipeline object.
        prompts: text prompts of a text pipeline (required there, refused elsewhere).
        guidance_labels: the negative prompt of a text pipeline (the unconditional branch of
            guidance, default ``""``); must be None for other pipelines.
        device, dtype: move / cast the pipeline (default: as it is).
        sample_shape: override the latent shape (default: the denoiser's ``sample_size``).
        name: the model's name in artifacts.
    """
    pipe = _load_pipeline(path_or_pipeline, device, dtype)
    scheduler = getattr(pipe, "scheduler", None)
    if scheduler is None:
        raise DiffusersError(f"{type(pipe).__name__} has no scheduler")
    desc = _describe_scheduler(scheduler)
    prediction_type = desc["prediction_type"]
    schedule = _schedule(prediction_type, desc["alphas_cumprod"])
    n_train = desc["num_train_timesteps"]
    kind = type(pipe).__name__
    transformer = getattr(pipe, "transformer", None)
    unet = getattr(pipe, "unet", None)
    denoiser = transformer if transformer is not None else unet
    if denoiser is None:
        raise DiffusersError(f"{kind} has neither a transformer nor a unet")
    denoiser.eval().requires_grad_(False)
    cfg = denoiser.config
    num_classes: int | None = None
    is_text = hasattr(pipe, "encode_prompt")
    if guidance_labels is not None and not is_text:
        raise DiffusersError(
            f"guidance_labels (a negative prompt) needs a text pipeline, not {kind}"
        )
    if is_text:
        if type(denoiser).__name__ != "SD3Transformer2DModel":
            raise DiffusersError(
                f"text pipeline {kind} ({type(denoiser).__name__}) is not supported yet; supported:"
                " SD3-style (SD3Transformer2DModel), DiT, unconditional UNet"
            )
        if not prompts:
            raise DiffusersError(
                f"{kind} is a text pipeline: pass prompts (the command line's --prompts FILE)"
            )
        prompts = [str(p) for p in prompts]
        embeds, pooled = _encode_prompts(pipe, prompts, guidance_labels or "")
        net: _PipelineNet = _SD3Net(denoiser, prediction_type, n_train, embeds, pooled)
        num_classes = len(prompts)
    elif prompts is not None:
        raise DiffusersError(f"{kind} takes no text prompts")
    elif getattr(cfg, "num_embeds_ada_norm", None) and transformer is not None:
        net = _ClassNet(denoiser, prediction_type, n_train)
        num_classes = int(cfg.num_embeds_ada_norm)
    elif unet is not None and type(unet).__name__ == "UNet2DModel":
        if getattr(cfg, "num_class_embeds", None):
            raise DiffusersError("class-conditional UNet2DModel pipelines are not supported yet")
        net = _UncondNet(denoiser, prediction_type, n_train)
    else:
        raise DiffusersError(
            f"{kind} ({type(denoiser).__name__}) is not supported; supported: DiT-style"
            " class-conditional, SD3-style text and unconditional UNet pipelines"
        )
    if sample_shape is None:
        size = cfg.sample_size
        size = (size, size) if isinstance(size, int) else tuple(size)
        sample_shape = (int(cfg.in_channels), *size)
    # The name enters the model's fingerprint: the pipeline class, not its folder, so that a
    # solver stays valid for the same weights wherever they live.
    return Model(
        net,
        prediction=_PREDICTIONS[prediction_type],
        schedule=schedule,
        sample_shape=tuple(sample_shape),
        t_range=(0.0, 1.0),
        num_classes=num_classes,
        name=name or f"diffusers:{kind}",
        # float64 so that the flow time reaches the net unrounded; the net casts x itself.
        dtype=torch.float64,
    )
