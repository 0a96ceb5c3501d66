"""Tiny random diffusers pipelines built offline, one per kind of pipeline bns supports.

For tests and for benchmarks that must run anywhere (CI, a machine without a model hub): every
component is a one-layer network built from a config with random weights, CLIP uses a
character-level vocabulary written to files and T5 / UMT5 a character-level Unigram vocabulary
built in memory, so nothing is downloaded. The velocity fields are random but smooth: fine for
checking conventions and machinery, meaningless as images.

    pipe = tiny_pipeline("sd3", folder)   # sd, sd-v, sdxl, sd3, flux, pixart, wan
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    PixArtAlphaPipeline,
    PixArtTransformer2DModel,
    PNDMScheduler,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
    UniPCMultistepScheduler,
    WanPipeline,
    WanTransformer3DModel,
)
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    T5Config,
    T5EncoderModel,
    T5Tokenizer,
    UMT5Config,
    UMT5EncoderModel,
)

from ...errors import InputError

__all__ = ["tiny_pipeline", "KINDS"]

VOCAB = {"<|startoftext|>": 0, "<|endoftext|>": 1}
for c in "abcdefghijklmnopqrstuvwxyz":
    VOCAB[c] = len(VOCAB)
    VOCAB[c + "</w>"] = len(VOCAB)

T5_VOCAB = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -1.0)]
T5_VOCAB += [(c, -2.0) for c in "abcdefghijklmnopqrstuvwxyz"]
T5_VOCAB += [("\u2581" + c, -1.5) for c in "abcdefghijklmnopqrstuvwxyz"]

T5_LEN = 8  # a max_sequence_length that suits these tiny T5 families


def clip_tokenizer(folder) -> CLIPTokenizer:
    """A character-level CLIP tokenizer from files (the form every transformers version reads)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(VOCAB))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer.from_pretrained(str(folder), model_max_length=77)


def clip(cls=CLIPTextModelWithProjection, hidden: int = 16):
    config = CLIPTextConfig(
        vocab_size=len(VOCAB),
        hidden_size=hidden,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        max_position_embeddings=77,
        projection_dim=16,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )
    return cls(config).eval()


def t5_tokenizer() -> T5Tokenizer:
    """A character-level T5 (Unigram) tokenizer built in memory: no sentencepiece file."""
    return T5Tokenizer(vocab=T5_VOCAB, extra_ids=0)


def t5(cls=T5EncoderModel, config_cls=T5Config):
    config = config_cls(
        vocab_size=len(T5_VOCAB),
        d_model=16,
        d_kv=8,
        d_ff=32,
        num_layers=1,
        num_heads=2,
        relative_attention_num_buckets=8,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )
    return cls(config).eval()


def sd_scheduler(prediction_type: str = "epsilon", cls=DDIMScheduler):
    """Stable Diffusion's schedule: scaled_linear betas 0.00085 .. 0.012, steps_offset 1."""
    kw = {"prediction_type": prediction_type} if cls is not PNDMScheduler else {}
    if cls is DDIMScheduler:
        kw.update(clip_sample=False, set_alpha_to_one=False)
    if cls is PNDMScheduler:
        kw.update(skip_prk_steps=True, set_alpha_to_one=False, prediction_type=prediction_type)
    return cls(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1, **kw
    )


def unet(sdxl: bool = False, time_cond_proj_dim: int | None = None) -> UNet2DConditionModel:
    kw = {}
    if sdxl:
        kw = {
            "addition_embed_type": "text_time",
            "addition_time_embed_dim": 4,
            "projection_class_embeddings_input_dim": 16 + 6 * 4,  # pooled + 6 time ids
        }
    return UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(8, 16),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32 if sdxl else 16,
        attention_head_dim=2,
        norm_num_groups=4,
        time_cond_proj_dim=time_cond_proj_dim,
        **kw,
    ).eval()


