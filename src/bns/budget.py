"""``--budget``: fit a distillation run to a number of network evaluations or to a duration.

A budget is a count of network evaluations (forwards and JVPs together: ``200000``, ``2e5``,
``200k``, ``1.5M``) or a duration (``90s``, ``10m``, ``1h``). Before anything is solved,
:func:`fit_budget` predicts the cost of each rung of :data:`LADDER` with the same estimator as
``--estimate`` (:mod:`bns.estimate`) and keeps the richest rung that fits, ground truth and
ranking included. During the run the loop stops the optimizer before a step that would cross
the budget, and returns the best solver validated so far.

The rungs go from a few pairs and steps to the previous default (520 / 1024 pairs, 12 steps
of 64 pairs). Their order, what to grow first as the budget grows, follows the measurements of
``benchmarks/time_to_solver.py``: Gauss-Newton steps first, then pairs.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from .errors import InputError, TrainingError

if TYPE_CHECKING:
    from .config import DistillConfig
    from .cost import Ledger, Phase
    from .estimate import Estimator
    from .solver import NSSolver

__all__ = ["Budget", "parse_budget", "fit_budget", "LADDER"]

_COUNT = {"": 1, "k": 1e3, "K": 1e3, "M": 1e6, "G": 1e9}  # "M": a million, "m": minutes
_TIME = {"s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600}


@dataclass(frozen=True)
class Budget:
    """``kind`` is ``"evaluations"`` (network forwards + JVPs) or ``"seconds"``."""

    kind: str
    value: float

    def spent(self, p: Phase) -> float:
        return p.forwards + p.jvps if self.kind == "evaluations" else p.seconds

    def __str__(self) -> str:
        if self.kind == "seconds":
            return f"{self.value:g} s"
        return f"{self.value:,.0f} network evaluations"


def parse_budget(text: str | float | int) -> Budget:
    """``"200k"``, ``"1.5M"``, ``"2e5"`` (evaluations) or ``"90s"``, ``"10m"``, ``"1h"``
    (a duration). ``M`` is a million, ``m`` (or ``min``) minutes."""
    raw = str(text).strip().replace("_", "").replace(",", "")
    m = re.fullmatch(r"([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([a-zA-Z]*)", raw)
    if m is None:
        raise InputError(
            f"budget must be a number of network evaluations (200000, 200k, 1.5M) or a duration"
            f" (90s, 10m, 1h), got {text!r}"
        )
    number, unit = float(m.group(1)), m.group(2)
    if unit in _TIME:
        kind, value = "seconds", number * _TIME[unit]
    elif unit in _COUNT:
        kind, value = "evaluations", number * _COUNT[unit]
    else:
        raise InputError(f"unknown budget unit {unit!r} in {text!r} (k, M, G; s, m, h)")
    if not (math.isfinite(value) and value > 0):
        raise InputError(f"budget must be positive, got {text!r}")
    return Budget(kind, value)


def check_budget_text(text: str | None) -> str | None:
    """The budget text as given, once it parses (the config keeps what the user wrote)."""
    if text is None or str(text).lower() == "none":
        return None
    parse_budget(text)
    return str(text)


# (train_pairs, val_pairs, init_pairs, gn_batch_size, gn_steps), cheapest first.
LADDER = (
    (32, 32, 16, 8, 3),
    (64, 32, 16, 16, 4),
    (64, 64, 32, 16, 6),
    (128, 64, 32, 16, 8),
    (128, 128, 64, 32, 8),
    (256, 128, 64, 32, 10),
    (256, 256, 64, 32, 12),
    (520, 512, 128, 64, 12),
    (520, 1024, 256, 64, 12),
)
ADAM_STEPS = {3: 200, 4: 300, 6: 400, 8: 600, 10: 800, 12: 1000}  # without forward mode


def _rung(cfg: DistillConfig, rung: tuple[int, ...]) -> DistillConfig:
    train, val, init, batch, steps = rung
    out = replace(cfg, train_pairs=train, val_pairs=val, init_pairs=init)
    if cfg.gn_steps:
        return replace(out, gn_batch_size=batch, gn_steps=steps, adam_steps=0)
    return replace(out, adam_steps=ADAM_STEPS[steps], batch_size=min(cfg.batch_size, train))


def fit_budget(
    cfg: DistillConfig,
    estimator: Estimator,
    end: str,
    candidates: list[NSSolver],
    pairs_given: bool = False,
) -> tuple[DistillConfig, Ledger]:
    """The richest rung of :data:`LADDER` whose predicted cost fits ``cfg.budget`` (its steps
    resolved), with that prediction. Raises TrainingError when even the first does not fit."""
    budget = parse_budget(cfg.budget)
    best = None
    for rung in LADDER:
        trial = _rung(cfg, rung)
        ledger = estimator.ledger(trial, end, candidates, pairs_given)
        if budget.spent(ledger.total) <= budget.value:
            best = trial, ledger
        else:
            break
    if best is None:
        ledger = estimator.ledger(_rung(cfg, LADDER[0]), end, candidates, pairs_given)
        need = budget.spent(ledger.total)
        unit = "s" if budget.kind == "seconds" else "network evaluations"
        raise TrainingError(
            f"the budget ({budget}) is below the smallest run at NFE {cfg.nfe}, about"
            f" {need:,.0f} {unit}: raise --budget"
        )
    return best
