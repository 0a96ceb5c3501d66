"""Text-to-image and text-to-video pipelines as bns nets, one adapter per kind of pipeline.

Every kind encodes the prompts and the negative prompt once, with the pipeline's own
``encode_prompt`` and the arguments of its default call, into buffers ``[K + 1, ...]`` (the
negative prompt last: the null label ``K``), and calls the denoiser the way the pipeline's
denoising loop does (file and line numbers below are diffusers 0.42's):

- Stable Diffusion 1.x/2.x (``StableDiffusionPipeline``, UNet2DConditionModel):
  ``unet(latents, t, encoder_hidden_states=prompt_embeds, timestep_cond=...)``
  (stable_diffusion/pipeline_stable_diffusion.py:1042); epsilon or v-prediction over the
  scheduler's ``alphas_cumprod``. A guidance-distilled (LCM-style) UNet with
  ``time_cond_proj_dim`` gets ``timestep_cond = get_guidance_scale_embedding(w - 1)``
  (:1021-1026) with ``w = embedded_guidance``.
- SDXL (``StableDiffusionXLPipeline``): two CLIP encoders; ``added_cond_kwargs = {"text_embeds":
  pooled, "time_ids": original_size + crops_coords_top_left + target_size}`` (pipeline_stable_
  diffusion_xl.py:1132, 1208) with the default call's ``original_size = target_size =
  (height, width)`` and crops ``(0, 0)`` (:1032-1036); with no negative prompt and
  ``force_zeros_for_empty_prompt`` the negative embeddings are zeros (:424-427).
- SD3 / 3.5 (``StableDiffusion3Pipeline``): ``transformer(timestep=1000 sigma,
  encoder_hidden_states, pooled_projections)``, output ``dx/dsigma``.
- Flux (``FluxPipeline``): packed latents ``[B, (h/2)(w/2), 4C]`` (flux/pipeline_flux.py:522-527);
  ``transformer(timestep=sigma, guidance, pooled_projections, encoder_hidden_states, txt_ids,
  img_ids)`` (:898-903: the pipeline divides the scheduler's ``1000 sigma`` by 1000), output
  ``dx/dsigma``; a guidance-distilled transformer (``guidance_embeds``) takes the embedded
  guidance as an input (:847-851), fixed when the model is built; true CFG
  (``neg + true_cfg_scale (cond - neg)``, :913-929) is bns's guidance ``w``.
- PixArt-alpha / Sigma (``PixArtAlphaPipeline``, ``PixArtSigmaPipeline``): T5 embeddings with an
  attention mask; ``added_cond_kwargs`` resolution / aspect ratio only for the 1024 models
  (``sample_size == 128``), else None (pixart_alpha/pipeline_pixart_alpha.py:895-906); learned
  variance: the first half of the output channels is the epsilon prediction (:947-948).
- Wan 2.1 / 2.2 (``WanPipeline``): UMT5 embeddings; 5-D latents ``[B, C, F, H, W]``;
  ``transformer(timestep=1000 sigma, encoder_hidden_states)`` (wan/pipeline_wan.py:613-626),
  output ``dx/dsigma``; Wan 2.2's second expert (``transformer_2``) below ``boundary_ratio *
  1000`` (:586, 597-604) and per-token timesteps (``expand_timesteps``, :607-611).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ._conventions import DiffusersError
from ._nets import _TextNet

# Prompts per encode_prompt call: bounds the text encoders' memory for long prompt lists.
ENCODE_CHUNK = 16


def call_default(pipe: Any, name: str, fallback: Any = None) -> Any:
    """The default of argument ``name`` of the pipeline's ``__call__`` (``fallback`` if none)."""
    try:
        param = inspect.signature(type(pipe).__call__).parameters.get(name)
    except (TypeError, ValueError):
        param = None
    if param is None or param.default is inspect.Parameter.empty or param.default is None:
        return fallback
    return param.default