def sd(folder, prediction_type: str = "epsilon", **unet_kw) -> StableDiffusionPipeline:
    torch.manual_seed(0)
    return StableDiffusionPipeline(
        vae=None,
        text_encoder=clip(CLIPTextModel),
        tokenizer=clip_tokenizer(folder),
        unet=unet(**unet_kw),
        scheduler=sd_scheduler(prediction_type),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def sdxl(folder) -> StableDiffusionXLPipeline:
    torch.manual_seed(1)
    tokenizer = clip_tokenizer(folder)
    return StableDiffusionXLPipeline(
        vae=None,
        text_encoder=clip(CLIPTextModel),
        text_encoder_2=clip(CLIPTextModelWithProjection),
        tokenizer=tokenizer,
        tokenizer_2=tokenizer,
        unet=unet(sdxl=True),
        scheduler=sd_scheduler(),
    )


def sd3(folder) -> StableDiffusion3Pipeline:
    torch.manual_seed(0)
    transformer = SD3Transformer2DModel(
        sample_size=8,
        patch_size=2,
        in_channels=4,
        num_layers=1,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=16,
        caption_projection_dim=16,
        pooled_projection_dim=32,
        out_channels=4,
        pos_embed_max_size=16,
    )
    tokenizer = clip_tokenizer(folder)
    return StableDiffusion3Pipeline(
        transformer=transformer.eval(),
        scheduler=FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True),
        vae=None,
        text_encoder=clip(),
        tokenizer=tokenizer,
        text_encoder_2=clip(),
        tokenizer_2=tokenizer,
        text_encoder_3=None,
        tokenizer_3=None,
    )


def flux(folder, guidance_embeds: bool = True) -> FluxPipeline:
    torch.manual_seed(2)
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=16,  # 4 latent channels, packed 2x2
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=16,
        pooled_projection_dim=16,
        guidance_embeds=guidance_embeds,
        axes_dims_rope=(2, 2, 4),
    )
    # Flux's scheduler: resolution-dependent shifting (the pipeline computes mu).
    scheduler = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, shift=3.0)
    return FluxPipeline(
        scheduler=scheduler,
        vae=None,
        text_encoder=clip(CLIPTextModel),
        tokenizer=clip_tokenizer(folder),
        text_encoder_2=t5(),
        tokenizer_2=t5_tokenizer(),
        transformer=transformer.eval(),
    )


def pixart(cls=PixArtAlphaPipeline, sample_size: int = 8):
    torch.manual_seed(3)
    transformer = PixArtTransformer2DModel(
        num_attention_heads=2,
        attention_head_dim=8,
        in_channels=4,
        out_channels=8,  # learned variance
        num_layers=1,
        sample_size=sample_size,
        patch_size=2,
        cross_attention_dim=16,
        caption_channels=16,
        norm_num_groups=4,
    )
    return cls(
        tokenizer=t5_tokenizer(),
        text_encoder=t5(),
        vae=None,
        transformer=transformer.eval(),
        scheduler=DPMSolverMultistepScheduler(),
    )


def wan_transformer(seed: int) -> WanTransformer3DModel:
    torch.manual_seed(seed)
    return WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=2,
        attention_head_dim=8,
        in_channels=4,
        out_channels=4,
        text_dim=16,
        freq_dim=16,
        ffn_dim=32,
        num_layers=1,
        rope_max_seq_len=32,
    ).eval()


def wan(two_experts: bool = False) -> WanPipeline:
    torch.manual_seed(4)
    # Wan's own scheduler: UniPC in flow mode.
    scheduler = UniPCMultistepScheduler(
        prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0
    )
    return WanPipeline(
        tokenizer=t5_tokenizer(),
        text_encoder=t5(UMT5EncoderModel, UMT5Config),
        vae=None,
        scheduler=scheduler,
        transformer=wan_transformer(5),
        transformer_2=wan_transformer(6) if two_experts else None,
        boundary_ratio=0.6 if two_experts else None,
    )


KINDS = ("sd", "sd-v", "sdxl", "sd3", "flux", "pixart", "wan")


def tiny_pipeline(kind: str, folder: str | Path, **kw: Any) -> Any:
    """A tiny random pipeline of ``kind`` (:data:`KINDS`); ``folder`` holds the CLIP tokenizer
    files of the kinds that use CLIP."""
    folder = Path(folder)
    builders = {
        "sd": lambda: sd(folder, **kw),
        "sd-v": lambda: sd(folder, "v_prediction", **kw),
        "sdxl": lambda: sdxl(folder),
        "sd3": lambda: sd3(folder),
        "flux": lambda: flux(folder, **kw),
        "pixart": lambda: pixart(**kw),
        "wan": lambda: wan(**kw),
    }
    if kind not in builders:
        raise InputError(f"unknown pipeline kind {kind!r}; one of {', '.join(KINDS)}")
    return builders[kind]()
