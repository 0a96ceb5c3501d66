"""Diffusers pipelines as :class:`bns.Model`: :func:`model_from_pipeline`.

A pipeline (a local folder or an object) becomes a model a solver can be distilled for
(``bns distill --model diffusers:PATH``); the conventions are in the package docstring, the
text families' in :mod:`._text`.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from ...model import Model
from ...pairs import SPLITS
from ._conventions import BNS_PREDICTION_OF, DiffusersError, bns_schedule, describe_scheduler
from ._nets import _ClassNet, _PipelineNet, _UncondNet
from ._text import TextBuild, find_kind, supported_text

__all__ = ["model_from_pipeline"]


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
        try:
            with warnings.catch_warnings():
                # torch_dtype is the name every supported diffusers version reads (newer ones
                # also take dtype= and call torch_dtype deprecated).
                warnings.filterwarnings("ignore", message=".*torch_dtype.*deprecated")
                pipe = DiffusionPipeline.from_pretrained(str(path), **kwargs)
        except (OSError, ValueError) as e:
            hint = ""
            if "low_cpu_mem_usage" in str(e):
                # e.g. Wan's transformer keeps modules in float32, which diffusers loads only
                # through accelerate.
                hint = " (install accelerate: diffusers needs it to load this pipeline)"
            raise DiffusersError(
                f"cannot load the diffusers pipeline in {path}: {str(e).splitlines()[0]}{hint}"
            ) from e
    else:
        pipe = path_or_pipeline
        if dtype is not None:
            pipe = pipe.to(dtype=dtype)
    if device is not None:
        pipe = pipe.to(device)
    return pipe


def _prompt_table(
    prompts: Sequence[str] | Mapping[str, Sequence[str]],
) -> tuple[list[str], dict[str, range] | None]:
    """The prompts to encode, in label order, and (for a dict) the labels of each split."""
    if isinstance(prompts, Mapping):
        if set(prompts) != set(SPLITS):
            raise DiffusersError(
                f"prompts as a dict needs exactly the keys {list(SPLITS)}, got {sorted(prompts)}"
            )
        texts: list[str] = []
        splits: dict[str, range] = {}
        for split in SPLITS:
            part = prompts[split]
            if isinstance(part, str) or not part:
                raise DiffusersError(f"prompts[{split!r}] must be a non-empty list of prompts")
            splits[split] = range(len(texts), len(texts) + len(part))
            texts += [str(p) for p in part]
        return texts, splits
    if isinstance(prompts, str):
        raise DiffusersError("prompts must be a list of prompts (or a train/val/test dict)")
    texts = [str(p) for p in prompts]
    if not texts:
        raise DiffusersError("prompts is empty")
    return texts, None


def _supported() -> str:
    return (
        "DiT-style class-conditional (DiTPipeline), unconditional UNet2DModel (DDPM / DDIM"
        f" pipelines), and the text pipelines {supported_text()}"
    )


def model_from_pipeline(
    path_or_pipeline: str | os.PathLike | Any,
    prompts: Sequence[str] | Mapping[str, Sequence[str]] | None = None,
    negative_prompt: str | None = None,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    *,
    sample_shape: Sequence[int] | None = None,
    name: str | None = None,
    height: int | None = None,
    width: int | None = None,
    num_frames: int | None = None,
    max_sequence_length: int | None = None,
    embedded_guidance: float | None = None,
    guidance_labels: str | None = None,
) -> Model:
    """A :class:`bns.Model` of a diffusers pipeline (a local folder or a pipeline object).

    Supported:

    - class-conditional DiT-style pipelines (``DiTPipeline``): ``y`` is the class label,
      ``num_classes`` the number of classes (1000 for DiT) and the label 1000 the null class;
    - unconditional UNet pipelines (DDPM / DDIM);
    - text pipelines: Stable Diffusion 1.x/2.x (``StableDiffusionPipeline``), SDXL
      (``StableDiffusionXLPipeline``), SD3/3.5 (``StableDiffusion3Pipeline``), Flux
      (``FluxPipeline``), PixArt-alpha/Sigma (``PixArtAlphaPipeline``, ``PixArtSigmaPipeline``)
      and Wan 2.1/2.2 video (``WanPipeline``). The ``prompts`` and the negative prompt are
      encoded once, with the pipeline's own ``encode_prompt`` as its default call does, and kept
      as buffers of the net (prompt data: outside the model's fingerprint); ``y`` indexes them,
      ``num_classes = len(prompts)`` and the label ``len(prompts)`` is the negative prompt (the
      null label). ``prompts`` is a list (every split of pairs draws from all of them) or a dict
      ``{"train": [...], "val": [...], "test": [...]}``: the model's ``label_splits`` then make
      training, validation and test pairs use their own prompts.

    Classifier-free guidance is not part of the model: it is the ``guidance=w`` argument of
    ``model.velocity``, :func:`bns.sample` and :func:`bns.distill`, in diffusers' convention
    (``w`` is the pipeline's ``guidance_scale``; Flux's ``true_cfg_scale`` with a negative
    prompt). The embedded guidance of a guidance-distilled network (Flux dev's
    ``guidance_scale``, an LCM-style UNet's ``time_cond_proj_dim``) is an input of the network,
    fixed here by ``embedded_guidance`` (default: the pipeline's default ``guidance_scale``).

    The prediction type and schedule come from the pipeline's scheduler (flow matching,
    including UniPC / DPM-Solver with ``flow_prediction`` and ``use_flow_sigmas`` -> CondOT
    velocity, shift / mu ignored as an inference-grid choice; epsilon / v_prediction / sample ->
    DiscreteVP). The denoiser runs in the pipeline's dtype on its device; the model's interface
    is float64 so that the flow time reaches the net unrounded. The network's weights are frozen
    (``eval``, no grad); gradients still flow through its inputs, as BNS training needs.

    Args:
        path_or_pipeline: a pipeline folder (loaded offline) or a pipeline object.
        prompts: text prompts of a text pipeline (required there, refused elsewhere): a list, or
            a dict of train / val / test lists.
        negative_prompt: the negative prompt of a text pipeline (the unconditional branch of
            guidance; default None: the pipeline's own default, ``""`` for most, zeros for SDXL
            with ``force_zeros_for_empty_prompt``); must be None for other pipelines.
        device, dtype: move / cast the pipeline (default: as it is).
        sample_shape: override the latent shape (default: from the pipeline's default size);
            families that condition on the size (SDXL, Flux, PixArt 1024, Wan 2.2 TI2V) take
            ``height`` / ``width`` instead.
        name: the model's name in artifacts.
        height, width: the image size in pixels that the pipeline would be called with (default:
            the pipeline's). It sets the latent shape and, for SDXL, the micro-conditioning
            ``time_ids = (height, width, 0, 0, height, width)`` (``original_size = target_size =
            (height, width)``, no crop: the default call's), for Flux the packed latent
            positions, for PixArt 1024 the resolution and aspect ratio.
        num_frames: Wan: the number of video frames (default: the pipeline's, 81).
        max_sequence_length: T5-based families (SD3, Flux, PixArt, Wan): the prompt length
            (default: the pipeline call's).
        embedded_guidance: the embedded guidance of a guidance-distilled network (see above).
        guidance_labels: the former name of ``negative_prompt`` (deprecated).
    """
    if guidance_labels is not None:
        warnings.warn(
            "model_from_pipeline(guidance_labels=...) is deprecated; pass negative_prompt=...",
            DeprecationWarning,
            stacklevel=2,
        )
        if negative_prompt is not None:
            raise TypeError("pass negative_prompt only (guidance_labels is its deprecated name)")
        negative_prompt = guidance_labels
    options = {
        key: value
        for key, value in {
            "height": height,
            "width": width,
            "num_frames": num_frames,
            "max_sequence_length": max_sequence_length,
            "embedded_guidance": embedded_guidance,
        }.items()
        if value is not None
    }
    pipe = _load_pipeline(path_or_pipeline, device, dtype)
    scheduler = getattr(pipe, "scheduler", None)
    if scheduler is None:
        raise DiffusersError(f"{type(pipe).__name__} has no scheduler")
    desc = describe_scheduler(scheduler)
    prediction_type = desc["prediction_type"]
    schedule = bns_schedule(prediction_type, desc["alphas_cumprod"])
    n_train = desc["num_train_timesteps"]
    kind = type(pipe).__name__
    transformer = getattr(pipe, "transformer", None)
    unet = getattr(pipe, "unet", None)
    denoiser = transformer if transformer is not None else unet
    if denoiser is None:
        raise DiffusersError(f"{kind} has neither a transformer nor a unet")
    cfg = denoiser.config
    num_classes: int | None = None
    label_splits: dict[str, range] | None = None
    is_text = hasattr(pipe, "encode_prompt")
    if negative_prompt is not None and not is_text:
        raise DiffusersError(f"negative_prompt needs a text pipeline, not {kind}")
    if is_text:
        text_kind = find_kind(pipe, denoiser)
        if text_kind is None:
            raise DiffusersError(
                f"text pipeline {kind} ({type(denoiser).__name__}) is not supported yet;"
                f" supported: {_supported()}"
            )
        _check_options(options, text_kind.options, text_kind.label)
        if not prompts:
            raise DiffusersError(
                f"{kind} is a text pipeline: pass prompts (the command line's --prompts FILE)"
            )
        texts, label_splits = _prompt_table(prompts)
        denoiser.eval().requires_grad_(False)
        build = TextBuild(
            pipe,
            denoiser,
            prediction_type,
            n_train,
            texts,
            negative_prompt,
            options,
            None if sample_shape is None else tuple(int(d) for d in sample_shape),
        )
        net, sample_shape = text_kind.build(build)
        num_classes = len(texts)
    else:
        if prompts is not None:
            raise DiffusersError(f"{kind} takes no text prompts")
        _check_options(options, frozenset(), kind)
        denoiser.eval().requires_grad_(False)
        net = _non_text_net(kind, denoiser, transformer, unet, prediction_type, n_train)
        if getattr(cfg, "num_embeds_ada_norm", None) and transformer is not None:
            num_classes = int(cfg.num_embeds_ada_norm)
        if sample_shape is None:
            size = cfg.sample_size
            size = (size, size) if isinstance(size, int) else tuple(size)
            sample_shape = (int(cfg.in_channels), *size)
    # The name enters the model's fingerprint: the pipeline class, not its folder, so that a
    # solver stays valid for the same weights wherever they live.
    return Model(
        net,
        prediction=BNS_PREDICTION_OF[prediction_type],
        schedule=schedule,
        sample_shape=tuple(sample_shape),
        t_range=(0.0, 1.0),
        num_classes=num_classes,
        name=name or f"diffusers:{kind}",
        # float64 so that the flow time reaches the net unrounded; the net casts x itself.
        dtype=torch.float64,
        **({"label_splits": label_splits} if label_splits is not None else {}),
    )


def _check_options(given: dict[str, Any], accepted: frozenset[str], what: str) -> None:
    refused = sorted(set(given) - accepted)
    if refused:
        takes = ", ".join(sorted(accepted)) or "none of them"
        raise DiffusersError(f"{what} does not take {', '.join(refused)} (it takes: {takes})")


def _non_text_net(
    kind: str, denoiser: Any, transformer: Any, unet: Any, prediction_type: str, n_train: int
) -> _PipelineNet:
    cfg = denoiser.config
    if getattr(cfg, "num_embeds_ada_norm", None) and transformer is not None:
        return _ClassNet(denoiser, prediction_type, n_train)
    if unet is not None and type(unet).__name__ == "UNet2DModel":
        if getattr(cfg, "num_class_embeds", None):
            raise DiffusersError("class-conditional UNet2DModel pipelines are not supported yet")
        return _UncondNet(denoiser, prediction_type, n_train)
    raise DiffusersError(
        f"{kind} ({type(denoiser).__name__}) is not supported; supported: {_supported()}"
    )
