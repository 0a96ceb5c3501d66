"""How close ``bns distill --estimate`` comes to the run, phase by phase, from a cold cache.

    python benchmarks/estimate.py --model fmnist-cfg --guidance 2 --nfe 4,8

For each NFE: the estimate (a few timed calls and a pilot solve of 16 pairs), then the run it
predicts with every Gauss-Newton step run (``gn_patience=0``: the estimate is that upper bound),
then the default run (with the stopping rule), each in a fresh cache folder. The table gives
each phase's predicted and actual forwards, JVPs and seconds, and their ratio (target: within
30%). Writes ``benchmarks/results/estimate_<model>.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time

from quality import RESULTS, machine

import bns
from bns.cost import Ledger
from bns.estimate import estimate_cost
from bns.specs import load_model


def run(args) -> dict:
    model = load_model(args.model)
    rows = []
    for nfe in args.nfe:
        kw = dict(guidance=args.guidance)
        with tempfile.TemporaryDirectory() as cache:
            t0 = time.perf_counter()
            est = estimate_cost(model, nfe, cache=cache, gn_patience=0, **kw)
            took = time.perf_counter() - t0
            solver, _ = bns.distill(model, nfe, cache=cache, progress=False, gn_patience=0, **kw)
            full = Ledger.from_dict(solver.meta["cost"])
        with tempfile.TemporaryDirectory() as cache:
            solver, hist = bns.distill(model, nfe, cache=cache, progress=False, **kw)
            default = Ledger.from_dict(solver.meta["cost"])
        phases = {}
        for name in [*full.phases, "total"]:
            e = est.total if name == "total" else est[name]
            a = full.total if name == "total" else full[name]
            phases[name] = {
                f: {"estimate": getattr(e, f), "actual": getattr(a, f)}
                for f in ("forwards", "jvps", "seconds")
            }
        rows.append(
            {
                "nfe": nfe,
                "estimate_seconds": took,
                "phases": phases,
                "default_run": default.to_dict(),
                "default_steps": hist["steps_run"],
                "default_val_psnr": hist["best_val_psnr"],
            }
        )
        print(
            f"{args.model} nfe={nfe}: estimate {est.total.seconds:.0f} s, run"
            f" {full.total.seconds:.0f} s, default run {default.total.seconds:.0f} s",
            flush=True,
        )
    return {
        "model": args.model,
        "guidance": args.guidance,
        "machine": machine(),
        "command": "python benchmarks/estimate.py " + " ".join(sys.argv[1:]),
        "rows": rows,
    }


def _ratio(d: dict) -> str:
    e, a = d["estimate"], d["actual"]
    if a == 0:
        return "-" if e == 0 else "inf"
    return f"{e / a:.2f}"


def markdown(res: dict) -> str:
    L = [f"### Estimate against the run: {res['model']} (guidance {res['guidance']:g})", ""]
    L += [
        f"Machine: {res['machine']}. Command: `{res['command']}`. Default settings, cold"
        " cache; the run with every Gauss-Newton step (gn_patience=0), as the estimate"
        " assumes.",
        "",
    ]
    L += [
        "| NFE | phase | forwards est / run | JVPs est / run | seconds est / run | ratio s |",
        "|---|---|---|---|---|---|",
    ]
    for r in res["rows"]:
        for name, d in r["phases"].items():
            f, j, s = d["forwards"], d["jvps"], d["seconds"]
            L.append(
                f"| {r['nfe']} | {name} | {f['estimate']:,} / {f['actual']:,} |"
                f" {j['estimate']:,} / {j['actual']:,} |"
                f" {s['estimate']:.1f} / {s['actual']:.1f} | {_ratio(s)} |"
            )
    L.append("")
    L += [
        "The default run (the stopping rule on) against that upper bound:",
        "",
        "| NFE | steps run | seconds | of the estimate | time to estimate (s) |",
        "|---|---|---|---|---|",
    ]
    for r in res["rows"]:
        t = r["default_run"]["total"]["seconds"]
        e = r["phases"]["total"]["seconds"]["estimate"]
        L.append(
            f"| {r['nfe']} | {r['default_steps']} | {t:.0f} | {t / e:.2f} |"
            f" {r['estimate_seconds']:.1f} |"
        )
    return "\n".join(L) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="gmm")
    ap.add_argument("--guidance", type=float, default=1.0)
    ap.add_argument("--nfe", type=lambda s: [int(v) for v in s.split(",")], default=[4, 8])
    args = ap.parse_args()
    res = run(args)
    out = RESULTS / f"estimate_{args.model}"
    out.with_suffix(".json").write_text(json.dumps(res, indent=1))
    out.with_suffix(".md").write_text(markdown(res))


if __name__ == "__main__":
    main()