@dataclass
class TextBuild:
    """What a kind's builder gets: the pipeline, its denoiser, the prompts and the options."""

    pipe: Any
    denoiser: nn.Module
    prediction_type: str
    num_train_timesteps: int
    prompts: list[str]
    negative_prompt: str | None
    options: dict[str, Any] = field(default_factory=dict)
    sample_shape: tuple[int, ...] | None = None

    @property
    def device(self) -> torch.device:
        return self.pipe._execution_device

    def option(self, name: str, default: Any = None) -> Any:
        """The user's option, else the default of the pipeline's call, else ``default``."""
        value = self.options.get(name)
        return value if value is not None else call_default(self.pipe, name, default)

    def net_args(self) -> tuple[nn.Module, str, int]:
        return self.denoiser, self.prediction_type, self.num_train_timesteps

    def encode(
        self, encode: Callable[[list[str], bool], tuple[dict, dict | None]]
    ) -> dict[str, Tensor]:
        """Rows ``[K + 1, ...]`` per buffer: ``encode(texts, with_negative)`` returns the
        prompts' rows and (with_negative) the negative prompt's (repeated; the first is kept)."""
        parts: list[dict[str, Tensor]] = []
        negative: dict[str, Tensor] | None = None
        with torch.no_grad():
            for i in range(0, len(self.prompts), ENCODE_CHUNK):
                rows, neg = encode(self.prompts[i : i + ENCODE_CHUNK], negative is None)
                negative = negative if negative is not None else neg
                parts.append(rows)
        assert negative is not None
        return {k: torch.cat([p[k] for p in parts] + [negative[k][:1]]) for k in parts[0]}

    def shape(self, natural: tuple[int, ...], size_dependent: bool) -> tuple[int, ...]:
        """The sample shape: ``natural`` (from height / width), or the user's ``sample_shape``
        where the net does not depend on the size."""
        if self.sample_shape is None or tuple(self.sample_shape) == tuple(natural):
            return tuple(natural)
        if size_dependent:
            raise DiffusersError(
                f"{type(self.pipe).__name__} conditions on the latent size: pass height= and"
                f" width= (pixels), not sample_shape={list(self.sample_shape)} (they give"
                f" {list(natural)})"
            )
        return tuple(self.sample_shape)


def _pixels(b: TextBuild, default_latent: int | tuple[int, ...]) -> tuple[int, int, int]:
    """``(height, width, vae_scale_factor)``: the user's, else the pipeline's default size."""
    vsf = int(getattr(b.pipe, "vae_scale_factor", 8) or 8)
    size = default_latent if isinstance(default_latent, (tuple, list)) else (default_latent,) * 2
    height = b.options.get("height") or int(size[0]) * vsf
    width = b.options.get("width") or int(size[-1]) * vsf
    return int(height), int(width), vsf


def _rows_or_null(b: TextBuild, negative: bool, texts: list[str]) -> list[str] | None:
    """The negative prompt repeated per prompt (encode_prompt wants a list like the prompts)."""
    if not negative or b.negative_prompt is None:
        return None
    return [b.negative_prompt] * len(texts)


# -- Stable Diffusion 1.x / 2.x and SDXL (UNet2DConditionModel) -------------------------------


