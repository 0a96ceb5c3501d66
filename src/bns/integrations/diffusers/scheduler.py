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
from ...schedules import noise_level
from ...solver import NSSolver, SolverFileError, ns_step
from ._conventions import (
    BNS_PREDICTION_OF,
    DiffusersError,
    alphas_cumprod_from_betas,
    bns_schedule,
    describe_scheduler,
    diffusers_timestep,
    flow_time,
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
        inverse = {v: k for k, v in BNS_PREDICTION_OF.items()}
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
        num_train_timesteps: ``N`` of the timestep convention (see the module docstring); for
            a DDPM schedule, the length of ``alphas_cumprod``.
        alphas_cumprod: the DDPM schedule (not for ``"flow"``).
        trained_betas: the DDPM schedule as diffusers' schedulers take it (not for ``"flow"``):
            ``alphas_cumprod = cumprod(1 - trained_betas)``, computed in float32 as diffusers
            does. It fills ``alphas_cumprod`` when that is not given, and must agree with it
            when it is.

    Where the solver records the model it was trained for (``meta["model_settings"]``), the
    prediction type and schedule must be that model's.

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
        trained_betas: Sequence[float] | Tensor | None = None,
    ) -> None:
        if solver is None:
            raise DiffusersError(
                "BNSScheduler needs a solver: build it with BNSScheduler.from_solver(solver, ...)"
                " (a config of another scheduler holds none)"
            )
        if prediction_type not in BNS_PREDICTION_OF:
            raise DiffusersError(
                f"unknown prediction_type {prediction_type!r}; expected one of {list(BNS_PREDICTION_OF)}"
            )
        try:
            self.solver = NSSolver.from_dict(dict(solver))
        except SolverFileError as e:
            raise DiffusersError(f"BNSScheduler config holds an invalid solver: {e}") from None
        betas = None
        if trained_betas is not None:
            betas, alphas_cumprod = self._schedule_from_betas(
                prediction_type, trained_betas, alphas_cumprod
            )
        if prediction_type != "flow" and alphas_cumprod is not None:
            # The timesteps handed to the network are on a grid of num_train_timesteps: it must
            # be the schedule's own, or the network would see another noise level than bns uses.
            if len(alphas_cumprod) != num_train_timesteps:
                raise DiffusersError(
                    f"num_train_timesteps={num_train_timesteps} but the schedule has"
                    f" {len(alphas_cumprod)} timesteps (alphas_cumprod / trained_betas)"
                )
        try:
            self.bns_schedule = bns_schedule(prediction_type, alphas_cumprod)
        except DiffusersError:
            raise
        except ValueError as e:
            raise DiffusersError(f"BNSScheduler config holds an invalid schedule: {e}") from None
        from_meta = _settings_from_meta(self.solver)
        if from_meta is not None:
            # Also for configs built without from_solver (from_config, from_pretrained, direct).
            source = "its trained_betas" if trained_betas is not None else "the scheduler config"
            _check_agree(
                from_meta,
                {
                    "prediction_type": prediction_type,
                    "alphas_cumprod": None if prediction_type == "flow" else alphas_cumprod,
                },
                source,
            )
        self._set_ddpm_attributes(prediction_type, alphas_cumprod, betas)
        t_max = float(self.solver.times[-1])
        if not (0.0 <= float(self.solver.times[0]) and t_max <= 1.0):
            raise DiffusersError("solver times must lie in [0, 1]")
        self._starts_inside, self._ends_inside = _span_of(self.solver)
        if self._starts_inside and self._ends_inside:
            raise DiffusersError(
                "this solver covers a part of the path inside it at both ends; a pipeline call"
                " runs either from its input image (image-to-image, a refiner) or to a hand-over"
                " (denoising_end), not both"
            )
        self.init_noise_sigma = 1.0
        self.num_inference_steps: int | None = None
        self._pad = 0  # timesteps of the pipeline's schedule outside the solver's span
        self._begin_index: int | None = None
        self._noised = False  # add_noise / scale_noise since set_timesteps
        self._offset: Tensor | None = None  # what the pipeline changed in the latents
        self._returned: Tensor | None = None  # the last step's output, as returned
        self._x_ns: Tensor | None = None  # and the NS state it came from
        self.timesteps = torch.empty(0)
        self.sigmas = torch.empty(0)
        self._step_index: int | None = None
        self._x0: Tensor | None = None
        self._us: Tensor | None = None  # [nfe, x.numel()]: the run's velocities

    def _schedule_from_betas(
        self,
        prediction_type: str,
        trained_betas: Sequence[float] | Tensor,
        alphas_cumprod: list[float] | None,
    ) -> tuple[Tensor, list[float]]:
        """The betas (float32) and ``alphas_cumprod`` of ``trained_betas``; both go into the
        config as plain lists, so that it is JSON and every reader of a BNSScheduler config
        finds the schedule in ``alphas_cumprod``."""
        if prediction_type == "flow":
            raise DiffusersError(
                "trained_betas describe a DDPM schedule; a flow-matching BNSScheduler"
                " (prediction_type='flow') has none"
            )
        betas, ac = alphas_cumprod_from_betas(trained_betas)
        if alphas_cumprod is not None:
            given = torch.tensor(list(alphas_cumprod), dtype=torch.float64)
            if given.numel() != ac.numel() or not torch.allclose(
                given, ac.to(torch.float64), rtol=1e-6, atol=0
            ):
                raise DiffusersError("trained_betas and alphas_cumprod give different schedules")
        else:
            alphas_cumprod = [float(v) for v in ac]
        # The betas as given (diffusers' configs keep them so), as a JSON list.
        given_betas = torch.as_tensor(trained_betas, dtype=torch.float64).flatten()
        self.register_to_config(
            trained_betas=[float(v) for v in given_betas], alphas_cumprod=list(alphas_cumprod)
        )
        return betas, list(alphas_cumprod)

    def _set_ddpm_attributes(
        self,
        prediction_type: str,
        alphas_cumprod: Sequence[float] | None,
        betas: Tensor | None,
    ) -> None:
        """``betas``, ``alphas`` and ``alphas_cumprod`` (float32 tensors) as diffusers' DDPM-style
        schedulers hold them; None for flow matching, which has no betas."""
        if prediction_type == "flow" or alphas_cumprod is None:
            self.betas = self.alphas = self.alphas_cumprod = None
            return
        ac = torch.as_tensor(alphas_cumprod, dtype=torch.float64).flatten()
        if betas is None:
            # beta_k = 1 - ac_k / ac_{k-1} (ac_{-1} = 1), in float64 before rounding.
            previous = torch.cat([ac.new_ones(1), ac[:-1]])
            betas = (1 - ac / previous).to(torch.float32)
        self.betas = betas
        self.alphas = 1.0 - betas
        self.alphas_cumprod = ac.to(torch.float32)

    # -- building ---------------------------------------------------------------------------
    @classmethod
    def from_solver(
        cls,
        solver: NSSolver | str | os.PathLike,
        scheduler: Any = None,
        *,
        prediction_type: str | None = None,
        alphas_cumprod: Sequence[float] | Tensor | None = None,
        trained_betas: Sequence[float] | Tensor | None = None,
        num_train_timesteps: int | None = None,
    ) -> BNSScheduler:
        """A scheduler running ``solver`` (an NSSolver or the path of its JSON file).

        The pipeline's conventions come from ``scheduler`` (the pipeline's original scheduler or
        its config), else from the model the solver was trained for (``meta["model_settings"]``,
        written by :func:`bns.distill`), else from the keyword arguments. Where both say, they
        must agree. ``trained_betas`` gives the DDPM schedule by its betas, as diffusers'
        schedulers take it.
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
        if trained_betas is not None:
            betas = torch.as_tensor(trained_betas, dtype=torch.float64).flatten()
            settings["trained_betas"] = [float(v) for v in betas]
            if alphas_cumprod is None:
                settings["alphas_cumprod"] = None  # from the betas (checked against the meta)
            settings["num_train_timesteps"] = betas.numel()
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
    def begin_index(self) -> int | None:
        return self._begin_index

    def set_begin_index(self, begin_index: int = 0) -> None:
        """Where the pipeline starts in the schedule (image-to-image slices it): a solver that
        starts from noise runs from the first timestep; one made for a span that starts inside
        the path, from its own first timestep (after the padding :meth:`set_timesteps` puts
        before it). Any other start is refused."""
        begin_index = int(begin_index)
        if begin_index != self._first_index():
            raise DiffusersError(self._wrong_start(begin_index))
        self._begin_index = begin_index

    @property
    def _top_timestep(self) -> int:
        """The timestep of pure noise: ``N`` for flow matching (sigma = 1), else ``N - 1``."""
        cfg = self.config
        return cfg.num_train_timesteps - (0 if cfg.prediction_type == "flow" else 1)

    def _first_index(self) -> int:
        return self._pad if self._starts_inside else 0

    def _wrong_start(self, begin: int) -> str:
        n, total = self.solver.nfe, self._pad + self.solver.nfe
        if not self._starts_inside:
            return (
                f"this solver runs from pure noise over all its {n} steps; the pipeline began at"
                f" step {begin} of {total} (image-to-image / strength < 1, or denoising_start)."
                " Distill a solver for that part of the path (bns distill --span T0:)"
            )
        k0 = float(self.timesteps[self._pad]) if len(self.timesteps) > self._pad else float("nan")
        return (
            f"this solver covers the path from timestep {k0:.6g} in {n} steps, which are steps"
            f" {self._pad} to {total - 1} of this schedule; the pipeline began at step {begin}."
            f" Call it with {_as_call(self.pipeline_arguments())}"
        )

    @property
    def span(self) -> tuple[float, float]:
        """The flow times ``(t_0, t_n)`` the solver covers (``(0, 1)`` or the model's range
        for a whole-range solver)."""
        return float(self.solver.times[0]), float(self.solver.times[-1])

    def pipeline_arguments(self, num_inference_steps: int | None = None) -> dict[str, Any]:
        """Pipeline arguments under which the pipeline runs exactly this solver's steps.

        A whole-range solver: ``num_inference_steps = nfe``. A solver for a span that starts
        inside the path: ``strength`` (image-to-image, inpainting) near its start's noise level
        with ``int(num_inference_steps * strength) = nfe`` (the pipelines' own rule); an SDXL
        refiner takes ``denoising_start = span[0]`` instead. One that ends inside:
        ``denoising_end`` (an SDXL base). The solver's noise levels are its own whatever the
        strength: the strength only says how many of the schedule's steps run.
        """
        n = self.solver.nfe
        out: dict[str, Any] = {"num_inference_steps": n}
        cfg = self.config
        times = self.solver.times
        if self._starts_inside:
            k0 = float(diffusers_timestep(cfg.prediction_type, cfg.num_train_timesteps, times[:1]))
            want = k0 / self._top_timestep
            steps, strength = _strength_for(n, want, num_inference_steps)
            out.update(num_inference_steps=steps, strength=strength)
        if self._ends_inside:
            out["denoising_end"] = float(times[-1])
        return out

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
        asked = int(asked)
        partial = self._starts_inside or self._ends_inside
        if asked != n and not (partial and asked > n):
            raise DiffusersError(
                f"this BNSScheduler holds a solver trained for {n} steps (NFE {n}); it cannot run"
                f" num_inference_steps={asked}. Call the pipeline with num_inference_steps={n},"
                f" or distill a solver for {asked} steps (bns distill --nfe {asked})."
            )
        cfg = self.config
        times = self.solver.times
        # A span's solver sits inside a longer schedule, so that the pipeline's own slicing
        # (strength, denoising_start / denoising_end) picks exactly its steps: the padding
        # timesteps before (above) or after (below) it are never run.
        self._pad = asked - n
        top = self._top_timestep
        k = diffusers_timestep(cfg.prediction_type, cfg.num_train_timesteps, times)
        if self._pad and self._starts_inside:
            k = torch.cat([torch.linspace(top, float(k[0]), self._pad + 1, dtype=k.dtype)[:-1], k])
        elif self._pad:
            k = torch.cat([k, torch.linspace(float(k[-1]), 0, self._pad + 1, dtype=k.dtype)[1:]])
        t = flow_time(cfg.prediction_type, cfg.num_train_timesteps, k)
        lo = self._pad if self._starts_inside else 0
        t[lo : lo + n + 1] = times  # the solver's own times, not their round trip
        steps = torch.cat([k[: lo + n], k[lo + n + 1 :]])  # all but the solver's end
        self.timesteps = steps.to(torch.float32).to(device)
        sig = noise_level(self.bns_schedule, t)  # flow matching's sigma, or Karras'
        if self.solver.meta.get("end") == "data":
            sig = sig.clone()
            sig[lo + n] = 0.0  # the last step lands on the data (bns.solvers.ends)
        self.sigmas = sig.to(torch.float32).to(device)
        self.num_inference_steps = asked
        self._check_guidance()
        self._step_index = None
        self._begin_index = None
        self._noised = False
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
        if self.num_inference_steps is None:
            raise DiffusersError("call set_timesteps before step")
        got = float(timestep.flatten()[0]) if isinstance(timestep, Tensor) else float(timestep)
        if self._step_index is None:
            self._start_run(got)
        i = self._step_index - self._first_index()  # the solver's step
        n = self.solver.nfe
        if i >= n:
            raise DiffusersError(f"the solver has {n} steps; step was called a {i + 1}th time")
        expected = float(self.timesteps[self._step_index])
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
            self._offset = self._returned = None
        x = sample.to(self._x0.dtype)
        if x.shape != self._x0.shape:
            raise DiffusersError(
                f"the sample changed shape during the run: {list(self._x0.shape)} then"
                f" {list(x.shape)}"
            )
        if i > 0:
            self._follow_changes(sample, x)
        self._us[i] = self._velocity(model_output.to(x.dtype), x, i).reshape(-1)
        # bns.sample's own update (one product over the velocities so far): the same numbers.
        b = self.solver.b[i, : i + 1].to(device=x.device, dtype=x.dtype)
        nxt = ns_step(self._x0.reshape(-1), self._us[: i + 1], float(self.solver.a[i]), b)
        self._x_ns = nxt
        if self._offset is not None:
            nxt = nxt + self._offset
        self._step_index += 1
        prev = nxt.reshape(x.shape).to(model_output.dtype)
        self._returned = prev
        if not return_dict:
            return (prev,)
        return SchedulerOutput(prev_sample=prev)

    def _start_run(self, timestep: float) -> None:
        """The first step of a run: where in the schedule it begins (set_begin_index, else the
        timestep's place), refused unless that is the solver's first step."""
        first = self._first_index()
        if self._begin_index is not None:
            start = self._begin_index
        else:
            near = torch.isclose(
                self.timesteps.double().cpu(),
                torch.tensor(timestep, dtype=torch.float64),
                rtol=1e-5,
                atol=1e-3,
            )
            found = torch.nonzero(near).flatten()
            if found.numel() == 0:
                raise DiffusersError(
                    f"timestep {timestep:.6g} is not in this schedule"
                    f" ({self.timesteps[first]:.6g} first): a BNS solver must run all its steps"
                    " in order"
                )
            start = int(found[0])
        if start != first:
            raise DiffusersError(self._wrong_start(start))
        if self._starts_inside and not self._noised and _pipeline_lacks(self, "denoising_start"):
            raise DiffusersError(
                "this solver starts inside the path, from a noised image, but the pipeline did"
                " not noise one (add_noise): inpainting at strength 1.0 starts from pure noise."
                f" Call it with {_as_call(self.pipeline_arguments())}"
            )
        self._step_index = start

    def _follow_changes(self, sample: Tensor, x: Tensor) -> None:
        """Keep what the pipeline changed in the latents between steps (inpainting puts the
        noised image back outside its mask): the NS update is carried on from the changed
        values there. Elsewhere the sample is what the last step returned, and the update runs
        on from the exact state, so rounding to half precision does not accumulate."""
        if self._returned is None or sample.shape != self._returned.shape:
            return
        changed = (sample != self._returned).reshape(-1)
        if not bool(changed.any()):
            return
        gap = x.reshape(-1) - self._x_ns
        base = self._offset if self._offset is not None else torch.zeros_like(gap)
        self._offset = torch.where(changed, gap, base)

    def _velocity(self, f: Tensor, x: Tensor, i: int) -> Tensor:
        prediction = self.config.prediction_type
        if prediction == "flow":
            return -f  # dx/dt = -dx/dsigma
        t = self.solver.times[i].reshape(1).to(x.device)
        beta, gamma = prediction_coefficients(BNS_PREDICTION_OF[prediction], self.bns_schedule, t)
        return beta.to(x.dtype) * x + gamma.to(x.dtype) * f

    def add_noise(
        self, original_samples: Tensor, noise: Tensor, timesteps: Tensor | float
    ) -> Tensor:
        """The forward process at diffusers ``timesteps``: ``alpha x + sigma noise``.

        As diffusers' schedulers: for a DDPM schedule, ``alpha = sqrt(alphas_cumprod[k])`` and
        ``sigma = sqrt(1 - alphas_cumprod[k])`` at integer timesteps ``k`` (DDPMScheduler's
        ``add_noise``); for flow matching, ``alpha = 1 - sigma`` with ``sigma = k / N``
        (FlowMatchEulerDiscreteScheduler's ``scale_noise``). Fractional timesteps (this
        scheduler's own) take the noise level its steps use there (the bns schedule). One
        timestep per batch element, or one for all; the result has the sample's device and
        dtype.
        """
        alpha, sigma = self._forward_coefficients(timesteps, original_samples)
        self._noised = True
        return alpha * original_samples + sigma * noise

    def scale_noise(self, sample: Tensor, timestep: Tensor | float, noise: Tensor) -> Tensor:
        """:meth:`add_noise` in the argument order of FlowMatchEulerDiscreteScheduler's
        ``scale_noise`` (what flow-matching pipelines call)."""
        return self.add_noise(sample, noise, timestep)

    def _forward_coefficients(
        self, timesteps: Tensor | float, sample: Tensor
    ) -> tuple[Tensor, Tensor]:
        cfg = self.config
        # In float64 on the CPU (timesteps are few; MPS has no float64), then to the sample's.
        k = torch.as_tensor(timesteps).detach().to("cpu", torch.float64).flatten()
        top = self._top_timestep
        if k.numel() == 0 or not torch.all((k >= 0) & (k <= top)):
            got = f"{float(k.min()):g} to {float(k.max()):g}" if k.numel() else "none"
            raise DiffusersError(
                f"add_noise takes timesteps in [0, {top}] (num_train_timesteps ="
                f" {cfg.num_train_timesteps}), got {got}"
            )
        v = self.bns_schedule(flow_time(cfg.prediction_type, cfg.num_train_timesteps, k))
        # One coefficient per batch element (or one for all), broadcast over the other dims.
        shape = (-1,) + (1,) * (sample.dim() - 1)
        alpha = v.alpha.reshape(shape).to(device=sample.device, dtype=sample.dtype)
        sigma = v.sigma.reshape(shape).to(device=sample.device, dtype=sample.dtype)
        return alpha, sigma


def _span_of(solver: NSSolver) -> tuple[bool, bool]:
    """Whether the solver's span (``meta["span"]``, :meth:`bns.Model.span`) starts and ends
    inside the path; ``(False, False)`` for a whole-range solver."""
    span = solver.meta.get("span")
    if not isinstance(span, dict):
        return False, False
    try:
        ends_inside = float(span["t_range"][1]) < float(span["whole_range"][1])
    except (KeyError, TypeError, ValueError, IndexError):
        raise DiffusersError("the solver's meta span is malformed") from None
    return span.get("start") == "noised data", ends_inside


def _runs(m: int, s: float) -> set[int]:
    """How many of ``m`` steps a pipeline runs at ``strength`` ``s``, by both of diffusers'
    rules: ``int(m * s)`` (SD, SDXL, inpainting) and ``m - int(m - m * s)`` (SD3, Flux)."""
    return {min(int(m * s), m), m - int(max(m - min(m * s, m), 0))}


def _strength_for(n: int, want: float, steps: int | None) -> tuple[int, float]:
    """``(num_inference_steps, strength)`` under which every pipeline runs ``n`` steps
    (:func:`_runs`), ``strength`` as close to ``want`` as the step counts from ``n`` to
    ``8 n`` allow (both rules agree where ``m * strength`` is ``n`` exactly)."""
    if steps is not None and steps < n:
        raise DiffusersError(f"num_inference_steps must be at least the solver's {n}")
    best: tuple[float, int, float] | None = None
    for m in [steps] if steps is not None else range(n, 8 * n + 1):
        for s in (round(n / m, 4), n / m):
            if _runs(m, s) == {n} and (best is None or abs(s - want) < best[0] - 1e-12):
                best = (abs(s - want), m, s)
                break
    if best is None:
        raise DiffusersError(f"no strength runs {n} of {steps} steps in every pipeline")
    return best[1], best[2]


def _as_call(arguments: dict[str, Any]) -> str:
    shown = {k: v for k, v in arguments.items() if k in ("num_inference_steps", "strength")}
    return ", ".join(
        f"{k}={v:.6g}" if isinstance(v, float) else f"{k}={v}" for k, v in shown.items()
    )


def _pipeline_locals(scheduler: Any, depth: int = 6) -> dict[str, Any] | None:
    """The locals of the pipeline call that is using ``scheduler`` (None where none is found)."""
    frame = inspect.currentframe()
    try:
        for _ in range(depth):
            frame = frame.f_back if frame is not None else None
            if frame is None:
                return None
            owner = frame.f_locals.get("self")
            if owner is not None and getattr(owner, "scheduler", None) is scheduler:
                return dict(frame.f_locals)
        return None
    except Exception:  # noqa: BLE001 - a frame we cannot read: nothing found
        return None
    finally:
        del frame


def _pipeline_lacks(scheduler: Any, name: str) -> bool:
    """Whether a pipeline call is using ``scheduler`` and was not given ``name`` (False where
    no pipeline call is found: a loop of the user's own)."""
    local = _pipeline_locals(scheduler)
    return local is not None and local.get(name) is None


def _pipeline_guidance(scheduler: Any, depth: int = 6) -> list[float]:
    """The classifier-free guidance scales of the pipeline call that is setting ``scheduler``'s
    timesteps, read from its frame (none where no pipeline call is found). diffusers' ``w <= 1``
    means no guidance, i.e. ``w = 1``; Flux's true CFG is ``true_cfg_scale`` with a negative
    prompt (its ``guidance_scale`` is an input of the network, not CFG); Wan 2.2 may guide its
    second expert with ``guidance_scale_2``."""

    def effective(w: Any) -> float:
        return float(w) if float(w) > 1 else 1.0

    local = _pipeline_locals(scheduler, depth + 1)  # + 1: seen from one call further in
    if local is None:
        return []
    owner = local["self"]
    try:
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
    except Exception:  # noqa: BLE001 - values we cannot read: no check rather than a failure
        return []


def _check_agree(
    from_meta: dict[str, Any], described: dict[str, Any], source: str = "the pipeline's scheduler"
) -> None:
    """Refuse a prediction type or DDPM schedule (of ``source``) other than the solver's model's."""
    if from_meta["prediction_type"] != described["prediction_type"]:
        raise DiffusersError(
            f"the solver was trained for a {from_meta['prediction_type']} model but"
            f" {source} says {described['prediction_type']}"
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
                f"the solver was trained on another alphas_cumprod than that of {source}"
            )
