"""diffusers integration: BNSScheduler in real (tiny, random-weight, offline) pipelines.

Every pipeline is built from configs: a class-conditional epsilon DiTPipeline (tiny
DiTTransformer2DModel + AutoencoderKL) and a flow-matching StableDiffusion3Pipeline (tiny SD3
transformer and two tiny CLIP text encoders with a character-level tokenizer; no T5, which SD3
replaces by zeros). The references are bns.sample on the adapted model and, independently,
diffusers' own DDIM and flow-matching Euler schedulers against bns's DDIM and Euler.
"""

from __future__ import annotations

import json

import pytest
import torch

import bns

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

from diffusers import (  # noqa: E402
    AutoencoderKL,
    DDIMScheduler,
    DDPMPipeline,
    DDPMScheduler,
    DiTPipeline,
    DiTTransformer2DModel,
    FlowMatchEulerDiscreteScheduler,
    UNet2DModel,
)

from bns.integrations.diffusers import (  # noqa: E402
    BNSScheduler,
    DiffusersError,
    model_from_pipeline,
    tiny,  # noqa: E402
)
from bns.schedules import CondOT, DiscreteVP  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def _tiny_dit_pipeline() -> DiTPipeline:
    torch.manual_seed(0)
    transformer = DiTTransformer2DModel(
        num_attention_heads=2,
        attention_head_dim=8,
        in_channels=4,
        out_channels=8,  # learned variance, as DiT: the pipeline keeps the first 4 channels
        num_layers=1,
        sample_size=8,
        patch_size=2,
        num_embeds_ada_norm=1000,
        norm_type="ada_norm_zero",
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",),
        up_block_types=("UpDecoderBlock2D",),
        block_out_channels=(8,),
        latent_channels=4,
        norm_num_groups=4,
        sample_size=8,
    )
    # A DDPM linear schedule; clip_sample off (bns has no clipping).
    scheduler = DDIMScheduler(
        clip_sample=False, set_alpha_to_one=False, timestep_spacing="trailing"
    )
    return DiTPipeline(transformer=transformer.eval(), vae=vae.eval(), scheduler=scheduler)


@pytest.fixture(scope="module")
def dit():
    return _tiny_dit_pipeline()


@pytest.fixture(scope="module")
def sd3(tmp_path_factory):
    return tiny.sd3(tmp_path_factory.mktemp("tokenizer"))


def _bns_like(solver: bns.NSSolver, seed: int = 0) -> bns.NSSolver:
    """A classical solver with every coefficient perturbed: uses the whole history, as BNS does."""
    g = torch.Generator().manual_seed(seed)
    n = solver.nfe
    a = solver.a + 0.01 * torch.randn(n, generator=g, dtype=torch.float64)
    b = solver.b + 0.01 * torch.tril(torch.randn(n, n, generator=g, dtype=torch.float64))
    return bns.NSSolver(solver.times.clone(), a, b, {"solver": "perturbed"})


