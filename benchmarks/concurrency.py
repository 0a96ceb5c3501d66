"""Concurrent ``bns distill`` jobs on one ground-truth cache end as each would alone.

    python benchmarks/concurrency.py --rounds 5 --jobs 6

Two small networks written as users write them (a flow-matching one and an epsilon one on a
VP schedule) and job settings that overlap: the same job twice, one that needs more training
pairs than another (it extends the same cache file), one with another guidance-free NFE, one on
the other model. Each job first runs alone with a cache of its own: that is its reference (with
``--share-references``, jobs with the same settings share one: the test suite's run).
Then, in every round, all jobs start together on one fresh shared cache, each after a random
delay of up to a second, on one thread each. Every solver must equal its reference bit for bit
(times, a, b and the validation record), and every cache file must match its digest.

Writes ``benchmarks/results/concurrency.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from faults import SAME, SAME_META, verify_cache

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"

USER_FILE = r"""
import torch
from torch import nn

import bns


class Net(nn.Module):
    def __init__(self, seed, dim=8):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.l1, self.l2 = nn.Linear(dim + 1, 32), nn.Linear(32, dim)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(0.3 * torch.randn(p.shape, generator=g))

    def forward(self, x, t):
        return self.l2(torch.tanh(self.l1(torch.cat([x, t[:, None]], 1))))


def flow():
    return bns.Model(Net(0), "velocity", bns.schedules.CondOT(), (8,), name="flow")


def vp():
    return bns.Model(Net(1), "eps", bns.schedules.VP(), (8,), name="vp")
