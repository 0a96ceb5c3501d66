"""Checkpoints of a distillation run: written atomically, refused when they belong to another
model or other settings, never unpickled (``torch.load(weights_only=True)``)."""

from __future__ import annotations

import os
import warnings
import zipfile
from pathlib import Path
from typing import Any

import torch

from ._io import atomic_write
from .config import TrainingError
from .errors import InputError, StorageError

__all__ = ["Checkpoint"]


class Checkpoint:
    """The checkpoint file at ``path`` of the run identified by ``fingerprint`` (a string)."""

    def __init__(self, path: str | os.PathLike, fingerprint: str) -> None:
        self.path = Path(path)
        self.fingerprint = fingerprint
        self.failed = False  # a write failed: no more are tried

    def save(self, state: dict[str, Any]) -> None:
        """Write ``state`` (tensors, dicts of tensors, strings and numbers). A place that cannot
        take it (full, read-only) is warned of once; the run goes on without checkpoints."""
        if self.failed:
            return
        body = {"fingerprint": self.fingerprint, **state}
        try:
            atomic_write(self.path, lambda tmp: torch.save(body, tmp))
        except StorageError as e:
            self.failed = True
            warnings.warn(f"bns: {e}; the run goes on without checkpoints", stacklevel=2)

    def load(self) -> dict[str, Any] | None:
        """The saved state, or None if there is no file; TrainingError if it is unreadable or
        belongs to another run."""
        if not self.path.exists():
            return None
        try:
            # torch.save writes a zip with the CRC-32 of every member, which torch.load does not
            # check: a flipped bit in a tensor would load as another value.
            with zipfile.ZipFile(self.path) as z:
                bad = z.testzip()
            if bad is not None:
                raise InputError(f"{bad} fails its CRC-32 check (corrupt)")
            state = torch.load(self.path, weights_only=True, map_location="cpu")
            fingerprint = state.pop("fingerprint")
        except Exception as e:  # noqa: BLE001 - any unreadable checkpoint is an error here
            raise TrainingError(f"cannot read checkpoint {self.path}: {_first_line(e)}") from None
        if fingerprint != self.fingerprint:
            raise TrainingError(
                f"checkpoint {self.path} belongs to another model or other settings; remove it"
                " or run without --resume"
            )
        return state

    def remove(self) -> None:
        if self.path.exists():
            self.path.unlink()


def _first_line(e: Exception) -> str:
    """One line for an error message: torch's weights-only refusal runs over a dozen lines
    (and advises ``weights_only=False``); its ``WeightsUnpickler error`` line says what is wrong."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    for i, line in enumerate(lines):
        if line.startswith("WeightsUnpickler error:"):
            why = line.removeprefix("WeightsUnpickler error:").strip()
            why = why or (lines[i + 1] if i + 1 < len(lines) else "")
            return f"not a plain tensor checkpoint (weights-only unpickling: {why})"
    return lines[0] if lines else type(e).__name__