def _final_latents(pipe: DiTPipeline, monkeypatch, **call) -> torch.Tensor:
    """Run the DiT pipeline (it always decodes) and return the latents it decoded."""
    seen = []
    decode = pipe.vae.decode

    def spy(z, *args, **kwargs):
        seen.append(z * pipe.vae.config.scaling_factor)
        return decode(z, *args, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(pipe.vae, "decode", spy)
        with torch.no_grad():
            pipe(output_type="pt", **call)
    return seen[0]


def _with_scheduler(pipe, scheduler):
    old = pipe.scheduler
    pipe.scheduler = scheduler
    return old


# -- class-conditional epsilon pipeline (DiT) ---------------------------------------------------


def test_dit_adapter_reads_the_pipeline(dit):
    model = model_from_pipeline(dit)
    assert model.prediction == "eps"
    assert isinstance(model.schedule, DiscreteVP)
    ac = dit.scheduler.alphas_cumprod.double()
    assert torch.equal(model.schedule.alphas_cumprod, ac)
    assert model.num_classes == 1000 and model.null_label == 1000  # DiT's null class
    assert model.sample_shape == (4, 8, 8) and model.t_range == (0.0, 1.0)


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_dit_pipeline_with_bns_scheduler_equals_bns_sample(dit, dtype, tol, monkeypatch):
    dit.to(dtype=dtype)
    try:
        model = model_from_pipeline(dit)
        solver = _bns_like(bns.solvers.midpoint(bns.grids.uniform(3, model.t_range)))
        old = _with_scheduler(dit, BNSScheduler.from_solver(solver, dit.scheduler))
        labels, w = [3, 7], 2.5
        out = _final_latents(
            dit,
            monkeypatch,
            class_labels=labels,
            guidance_scale=w,
            generator=torch.Generator().manual_seed(1),
            num_inference_steps=solver.nfe,
        )
        dit.scheduler = old
        # DiT draws its latents with randn_tensor(generator) and no init_noise_sigma scaling.
        x0 = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1), dtype=dtype)
        with torch.no_grad():
            ref = bns.sample(model, x0, solver, y=torch.tensor(labels), guidance=w)
        assert out.dtype == dtype
        # Relative to the latents' size (the random tiny DiT makes them large).
        assert (out - ref).abs().max() <= tol * ref.abs().max()
    finally:
        dit.to(dtype=torch.float32)


def test_the_scheduler_warns_when_the_pipeline_guides_with_another_scale(dit, sd3, monkeypatch):
    import warnings

    model = model_from_pipeline(dit)
    solver = bns.solvers.midpoint(bns.grids.uniform(2, model.t_range))
    solver.meta["guidance"] = 2.0  # as bns.distill records it
    old = _with_scheduler(dit, BNSScheduler.from_solver(solver, dit.scheduler))
    call = dict(class_labels=[3], num_inference_steps=4, generator=torch.Generator())
    try:
        with pytest.warns(
            UserWarning, match="trained for guidance 2 but the pipeline guides with 4"
        ):
            _final_latents(dit, monkeypatch, guidance_scale=4.0, **call)
        with pytest.warns(UserWarning, match="guides with 1"):  # diffusers' w <= 1: no guidance
            _final_latents(dit, monkeypatch, guidance_scale=0.5, **call)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            _final_latents(dit, monkeypatch, guidance_scale=2.0, **call)
    finally:
        dit.scheduler = old
    # A text pipeline sets its scale on itself before its timesteps.
    model = model_from_pipeline(sd3, prompts=PROMPTS[:1])
    solver = bns.solvers.euler(bns.grids.uniform(3, model.t_range))
    solver.meta["guidance"] = 1.0
    old = _with_scheduler(sd3, BNSScheduler.from_solver(solver, sd3.scheduler))
    try:
        with pytest.warns(
            UserWarning, match="trained for guidance 1 but the pipeline guides with 3"
        ):
            with torch.no_grad():
                sd3(
                    prompt=PROMPTS[:1],
                    guidance_scale=3.0,
                    num_inference_steps=3,
                    height=64,
                    width=64,
                    output_type="latent",
                )
    finally:
        sd3.scheduler = old


def test_a_solver_that_ends_on_the_data_lands_there_in_the_pipeline(dit, monkeypatch):
    """The exact end through the pipeline: the scheduler's last sigma is 0 and the pipeline's
    latents are bns.sample's, which land on the data prediction at the last evaluation."""
    dit.to(dtype=torch.float64)
    try:
        model = model_from_pipeline(dit)
        plain = bns.solvers.dpm_solver_pp(
            bns.grids.logsnr(4, model.schedule, model.t_range), model.schedule, 2
        )
        solver = bns.solvers.with_data_end(plain, model.schedule)
        scheduler = BNSScheduler.from_solver(solver, dit.scheduler)
        scheduler.set_timesteps(4)
        assert float(scheduler.sigmas[-1]) == 0.0 and float(scheduler.sigmas[-2]) > 0
        old = _with_scheduler(dit, scheduler)
        call = dict(class_labels=[5], guidance_scale=1.0, num_inference_steps=4)
        out = _final_latents(dit, monkeypatch, generator=torch.Generator().manual_seed(4), **call)
        dit.scheduler = old
        x0 = torch.randn(
            1, 4, 8, 8, generator=torch.Generator().manual_seed(4), dtype=torch.float64
        )
        y = torch.tensor([5])
        with torch.no_grad():
            ref = bns.sample(model, x0, solver, y=y)
            _, traj = bns.sample(model, x0, plain, y=y, return_trajectory=True)
            from bns.pairs import data_prediction

            x1_hat = data_prediction(model, traj[-2], float(solver.times[-2]), y)
        assert (out - ref).abs().max() < 1e-10 * ref.abs().max()
        assert (ref - x1_hat).abs().max() < 1e-10 * ref.abs().max()
    finally:
        dit.to(dtype=torch.float32)


