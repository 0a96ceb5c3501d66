"""Model specs of the command line, resolved through a registry of kinds.

A spec is a built-in name (``gmm``, see :data:`BUILTIN_MODELS`), ``path/to/file.py:factory``
(``factory()`` returns a :class:`bns.Model`) or ``diffusers:PATH`` (a local pipeline folder).
Each kind is one registry entry, a prefix or a matcher with its resolver, so a new source of
models is one :func:`register_spec` call:

    >>> register_spec("hub:", lambda name: my_hub_model(name), usage="hub:NAME")
    >>> load_model("hub:tiny-dit")

A spec that names no usable model ends with one :class:`SpecError` line.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import BNSError
from .model import Model

if TYPE_CHECKING:
    import torch

__all__ = ["BUILTIN_MODELS", "load_model", "register_spec", "SpecError"]

BUILTIN_MODELS = {
    "gmm": ("bns.models.gmm", "gmm"),
    "fmnist-cfg": ("bns.models.fmnist", "fmnist_cfg"),
    "fmnist-vp": ("bns.models.fmnist", "fmnist_vp"),
    "fmnist-ddpm": ("bns.models.fmnist", "fmnist_ddpm"),
}

Matcher = Callable[[str], bool]
Resolver = Callable[..., Any]


class SpecError(BNSError, ValueError):
    """A model spec that does not name a usable model."""


@dataclass(frozen=True)
class _Kind:
    resolve: Resolver
    usage: Callable[[], str]  # how the unknown-spec message names this kind
    prompts: bool  # whether it takes text prompts (--prompts)
    dtype: bool  # whether it loads the network in a dtype itself (--dtype)


# prefix ("diffusers:") or matcher -> kind, in the order the unknown-spec message lists them.
_REGISTRY: dict[str | Matcher, _Kind] = {}


def register_spec(
    match: str | Matcher,
    resolver: Resolver,
    *,
    usage: str | Callable[[], str] | None = None,
    prompts: bool = False,
    dtype: bool = False,
) -> None:
    """Add a kind of model spec (registering the same ``match`` again replaces it).

    Args:
        match: a prefix such as ``"hub:"`` (specs that start with it; the resolver receives the
            rest of the spec) or a matcher ``match(spec) -> bool`` (the resolver receives the
            whole spec). Prefixes are tried before matchers, the longest first.
        resolver: ``resolver(rest)`` returns a :class:`bns.Model` (``resolver(rest,
            prompts=...)`` for a kind that takes prompts); it raises :class:`SpecError` with
            one clear line for a spec it cannot use.
        usage: how the message for an unknown spec names this kind (default ``PREFIX...``).
        prompts: whether the kind takes text prompts (the command line's ``--prompts``).
        dtype: whether the resolver loads the network in a dtype itself (``resolver(rest,
            dtype=...)``, e.g. a pipeline in its own half precision); otherwise
            :func:`load_model` casts the model it returns.
    """
    if usage is None and not isinstance(match, str):
        raise TypeError("a matcher needs usage=... (how an error message names its specs)")
    label = f"{match}..." if usage is None else usage
    describe = label if callable(label) else lambda: label
    _REGISTRY[match] = _Kind(resolver, describe, prompts, dtype)


def _find(spec: str) -> tuple[_Kind, str] | None:
    """The kind of ``spec`` and what its resolver receives, or None."""
    prefixes = sorted((m for m in _REGISTRY if isinstance(m, str)), key=len, reverse=True)
    for prefix in prefixes:
        if spec.startswith(prefix):
            return _REGISTRY[prefix], spec[len(prefix) :]
    for match, kind in _REGISTRY.items():
        if not isinstance(match, str) and match(spec):
            return kind, spec
    return None


def _one_of(kinds: list[_Kind]) -> str:
    names = [kind.usage() for kind in kinds]
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} or {names[-1]}"


def load_model(
    spec: str,
    prompts: list[str] | dict[str, list[str]] | None = None,
    dtype: torch.dtype | None = None,
) -> Model:
    """Resolve a model spec to a :class:`bns.Model`.

    - a built-in name: ``gmm``, ``fmnist-cfg``, ``fmnist-vp``, ``fmnist-ddpm``;
    - ``path/to/file.py:factory`` where ``factory()`` returns a ``bns.Model``;
    - ``diffusers:PATH``, a local diffusers pipeline folder (``prompts`` for text pipelines:
      a list, or ``{"train": [...], "val": [...], "test": [...]}``);
    - any kind added with :func:`register_spec`.

    ``dtype`` is the dtype the network runs in (a pipeline is loaded in it; another model is
    cast with :meth:`bns.Model.to`).
    """
    found = _find(spec)
    if prompts is not None and (found is None or not found[0].prompts):
        takes = [kind for kind in _REGISTRY.values() if kind.prompts]
        raise SpecError(f"--prompts applies to {_one_of(takes)} models only")
    if found is None:
        raise SpecError(f"unknown model {spec!r}: use one of {_one_of(list(_REGISTRY.values()))}")
    kind, rest = found
    kwargs: dict[str, Any] = {}
    if kind.prompts:
        kwargs["prompts"] = prompts
    if kind.dtype:
        kwargs["dtype"] = dtype
    model = kind.resolve(rest, **kwargs)
    if not isinstance(model, Model):
        raise SpecError(f"{spec} did not give a bns.Model (got {type(model).__name__})")
    if dtype is not None and not kind.dtype:
        model.to(dtype=dtype)
    return model


# -- the built-in kinds -------------------------------------------------------------------------


def _is_builtin(spec: str) -> bool:
    return spec in BUILTIN_MODELS


def _builtin(name: str) -> Any:
    module, factory = BUILTIN_MODELS[name]
    return getattr(importlib.import_module(module), factory)()


def _is_file_spec(spec: str) -> bool:
    file, sep, _ = spec.rpartition(":")
    return bool(sep) and file.endswith(".py")


def _from_file(spec: str) -> Any:
    """``path/to/file.py:factory``: import the file and call ``factory()``. The file's folder
    goes on ``sys.path`` (last: a user's ``secrets.py`` or ``profile.py`` beside it must not
    shadow the modules bns imports later), so a factory imports its own network's module from
    beside it, now or when it runs."""
    file, _, factory = spec.rpartition(":")
    path = Path(file)
    if not path.is_file():
        raise SpecError(f"model file not found: {file}")
    folder = str(path.resolve().parent)
    if folder not in sys.path:
        sys.path.append(folder)
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
        return fn()
    except Exception as e:  # noqa: BLE001
        raise SpecError(f"{file}:{factory}() failed: {type(e).__name__}: {e}") from None


# ``diffusers:PATH?key=value&...``: the keywords of model_from_pipeline a spec can set.
DIFFUSERS_OPTIONS: dict[str, Callable[[str], Any]] = {
    "negative_prompt": str,
    "height": int,
    "width": int,
    "num_frames": int,
    "max_sequence_length": int,
    "embedded_guidance": float,
}


def _diffusers_options(query: str) -> dict[str, Any]:
    from urllib.parse import parse_qsl

    out: dict[str, Any] = {}
    for key, value in parse_qsl(query, keep_blank_values=True, strict_parsing=bool(query)):
        if key not in DIFFUSERS_OPTIONS:
            raise SpecError(
                f"unknown pipeline option {key!r} in diffusers:PATH?...; known: "
                + ", ".join(DIFFUSERS_OPTIONS)
            )
        try:
            out[key] = DIFFUSERS_OPTIONS[key](value)
        except ValueError:
            raise SpecError(f"pipeline option {key}={value!r} is not a valid value") from None
    return out


def _from_diffusers(spec: str, prompts: Any = None, dtype: torch.dtype | None = None) -> Any:
    """``diffusers:PATH[?key=value&...]``: a local pipeline folder (the diffusers extra,
    imported lazily); the options are keywords of ``model_from_pipeline`` (DIFFUSERS_OPTIONS),
    e.g. ``diffusers:flux?height=512&width=512&embedded_guidance=3.5``."""
    path, _, query = spec.partition("?")
    try:
        options = _diffusers_options(query)
    except ValueError as e:  # a malformed query
        raise SpecError(f"cannot read the pipeline options {query!r}: {e}") from None
    if not Path(path).exists():
        raise SpecError(f"diffusers pipeline folder not found: {path}")
    try:
        from .integrations.diffusers import model_from_pipeline
    except ImportError as e:
        raise SpecError(
            f"diffusers:PATH needs the diffusers extra (pip install 'bns[diffusers]'): {e}"
        ) from None
    return model_from_pipeline(path, prompts=prompts, dtype=dtype, **options)


register_spec(_is_builtin, _builtin, usage=lambda: ", ".join(BUILTIN_MODELS))
register_spec(_is_file_spec, _from_file, usage="path/to/file.py:factory")
register_spec("diffusers:", _from_diffusers, usage="diffusers:PATH", prompts=True, dtype=True)
