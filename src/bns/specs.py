"""Model specs of the command line: a built-in name, ``path/to/file.py:factory`` or
``diffusers:PATH``."""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path
from typing import Any

from .model import Model

__all__ = ["BUILTIN_MODELS", "load_model", "SpecError"]

BUILTIN_MODELS = {
    "gmm": ("bns.models.gmm", "gmm"),
    "fmnist-cfg": ("bns.models.fmnist", "fmnist_cfg"),
    "fmnist-vp": ("bns.models.fmnist", "fmnist_vp"),
}


class SpecError(ValueError):
    """A model spec that does not name a usable model."""


def load_model(spec: str, prompts: list[str] | None = None) -> Model:
    """Resolve a model spec to a :class:`bns.Model`.

    - a built-in name: ``gmm``, ``fmnist-cfg``, ``fmnist-vp``;
    - ``path/to/file.py:factory`` where ``factory()`` returns a ``bns.Model``;
    - ``diffusers:PATH``, a local diffusers pipeline folder (``prompts`` for text pipelines).
    """
    if prompts is not None and not spec.startswith("diffusers:"):
        raise SpecError("--prompts applies to diffusers:PATH models only")
    if spec in BUILTIN_MODELS:
        module, name = BUILTIN_MODELS[spec]
        return _checked(getattr(importlib.import_module(module), name)(), spec)
    if spec.startswith("diffusers:"):
        path = spec[len("diffusers:") :]
        if not Path(path).exists():
            raise SpecError(f"diffusers pipeline folder not found: {path}")
        try:
            from .integrations.diffusers import model_from_pipeline
        except ImportError as e:
            raise SpecError(
                f"diffusers:PATH needs the diffusers extra (pip install 'bns[diffusers]'): {e}"
            ) from None
        return _checked(model_from_pipeline(path, prompts=prompts), spec)
    file, sep, factory = spec.rpartition(":")
    if not sep or not file.endswith(".py"):
        raise SpecError(
            f"unknown model {spec!r}: use one of {', '.join(BUILTIN_MODELS)}, path/to/file.py:factory"
            " or diffusers:PATH"
        )
    path = Path(file)
    if not path.is_file():
        raise SpecError(f"model file not found: {file}")
    mod_name = f"_bns_user_model_{abs(hash(str(path.resolve())))}"
    loader = importlib.util.spec_from_file_location(mod_name, path)
    if loader is None or loader.loader is None:
        raise SpecError(f"cannot import {file}")
    module = importlib.util.module_from_spec(loader)
    sys.modules[mod_name] = module
    try:
        loader.loader.exec_module(module)
    except Exception as e:  # noqa: BLE001 - a user file can fail in any way
        raise SpecError(f"importing {file} failed: {type(e).__name__}: {e}") from None
    fn = getattr(module, factory, None)
    if not callable(fn):
        raise SpecError(f"{file} has no callable {factory!r}")
    try:
        model = fn()
    except Exception as e:  # noqa: BLE001
        raise SpecError(f"{file}:{factory}() failed: {type(e).__name__}: {e}") from None
    return _checked(model, spec)


def _checked(model: Any, spec: str) -> Model:
    if not isinstance(model, Model):
        raise SpecError(f"{spec} did not give a bns.Model (got {type(model).__name__})")
    return model