def test_dit_stock_ddim_equals_bns_ddim(dit, monkeypatch):
    """Independent check of the eps -> velocity conversion and the timestep map: diffusers' own
    DDIM (trailing spacing, final alpha = alphas_cumprod[0]) is bns's DDIM on the grid of its
    timesteps, k = 999, 799, ..., 199, then 0."""
    dit.to(dtype=torch.float64)
    try:
        model = model_from_pipeline(dit)
        out = _final_latents(
            dit,
            monkeypatch,
            class_labels=[5],
            guidance_scale=1.0,
            generator=torch.Generator().manual_seed(2),
            num_inference_steps=5,
        )
        ks = torch.tensor([999.0, 799.0, 599.0, 399.0, 199.0, 0.0], dtype=torch.float64)
        assert torch.equal(dit.scheduler.timesteps.double(), ks[:-1])
        solver = bns.solvers.ddim(model.schedule.flow_time(ks), model.schedule)
        x0 = torch.randn(
            1, 4, 8, 8, generator=torch.Generator().manual_seed(2), dtype=torch.float64
        )
        with torch.no_grad():
            ref = bns.sample(model, x0, solver, y=torch.tensor([5]))
        # diffusers' DDIM computes 1 - alphas_cumprod in float32: agreement to ~1e-7.
        assert (out - ref).abs().max() < 1e-5 * ref.abs().max()
    finally:
        dit.to(dtype=torch.float32)


# -- flow-matching text pipeline (SD3) ----------------------------------------------------------


PROMPTS = ["a cat", "a red dog", "sky"]


def test_sd3_adapter_encodes_prompts_once(sd3):
    model = model_from_pipeline(sd3, prompts=PROMPTS, negative_prompt="blurry")
    assert model.prediction == "velocity" and isinstance(model.schedule, CondOT)
    assert model.num_classes == 3 and model.null_label == 3
    with torch.no_grad():
        pe, ne, ppe, npe = sd3.encode_prompt(
            prompt=PROMPTS, prompt_2=None, prompt_3=None, negative_prompt="blurry"
        )
    net = model.net
    assert torch.equal(net.embeds[:3], pe) and torch.equal(net.pooled[:3], ppe)
    assert torch.equal(net.embeds[3], ne[0]) and torch.equal(net.pooled[3], npe[0])
    assert not torch.equal(net.embeds[3], net.embeds[0])


