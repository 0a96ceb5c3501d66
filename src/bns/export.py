"""Export a solver's time grid for a stock scheduler: ``bns export``.

A solver's times are flow times ``t`` (0 = noise, 1 = data); a stock scheduler takes them in
its model's convention:

- flow models (CondOT, ``x = t x1 + (1 - t) eps``): ``sigma = 1 - t``, diffusers timestep
  ``sigma N`` (``N = 1000``), as FlowMatch schedulers and the multistep ones in flow mode.
- discrete DDPM models (``DiscreteVP``): timestep ``k = (1 - t)(N - 1)`` with ``N`` the length
  of ``alphas_cumprod`` (:func:`bns.integrations.diffusers._conventions.diffusers_timestep`),
  and the Karras noise level ``sigma = sigma_t / alpha_t = sqrt((1 - ac_k) / ac_k)``.
- other VP, cosine and EDM models: the Karras noise level ``sigma_t / alpha_t`` (k-diffusion's
  ``sigmas``; EDM's ``s``); they have no timesteps.

The formats: ``sigmas`` (k-diffusion's list: the noise level of every evaluation and of the
end, which is 0 where the solver ends on the data, ``meta["end"] == "data"``), ``timesteps``
(diffusers' timesteps of the evaluations), ``comfyui`` (the ``sigmas`` list as ComfyUI's
``ManualSigmas`` node takes it: one comma-separated string) and ``json`` (all of them, the
model kind, the NFE, which diffusers scheduler runs the solver exactly and with which
settings, and whether the grid is the whole solver).

Only a ``time``-family solver (or a classical one) is exactly a schedule: its coefficients are
its classical method's on its grid, so a scheduler that runs that method on the exported grid
runs the solver. Every other family's coefficients are learned, and a schedule of its times
drops them (``exact`` is false and the command line warns). For a method with several
evaluations per step (midpoint), the exported grid is the step grid the scheduler takes.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import torch

from ._io import atomic_write_text
from .errors import BNSError
from .schedules import Schedule, noise_level, schedule_from_config
from .solver import NSSolver
from .solvers.ends import solver_end

__all__ = ["FORMATS", "ExportError", "grid_export", "export_text", "write_export"]

FORMATS = ("sigmas", "timesteps", "comfyui", "json")
FLOW_TIMESTEPS = 1000  # diffusers' num_train_timesteps of flow-matching schedulers

NOTE_EXACT = (
    "a time-family (or classical) solver is exactly a schedule: a scheduler that runs its method"
    " on this grid runs the solver"
)
NOTE_INEXACT = (
    "only a time-family solver is exactly a schedule: this {family} solver's learned"
    " coefficients are dropped, the scheduler runs its own method on the learned times"
)


class ExportError(BNSError, ValueError):
    """A solver whose grid cannot be exported as asked."""


def _kind(schedule: Schedule) -> str:
    name = getattr(schedule, "name", "")
    if name == "condot":
        if float(schedule.sigma0) != 1.0:
            raise ExportError(
                f"a CondOT model with sigma0 = {schedule.sigma0:g} has no stock scheduler"
                " convention (flow models have sigma0 = 1)"
            )
        return "flow"
    if name == "discrete_vp":
        return "discrete"
    if name in ("vp", "cosine", "edm"):
        return name
    raise ExportError(f"no scheduler convention is known for a model with scheduler {name!r}")


def _schedule(solver: NSSolver, model: Any = None) -> tuple[Schedule, str]:
    """The model's scheduler (from ``model``, else ``meta["model_settings"]``) and where from."""
    if model is not None:
        schedule = getattr(model, "schedule", model)
        if not isinstance(schedule, Schedule):
            raise ExportError(
                f"model must be a bns.Model or a Schedule, got {type(model).__name__}"
            )
        return schedule, "model"
    settings = solver.meta.get("model_settings")
    if not isinstance(settings, dict) or not isinstance(settings.get("schedule"), dict):
        raise ExportError(
            "the solver does not record its model's conventions (meta['model_settings']):"
            " pass the model (--model SPEC)"
        )
    try:
        return schedule_from_config(settings["schedule"]), "meta"
    except ValueError as e:
        raise ExportError(f"the solver's model_settings hold no usable schedule: {e}") from None


def _method(solver: NSSolver) -> tuple[str | None, bool]:
    """The classical method whose grid the solver is, and whether the solver is exactly that
    method on its grid (a time-family or classical solver, not preconditioned)."""
    from .solvers import METHODS

    family = solver.meta.get("family")
    if family is None and solver.meta.get("solver") in METHODS:
        return solver.meta["solver"], "transform" not in solver.meta
    label = str(solver.meta.get("init", ""))
    name = label.partition("+pc")[0].partition("@")[0]
    if family == "time" and name in METHODS:
        return name, "+pc" not in label
    return None, False


