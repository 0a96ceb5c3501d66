"""Preconditioning benchmark: does running the initial solver on a CondOT(sigma0)-rescheduled ODE
help BNS? (bns-math.md, section 3; the paper's exact transform is unpublished.)

    python benchmarks/precondition.py --model gmm-vp --nfe 4,8 --sigma0 none,0.5,1,2

For each NFE and each choice it reports the PSNR of the initial solver (``--init``, midpoint) and of the distilled BNS
solver on held-out test pairs; writes ``benchmarks/results/precondition_<model>.json`` and ``.md``.
``gmm-vp`` is the analytic mixture under a VP scheduler with an epsilon "network".
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

from bns.evaluate import evaluate_psnr
from bns.models.gmm import gaussian_mixture_model
from bns.pairs import make_pairs
from bns.schedules import VP
from bns.solvers import initial_solver
from bns.specs import load_model
from bns.train import distill

RESULTS = Path(__file__).parent / "results"


def get_model(spec: str):
    if spec == "gmm-vp":
        return gaussian_mixture_model(
            dim=64,
            components=16,
            num_classes=None,
            std=0.15,
            schedule=VP(),
            prediction="eps",
            t_range=(0.0, 1 - 1e-3),
            name="gmm-vp",
        )
    return load_model(spec)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="gmm-vp")
    p.add_argument("--guidance", type=float, default=1.0)
    p.add_argument("--nfe", type=lambda s: [int(v) for v in s.split(",")], default=[4, 8])
    p.add_argument("--sigma0", default="none,0.5,1,2")
    p.add_argument("--init", default="midpoint", help="the initial solver (a name, not best)")
    p.add_argument("--train-pairs", type=int, default=520)
    p.add_argument("--val-pairs", type=int, default=256)
    p.add_argument("--test-pairs", type=int, default=512)
    p.add_argument("--out", type=Path, default=RESULTS, help="results folder")
    p.add_argument("--steps", type=int, default=800)
    args = p.parse_args()
    choices = [None if v == "none" else float(v) for v in args.sigma0.split(",")]
    model = get_model(args.model)
    kw = dict(guidance=args.guidance, progress=False)
    train = make_pairs(model, args.train_pairs, "train", **kw)
    val = make_pairs(model, args.val_pairs, "val", **kw)
    test = make_pairs(model, args.test_pairs, "test", **kw)
    rows = []
    for nfe in args.nfe:
        for s0 in choices:
            t = time.perf_counter()
            init = initial_solver(model, nfe, args.init, precondition=s0)
            solver, hist = distill(
                model,
                nfe,
                guidance=args.guidance,
                init=args.init,
                precondition=s0,
                pairs=(train, val),
                adam_steps=args.steps,
                progress=False,
            )
            rows.append(
                {
                    "nfe": nfe,
                    "sigma0": s0,
                    "init_psnr": float(evaluate_psnr(model, init, test, args.guidance).mean()),
                    "bns_psnr": float(evaluate_psnr(model, solver, test, args.guidance).mean()),
                    "best_step": hist["best_step"],
                    "seconds": round(time.perf_counter() - t, 1),
                }
            )
            print(rows[-1], file=sys.stderr)
    res = {
        "model": model.name,
        "guidance": args.guidance,
        "rows": rows,
        "protocol": {
            "train_pairs": len(train),
            "val_pairs": len(val),
            "test_pairs": len(test),
            "steps": args.steps,
            "init": args.init,
        },
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, torch"
        f" {torch.__version__}",
        "command": " ".join(["python", "benchmarks/precondition.py", *sys.argv[1:]]),
    }
    lines = [
        f"### Preconditioning on {model.name} (guidance {args.guidance:g}), PSNR (dB) on"
        f" {len(test)} test pairs",
        "",
        "| NFE | sigma0 | initial solver | BNS | best step |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        s0 = "none" if r["sigma0"] is None else f"{r['sigma0']:g}"
        lines.append(
            f"| {r['nfe']} | {s0} | {r['init_psnr']:.2f} | {r['bns_psnr']:.2f} | {r['best_step']} |"
        )
    lines += [
        "",
        f"Machine: {res['machine']}. Command: `{res['command']}`.",
        f"Protocol: {json.dumps(res['protocol'])}.",
    ]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"precondition_{model.name}.json").write_text(json.dumps(res, indent=1) + "\n")
    (args.out / f"precondition_{model.name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
