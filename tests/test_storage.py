"""Full disks and read-only places: one line, and no partial or corrupt file left behind.

The places are real: a private mount namespace (``unshare -m``) holds a read-only bind mount
and a small tmpfs that fills up, so the failures are the kernel's own (EROFS, ENOSPC), met by
torch.save, safetensors and Python alike. Where namespaces are not permitted, those tests skip;
the unit tests below them still run.
"""

from __future__ import annotations

import errno
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import bns
from bns._io import atomic_write, atomic_write_text, check_writable
from bns.cli import main
from bns.errors import BNSError, StorageError

SRC = Path(bns.__file__).parents[1]


def _benchmark():
    """benchmarks/storage.py: its user's network and its driver (the sweep's runner)."""
    spec = importlib.util.spec_from_file_location("storage_bench", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


BENCH = SRC.parent / "benchmarks" / "storage.py"
_BENCH = _benchmark()
USER_FILE, DRIVER = _BENCH.USER_FILE, _BENCH.DRIVER


def _namespaces() -> bool:
    if not shutil.which("unshare") or sys.platform != "linux":
        return False
    done = subprocess.run(["unshare", "-m", "true"], capture_output=True)
    return done.returncode == 0


needs_mounts = pytest.mark.skipif(
    not _namespaces(), reason="needs `unshare -m` (a private mount namespace) on Linux"
)


def _distill(model: str, cache: Path, out: Path) -> list[str]:
    args = ["distill", "--model", model, "--nfe", "4", "--train-pairs", "16", "--val-pairs", "8"]
    args += ["--init-pairs", "8", "--init", "euler", "--adam-steps", "4", "--val-every", "2"]
    args += ["--gn-steps", "0", "--batch-size", "8", "--quiet", "--device", "cpu"]
    return [*args, "--cache-dir", str(cache), "--out", str(out)]


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file())


