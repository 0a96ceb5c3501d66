"""What one Gauss-Newton step costs as the NFE grows: forwards, JVPs, seconds, peak memory.

    python benchmarks/gn_scaling.py --model fmnist-cfg --guidance 2 --batch 8 --nfe 4,8,12,16,20

Each (model, NFE) runs in a fresh process: ground-truth pairs from the cache, one Gauss-Newton
step (:func:`bns.gauss_newton.gauss_newton_step`) of ``--batch`` pairs from midpoint, with its
network forwards and JVPs counted, its wall time, and the peak resident memory it added
(``ru_maxrss``; CUDA: ``max_memory_allocated``). The estimator's prediction of the same step
(:mod:`bns.estimate`) stands beside it, and the step at the default batch is predicted from it.
Writes ``benchmarks/results/gn_scaling_<model>.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

from quality import RESULTS, machine


def one(model_name: str, guidance: float, nfe: int, batch: int, cache: str) -> dict:
    import torch

    import bns
    from bns.config import auto_gn_batch_size
    from bns.estimate import Estimator, gn_step_work
    from bns.families import make_family
    from bns.gauss_newton import gauss_newton_step
    from bns.model import frozen
    from bns.pairs import make_pairs
    from bns.solvers import initial_solver
    from bns.specs import load_model

    model = load_model(model_name)
    train = make_pairs(model, batch, "train", guidance=guidance, cache=cache, progress=False)
    cfg = bns.DistillConfig(nfe=nfe, guidance=guidance, gn_batch_size=batch)
    family = make_family("bns", initial_solver(model, nfe, "midpoint"))
    with frozen(model):
        # Warm up forward mode (its first call scripts decompositions) on a 1-step solver.
        gauss_newton_step(
            make_family("bns", initial_solver(model, 2, "midpoint")),
            model,
            train[:1],
            torch.arange(1),
            cfg.replace(nfe=2),
            1e-3,
        )
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        f0, j0 = model.forwards, model.jvps
        t0 = time.perf_counter()
        gauss_newton_step(family, model, train, torch.arange(batch), cfg, 1e-3)
        seconds = time.perf_counter() - t0
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        forwards, jvps = model.forwards - f0, model.jvps - j0
        est = Estimator(model, guidance, torch.device("cpu"), cache).ledger(
            cfg.replace(adam_steps=0, gn_steps=1, train_pairs=batch, val_pairs=1, init_pairs=1),
            "range",
            [],  # no ranking
            pairs_given=True,
        )
    default_b = auto_gn_batch_size(nfe)
    fpe = model.forwards_per_evaluation(guidance)
    return {
        "nfe": nfe,
        "batch": batch,
        "params": (nfe * nfe + 5 * nfe - 2) // 2,
        "forwards": forwards,
        "jvps": jvps,
        "jvps_formula": gn_step_work(nfe, batch)[1] * fpe,
        "seconds": seconds,
        "estimate_seconds": est["optimizer"].seconds,
        "peak_rss_added_mb": max(0, peak - base) / 1024,
        "default_batch": default_b,
        "seconds_at_default_batch": seconds * default_b / batch,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="gmm")
    ap.add_argument("--guidance", type=float, default=1.0)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--nfe", default="4,8,12,16,20")
    ap.add_argument("--cache", default="/tmp/bns-bench-cache")
    ap.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(one(args.model, args.guidance, int(args.nfe), args.batch, args.cache)))
        return
    rows = []
    for nfe in [int(v) for v in args.nfe.split(",")]:
        cmd = [sys.executable, __file__, "--one", "--model", args.model, "--nfe", str(nfe)]
        cmd += ["--guidance", str(args.guidance), "--batch", str(args.batch)]
        cmd += ["--cache", args.cache]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        r = rows[-1]
        print(
            f"nfe={nfe}: {r['jvps']:,} jvps, {r['seconds']:.1f} s,"
            f" +{r['peak_rss_added_mb']:.0f} MB",
            flush=True,
        )
    res = {
        "model": args.model,
        "guidance": args.guidance,
        "machine": machine(),
        "command": "python benchmarks/gn_scaling.py " + " ".join(sys.argv[1:]),
        "rows": rows,
    }
    path = RESULTS / f"gn_scaling_{args.model}"
    path.with_suffix(".json").write_text(json.dumps(res, indent=1))
    L = [f"### One Gauss-Newton step against NFE: {args.model} (guidance {args.guidance:g})", ""]
    L += [f"Machine: {res['machine']}. Command: `{res['command']}`.", ""]
    L += [
        "| NFE | parameters | pairs | forwards | JVPs | s | estimated s | peak RSS added (MB) |"
        " s at the default batch |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        L.append(
            f"| {r['nfe']} | {r['params']} | {r['batch']} | {r['forwards']:,} | {r['jvps']:,} |"
            f" {r['seconds']:.1f} | {r['estimate_seconds']:.1f} | {r['peak_rss_added_mb']:.0f} |"
            f" {r['seconds_at_default_batch']:.1f} ({r['default_batch']}) |"
        )
    path.with_suffix(".md").write_text("\n".join(L) + "\n")


if __name__ == "__main__":
    Path(RESULTS).mkdir(exist_ok=True)
    main()
