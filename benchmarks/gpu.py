"""GPU benchmark: ground-truth throughput, distillation step time and memory, BNS vs Euler
sampling time and (with ``--protocol``) the paper's full protocol, in one run.

    PYTHONPATH=src python benchmarks/gpu.py                       # cuda if available, else cpu
    PYTHONPATH=src python benchmarks/gpu.py --protocol --nfe 4,6,8,10,12,16
    PYTHONPATH=src python benchmarks/gpu.py --tiny --device cpu --out /tmp/gpu-tiny

Writes ``gpu_<device>.json`` and ``.md`` (``gpu_<device>_tiny.*`` with ``--tiny``) to ``--out``
(default ``benchmarks/results``), after every section, so a run cut short keeps what it measured.
Sections:

- ground truth: pairs/s and network forwards/s of the adaptive dopri5 solve (fmnist-cfg, guided,
  rtol = atol = 1e-5, no cache) at each ``--gt-batch-size``;
- distillation step: the time and peak memory of one loss-and-gradient pass of the BNS family
  (what every step of ``bns.distill`` runs) at NFE 8 and 16, without and with per-step gradient
  checkpointing and micro-batching, on fmnist-cfg and on a ~25M-parameter 64x64x3
  class-conditional U-Net with random weights (``TinyUNet``), batch 32;
- sampling: an NS solver with dense coefficients (the cost of any trained BNS solver) through
  ``bns.sample`` against a plain Euler loop at the same NFE, interleaved repeats, medians;
- large (on CUDA and with ``--tiny``; ``--sections large`` alone): the real architectures with
  random weights, built offline from their configs (SD 1.5's UNet, SDXL's UNet, SD3-medium's
  transformer; ``--large-models``), in bf16 (``--large-dtype``), wrapped as bns's diffusers
  integration wraps their pipelines, with classifier-free guidance (2 forwards per evaluation):
  ground-truth pairs/s; one Gauss-Newton step's and one checkpointed, micro-batched Adam
  step's time and peak memory; BNS sampling against the pipeline's own scheduler; and the
  projected time to a solver at NFE 8 with bns's defaults (``bns.estimate``). Random weights:
  real costs, not real quality;
- protocol (``--protocol``): 520 train / 1024 val / 1024 test pairs, the default optimizer with
  patience, ``init="best"``; per (model, guidance, NFE) the BNS test PSNR, the best classical
  solver at NFE and at 2 x NFE, and the wall time including all the ground truth.

``--tiny`` runs everything at toy sizes (seconds on a CPU; fmnist-cfg's ground truth to 1e-3, the
U-Net on 16x16 images, the large section's networks keep their classes with toy configs, at NFE
2): a smoke test of the script. Targets (pass/fail judged on a GPU at full sizes only): the
protocol at NFE 8 on fmnist-cfg in under 60 s including ground truth; the 25M U-Net at NFE 16,
batch 32, under 8 GB with checkpointing; BNS sampling within 1% of Euler's time.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import re
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.autograd.forward_ad as fwAD
from cost import _dense_solver, euler_loop, md_head, md_table, sampling_inputs, time_interleaved
from torch import nn

import bns
import bns.estimate as bns_estimate
from bns.classical import best_classical
from bns.config import DistillConfig
from bns.cost import uncounted
from bns.evaluate import best_rows, evaluate
from bns.families import make_family
from bns.gauss_newton import _forward_mode, check_forward_mode, gauss_newton_step
from bns.loss import loss_and_grad
from bns.model import frozen
from bns.models.unet import TinyUNet, UNetConfig
from bns.pairs import Pairs, make_pairs
from bns.schedules import CondOT
from bns.solvers import initial_solver
from bns.specs import load_model

RESULTS = Path(__file__).parent / "results"
SECTIONS = ("ground_truth", "distill_step", "sampling", "large")

# 24.6M parameters: blocks at 32x32 (256 channels) and 16x16 (384), a stem at 64x64 (128).
UNET_25M = UNetConfig(
    in_channels=3, channels=(128, 256, 384), blocks=2, emb_dim=512, num_classes=1000
)
UNET_TINY = UNetConfig(in_channels=3, channels=(8, 16), blocks=1, emb_dim=16, num_classes=10)


@dataclass
class Sizes:
    """How much of everything a run measures."""

    gt_pairs: int = 1024
    gt_batches: tuple[int, ...] = (128, 1024)
    step_batch: int = 32
    micro_batch: int = 8
    step_repeats: int = 3
    step_nfes: tuple[int, ...] = (8, 16)
    sample_batch: dict[str, int] = field(default_factory=lambda: {"fmnist-cfg": 256, "unet": 32})
    sample_repeats: int = 20
    unet: UNetConfig = UNET_25M
    unet_size: int = 64  # the U-Net's images: unet_size x unet_size x 3
    train_pairs: int = 520
    val_pairs: int = 1024
    test_pairs: int = 1024
    steps: int | None = None  # None: bns's default optimizer (Gauss-Newton steps)
    patience: int = 20
    gt_rtol: float | None = None  # of the ground truth; None: bns's default (1e-5 here)


TINY = Sizes(
    gt_pairs=2,
    gt_batches=(2,),
    step_batch=2,
    step_nfes=(4, 8),  # a smoke test: NFE 16's step is 4 times NFE 8's and tests nothing more
    micro_batch=1,
    step_repeats=1,
    sample_batch={"fmnist-cfg": 2, "unet": 2},
    sample_repeats=3,
    unet=UNET_TINY,
    unet_size=16,  # a smoke test: 64x64 costs 4x the convolutions and tests nothing more
    train_pairs=2,
    val_pairs=2,
    test_pairs=2,
    steps=2,
    patience=1,
    gt_rtol=1e-3,  # a smoke test: a quarter of the network calls of 1e-5 (fmnist-cfg, w = 2)
)


def _steps_text(steps: int | None) -> str:
    return "the default optimizer" if steps is None else f"up to {steps} Adam steps"


class Clock:
    """Wall time that waits for the device's queued work before each reading."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def __call__(self) -> float:
        self.sync()
        return time.perf_counter()


