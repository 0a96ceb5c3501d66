"""The ComfyUI nodes: BNS Sampler (a ``SAMPLER``) and BNS Sigmas (its grid as ``SIGMAS``).

Classic ComfyUI node classes (``INPUT_TYPES`` / ``RETURN_TYPES`` / ``FUNCTION`` /
``CATEGORY``), which ComfyUI's custom-node loader registers from ``NODE_CLASS_MAPPINGS``.
``comfy`` is imported only when a node runs.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

from torch import Tensor

from ...solver import NSSolver, SolverFileError
from ...solvers.ends import solver_noise_levels
from .conventions import (
    ComfyUIError,
    check_guidance,
    check_sigmas,
    model_kind,
    sample_ns,
    solver_kind,
    solver_schedule,
)

__all__ = [
    "BNSSampler",
    "BNSSigmas",
    "load_solver",
    "NODE_CLASS_MAPPINGS",
    "NODE_DISPLAY_NAME_MAPPINGS",
]

CATEGORY = "sampling/custom_sampling/bns"
_SOLVER_INPUT = (
    "STRING",
    {
        "default": "",
        "multiline": False,
        "tooltip": "a bns solver file (.json): an absolute path, or a name in models/bns",
    },
)


def _models_dir() -> Path | None:
    try:
        import folder_paths  # noqa: PLC0415 - ComfyUI's own module, only inside ComfyUI
    except ImportError:
        return None
    return Path(folder_paths.models_dir) / "bns"


def resolve_solver_path(path: str) -> Path:
    """The solver file a node's ``solver`` string names: the path itself (``~`` expanded), or
    the name in ComfyUI's ``models/bns`` folder (``.json`` optional)."""
    text = str(path).strip()
    if not text:
        raise ComfyUIError("BNS: no solver file given (the path of a bns solver .json)")
    p = Path(os.path.expanduser(text))
    if p.is_file() or p.is_absolute():
        return p
    folder = _models_dir()
    if folder is not None:
        for cand in (folder / text, folder / f"{text}.json"):
            if cand.is_file():
                return cand
    return p


def load_solver(path: str) -> NSSolver:
    """Read and validate a solver file; every failure is one line (:class:`ComfyUIError`)."""
    p = resolve_solver_path(path)
    try:
        return NSSolver.load(p, force=True)
    except SolverFileError as e:
        raise ComfyUIError(f"BNS: {e}") from None


def _file_state(path: str) -> str:
    """What ComfyUI compares to decide whether to rerun a node: the solver file's contents."""
    try:
        return hashlib.sha256(resolve_solver_path(path).read_bytes()).hexdigest()
    except (OSError, ComfyUIError):
        return f"missing:{path}"


def sampler_function(
    model: Any,
    x: Tensor,
    sigmas: Tensor,
    extra_args: dict[str, Any] | None = None,
    callback: Any = None,
    disable: bool | None = None,
    *,
    solver: NSSolver,
    ksampler: Any = None,
) -> Tensor:
    """The function a ``KSAMPLER`` calls: ``model`` is ComfyUI's ``KSamplerX0Inpaint``, whose
    ``inner_model`` is the guider and ``inner_model.inner_model`` the model
    (``model_sampling``); ``x`` the scaled noise, ``sigmas`` the grid."""
    guider = getattr(model, "inner_model", None)
    ms = guider.inner_model.model_sampling
    kind = model_kind(ms)
    schedule = solver_schedule(solver, kind)
    check_sigmas(sigmas, solver_noise_levels(solver, schedule), solver.nfe)
    check_guidance(solver, guider)
    if kind.kind == "flow":
        max_denoise = True  # CONST noise scaling does not depend on it
    elif ksampler is not None:
        max_denoise = bool(ksampler.max_denoise(guider, sigmas))  # the decision ComfyUI took
    else:
        raise ComfyUIError("BNS Sampler: no KSAMPLER to tell how the noise was scaled")
    return sample_ns(
        model,
        x,
        sigmas,
        extra_args,
        callback,
        disable,
        solver=solver,
        schedule=schedule,
        max_denoise=max_denoise,
    )


def make_sampler(solver: NSSolver) -> Any:
    """A ComfyUI ``SAMPLER`` (``comfy.samplers.KSAMPLER``) running ``solver``."""
    from comfy.samplers import KSAMPLER  # noqa: PLC0415 - only inside ComfyUI

    holder: dict[str, Any] = {}
    sampler = KSAMPLER(_Bound(solver, holder))
    holder["ksampler"] = sampler
    return sampler


class _Bound:
    """``sampler_function`` with the solver and its KSAMPLER bound (a plain callable with
    k-diffusion's signature; a class so that it prints as what it is)."""

    def __init__(self, solver: NSSolver, holder: dict[str, Any]) -> None:
        self.solver = solver
        self.holder = holder

    def __call__(self, model, x, sigmas, extra_args=None, callback=None, disable=None):
        return sampler_function(
            model,
            x,
            sigmas,
            extra_args,
            callback,
            disable,
            solver=self.solver,
            ksampler=self.holder.get("ksampler"),
        )

    def __repr__(self) -> str:
        return f"sample_bns({self.solver!r})"


class BNSSampler:
    """A SAMPLER that runs a bns solver (connect BNS Sigmas of the same solver as sigmas)."""

    DESCRIPTION = (
        "Samples with a bns (Bespoke Non-Stationary) solver file. Use it in SamplerCustom /"
        " SamplerCustomAdvanced with BNS Sigmas of the same solver as the sigmas."
    )
    RETURN_TYPES = ("SAMPLER",)
    FUNCTION = "get_sampler"
    CATEGORY = CATEGORY

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {"required": {"solver": _SOLVER_INPUT}}

    @classmethod
    def IS_CHANGED(cls, solver: str) -> str:
        return _file_state(solver)

    def get_sampler(self, solver: str) -> tuple[Any]:
        loaded = load_solver(solver)
        solver_kind(loaded)  # refuse a solver made for no ComfyUI model now; the model at sampling
        return (make_sampler(loaded),)


class BNSSigmas:
    """The solver's time grid as SIGMAS in the model's convention (0 last for solvers that end
    on the data)."""

    DESCRIPTION = "The time grid of a bns solver file as sigmas for this model."
    RETURN_TYPES = ("SIGMAS",)
    FUNCTION = "get_sigmas"
    CATEGORY = CATEGORY

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {"required": {"model": ("MODEL",), "solver": _SOLVER_INPUT}}

    @classmethod
    def IS_CHANGED(cls, model: Any = None, solver: str = "") -> str:
        return _file_state(solver)

    def get_sigmas(self, model: Any, solver: str) -> tuple[Tensor]:
        import torch

        loaded = load_solver(solver)
        ms = model.get_model_object("model_sampling")
        schedule = solver_schedule(loaded, model_kind(ms))
        return (solver_noise_levels(loaded, schedule).to(torch.float32),)


NODE_CLASS_MAPPINGS = {"BNSSampler": BNSSampler, "BNSSigmas": BNSSigmas}
NODE_DISPLAY_NAME_MAPPINGS = {"BNSSampler": "BNS Sampler", "BNSSigmas": "BNS Sigmas"}
