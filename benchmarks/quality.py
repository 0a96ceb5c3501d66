"""Quality benchmark: PSNR vs NFE for BNS and every classical solver, on held-out test pairs.

    python benchmarks/quality.py --model gmm --guidance 1 --nfe 4,6,8,10,12,16 \
        --train-pairs 520 --val-pairs 1024 --test-pairs 1024 --steps 1500

For each NFE it distills a BNS solver (from ``--init``, default the classical solver that does
best on validation pairs), evaluates it, its initialization (``solver.meta["init"]``) and every
classical solver on the test pairs, and writes
``benchmarks/results/quality_<model>_g<guidance>.json`` and ``.md`` (and a PNG plot).
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import sys
import time
from pathlib import Path

import torch

import bns
from bns.classical import best_classical
from bns.config import DistillConfig
from bns.evaluate import best_rows, evaluate
from bns.pairs import make_pairs
from bns.report import markdown_table, plot_psnr_vs_nfe, write_results
from bns.solvers import solver_from_label
from bns.solvers.ends import resolve_end
from bns.specs import load_model
from bns.train import distill

RESULTS = Path(__file__).parent / "results"


def machine() -> str:
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (
        f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads,"
        f" {gpu}, torch {torch.__version__}"
    )


def save(name: str, out: dict, table: str) -> None:
    """``out`` (with the machine and the command added) as ``results/NAME.json``, ``table`` as
    ``results/NAME.md`` (characters a file name cannot hold become ``_``); prints the table."""
    out.update(machine=machine(), command=" ".join(sys.argv))
    stem = RESULTS / re.sub(r"[^A-Za-z0-9_.-]", "_", name)
    stem.with_suffix(".json").write_text(json.dumps(out, indent=1))
    stem.with_suffix(".md").write_text(table)
    print(table)


def run(args: argparse.Namespace) -> dict:
    model = load_model(args.model)
    end = resolve_end(model, args.end)
    kw = dict(seed=args.seed, guidance=args.guidance, progress=not args.quiet, end=end)
    t0 = time.perf_counter()
    train = make_pairs(model, args.train_pairs, "train", **kw)
    val = make_pairs(model, args.val_pairs, "val", **kw)
    test = make_pairs(model, args.test_pairs, "test", **kw)
    t_gt = time.perf_counter() - t0
    entries, kinds, distill_info = [], {"bns": "bns"}, {}
    for nfe in args.nfe:
        t1 = time.perf_counter()
        solver, hist = distill(
            model,
            nfe,
            guidance=args.guidance,
            init=args.init,
            pairs=(train, val),
            adam_steps=args.steps,
            lr=args.lr,
            batch_size=args.batch_size,
            val_every=args.val_every,
            precondition=args.precondition,
            seed=args.seed,
            gn_steps=args.gn_steps,
            gn_batch_size=args.gn_batch_size,
            progress=not args.quiet,
        )
        distill_info[nfe] = {
            "init": solver.meta["init"],
            "seconds": round(time.perf_counter() - t1, 1),
            "val_psnr": hist["best_val_psnr"],
            "best_step": hist["best_step"],
            "steps_run": hist["steps_run"],
            "forwards": hist["forwards"],
        }
        if args.save_solvers:
            solver.save(args.out / "solvers" / f"{model.name}_g{args.guidance:g}_nfe{nfe}.json")
        init = solver_from_label(model, nfe, solver.meta["init"], end)
        entries += [("bns", nfe, solver), ("bns init", nfe, init)]
        if not args.quiet:
            print(
                f"nfe {nfe}: val {hist['best_val_psnr']:.2f} dB (init {solver.meta['init']}"
                f" {hist['val_psnr'][0]:.2f}),"
                f" {distill_info[nfe]['seconds']} s",
                file=sys.stderr,
            )
    kinds["bns init"] = "init"
    # every classical solver on its best grid, chosen on (at most) 64 validation pairs
    entries += best_classical(model, args.nfe, val[:64], guidance=args.guidance, end=end)
    rows = evaluate(model, entries, test, args.guidance, kinds=kinds, progress=not args.quiet)
    best, ours = best_rows(rows), best_rows(rows, "bns")
    targets = {}
    for n in args.nfe:
        if n in best and n in ours:
            targets[n] = {
                "bns": ours[n]["psnr_mean"],
                "best_classical": best[n]["solver"],
                "best_classical_psnr": best[n]["psnr_mean"],
                "gain_db": ours[n]["psnr_mean"] - best[n]["psnr_mean"],
            }
            if 2 * n in best:
                targets[n]["best_classical_at_2n"] = best[2 * n]["solver"]
                targets[n]["best_classical_at_2n_psnr"] = best[2 * n]["psnr_mean"]
    return {
        "rows": rows,
        "model": model.name,
        "guidance": args.guidance,
        "targets": targets,
        "distill": distill_info,
        "protocol": {
            "train_pairs": len(train),
            "val_pairs": len(val),
            "test_pairs": len(test),
            "steps": args.steps,
            "lr": args.lr,
            "batch_size": args.batch_size,
            "gn_steps": args.gn_steps,
            "gn_batch_size": args.gn_batch_size,
            "init": args.init,
            "precondition": args.precondition,
            "seed": args.seed,
            "end": end,
        },
        "ground_truth": {"seconds": round(t_gt, 1), "nfe_per_sample": train.nfe_per_sample},
        "machine": machine(),
        "command": " ".join(["python", "benchmarks/quality.py", *sys.argv[1:]]),
        "bns_version": bns.__version__,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="gmm")
    p.add_argument("--guidance", type=float, default=1.0)
    p.add_argument("--nfe", type=lambda s: [int(v) for v in s.split(",")], default=[4, 8, 16])
    p.add_argument("--train-pairs", type=int, default=520)
    p.add_argument("--val-pairs", type=int, default=1024)
    p.add_argument("--test-pairs", type=int, default=1024)
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--lr", type=float, default=DistillConfig(nfe=1).lr)
    p.add_argument("--init", default="best", help="initial solver: best or a solver name")
    p.add_argument("--batch-size", type=int, default=40)
    p.add_argument("--val-every", type=int, default=25)
    p.add_argument("--gn-steps", type=int, default=0, help="Gauss-Newton steps after Adam's")
    p.add_argument("--gn-batch-size", type=int, default=64)
    p.add_argument(
        "--precondition",
        default="auto",
        type=lambda v: v if v == "auto" else None if v == "none" else float(v),
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--end",
        default="range",
        choices=("auto", "range", "data"),
        help="where solvers and ground truth end (range: the results so far; see ends.py)",
    )
    p.add_argument("--tag", default="")
    p.add_argument("--save-solvers", action="store_true")
    p.add_argument("--out", type=Path, default=RESULTS, help="results folder")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args()
    res = run(args)
    stem = f"quality_{res['model']}_g{args.guidance:g}{args.tag}"
    title = (
        f"{res['model']}, guidance {args.guidance:g}: PSNR (dB) vs ground truth,"
        f" {res['protocol']['test_pairs']} test pairs"
    )
    note = (
        f"\nMachine: {res['machine']}. Command: `{res['command']}`.\n"
        f"Protocol: {json.dumps(res['protocol'])}.\n"
    )
    write_results(
        res["rows"], args.out / f"{stem}.json", {k: v for k, v in res.items() if k != "rows"}
    )
    (args.out / f"{stem}.md").write_text(markdown_table(res["rows"], title) + note)
    plot_psnr_vs_nfe(res["rows"], args.out / f"{stem}.png", title)
    print(markdown_table(res["rows"], title) + note)


if __name__ == "__main__":
    main()
