"""Atomic file writes: readers see the old file or the new one, never half of one."""

from __future__ import annotations

import errno
import hashlib
import os
import socket
import uuid
from collections.abc import Callable
from pathlib import Path

from .errors import BNSError, StorageError

__all__ = ["atomic_write", "atomic_write_text", "check_writable", "make_folder", "remove_stale_tmp"]

# A temporary file is named ``.{name}.{pid}-{host}.{uuid}.tmp``, host a short hash of the
# host name. One of a writer on this host that is gone (killed with SIGKILL: no cleanup ran)
# is removed at once. Without the host (files of older versions), a PID may be another host's
# (a shared folder): such a file is removed once its PID is not alive here and it is
# STALE_DEAD_S old. Any temporary file is removed once it is STALE_ANY_S old (nobody writes
# one file for an hour).
STALE_DEAD_S = 60.0
STALE_ANY_S = 3600.0
HOST = hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp)`` on a temporary file next to ``path``, then rename it onto ``path``.

    A failure (or a crash) leaves the old file as it was and no temporary file behind. The new
    file gets the usual permissions (umask), and the rename is made durable where the
    platform allows (the folder is fsynced). A place that cannot take the file (read-only,
    full, not permitted) raises :class:`~bns.errors.StorageError` naming the file and why.
    """
    path = Path(path)
    tmp = path.parent / f".{path.name}.{os.getpid()}-{HOST}.{uuid.uuid4().hex}.tmp"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write(tmp)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException as e:
        if os.path.exists(tmp):
            try:
                os.unlink(tmp)
            except OSError:
                pass  # a place that took no file may refuse removing it too: nothing to keep
        why = _storage_failure(e, path.parent)
        if why is not None:
            raise StorageError(f"cannot write {path}: {why}", reason=why) from None
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


# What the place is to blame for (a missing folder is not: another job may have just removed
# an emptied one, and the caller retries).
_PLACE_ERRNOS = {
    getattr(errno, name)
    for name in ("EROFS", "ENOSPC", "EDQUOT", "EACCES", "EPERM", "EFBIG", "EIO", "ENOTDIR")
    if hasattr(errno, name)
}


def _storage_failure(e: BaseException, folder: Path) -> str | None:
    """Why a write into ``folder`` failed, if the place is to blame (None otherwise). Writers
    outside Python (torch.save, safetensors) report a full disk in words of their own, so the
    place itself is asked too."""
    if isinstance(e, BNSError) or not isinstance(e, Exception):
        return None
    if isinstance(e, OSError) and e.errno in _PLACE_ERRNOS:
        return os.strerror(e.errno).lower()
    probe = folder
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        st = os.statvfs(probe)
    except (OSError, AttributeError):  # no statvfs (Windows): the writer's own words
        return None
    if st.f_flag & getattr(os, "ST_RDONLY", 1):
        return "read-only file system"
    free = st.f_bavail * st.f_frsize
    if free < 1 << 20:
        return f"no space left on device ({free // 1024} KiB free)"
    return None


def make_folder(folder: Path) -> None:
    """``folder`` and its parents, created if missing; :class:`~bns.errors.StorageError` if
    the place cannot take them."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        why = _storage_failure(e, folder)
        if why is None:
            raise
        raise StorageError(f"cannot create {folder}: {why}", reason=why) from None


def check_writable(folder: str | os.PathLike) -> None:
    """Raise :class:`~bns.errors.StorageError` now if ``folder`` cannot take a file (created
    if missing), rather than after the work whose result it is meant to hold."""
    folder = Path(folder)
    probe = folder / ".bns-write-check"
    try:
        atomic_write(probe, lambda tmp: tmp.write_bytes(b"x" * 4096))
    except StorageError as e:
        raise StorageError(f"cannot write to {folder}: {e.reason}", reason=e.reason) from None
    probe.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # exists (another user's), or cannot tell: keep its file
    return True


def _stale(tmp: Path, now: float) -> bool:
    """Whether ``tmp`` is a temporary file of :func:`atomic_write` whose writer is gone."""
    parts = tmp.name.split(".")  # "", name..., "pid-host" (or "pid"), uuid, "tmp"
    if len(parts) < 5 or len(parts[-2]) != 32:
        return False  # not one of ours
    pid, _, host = parts[-3].partition("-")
    try:
        pid_n, age = int(pid), now - tmp.stat().st_mtime
        int(parts[-2], 16)
    except (ValueError, OSError):
        return False  # not one of ours, or gone already
    if age > STALE_ANY_S:
        return True
    if host == HOST:
        return not _alive(pid_n)
    return not host and age > STALE_DEAD_S and not _alive(pid_n)


def remove_stale_tmp(folder: str | os.PathLike) -> int:
    """Remove the temporary files that :func:`atomic_write` left in ``folder`` when its process
    was killed: at once for a process of this host that no longer exists, after an hour for
    any other. Returns how many were removed; a folder that does not exist has none."""
    import time

    now, removed = time.time(), 0
    try:
        found = list(Path(folder).glob(".*.tmp"))
    except OSError:
        return 0
    for tmp in found:
        if _stale(tmp, now):
            try:
                tmp.unlink()
                removed += 1
            except OSError:
                pass  # another job removed it first, or the folder is read-only
    return removed


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` atomically (see :func:`atomic_write`)."""
    return atomic_write(path, lambda tmp: tmp.write_text(text))