def test_guidance_labels_is_the_deprecated_name_of_negative_prompt(sd3):
    with pytest.warns(DeprecationWarning, match="negative_prompt"):
        old = model_from_pipeline(sd3, prompts=PROMPTS, guidance_labels="blurry")
    new = model_from_pipeline(sd3, prompts=PROMPTS, negative_prompt="blurry")
    assert torch.equal(old.net.embeds, new.net.embeds)
    assert torch.equal(old.net.pooled, new.net.pooled)
    assert old.fingerprint() == new.fingerprint()
    with pytest.warns(DeprecationWarning), pytest.raises(TypeError, match="negative_prompt only"):
        model_from_pipeline(sd3, prompts=PROMPTS, negative_prompt="a", guidance_labels="b")


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_sd3_pipeline_with_bns_scheduler_equals_bns_sample(sd3, dtype, tol):
    sd3.to(dtype=dtype)
    try:
        model = model_from_pipeline(sd3, prompts=PROMPTS, negative_prompt="blurry")
        solver = _bns_like(bns.solvers.midpoint(bns.grids.uniform(2, model.t_range)), seed=1)
        scheduler = BNSScheduler.from_solver(solver, sd3.scheduler)
        assert scheduler.config.prediction_type == "flow"
        old = _with_scheduler(sd3, scheduler)
        x0 = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(1), dtype=dtype)
        w = 3.0
        with torch.no_grad():
            out = sd3(
                prompt=PROMPTS,
                negative_prompt="blurry",
                guidance_scale=w,
                latents=x0,
                num_inference_steps=solver.nfe,
                height=64,
                width=64,
                output_type="latent",
            ).images
            # Flux-style callers pass sigmas (their default grid) and mu: only the count counts.
            out2 = sd3(
                prompt=PROMPTS,
                negative_prompt="blurry",
                guidance_scale=w,
                latents=x0,
                sigmas=[1.0, 0.8, 0.5, 0.1],
                mu=0.7,
                height=64,
                width=64,
                output_type="latent",
            ).images
            ref = bns.sample(model, x0, solver, y=torch.arange(3), guidance=w)
        sd3.scheduler = old
        assert out.dtype == dtype
        assert (out - ref).abs().max() <= tol
        assert torch.equal(out, out2)
        # Guidance matters here: the unguided sample is far away.
        with torch.no_grad():
            plain = bns.sample(model, x0, solver, y=torch.arange(3))
        assert (plain - ref).abs().max() > 1e-2
    finally:
        sd3.to(dtype=torch.float32)


def test_sd3_stock_flow_euler_equals_bns_euler(sd3):
    """Independent check of the flow conventions (sign, timestep = 1000 sigma, shift): the
    pipeline's own FlowMatchEulerDiscreteScheduler, shifted, is bns's Euler on t = 1 - sigma."""
    sd3.to(dtype=torch.float64)
    base = sd3.scheduler
    try:
        sd3.scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
        model = model_from_pipeline(sd3, prompts=PROMPTS[:1])
        x0 = torch.randn(
            1, 4, 8, 8, generator=torch.Generator().manual_seed(3), dtype=torch.float64
        )
        with torch.no_grad():
            out = sd3(
                prompt=PROMPTS[:1],
                guidance_scale=2.0,
                latents=x0,
                num_inference_steps=5,
                height=64,
                width=64,
                output_type="latent",
            ).images
            sigmas = sd3.scheduler.sigmas.double()
            assert sigmas[1] > 0.8  # shifted: 3 s / (1 + 2 s) at s = 0.8
            solver = bns.solvers.euler(1 - sigmas)
            ref = bns.sample(model, x0, solver, y=torch.tensor([0]), guidance=2.0)
        # The stock scheduler steps in float32.
        assert (out - ref).abs().max() < 1e-5
        assert (x0 - ref).abs().max() > 0.1
    finally:
        sd3.scheduler = base
        sd3.to(dtype=torch.float32)


# -- unconditional UNet pipeline (DDPM, v-prediction) ------------------------------------------


