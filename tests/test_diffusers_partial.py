"""Solvers for part of the path inside diffusers' own pipelines: image-to-image (``strength``),
inpainting, and SDXL's base/refiner split (``denoising_end`` / ``denoising_start``).

Each pipeline runs a :class:`BNSScheduler` holding a solver made for a span of the model
(:meth:`bns.Model.span`); its latents must be :func:`bns.sample`'s on the same span from the
same start. The start is what the pipeline's own ``add_noise`` / ``scale_noise`` made of its
input, recorded on the way.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

import bns

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from diffusers import (  # noqa: E402
    StableDiffusion3Img2ImgPipeline,
    StableDiffusionImg2ImgPipeline,
    StableDiffusionInpaintPipeline,
    StableDiffusionXLImg2ImgPipeline,
)
from diffusers.image_processor import VaeImageProcessor  # noqa: E402

# The tiny pipelines (tok, sd, sdxl, sd3) are fixtures of conftest.py, shared with the families'.
from test_diffusers_families import _close  # noqa: E402

from bns.integrations.diffusers import BNSScheduler, DiffusersError, model_from_pipeline  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPTS = ["a cat", "a red dog"]
W = 3.0


def _span_solver(model: bns.Model, seed: int, method=bns.solvers.midpoint, steps: int = 2):
    """A classical solver on ``model``'s span with every coefficient perturbed (it uses the
    whole history, as BNS does), recording the span as bns.distill does."""
    solver = method(bns.grids.uniform(steps, model.t_range))
    g = torch.Generator().manual_seed(seed)
    n = solver.nfe
    a = solver.a + 0.01 * torch.randn(n, generator=g, dtype=torch.float64)
    b = solver.b + 0.01 * torch.tril(torch.randn(n, n, generator=g, dtype=torch.float64))
    meta = {"model_settings": model.settings(), "span": model.span_info(), "end": "range"}
    return bns.NSSolver(solver.times.clone(), a, b, meta)


class _Recorded(BNSScheduler):
    """A BNSScheduler that keeps what its first add_noise made (the run's start)."""

    def set_timesteps(self, *args, **kw):
        super().set_timesteps(*args, **kw)
        self.recorded = None

    def add_noise(self, original_samples, noise, timesteps):
        out = super().add_noise(original_samples, noise, timesteps)
        if self.recorded is None:
            self.recorded = (original_samples.clone(), noise.clone(), out.clone())
        return out


def _scheduler(solver, pipe) -> _Recorded:
    sched = BNSScheduler.from_solver(solver, pipe.scheduler)
    return _Recorded.from_config(sched.config)


def _latent(seed: int, shape=(2, 4, 8, 8)) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _without_vae(pipe):
    """The tiny pipelines have no VAE. Given 4-channel latents as the image, the image-to-image
    and inpainting pipelines take them as they are and read only the VAE's config: a stand-in
    config (scaling 1, no shift) and image processors that know the latents' channels."""
    config = SimpleNamespace(latent_channels=4, scaling_factor=1.0, shift_factor=0.0)
    config.force_upcast = False
    object.__setattr__(pipe, "vae", SimpleNamespace(config=config, dtype=torch.float32))
    pipe.image_processor = VaeImageProcessor(vae_scale_factor=8, vae_latent_channels=4)
    return pipe


def _run(pipe, **call) -> torch.Tensor:
    with torch.no_grad():
        out = pipe(output_type="latent", **call)
    return out.images


def _reference(model, x_start, solver, guidance=W) -> torch.Tensor:
    with torch.no_grad():
        return bns.sample(model, x_start.double(), solver, y=torch.arange(2), guidance=guidance)


# -- image-to-image ------------------------------------------------------------------------------


def test_sd_img2img_runs_the_span_solver(sd):
    model = model_from_pipeline(sd, prompts=PROMPTS).span(0.4)
    solver = _span_solver(model, seed=1)
    pipe = StableDiffusionImg2ImgPipeline(**sd.components)
    pipe.scheduler = _scheduler(solver, sd)
    call = pipe.scheduler.pipeline_arguments()
    assert call["num_inference_steps"] > solver.nfe and 0.55 < call["strength"] < 0.65
    image = _latent(2)  # 4 channels: the pipeline takes it as latents (no VAE)
    out = _run(pipe, prompt=PROMPTS, image=image, guidance_scale=W, generator=None, **call)
    original, noise, start = pipe.scheduler.recorded
    assert torch.equal(original, image)
    # The pipeline noised its input to the span's start, as bns does.
    _close(start, model.start_state(image.double(), noise.double()), 1e-6)
    _close(out, _reference(model, start, solver))
    # Any step count works where strength picks the solver's steps.
    pipe.scheduler = _scheduler(solver, sd)
    again = _run(
        pipe,
        prompt=PROMPTS,
        image=image,
        guidance_scale=W,
        **pipe.scheduler.pipeline_arguments(num_inference_steps=12),
    )
    _close(again, _reference(model, pipe.scheduler.recorded[2], solver))


def test_sd3_img2img_runs_the_span_solver(sd3):
    model = model_from_pipeline(sd3, prompts=PROMPTS).span(0.3)
    solver = _span_solver(model, seed=3)
    pipe = _without_vae(StableDiffusion3Img2ImgPipeline(**sd3.components))
    sched = BNSScheduler.from_solver(solver, sd3.scheduler)
    recorded = {}

    def scale_noise(sample, timestep, noise):
        recorded["start"] = BNSScheduler.scale_noise(sched, sample, timestep, noise)
        recorded["args"] = (sample.clone(), noise.clone())
        return recorded["start"]

    sched.scale_noise = scale_noise
    pipe.scheduler = sched
    image = _latent(4)
    out = _run(pipe, prompt=PROMPTS, image=image, guidance_scale=W, **sched.pipeline_arguments())
    sample, noise = recorded["args"]
    _close(recorded["start"], model.start_state(sample.double(), noise.double()), 1e-6)
    _close(out, _reference(model, recorded["start"], solver))


def test_img2img_refusals(sd):
    full = model_from_pipeline(sd, prompts=PROMPTS)
    pipe = StableDiffusionImg2ImgPipeline(**sd.components)
    image = _latent(5)
    # A solver from pure noise cannot start part-way.
    whole = _span_solver(full, seed=2)
    whole.meta.pop("span")
    pipe.scheduler = BNSScheduler.from_solver(whole, sd.scheduler)
    with pytest.raises(DiffusersError, match="runs from pure noise"):
        _run(pipe, prompt=PROMPTS, image=image, strength=0.5, num_inference_steps=whole.nfe)
    with pytest.raises(DiffusersError, match="cannot run num_inference_steps=8"):
        _run(pipe, prompt=PROMPTS, image=image, strength=0.5, num_inference_steps=2 * whole.nfe)
    # A span solver with a strength that runs another number of steps: the message says how.
    solver = _span_solver(full.span(0.4), seed=1)
    pipe.scheduler = BNSScheduler.from_solver(solver, sd.scheduler)
    good = pipe.scheduler.pipeline_arguments()
    with pytest.raises(DiffusersError, match=f"num_inference_steps={good['num_inference_steps']}"):
        _run(pipe, prompt=PROMPTS, image=image, strength=0.3, num_inference_steps=10)
    with pytest.raises(DiffusersError, match="trained for 4 steps"):  # fewer than its steps
        _run(pipe, prompt=PROMPTS, image=image, strength=1.0, num_inference_steps=3)
    # Text-to-image with a solver that starts from a noised image.
    with pytest.raises(DiffusersError, match="did not noise"):
        _run(sd_with(sd, pipe.scheduler), prompt=PROMPTS, num_inference_steps=solver.nfe)


def sd_with(sd, scheduler):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(**sd.components)
    pipe.scheduler = scheduler
    return pipe


# -- inpainting ----------------------------------------------------------------------------------


def test_sd_inpainting_keeps_the_image_outside_the_mask(sd):
    """A 4-channel UNet: the pipeline puts the noised image back outside the mask before each
    step. With the mask everywhere that is image-to-image (bns.sample); with a mask, the
    solver's increments carry on from the pipeline's latents: for Euler that is Euler on them,
    written out here."""
    model = model_from_pipeline(sd, prompts=PROMPTS).span(0.5)
    pipe = _without_vae(StableDiffusionInpaintPipeline(**sd.components))
    image = _latent(6)
    everywhere = torch.ones(2, 1, 64, 64)  # pixels: 8 per latent
    solver = _span_solver(model, seed=7)
    pipe.scheduler = _scheduler(solver, sd)
    call = dict(prompt=PROMPTS, image=image, guidance_scale=W, height=64, width=64)
    call.update(pipe.scheduler.pipeline_arguments())
    out = _run(pipe, mask_image=everywhere, masked_image_latents=0 * image, **call)
    _close(out, _reference(model, pipe.scheduler.recorded[2], solver))

    euler = bns.solvers.euler(bns.grids.uniform(3, model.t_range))
    euler.meta = {"model_settings": model.settings(), "span": model.span_info()}
    mask = torch.zeros(2, 1, 8, 8)
    mask[..., 2:6, 1:5] = 1.0
    pipe.scheduler = _scheduler(euler, sd)
    call.update(pipe.scheduler.pipeline_arguments())
    pixels = mask.repeat_interleave(8, -1).repeat_interleave(8, -2)
    out = _run(pipe, mask_image=pixels, masked_image_latents=image * (1 - mask), **call)
    _, noise, x = pipe.scheduler.recorded
    t = euler.times
    y = torch.arange(2)
    x = x.double()
    with torch.no_grad():
        for i in range(euler.nfe):
            if i > 0:  # the pipeline's blend: the image noised to t_i outside the mask
                kept = model.span(float(t[i])).start_state(image.double(), noise.double())
                x = mask * x + (1 - mask) * kept
            u = model.velocity(x, t[i].reshape(1).expand(2), y, W)
            x = x + (t[i + 1] - t[i]) * u
    x = mask * x + (1 - mask) * image  # and the image itself after the last step
    _close(out, x)
    assert (out - _reference(model, pipe.scheduler.recorded[2], euler)).abs().max() > 1e-3


def test_inpainting_at_strength_one_is_refused(sd):
    model = model_from_pipeline(sd, prompts=PROMPTS).span(0.5)
    pipe = _without_vae(StableDiffusionInpaintPipeline(**sd.components))
    pipe.scheduler = BNSScheduler.from_solver(_span_solver(model, seed=8), sd.scheduler)
    with pytest.raises(DiffusersError, match="strength 1.0 starts from pure noise"):
        _run(
            pipe,
            prompt=PROMPTS,
            image=_latent(6),
            mask_image=torch.ones(2, 1, 64, 64),
            masked_image_latents=torch.zeros(2, 4, 8, 8),
            strength=1.0,
            num_inference_steps=4,
            height=64,
            width=64,
        )


# -- SDXL base and refiner -----------------------------------------------------------------------


def test_sdxl_base_and_refiner_split(sdxl):
    """The base runs ``[0, 0.8]`` with ``denoising_end=0.8`` and hands its latents to the
    refiner (here an image-to-image pipeline of the same components), which runs ``[0.8, 1]``
    with ``denoising_start=0.8`` and adds no noise: each part equals bns.sample on its span."""
    full = model_from_pipeline(sdxl, prompts=PROMPTS)
    base_model, refiner_model = full.span(None, 0.8), full.span(0.8)
    base_solver = _span_solver(base_model, seed=9, steps=3)
    refiner_solver = _span_solver(refiner_model, seed=10)
    base_sched = BNSScheduler.from_solver(base_solver, sdxl.scheduler)
    refiner_sched = BNSScheduler.from_solver(refiner_solver, sdxl.scheduler)
    base_call, refiner_call = base_sched.pipeline_arguments(), refiner_sched.pipeline_arguments()
    assert base_call["denoising_end"] == pytest.approx(0.8)
    assert refiner_sched.span[0] == pytest.approx(0.8) and "strength" in refiner_call
    x0 = _latent(11)
    old = sdxl.scheduler
    try:
        sdxl.scheduler = base_sched
        handed = _run(
            sdxl,
            prompt=PROMPTS,
            latents=x0,
            guidance_scale=W,
            num_inference_steps=base_solver.nfe + 5,  # padded after the hand-over
            denoising_end=0.8,
        )
    finally:
        sdxl.scheduler = old
    _close(handed, _reference(base_model, x0, base_solver))
    refiner = _without_vae(StableDiffusionXLImg2ImgPipeline(**sdxl.components))
    refiner.scheduler = refiner_sched
    out = _run(
        refiner,
        prompt=PROMPTS,
        image=handed,
        guidance_scale=W,
        num_inference_steps=refiner_solver.nfe + 6,  # padded before the hand-over
        denoising_start=0.8,
    )
    _close(out, _reference(refiner_model, handed, refiner_solver))
    # The refiner's solver at another switch point is refused.
    refiner.scheduler = BNSScheduler.from_solver(refiner_solver, sdxl.scheduler)
    with pytest.raises(DiffusersError, match="began at step"):
        _run(refiner, prompt=PROMPTS, image=handed, num_inference_steps=10, denoising_start=0.6)


# -- the schedule around a span ------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 2, 3, 4, 6, 8, 12])
def test_pipeline_arguments_run_the_solvers_steps_by_every_rule(n):
    """The strength found runs n steps by both of diffusers' rules (SD/SDXL/inpainting
    ``int(m s)``, SD3/Flux ``m - int(m - m s)``), as near the wanted noise level as they allow."""
    from bns.integrations.diffusers.scheduler import _strength_for

    for want in [0.05, 0.2, 0.333, 0.5, 0.6, 0.77, 0.95, 1.0]:
        m, s = _strength_for(n, want, None)
        assert n <= m <= 8 * n and 0 < s <= 1
        assert min(int(m * s), m) == n
        assert m - int(max(m - min(m * s, m), 0)) == n
        assert abs(s - want) <= 1 / n  # within one step of the wanted level
    with pytest.raises(DiffusersError, match="at least the solver's"):
        _strength_for(n + 1, 0.5, n)


@pytest.mark.parametrize("kind", ["start", "end"])
def test_padded_schedule_keeps_the_solvers_steps(sd, kind):
    model = model_from_pipeline(sd, prompts=PROMPTS)
    span = model.span(0.3) if kind == "start" else model.span(None, 0.6)
    solver = _span_solver(span, seed=12)
    sched = BNSScheduler.from_solver(solver, sd.scheduler)
    sched.set_timesteps(solver.nfe)
    own = sched.timesteps.clone()
    sched.set_timesteps(solver.nfe + 5)
    ts, sig = sched.timesteps, sched.sigmas
    assert len(ts) == solver.nfe + 5 and len(sig) == len(ts) + 1
    assert torch.all(ts[1:] < ts[:-1]) and torch.all(sig[1:] < sig[:-1])
    part = ts[5:] if kind == "start" else ts[: solver.nfe]
    assert torch.equal(part, own)
    if kind == "start":
        assert float(ts[0]) == 999.0
        with pytest.raises(DiffusersError, match="began at step 0"):
            sched.set_begin_index(0)
        sched.set_begin_index(5)
    else:
        assert float(ts[-1]) == 0.0
        with pytest.raises(DiffusersError, match="runs from pure noise"):
            sched.set_begin_index(2)
