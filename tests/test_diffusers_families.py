"""model_from_pipeline and BNSScheduler on the diffusers pipeline families people run.

Every pipeline is tiny, random and built offline from configs: Stable Diffusion 1.x/2.x
(epsilon and v-prediction, "scaled_linear" betas), SDXL (two CLIP encoders, pooled embeddings,
time ids), SD3, Flux (CLIP + T5, packed latents, embedded guidance, true CFG), PixArt-alpha /
Sigma (T5 with attention masks, learned variance) and Wan 2.1 / 2.2 video (UMT5, 5-D latents,
UniPC in flow mode, two experts). CLIP uses a character-level vocabulary written to files, T5 /
UMT5 a character-level Unigram vocabulary built in memory (transformers' T5Tokenizer).

Per family: the adapter against the pipeline's own denoising loop (its stock DDIM or
flow-matching Euler scheduler against bns's DDIM or Euler on the same grid, same x0, same
guidance), a BNSScheduler inside the pipeline's ``__call__`` against bns.sample on the adapter,
save / reload of the pipeline with the BNSScheduler, the fingerprint of the saved folder, and
the command line on saved SD and Flux folders; then prompt splits for every text family.
"""

from __future__ import annotations

import json

import pytest
import torch

import bns

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

from diffusers import (  # noqa: E402
    DDIMScheduler,
    DiffusionPipeline,
    DiTPipeline,
    DiTTransformer2DModel,
    DPMSolverMultistepScheduler,
    FlowMatchEulerDiscreteScheduler,
    PixArtAlphaPipeline,
    PixArtSigmaPipeline,
    PNDMScheduler,
    UniPCMultistepScheduler,
    WanTransformer3DModel,
)

from bns.integrations.diffusers import (  # noqa: E402
    BNSScheduler,
    DiffusersError,
    model_from_pipeline,
    tiny,  # noqa: E402
)
from bns.integrations.diffusers._conventions import (  # noqa: E402
    describe_scheduler,
    is_flow_scheduler,
)
from bns.schedules import CondOT, DiscreteVP  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def sd_v(tok):
    return tiny.sd(tok, "v_prediction")


@pytest.fixture(scope="module")
def flux(tok):
    return tiny.flux(tok)


@pytest.fixture(scope="module")
def pixart():
    return tiny.pixart()


@pytest.fixture(scope="module")
def wan():
    return tiny.wan()


# -- helpers ------------------------------------------------------------------------------------

PROMPTS = ["a cat", "a red dog", "sky"]
NEG = "blurry"
W = 3.0  # classifier-free guidance in the tests


def _bns_like(solver: bns.NSSolver, seed: int = 0) -> bns.NSSolver:
    """A classical solver with every coefficient perturbed: uses the whole history, as BNS does."""
    g = torch.Generator().manual_seed(seed)
    n = solver.nfe
    a = solver.a + 0.01 * torch.randn(n, generator=g, dtype=torch.float64)
    b = solver.b + 0.01 * torch.tril(torch.randn(n, n, generator=g, dtype=torch.float64))
    return bns.NSSolver(solver.times.clone(), a, b, {"solver": "perturbed"})