"""

COMMON = ["--init-pairs", "16", "--gt-batch-size", "8", "--batch-size", "8", "--adam-steps", "10"]
COMMON += ["--val-every", "5", "--gn-steps", "2", "--gn-batch-size", "8", "--quiet"]
# name: (factory, settings); several share cache files (model, split, seed and tolerance).
JOBS = {
    "flow-nfe4": ("flow", ["--nfe", "4", "--train-pairs", "32", "--val-pairs", "16"]),
    "flow-nfe4-again": ("flow", ["--nfe", "4", "--train-pairs", "32", "--val-pairs", "16"]),
    "flow-nfe4-more-pairs": ("flow", ["--nfe", "4", "--train-pairs", "48", "--val-pairs", "16"]),
    "flow-nfe6": ("flow", ["--nfe", "6", "--train-pairs", "40", "--val-pairs", "24"]),
    "vp-nfe4": ("vp", ["--nfe", "4", "--train-pairs", "32", "--val-pairs", "16"]),
    "vp-nfe5": ("vp", ["--nfe", "5", "--train-pairs", "48", "--val-pairs", "16"]),
}


def _command(folder: Path, name: str, out: Path) -> list[str]:
    factory, settings = JOBS[name]
    model = f"{folder / 'user.py'}:{factory}"
    return [sys.executable, "-m", "bns", "distill", "--model", model, *settings, *COMMON,
            "--out", str(out)]  # fmt: skip


def _env(cache: Path) -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT / "src"))
    env["BNS_CACHE_DIR"] = str(cache)
    return env


def _same(ref: dict, got: dict) -> list[str]:
    diff = [k for k in SAME if ref[k] != got[k]]
    return diff + [f"meta.{k}" for k in SAME_META if ref["meta"].get(k) != got["meta"].get(k)]


def run(
    folder: Path, names: list[str], rounds: int, rng: random.Random, share: bool = False
) -> dict:
    (folder / "user.py").write_text(USER_FILE)
    refs, alone_s, reused = {}, {}, {}
    for name in names:  # alone, each with a cache of its own
        same = next((n for n in refs if JOBS[n] == JOBS[name]), None) if share else None
        if same is not None:  # the same command alone again would make the same solver
            refs[name], alone_s[name], reused[name] = refs[same], alone_s[same], same
            continue
        t0 = time.time()
        out = folder / "ref" / f"{name}.json"
        done = subprocess.run(
            _command(folder, name, out), env=_env(folder / "ref" / f"cache-{name}"),
            capture_output=True, text=True,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr[-3000:]
        refs[name], alone_s[name] = json.loads(out.read_text()), time.time() - t0
    records = []
    for r in range(rounds):
        shared = folder / f"round{r}"
        procs, t0 = {}, time.time()
        delays = {name: rng.uniform(0.0, 1.0) for name in names}
        for name in sorted(names, key=delays.get):
            time.sleep(max(0.0, delays[name] - (time.time() - t0)))
            log = open(shared.parent / f"round{r}-{name}.log", "w")  # noqa: SIM115
            shared.mkdir(exist_ok=True)
            procs[name] = subprocess.Popen(
                _command(folder, name, shared / f"{name}.json"), env=_env(shared / "cache"),
                stdout=log, stderr=subprocess.STDOUT,
            )  # fmt: skip
        rcs = {name: p.wait(timeout=1800) for name, p in procs.items()}
        wall = time.time() - t0
        differs = {}
        for name in names:
            path = shared / f"{name}.json"
            differs[name] = (
                _same(refs[name], json.loads(path.read_text())) if path.exists() else ["none"]
            )
        cache = verify_cache(shared / "cache")
        tmp = sum(1 for _ in (shared / "cache").rglob(".*.tmp"))
        shards = sum(1 for _ in (shared / "cache").rglob("shards/*/*.safetensors"))
        rec = {
            "round": r,
            "jobs": len(names),
            "wall_s": round(wall, 1),
            "failed_jobs": sum(rc != 0 for rc in rcs.values()),
            "differing_solvers": sum(bool(d) for d in differs.values()),
            "differs": {k: v for k, v in differs.items() if v},
            "cache_files": cache["files"],
            "corrupt_cache_files": cache["corrupt"],
            "tmp_files_left": tmp,
            "shards_left": shards,
        }
        records.append(rec)
        print(json.dumps(rec), flush=True)
        if not rec["failed_jobs"] and not rec["differing_solvers"] and not cache["corrupt"]:
            shutil.rmtree(shared)
        else:  # keep the evidence out of the temporary folder
            keep = Path(tempfile.gettempdir()) / f"bns-concurrency-kept-{r}"
            shutil.copytree(folder, keep, dirs_exist_ok=True)
            rec["kept"] = str(keep)
    return {
        "alone_s": alone_s,
        **({"shared_references": reused} if share else {}),
        "rounds": records,
    }


def write(payload: dict) -> None:
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "concurrency.json").write_text(json.dumps(payload, indent=1) + "\n")
    rounds = payload["rounds"]
    total = lambda k: sum(r[k] for r in rounds)  # noqa: E731
    L = ["# Concurrent bns distill jobs on one ground-truth cache", ""]
    L += [f"Machine: {payload['machine']}. Command: `{payload['command']}`.", ""]
    L += [f"Jobs: {', '.join(payload['jobs'])}.", ""]
    L += ["| figure | value |", "|---|---:|"]
    L += [f"| rounds | {len(rounds)} |", f"| jobs run | {total('jobs')} |"]
    L += [f"| failed jobs | {total('failed_jobs')} |"]
    L += [f"| solvers differing from the job alone | {total('differing_solvers')} |"]
    L += [f"| cache files checked | {total('cache_files')} |"]
    L += [f"| corrupt cache files | {total('corrupt_cache_files')} |"]
    L += [f"| temporary files left | {total('tmp_files_left')} |"]
    L += [f"| shards left | {total('shards_left')} |"]
    alone = sum(payload["alone_s"].values())
    walls = [r["wall_s"] for r in rounds]
    L += ["", f"All jobs one after another, alone: {alone:.0f} s; together on 2 cores:"]
    L[-1] += f" {min(walls):.0f}-{max(walls):.0f} s a round."
    (RESULTS / "concurrency.md").write_text("\n".join(L) + "\n")


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--jobs", type=int, default=len(JOBS), help=f"the first N of {list(JOBS)}")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--share-references",
        action="store_true",
        help="jobs with the same settings share one run alone (its solver is theirs)",
    )
    p.add_argument("--out", type=Path, default=None, help="results folder (default: results/)")
    args = p.parse_args(argv)
    import torch

    global RESULTS
    RESULTS = args.out or RESULTS
    names = list(JOBS)[: args.jobs]
    with tempfile.TemporaryDirectory(prefix="bns-concurrency-") as tmp:
        result = run(Path(tmp), names, args.rounds, random.Random(args.seed), args.share_references)
    payload = {
        "machine": f"2-core x86_64 CPU VM, torch {torch.__version__}, one thread per job",
        "command": "python benchmarks/concurrency.py " + " ".join(argv or sys.argv[1:]),
        "jobs": names,
        **result,
    }
    write(payload)
    return payload


if __name__ == "__main__":
    main()
