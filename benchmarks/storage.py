"""Full disks and read-only places, swept: ``bns distill`` with its cache or its output on a
file system that fills up at every size from one page to more than the run needs.

    python benchmarks/storage.py --sizes 4:160:4     # KiB: from, to, step

Linux only: a private mount namespace (``unshare -m``) holds one tmpfs per size, so the
failures are the kernel's own ENOSPC, met by safetensors, torch.save and Python alike; and a
read-only bind mount for each place. Every run must end either with the solver of a run on a
roomy disk, bit for bit (the cache or the checkpoints skipped, with one warning line), or with
one error line before any work; and leave no temporary file, no partial file and no cache file
that fails its digest.

Writes ``benchmarks/results/storage.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"

USER_FILE = """
import torch
from torch import nn
import bns

class Net(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.l1, self.l2 = nn.Linear(9, 32), nn.Linear(32, 8)

    def forward(self, x, t):
        return self.l2(torch.tanh(self.l1(torch.cat([x, t[:, None]], 1))))

def net():
    return bns.Model(Net(), "velocity", bns.schedules.CondOT(), (8,), name="mlp")
"""

# Inside the namespace: every command line in turn, in one process; then what each place
# holds (solvers as text, the rest by size) and which cache files fail their digest.
DRIVER = r"""
import contextlib, io, json, sys, warnings
from pathlib import Path
from bns.cli import main
runs, root, result = json.loads(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
out = {"runs": {}}
for name, argv in runs.items():
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.showwarning = lambda m, *a, **k: print(f"warning: {m}", file=sys.stderr)
            rc = main(argv)
    out["runs"][name] = {"rc": rc, "err": err.getvalue()}
from safetensors import safe_open
from safetensors.torch import load_file
from bns.pairs import _digest
out["files"], out["corrupt"] = {}, []
for p in root.rglob("*"):
    if p.is_file():
        out["files"][str(p)] = p.read_text() if p.suffix == ".json" else p.stat().st_size
    if p.suffix == ".safetensors":
        try:
            with safe_open(str(p), framework="pt") as f:
                ok = f.metadata()["digest"] == _digest(load_file(str(p)))
        except Exception:
            ok = False
        if not ok:
            out["corrupt"].append(str(p))
open(result, "w").write(json.dumps(out))
"""

DISTILL = ["distill", "--nfe", "4", "--train-pairs", "32", "--val-pairs", "16"]
DISTILL += ["--init-pairs", "16", "--adam-steps", "6", "--val-every", "2", "--gn-steps", "2"]
DISTILL += ["--gn-batch-size", "8", "--batch-size", "8", "--gt-batch-size", "8", "--quiet"]
DISTILL += ["--device", "cpu"]


def _args(model: str, cache: Path, out: Path) -> list[str]:
    return [*DISTILL, "--model", model, "--cache-dir", str(cache), "--out", str(out)]


def _outcome(run: dict, solver: str | None, ref: dict) -> str:
    lines = [ln for ln in run["err"].splitlines() if ln.strip()]
    if run["rc"] == 0:
        got = json.loads(solver) if solver else None
        if not got or any(got[k] != ref[k] for k in ("times", "a", "b")):
            return "finished with another solver"
        if not lines:
            return "finished, nothing to say"
        if len(lines) == 1 and lines[0].startswith("warning: bns: "):
            return "finished, one warning line"
        return "finished, several lines"
    if len(lines) == 1 and lines[0].startswith("bns distill: error: "):
        return "one error line"
    return "failed otherwise"


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="4:160:4", help="tmpfs sizes in KiB, from:to:step")
    p.add_argument("--out", type=Path, default=None, help="results folder (default: results/)")
    args = p.parse_args(argv)
    import torch

    lo, hi, step = (int(v) for v in args.sizes.split(":"))
    sizes = list(range(lo, hi + 1, step))
    t0 = time.time()
    with tempfile.TemporaryDirectory(prefix="bns-storage-") as tmp:
        base = Path(tmp)
        (base / "user.py").write_text(USER_FILE)
        (base / "driver.py").write_text(DRIVER)
        model = f"{base / 'user.py'}:net"
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT / "src"))
        ref_out = base / "ref.json"
        done = subprocess.run(
            [sys.executable, "-m", "bns", *_args(model, base / "ref-cache", ref_out)],
            env=env, capture_output=True, text=True,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr[-3000:]
        ref = json.loads(ref_out.read_text())
        runs, mounts, places = {}, [], {}
        for kib in sizes:
            for where in ("cache", "output"):
                d = base / f"{where}-{kib}k"
                d.mkdir()
                mounts.append(f"mount -t tmpfs -o size={kib}k tmpfs {d}")
                cache, out = (d, base / "ok" / f"{where}-{kib}.json")
                if where == "output":
                    cache, out = base / "ok" / f"cache-{kib}", d / "s.json"
                runs[f"{where} {kib}"] = _args(model, cache, out)
                places[f"{where} {kib}"] = (where, kib, str(out))
        for where in ("cache", "output"):  # read-only, empty
            d = base / f"ro-{where}"
            d.mkdir()
            mounts += [f"mount --bind {d} {d}", f"mount -o remount,ro,bind {d}"]
            cache, out = (d, base / "ok" / f"ro-{where}.json")
            if where == "output":
                cache, out = base / "ok" / "cache-ro", d / "s.json"
            runs[f"read-only {where}"] = _args(model, cache, out)
            places[f"read-only {where}"] = (f"read-only {where}", 0, str(out))
        script = " && ".join([*mounts, 'exec "$0" "$@"'])
        result = base / "result.json"
        cmd = ["unshare", "-m", "sh", "-c", script, sys.executable, str(base / "driver.py")]
        done = subprocess.run(
            [*cmd, json.dumps(runs), str(base), str(result)], env=env, capture_output=True,
            text=True,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr[-3000:]
        res = json.loads(result.read_text())
        files = res["files"]
        records = []
        for name, (where, kib, out) in places.items():
            run = res["runs"][name]
            records.append(
                {
                    "place": where,
                    "kib": kib,
                    "outcome": _outcome(run, files.get(out), ref),
                    "said": [ln for ln in run["err"].splitlines() if ln.strip()][:3],
                }
            )
        tmp_left = [f for f in files if Path(f).name.endswith(".tmp")]
        partial_solvers = [f for f in files if f.endswith(".json") and not _loads(files[f])]
    outcomes = Counter(r["outcome"] for r in records)
    payload = {
        "machine": f"2-core x86_64 CPU VM, torch {torch.__version__}, one thread",
        "command": "python benchmarks/storage.py " + " ".join(argv or sys.argv[1:]),
        "wall_s": round(time.time() - t0, 1),
        "sizes_kib": sizes,
        "runs": len(records),
        "outcomes": dict(outcomes),
        "temporary_files_left": len(tmp_left),
        "partial_solver_files": len(partial_solvers),
        "corrupt_cache_files": len(res["corrupt"]),
        "cache_files_checked": sum(1 for f in files if f.endswith(".safetensors")),
        "records": records,
    }
    write(payload, args.out or RESULTS)
    print(json.dumps({k: v for k, v in payload.items() if k != "records"}, indent=1))
    return payload


def _loads(text: str) -> bool:
    try:
        json.loads(text)
        return True
    except ValueError:
        return False


def write(payload: dict, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "storage.json").write_text(json.dumps(payload, indent=1) + "\n")
    L = ["# Full disks and read-only places, swept", ""]
    L += [f"Machine: {payload['machine']}. Command: `{payload['command']}`.", ""]
    sizes = payload["sizes_kib"]
    L += [f"A tmpfs of {sizes[0]} to {sizes[-1]} KiB (every {sizes[1] - sizes[0]} KiB) holding"]
    L[-1] += " the cache, or the output folder; and each place read-only."
    L += ["", "| outcome | runs |", "|---|---:|"]
    L += [f"| {k} | {v} |" for k, v in sorted(payload["outcomes"].items())]
    L += ["", "| nothing lost | count |", "|---|---:|"]
    for key in ("temporary_files_left", "partial_solver_files", "corrupt_cache_files"):
        L.append(f"| {key.replace('_', ' ')} | {payload[key]} |")
    L.append(f"| cache files checked | {payload['cache_files_checked']} |")
    L += ["", "By place (outcome at each size, KiB):", ""]
    for place in ("cache", "output"):
        runs = [r for r in payload["records"] if r["place"] == place]
        spans: list[tuple[str, int, int]] = []
        for r in runs:
            if spans and spans[-1][0] == r["outcome"]:
                spans[-1] = (r["outcome"], spans[-1][1], r["kib"])
            else:
                spans.append((r["outcome"], r["kib"], r["kib"]))
        L.append(f"- {place}: " + "; ".join(f"{a}-{b}: {o}" for o, a, b in spans))
    for r in payload["records"]:
        if r["place"].startswith("read-only"):
            L.append(f"- {r['place']}: {r['outcome']} (`{r['said'][0] if r['said'] else ''}`)")
    (folder / "storage.md").write_text("\n".join(L) + "\n")


if __name__ == "__main__":
    main()
