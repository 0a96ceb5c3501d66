"""Fault injection: ``kill -9`` at random moments of ``bns distill``, then a rerun.

    python benchmarks/faults.py --kills 100                 # one process
    python benchmarks/faults.py --kills 100 --workers 2     # under torchrun, gloo on the CPU

Each trial starts ``bns distill`` on a small network written as a user writes one (a float32
``nn.Module`` in a file, ``--model user.py:net``) with a fresh ground-truth cache, and kills it
with SIGKILL:

- inside a network call (``--call-share``, 40%): the k-th call of the network, k uniform over
  the calls of an uninterrupted run, so that every phase is hit in proportion to the network
  calls it makes, whatever the load of the machine. The network writes its stack
  (:mod:`faulthandler`) and kills its own process;
- at a random moment (35%): uniform over an uninterrupted run's wall time from the end of
  start-up (Python, torch and bns imported) to the write of the solver file nine times in ten,
  during start-up one time in ten. Just before the kill, SIGUSR1 makes :mod:`faulthandler`
  write the process's stack;
- inside a file write (``--write-share``, 25%): the k-th atomic rename of the run (k uniform over the renames of an
  uninterrupted run), just before it (the complete temporary file is there, the target not yet)
  or just after it (before the folder is synced).

The stack names the phase that was hit (ground truth, ranking, Adam, Gauss-Newton, validation,
a file write, ...). Under ``torchrun`` one worker, chosen at random, is killed; the other must
end on its own with
one line naming the lost worker. Then the same command runs again, with ``--resume`` or plainly
(half each), and must end with the solver of the uninterrupted run, bit for bit (times, a, b
and the validation record).
Every ground-truth cache file is then checked against its digest.

Reported: kills, phases hit, successful reruns, differing solvers (must be 0), corrupt cache
files (must be 0), temporary files the killed writers left (removed by a later job once a minute
old) and, under torchrun, how the surviving worker ended. Writes
``benchmarks/results/faults_<tag>.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"

# A user's file: a float32 network, no dtype given, a factory. NET_SLEEP slows each call so
# that the phases last long enough to be hit (their share of the run is their share of calls).
# The benchmark's hooks: FAULT_CALLS counts the calls of the process into a file; FAULT_CALL=k
# writes the process's stack and kills it (SIGKILL) at its k-th call.
USER_FILE = r"""
import faulthandler
import os
import signal
import time

import torch
from torch import nn

import bns

CALLS = [0]


def _hooks():
    CALLS[0] += 1
    rank = os.environ.get("RANK", "0")
    if os.environ.get("FAULT_CALLS"):
        with open(f"{os.environ['FAULT_CALLS']}.{rank}", "w") as f:
            f.write(str(CALLS[0]))
    if os.environ.get("FAULT_CALL") and os.environ.get("FAULT_RANK", rank) == rank:
        if CALLS[0] == int(os.environ["FAULT_CALL"]):
            with open(os.path.join(os.environ["FAULT_DIR"], f"stacks.{rank}"), "w") as f:
                faulthandler.dump_traceback(f, all_threads=False)
            os.kill(os.getpid(), signal.SIGKILL)


class Net(nn.Module):
    def __init__(self, dim=8):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.l1, self.l2 = nn.Linear(dim + 1, 32), nn.Linear(32, dim)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(0.3 * torch.randn(p.shape, generator=g))

    def forward(self, x, t):
        _hooks()
        if os.environ.get("NET_SLEEP"):
            time.sleep(float(os.environ["NET_SLEEP"]))
        return self.l2(torch.tanh(self.l1(torch.cat([x, t[:, None]], 1))))


def net():
    return bns.Model(Net(), "velocity", bns.schedules.CondOT(), (8,), name="mlp")
"""

# Runs the bns command line after setting up what the benchmark needs in the process: its pid
# and, on SIGUSR1, its stack in the trial folder; optionally a log of its atomic renames, or a
# SIGKILL of itself at the k-th one.
LAUNCHER = r"""
import faulthandler, os, signal, sys
from pathlib import Path

