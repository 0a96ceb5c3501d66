"""Atomic file writes: readers see the old file or the new one, never half of one."""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable
from pathlib import Path

__all__ = ["atomic_write", "atomic_write_text", "remove_stale_tmp"]

# A temporary file of a writer that is gone (killed with SIGKILL: no cleanup ran) is removed
# once it is this old; any temporary file once it is older than STALE_ANY_S (a writer on
# another host sharing the folder, whose PID means nothing here, writes for seconds).
STALE_DEAD_S = 60.0
STALE_ANY_S = 3600.0


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp)`` on a temporary file next to ``path``, then rename it onto ``path``.

    A failure (or a crash) leaves the old file as it was and no temporary file behind. The new
    file gets the usual permissions (umask), and the rename is made durable where the
    platform allows (the folder is fsynced).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{os.getpid()}.{uuid.uuid4().hex}.tmp"
    try:
        write(tmp)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    try:  # not possible everywhere (e.g. Windows)
        dfd = os.open(path.parent, os.O_RDONLY)
    except OSError:
        return path
    try:
        os.fsync(dfd)
    except OSError:
        pass
    finally:
        os.close(dfd)
    return path


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # exists (another user's), or cannot tell: keep its file
    return True


def remove_stale_tmp(folder: str | os.PathLike) -> int:
    """Remove the temporary files that :func:`atomic_write` left in ``folder`` when its process
    was killed: those of a process that no longer exists (older than a minute), and any older
    than an hour. Returns how many were removed; a folder that does not exist has none."""
    import time

    now, removed = time.time(), 0
    try:
        found = list(Path(folder).glob(".*.tmp"))
    except OSError:
        return 0
    for tmp in found:
        parts = tmp.name.split(".")  # "", name..., pid, uuid, "tmp"
        try:
            pid = int(parts[-3])
            age = now - tmp.stat().st_mtime
        except (ValueError, IndexError, OSError):
            continue  # not one of ours, or gone already
        if age > STALE_ANY_S or (age > STALE_DEAD_S and not _alive(pid)):
            try:
                tmp.unlink()
                removed += 1
            except OSError:
                pass  # another job removed it first, or the folder is read-only
    return removed


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` atomically (see :func:`atomic_write`)."""
    return atomic_write(path, lambda tmp: tmp.write_text(text))