def test_ddpm_unet_v_prediction_pipeline_equals_bns_sample(monkeypatch):
    torch.manual_seed(0)
    unet = UNet2DModel(
        sample_size=8,
        in_channels=3,
        out_channels=3,
        layers_per_block=1,
        block_out_channels=(8, 16),
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
        norm_num_groups=4,
    ).double()
    scheduler = DDPMScheduler(beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction")
    pipe = DDPMPipeline(unet=unet.eval(), scheduler=scheduler)
    model = model_from_pipeline(pipe)
    assert model.prediction == "v" and model.num_classes is None
    assert model.sample_shape == (3, 8, 8)
    solver = _bns_like(bns.solvers.heun(bns.grids.uniform(2)), seed=4)
    pipe.scheduler = BNSScheduler.from_solver(solver, scheduler)
    finals = []
    step = pipe.scheduler.step

    def spy(*args, **kwargs):
        out = step(*args, **kwargs)
        finals.append(out.prev_sample)
        return out

    monkeypatch.setattr(pipe.scheduler, "step", spy)
    with torch.no_grad():
        pipe(batch_size=2, generator=torch.Generator().manual_seed(5), num_inference_steps=4)
        x0 = torch.randn(
            2, 3, 8, 8, generator=torch.Generator().manual_seed(5), dtype=torch.float64
        )
        ref = bns.sample(model, x0, solver)
    assert len(finals) == 4
    assert (finals[-1] - ref).abs().max() <= 1e-12 * ref.abs().max()


# -- the scheduler itself -----------------------------------------------------------------------


def _flow_scheduler(nfe: int = 4) -> tuple[BNSScheduler, bns.NSSolver]:
    solver = _bns_like(bns.solvers.euler(bns.grids.uniform(nfe)))
    return BNSScheduler.from_solver(solver, FlowMatchEulerDiscreteScheduler()), solver


def test_save_pretrained_round_trip(tmp_path, dit):
    solver = _bns_like(bns.solvers.midpoint(bns.grids.uniform(2)), seed=3)
    solver.meta = {"solver": "bns", "val_psnr": 31.5}
    sched = BNSScheduler.from_solver(solver, dit.scheduler)
    sched.save_pretrained(tmp_path / "scheduler")
    stored = json.loads((tmp_path / "scheduler" / "scheduler_config.json").read_text())
    assert stored["_class_name"] == "BNSScheduler" and stored["prediction_type"] == "epsilon"
    back = BNSScheduler.from_pretrained(tmp_path / "scheduler")
    for name in ("times", "a", "b"):
        assert torch.equal(getattr(back.solver, name), getattr(solver, name))
    assert back.solver.meta == solver.meta
    assert back.config.alphas_cumprod == sched.config.alphas_cumprod
    assert back.config.num_train_timesteps == 1000
    # Same run, same numbers.
    outs = []
    for s in (sched, back):
        s.set_timesteps(4)
        x = torch.randn(2, 3, generator=torch.Generator().manual_seed(0))
        for i, t in enumerate(s.timesteps):
            f = torch.sin(x + i)
            x = s.step(f, t, x).prev_sample
        outs.append(x)
    assert torch.equal(outs[0], outs[1])
    assert torch.equal(sched.timesteps, back.timesteps)


def test_pipeline_save_and_reload_with_bns_scheduler(tmp_path, dit):
    solver = _bns_like(bns.solvers.euler(bns.grids.uniform(3)))
    old = _with_scheduler(dit, BNSScheduler.from_solver(solver, dit.scheduler))
    try:
        dit.save_pretrained(tmp_path / "pipe")
    finally:
        dit.scheduler = old
    reloaded = BNSScheduler.from_pretrained(tmp_path / "pipe", subfolder="scheduler")
    pipe = DiTPipeline.from_pretrained(tmp_path / "pipe", scheduler=reloaded)
    assert isinstance(pipe.scheduler, BNSScheduler)
    assert torch.equal(pipe.scheduler.solver.b, solver.b)


def test_refuses_a_step_count_it_was_not_trained_for(sd3):
    sched, _ = _flow_scheduler(4)
    with pytest.raises(DiffusersError, match=r"trained for 4 steps.*num_inference_steps=6"):
        sched.set_timesteps(6)
    with pytest.raises(DiffusersError, match="trained for 4 steps"):
        sched.set_timesteps(sigmas=[1.0, 0.5, 0.2])
    with pytest.raises(DiffusersError, match="custom timesteps"):
        sched.set_timesteps(timesteps=[900, 500, 100, 50])
    sched.set_timesteps(sigmas=[1.0, 0.7, 0.4, 0.2], mu=1.1)  # the right count: accepted
    assert len(sched.timesteps) == 4
    old = _with_scheduler(sd3, sched)
    try:
        with pytest.raises(DiffusersError, match="trained for 4 steps"):
            sd3(prompt="a cat", num_inference_steps=10, height=64, width=64, output_type="latent")
    finally:
        sd3.scheduler = old


def test_scheduler_conventions():
    sched, solver = _flow_scheduler(4)
    sched.set_timesteps(4)
    assert sched.init_noise_sigma == 1.0 and sched.order == 1
    x = torch.randn(2, 3)
    assert sched.scale_model_input(x, sched.timesteps[0]) is x
    # Flow: timestep = 1000 sigma = 1000 (1 - t), in float32 like diffusers.
    assert sched.timesteps.dtype == torch.float32
    assert torch.equal(sched.timesteps, ((1 - solver.times[:-1]) * 1000).float())
    assert torch.equal(sched.sigmas, (1 - solver.times).float())


def test_step_computes_in_float32_and_casts_back():
    """Half-precision model outputs: the NS update runs in float32 over float32 history."""
    sched, solver = _flow_scheduler(4)
    sched.set_timesteps(4)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 8, generator=g).to(torch.bfloat16)
    x0 = x.float()
    us, traj = [], []
    for i, t in enumerate(sched.timesteps):
        f = torch.randn(2, 8, generator=g).to(torch.bfloat16)
        x = sched.step(f, t, x).prev_sample
        assert x.dtype == torch.bfloat16
        us.append(-f.float())
        ref = solver.a[i].float() * x0
        for j in range(i + 1):
            ref = ref + solver.b[i, j].float() * us[j]
        traj.append(ref)
        assert torch.equal(x, ref.to(torch.bfloat16))
    assert sched._x0.dtype == torch.float32 and all(u.dtype == torch.float32 for u in sched._us)


