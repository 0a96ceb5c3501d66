"""Atomic writes and the temporary files that killed writers leave behind."""

from __future__ import annotations

import os
import subprocess
import sys
import time

from bns._io import HOST, STALE_ANY_S, STALE_DEAD_S, atomic_write_text, remove_stale_tmp


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def _tmp(folder, name: str, pid: int | str, age: float):
    path = folder / f".{name}.{pid}.{'0123abcd' * 4}.tmp"
    path.write_text("half a file")
    t = time.time() - age
    os.utime(path, (t, t))
    return path


def test_stale_temporary_files_are_removed_and_live_ones_kept(tmp_path):
    dead, me = _dead_pid(), os.getpid()
    # Names without the host (older versions): the PID may be another host's.
    gone = _tmp(tmp_path, "a.safetensors", dead, STALE_DEAD_S + 60)  # killed writer
    fresh_dead = _tmp(tmp_path, "b.safetensors", dead, 1)  # maybe another host's, just now
    writing = _tmp(tmp_path, "c.safetensors", me, STALE_DEAD_S + 60)  # a live writer
    ancient = _tmp(tmp_path, "d.safetensors", me, STALE_ANY_S + 60)  # nobody writes for an hour
    # Names with the host: a writer of this host that is gone is known to be gone at once.
    here_dead = _tmp(tmp_path, "f.ckpt", f"{dead}-{HOST}", 1)
    here_live = _tmp(tmp_path, "g.ckpt", f"{me}-{HOST}", STALE_DEAD_S + 60)
    elsewhere = _tmp(tmp_path, "h.ckpt", f"{dead}-ffffffff", STALE_DEAD_S + 60)
    other = tmp_path / ".notes.tmp"  # not atomic_write's
    other.write_text("x")
    not_ours = _tmp(tmp_path, "i.json", dead, STALE_DEAD_S + 60).rename(
        tmp_path / f".i.json.{dead}.xyz.tmp"
    )
    kept = tmp_path / "e.safetensors"
    atomic_write_text(kept, "whole")
    assert remove_stale_tmp(tmp_path) == 3
    assert not gone.exists() and not ancient.exists() and not here_dead.exists()
    assert fresh_dead.exists() and writing.exists() and other.exists() and not_ours.exists()
    assert here_live.exists() and elsewhere.exists()
    assert kept.read_text() == "whole"
    assert remove_stale_tmp(tmp_path / "missing") == 0


def test_ground_truth_removes_what_a_killed_writer_left(tmp_path):
    """A job that starts cleans its cache folder and its shard folder of stale temporary
    files (a writer killed with SIGKILL runs no cleanup), and keeps everything else."""
    from bns.models.gmm import gaussian_mixture_model
    from bns.pairs import make_pairs

    model = gaussian_mixture_model(dim=4, components=2)
    pairs = make_pairs(model, 4, "test", cache=tmp_path, progress=False)
    (cache_file,) = tmp_path.glob("pairs-*.safetensors")
    shards = tmp_path / "shards" / cache_file.stem
    shards.mkdir(parents=True)
    dead = _dead_pid()
    stale = [
        _tmp(tmp_path, cache_file.name, dead, STALE_DEAD_S + 60),
        _tmp(shards, "000000000-000000004.safetensors", dead, STALE_DEAD_S + 60),
    ]
    again = make_pairs(model, 4, "test", cache=tmp_path, progress=False)
    assert not any(p.exists() for p in stale)
    assert cache_file.exists() and bool((again.x1 == pairs.x1).all())