@needs_mounts
def test_full_and_read_only_places_end_with_one_line_and_leave_nothing_partial(tmp_path):
    (tmp_path / "user.py").write_text(textwrap.dedent(USER_FILE))
    (tmp_path / "driver.py").write_text(DRIVER)
    model = f"{tmp_path / 'user.py'}:net"
    ro, full, full_out, filled, ok = (tmp_path / n for n in ("ro", "full", "fo", "filled", "ok"))
    for d in (ro, full, full_out, filled, ok):
        d.mkdir()
    (ro / "out").mkdir()
    (ro / "cache").mkdir()
    # the full cache of a run, then mounted read-only: it is read, not written
    assert main(_distill(model, ro / "filled-cache", ok / "ref.json")) == 0
    shutil.copytree(ro / "filled-cache", filled / "cache")
    scenarios = {
        "read-only cache": _distill(model, ro / "cache", ok / "a.json"),
        "read-only full cache": _distill(model, filled / "cache", ok / "b.json"),
        "read-only output": _distill(model, ok / "cache-c", ro / "out" / "c.json"),
        "cache fills up": _distill(model, full / "cache", ok / "d.json"),
        "output fills up": _distill(model, ok / "cache-e", full_out / "e.json"),
        "output full": _distill(model, ok / "cache-f", full / "f.json"),
        "eval, read-only output": ["eval", "--model", model, "--solver", str(ok / "ref.json"),
                                   "--nfe", "4", "--json", str(ro / "out" / "e.json")],
        "sample, read-only output": ["sample", "--model", model, "--solver",
                                     str(ok / "ref.json"), "--out", str(ro / "out" / "s.png")],
    }  # fmt: skip
    mounts = [
        f"mount --bind {ro} {ro}",
        f"mount -o remount,ro,bind {ro}",
        f"mount --bind {filled} {filled}",
        f"mount -o remount,ro,bind {filled}",
        f"mount -t tmpfs -o size=8k tmpfs {full}",  # the train cache's shard fits, little else
        f"mount -t tmpfs -o size=12k tmpfs {full_out}",  # the check fits, a checkpoint not
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(SRC))
    script = " && ".join([*mounts, 'exec "$0" "$@"'])
    result = tmp_path / "result.json"
    cmd = ["unshare", "-m", "sh", "-c", script, sys.executable, str(tmp_path / "driver.py")]
    done = subprocess.run(
        [*cmd, json.dumps(scenarios), str(tmp_path), str(result)],
        env=env,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    res = json.loads(result.read_text())
    ref = json.loads((ok / "ref.json").read_text())

    files = res["files"]

    def same_solver(path: Path) -> None:
        got = json.loads(files[str(path)])
        assert all(got[k] == ref[k] for k in ("times", "a", "b")), path

    def said(name: str) -> list[str]:
        return [ln for ln in res["runs"][name]["err"].splitlines() if ln.strip()]

    # A read-only cache: the run goes on uncached, said once; a filled one is read as it is.
    assert res["runs"]["read-only cache"]["rc"] == 0
    (line,) = said("read-only cache")
    assert "read-only file system; the ground truth is used without being cached" in line
    assert _files(ro / "cache") == []
    same_solver(ok / "a.json")
    assert res["runs"]["read-only full cache"]["rc"] == 0 and said("read-only full cache") == []
    same_solver(ok / "b.json")
    # A read-only output folder: refused before any work (no ground truth solved).
    assert res["runs"]["read-only output"]["rc"] == 2
    assert said("read-only output") == [
        f"bns distill: error: cannot write to {ro / 'out'}: read-only file system"
    ]
    assert not (ok / "cache-c").exists() and _files(ro / "out") == []
    for cmd in ("eval", "sample"):  # refused before any work too
        assert res["runs"][f"{cmd}, read-only output"]["rc"] == 2
        assert said(f"{cmd}, read-only output") == [
            f"bns {cmd}: error: cannot write to {ro / 'out'}: read-only file system"
        ]
    # A cache that fills up: whatever it holds verifies, nothing half-written stays.
    assert res["runs"]["cache fills up"]["rc"] == 0
    (line,) = said("cache fills up")
    assert "no space left on device" in line and "without being cached" in line, line
    same_solver(ok / "d.json")
    # An output folder that fills up: no checkpoint (said once), the solver written.
    assert res["runs"]["output fills up"]["rc"] == 0
    (line,) = said("output fills up")
    assert "e.json.ckpt: no space left on device" in line and "without checkpoints" in line
    same_solver(full_out / "e.json")
    assert [f for f in files if f.startswith(str(full_out))] == [str(full_out / "e.json")]
    # An output folder already full: refused before any work.
    assert res["runs"]["output full"]["rc"] == 2
    (line,) = said("output full")
    assert line == f"bns distill: error: cannot write to {full}: no space left on device"
    assert [f for f in files if f.startswith(str(full))] == [
        *[f for f in files if f.startswith(str(full / "cache"))]
    ]  # nothing but the cache's whole files
    # No temporary file anywhere; every cache file (in the mounts too) is whole.
    assert [f for f in files if f.endswith(".tmp")] == [] and res["corrupt"] == []
    assert any(f.endswith(".safetensors") for f in files if f.startswith(str(full)))


# -- the writer itself -------------------------------------------------------------------------
def test_a_failed_write_keeps_the_old_file_and_names_the_place(tmp_path):
    path = tmp_path / "s.json"
    atomic_write_text(path, "old")

    def full(tmp: Path) -> None:
        tmp.write_text("half")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(StorageError) as info:
        atomic_write(path, full)
    assert str(info.value) == f"cannot write {path}: no space left on device"
    assert isinstance(info.value, BNSError) and isinstance(info.value, OSError)
    assert path.read_text() == "old" and _files(tmp_path) == [path]


def test_a_writer_that_fails_in_its_own_words_is_explained_by_the_place(tmp_path, monkeypatch):
    """torch.save reports a full disk as a RuntimeError of its own; the place is asked."""
    import bns._io as io

    path = tmp_path / "x.ckpt"

    def foreign(tmp: Path) -> None:
        tmp.write_bytes(b"12")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 128 vs 0")

    class Full:  # what os.statvfs says of a full file system
        f_flag, f_bavail, f_frsize = 0, 0, 4096

    monkeypatch.setattr(io.os, "statvfs", lambda p: Full)
    with pytest.raises(StorageError, match=r"x.ckpt: no space left on device \(0 KiB free\)$"):
        atomic_write(path, foreign)
    Full.f_bavail = 1 << 20  # plenty of room: not the place's fault, the error as it was
    with pytest.raises(RuntimeError, match="enforce fail"):
        atomic_write(path, foreign)
    assert _files(tmp_path) == []


def test_a_missing_folder_is_created_and_a_file_in_the_way_is_refused(tmp_path):
    check_writable(tmp_path / "new" / "folder")
    assert (tmp_path / "new" / "folder").is_dir() and _files(tmp_path) == []
    (tmp_path / "file").write_text("x")
    with pytest.raises(StorageError, match="cannot write to .*file/sub: not a directory"):
        check_writable(tmp_path / "file" / "sub")


def test_a_solver_that_does_not_fit_takes_the_checkpoints_room(tmp_path, monkeypatch):
    """The disk fills while the run checkpoints: the solver file, which does not fit at the
    end, is written in the room of the run's own checkpoint (found by the sweep in
    benchmarks/storage.py at 20 KiB)."""
    from bns.solver import NSSolver

    (tmp_path / "user.py").write_text(textwrap.dedent(USER_FILE))
    out = tmp_path / "out" / "s.json"
    real, calls = NSSolver.save, []

    def full_once(self, path):
        calls.append(out.with_name("s.json.ckpt").exists())
        if len(calls) == 1:
            raise StorageError(f"cannot write {path}: no space left on device")
        return real(self, path)

    monkeypatch.setattr(NSSolver, "save", full_once)
    assert main(_distill(f"{tmp_path / 'user.py'}:net", tmp_path / "c", out)) == 0
    assert calls == [True, False]  # the checkpoint was there, then made room
    assert NSSolver.load(out).nfe == 4 and _files(out.parent) == [out]