def test_step_is_bns_samples_update():
    """The scheduler's NS update is bns.sample's own (bns.solver.ns_step): equal to the bit."""
    sched, solver = _flow_scheduler(4)
    sched.set_timesteps(4)

    def velocity(x, t):
        return torch.sin(3 * x + t) - x

    x0 = torch.randn(2, 3, 4, generator=torch.Generator().manual_seed(0))
    x = x0
    for i, timestep in enumerate(sched.timesteps):
        # A flow pipeline's network returns dx/dsigma = -u.
        x = sched.step(-velocity(x, solver.times[i]), timestep, x).prev_sample
    with torch.no_grad():
        ref = bns.sample(velocity, x0, solver)
    assert torch.equal(x, ref)


def test_step_misuse_is_refused():
    sched, _ = _flow_scheduler(2)
    x = torch.zeros(1, 2)
    with pytest.raises(DiffusersError, match="set_timesteps"):
        sched.step(x, 1000.0, x)
    sched.set_timesteps(2)
    with pytest.raises(DiffusersError, match="began at step 1 of 2"):
        sched.step(x, sched.timesteps[1], x)  # a run that skips the first step
    with pytest.raises(DiffusersError, match="not in this schedule"):
        sched.step(x, 123.0, x)
    x = sched.step(x, sched.timesteps[0], x).prev_sample
    with pytest.raises(DiffusersError, match="expects timestep"):
        sched.step(x, sched.timesteps[0], x)  # the same step twice
    sched.set_timesteps(2)
    for t in sched.timesteps:
        x = sched.step(x, t, x).prev_sample
    with pytest.raises(DiffusersError, match="has 2 steps"):
        sched.step(x, sched.timesteps[-1], x)
    with pytest.raises(DiffusersError, match="began at step 3"):
        sched.set_begin_index(3)
    with pytest.raises(DiffusersError, match=r"timesteps in \[0, 1000\]"):
        sched.add_noise(x, x, torch.tensor([1001.0]))  # add_noise itself: test_scheduler_common
    with pytest.raises(DiffusersError, match="from_solver"):
        BNSScheduler.from_config(FlowMatchEulerDiscreteScheduler().config)


