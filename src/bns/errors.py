"""Errors shared by the trainer and the modules it uses (distributed runs, evaluation), so
that none of those imports the trainer's settings to raise one."""

from __future__ import annotations

__all__ = ["TrainingError"]


class TrainingError(RuntimeError):
    """Distillation could not run (bad settings, a checkpoint that does not fit, ...)."""
