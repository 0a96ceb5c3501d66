"""The diffusers scheduler that runs a trained :class:`bns.NSSolver` inside a pipeline.

``pipe.scheduler = BNSScheduler.from_solver(solver, pipe.scheduler)``; the conventions (flow
time, timesteps, predictions) are in the package docstring.
"""

from __future__ import annotations

import inspect
import math
import os
import warnings
from collections.abc import Sequence
from typing import Any

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import SchedulerMixin, SchedulerOutput
from torch import Tensor

from ...model import prediction_coefficients
from ...solver import NSSolver, SolverFileError, ns_step
from ._conventions import (
    PREDICTIONS,
    DiffusersError,
    bns_schedule,
    describe_scheduler,
    diffusers_timestep,
)

__all__ = ["BNSScheduler"]


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
        inverse = {v: k for k, v in PREDICTIONS.items()}
        return {
            "prediction_type": inverse[prediction],
            "alphas_cumprod": list(settings["schedule"]["alphas_cumprod"]),
        }
    return None


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
        if prediction_type not in PREDICTIONS:
            raise DiffusersError(
                f"unknown prediction_type {prediction_type!r}; expected one of {list(PREDICTIONS)}"
            )
        try:
            self.solver = NSSolver.from_dict(dict(solver))
        except SolverFileError as e:
            raise DiffusersError(f"BNSScheduler config holds an invalid solver: {e}") from None
        self.bns_schedule = bns_schedule(prediction_type, alphas_cumprod)
        t_max = float(self.solver.times[-1])
        if not (0.0 <= float(self.solver.times[0]) and t_max <= 1.0):
            raise DiffusersError("solver times must lie in [0, 1]")
        self.init_noise_sigma = 1.0
        self.num_inference_steps: int | None = None
        self.timesteps = torch.empty(0)
        self.sigmas = torch.empty(0)
        self._step_index: int | None = None
        self._x0: Tensor | None = None
        self._us: Tensor | None = None  # [nfe, x.numel()]: the run's velocities

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
            described = describe_scheduler(scheduler)
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
        ts = diffusers_timestep(cfg.prediction_type, cfg.num_train_timesteps, times[:-1])
        self.timesteps = ts.to(torch.float32).to(device)
        if cfg.prediction_type == "flow":
            sig = 1 - times  # the flow-matching sigma
        else:
            v = self.bns_schedule(times)
            sig = v.sigma / v.alpha  # the noise level of Karras-style schedulers
        if self.solver.meta.get("end") == "data":
            sig = sig.clone()
            sig[-1] = 0.0  # the last step lands on the data (bns.solvers.ends)
        self.sigmas = sig.to(torch.float32).to(device)
        self.num_inference_steps = n
        self._check_guidance()
        self._step_index = 0
        self._x0 = None
        self._us = None

    def _check_guidance(self) -> None:
        """Warn when the calling pipeline guides with another scale than the solver was trained
        for (the scheduler is not told the scale: it reads it from the pipeline's call)."""
        trained = self.solver.meta.get("guidance")
        if trained is None:
            return
        for used in _pipeline_guidance(self):
            if math.isclose(used, float(trained), rel_tol=1e-6, abs_tol=1e-9):
                continue
            warnings.warn(
                f"BNSScheduler: this solver was trained for guidance {float(trained):g} but the"
                f" pipeline guides with {used:g}; samples will be further from the model's. Call"
                f" the pipeline with guidance {float(trained):g}, or distill a solver for"
                f" {used:g} (bns distill --guidance {used:g})",
                stacklevel=3,
            )

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
        if i == 0:
            # The run's precision, fixed at its start: float32 or better.
            acc = torch.promote_types(model_output.dtype, torch.float32)
            self._x0 = sample.to(acc)
            self._us = torch.empty((n, sample.numel()), dtype=acc, device=sample.device)
        x = sample.to(self._x0.dtype)
        if x.shape != self._x0.shape:
            raise DiffusersError(
                f"the sample changed shape during the run: {list(self._x0.shape)} then"
                f" {list(x.shape)}"
            )
        self._us[i] = self._velocity(model_output.to(x.dtype), x, i).reshape(-1)
        # bns.sample's own update (one product over the velocities so far): the same numbers.
        b = self.solver.b[i, : i + 1].to(device=x.device, dtype=x.dtype)
        nxt = ns_step(self._x0.reshape(-1), self._us[: i + 1], float(self.solver.a[i]), b)
        self._step_index = i + 1
        prev = nxt.reshape(x.shape).to(model_output.dtype)
        if not return_dict:
            return (prev,)
        return SchedulerOutput(prev_sample=prev)

    def _velocity(self, f: Tensor, x: Tensor, i: int) -> Tensor:
        prediction = self.config.prediction_type
        if prediction == "flow":
            return -f  # dx/dt = -dx/dsigma
        t = self.solver.times[i].reshape(1).to(x.device)
        beta, gamma = prediction_coefficients(PREDICTIONS[prediction], self.bns_schedule, t)
        return beta.to(x.dtype) * x + gamma.to(x.dtype) * f

    def add_noise(self, *args: Any, **kwargs: Any) -> Tensor:
        raise DiffusersError("BNSScheduler samples from pure noise; img2img is not supported")

    scale_noise = add_noise


def _pipeline_guidance(scheduler: Any, depth: int = 6) -> list[float]:
    """The classifier-free guidance scales of the pipeline call that is setting ``scheduler``'s
    timesteps, read from its frame (none where no pipeline call is found). diffusers' ``w <= 1``
    means no guidance, i.e. ``w = 1``; Flux's true CFG is ``true_cfg_scale`` with a negative
    prompt (its ``guidance_scale`` is an input of the network, not CFG); Wan 2.2 may guide its
    second expert with ``guidance_scale_2``."""

    def effective(w: Any) -> float:
        return float(w) if float(w) > 1 else 1.0

    frame = inspect.currentframe()
    try:
        for _ in range(depth):
            frame = frame.f_back if frame is not None else None
            if frame is None:
                return []
            owner = frame.f_locals.get("self")
            if owner is None or getattr(owner, "scheduler", None) is not scheduler:
                continue
            local = frame.f_locals
            if "true_cfg_scale" in local:
                on = local.get("do_true_cfg", local.get("true_cfg_scale", 1.0) > 1)
                return [float(local["true_cfg_scale"]) if on else 1.0]
            w = local.get("guidance_scale", getattr(owner, "_guidance_scale", None))
            if w is None:
                return []
            scales = [effective(w)]
            second = local.get("guidance_scale_2")
            if second is not None and getattr(owner, "transformer_2", None) is not None:
                scales.append(effective(second))
            return scales
        return []
    except Exception:  # noqa: BLE001 - a frame we cannot read: no check rather than a failure
        return []
    finally:
        del frame


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
