"""`DistillConfig`: every setting of a distillation run and its default, stated once.

:func:`bns.distill` takes a config (or keyword overrides of it), ``bns distill`` derives its
options and help text from the fields below, and the solver file records the config it was
trained with. A field's ``metadata`` holds its help text and, where the command line needs
it, a parser (``parse``) and a metavar.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import warnings
from collections.abc import Callable
from dataclasses import MISSING, asdict, dataclass, field, fields, replace
from typing import Any

from .errors import InputError, TrainingError

__all__ = [
    "DistillConfig",
    "TrainingError",
    "parse_precondition",
    "parse_span",
    "add_config_arguments",
    "resolve_steps",
    "current_names",
    "RENAMED",
    "auto_gn_batch_size",
]


def parse_precondition(text: str | float | None) -> float | str | None:
    """``"auto"``, ``"none"``/None or a positive ``sigma0``."""
    if text is None or text == "none":
        return None
    if text == "auto":
        return "auto"
    try:
        value = float(text)
    except (TypeError, ValueError):
        raise InputError(f"precondition must be a number, none or auto, got {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise InputError(f"precondition sigma0 must be a finite number > 0, got {text!r}")
    return value


def parse_span(text: Any) -> list[float | None] | None:
    """``"T0:T1"`` (flow times; either may be left out: ``0.4:``, ``:0.8``), a pair, or
    None/``"none"``: the part of the model's range a solver covers (see
    :meth:`bns.Model.span`). Returned as ``[t0, t1]`` with None for a left-out end."""
    if text is None or text == "none":
        return None
    if isinstance(text, str):
        parts = text.split(":")
        if len(parts) != 2:
            raise InputError(f"span must be T0:T1 in flow time (0.4:, :0.8, 0.2:0.8), got {text!r}")
        values = [p.strip() or None for p in parts]
    else:
        try:
            values = list(text)
        except TypeError:
            raise InputError(f"span must be T0:T1 or a pair, got {text!r}") from None
        if len(values) != 2:
            raise InputError(f"span must hold two flow times, got {text!r}")
    out: list[float | None] = []
    for v in values:
        if v is None:
            out.append(None)
            continue
        try:
            f = float(v)
        except (TypeError, ValueError):
            raise InputError(f"span ends must be numbers, got {v!r}") from None
        if not (math.isfinite(f) and 0 <= f <= 1):
            raise InputError(f"span ends are flow times in [0, 1], got {v!r}")
        out.append(f)
    if out == [None, None]:
        return None
    if None not in out and not out[0] < out[1]:
        raise InputError(f"span must start before it ends, got {text!r}")
    return out


_BUDGET_HELP = (
    "fit the run to a number of network evaluations (forwards + JVPs: 200k, 1.5M) or a"
    " duration (90s, 10m, 1h), ground truth included: it chooses train_pairs, val_pairs,"
    " init_pairs, gn_batch_size and gn_steps (or adam_steps) from the estimate, stops the optimizer"
    " before the budget is crossed and returns the best solver so far"
)
_SPAN_HELP = (
    "the part of the path the solver covers, T0:T1 in flow time (0 = noise, 1 = data; either"
    " end may be left out): one that starts inside starts from noised samples, as"
    " image-to-image at strength 1 - T0 (0.4: for 0.6); one that ends inside hands over there"
    " (:0.8 then 0.8: for a base/refiner split). none: the whole range"
)


def _parse_budget(text: str | None) -> str | None:
    from .budget import check_budget_text  # the parser lives with the ladder

    return check_budget_text(text)


def _opt(default: Any, help: str, **meta: Any) -> Any:
    return field(default=default, metadata={"help": help, **meta})


def _one_of(names: Any) -> str:
    names = list(names)
    return f"{', '.join(names[:-1])} or {names[-1]}"


# Older names of settings, still taken (with a FutureWarning) by DistillConfig.replace, so by
# bns.distill(**settings), and by the command line: older name -> name. ``steps`` read as the
# solver's steps elsewhere (those are its ``nfe``).
RENAMED = {"steps": "adam_steps"}

# What runs when neither ``adam_steps`` nor ``gn_steps`` is given (benchmarks/results/optimizers_*):
# Gauss-Newton steps from the initial solver where the network can be differentiated in
# forward mode, else Adam steps.
AUTO_GN_STEPS = 12
AUTO_ADAM_STEPS = 1000


def auto_gn_batch_size(nfe: int) -> int:
    """The Gauss-Newton batch when none is given: ``256 / nfe`` pairs within [16, 64] (64 at
    NFE 4, 32 at 8, 16 from 16 on). One pair costs about ``nfe^3 / 6`` JVPs per step
    (:func:`bns.estimate.gn_step_work`), so a step costs about ``43 nfe^2`` JVPs: about as
    many per solver parameter at every NFE (benchmarks/results/gn_scaling_*.md)."""
    return max(16, min(64, round(256 / max(nfe, 1))))


_GN_HELP = (
    "Gauss-Newton (Levenberg-Marquardt) steps after the Adam steps (at most: see gn_patience),"
    " each validated: exact forward-mode Jacobians of the solver's output, about n^3/6 JVPs per"
    " pair and n^2/2 x micro_batch (or gn_batch_size) samples of memory; log-mse or mse loss."
    f" auto: {AUTO_GN_STEPS} when neither adam_steps nor gn_steps is given and the network supports"
    " forward mode, else 0"
)


_INIT_HELP = (
    "initial solver: best (every classical solver on every grid of the model, measured on"
    " validation pairs), a solver name (euler, midpoint, ab3, ipndm, unipc2, ...: its grids"
    " measured) or one solver on one grid (ab3@uniform, unipc2@trailing, midpoint+pc1)"
)
_FAMILY_HELP = (
    "solver family: bns (the full non-stationary family), time (the time grid of a"
    " classical solver), scale-time (a scale-time transformation of euler or midpoint, as"
    " BES), multistep (multistep coefficients over the history on a learned grid, a_i = 1)"
)


@dataclass
class DistillConfig:
    """Everything that determines a distillation run (recorded in the artifact)."""

    nfe: int = field(metadata={"help": "velocity evaluations of the solver (NFE)"})
    guidance: float = _opt(1.0, "classifier-free guidance scale (1 = none)")
    init: str = _opt("best", _INIT_HELP)
    precondition: float | str | None = _opt(
        "auto",
        "run Runge-Kutta and multistep initial solvers on the CondOT(sigma0)-rescheduled ODE: a"
        " number, none, or auto (with and without sigma0 = 1, whichever measures better)",
        parse=parse_precondition,
        metavar="SIGMA0",
    )
    family: str = _opt("bns", _FAMILY_HELP)
    span: list[float | None] | None = _opt(None, _SPAN_HELP, parse=parse_span, metavar="T0:T1")
    end: str = _opt(
        "auto",
        "where the solver ends: range (at t_max), data (a last step to sigma = 0, as diffusers'"
        " final_sigmas_type='zero'; for models that stop short of the data, such as discrete"
        " DDPM ones), or auto (data where the model stops short of it, else range)",
    )
    loss: str = _opt(
        "log-mse",
        "per-sample loss: log-mse (the paper's: mean log of each sample's MSE, i.e. mean"
        " PSNR), mse or l1",
    )
    starts: int = _opt(
        1,
        "initial solvers to distill from, each to its end, keeping the one that validates best:"
        " the best classical solver, then in turn the best remaining preconditioned and plain"
        " ones (each start costs its own optimizer steps)",
    )
    train_pairs: int = _opt(128, "ground-truth pairs to train on")
    val_pairs: int = _opt(128, "ground-truth pairs to validate on (the best step is kept)")
    init_pairs: int = _opt(
        64,
        "validation pairs that rank the candidates of --init best (all on 16 of them, the best"
        " 8 on all)",
    )
    adam_steps: int | None = _opt(
        None,
        f"Adam steps (at most). auto: {AUTO_ADAM_STEPS} when Adam runs alone (gn_steps given"
        " as 0, or a network without forward mode), 0 when Gauss-Newton steps run."
        " --steps is its older name",
        shown_default="auto",
        aliases=("--steps",),
    )
    batch_size: int = _opt(40, "pairs per optimization step")
    micro_batch: int = _opt(
        0, "pairs per forward/backward pass (gradients accumulated; 0 = the whole batch)"
    )
    lr: float = _opt(1e-2, "learning rate (Adam)")
    lr_final: float = _opt(0.1, "cosine decay to lr x lr_final")
    warmup: int = _opt(25, "linear warm-up steps")
    revert_db: float = _opt(
        1.0, "a validation this many dB below the best returns to the best, lr halved"
    )
    coef_lr_scale: float = _opt(
        8.0, "learning rate of the coefficients a, b relative to lr, times the mean step"
    )
    gn_steps: int | None = _opt(None, _GN_HELP, shown_default="auto")
    gn_batch_size: int | None = _opt(
        None,
        "pairs per Gauss-Newton step. auto: 256 / nfe within [16, 64] (a step's JVPs grow as"
        " nfe^3 / 6 per pair: this keeps its cost growing as nfe^2, like the parameters)",
        shown_default="auto",
    )
    gn_max_stack: int = _opt(
        1024,
        "samples in one forward-mode network call of a Gauss-Newton step (tangent columns x"
        " pairs, stacked); lower it when a step runs out of memory on a large network",
    )
    gn_patience: int = _opt(
        3,
        "stop the Gauss-Newton steps after this many in a row that raise the best validation"
        " PSNR by less than gn_min_gain dB (a step Levenberg-Marquardt rejects counts as one,"
        " and is not validated); 0 = run them all",
    )
    gn_min_gain: float = _opt(0.1, "validated gain (dB) that counts as progress (gn_patience)")
    val_every: int = _opt(25, "steps between validations")
    patience: int = _opt(20, "validation rounds without improvement before stopping")
    max_skips: int = _opt(20, "non-finite steps tolerated before stopping")
    seed: int = _opt(0, "seed of the pairs and the optimization")
    grad_checkpoint: bool = _opt(
        False, "recompute each step in the backward pass (memory of about one step)"
    )
    rtol: float | None = _opt(
        None,
        "ground-truth relative tolerance; none: 1e-5, or what a half-precision network can"
        " resolve (bns.default_tolerance)",
    )
    atol: float | None = _opt(None, "ground-truth absolute tolerance", shown_default="as rtol")
    budget: str | None = _opt(None, _BUDGET_HELP, parse=_parse_budget, metavar="N|DURATION")
    gt_batch_size: int = _opt(128, "pairs per ground-truth solve")
    eval_batch_size: int = _opt(256, "pairs per validation batch")
    data_range: float = _opt(2.0, "data range R of the PSNR, 10 log10(R^2 / MSE)")

    def replace(self, **overrides: Any) -> DistillConfig:
        """A copy with ``overrides``; unknown names raise TrainingError (an older name of a
        setting, :data:`RENAMED`, is taken with a FutureWarning)."""
        overrides = current_names(overrides)
        known = {f.name for f in fields(self)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise TrainingError(f"unknown distillation setting(s): {', '.join(unknown)}")
        return replace(self, **overrides)

    @property
    def steps(self) -> int | None:
        """The older name of :attr:`adam_steps` (FutureWarning)."""
        _warn_renamed("steps")
        return self.adam_steps

    def check(self) -> None:
        """Raise TrainingError on settings no run can use."""
        _check(self)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def current_names(settings: dict[str, Any], warn: bool = True) -> dict[str, Any]:
    """``settings`` with every older name (:data:`RENAMED`) replaced by its name: a
    FutureWarning for each if ``warn``; TrainingError where both are given."""
    out = dict(settings)
    for old, new in RENAMED.items():
        if old in out:
            if new in out:
                raise TrainingError(f"{old} is the older name of {new}: give {new} alone")
            if warn:
                _warn_renamed(old)
            out[new] = out.pop(old)
    return out


def _warn_renamed(old: str) -> None:
    warnings.warn(
        f"bns: the setting {old} is now {RENAMED[old]} (the older name will go)",
        FutureWarning,
        stacklevel=4,
    )


def _check(cfg: DistillConfig) -> None:
    """Raise TrainingError on settings no run can use."""
    positive = ("nfe", "starts", "train_pairs", "val_pairs", "init_pairs", "batch_size")
    positive += ("val_every",)
    positive += ("gn_max_stack",)
    if cfg.gn_batch_size is not None:
        positive += ("gn_batch_size",)
    for name in positive:
        v = getattr(cfg, name)
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise TrainingError(f"{name} must be a positive integer, got {v!r}")
    for name in (
        "adam_steps",
        "gn_steps",
        "micro_batch",
        "warmup",
        "patience",
        "max_skips",
        "gn_patience",
    ):
        v = getattr(cfg, name)
        if v is None and name in ("adam_steps", "gn_steps"):
            continue  # auto: see resolve_steps
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise TrainingError(f"{name} must be a non-negative integer, got {v!r}")
    for name in ("lr", "data_range", "gt_batch_size", "eval_batch_size"):
        if not getattr(cfg, name) > 0:
            raise TrainingError(f"{name} must be positive, got {getattr(cfg, name)!r}")
    for name in ("rtol", "atol"):
        v = getattr(cfg, name)
        if v is not None and not (math.isfinite(v) and v > 0):
            raise TrainingError(f"{name} must be a finite number > 0, got {v!r}")
    # imported here: the config module stays free of the trainer
    from .families import FAMILIES
    from .loss import LOSSES, SUM_OF_SQUARES
    from .solvers.ends import ENDS

    if cfg.family not in FAMILIES:
        known = ", ".join(FAMILIES)
        raise TrainingError(f"unknown solver family {cfg.family!r}; known: {known}")
    if cfg.loss not in LOSSES:
        raise TrainingError(f"loss must be {_one_of(LOSSES)}, got {cfg.loss!r}")
    if cfg.gn_steps and cfg.loss not in SUM_OF_SQUARES:
        raise TrainingError(
            f"Gauss-Newton steps need a sum-of-squares loss (log-mse or mse), not {cfg.loss}"
        )
    if cfg.end not in ENDS:
        raise TrainingError(f"end must be {_one_of(ENDS)}, got {cfg.end!r}")
    if not (math.isfinite(cfg.gn_min_gain) and cfg.gn_min_gain >= 0):
        raise TrainingError(f"gn_min_gain must be a finite number >= 0, got {cfg.gn_min_gain!r}")
    if not math.isfinite(cfg.guidance):
        raise TrainingError(f"guidance must be finite, got {cfg.guidance}")
    try:
        cfg.precondition = parse_precondition(cfg.precondition)
        cfg.budget = _parse_budget(cfg.budget)
        cfg.span = parse_span(cfg.span)
    except ValueError as e:
        raise TrainingError(str(e)) from None


def resolve_steps(cfg: DistillConfig, forward_mode: Callable[[], bool]) -> DistillConfig:
    """``adam_steps`` and ``gn_steps`` as numbers. Neither given: Gauss-Newton steps alone
    (``AUTO_GN_STEPS``) if ``forward_mode()`` says the network supports forward-mode
    differentiation, else Adam alone (``AUTO_ADAM_STEPS``). ``adam_steps`` alone: Adam alone.
    ``gn_steps`` alone: Gauss-Newton alone, or Adam alone with its default for 0. A loss
    that is not a sum of squares means Adam. ``gn_batch_size`` None: :func:`auto_gn_batch_size`."""
    if cfg.gn_batch_size is None:
        cfg = replace(cfg, gn_batch_size=auto_gn_batch_size(cfg.nfe))
    if cfg.adam_steps is not None:
        return replace(cfg, gn_steps=cfg.gn_steps or 0)
    if cfg.gn_steps is not None:  # --gn-steps 0 alone: Adam alone, with its default
        return replace(cfg, adam_steps=0 if cfg.gn_steps else AUTO_ADAM_STEPS)
    from .loss import SUM_OF_SQUARES  # imported here: the config stays free of the trainer

    if cfg.loss in SUM_OF_SQUARES and forward_mode():
        return replace(cfg, adam_steps=0, gn_steps=AUTO_GN_STEPS)
    return replace(cfg, adam_steps=AUTO_ADAM_STEPS, gn_steps=0)


def add_config_arguments(parser: argparse.ArgumentParser, skip: tuple[str, ...] = ()) -> None:
    """Add one ``--option`` per field of :class:`DistillConfig`, with its default in the help.

    An option left out is absent from the parsed namespace (``argparse.SUPPRESS``), so the
    command can tell what was given (even ``--precondition none``) from what was not; the
    shown default is the config's.
    """
    for f in fields(DistillConfig):
        if f.name in skip:
            continue
        flags = ["--" + f.name.replace("_", "-"), *f.metadata.get("aliases", ())]
        default = None if f.default is MISSING else f.default
        help_text = f.metadata["help"]
        if f.default is not MISSING:
            shown = f.metadata.get("shown_default", "none" if default is None else default)
            help_text += f" (default: {shown})"
        if isinstance(default, bool):
            parser.add_argument(
                *flags, action="store_true", default=argparse.SUPPRESS, help=help_text
            )
            continue
        parse = f.metadata.get("parse") or _type_of(f)
        parser.add_argument(
            *flags,
            action=_OlderFlagWarns if len(flags) > 1 else "store",
            type=_argparse_type(parse),
            default=argparse.SUPPRESS,
            required=f.default is MISSING,
            metavar=f.metadata.get("metavar"),
            help=help_text,
        )


class _OlderFlagWarns(argparse.Action):
    """Stores the value; given by an older flag (a field's ``aliases``), it also says so on
    stderr, once per job (rank 0 under torchrun), as argparse's own warnings read."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:  # noqa: ANN001
        new = self.option_strings[0]
        if option_string != new and os.environ.get("RANK", "0") == "0":
            print(f"{parser.prog}: warning: {option_string} is now {new} (the older flag will go)",
                  file=sys.stderr)  # fmt: skip
        setattr(namespace, self.dest, values)


def _type_of(f: Any) -> Any:
    text = str(f.type)
    for name, kind in (("int", int), ("float", float), ("str", str)):
        if text.startswith(name):
            return kind
    raise TypeError(f"no command-line type for DistillConfig.{f.name} ({text})")


def _argparse_type(parse: Any) -> Any:
    def convert(text: str) -> Any:
        try:
            return parse(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    convert.__name__ = getattr(parse, "__name__", "value")
    return convert


def config_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """The config fields given on the command line (those left out keep their defaults)."""
    return {f.name: getattr(args, f.name) for f in fields(DistillConfig) if hasattr(args, f.name)}