def test_from_solver_reads_the_trained_models_settings(dit, sd3):
    """A solver from bns.distill records the model's settings: they are enough, and a pipeline
    of another kind is refused."""
    dit_model = model_from_pipeline(dit)
    solver = _bns_like(bns.solvers.euler(bns.grids.uniform(3)))
    solver.meta = {"model_settings": dit_model.settings()}
    from_meta = BNSScheduler.from_solver(solver)
    from_pipe = BNSScheduler.from_solver(solver, dit.scheduler)
    assert dict(from_meta.config) == dict(from_pipe.config)
    assert from_meta.config.prediction_type == "epsilon"
    with pytest.raises(DiffusersError, match="trained for a epsilon model"):
        BNSScheduler.from_solver(solver, sd3.scheduler)
    with pytest.raises(DiffusersError, match="another alphas_cumprod"):
        BNSScheduler.from_solver(solver, DDIMScheduler(beta_schedule="scaled_linear"))
    bare = _bns_like(bns.solvers.euler(bns.grids.uniform(3)))
    with pytest.raises(DiffusersError, match="pass its scheduler"):
        BNSScheduler.from_solver(bare)


def test_text_pipeline_from_a_folder_with_absent_components(tmp_path, sd3):
    """SD3 saved without T5 and VAE (null components) loads from its folder, as the command
    line's ``diffusers:PATH --prompts FILE`` does, and is the same model as the object's."""
    sd3.save_pretrained(tmp_path / "sd3")
    from_folder = model_from_pipeline(str(tmp_path / "sd3"), prompts=PROMPTS)
    from_object = model_from_pipeline(sd3, prompts=PROMPTS)
    assert from_folder.fingerprint() == from_object.fingerprint()
    x = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(6))
    y = torch.tensor([0, 2, 3])
    with torch.no_grad():
        a = from_folder.velocity(x, 0.4, y, guidance=2.0)
        b = from_object.velocity(x, 0.4, y, guidance=2.0)
    assert torch.equal(a, b)


def test_model_from_pipeline_bad_inputs(tmp_path, dit, sd3):
    with pytest.raises(DiffusersError, match="text pipeline: pass prompts"):
        model_from_pipeline(sd3)
    with pytest.raises(DiffusersError, match="takes no text prompts"):
        model_from_pipeline(dit, prompts=["a cat"])
    with pytest.raises(DiffusersError, match="needs a text pipeline"):
        model_from_pipeline(dit, negative_prompt="blurry")
    with pytest.raises(DiffusersError, match="no model_index.json"):
        model_from_pipeline(tmp_path)


def test_network_weights_are_frozen_but_inputs_get_gradients(dit):
    model = model_from_pipeline(dit)
    x = torch.randn(1, 4, 8, 8, requires_grad=True)
    t = torch.tensor([0.3], dtype=torch.float64, requires_grad=True)
    model.velocity(x, t, y=torch.tensor([1])).square().sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert t.grad is not None and t.grad.abs() > 0
    assert all(p.grad is None for p in dit.transformer.parameters())
    assert not dit.transformer.training


# -- the command line ---------------------------------------------------------------------------


def test_cli_distill_on_a_saved_pipeline(tmp_path, dit, monkeypatch):
    cli = pytest.importorskip("bns.cli")
    dit.save_pretrained(tmp_path / "dit")
    out = tmp_path / "solver.json"
    argv = [
        "distill",
        "--model",
        f"diffusers:{tmp_path / 'dit'}",
        "--nfe",
        "4",
        "--train-pairs",
        "8",
        "--val-pairs",
        "8",
        "--adam-steps",
        "3",
        "--batch-size",
        "4",
        "--rtol",  # a loose ground truth: the test is about the files and the pipeline
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
    model = model_from_pipeline(str(tmp_path / "dit"))
    solver = bns.NSSolver.load(out, model=model)  # trained for this very model
    assert solver.nfe == 4
    # The trained solver drops into the pipeline with no further information.
    pipe = DiTPipeline.from_pretrained(tmp_path / "dit")
    # The fingerprint is the weights' and settings', not the folder's.
    assert model_from_pipeline(pipe).fingerprint() == model.fingerprint()
    pipe.scheduler = BNSScheduler.from_solver(solver)
    got = _final_latents(
        pipe,
        monkeypatch,
        class_labels=[1],
        guidance_scale=1.0,
        generator=torch.Generator().manual_seed(4),
        num_inference_steps=4,
    )
    x0 = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        ref = bns.sample(model, x0, solver, y=torch.tensor([1]))
    assert (got - ref).abs().max() <= 1e-5 * ref.abs().max()