rank = os.environ.get("RANK", "0")
folder = Path(os.environ["FAULT_DIR"])
stacks = open(folder / f"stacks.{rank}", "w")
faulthandler.register(signal.SIGUSR1, file=stacks, all_threads=True)
(folder / f"pid.{rank}").write_text(str(os.getpid()))
log, kill_at = os.environ.get("FAULT_LOG"), os.environ.get("FAULT_WRITE")
mine = os.environ.get("FAULT_RANK", rank) == rank
if log or (kill_at and mine):
    real, count = os.replace, [0]

    def replace(src, dst, *args, **kwargs):
        if not str(src).endswith(".tmp"):
            return real(src, dst, *args, **kwargs)
        count[0] += 1
        if log:
            with open(f"{log}.{rank}", "a") as f:
                f.write(f"{dst}\n")
        hit = kill_at and mine and count[0] == int(kill_at.split(":")[0])
        if hit and kill_at.endswith(":before"):
            os.kill(os.getpid(), signal.SIGKILL)
        out = real(src, dst, *args, **kwargs)
        if hit:
            os.kill(os.getpid(), signal.SIGKILL)
        return out

    os.replace = replace
sys.argv = ["bns", *sys.argv[1:]]
import bns.classical, bns.gauss_newton, bns.train  # noqa: E401 - what the run will import
from bns.cli import run

(folder / f"ready.{rank}").write_text("")  # start-up is over

