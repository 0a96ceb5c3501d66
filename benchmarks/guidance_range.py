"""One solver for a range of guidance scales against one solver per scale, seen and unseen.

    python benchmarks/guidance_range.py --model gmm --nfe 6 --train-at 1,2,4,8 --unseen 1.5,3,6

Trains a guidance-range solver (``bns.distill_guidance_range``: BNS parameters quadratic in
log w) on pairs at the ``--train-at`` scales, with ``--steps`` steps per scale (the same number
of steps as each single-scale solver gets), and one ordinary BNS solver at every scale, seen and
unseen, with ``--steps`` steps each. Every solver is tested at every scale on that scale's test
pairs. Writes ``benchmarks/results/guidance_range_<model>.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from quality import RESULTS, machine

import bns
from bns.evaluate import baseline_solvers, evaluate_psnr
from bns.pairs import make_pairs
from bns.specs import load_model


def _floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",") if v.strip()]


def run(args: argparse.Namespace) -> dict:
    model = load_model(args.model)
    ws_train, ws_all = sorted(args.train_at), sorted(set(args.train_at) | set(args.unseen))
    kw = dict(seed=0, progress=False)
    pairs = {
        w: {
            s: make_pairs(model, n, s, guidance=w, **kw)
            for s, n in (
                ("train", args.train_pairs),
                ("val", args.val_pairs),
                ("test", args.test_pairs),
            )
        }
        for w in ws_all
    }
    common = dict(
        adam_steps=args.steps,
        batch_size=args.batch_size,
        init_pairs=args.init_pairs,
        progress=False,
    )
    t0 = time.perf_counter()
    rs, hist = bns.distill_guidance_range(
        model,
        args.nfe,
        ws_train,
        pairs={w: (pairs[w]["train"], pairs[w]["val"]) for w in ws_train},
        **{**common, "adam_steps": args.steps * len(ws_train)},
    )
    t_range = time.perf_counter() - t0
    rows = []
    for w in ws_all:
        t1 = time.perf_counter()
        own, _ = bns.distill(
            model, args.nfe, guidance=w, pairs=(pairs[w]["train"], pairs[w]["val"]), **common
        )
        test = pairs[w]["test"]
        classical = {
            name: float(evaluate_psnr(model, s, test, w).mean())
            for name, _, s in baseline_solvers(model, [args.nfe])
        }
        best = max(classical, key=classical.get)
        rows.append(
            {
                "guidance": w,
                "seen": w in ws_train,
                "range_solver": float(evaluate_psnr(model, rs.at(w), test, w).mean()),
                "solver_trained_at_w": float(evaluate_psnr(model, own, test, w).mean()),
                "best_classical": best,
                "best_classical_psnr": classical[best],
                "seconds_trained_at_w": round(time.perf_counter() - t1, 1),
            }
        )
        print(json.dumps(rows[-1]), file=sys.stderr)
    return {
        "model": model.name,
        "nfe": args.nfe,
        "rows": rows,
        "range": {
            "trained_at": ws_train,
            "init": rs.meta["init"],
            "seconds": round(t_range, 1),
            "steps": args.steps * len(ws_train),
            "best_step": hist["best_step"],
        },
        "protocol": {k: v for k, v in vars(args).items() if k != "out"},
        "machine": machine(),
        "command": " ".join(["python", "benchmarks/guidance_range.py", *sys.argv[1:]]),
    }


def table(res: dict) -> str:
    r = res["range"]
    lines = [
        f"### {res['model']}, NFE {res['nfe']}: one solver for guidance {r['trained_at'][0]:g} to"
        f" {r['trained_at'][-1]:g} vs one solver per scale (test PSNR, dB)",
        "",
        f"The range solver trained at {r['trained_at']} ({r['steps']} steps, {r['seconds']} s);"
        f" each per-scale solver {res['protocol']['steps']} steps.",
        "",
        "| guidance | seen in training | range solver | solver trained at w | best classical |",
        "|---|---|---|---|---|",
    ]
    for row in res["rows"]:
        lines.append(
            f"| {row['guidance']:g} | {'yes' if row['seen'] else 'no'} |"
            f" {row['range_solver']:.2f} | {row['solver_trained_at_w']:.2f} |"
            f" {row['best_classical']} {row['best_classical_psnr']:.2f} |"
        )
    lines += ["", f"Machine: {res['machine']}. Command: `{res['command']}`.", ""]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="gmm")
    p.add_argument("--nfe", type=int, default=6)
    p.add_argument("--train-at", type=_floats, default=[1.0, 2.0, 4.0, 8.0])
    p.add_argument("--unseen", type=_floats, default=[1.5, 3.0, 6.0])
    p.add_argument("--train-pairs", type=int, default=256)
    p.add_argument("--val-pairs", type=int, default=256)
    p.add_argument("--init-pairs", type=int, default=128)
    p.add_argument("--test-pairs", type=int, default=512)
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=24)
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args()
    res = run(args)
    stem = f"guidance_range_{res['model']}"
    (args.out / f"{stem}.json").write_text(json.dumps(res, indent=1) + "\n")
    (args.out / f"{stem}.md").write_text(table(res))
    print(table(res))


if __name__ == "__main__":
    main()
