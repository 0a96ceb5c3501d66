"""The errors bns raises on purpose, under one base class, :class:`BNSError`: ``except
bns.BNSError`` catches every one of them, and the command line prints their message as it is
(one line, written for people), where a foreign error is named by its type.

The modules keep their own error classes (``SolverFileError`` in ``solver.py``, ...); every one
derives from :class:`BNSError` and, where a built-in type says what kind of failure it is,
from that too (``ValueError`` for bad input, ``OSError`` for storage)."""

from __future__ import annotations

__all__ = ["BNSError", "InputError", "StorageError", "TrainingError"]


class BNSError(Exception):
    """The base class of every error bns raises on purpose."""


class InputError(BNSError, ValueError):
    """A function was given a value it cannot take (an unknown name, a bad shape or range),
    where no more specific error of its module says so."""


class TrainingError(BNSError, RuntimeError):
    """Distillation could not run (bad settings, a checkpoint that does not fit, ...)."""


class StorageError(BNSError, OSError):
    """A file could not be written: a read-only place, a full disk, a missing permission. The
    file it was meant to replace is as it was, and no partial file is left. ``reason`` says
    why in a few words (``"read-only file system"``)."""

    def __init__(self, message: str, reason: str = "") -> None:
        super().__init__(message)
        self.reason = reason