run()
"""

DISTILL = ["distill", "--nfe", "4", "--train-pairs", "48", "--val-pairs", "24"]
DISTILL += ["--init-pairs", "24", "--gt-batch-size", "8", "--batch-size", "8", "--adam-steps", "20"]
DISTILL += ["--val-every", "5", "--gn-steps", "3", "--gn-batch-size", "12", "--quiet"]

# What must come out the same: the solver and its validation record (not wall times and costs).
SAME = ("times", "a", "b")
SAME_META = ("init", "init_candidates_psnr", "val_psnr", "best_step", "steps_run", "reverts")

# The phase of a stack: the first rule whose (file, function) appears in it; files are bns's.
PHASE_RULES = [
    ("file write", "_io.py", "atomic_write"),
    ("file write", "checkpoint.py", "save"),
    ("ground truth", "ground_truth.py", None),
    ("ground truth", "torchdiffeq", None),
    ("ranking", "classical.py", None),
    ("set-up", "gauss_newton.py", "check_forward_mode"),
    ("Gauss-Newton step", "gauss_newton.py", None),
    ("validation", "train.py", "_validate"),
    ("Adam step", "train.py", "_adam"),
    ("ground truth", "pairs.py", None),  # reading and writing the cache, shard exchange
    ("set-up", "train.py", None),
    ("set-up", "specs.py", None),
    ("set-up", "cli.py", None),
]


def _frames(stack: str) -> list[str]:
    """The frames of a faulthandler dump, innermost first, without those of imports."""
    frames = [line.strip() for line in stack.splitlines() if line.strip().startswith("File ")]
    return [f for f in frames if not f.endswith(" in <module>")]


def phase_of(stack: str) -> str:
    """The phase named by a faulthandler dump (all threads; the main thread is the one with
    bns's frames in it), or ``start-up`` (Python, torch and bns still importing)."""
    frames = _frames(stack)
    for name, file, func in PHASE_RULES:
        for f in frames:
            if f"/{file}" in f or (file == "torchdiffeq" and "torchdiffeq" in f):
                if func is None or f.endswith(f" in {func}"):
                    return name
    return "start-up" if stack.strip() else "start-up (before the handler)"


def _write_kind(path: str) -> str:
    name = Path(path).name
    if name == ".bns-write-check":
        return "file write: the output folder's check"
    if name.endswith(".ckpt"):
        return "file write: checkpoint"
    if name.endswith(".json"):
        return "file write: solver"
    if "shards" in path or name[:9].isdigit():
        return "file write: ground-truth shard"
    return "file write: ground-truth cache"


def verify_cache(folder: Path) -> dict:
    """Every cache file in ``folder``: readable, and its tensors matching its stored digest."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    from bns.pairs import _digest

    files = corrupt = 0
    for path in folder.rglob("*.safetensors"):
        files += 1
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
            ok = meta.get("digest") == _digest(load_file(str(path)))
        except Exception:  # noqa: BLE001 - unreadable counts as corrupt
            ok = False
        corrupt += not ok
    return {"files": files, "corrupt": corrupt}


class Runner:
    """Starts the command line, one process or ``torchrun`` with ``workers`` workers."""

    def __init__(self, folder: Path, workers: int, sleep: float) -> None:
        self.folder, self.workers, self.sleep = folder, workers, sleep
        (folder / "user.py").write_text(USER_FILE)
        (folder / "launch.py").write_text(LAUNCHER)

    def command(self, out: Path, resume: bool = False) -> list[str]:
        head = [sys.executable]
        if self.workers > 1:
            head += ["-m", "torch.distributed.run", "--nproc-per-node", str(self.workers)]
            head += ["--master-port", str(random.randint(20000, 60000))]
        argv = [*DISTILL, "--model", f"{self.folder / 'user.py'}:net", "--out", str(out)]
        return [*head, str(self.folder / "launch.py"), *argv, *(["--resume"] if resume else [])]

    def start(self, trial: Path, out: Path, resume: bool = False, **env: str):
        e = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT / "src"))
        hooks = ("FAULT_LOG", "FAULT_WRITE", "FAULT_CALL", "FAULT_CALLS", "FAULT_RANK")
        for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", *hooks):
            e.pop(name, None)
        e.update(BNS_CACHE_DIR=str(trial / "cache"), FAULT_DIR=str(trial), BNS_DIST_TIMEOUT="30")
        e.update(NET_SLEEP=str(self.sleep), **env)
        log = open(trial / ("rerun.log" if resume else "run.log"), "w")
        return subprocess.Popen(
            self.command(out, resume),
            env=e,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def _wait(proc, timeout: float) -> int | None:
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        return None


def _pids(trial: Path, workers: int, deadline: float) -> dict[int, int] | None:
    """The workers' pids once they have all written them (None at the deadline)."""
    while time.time() < deadline:
        try:
            return {r: int((trial / f"pid.{r}").read_text()) for r in range(workers)}
        except (OSError, ValueError):
            time.sleep(0.01)
    return None


def reference(runner: Runner, base: Path) -> dict:
    """An uninterrupted run: its solver, wall time and the files it renames into place."""
    trial = base / "reference"
    trial.mkdir()
    t0 = time.time()
    proc = runner.start(
        trial, trial / "s.json", FAULT_LOG=str(trial / "writes"), FAULT_CALLS=str(trial / "calls")
    )
    assert _wait(proc, 900) == 0, (trial / "run.log").read_text()[-3000:]
    wall = time.time() - t0
    ready = (trial / "ready.0").stat().st_mtime - t0
    written = (trial / "s.json").stat().st_mtime - t0
    writes = {
        r: (trial / f"writes.{r}").read_text().split()
        for r in range(runner.workers)
        if (trial / f"writes.{r}").exists()
    }
    solver = json.loads((trial / "s.json").read_text())
    return {
        "solver": solver,
        "wall_s": wall,
        "ready_s": ready,
        "written_s": written,
        "writes": writes,
        "calls": {r: int((trial / f"calls.{r}").read_text()) for r in range(runner.workers)},
    }


def _differs(ref: dict, got: dict) -> list[str]:
    diff = [k for k in SAME if ref[k] != got.get(k)]
    return diff + [f"meta.{k}" for k in SAME_META if ref["meta"].get(k) != got["meta"].get(k)]


def _tmp_files(trial: Path) -> int:
    return sum(1 for _ in trial.rglob(".*.tmp"))


def trial(
    runner: Runner, ref: dict, base: Path, i: int, rng: random.Random, p_call: float, p_write: float
):
    """One kill and one rerun; the record of what happened."""
    folder = base / f"t{i:04d}"
    folder.mkdir()
    out = folder / "s.json"
    rec: dict = {"trial": i}
    workers = runner.workers
    kind = rng.random()
    if kind < p_call:  # inside the k-th network call: every phase in proportion to its calls
        rank = rng.randrange(workers)
        k = rng.randint(1, ref["calls"][rank])
        rec.update(kind="call", rank=rank, call=k)
        t0 = time.time()
        proc = runner.start(folder, out, FAULT_CALL=str(k), FAULT_RANK=str(rank))
        rc = _wait(proc, 600)
        stack = folder / f"stacks.{rank}"
        stack = stack.read_text() if stack.exists() else ""
        rec["phase"] = phase_of(stack)
        rec["frames"] = [
            f.split('"')[1].split("/")[-1] + f.split('"')[2] for f in _frames(stack)[:8]
        ]
    elif kind < p_call + p_write:  # inside a file write
        ranks = [r for r, w in ref["writes"].items() if w]
        rank = rng.choice(ranks)
        k = rng.randint(1, len(ref["writes"][rank]))
        when = rng.choice(["before", "after"])
        rec.update(kind="write", rank=rank, write=k, when=when)
        rec["phase"] = _write_kind(ref["writes"][rank][k - 1]) + f" ({when} the rename)"
        t0 = time.time()
        proc = runner.start(folder, out, FAULT_WRITE=f"{k}:{when}", FAULT_RANK=str(rank))
        rc = _wait(proc, 600)
    else:  # at a random moment
        # start-up (Python, torch and bns importing) gets its share of kills, not half of them
        ready = ref["ready_s"]
        # and the moments run to the solver's write (the exit after it is short, and its own)
        end = ref["written_s"]
        at = rng.uniform(0, ready) if rng.random() < 0.1 else rng.uniform(ready, end)
        rank = rng.randrange(workers)
        rec.update(kind="moment", rank=rank, at_s=round(at, 3))
        t0 = time.time()
        proc = runner.start(folder, out)
        time.sleep(max(0.0, at - (time.time() - t0)))
        # The pid file is written once SIGUSR1 writes a stack (not before: it would kill).
        pids = _pids(folder, workers, time.time() + 60)
        target = pids[rank] if pids else proc.pid
        if proc.poll() is not None:
            rec["phase"] = "finished before the kill"
        else:
            try:
                os.kill(target, signal.SIGUSR1)
                time.sleep(0.03)  # the handler writes the stack in microseconds
                os.kill(target, signal.SIGKILL)
            except ProcessLookupError:
                pass
            stack = folder / f"stacks.{rank}"
            stack = stack.read_text() if stack.exists() else ""
            rec["phase"] = phase_of(stack)
            if out.exists():
                rec["phase"] = "exit (the solver file written)"
            rec["frames"] = [
                f.split('"')[1].split("/")[-1] + f.split('"')[2] for f in _frames(stack)[:8]
            ]
        rc = _wait(proc, 600)
    rec["job_ended_s"] = round(time.time() - t0, 2)
    rec["job_rc"] = rc
    log = (folder / "run.log").read_text(errors="replace")
    if workers > 1 and rec["phase"] != "finished before the kill":
        errors = [ln for ln in log.splitlines() if "bns distill: error:" in ln]
        rec["survivor_line"] = errors[0] if errors else None
        # torchrun's own report of the failed worker is a traceback of its own; one through
        # bns's files would be a worker's
        rec["survivor_traceback"] = bool(re.search(r'File ".*/src/bns/', log))
        if errors:
            rec["survivor_end"] = "one line from bns"
        elif "(SIGTERM)" in log:
            rec["survivor_end"] = "stopped by torchrun before bns set up its workers"
        else:
            rec["survivor_end"] = "other"
    rec["tmp_left_by_kill"] = _tmp_files(folder)
    rec["cache_after_kill"] = verify_cache(folder / "cache")
    rec["out_after_kill"] = "complete" if out.exists() else "absent"
    if out.exists():  # a file in place is never partial: it loads and verifies
        try:
            from bns.solver import NSSolver

            NSSolver.load(out, force=True)
        except Exception as e:  # noqa: BLE001
            rec["out_after_kill"] = f"unreadable: {e}"
    # Half the reruns continue with --resume, half start again (the solver file, if the kill
    # came after it was written, is kept: a plain rerun would refuse to overwrite it).
    rec["rerun"] = "resume" if rng.random() < 0.5 else "plain"
    if rec["rerun"] == "plain" and out.exists():
        rec["rerun"] = "none (the solver file was written)"
        rec["rerun_rc"] = 0
    else:
        proc = runner.start(folder, out, resume=rec["rerun"] == "resume")
        rec["rerun_rc"] = _wait(proc, 900)
    got = json.loads(out.read_text()) if out.exists() else None
    rec["differs"] = _differs(ref["solver"], got) if got else ["no solver"]
    rec["cache_after_rerun"] = verify_cache(folder / "cache")
    rec["tmp_left_after_rerun"] = _tmp_files(folder)
    rec["ok"] = rec["rerun_rc"] == 0 and not rec["differs"]
    if rec["ok"] and not rec["cache_after_rerun"]["corrupt"]:
        shutil.rmtree(folder)
    else:
        rec["kept"] = str(folder)
    return rec


def summarize(records: list[dict], workers: int) -> dict:
    kills = [r for r in records if r["phase"] != "finished before the kill"]
    s = {
        "trials": len(records),
        "kills": len(kills),
        "phases": dict(Counter(r["phase"] for r in kills).most_common()),
        "reruns_ok": sum(r["ok"] for r in records),
        "reruns": dict(Counter(r["rerun"] for r in records)),
        "differing_solvers": sum(bool(r["differs"]) for r in records),
        "corrupt_cache_files": sum(
            r["cache_after_kill"]["corrupt"] + r["cache_after_rerun"]["corrupt"] for r in records
        ),
        "cache_files_checked": sum(
            r["cache_after_kill"]["files"] + r["cache_after_rerun"]["files"] for r in records
        ),
        "partial_solver_files": sum(r["out_after_kill"].startswith("unreadable") for r in records),
        "tmp_files_left_by_kills": sum(r["tmp_left_by_kill"] for r in records),
        "tmp_files_after_reruns": sum(r["tmp_left_after_rerun"] for r in records),
    }
    if workers > 1:
        lost = [r for r in kills]
        s["survivor_one_line"] = sum(bool(r.get("survivor_line")) for r in lost)
        s["survivor_stopped_by_torchrun"] = sum(
            r.get("survivor_end", "").startswith("stopped") for r in lost
        )
        s["survivor_other_end"] = sum(r.get("survivor_end") == "other" for r in lost)
        s["survivor_tracebacks"] = sum(bool(r.get("survivor_traceback")) for r in lost)
        s["job_end_after_kill_max_s"] = max((r["job_ended_s"] for r in lost), default=None)
    return s


def write(payload: dict, tag: str) -> None:
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"faults_{tag}.json").write_text(json.dumps(payload, indent=1) + "\n")
    s = payload["summary"]
    L = [f"# kill -9 during bns distill ({payload['workers']} worker(s))", ""]
    L += [f"Machine: {payload['machine']}. Command: `{payload['command']}`.", ""]
    L += [f"Wall time {payload['wall_s'] / 60:.1f} min; uninterrupted run"]
    L[-1] += (
        f" {payload['reference_wall_s']:.1f} s with {payload['reference_writes']} file renames."
    )
    L += ["", "| figure | value |", "|---|---:|"]
    for key, v in s.items():
        if key not in ("phases", "reruns"):
            L.append(f"| {key.replace('_', ' ')} | {v} |")
    L += ["", "Reruns: " + ", ".join(f"{v} {k}" for k, v in s["reruns"].items()) + "."]
    L += ["", "| phase hit | kills |", "|---|---:|"]
    L += [f"| {k} | {v} |" for k, v in s["phases"].items()]
    if payload["workers"] > 1:
        lines = Counter(
            r["survivor_line"].split("error:")[-1].strip()[:90]
            for r in payload["trials"]
            if r.get("survivor_line")
        )
        L += ["", "How the surviving worker's job ended (most common lines):", ""]
        L += [f"- {n} x `{line}`" for line, n in lines.most_common(5)]
    (RESULTS / f"faults_{tag}.md").write_text("\n".join(L) + "\n")


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--kills", type=int, default=100, help="trials (one kill and a rerun each)")
    p.add_argument("--workers", type=int, default=1, help="1, or torchrun workers")
    p.add_argument("--call-share", type=float, default=0.4, help="share of kills in a call")
    p.add_argument("--write-share", type=float, default=0.25, help="share of kills in a write")
    p.add_argument("--sleep", type=float, default=0.002, help="seconds added to each network call")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tag", default=None, help="results name (default: single or torchrun2)")
    p.add_argument("--out", type=Path, default=None, help="results folder (default: results/)")
    args = p.parse_args(argv)
    import torch

    global RESULTS
    RESULTS = args.out or RESULTS
    tag = args.tag or ("single" if args.workers == 1 else f"torchrun{args.workers}")
    rng = random.Random(args.seed)
    t0 = time.time()
    with tempfile.TemporaryDirectory(prefix="bns-faults-") as tmp:
        base = Path(tmp)
        runner = Runner(base, args.workers, args.sleep)
        ref = reference(runner, base)
        records = []

        def payload() -> dict:
            return {
                "workers": args.workers,
                "machine": f"2-core x86_64 CPU VM, torch {torch.__version__}, one thread per"
                " process",
                "command": "python benchmarks/faults.py " + " ".join(argv or sys.argv[1:]),
                "wall_s": time.time() - t0,
                "reference_wall_s": ref["wall_s"],
                "reference_start_up_s": ref["ready_s"],
                "reference_writes": sum(len(w) for w in ref["writes"].values()),
                "reference_calls": ref["calls"],
                "summary": summarize(records, args.workers),
                "trials": records,
            }

        for i in range(args.kills):
            rec = trial(runner, ref, base, i, rng, args.call_share, args.write_share)
            records.append(rec)
            print(json.dumps({k: rec[k] for k in ("trial", "phase", "ok", "differs")}), flush=True)
            if "kept" in rec:  # keep the evidence out of the temporary folder
                keep = Path(tempfile.gettempdir()) / f"bns-faults-kept-{tag}-{i}"
                shutil.copytree(rec["kept"], keep, dirs_exist_ok=True)
                rec["kept"] = str(keep)
            write(payload(), tag)  # after every trial: a run cut short keeps what it did
        result = payload()
    write(result, tag)
    print(json.dumps(result["summary"], indent=1))
    return result


if __name__ == "__main__":
    main()
