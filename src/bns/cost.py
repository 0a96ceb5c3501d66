"""What a run spends, phase by phase: network forwards, forward-mode evaluations, seconds.

One :class:`Ledger` per run. Each phase of a distillation (ground truth per split, ranking
the initial candidates, the optimizer steps, validation, evaluation) is entered as
``with ledger.phase("validation", model): ...``, which adds the model's network forwards,
its forward-mode (JVP) evaluations and the wall seconds spent inside. A forward counts one
network call per sample (a guided evaluation is 2); a JVP counts one forward-mode call per
sample (its primal comes with it, so it is not also a forward). The solver file keeps the
ledger as ``meta["cost"]``; ``bns distill --estimate`` fills the same ledger from a few timed
calls before anything is solved (:mod:`bns.estimate`).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any

from .model import in_phase

__all__ = ["Phase", "Ledger", "PHASES", "uncounted"]

# The phases of a distillation run, in the order they happen.
PHASES = (
    "ground_truth_train",
    "ground_truth_val",
    "ranking",
    "optimizer",
    "validation",
    "evaluation",
)

# How an error of the network names the phase it failed in ("... during an optimizer step").
_LABELS = {
    "ground_truth_train": "ground truth (train)",
    "ground_truth_val": "ground truth (val)",
    "ranking": "ranking of the initial solvers",
    "optimizer": "an optimizer step",
}


@dataclass
class Phase:
    """What one phase spent: network forwards and JVPs (per sample), and wall seconds."""

    forwards: int = 0
    jvps: int = 0
    seconds: float = 0.0

    def add(self, other: Phase) -> None:
        self.forwards += other.forwards
        self.jvps += other.jvps
        self.seconds += other.seconds


def _counts(model: Any) -> tuple[int, int]:
    return int(getattr(model, "forwards", 0)), int(getattr(model, "jvps", 0))


@contextlib.contextmanager
def uncounted(model: Any) -> Iterator[None]:
    """Calls of ``model`` inside the block are not the run's work (a check, a probe, the
    estimate's timing calls): its forward and JVP counters are restored after it."""
    forwards, jvps = model.forwards, model.jvps
    try:
        yield
    finally:
        model.forwards, model.jvps = forwards, jvps


class Ledger:
    """The cost of a run by phase (an ordered mapping ``name -> Phase``)."""

    def __init__(self, phases: dict[str, Phase] | None = None) -> None:
        self.phases: dict[str, Phase] = dict(phases or {})

    def __getitem__(self, name: str) -> Phase:
        return self.phases.setdefault(name, Phase())

    @contextlib.contextmanager
    def phase(self, name: str, model: Any) -> Iterator[Phase]:
        """Add to phase ``name`` what ``model`` runs inside the block (this worker's share).
        A :class:`bns.model.NetworkError` raised inside names this phase."""
        f0, j0 = _counts(model)
        t0 = time.perf_counter()
        try:
            with in_phase(_LABELS.get(name, name.replace("_", " "))):
                yield self[name]
        finally:
            f1, j1 = _counts(model)
            self[name].add(Phase(f1 - f0, j1 - j0, time.perf_counter() - t0))

    @property
    def total(self) -> Phase:
        out = Phase()
        for p in self.phases.values():
            out.add(p)
        return out

    def to_dict(self) -> dict[str, dict[str, float]]:
        """``{phase: {"forwards", "jvps", "seconds"}}`` and ``"total"``: plain JSON numbers."""
        out = {k: _rounded(asdict(p)) for k, p in self.phases.items()}
        out["total"] = _rounded(asdict(self.total))
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Ledger:
        """The ledger of :meth:`to_dict` (``"total"`` is recomputed, not read)."""
        phases = {}
        for k, v in data.items():
            if k == "total":
                continue
            phases[k] = Phase(int(v["forwards"]), int(v["jvps"]), float(v["seconds"]))
        return cls(phases)

    def summed_over_workers(self) -> Ledger:
        """The ledger with every worker's forwards and JVPs added (seconds are this worker's:
        the workers run side by side). A collective under ``torchrun``; itself otherwise."""
        from .executor import current

        ex = current()
        if ex.size == 1:
            return self
        out = Ledger()
        for k, p in self.phases.items():
            out.phases[k] = Phase(
                int(ex.all_sum(float(p.forwards))), int(ex.all_sum(float(p.jvps)))
            )
            out.phases[k].seconds = p.seconds
        return out

    def table(self, title: str = "cost") -> str:
        """A plain-text table: one line per phase, then the total."""
        rows = [(k, p) for k, p in self.phases.items()] + [("total", self.total)]
        width = max(len(k) for k, _ in rows)
        lines = [
            f"{title}:",
            f"  {'phase':<{width}}  {'forwards':>11}  {'jvps':>11}  {'seconds':>9}",
        ]
        for k, p in rows:
            lines.append(f"  {k:<{width}}  {p.forwards:>11,}  {p.jvps:>11,}  {p.seconds:>9.1f}")
        return "\n".join(lines)


def _rounded(d: dict[str, Any]) -> dict[str, Any]:
    return {k: round(v, 3) if isinstance(v, float) else v for k, v in d.items()}