def unet_model(
    config: UNetConfig, device: torch.device, seed: int = 0, size: int = 64
) -> bns.Model:
    """A class-conditional velocity U-Net on ``size`` x ``size`` x 3 images with random weights
    everywhere (its zero-initialized output layers too, so every layer does real work)."""
    torch.manual_seed(seed)
    net = TinyUNet(config)
    with torch.no_grad():
        for p in net.parameters():
            if p.dim() > 1 and not p.any():
                nn.init.normal_(p, std=0.02)
    n = sum(p.numel() for p in net.parameters())
    return bns.Model(
        net,
        prediction="velocity",
        schedule=CondOT(),
        sample_shape=(3, size, size),
        num_classes=config.num_classes,
        name=f"unet-{n / 1e6:.1f}M" if n >= 1e5 else f"unet-{n / 1e3:.0f}k",
    ).to(device)


def _mem_reset(device: torch.device) -> int | None:
    if device.type != "cuda":
        return None
    torch.cuda.reset_peak_memory_stats(device)
    return torch.cuda.memory_allocated(device)


def _gb(n: int | None) -> float | None:
    return None if n is None else n / 1e9


# -- sections ---------------------------------------------------------------------------------


def ground_truth_section(model, guidance, sizes: Sizes, clock: Clock) -> list[dict]:
    rows = []
    for batch in sizes.gt_batches:
        f0, t0 = model.forwards, clock()
        pairs = make_pairs(
            model,
            sizes.gt_pairs,
            "test",
            seed=777,
            guidance=guidance,
            rtol=sizes.gt_rtol,
            batch_size=batch,
            cache=False,
            progress=False,
        )
        s = clock() - t0
        rows.append(
            {
                "model": model.name,
                "guidance": guidance,
                "pairs": sizes.gt_pairs,
                "batch": batch,
                "seconds": s,
                "pairs_per_s": sizes.gt_pairs / s,
                "forwards_per_s": (model.forwards - f0) / s,
                "nfe_per_sample": pairs.nfe_per_sample,
            }
        )
        print(f"ground truth: {rows[-1]}", file=sys.stderr)
    return rows


def step_cost(model, guidance, nfe, batch, micro, checkpoint, repeats, clock) -> dict:
    """Time and peak memory of the loss-and-gradient pass of one distillation step."""
    device = clock.device
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn((batch, *model.sample_shape), generator=g)
    y = torch.arange(batch) % model.num_classes if model.num_classes else None
    pairs = Pairs(x0, torch.randn(x0.shape, generator=g), y).to(device)
    family = make_family("bns", initial_solver(model, nfe, "midpoint"))
    row: dict[str, Any] = {"model": model.name, "nfe": nfe, "batch": batch}
    row.update(guidance=guidance, micro_batch=micro, checkpoint=checkpoint)

    def step():
        return loss_and_grad(
            family, model, pairs, guidance, micro_batch=micro, checkpoint=checkpoint
        )

    try:
        with frozen(model):
            step()  # warm-up (kernel selection, allocator)
            base = _mem_reset(device)
            times, f0 = [], model.forwards
            for _ in range(repeats):
                t0 = clock()
                loss, _ = step()
                times.append(clock() - t0)
    except torch.cuda.OutOfMemoryError:
        torch.cuda.empty_cache()
        return {**row, "error": "out of memory"}
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    s = statistics.median(times)
    row.update(seconds=s, forwards_per_s=(model.forwards - f0) / sum(times), loss=loss)
    row.update(peak_gb=_gb(peak), added_gb=_gb(None if peak is None else peak - base))
    return row


def distill_step_section(models, guidance, sizes: Sizes, clock: Clock) -> list[dict]:
    variants = [(0, False), (0, True), (sizes.micro_batch, False), (sizes.micro_batch, True)]
    rows = []
    for model in models:
        for nfe in sizes.step_nfes:
            for micro, ck in variants:
                r = step_cost(
                    model, guidance, nfe, sizes.step_batch, micro, ck, sizes.step_repeats, clock
                )
                rows.append(r)
                print(f"distill step: {r}", file=sys.stderr)
    return rows


def sampling_section(models, guidance, sizes: Sizes, clock: Clock) -> list[dict]:
    rows = []
    for model in models:
        kind = "unet" if model.name.startswith("unet") else "fmnist-cfg"
        batch = sizes.sample_batch[kind]
        x0, y = sampling_inputs(model, batch, clock.device)
        for nfe in (8, 16):
            fns = _samplers(model, x0, y, nfe, guidance)
            t = time_interleaved(fns, sizes.sample_repeats, clock.sync)
            b, e = statistics.median(t["bns"]), statistics.median(t["euler"])
            rows.append(
                {
                    "model": model.name,
                    "guidance": guidance,
                    "nfe": nfe,
                    "batch": batch,
                    "repeats": sizes.sample_repeats,
                    "bns_s": b,
                    "euler_s": e,
                    "ratio": b / e,
                }
            )
            print(f"sampling: {rows[-1]}", file=sys.stderr)
    return rows


def _samplers(model, x0, y, nfe, guidance) -> dict:
    """BNS (a dense NS solver through ``bns.sample``) and a plain Euler loop at ``nfe``."""
    ns = _dense_solver(model, nfe)
    return {
        "bns": lambda: bns.sample(model, x0, ns, y, guidance),
        "euler": lambda: euler_loop(model, x0, nfe, y, guidance),
    }


# -- large models: real architectures with random weights ----------------------------------------

# The real networks' configs (their config.json on the hub), written out: nothing is downloaded.
SD15_UNET = {  # runwayml/stable-diffusion-v1-5, unet/config.json
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "layers_per_block": 2,
    "block_out_channels": (320, 640, 1280, 1280),
    "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    "cross_attention_dim": 768,
    "attention_head_dim": 8,
    "norm_num_groups": 32,
}
SDXL_UNET = {  # stabilityai/stable-diffusion-xl-base-1.0, unet/config.json
    "sample_size": 128,
    "in_channels": 4,
    "out_channels": 4,
    "layers_per_block": 2,
    "block_out_channels": (320, 640, 1280),
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    "transformer_layers_per_block": (1, 2, 10),
    "attention_head_dim": (5, 10, 20),
    "cross_attention_dim": 2048,
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816,  # pooled text (1280) + 6 time ids x 256
    "norm_num_groups": 32,
}
SD3_MEDIUM = {  # stabilityai/stable-diffusion-3-medium-diffusers, transformer/config.json
    "sample_size": 128,
    "patch_size": 2,
    "in_channels": 16,
    "out_channels": 16,
    "num_layers": 24,
    "attention_head_dim": 64,
    "num_attention_heads": 24,
    "joint_attention_dim": 4096,
    "caption_projection_dim": 1536,
    "pooled_projection_dim": 2048,
    "pos_embed_max_size": 192,
}
# Stable Diffusion's (1.x and XL) training schedule: scaled_linear betas, epsilon prediction.
SD_BETAS = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear"}


