"""Checkpoints of a distillation run: written atomically, refused when they belong to another
model or other settings, never unpickled (``torch.load(weights_only=True)``)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from ._io import atomic_write
from .config import TrainingError

__all__ = ["Checkpoint"]


class Checkpoint:
    """The checkpoint file at ``path`` of the run identified by ``fingerprint`` (a string)."""

    def __init__(self, path: str | os.PathLike, fingerprint: str) -> None:
        self.path = Path(path)
        self.fingerprint = fingerprint

    def save(self, state: dict[str, Any]) -> None:
        """Write ``state`` (tensors, dicts of tensors, strings and numbers)."""
        body = {"fingerprint": self.fingerprint, **state}
        atomic_write(self.path, lambda tmp: torch.save(body, tmp))

    def load(self) -> dict[str, Any] | None:
        """The saved state, or None if there is no file; TrainingError if it is unreadable or
        belongs to another run."""
        if not self.path.exists():
            return None
        try:
            state = torch.load(self.path, weights_only=True, map_location="cpu")
            fingerprint = state.pop("fingerprint")
        except Exception as e:  # noqa: BLE001 - any unreadable checkpoint is an error here
            raise TrainingError(f"cannot read checkpoint {self.path}: {e}") from None
        if fingerprint != self.fingerprint:
            raise TrainingError(
                f"checkpoint {self.path} belongs to another model or other settings; remove it"
                " or run without --resume"
            )
        return state

    def remove(self) -> None:
        if self.path.exists():
            self.path.unlink()
