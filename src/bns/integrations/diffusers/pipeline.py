"""Diffusers pipelines as :class:`bns.Model`: :func:`model_from_pipeline`.

A pipeline (a local folder or an object) becomes a model a solver can be distilled for
(``bns distill --model diffusers:PATH``); the conventions are in the package docstring.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ...model import Model
from ._conventions import (
    PREDICTIONS,
    DiffusersError,
    bns_schedule,
    describe_scheduler,
    diffusers_timestep,
)

__all__ = ["model_from_pipeline"]


class _PipelineNet(nn.Module):
    """``net(x, t, y)`` over a diffusers denoiser: flow time in, the model's target out.

    The bns Model is built with ``dtype=torch.float64``, so ``x`` and ``t`` arrive in float64 and
    the timestep is computed from the exact flow time; the net casts ``x`` to the denoiser's own
    dtype.
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
        return diffusers_timestep(self.prediction_type, self.num_train_timesteps, t).to(
            torch.float32
        )

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
    negative_prompt: str | None = None,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    *,
    sample_shape: Sequence[int] | None = None,
    name: str | None = None,
    guidance_labels: str | None = None,
) -> Model:
    """A :class:`bns.Model` of a diffusers pipeline (a local folder or a pipeline object).

    Supported: class-conditional DiT-style pipelines (``DiTPipeline``: ``y`` is the class label,
    ``num_classes`` is the number of classes, 1000 for DiT, and the label 1000 is the null
    class), SD3-style text pipelines (``StableDiffusion3Pipeline``: the ``prompts`` are encoded
    once, ``y`` indexes them, ``num_classes = len(prompts)`` and the label ``len(prompts)`` is
    the negative prompt), and unconditional UNet pipelines (DDPM / DDIM). Classifier-free
    guidance is not part of the model: it is the ``guidance=w`` argument of
    ``model.velocity``, :func:`bns.sample` and :func:`bns.distill`, in diffusers' convention
    (``w`` is the pipeline's ``guidance_scale``).

    The prediction type and schedule come from the pipeline's scheduler (see the module
    docstring: flow matching -> CondOT velocity, shift/mu ignored as an inference-grid choice;
    epsilon / v_prediction / sample -> DiscreteVP). The network's weights are frozen (``eval``,
    no grad); gradients still flow through its inputs, as BNS training needs.

    Args:
        path_or_pipeline: a pipeline folder (loaded offline) or a pipeline object.
        prompts: text prompts of a text pipeline (required there, refused elsewhere).
        negative_prompt: the negative prompt of a text pipeline (the unconditional branch of
            guidance, default ``""``); must be None for other pipelines.
        device, dtype: move / cast the pipeline (default: as it is).
        sample_shape: override the latent shape (default: the denoiser's ``sample_size``).
        name: the model's name in artifacts.
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
    denoiser.eval().requires_grad_(False)
    cfg = denoiser.config
    num_classes: int | None = None
    is_text = hasattr(pipe, "encode_prompt")
    if negative_prompt is not None and not is_text:
        raise DiffusersError(f"negative_prompt needs a text pipeline, not {kind}")
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
        embeds, pooled = _encode_prompts(pipe, prompts, negative_prompt or "")
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
        prediction=PREDICTIONS[prediction_type],
        schedule=schedule,
        sample_shape=tuple(sample_shape),
        t_range=(0.0, 1.0),
        num_classes=num_classes,
        name=name or f"diffusers:{kind}",
        # float64 so that the flow time reaches the net unrounded; the net casts x itself.
        dtype=torch.float64,
    )