@dataclass(frozen=True)
class Arch:
    """A real architecture: its diffusers class, config, the pipeline's scheduler, the prompt
    embeddings its pipeline hands it, and its config at ``--tiny`` (same class, toy sizes)."""

    key: str
    label: str
    cls: str
    config: dict
    tiny: dict
    guidance: float
    tokens: int  # prompt tokens: CLIP's 77 (SD3: 77 CLIP + 256 T5)
    scheduler: str  # the pipeline's own scheduler the loop runs

    def conf(self, tiny: bool) -> dict:
        return {**self.config, **self.tiny} if tiny else dict(self.config)


_UNET_TINY = {"sample_size": 8, "layers_per_block": 1, "norm_num_groups": 4}
ARCHS = (
    Arch(
        "sd1.5",
        "Stable Diffusion 1.5 UNet",
        "UNet2DConditionModel",
        SD15_UNET,
        {
            **_UNET_TINY,
            "block_out_channels": (8, 16),
            "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
            "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"),
            "cross_attention_dim": 16,
            "attention_head_dim": 2,
        },
        7.5,
        77,
        "DPMSolverMultistepScheduler",
    ),
    Arch(
        "sdxl",
        "SDXL base UNet",
        "UNet2DConditionModel",
        SDXL_UNET,
        {
            **_UNET_TINY,
            "block_out_channels": (8, 16),
            "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
            "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"),
            "transformer_layers_per_block": (1, 1),
            "attention_head_dim": (2, 4),
            "cross_attention_dim": 32,
            "addition_time_embed_dim": 4,
            "projection_class_embeddings_input_dim": 16 + 6 * 4,
        },
        5.0,
        77,
        "DPMSolverMultistepScheduler",
    ),
    Arch(
        "sd3-medium",
        "SD3-medium transformer",
        "SD3Transformer2DModel",
        SD3_MEDIUM,
        {
            "sample_size": 8,
            "in_channels": 4,
            "out_channels": 4,
            "num_layers": 1,
            "attention_head_dim": 8,
            "num_attention_heads": 2,
            "joint_attention_dim": 16,
            "caption_projection_dim": 16,
            "pooled_projection_dim": 32,
            "pos_embed_max_size": 16,
        },
        7.0,
        77 + 256,
        "FlowMatchEulerDiscreteScheduler",
    ),
)
LARGE_PROMPTS = 4  # random prompt embeddings (labels 0..3; 4 is the negative prompt)


@dataclass
class LargeSizes:
    """How much the large-models section measures per network."""

    gt_pairs: dict[str, int]  # pairs of the timed ground-truth solve
    gn_pairs: dict[str, int]  # pairs of the timed Gauss-Newton step
    nfe: int = 8  # of every measurement and of the projection
    micro_batch: int = 1  # of the Gauss-Newton and Adam steps and of the projection
    adam_batch: int = 2
    sample_batch: int = 2
    sample_repeats: int = 3
    # bns.estimate: pairs of its pilot ground-truth solve, and the largest batch it times
    # (larger batches are scaled linearly from it)
    pilot_pairs: int = 1
    max_timed_batch: int = 4
    estimate_repeats: int = 1
    # ground-truth tolerance: None is bns's default for the dtype; --tiny loosens it (a smoke
    # test of the code path, not a measurement)
    rtol: float | None = None


LARGE = LargeSizes(
    gt_pairs={"sd1.5": 8, "sdxl": 4, "sd3-medium": 2},
    gn_pairs={"sd1.5": 2, "sdxl": 2, "sd3-medium": 1},
)
LARGE_TINY = LargeSizes(
    gt_pairs={a.key: 1 for a in ARCHS},
    gn_pairs={a.key: 1 for a in ARCHS},
    # forward mode on a CPU: ~10 ms of dispatch per call, and the calls grow as NFE^2 / 2 (NFE 4
    # runs 10, 8 36): the smallest NFE, for a smoke test of the code path
    nfe=2,
    adam_batch=2,
    sample_batch=1,
    sample_repeats=2,
    max_timed_batch=2,
    rtol=1e-2,
)


def _count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.0f}M" if n >= 1e6 else f"{n / 1e3:.0f}k"


def large_model(arch: Arch, tiny: bool, device: torch.device, dtype: torch.dtype) -> bns.Model:
    """``arch`` built from its config with random weights, on ``device`` in ``dtype``, as the
    diffusers integration wraps its pipeline's denoiser (:mod:`bns.integrations.diffusers`):
    fixed random prompt embeddings of the shapes the pipeline's text encoders give, the
    negative prompt last (the null label), the model's interface in float64."""
    import diffusers
    from diffusers import DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler

    from bns.integrations.diffusers._conventions import (
        BNS_PREDICTION_OF,
        bns_schedule,
        describe_scheduler,
    )
    from bns.integrations.diffusers._text import _SD3Net, _SDNet

    cfg = arch.conf(tiny)
    torch.manual_seed(0)
    with torch.device(device):  # initialized where it runs: seconds, not minutes, at 2.6B
        denoiser = getattr(diffusers, arch.cls)(**cfg)
    with torch.no_grad():  # every layer does real work (no zero-initialized output)
        for p in denoiser.parameters():
            if p.dim() > 1 and not p.any():
                nn.init.normal_(p, std=0.02)
    denoiser = denoiser.to(device=device, dtype=dtype).eval().requires_grad_(False)
    g = torch.Generator().manual_seed(1)
    tokens = 8 if tiny else arch.tokens

    def embeds(*shape: int) -> torch.Tensor:
        return torch.randn((LARGE_PROMPTS + 1, *shape), generator=g).to(device, dtype)

    size = cfg["sample_size"]
    if arch.cls == "SD3Transformer2DModel":
        scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)  # SD3's
        buffers = {
            "embeds": embeds(tokens, cfg["joint_attention_dim"]),
            "pooled": embeds(cfg["pooled_projection_dim"]),
        }
        make_net = _SD3Net
    else:
        scheduler = DPMSolverMultistepScheduler(**SD_BETAS, steps_offset=1)
        buffers = {
            "embeds": embeds(tokens, cfg["cross_attention_dim"]),
            "pooled": None,
            "time_ids": None,
            "timestep_cond": None,
        }
        if cfg.get("addition_embed_type") == "text_time":  # SDXL: pooled text and time ids
            pooled = cfg["projection_class_embeddings_input_dim"]
            pooled -= 6 * cfg["addition_time_embed_dim"]
            pixels = 8 * size  # original_size = target_size = (h, w), no crop: the default call's
            ids = torch.tensor([[pixels, pixels, 0, 0, pixels, pixels]])
            buffers.update(pooled=embeds(pooled), time_ids=ids.to(device, dtype))
        make_net = _SDNet
    desc = describe_scheduler(scheduler)
    pred = desc["prediction_type"]
    net = make_net(denoiser, pred, desc["num_train_timesteps"], buffers)
    net.pipeline_scheduler = scheduler
    n = sum(p.numel() for p in denoiser.parameters())
    return bns.Model(
        net,
        prediction=BNS_PREDICTION_OF[pred],
        schedule=bns_schedule(pred, desc["alphas_cumprod"]),
        sample_shape=(cfg["in_channels"], size, size),
        t_range=(0.0, 1.0),
        num_classes=LARGE_PROMPTS,
        name=f"{arch.key}-{_count(n)}",
        dtype=torch.float64,
    )