def _noise(shape, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _latents(pipe, **call) -> torch.Tensor:
    """Run a pipeline to its final latents (no decoding)."""
    with torch.no_grad():
        out = pipe(output_type="latent", **call)
    return out.frames if hasattr(out, "frames") else out.images


class _Scheduler:
    """``with _Scheduler(pipe, scheduler):`` swaps the pipeline's scheduler for a block."""

    def __init__(self, pipe, scheduler):
        self.pipe, self.scheduler = pipe, scheduler

    def __enter__(self):
        self.old = self.pipe.scheduler
        self.pipe.scheduler = self.scheduler
        return self.scheduler

    def __exit__(self, *exc):
        self.pipe.scheduler = self.old


def _close(out: torch.Tensor, ref: torch.Tensor, tol: float = 1e-5) -> None:
    """Agreement relative to the latents' size (random tiny nets make them large)."""
    assert out.shape == ref.shape
    err = float((out.double() - ref.double()).abs().max())
    assert err <= tol * max(1.0, float(ref.abs().max())), err


def _bns_scheduler_run(pipe, model, solver, x0, y, guidance, **call) -> None:
    """A BNSScheduler inside the pipeline's own __call__ gives bns.sample's latents."""
    with _Scheduler(pipe, BNSScheduler.from_solver(solver, pipe.scheduler)):
        out = _latents(pipe, latents=x0, num_inference_steps=solver.nfe, **call)
    with torch.no_grad():
        ref = bns.sample(model, x0, solver, y=y, guidance=guidance)
    _close(out, ref)
    with torch.no_grad():  # guidance (or the conditioning) matters here
        plain = bns.sample(model, x0, solver, y=y)
    assert (plain - ref).abs().max() > 1e-3


def _from_folder(path, with_bns_scheduler: bool = True):
    """A saved pipeline, reloaded as BNSScheduler's documentation says (absent components,
    saved as [null, null], passed as None)."""
    index = json.loads((path / "model_index.json").read_text())
    kw = {k: None for k, v in index.items() if isinstance(v, list) and v[:1] == [None]}
    if with_bns_scheduler:
        kw["scheduler"] = BNSScheduler.from_pretrained(path, subfolder="scheduler")
    return DiffusionPipeline.from_pretrained(path, **kw)


def _save_and_reload(tmp_path, pipe, model, solver, x0, build, **call) -> None:
    """save_pretrained with the BNSScheduler, reload: the same latents; and the folder is the
    same model (fingerprint) as the object."""
    with _Scheduler(pipe, BNSScheduler.from_solver(solver, pipe.scheduler)):
        before = _latents(pipe, latents=x0, num_inference_steps=solver.nfe, **call)
        pipe.save_pretrained(tmp_path / "pipe")
    again = _from_folder(tmp_path / "pipe")
    assert isinstance(again.scheduler, BNSScheduler)
    assert torch.equal(again.scheduler.solver.b, solver.b)
    after = _latents(again, latents=x0, num_inference_steps=solver.nfe, **call)
    # Reloaded CLIP encoders may round differently (1e-7 in SDXL's pooled embeddings).
    _close(after, before)
    assert build(str(tmp_path / "pipe")).fingerprint() == model.fingerprint()


def _stock_ddim_grid(pipe) -> torch.Tensor:
    """The DDIM grid of timesteps k the stock scheduler just ran, then its final k = 0
    (set_alpha_to_one=False: the last step lands on alphas_cumprod[0])."""
    ks = pipe.scheduler.timesteps.double()
    return torch.cat([ks, ks.new_zeros(1)])


# -- Stable Diffusion 1.x / 2.x ----------------------------------------------------------------


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_sd_adapter_reads_the_pipeline(sd, sd_v, prediction):
    pipe = sd if prediction == "epsilon" else sd_v
    model = model_from_pipeline(pipe, prompts=PROMPTS, negative_prompt=NEG)
    assert model.prediction == ("eps" if prediction == "epsilon" else "v")
    assert isinstance(model.schedule, DiscreteVP)
    assert torch.equal(model.schedule.alphas_cumprod, pipe.scheduler.alphas_cumprod.double())
    assert model.sample_shape == (4, 8, 8) and model.num_classes == 3 and model.null_label == 3
    with torch.no_grad():
        pe, ne = pipe.encode_prompt(PROMPTS, "cpu", 1, True, negative_prompt=[NEG] * 3)
    assert torch.equal(model.net.embeds[:3], pe) and torch.equal(model.net.embeds[3], ne[0])
    assert "embeds" in type(model.net).bns_conditioning


def test_sd_schedulers_are_the_same_model(sd):
    """DDIM, PNDM and DPM-Solver configs of SD: one alphas_cumprod, one model."""
    fingerprints = set()
    for cls in (DDIMScheduler, PNDMScheduler, DPMSolverMultistepScheduler):
        with _Scheduler(sd, tiny.sd_scheduler(cls=cls)):
            fingerprints.add(model_from_pipeline(sd, prompts=PROMPTS).fingerprint())
    assert len(fingerprints) == 1


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_sd_stock_ddim_equals_bns_ddim(sd, sd_v, prediction):
    """The pipeline's own loop with its DDIM (leading spacing, steps_offset 1: k = 801, 601,
    ..., 1, then alphas_cumprod[0]) is bns's DDIM on that grid, guided the same way."""
    pipe = sd if prediction == "epsilon" else sd_v
    ref, x0 = _stock_ddim_against_bns(pipe, seed=0, steps=5, grid=[801, 601, 401, 201, 1, 0])
    assert (ref - x0).abs().max() > 0.1


def _stock_ddim_against_bns(pipe, seed: int, steps: int, grid=None):
    """The pipeline's own call with its stock DDIM against bns's DDIM on the same timesteps,
    two prompts, the negative prompt and guidance W: returns (bns's latents, x0)."""
    model = model_from_pipeline(pipe, prompts=PROMPTS[:2], negative_prompt=NEG)
    x0 = _noise((2, 4, 8, 8), seed)
    out = _latents(
        pipe,
        prompt=PROMPTS[:2],
        negative_prompt=[NEG] * 2,
        guidance_scale=W,
        latents=x0,
        num_inference_steps=steps,
    )
    ks = _stock_ddim_grid(pipe)
    if grid is not None:
        assert ks.tolist() == grid
    solver = bns.solvers.ddim(model.schedule.flow_time(ks), model.schedule)
    with torch.no_grad():
        ref = bns.sample(model, x0, solver, y=torch.arange(2), guidance=W)
    _close(out, ref)
    return ref, x0


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_sd_pipeline_with_bns_scheduler_equals_bns_sample(sd, sd_v, prediction):
    pipe = sd if prediction == "epsilon" else sd_v
    model = model_from_pipeline(pipe, prompts=PROMPTS, negative_prompt=NEG)
    solver = _bns_like(bns.solvers.midpoint(bns.grids.uniform(2)), seed=1)
    x0 = _noise((3, 4, 8, 8), 1)
    _bns_scheduler_run(
        pipe,
        model,
        solver,
        x0,
        torch.arange(3),
        W,
        prompt=PROMPTS,
        negative_prompt=[NEG] * 3,
        guidance_scale=W,
    )


def test_sd_guidance_distilled_unet_embeds_the_guidance(tok):
    """An LCM-style UNet (time_cond_proj_dim) takes w as an input: embedded_guidance, no CFG."""
    pipe = tiny.sd(tok, time_cond_proj_dim=8)
    model = model_from_pipeline(pipe, prompts=PROMPTS[:1], embedded_guidance=4.0)
    other = model_from_pipeline(pipe, prompts=PROMPTS[:1], embedded_guidance=2.0)
    assert model.fingerprint() != other.fingerprint()
    solver = _bns_like(bns.solvers.euler(bns.grids.uniform(3)), seed=2)
    x0 = _noise((1, 4, 8, 8), 2)
    with _Scheduler(pipe, BNSScheduler.from_solver(solver, pipe.scheduler)):
        out = _latents(
            pipe, prompt=PROMPTS[:1], guidance_scale=4.0, latents=x0, num_inference_steps=3
        )
    with torch.no_grad():
        ref = bns.sample(model, x0, solver, y=torch.tensor([0]))
        off = bns.sample(other, x0, solver, y=torch.tensor([0]))
    _close(out, ref)
    assert (off - ref).abs().max() > 1e-4
    with pytest.raises(DiffusersError, match="time_cond_proj_dim"):
        model_from_pipeline(tiny.sd(tok), prompts=PROMPTS[:1], embedded_guidance=4.0)


def test_sd_save_and_reload_with_bns_scheduler(tmp_path, sd):
    model = model_from_pipeline(sd, prompts=PROMPTS[:2])
    solver = _bns_like(bns.solvers.euler(bns.grids.uniform(3)), seed=3)
    x0 = _noise((2, 4, 8, 8), 3)
    _save_and_reload(
        tmp_path,
        sd,
        model,
        solver,
        x0,
        lambda path: model_from_pipeline(path, prompts=PROMPTS[:2]),
        prompt=PROMPTS[:2],
        guidance_scale=W,
    )


# -- SDXL ---------------------------------------------------------------------------------------


def test_sdxl_adapter_reads_the_pipeline(sdxl):
    model = model_from_pipeline(sdxl, prompts=PROMPTS)
    net = model.net
    assert model.prediction == "eps" and model.sample_shape == (4, 8, 8)
    # The default call: 64 x 64 pixels (sample_size 8, VAE factor 8), no crop.
    assert net.time_ids.tolist() == [[64, 64, 0, 0, 64, 64]]
    with torch.no_grad():
        pe, ne, ppe, npe = sdxl.encode_prompt(prompt=PROMPTS, device="cpu")
    assert torch.equal(net.embeds[:3], pe) and torch.equal(net.pooled[:3], ppe)
    # No negative prompt: SDXL's force_zeros_for_empty_prompt makes the null branch zeros.
    assert not net.embeds[3].any() and not net.pooled[3].any()
    named = model_from_pipeline(sdxl, prompts=PROMPTS, negative_prompt="")
    assert named.net.embeds[3].any()
    big = model_from_pipeline(sdxl, prompts=PROMPTS, height=128, width=96)
    assert big.sample_shape == (4, 16, 12)
    assert big.net.time_ids.tolist() == [[128, 96, 0, 0, 128, 96]]
    assert big.fingerprint() != model.fingerprint()
    with pytest.raises(DiffusersError, match="pass height= and width="):
        model_from_pipeline(sdxl, prompts=PROMPTS, sample_shape=(4, 16, 16))


def test_sdxl_stock_ddim_equals_bns_ddim(sdxl):
    _stock_ddim_against_bns(sdxl, seed=4, steps=4)


def test_sdxl_pipeline_with_bns_scheduler_equals_bns_sample(sdxl):
    model = model_from_pipeline(sdxl, prompts=PROMPTS)  # the default (zero) negative branch
    solver = _bns_like(bns.solvers.heun(bns.grids.uniform(2)), seed=5)
    x0 = _noise((3, 4, 8, 8), 5)
    _bns_scheduler_run(
        sdxl, model, solver, x0, torch.arange(3), W, prompt=PROMPTS, guidance_scale=W
    )


def test_sdxl_save_and_reload_with_bns_scheduler(tmp_path, sdxl):
    model = model_from_pipeline(sdxl, prompts=PROMPTS[:1], negative_prompt=NEG)
    solver = _bns_like(bns.solvers.euler(bns.grids.uniform(2)), seed=6)
    _save_and_reload(
        tmp_path,
        sdxl,
        model,
        solver,
        _noise((1, 4, 8, 8), 6),
        lambda path: model_from_pipeline(path, prompts=PROMPTS[:1], negative_prompt=NEG),
        prompt=PROMPTS[:1],
        negative_prompt=[NEG],
        guidance_scale=W,
    )


# -- SD3 (the rest of its tests are in test_integrations_diffusers.py) --------------------------


def test_sd3_save_and_reload_with_bns_scheduler(tmp_path, sd3):
    model = model_from_pipeline(sd3, prompts=PROMPTS[:2], negative_prompt=NEG)
    solver = _bns_like(bns.solvers.euler(bns.grids.uniform(3)), seed=7)
    _save_and_reload(
        tmp_path,
        sd3,
        model,
        solver,
        _noise((2, 4, 8, 8), 7),
        lambda path: model_from_pipeline(path, prompts=PROMPTS[:2], negative_prompt=NEG),
        prompt=PROMPTS[:2],
        negative_prompt=NEG,
        guidance_scale=W,
        height=64,
        width=64,
    )


# -- Flux ---------------------------------------------------------------------------------------

FLUX = {"height": 64, "width": 64, "max_sequence_length": tiny.T5_LEN}


def _flux_model(pipe, prompts=PROMPTS, **kw):
    return model_from_pipeline(pipe, prompts=prompts, **{**FLUX, **kw})


def test_flux_adapter_reads_the_pipeline(flux, tok):
    model = _flux_model(flux, negative_prompt=NEG)
    net = model.net
    assert model.prediction == "velocity" and isinstance(model.schedule, CondOT)
    # Packed latents: 8 x 8 latent pixels in 2 x 2 patches of 4 channels.
    assert model.sample_shape == (16, 16) and model.num_classes == 3
    assert float(net.guidance) == 3.5  # the pipeline's default guidance_scale
    assert net.img_ids.shape == (16, 3) and net.txt_ids.shape == (tiny.T5_LEN, 3)
    with torch.no_grad():
        pe, ppe, _ = flux.encode_prompt(PROMPTS, None, max_sequence_length=tiny.T5_LEN)
        ne, npe, _ = flux.encode_prompt(NEG, None, max_sequence_length=tiny.T5_LEN)
    assert torch.equal(net.embeds[:3], pe) and torch.equal(net.pooled[:3], ppe)
    assert torch.equal(net.embeds[3], ne[0]) and torch.equal(net.pooled[3], npe[0])
    # The embedded guidance is part of the model; the prompts are not.
    other = _flux_model(flux, negative_prompt=NEG, embedded_guidance=5.0)
    assert other.fingerprint() != model.fingerprint()
    assert _flux_model(flux, prompts=["dog", "b", "c"]).fingerprint() == model.fingerprint()
    assert _flux_model(flux, height=128).sample_shape == (32, 16)  # 16 x 8 latent pixels
    with pytest.raises(DiffusersError, match="guidance_embeds"):
        _flux_model(tiny.flux(tok, guidance_embeds=False), embedded_guidance=3.5)
    assert _flux_model(tiny.flux(tok, guidance_embeds=False)).net.guidance is None


def test_flux_stock_flow_euler_equals_bns_euler(flux):
    """The pipeline's own loop (dynamically shifted FlowMatchEuler, embedded guidance 3.5, true
    CFG with a negative prompt) is bns's Euler on t = 1 - sigma with guidance w."""
    model = _flux_model(flux, prompts=PROMPTS[:2], negative_prompt=NEG)
    x0 = _noise((2, 16, 16), 8)
    out = _latents(
        flux,
        prompt=PROMPTS[:2],
        negative_prompt=NEG,
        true_cfg_scale=W,
        guidance_scale=3.5,
        latents=x0,
        num_inference_steps=4,
        **FLUX,
    )
    sigmas = flux.scheduler.sigmas.double()
    assert sigmas[1] > 0.75  # shifted: the uniform grid's second sigma is 0.75
    solver = bns.solvers.euler(1 - sigmas)
    with torch.no_grad():
        ref = bns.sample(model, x0, solver, y=torch.arange(2), guidance=W)
    _close(out, ref)
    assert (ref - x0).abs().max() > 0.1


def test_flux_pipeline_with_bns_scheduler_equals_bns_sample(flux):
    model = _flux_model(flux, negative_prompt=NEG, embedded_guidance=2.0)
    solver = _bns_like(bns.solvers.midpoint(bns.grids.uniform(2)), seed=9)
    x0 = _noise((3, 16, 16), 9)
    _bns_scheduler_run(
        flux,
        model,
        solver,
        x0,
        torch.arange(3),
        W,
        prompt=PROMPTS,
        negative_prompt=NEG,
        true_cfg_scale=W,
        guidance_scale=2.0,
        **FLUX,
    )


def test_flux_save_and_reload_with_bns_scheduler(tmp_path, flux):
    model = _flux_model(flux, prompts=PROMPTS[:1])
    solver = _bns_like(bns.solvers.euler(bns.grids.uniform(3)), seed=10)
    _save_and_reload(
        tmp_path,
        flux,
        model,
        solver,
        _noise((1, 16, 16), 10),
        lambda path: _flux_model(path, prompts=PROMPTS[:1]),
        prompt=PROMPTS[:1],
        **FLUX,
    )


# -- PixArt-alpha / Sigma -----------------------------------------------------------------------

PIXART = {"use_resolution_binning": False, "max_sequence_length": tiny.T5_LEN}


def test_pixart_adapter_reads_the_pipeline(pixart):
    model = model_from_pipeline(pixart, prompts=PROMPTS, max_sequence_length=tiny.T5_LEN)
    net = model.net
    assert model.prediction == "eps" and model.sample_shape == (4, 8, 8)
    assert net.resolution is None  # 256 / 512 models: added_cond_kwargs are None
    with torch.no_grad():
        pe, pm, ne, nm = pixart.encode_prompt(PROMPTS, max_sequence_length=tiny.T5_LEN)
    assert torch.equal(net.embeds[:3], pe) and torch.equal(net.mask[:3], pm)
    assert torch.equal(net.embeds[3], ne[0]) and torch.equal(net.mask[3], nm[0])
    assert set(type(net).bns_conditioning) == {"embeds", "mask"}
    # The 1024 models condition on the resolution and the aspect ratio.
    big = model_from_pipeline(tiny.pixart(sample_size=128), prompts=PROMPTS, max_sequence_length=4)
    assert big.net.resolution.tolist() == [[1024, 1024]] and big.sample_shape == (4, 128, 128)


def test_pixart_stock_ddim_equals_bns_ddim(pixart):
    model = model_from_pipeline(pixart, prompts=PROMPTS[:2], max_sequence_length=tiny.T5_LEN)
    x0 = _noise((2, 4, 8, 8), 11)
    stock = DDIMScheduler(clip_sample=False, set_alpha_to_one=False, timestep_spacing="trailing")
    with _Scheduler(pixart, stock):
        out = _latents(
            pixart,
            prompt=PROMPTS[:2],
            guidance_scale=W,
            latents=x0,
            num_inference_steps=4,
            **PIXART,
        )
        ks = _stock_ddim_grid(pixart)
    assert ks.tolist() == [999, 749, 499, 249, 0]
    solver = bns.solvers.ddim(model.schedule.flow_time(ks), model.schedule)
    with torch.no_grad():
        ref = bns.sample(model, x0, solver, y=torch.arange(2), guidance=W)
    _close(out, ref)


@pytest.mark.parametrize("cls", [PixArtAlphaPipeline, PixArtSigmaPipeline])
def test_pixart_pipeline_with_bns_scheduler_equals_bns_sample(pixart, cls):
    pipe = pixart if cls is PixArtAlphaPipeline else cls(**pixart.components)
    model = model_from_pipeline(
        pipe, prompts=PROMPTS, negative_prompt=NEG, max_sequence_length=tiny.T5_LEN
    )
    solver = _bns_like(bns.solvers.midpoint(bns.grids.uniform(2)), seed=12)
    x0 = _noise((3, 4, 8, 8), 12)
    _bns_scheduler_run(
        pipe,
        model,
        solver,
        x0,
        torch.arange(3),
        W,
        prompt=PROMPTS,
        negative_prompt=NEG,
        guidance_scale=W,
        **PIXART,
    )


def test_pixart_save_and_reload_with_bns_scheduler(tmp_path, pixart):
    model = model_from_pipeline(pixart, prompts=PROMPTS[:1], max_sequence_length=tiny.T5_LEN)
    solver = _bns_like(bns.solvers.euler(bns.grids.uniform(2)), seed=13)
    _save_and_reload(
        tmp_path,
        pixart,
        model,
        solver,
        _noise((1, 4, 8, 8), 13),
        lambda path: model_from_pipeline(
            path, prompts=PROMPTS[:1], max_sequence_length=tiny.T5_LEN
        ),
        prompt=PROMPTS[:1],
        guidance_scale=W,
        **PIXART,
    )


# -- Wan (video: 5-D latents) -------------------------------------------------------------------

WAN = {"height": 64, "width": 64, "num_frames": 5, "max_sequence_length": tiny.T5_LEN}
WAN_SHAPE = (4, 2, 8, 8)  # C, latent frames (5 - 1) / 4 + 1, H / 8, W / 8


def _wan_model(pipe, prompts=PROMPTS, **kw):
    return model_from_pipeline(pipe, prompts=prompts, **{**WAN, **kw})


def test_wan_scheduler_is_flow_matching(wan):
    """Wan's UniPC with flow_prediction and use_flow_sigmas is a flow scheduler."""
    assert is_flow_scheduler(wan.scheduler) and is_flow_scheduler(dict(wan.scheduler.config))
    assert describe_scheduler(wan.scheduler)["prediction_type"] == "flow"
    vp = UniPCMultistepScheduler(prediction_type="flow_prediction")
    with pytest.raises(DiffusersError, match="use_flow_sigmas"):
        describe_scheduler(vp)
    assert not is_flow_scheduler(UniPCMultistepScheduler())
    model = _wan_model(wan)
    assert model.prediction == "velocity" and isinstance(model.schedule, CondOT)
    assert model.sample_shape == WAN_SHAPE
    with torch.no_grad():
        pe, ne = wan.encode_prompt(PROMPTS, max_sequence_length=tiny.T5_LEN)
    assert torch.equal(model.net.embeds[:3], pe) and torch.equal(model.net.embeds[3], ne[0])
    assert _wan_model(wan, num_frames=9).sample_shape == (4, 3, 8, 8)


def test_wan_stock_flow_euler_equals_bns_euler(wan):
    model = _wan_model(wan, prompts=PROMPTS[:2], negative_prompt=NEG)
    x0 = _noise((2, *WAN_SHAPE), 14)
    with _Scheduler(wan, FlowMatchEulerDiscreteScheduler(shift=3.0)):
        out = _latents(
            wan,
            prompt=PROMPTS[:2],
            negative_prompt=NEG,
            guidance_scale=W,
            latents=x0,
            num_inference_steps=4,
            **WAN,
        )
        sigmas = wan.scheduler.sigmas.double()
    solver = bns.solvers.euler(1 - sigmas)
    with torch.no_grad():
        ref = bns.sample(model, x0, solver, y=torch.arange(2), guidance=W)
    _close(out, ref)
    assert (ref - x0).abs().max() > 0.1


@pytest.mark.parametrize("two_experts", [False, True])
def test_wan_pipeline_with_bns_scheduler_equals_bns_sample(wan, two_experts):
    """With Wan 2.2's two experts the solver's steps cross the boundary (timestep 600)."""
    pipe = tiny.wan(two_experts=True) if two_experts else wan
    model = _wan_model(pipe, negative_prompt=NEG)
    solver = _bns_like(bns.solvers.midpoint(bns.grids.uniform(2)), seed=15)
    x0 = _noise((3, *WAN_SHAPE), 15)
    _bns_scheduler_run(
        pipe,
        model,
        solver,
        x0,
        torch.arange(3),
        W,
        prompt=PROMPTS,
        negative_prompt=NEG,
        guidance_scale=W,
        **WAN,
    )
    if two_experts:
        x = _noise((2, *WAN_SHAPE), 16)
        t = torch.tensor([0.2, 0.7], dtype=torch.float64)  # one sample per expert
        with torch.no_grad():
            both = model.net(x, t, torch.tensor([0, 1]))
            each = [model.net(x[i : i + 1], t[i : i + 1], torch.tensor([i])) for i in range(2)]
        _close(both, torch.cat(each))
        # The boundary is a setting of the model.
        pipe.register_to_config(boundary_ratio=0.3)
        assert _wan_model(pipe, negative_prompt=NEG).fingerprint() != model.fingerprint()


def test_the_scheduler_warns_when_wans_second_expert_guides_with_another_scale():
    pipe = tiny.wan(two_experts=True)
    model = _wan_model(pipe, negative_prompt=NEG)
    solver = bns.solvers.euler(bns.grids.uniform(2, model.t_range))
    solver.meta["guidance"] = W
    x0 = _noise((1, *WAN_SHAPE), 17)
    call = dict(prompt=PROMPTS[:1], negative_prompt=NEG, latents=x0, num_inference_steps=2, **WAN)
    with _Scheduler(pipe, BNSScheduler.from_solver(solver, pipe.scheduler)):
        with pytest.warns(
            UserWarning, match=f"trained for guidance {W:g} but the pipeline guides with 5"
        ):
            _latents(pipe, guidance_scale=W, guidance_scale_2=5.0, **call)
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("error", UserWarning)
            _latents(pipe, guidance_scale=W, **call)  # guidance_scale_2 defaults to it


def test_wan_save_and_reload_with_bns_scheduler(tmp_path, wan, monkeypatch):
    from diffusers.utils import is_accelerate_available

    if not is_accelerate_available():
        # diffusers loads a model with _keep_in_fp32_modules (Wan's transformer) only through
        # accelerate; in float32 those modules are float32 anyway.
        monkeypatch.setattr(WanTransformer3DModel, "_keep_in_fp32_modules", None)
    model = _wan_model(wan, prompts=PROMPTS[:1])
    solver = _bns_like(bns.solvers.euler(bns.grids.uniform(2)), seed=17)
    _save_and_reload(
        tmp_path,
        wan,
        model,
        solver,
        _noise((1, *WAN_SHAPE), 17),
        lambda path: _wan_model(path, prompts=PROMPTS[:1]),
        prompt=PROMPTS[:1],
        guidance_scale=W,
        **WAN,
    )
    if not is_accelerate_available():
        monkeypatch.undo()
        with pytest.raises(DiffusersError, match="install accelerate"):
            _wan_model(str(tmp_path / "pipe"))


# -- prompt splits, for every text family -------------------------------------------------------

SPLIT = {"train": ["a cat", "a dog"], "val": ["sky"], "test": ["red sun", "blue sea"]}
OTHER = {"train": ["a cat", "a dog"], "val": ["tree"], "test": ["green hill", "sea"]}

FAMILIES = {
    "sd": lambda pipe, prompts: model_from_pipeline(pipe, prompts=prompts),
    "sdxl": lambda pipe, prompts: model_from_pipeline(pipe, prompts=prompts),
    "sd3": lambda pipe, prompts: model_from_pipeline(pipe, prompts=prompts),
    "flux": _flux_model,
    "pixart": lambda pipe, prompts: model_from_pipeline(
        pipe, prompts=prompts, max_sequence_length=tiny.T5_LEN
    ),
    "wan": _wan_model,
}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_prompt_splits(request, family):
    pipe = request.getfixturevalue(family)
    build = FAMILIES[family]
    model = build(pipe, SPLIT)
    assert model.num_classes == 5 and model.null_label == 5
    assert model.label_splits == {"train": (0, 1), "val": (2,), "test": (3, 4)}
    flat = build(pipe, SPLIT["train"] + SPLIT["val"] + SPLIT["test"])
    assert flat.label_splits is None
    assert torch.equal(model.net.embeds, flat.net.embeds)  # train + val + test, then the null
    # Held-out prompts are data, not the model (as many of them: num_classes is a setting).
    other = build(pipe, OTHER)
    assert other.fingerprint() == model.fingerprint()
    assert other.conditioning_digest() != model.conditioning_digest()
    assert other.conditioning_digest([0, 1]) == model.conditioning_digest([0, 1])


def test_prompt_splits_bad_input(sd):
    with pytest.raises(DiffusersError, match="exactly the keys"):
        model_from_pipeline(sd, prompts={"train": ["a"], "test": ["b"]})
    with pytest.raises(DiffusersError, match=r"prompts\['val'\] must be a non-empty"):
        model_from_pipeline(sd, prompts={"train": ["a"], "val": [], "test": ["b"]})
    with pytest.raises(DiffusersError, match="list of prompts"):
        model_from_pipeline(sd, prompts="a cat")


# -- refusals -----------------------------------------------------------------------------------


class _OtherTextPipeline(DiffusionPipeline):
    """A text pipeline of a family the adapter does not know."""

    def __init__(self, transformer, scheduler):
        super().__init__()
        self.register_modules(transformer=transformer, scheduler=scheduler)

    def encode_prompt(self, *args, **kwargs):
        raise AssertionError("not reached")


def test_unsupported_pipelines_are_refused_with_the_supported_list(sd):
    transformer = DiTTransformer2DModel(
        num_attention_heads=2,
        attention_head_dim=8,
        in_channels=4,
        num_layers=1,
        sample_size=8,
        patch_size=2,
        num_embeds_ada_norm=10,
        norm_type="ada_norm_zero",
    )
    pipe = _OtherTextPipeline(transformer, DDIMScheduler())
    with pytest.raises(DiffusersError) as e:
        model_from_pipeline(pipe, prompts=PROMPTS)
    for name in (
        "StableDiffusionPipeline",
        "StableDiffusionXLPipeline",
        "FluxPipeline",
        "StableDiffusion3Pipeline",
        "PixArtSigmaPipeline",
        "WanPipeline",
        "DiTPipeline",
    ):
        assert name in str(e.value)
    with pytest.raises(DiffusersError, match="does not take num_frames"):
        model_from_pipeline(sd, prompts=PROMPTS, num_frames=5)
    dit = DiTPipeline(transformer=transformer, vae=None, scheduler=DDIMScheduler())
    with pytest.raises(DiffusersError, match="does not take height"):
        model_from_pipeline(dit, height=64)


# -- the command line on saved folders ----------------------------------------------------------


def _cli_distill(tmp_path, folder, prompts_file) -> bns.NSSolver:
    cli = pytest.importorskip("bns.cli")
    out = tmp_path / "solver.json"
    argv = [
        "distill",
        "--model",
        f"diffusers:{folder}",
        "--prompts",
        str(prompts_file),
        "--nfe",
        "2",
        "--guidance",
        "2",
        "--train-pairs",
        "4",
        "--val-pairs",
        "4",
        "--adam-steps",
        "2",
        "--batch-size",
        "4",
        "--init",
        "euler",
        "--precondition",
        "none",
        "--rtol",
        "1e-3",
        "--atol",
        "1e-3",
        "--cache-dir",
        str(tmp_path / "cache"),
        "--quiet",
        "--out",
        str(out),
    ]
    assert cli.main(argv) == 0
    return bns.NSSolver.load(out, force=True)


def test_a_pipeline_spec_loads_in_the_dtype_asked(tmp_path, sd):
    """``--dtype bfloat16`` loads the pipeline in bf16 (its own dtype, not float32 cast later);
    the model's interface stays float64 and its velocity is the float32 one to bf16 rounding."""
    from bns.ground_truth import default_tolerance
    from bns.specs import load_model

    sd.save_pretrained(tmp_path / "sd")
    spec = f"diffusers:{tmp_path / 'sd'}"
    half = load_model(spec, prompts=PROMPTS, dtype=torch.bfloat16)
    full = load_model(spec, prompts=PROMPTS)
    assert half.net.denoiser.dtype == torch.bfloat16 and half.dtype == torch.float64
    assert full.net.denoiser.dtype == torch.float32
    # the ground truth's default tolerance follows what the weights can resolve
    assert half.precision == torch.bfloat16 and full.precision == torch.float32
    assert default_tolerance(half.precision) == 1e-4 and default_tolerance(full.precision) == 1e-5
    x = _noise((2, 4, 8, 8), 20).double()
    with torch.no_grad():
        u_half = half.velocity(x, 0.5, torch.tensor([0, 1]), guidance=2.0)
        u_full = full.velocity(x, 0.5, torch.tensor([0, 1]), guidance=2.0)
    err = float((u_half - u_full).abs().max() / u_full.abs().max())
    assert 1e-5 < err < 5e-2  # bf16 rounding: not float32, not garbage
    assert half.fingerprint() != full.fingerprint()  # other weights (rounded): another model


def test_cli_distill_on_a_saved_sd_pipeline(tmp_path, sd):
    sd.save_pretrained(tmp_path / "sd")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\na dog\nsky\nred sun\nblue sea\n")
    solver = _cli_distill(tmp_path, tmp_path / "sd", prompts)
    assert solver.nfe == 2
    # Other prompts, and another number of them: the same model (prompts are data).
    model = model_from_pipeline(str(tmp_path / "sd"), prompts=["a cat", "b", "c", "d"])
    bns.NSSolver.load(tmp_path / "solver.json", model=model)  # trained for this very model
    # The trained solver drops into the pipeline with no further information.
    pipe = _from_folder(tmp_path / "sd", with_bns_scheduler=False)
    pipe.scheduler = BNSScheduler.from_solver(solver)
    x0 = _noise((1, 4, 8, 8), 18)
    out = _latents(pipe, prompt=["a cat"], guidance_scale=2.0, latents=x0, num_inference_steps=2)
    with torch.no_grad():
        ref = bns.sample(model, x0, solver, y=torch.tensor([0]), guidance=2.0)
    _close(out, ref)


def test_cli_distill_on_a_saved_flux_pipeline(tmp_path, flux):
    """``diffusers:PATH?height=64&width=64``: the pipeline options ride on the spec (Flux's
    default is 1024 pixels, which its saved folder does not record)."""
    flux.save_pretrained(tmp_path / "flux")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\na dog\nsky\n")
    spec = f"{tmp_path / 'flux'}?height=64&width=64&embedded_guidance=3.5"
    solver = _cli_distill(tmp_path, spec, prompts)
    kw = dict(height=64, width=64)
    # Other prompts, another count of them: the same model (prompts are data).
    model = model_from_pipeline(str(tmp_path / "flux"), prompts=["a cat", "b", "c", "d"], **kw)
    assert model.sample_shape == (16, 16) and float(model.net.guidance) == 3.5
    assert solver.nfe == 2
    bns.NSSolver.load(tmp_path / "solver.json", model=model)  # trained for this very model
    # In the pipeline: guidance 2 is true CFG against the (default, empty) negative prompt.
    pipe = _from_folder(tmp_path / "flux", with_bns_scheduler=False)
    pipe.scheduler = BNSScheduler.from_solver(solver)
    x0 = _noise((1, 16, 16), 19)
    out = _latents(
        pipe,
        prompt="a cat",
        negative_prompt="",
        true_cfg_scale=2.0,
        latents=x0,
        num_inference_steps=2,
        height=64,
        width=64,
    )
    with torch.no_grad():
        ref = bns.sample(model, x0, solver, y=torch.tensor([0]), guidance=2.0)
    _close(out, ref)


@pytest.mark.parametrize("family", ["sdxl", "sd3", "pixart", "wan"])
def test_cli_distill_on_every_other_saved_family(tmp_path, family, tok, monkeypatch):
    """``bns distill --model diffusers:PATH?options --prompts FILE`` on a saved folder of each
    remaining family; the solver loads against the folder's model with other prompts."""
    from diffusers.utils import is_accelerate_available

    if family == "wan" and not is_accelerate_available():  # see the save/reload test
        monkeypatch.setattr(WanTransformer3DModel, "_keep_in_fp32_modules", None)
    pipe = tiny.tiny_pipeline(family, tok)
    pipe.save_pretrained(tmp_path / family)
    options = {
        "sdxl": {},
        "sd3": {},
        "pixart": {"max_sequence_length": tiny.T5_LEN},
        "wan": {**WAN},
    }[family]
    query = "&".join(f"{k}={v}" for k, v in options.items())
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\na dog\nsky\nred sun\nblue sea\n")
    solver = _cli_distill(
        tmp_path, f"{tmp_path / family}" + (f"?{query}" if query else ""), prompts
    )
    assert solver.nfe == 2 and solver.meta["guidance"] == 2.0
    model = model_from_pipeline(str(tmp_path / family), prompts=["a cow", "an owl"], **options)
    bns.NSSolver.load(tmp_path / "solver.json", model=model)  # the same model, other prompts


@pytest.mark.parametrize("family", ["sd", "sd3"])
def test_gauss_newton_runs_through_attention_and_is_exact(family, request, tmp_path):
    """Fused attention kernels have no forward-mode formula; the Gauss-Newton steps run
    attention through the math kernel, so a UNet and a transformer get exact Jacobians."""
    import warnings

    from bns.gauss_newton import coefficient_jacobian
    from bns.solver import NSSolver, sample
    from bns.solvers import init_candidates

    model = model_from_pipeline(request.getfixturevalue(family), prompts=PROMPTS)
    s = init_candidates(model, 2, "euler", None, "range")[0]
    x0 = _noise((1, *model.sample_shape), 3)
    y = torch.tensor([1])
    xn, jac = coefficient_jacobian(model, s, x0, y, 2.0)
    n = s.nfe

    def fn(theta):
        t, a, b = theta[: n + 1], theta[n + 1 : 2 * n + 1], theta[2 * n + 1 :].reshape(n, n)
        return sample(model, x0, NSSolver(t, a, b), y, 2.0).reshape(1, -1)

    theta = torch.cat([s.times, s.a, s.b.reshape(-1)]).detach()
    # reverse mode, the output rows batched (vmap): the same Jacobian as one row at a time
    ref = torch.autograd.functional.jacobian(fn, theta, vectorize=True)
    assert (jac - ref).abs().max() <= 1e-4 * ref.abs().max()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback to Adam
        # gn_steps left to auto (12 Gauss-Newton steps); a loose ground truth and patience 2
        # for gains under 1 dB keep the run to a few steps, each through attention.
        solver, hist = bns.distill(
            model,
            2,
            guidance=2.0,
            train_pairs=4,
            val_pairs=4,
            init_pairs=4,
            gn_batch_size=4,
            gn_patience=2,
            gn_min_gain=1.0,
            rtol=1e-3,
            init="euler",
            cache=tmp_path,
            progress=False,
        )
    assert solver.meta["config"]["gn_steps"] == 12 and hist["best_val_psnr"] >= hist["val_psnr"][0]
    assert hist["steps_run"] >= 1 and hist["cost"]["optimizer"]["jvps"] > 0