class _SDNet(_TextNet):
    """UNet2DConditionModel over CLIP embeddings (SD 1.x / 2.x; SDXL with pooled and time ids)."""

    bns_conditioning = ("embeds", "pooled")

    def forward(self, x: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        rows = self.rows(x, y)
        added = None
        if self.time_ids is not None:
            added = {"text_embeds": self.pooled[rows], "time_ids": self.time_ids.expand(len(x), -1)}
        cond = None if self.timestep_cond is None else self.timestep_cond.expand(len(x), -1)
        out = self.denoiser(
            x.to(self.net_dtype),
            self.timestep(t),
            encoder_hidden_states=self.embeds[rows],
            timestep_cond=cond,
            added_cond_kwargs=added,
            return_dict=False,
        )[0]
        return self.finish(out, x)


def _timestep_cond(b: TextBuild, dtype: torch.dtype) -> Tensor | None:
    """LCM-style guidance embedding (``time_cond_proj_dim``), from ``embedded_guidance``."""
    dim = b.denoiser.config.time_cond_proj_dim
    if dim is None:
        if b.options.get("embedded_guidance") is not None:
            raise DiffusersError(
                f"embedded_guidance needs a guidance-distilled UNet (time_cond_proj_dim);"
                f" {type(b.pipe).__name__}'s has none: use guidance= (CFG) instead"
            )
        return None
    w = float(b.option("embedded_guidance", b.option("guidance_scale", 7.5)))
    emb = b.pipe.get_guidance_scale_embedding(torch.tensor([w - 1.0]), embedding_dim=dim)
    return emb.to(device=b.device, dtype=dtype)


def _check_unet(b: TextBuild, addition: str | None) -> None:
    cfg = b.denoiser.config
    if cfg.get("class_embed_type") is not None or cfg.get("addition_embed_type") != addition:
        raise DiffusersError(
            f"{type(b.pipe).__name__}'s UNet has class_embed_type={cfg.get('class_embed_type')!r},"
            f" addition_embed_type={cfg.get('addition_embed_type')!r}; the adapter supports"
            f" addition_embed_type={addition!r} and no class embedding"
        )


def build_sd(b: TextBuild) -> tuple[nn.Module, tuple[int, ...]]:
    _check_unet(b, None)
    pipe = b.pipe

    def encode(texts: list[str], negative: bool) -> tuple[dict, dict | None]:
        pe, ne = pipe.encode_prompt(
            texts, b.device, 1, negative, negative_prompt=_rows_or_null(b, negative, texts)
        )
        return {"embeds": pe}, ({"embeds": ne} if negative else None)

    embeds = b.encode(encode)["embeds"]
    cfg = b.denoiser.config
    height, width, vsf = _pixels(b, cfg.sample_size)
    buffers = {
        "embeds": embeds,
        "pooled": None,
        "time_ids": None,
        "timestep_cond": _timestep_cond(b, embeds.dtype),
    }
    net = _SDNet(*b.net_args(), buffers)
    return net, b.shape((int(cfg.in_channels), height // vsf, width // vsf), False)


def build_sdxl(b: TextBuild) -> tuple[nn.Module, tuple[int, ...]]:
    _check_unet(b, "text_time")
    pipe = b.pipe

    def encode(texts: list[str], negative: bool) -> tuple[dict, dict | None]:
        pe, ne, ppe, npe = pipe.encode_prompt(
            prompt=texts,
            prompt_2=None,
            device=b.device,
            num_images_per_prompt=1,
            do_classifier_free_guidance=negative,
            negative_prompt=_rows_or_null(b, negative, texts),
        )
        return {"embeds": pe, "pooled": ppe}, ({"embeds": ne, "pooled": npe} if negative else None)

    rows = b.encode(encode)
    height, width, vsf = _pixels(b, pipe.default_sample_size)
    if pipe.text_encoder_2 is None:
        projection_dim = int(rows["pooled"].shape[-1])
    else:
        projection_dim = pipe.text_encoder_2.config.projection_dim
    # The default call's micro-conditioning (pipeline_stable_diffusion_xl.py:1035-1036, 1132).
    time_ids = pipe._get_add_time_ids(
        (height, width),
        (0, 0),
        (height, width),
        dtype=rows["embeds"].dtype,
        text_encoder_projection_dim=projection_dim,
    ).to(b.device)
    buffers = {
        **rows,
        "time_ids": time_ids,
        "timestep_cond": _timestep_cond(b, rows["embeds"].dtype),
    }
    net = _SDNet(*b.net_args(), buffers)
    cfg = b.denoiser.config
    return net, b.shape((int(cfg.in_channels), height // vsf, width // vsf), True)


# -- SD3 / 3.5 ---------------------------------------------------------------------------------


class _SD3Net(_TextNet):
    """SD3-style joint transformer over prompt embeddings encoded once: ``y`` indexes them."""

    bns_conditioning = ("embeds", "pooled")

    def forward(self, x: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        rows = self.rows(x, y)
        out = self.denoiser(
            hidden_states=x.to(self.net_dtype),
            timestep=self.timestep(t),
            encoder_hidden_states=self.embeds[rows],
            pooled_projections=self.pooled[rows],
            return_dict=False,
        )[0]
        return self.finish(out, x)


def build_sd3(b: TextBuild) -> tuple[nn.Module, tuple[int, ...]]:
    pipe = b.pipe
    length = int(b.option("max_sequence_length", 256))

    def encode(texts: list[str], negative: bool) -> tuple[dict, dict | None]:
        pe, ne, ppe, npe = pipe.encode_prompt(
            prompt=texts,
            prompt_2=None,
            prompt_3=None,
            device=b.device,
            do_classifier_free_guidance=negative,
            negative_prompt=b.negative_prompt,
            max_sequence_length=length,
        )
        return {"embeds": pe, "pooled": ppe}, ({"embeds": ne, "pooled": npe} if negative else None)

    net = _SD3Net(*b.net_args(), b.encode(encode))
    cfg = b.denoiser.config
    height, width, vsf = _pixels(b, cfg.sample_size)
    return net, b.shape((int(cfg.in_channels), height // vsf, width // vsf), False)


# -- Flux ---------------------------------------------------------------------------------------


class _FluxNet(_TextNet):
    """Flux transformer on packed latents ``[B, seq, 4C]``; ``timestep`` is sigma itself."""

    bns_conditioning = ("embeds", "pooled")

    def forward(self, x: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        rows = self.rows(x, y)
        dtype = self.net_dtype
        # As the pipeline: the scheduler's float32 1000 sigma, in the latents' dtype, / 1000.
        timestep = self.timestep(t).to(dtype) / 1000
        guidance = None if self.guidance is None else self.guidance.expand(len(x))
        out = self.denoiser(
            hidden_states=x.to(dtype),
            timestep=timestep,
            guidance=guidance,
            pooled_projections=self.pooled[rows],
            encoder_hidden_states=self.embeds[rows],
            txt_ids=self.txt_ids,
            img_ids=self.img_ids,
            return_dict=False,
        )[0]
        return -out


def build_flux(b: TextBuild) -> tuple[nn.Module, tuple[int, ...]]:
    pipe = b.pipe
    length = int(b.option("max_sequence_length", 512))

    def encode(texts: list[str], negative: bool) -> tuple[dict, dict | None]:
        kw = {"prompt_2": None, "device": b.device, "max_sequence_length": length}
        pe, ppe, _ = pipe.encode_prompt(prompt=texts, **kw)
        if not negative:
            return {"embeds": pe, "pooled": ppe}, None
        # True CFG encodes the negative prompt as a prompt of its own (pipeline_flux.py:793).
        ne, npe, _ = pipe.encode_prompt(prompt=[b.negative_prompt or ""], **kw)
        return {"embeds": pe, "pooled": ppe}, {"embeds": ne, "pooled": npe}

    rows = b.encode(encode)
    cfg = b.denoiser.config
    vsf = int(getattr(pipe, "vae_scale_factor", 8) or 8)
    height = int(b.options.get("height") or pipe.default_sample_size * vsf)
    width = int(b.options.get("width") or pipe.default_sample_size * vsf)
    # Latent size: a multiple of 2 (the 2x2 packing), as prepare_latents (pipeline_flux.py:558).
    h, w = 2 * (height // (vsf * 2)), 2 * (width // (vsf * 2))
    dtype = rows["embeds"].dtype
    text_dtype = pipe.text_encoder.dtype if pipe.text_encoder is not None else b.denoiser.dtype
    guidance = None
    if cfg.guidance_embeds:
        value = float(b.option("embedded_guidance", b.option("guidance_scale", 3.5)))
        guidance = torch.tensor(value, dtype=torch.float32, device=b.device)
    elif b.options.get("embedded_guidance") is not None:
        raise DiffusersError(
            "embedded_guidance needs a guidance-distilled Flux transformer (guidance_embeds);"
            " this one has none: use guidance= (true CFG with the negative prompt) instead"
        )
    buffers = {
        **rows,
        "txt_ids": torch.zeros(rows["embeds"].shape[1], 3).to(device=b.device, dtype=text_dtype),
        "img_ids": pipe._prepare_latent_image_ids(1, h // 2, w // 2, b.device, dtype),
        "guidance": guidance,
    }
    net = _FluxNet(*b.net_args(), buffers)
    return net, b.shape(((h // 2) * (w // 2), int(cfg.in_channels)), True)


# -- PixArt-alpha / Sigma -----------------------------------------------------------------------


class _PixArtNet(_TextNet):
    """PixArt transformer over T5 embeddings and their attention mask."""

    bns_conditioning = ("embeds", "mask")

    def forward(self, x: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        rows = self.rows(x, y)
        added: dict[str, Tensor | None] = {"resolution": None, "aspect_ratio": None}
        if self.resolution is not None:
            added = {
                "resolution": self.resolution.expand(len(x), -1),
                "aspect_ratio": self.aspect_ratio.expand(len(x), -1),
            }
        out = self.denoiser(
            x.to(self.net_dtype),
            encoder_hidden_states=self.embeds[rows],
            encoder_attention_mask=self.mask[rows],
            timestep=self.timestep(t),
            added_cond_kwargs=added,
            return_dict=False,
        )[0]
        return self.finish(out, x)


def build_pixart(b: TextBuild) -> tuple[nn.Module, tuple[int, ...]]:
    pipe = b.pipe
    length = int(b.option("max_sequence_length", 120))
    clean = bool(call_default(pipe, "clean_caption", False))

    def encode(texts: list[str], negative: bool) -> tuple[dict, dict | None]:
        pe, pm, ne, nm = pipe.encode_prompt(
            texts,
            do_classifier_free_guidance=negative,
            negative_prompt=b.negative_prompt or "",
            device=b.device,
            clean_caption=clean,
            max_sequence_length=length,
        )
        return {"embeds": pe, "mask": pm}, ({"embeds": ne, "mask": nm} if negative else None)

    rows = b.encode(encode)
    cfg = b.denoiser.config
    height, width, vsf = _pixels(b, cfg.sample_size)
    resolution = aspect = None
    if cfg.sample_size == 128:  # the 1024 models condition on the size
        dtype = rows["embeds"].dtype
        resolution = torch.tensor([[height, width]]).to(dtype=dtype, device=b.device)
        aspect = torch.tensor([[float(height / width)]]).to(dtype=dtype, device=b.device)
    net = _PixArtNet(*b.net_args(), {**rows, "resolution": resolution, "aspect_ratio": aspect})
    natural = (int(cfg.in_channels), height // vsf, width // vsf)
    return net, b.shape(natural, resolution is not None)


# -- Wan ----------------------------------------------------------------------------------------


class _WanNet(_TextNet):
    """Wan transformer(s) on 5-D video latents ``[B, C, F, H, W]``."""

    def __init__(
        self, *args: Any, expert_2: nn.Module | None, boundary: float | None, expand_timesteps: bool
    ):
        super().__init__(*args)
        self.denoiser_2 = expert_2
        device = self.embeds.device
        # Buffers, not attributes: settings of the model, so part of its fingerprint.
        self.register_buffer(
            "boundary",
            None
            if boundary is None
            else torch.tensor(boundary, dtype=torch.float64, device=device),
        )
        self.register_buffer(
            "expand_timesteps", torch.tensor(True, device=device) if expand_timesteps else None
        )

    def _run(self, expert: nn.Module, x: Tensor, timestep: Tensor, embeds: Tensor) -> Tensor:
        if self.expand_timesteps is not None:  # one timestep per latent token (Wan 2.2 TI2V)
            f, h, w = x.shape[2:]
            tokens = f * math.ceil(h / 2) * math.ceil(w / 2)
            timestep = timestep[:, None].expand(len(x), tokens)
        dtype = expert.dtype
        out = expert(
            hidden_states=x.to(dtype),
            timestep=timestep,
            encoder_hidden_states=embeds.to(dtype),
            return_dict=False,
        )[0]
        return out

    def forward(self, x: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        rows = self.rows(x, y)
        timestep = self.timestep(t)
        embeds = self.embeds[rows]
        if self.denoiser_2 is None:
            out = self._run(self.denoiser, x, timestep, embeds)
        else:
            # Wan 2.2: the first expert at high noise (timestep >= boundary), the second below.
            high = timestep >= self.boundary
            if bool(high.all()):
                out = self._run(self.denoiser, x, timestep, embeds)
            elif not bool(high.any()):
                out = self._run(self.denoiser_2, x, timestep, embeds)
            else:
                hi, lo = high.nonzero().squeeze(1), (~high).nonzero().squeeze(1)
                out_hi = self._run(self.denoiser, x[hi], timestep[hi], embeds[hi])
                out_lo = self._run(self.denoiser_2, x[lo], timestep[lo], embeds[lo])
                out = out_hi.new_zeros((len(x), *out_hi.shape[1:]))
                out = out.index_copy(0, hi, out_hi).index_copy(0, lo, out_lo)
        return self.finish(out, x)


def build_wan(b: TextBuild) -> tuple[nn.Module, tuple[int, ...]]:
    pipe = b.pipe
    length = int(b.option("max_sequence_length", 512))
    expert_2 = getattr(pipe, "transformer_2", None)
    dtype = b.denoiser.dtype

    def encode(texts: list[str], negative: bool) -> tuple[dict, dict | None]:
        pe, ne = pipe.encode_prompt(
            prompt=texts,
            negative_prompt=b.negative_prompt,
            do_classifier_free_guidance=negative,
            max_sequence_length=length,
            device=b.device,
        )
        # The pipeline casts the embeddings to the transformer's dtype (pipeline_wan.py:549).
        return {"embeds": pe.to(dtype)}, ({"embeds": ne.to(dtype)} if negative else None)

    rows = b.encode(encode)
    cfg = b.denoiser.config
    vt = int(getattr(pipe, "vae_scale_factor_temporal", 4))
    vs = int(getattr(pipe, "vae_scale_factor_spatial", 8))
    height = int(b.option("height", 480))
    width = int(b.option("width", 832))
    frames = int(b.option("num_frames", 81))
    # The pipeline's own rounding (pipeline_wan.py:494-512).
    if frames % vt != 1:
        frames = frames // vt * vt + 1
    patch = tuple(cfg.patch_size)
    height = height // (vs * patch[1]) * (vs * patch[1])
    width = width // (vs * patch[2]) * (vs * patch[2])
    natural = (int(cfg.in_channels), (frames - 1) // vt + 1, height // vs, width // vs)
    boundary = None
    if expert_2 is not None:
        expert_2.eval().requires_grad_(False)
        ratio = pipe.config.get("boundary_ratio")
        if ratio is None:
            raise DiffusersError("WanPipeline has a transformer_2 but no boundary_ratio")
        boundary = float(ratio) * b.num_train_timesteps
    expand = bool(pipe.config.get("expand_timesteps", False))
    net = _WanNet(
        *b.net_args(), rows, expert_2=expert_2, boundary=boundary, expand_timesteps=expand
    )
    return net, b.shape(natural, expand)


# -- the registry -------------------------------------------------------------------------------


@dataclass(frozen=True)
class PipelineKind:
    """A supported kind of text pipeline: its pipeline classes, its denoiser class and the
    options it takes (bns.families' "families" are solver families, not these)."""

    label: str
    pipelines: tuple[str, ...]
    denoiser: str
    options: frozenset[str]
    build: Callable[[TextBuild], tuple[nn.Module, tuple[int, ...]]]


_SIZE = frozenset({"height", "width"})
PIPELINE_KINDS = (
    PipelineKind(
        "Stable Diffusion 1.x/2.x",
        ("StableDiffusionPipeline",),
        "UNet2DConditionModel",
        _SIZE | {"embedded_guidance"},
        build_sd,
    ),
    PipelineKind(
        "SDXL",
        ("StableDiffusionXLPipeline",),
        "UNet2DConditionModel",
        _SIZE | {"embedded_guidance"},
        build_sdxl,
    ),
    PipelineKind(
        "SD3/3.5",
        ("StableDiffusion3Pipeline",),
        "SD3Transformer2DModel",
        _SIZE | {"max_sequence_length"},
        build_sd3,
    ),
    PipelineKind(
        "Flux",
        ("FluxPipeline",),
        "FluxTransformer2DModel",
        _SIZE | {"max_sequence_length", "embedded_guidance"},
        build_flux,
    ),
    PipelineKind(
        "PixArt-alpha/Sigma",
        ("PixArtAlphaPipeline", "PixArtSigmaPipeline"),
        "PixArtTransformer2DModel",
        _SIZE | {"max_sequence_length"},
        build_pixart,
    ),
    PipelineKind(
        "Wan 2.1/2.2",
        ("WanPipeline",),
        "WanTransformer3DModel",
        _SIZE | {"num_frames", "max_sequence_length"},
        build_wan,
    ),
)


def find_kind(pipe: Any, denoiser: nn.Module) -> PipelineKind | None:
    name, net = type(pipe).__name__, type(denoiser).__name__
    for kind in PIPELINE_KINDS:
        if name in kind.pipelines and net == kind.denoiser:
            return kind
    return None


def supported_text() -> str:
    return "; ".join(f"{f.label} ({', '.join(f.pipelines)})" for f in PIPELINE_KINDS)