def _denoise(net, x: torch.Tensor, t: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """The denoiser called as its pipeline's loop calls it (a diffusers timestep ``t``)."""
    d = net.denoiser
    if type(d).__name__ == "SD3Transformer2DModel":
        return d(
            hidden_states=x,
            timestep=t.expand(len(x)),
            encoder_hidden_states=net.embeds[rows],
            pooled_projections=net.pooled[rows],
            return_dict=False,
        )[0]
    added = None
    if net.time_ids is not None:
        added = {"text_embeds": net.pooled[rows], "time_ids": net.time_ids.expand(len(x), -1)}
    return d(
        x, t, encoder_hidden_states=net.embeds[rows], added_cond_kwargs=added, return_dict=False
    )[0]


def pipeline_loop(model: bns.Model, x0, y, guidance: float, nfe: int) -> torch.Tensor:
    """The pipeline's own denoising loop: its scheduler, ``nfe`` steps, classifier-free
    guidance on the doubled batch (negative prompt first), latents in the network's dtype."""
    net = model.net
    scheduler = net.pipeline_scheduler
    rows = torch.cat([torch.full_like(y, model.null_label), y])
    scheduler.set_timesteps(nfe, device=x0.device)
    x = x0.to(net.net_dtype) * getattr(scheduler, "init_noise_sigma", 1.0)
    scale = getattr(scheduler, "scale_model_input", lambda x, t: x)  # flow matching: none
    for t in scheduler.timesteps:
        inp = scale(torch.cat([x, x]), t)
        uncond, cond = _denoise(net, inp, t, rows).chunk(2)
        x = scheduler.step(uncond + guidance * (cond - uncond), t, x, return_dict=False)[0]
    return x


def projected_cost(model, guidance, nfe, sizes: LargeSizes, device, max_stack: int) -> dict:
    """``bns.estimate.estimate_cost`` of a distillation at ``nfe`` with the default settings
    (micro-batched), its pilot and timings cut down to what a benchmark can afford."""
    t0 = time.perf_counter()
    ledger, cfg = bns_estimate.estimate_cost(
        model,
        nfe,
        guidance=guidance,
        micro_batch=sizes.micro_batch,
        gn_max_stack=max_stack,
        rtol=sizes.rtol,
        cache=False,
        device=device,
        repeats=sizes.estimate_repeats,
        pilot_pairs=sizes.pilot_pairs,
        max_timed_batch=sizes.max_timed_batch,
        return_config=True,
    )
    spent = time.perf_counter() - t0
    phases = ledger.to_dict()
    keep = ("nfe", "guidance", "train_pairs", "val_pairs", "init_pairs", "adam_steps", "gn_steps")
    keep += ("gn_batch_size", "micro_batch", "gt_batch_size", "eval_batch_size")
    return {
        "phases": phases,
        "total_s": phases["total"]["seconds"],
        "settings": {k: getattr(cfg, k) for k in keep},
        "estimate_s": spent,
        "pilot_pairs": sizes.pilot_pairs,
        "timed_up_to_pairs": sizes.max_timed_batch,
        "gn_max_stack": max_stack,
    }


DEFAULT_MAX_STACK = DistillConfig.__dataclass_fields__["gn_max_stack"].default


def stack_that_fits(model, guidance, micro, nfe, device) -> int:
    """``max_stack`` for the Gauss-Newton step: bns's default (every tangent that starts at a
    step in one forward-mode call: up to nfe + 1 per pair) when one call that size fits in the
    GPU's memory, else the most tangent columns (times ``micro`` pairs) that do, halving from
    nfe + 1: one probing call each (forward mode runs attention through the math kernel, whose
    attention matrices grow as tokens squared per sample)."""
    if device.type != "cuda":
        return DEFAULT_MAX_STACK
    cols = nfe + 1
    with uncounted(model):  # a probe, not the step's work
        while cols > 1:
            x = torch.randn(cols * micro, *model.sample_shape, device=device)
            y = torch.zeros(len(x), dtype=torch.long, device=device)
            try:
                with _forward_mode():
                    model.velocity(fwAD.make_dual(x, torch.ones_like(x)), 0.5, y, guidance)
                break
            except torch.cuda.OutOfMemoryError:
                del x, y
                torch.cuda.empty_cache()
                cols //= 2
    return DEFAULT_MAX_STACK if cols == nfe + 1 else cols * micro


def gn_step_cost(model, guidance, pairs: Pairs, nfe, micro, clock) -> dict:
    """Time and peak memory of one Gauss-Newton (Levenberg-Marquardt) step on ``pairs``, as
    ``bns.distill`` runs it (``gauss_newton_step``, micro-batched)."""
    device = clock.device
    cfg = DistillConfig(nfe=nfe, guidance=guidance, micro_batch=micro)
    cfg = cfg.replace(gn_batch_size=len(pairs))
    family = make_family("bns", initial_solver(model, nfe, "midpoint"))
    row: dict[str, Any] = {"nfe": nfe, "pairs": len(pairs), "micro_batch": micro}
    try:
        with frozen(model):
            check_forward_mode(model, guidance, device)  # forward mode warmed up, untimed
            stack = stack_that_fits(model, guidance, micro or len(pairs), nfe, device)
            row["max_stack"] = stack
            cfg = cfg.replace(gn_max_stack=stack)
            base = _mem_reset(device)
            f0, j0, t0 = model.forwards, model.jvps, clock()
            loss, _, _ = gauss_newton_step(
                family, model, pairs, torch.arange(len(pairs)), cfg, 1e-3
            )
            s = clock() - t0
    except torch.cuda.OutOfMemoryError:
        torch.cuda.empty_cache()
        return {**row, "error": "out of memory"}
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    row.update(seconds=s, forwards=model.forwards - f0, jvps=model.jvps - j0)
    row.update(peak_gb=_gb(peak), added_gb=_gb(None if peak is None else peak - base))
    row["loss"] = loss if math.isfinite(loss) else None
    # Levenberg-Marquardt's trial runs (each nfe evaluations of the pairs): 1 when the first
    # try is accepted, as bns.estimate assumes; up to 8 when the damping has to grow.
    run = model.forwards_per_evaluation(guidance) * nfe * len(pairs)
    row["lm_tries"] = (row["forwards"] - run) // run
    return row


def _guarded(fn, *args) -> dict:
    """``fn(*args)``, or ``{"error": ...}`` when it fails (out of GPU memory, an operation
    without a forward-mode formula, ...): one failed measurement costs the run nothing else."""
    try:
        return fn(*args)
    except Exception as e:  # recorded in the results, the traceback on stderr
        import traceback

        traceback.print_exc()
        if isinstance(e, torch.cuda.OutOfMemoryError):
            torch.cuda.empty_cache()
            return {"error": "out of memory"}
        return {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"}


def large_ground_truth(model, guidance, k, clock, rtol=None) -> dict:
    """One adaptive solve of ``k`` pairs, no cache, at the default tolerance of the network's
    dtype; the row keeps the pairs (``"pairs_data"``) for the steps measured next."""
    x0, y = sampling_inputs(model, k, clock.device)
    with torch.no_grad():
        model.velocity(x0, 0.5, y, guidance)  # warm-up
    f0, t0 = model.forwards, clock()
    x1, stats = bns.ground_truth(model, x0, y, guidance, rtol=rtol, return_stats=True)
    s = clock() - t0
    return {
        "pairs": k,
        "seconds": s,
        "pairs_per_s": k / s,
        "forwards_per_s": (model.forwards - f0) / s,
        "nfe_per_sample": stats["nfe"],
        "tolerance": rtol or bns.default_tolerance(model.precision),
        "pairs_data": Pairs(x0.float(), x1.float(), y),
    }


def large_sampling(model, guidance, arch: Arch, nfe, sizes: LargeSizes, clock) -> dict:
    """A dense NS solver through ``bns.sample`` (a trained BNS solver's cost) against the
    pipeline's own loop and scheduler, same network, NFE, batch and guidance; medians."""
    x0, y = sampling_inputs(model, sizes.sample_batch, clock.device)
    ns = _dense_solver(model, nfe)
    fns = {
        "bns": lambda: bns.sample(model, x0, ns, y, guidance),
        "pipeline": lambda: pipeline_loop(model, x0, y, guidance, nfe),
    }
    t = time_interleaved(fns, sizes.sample_repeats, clock.sync)
    b, p = statistics.median(t["bns"]), statistics.median(t["pipeline"])
    row = {"nfe": nfe, "batch": sizes.sample_batch, "repeats": sizes.sample_repeats}
    return {**row, "bns_s": b, "pipeline_s": p, "ratio": b / p, "scheduler": arch.scheduler}


def large_models_section(archs, sizes: LargeSizes, tiny, dtype, clock, done) -> list[dict]:
    """Per real architecture (random weights): ground-truth pairs/s, one Gauss-Newton step and
    one checkpointed Adam step (time, peak memory), BNS sampling against the pipeline's own
    scheduler, and the projected time to a solver, at NFE ``sizes.nfe``. ``done(rows)`` after each
    measurement, so a run cut short keeps what it measured."""
    import gc

    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()  # "modules to keep in float32": there are none
    device, nfe, m, rows = clock.device, sizes.nfe, sizes.micro_batch, []
    for arch in archs:
        t_start = clock()
        model = large_model(arch, tiny, device, dtype)
        w = arch.guidance
        row: dict[str, Any] = {"model": model.name, "arch": arch.key, "label": arch.label}
        row.update(cls=arch.cls, params=sum(p.numel() for p in model.net.denoiser.parameters()))
        row.update(dtype=str(dtype).removeprefix("torch."), guidance=w, build_s=clock() - t_start)
        row.update(sample_shape=list(model.sample_shape), config=arch.conf(tiny))
        rows.append(row)

        def log(key: str, row: dict = row) -> None:
            print(f"large {row['arch']} {key}: {row[key]}", file=sys.stderr)
            done(rows)

        gt = _guarded(large_ground_truth, model, w, sizes.gt_pairs[arch.key], clock, sizes.rtol)
        pairs = gt.pop("pairs_data", None)
        row["ground_truth"] = gt
        log("ground_truth")
        if pairs is None:  # the steps' cost does not depend on the targets
            x0, y = sampling_inputs(model, sizes.gn_pairs[arch.key], device)
            pairs = Pairs(x0, torch.randn_like(x0), y)
        gn_pairs = pairs[: sizes.gn_pairs[arch.key]]
        row["gn_step"] = _guarded(gn_step_cost, model, w, gn_pairs, nfe, m, clock)
        log("gn_step")
        adam = _guarded(step_cost, model, w, nfe, sizes.adam_batch, m, True, 1, clock)
        row["adam_step"] = {k: v for k, v in adam.items() if k not in ("model", "guidance")}
        log("adam_step")
        row["sampling"] = _guarded(large_sampling, model, w, arch, nfe, sizes, clock)
        log("sampling")
        stack = row["gn_step"].get("max_stack", DEFAULT_MAX_STACK)  # what fitted in memory
        row["projected"] = _guarded(projected_cost, model, w, nfe, sizes, device, stack)
        row["section_s"] = clock() - t_start
        log("projected")
        del model, pairs, gn_pairs
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def protocol_section(specs, nfes, sizes: Sizes, clock: Clock, deadline: float) -> list[dict]:
    """The paper's protocol per (model, guidance): ground truth for the three splits, then per
    NFE distillation from the best classical solver and the test PSNR of it and of every
    classical solver at NFE and 2 x NFE."""
    rows = []
    for spec in specs:
        name, _, g = spec.partition(":")
        guidance = float(g or 1.0)
        if time.perf_counter() > deadline:
            rows.append({"model": name, "guidance": guidance, "skipped": "time budget"})
            continue
        model = load_model(name).to(clock.device)
        kw = dict(seed=0, guidance=guidance, rtol=sizes.gt_rtol, cache=False, progress=False)
        t0 = clock()
        train = make_pairs(model, sizes.train_pairs, "train", **kw)
        val = make_pairs(model, sizes.val_pairs, "val", **kw)
        test = make_pairs(model, sizes.test_pairs, "test", **kw)
        gt_s = clock() - t0
        for nfe in nfes:
            if time.perf_counter() > deadline:
                rows.append(
                    {"model": name, "guidance": guidance, "nfe": nfe, "skipped": "time budget"}
                )
                continue
            t1 = clock()
            solver, hist = bns.distill(
                model,
                nfe,
                guidance=guidance,
                pairs=(train, val),
                adam_steps=sizes.steps,
                patience=sizes.patience,
                progress=False,
            )
            distill_s = clock() - t1
            entries = [
                ("bns", nfe, solver),
                *best_classical(model, [nfe, 2 * nfe], val[:64], guidance=guidance),
            ]
            res = evaluate(model, entries, test, guidance, kinds={"bns": "bns"})
            eval_s = clock() - t1 - distill_s
            best = best_rows(res)
            row = {
                "model": name,
                "guidance": guidance,
                "nfe": nfe,
                "bns_psnr": best_rows(res, "bns")[nfe]["psnr_mean"],
                "init": solver.meta["init"],
                "best_classical": _best(best.get(nfe)),
                "best_classical_2nfe": _best(best.get(2 * nfe)),
                "steps_run": hist["steps_run"],
                "best_step": hist["best_step"],
                "ground_truth_s": gt_s,
                "ground_truth_nfe_per_sample": train.nfe_per_sample,
                "distill_s": distill_s,
                "eval_s": eval_s,
                "wall_s": gt_s + distill_s + eval_s,
                "pairs": [len(train), len(val), len(test)],
            }
            rows.append(row)
            print(f"protocol: {row}", file=sys.stderr)
    return rows


def _best(row: dict | None) -> dict | None:
    return None if row is None else {"solver": row["solver"], "psnr": row["psnr_mean"]}


# -- targets and report -----------------------------------------------------------------------


def targets(res: dict) -> dict[str, dict]:
    """Each target's measured value and whether it passes (None: not measured or not a GPU)."""
    judged = res["device"]["type"] == "cuda" and not res["tiny"]  # sizes the targets name
    out = {}
    walls = [
        r["wall_s"]
        for r in res.get("protocol", [])
        if r.get("model") == "fmnist-cfg" and r.get("nfe") == 8 and "wall_s" in r
    ]
    out["protocol_nfe8_fmnist_cfg_under_60s"] = (max(walls) if walls else None, 60.0, "s")
    mem = [
        r.get("peak_gb")
        for r in res.get("distill_step", [])
        if r["model"].startswith("unet")
        and r["nfe"] == 16
        and r["checkpoint"]
        and r["micro_batch"] == 0
    ]
    out["unet_nfe16_batch32_checkpoint_under_8gb"] = (mem[0] if mem else None, 8.0, "GB")
    ratios = [r["ratio"] for r in res.get("sampling", [])]
    out["bns_sampling_within_1pct_of_euler"] = (max(ratios) if ratios else None, 1.01, "x")
    return {
        k: {
            "value": v,
            "limit": lim,
            "unit": unit,
            "pass": (v < lim if k.endswith("60s") else v <= lim)
            if judged and v is not None
            else None,
        }
        for k, (v, lim, unit) in out.items()
    }


def _f(v: Any, fmt: str = ".3g") -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return format(v, fmt)
    return str(v)


def _protocol_cells(r: dict) -> list:
    head = [r["model"], f"{r['guidance']:g}", r.get("nfe", "")]
    if "skipped" in r:
        return head + ["skipped"] + [""] * 7
    c1, c2 = (
        "" if c is None else f"{c['solver']} {c['psnr']:.2f}"
        for c in (r["best_classical"], r["best_classical_2nfe"])
    )
    times = [f"{r[k]:.1f}" for k in ("ground_truth_s", "distill_s", "wall_s")]
    steps = f"{r['steps_run']} ({r['best_step']})"
    return head + [f"{r['bns_psnr']:.2f}", r["init"], c1, c2, steps] + times


def markdown(res: dict) -> str:
    name, tiny = res["device"]["name"], " (tiny sizes)" if res["tiny"] else ""
    lines = md_head(
        f"GPU benchmark on {name}{tiny}",
        f"Device: {name} ({res['device']['type']}), torch {res['torch']}, {res['machine']}."
        f"\nCommand: `{res['command']}`.",
    )
    rtol = res["sizes"].get("gt_rtol")
    lines += md_table(
        [f"ground truth (dopri5, {'1e-5' if rtol is None else f'{rtol:g}'})", "guidance"]
        + ["pairs", "batch", "s", "pairs/s"]
        + ["forwards/s", "NFE/sample"],
        [
            [r["model"], f"{r['guidance']:g}", r["pairs"], r["batch"], f"{r['seconds']:.2f}"]
            + [
                f"{r['pairs_per_s']:.1f}",
                f"{r['forwards_per_s']:.0f}",
                f"{r['nfe_per_sample']:.1f}",
            ]
            for r in res.get("ground_truth", [])
        ],
    )
    lines += md_table(
        ["distillation step (loss + gradient)", "NFE", "batch", "micro-batch", "checkpoint"]
        + ["s/step", "peak GB", "added GB"],
        [
            [r["model"], r["nfe"], r["batch"], r["micro_batch"] or "-"]
            + ["yes" if r["checkpoint"] else "no"]
            + (
                [r["error"], "", ""]
                if "error" in r
                else [f"{r['seconds']:.4f}", _f(r["peak_gb"]), _f(r["added_gb"])]
            )
            for r in res.get("distill_step", [])
        ],
    )
    lines += md_table(
        ["sampling (median)", "NFE", "batch", "BNS (NSSolver) s", "Euler loop s", "BNS / Euler"],
        [
            [f"{r['model']} (guidance {r['guidance']:g})", r["nfe"], r["batch"]]
            + [f"{r['bns_s']:.5f}", f"{r['euler_s']:.5f}", f"{r['ratio']:.4f}"]
            for r in res.get("sampling", [])
        ],
    )
    if res.get("large"):
        lines += large_markdown(res)
    if res.get("protocol"):
        lines += md_table(
            ["protocol", "guidance", "NFE", "BNS", "init", "best classical"]
            + ["best classical at 2 NFE", "steps (best)", "ground truth s", "distill s"]
            + ["wall s incl. GT"],
            [_protocol_cells(r) for r in res["protocol"]],
        )
        p = res["sizes"]
        lines += [
            f"Protocol: {p['train_pairs']} train / {p['val_pairs']} val / {p['test_pairs']}"
            f" test pairs, {_steps_text(p['steps'])}, patience {p['patience']} validations,"
            " init best; PSNR in dB against dopri5 on the test pairs; ground truth counts all"
            " three splits.",
            "",
        ]
    verdict = {True: "pass", False: "FAIL", None: "not checked"}
    lines += md_table(
        ["target", "measured", "limit", "pass"],
        [
            [k, f"{_f(t['value'], '.4g')} {t['unit']}", f"{t['limit']:g}", verdict[t["pass"]]]
            for k, t in res["targets"].items()
        ],
    )
    return "\n".join(lines) + "\n"


def _cell(d: dict | None, key: str, fmt: str = ".3g", extra: str = "") -> str:
    """A number of a measurement's dict, its error, or n/a when it was not measured."""
    if not d:
        return "n/a"
    if "error" in d:
        return d["error"][:60]
    text = _f(d.get(key), fmt)
    return f"{text} ({d[extra]})" if extra and text != "n/a" else text


LARGE_PHASES = ("ground_truth_train", "ground_truth_val", "ranking", "optimizer", "validation")


def large_markdown(res: dict) -> list[str]:
    """The large-models tables: what was measured, then the projected time to a solver."""
    rows, sizes = res["large"], res["large_sizes"]
    m, nfe = sizes["micro_batch"], sizes["nfe"]
    lines = md_table(
        ["large network (random weights)", "params", "dtype", "guidance"]
        + ["GT pairs/s (pairs)", "GT NFE/sample", "GT forwards/s"]
        + ["GN step s (pairs)", "GN peak GB", "Adam step s (batch)", "Adam peak GB"]
        + ["BNS sampling s", "pipeline's scheduler s", "BNS / pipeline"],
        [
            [f"{r['label']} ({r['model']})", _count(r["params"]), r["dtype"]]
            + [f"{r['guidance']:g}"]
            + [
                _cell(r.get("ground_truth"), "pairs_per_s", ".3g", "pairs"),
                _cell(r.get("ground_truth"), "nfe_per_sample", ".0f"),
                _cell(r.get("ground_truth"), "forwards_per_s", ".0f"),
                _cell(r.get("gn_step"), "seconds", ".3g", "pairs"),
                _cell(r.get("gn_step"), "peak_gb"),
                _cell(r.get("adam_step"), "seconds", ".3g", "batch"),
                _cell(r.get("adam_step"), "peak_gb"),
                _cell(r.get("sampling"), "bns_s", ".4g"),
                _cell(r.get("sampling"), "pipeline_s", ".4g", "scheduler"),
                _cell(r.get("sampling"), "ratio", ".3f"),
            ]
            for r in rows
        ],
    )
    projected = [r for r in rows if r.get("projected") and "error" not in r["projected"]]
    lines += md_table(
        [f"projected time to a solver at NFE {nfe} (bns.estimate)"]
        + [f"{k} s" for k in LARGE_PHASES]
        + ["total s", "total h", "forwards + JVPs"],
        [
            [r["model"]]
            + [
                f"{r['projected']['phases'].get(k, {}).get('seconds', 0.0):.4g}"
                for k in LARGE_PHASES
            ]
            + [f"{r['projected']['total_s']:.4g}", f"{r['projected']['total_s'] / 3600:.3g}"]
            + [
                f"{r['projected']['phases']['total']['forwards']:,}"
                f" + {r['projected']['phases']['total']['jvps']:,}"
            ]
            for r in projected
        ],
    )
    cfg = projected[0]["projected"]["settings"] if projected else None
    caps = sizes["max_timed_batch"]
    sample = rows[0].get("sampling") or {}
    lines += [
        "Random weights: these are real costs, not real quality. Each network is built offline"
        f" from its real config (diffusers {res.get('diffusers', '?')}) with random weights, in"
        f" {rows[0]['dtype']}, and wrapped as bns's diffusers integration wraps its pipeline,"
        f" with {LARGE_PROMPTS} random prompt embeddings of the shapes its text encoders give;"
        " every guided evaluation is 2 network forwards. A random network's velocity field is"
        " not a trained one's: the adaptive solver's NFE per sample (so pairs/s and the ground"
        " truth's share of the projection) may differ on the real weights; the per-forward costs"
        " are the real ones.",
        "",
        "Ground truth: one dopri5 solve of the pairs shown, no cache, at the default tolerance of"
        " the dtype. GN step: one Levenberg-Marquardt step (the Jacobians in forward mode) on the"
        f" pairs shown at NFE {nfe} from midpoint, micro-batch {m}; forward mode warmed up on"
        f" one sample first, untimed. Adam step: one loss-and-gradient pass at NFE {nfe} with gradient"
        f" checkpointing, micro-batch {m} (after a warm-up pass). Sampling: a dense NS solver"
        " (a trained BNS solver's cost) through bns.sample against the pipeline's own loop"
        " and scheduler (DPMSolverMultistepScheduler for the UNets, FlowMatchEulerDiscreteScheduler"
        f" shift 3 for SD3), NFE {nfe}, batch {sample.get('batch', '?')}, medians of"
        f" {sample.get('repeats', '?')} interleaved repeats. Peak GB: CUDA memory only.",
        "",
    ]
    stacks = [
        f"{r['model']} {r['gn_step']['max_stack']}"
        for r in rows
        if r.get("gn_step", {}).get("max_stack", DEFAULT_MAX_STACK) != DEFAULT_MAX_STACK
    ]
    if stacks:
        lines += [
            "One forward-mode call of bns's default tangent stack (nfe + 1 tangents per pair)"
            " ran out of GPU memory, so the GN step ran with gn_max_stack (tangent columns x"
            f" pairs per call): {', '.join(stacks)}.",
            "",
        ]
    if cfg is not None:
        lines += [
            f"Projection: bns.estimate.estimate_cost(model, {nfe}, guidance, cache=False,"
            f" micro_batch={cfg['micro_batch']}), every other setting bns's default:"
            f" {cfg['train_pairs']} train / {cfg['val_pairs']} val pairs, {cfg['adam_steps']} Adam +"
            f" {cfg['gn_steps']} Gauss-Newton steps on {cfg['gn_batch_size']} pairs (an upper"
            " bound: all of them run and are validated), ground truth"
            f" {cfg['gt_batch_size']} pairs per solve. Measured here: the adaptive solver's NFE per"
            f" sample from a pilot of {sizes['pilot_pairs']} pair(s) (bns's default"
            f" {bns_estimate.PILOT_PAIRS}; x{bns_estimate.PILOT_TO_BATCH} for a full batch), and"
            f" the seconds of one call of the network (median of {sizes['estimate_repeats']}"
            f" after a warm-up) at up to {caps} pairs; extrapolated: larger batches, linearly"
            " from those, and the work of every phase from the settings.",
            "",
        ]
    return lines


def _device_info(device: torch.device) -> dict:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        mem = torch.cuda.get_device_properties(device).total_memory / 1e9
        return {"type": "cuda", "name": name, "memory_gb": mem}
    return {"type": "cpu", "name": "cpu", "threads": torch.get_num_threads()}


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tiny", action="store_true", help="toy sizes: a smoke test (CPU, seconds)")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--guidance", type=float, default=2.0, help="guidance of the cost sections")
    p.add_argument(
        "--sections",
        default=None,
        help=f"comma-separated, of {','.join(SECTIONS)} (default: all; large only on CUDA or"
        " with --tiny)",
    )
    p.add_argument(
        "--large-models",
        default=",".join(a.key for a in ARCHS),
        help="the real architectures of the large section (random weights), comma-separated",
    )
    p.add_argument(
        "--large-dtype",
        default="bfloat16",
        choices=["bfloat16", "float16", "float32"],
        help="dtype of the large section's networks",
    )
    p.add_argument("--protocol", action="store_true", help="also run the full protocol")
    p.add_argument(
        "--protocol-models",
        default="fmnist-cfg:1,fmnist-cfg:2,fmnist-cfg:4,fmnist-vp:1",
        help="MODEL:GUIDANCE,...",
    )
    p.add_argument(
        "--nfe", type=lambda s: [int(v) for v in s.split(",")], default=[4, 6, 8, 10, 12, 16]
    )
    p.add_argument("--budget-s", type=float, default=math.inf, help="skip protocol runs after")
    args = p.parse_args(argv)
    start = time.perf_counter()
    device = torch.device(args.device)
    sizes = TINY if args.tiny else Sizes()
    clock = Clock(device)
    info = _device_info(device)
    res: dict[str, Any] = {
        "device": info,
        "torch": torch.__version__,
        "machine": f"{platform.machine()}, {torch.get_num_threads()} CPU threads",
        "command": " ".join(
            ["python", "benchmarks/gpu.py", *(sys.argv[1:] if argv is None else argv)]
        ),
        "tiny": args.tiny,
        "sizes": {k: v for k, v in asdict(sizes).items() if k != "unet"},
        "unet_config": sizes.unet.to_dict(),
    }
    try:
        import diffusers

        res["diffusers"] = diffusers.__version__
    except ImportError:  # the large section needs it; the others do not
        pass
    if device.type == "cuda":
        res["tf32"] = {
            "matmul": torch.backends.cuda.matmul.allow_tf32,
            "cudnn": torch.backends.cudnn.allow_tf32,
        }
    stem = f"gpu_{_slug(info['name'])}{'_tiny' if args.tiny else ''}"
    args.out.mkdir(parents=True, exist_ok=True)

    def write() -> None:
        res["targets"] = targets(res)
        res["total_s"] = time.perf_counter() - start
        (args.out / f"{stem}.json").write_text(json.dumps(res, indent=1) + "\n")
        (args.out / f"{stem}.md").write_text(markdown(res))

    if args.sections is None:
        sections = [k for k in SECTIONS if k != "large" or device.type == "cuda" or args.tiny]
    else:
        sections = [k for k in args.sections.split(",") if k]
    unknown = sorted(set(sections) - set(SECTIONS))
    if unknown:
        p.error(f"unknown section(s) {', '.join(unknown)}; known: {', '.join(SECTIONS)}")
    by_key = {a.key: a for a in ARCHS}
    wanted = [k for k in args.large_models.split(",") if k]
    if set(wanted) - set(by_key):
        p.error(
            f"unknown --large-models {sorted(set(wanted) - set(by_key))}; known: {list(by_key)}"
        )
    archs = [by_key[k] for k in wanted]
    fmnist = load_model("fmnist-cfg").to(device)
    unet = unet_model(sizes.unet, device, size=sizes.unet_size)
    res["unet_params"] = sum(p.numel() for p in unet.net.parameters())
    if "ground_truth" in sections:
        res["ground_truth"] = ground_truth_section(fmnist, args.guidance, sizes, clock)
        write()
    if "distill_step" in sections:
        res["distill_step"] = distill_step_section([fmnist, unet], args.guidance, sizes, clock)
        write()
    if "sampling" in sections:
        res["sampling"] = sampling_section([fmnist, unet], args.guidance, sizes, clock)
        write()
    if "large" in sections:
        large_sizes = LARGE_TINY if args.tiny else LARGE
        res["large_sizes"] = asdict(large_sizes)

        def done(rows: list[dict]) -> None:
            res["large"] = rows
            write()

        dtype = getattr(torch, args.large_dtype)
        large_models_section(archs, large_sizes, args.tiny, dtype, clock, done)
    if args.protocol:
        specs = args.protocol_models.split(",")
        deadline = start + args.budget_s
        res["protocol"] = protocol_section(specs, args.nfe, sizes, clock, deadline)
    write()
    text = markdown(res)
    print(text)
    print(f"wrote {args.out / stem}.json and .md ({res['total_s']:.1f} s)", file=sys.stderr)
    return res


if __name__ == "__main__":
    main()