def _diffusers(method: str | None, kind: str, end_zero: bool, n: int) -> dict[str, Any] | None:
    """The stock diffusers scheduler (and settings) that runs ``method`` exactly on the grid."""
    if method is None:
        return None
    final = "zero" if end_zero else "sigma_min"
    if kind == "flow" and method == "euler":
        return {
            "scheduler": "FlowMatchEulerDiscreteScheduler",
            "config": {"shift": 1.0, "use_dynamic_shifting": False},
            "set_timesteps": "sigmas=diffusers_sigmas (the end, 0, is appended by diffusers)",
        }
    if kind == "flow" and method in ("unipc2", "unipc3"):
        return {
            "scheduler": "UniPCMultistepScheduler",
            "config": {
                "use_flow_sigmas": True,
                "prediction_type": "flow_prediction",
                "flow_shift": 1.0,
                "solver_order": int(method[-1]),
                "solver_type": "bh2",
                "predict_x0": True,
                "lower_order_final": True,
                "final_sigmas_type": "zero",
                "disable_corrector": [],
            },
            "set_timesteps": "sigmas=diffusers_sigmas",
            "caveat": "diffusers moves a first sigma of 1 to 1 - 1e-6 and keeps sigmas in float32",
        }
    if kind == "discrete" and method in ("dpmpp2m", "dpmpp3m"):
        return {
            "scheduler": "DPMSolverMultistepScheduler",
            "config": {
                "algorithm_type": "dpmsolver++",
                "solver_type": "midpoint",
                "solver_order": int(method[-2]),
                "lower_order_final": True,
                "final_sigmas_type": final,
                "use_karras_sigmas": False,
            },
            "set_timesteps": "timesteps=[round(k) for k in diffusers_timesteps]",
            "caveat": "diffusers truncates custom timesteps to integers: exact on integer"
            " timesteps only, else the same method on the rounded grid",
        }
    return None


def grid_export(solver: NSSolver, model: Any = None) -> dict[str, Any]:
    """Everything :func:`export_text` writes, as a dict (the ``json`` format).

    ``model`` (a :class:`bns.Model` or its scheduler) gives the conventions; without it they
    come from ``solver.meta["model_settings"]``. Raises :class:`ExportError` where they cannot
    be determined.
    """
    from .solvers import METHODS

    schedule, source = _schedule(solver, model)
    kind = _kind(schedule)
    method, exact = _method(solver)
    per_step = METHODS[method].per_step if exact else 1
    times = solver.times.detach().to(torch.float64).cpu()[::per_step]
    n = times.numel() - 1
    end_zero = solver_end(solver) == "data"
    sigmas = [float(s) for s in noise_level(schedule, times)]
    if end_zero:
        sigmas[-1] = 0.0
    if kind == "flow":
        timesteps = [float(s) * FLOW_TIMESTEPS for s in sigmas[:n]]
    elif kind == "discrete":
        timesteps = [float(k) for k in schedule.timestep(times[:n])]
    else:
        timesteps = None
    if any(not math.isfinite(s) for s in sigmas):
        raise ExportError(
            f"a time of the solver has an infinite noise level in the {kind} convention"
            " (alpha = 0): no scheduler takes it"
        )
    family = solver.meta.get("family") or solver.meta.get("solver", "ns")
    settings = solver.meta.get("model_settings") or {}
    return {
        "format": "bns-schedule",
        "version": 1,
        "model_kind": kind,
        "conventions_from": source,
        "model_name": settings.get("name") or getattr(model, "name", None),
        "prediction": settings.get("prediction") or getattr(model, "prediction", None),
        "family": family,
        "method": method,
        "nfe": solver.nfe,
        "steps": n,
        "end": "data" if end_zero else "range",
        "exact": exact,
        "note": NOTE_EXACT if exact else NOTE_INEXACT.format(family=family),
        "times": [float(t) for t in times],
        "sigmas": sigmas,
        "timesteps": timesteps,
        "diffusers_sigmas": sigmas[:n],
        "diffusers_timesteps": timesteps,
        "comfyui_manual_sigmas": _comfyui(sigmas),
        "diffusers": _diffusers(method, kind, end_zero, n) if exact else None,
    }


def _comfyui(sigmas: list[float]) -> str:
    return ", ".join(repr(s) for s in sigmas)


def export_text(solver: NSSolver, fmt: str, model: Any = None) -> str:
    """The text of format ``fmt`` (one of :data:`FORMATS`) for ``solver``."""
    if fmt not in FORMATS:
        raise ExportError(f"unknown format {fmt!r}; known: {', '.join(FORMATS)}")
    info = grid_export(solver, model)
    if fmt == "json":
        return json.dumps(info, indent=1) + "\n"
    if fmt == "comfyui":
        return info["comfyui_manual_sigmas"] + "\n"
    if fmt == "timesteps" and info["timesteps"] is None:
        raise ExportError(
            f"a {info['model_kind']} model has no timesteps; export --format sigmas instead"
        )
    return json.dumps(info[fmt]) + "\n"


def write_export(
    solver: NSSolver, fmt: str, out: str | os.PathLike, model: Any = None
) -> dict[str, Any]:
    """Write format ``fmt`` of ``solver`` to ``out`` atomically (nothing is written on any
    failure); returns :func:`grid_export`'s dict."""
    text = export_text(solver, fmt, model)
    atomic_write_text(Path(out), text)
    return grid_export(solver, model)


def add_parser(sub: Any) -> None:
    """The ``bns export`` subcommand."""
    p = sub.add_parser("export", help="write a solver's grid for a stock scheduler")
    p.add_argument("solver", type=Path, help="the solver file (JSON)")
    p.add_argument("--format", required=True, help=f"what to write: {', '.join(FORMATS)}")
    p.add_argument("--model", help="the model's spec, where the solver does not record it")
    p.add_argument("--out", type=Path, help="the file to write (default: standard output)")


def cmd_export(args: Any) -> int:
    import sys

    solver = NSSolver.load(args.solver)  # SolverFileError: missing, corrupt (one line)
    model = None
    if args.model is not None:
        from .specs import load_model

        model = load_model(args.model)
    text = export_text(solver, args.format, model)
    info = grid_export(solver, model)
    if not info["exact"]:
        print(f"bns export: warning: {info['note']}", file=sys.stderr)
    if args.out is None:
        sys.stdout.write(text)
    else:
        atomic_write_text(args.out, text)
    return 0
