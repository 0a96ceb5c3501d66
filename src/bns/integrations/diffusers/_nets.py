"""The ``net(x, t, y)`` wrappers around a diffusers denoiser that :func:`model_from_pipeline`
builds (the text families' nets are in :mod:`._text`).

The bns Model is built with ``dtype=torch.float64``, so ``x`` and ``t`` arrive in float64 and the
timestep is computed from the exact flow time; each net casts ``x`` to the denoiser's own dtype
and runs the denoiser on the device its weights are on.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ._conventions import diffusers_timestep


class _PipelineNet(nn.Module):
    """``net(x, t, y)`` over a diffusers denoiser: flow time in, the model's target out."""

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
        out = out[:, : x.shape[1]]  # DiT / PixArt learned variance: keep the prediction channels
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


class _TextNet(_PipelineNet):
    """A text-conditioned denoiser over prompt embeddings encoded once (buffers ``[K + 1, ...]``:
    the prompts, then the negative prompt, the null label ``K``); ``y`` indexes them.

    Subclasses name the buffers that are prompt data in ``bns_conditioning``: the model's
    fingerprint skips them (a solver stays valid on other prompts) and the ground-truth cache
    keys on them instead. Other buffers (SDXL's time ids, Flux's position ids and embedded
    guidance) are settings of the model and part of its fingerprint.
    """

    bns_conditioning: tuple[str, ...] = ("embeds",)

    def __init__(
        self,
        denoiser: nn.Module,
        prediction_type: str,
        num_train_timesteps: int,
        buffers: dict[str, Tensor | None],
    ):
        super().__init__(denoiser, prediction_type, num_train_timesteps)
        for key, value in buffers.items():
            self.register_buffer(key, value)

    def rows(self, x: Tensor, y: Tensor | None) -> Tensor:
        """The rows of the prompt buffers: ``y``, or the null label where there is none."""
        if y is None:
            return torch.full((x.shape[0],), self.embeds.shape[0] - 1, device=self.embeds.device)
        return y.to(self.embeds.device)
