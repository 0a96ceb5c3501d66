"""Where should a solver end on a model that stops short of the data? (the default of --end)

    python benchmarks/ends.py --model fmnist-ddpm --nfe 6,8 --steps 200

A discrete DDPM model's range stops at sigma = sqrt(1 - alphas_cumprod[0]) (0.01 here): a solver
that ends there (``end="range"``) leaves that noise in every sample; ``end="data"`` replaces the
last step by the step to sigma = 0, as diffusers' ``final_sigmas_type="zero"``. For each NFE
this distills a BNS solver each way (the same pairs, budget and seed) and evaluates both, and
the best classical solver each way, against the ground truth that ends on the data (the
noise-free sample, what a user keeps) and against the one that ends on the range. Writes
``benchmarks/results/ends_<model>.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from quality import RESULTS, machine

from bns.evaluate import baseline_solvers, evaluate
from bns.pairs import make_pairs
from bns.specs import load_model
from bns.train import distill


def run(args: argparse.Namespace) -> dict:
    model = load_model(args.model)
    kw = dict(seed=args.seed, progress=not args.quiet)
    pairs = {
        end: {
            split: make_pairs(model, n, split, end=end, **kw)
            for split, n in (
                ("train", args.train_pairs),
                ("val", args.val_pairs),
                ("test", args.test_pairs),
            )
        }
        for end in ("range", "data")
    }
    out: dict = {"per_nfe": {}}
    for nfe in args.nfe:
        res: dict = {}
        solvers = {}
        for end in ("range", "data"):
            t0 = time.perf_counter()
            solver, hist = distill(
                model,
                nfe,
                end=end,
                pairs=(pairs[end]["train"], pairs[end]["val"]),
                adam_steps=args.steps,
                batch_size=args.batch_size,
                init_pairs=args.init_pairs,
                seed=args.seed,
                progress=not args.quiet,
            )
            solvers[end] = solver
            res[f"bns_{end}_init"] = solver.meta["init"]
            res[f"bns_{end}_seconds"] = round(time.perf_counter() - t0, 1)
        for target in ("data", "range"):
            test = pairs[target]["test"]
            entries = [(f"bns end={e}", nfe, s) for e, s in solvers.items()]
            for e in ("range", "data"):
                entries += [
                    (f"{n} end={e}", k, s) for n, k, s in baseline_solvers(model, [nfe], end=e)
                ]
            kinds = {f"bns end={e}": "bns" for e in solvers}
            rows = evaluate(model, entries, test, kinds=kinds, progress=False)
            for r in rows:
                r["target"] = target
            res[f"rows_vs_{target}"] = rows
            for e in ("range", "data"):
                mine = [r for r in rows if r["solver"].endswith(f"end={e}")]
                bns_row = next(r for r in mine if r["solver"].startswith("bns"))
                classical = max(
                    (r for r in mine if not r["solver"].startswith("bns")),
                    key=lambda r: r["psnr_mean"],
                )
                res[f"vs_{target}"] = res.get(f"vs_{target}", {})
                res[f"vs_{target}"][e] = {
                    "bns": bns_row["psnr_mean"],
                    "best_classical": classical["solver"],
                    "best_classical_psnr": classical["psnr_mean"],
                }
        out["per_nfe"][nfe] = res
        if not args.quiet:
            print(f"nfe {nfe}: {json.dumps(res['vs_data'])}", file=sys.stderr)
    out.update(
        model=model.name,
        protocol={
            "train_pairs": args.train_pairs,
            "val_pairs": args.val_pairs,
            "test_pairs": args.test_pairs,
            "init_pairs": args.init_pairs,
            "steps": args.steps,
            "batch_size": args.batch_size,
            "seed": args.seed,
        },
        machine=machine(),
        command=" ".join(["python", "benchmarks/ends.py", *sys.argv[1:]]),
    )
    return out


def table(res: dict) -> str:
    lines = [
        f"### {res['model']}: where the solver ends (PSNR, dB, {res['protocol']['test_pairs']}"
        " test pairs)",
        "",
        "| NFE | ground truth ends | BNS end=range | BNS end=data | best classical end=range |"
        " best classical end=data |",
        "|---|---|---|---|---|---|",
    ]
    for nfe, r in res["per_nfe"].items():
        for target in ("data", "range"):
            v = r[f"vs_{target}"]
            lines.append(
                f"| {nfe} | {target} | {v['range']['bns']:.2f} | {v['data']['bns']:.2f} |"
                f" {v['range']['best_classical']} {v['range']['best_classical_psnr']:.2f} |"
                f" {v['data']['best_classical']} {v['data']['best_classical_psnr']:.2f} |"
            )
    lines += ["", f"Machine: {res['machine']}. Command: `{res['command']}`.", ""]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="fmnist-ddpm")
    p.add_argument("--nfe", type=lambda s: [int(v) for v in s.split(",")], default=[6, 8])
    p.add_argument("--train-pairs", type=int, default=520)
    p.add_argument("--val-pairs", type=int, default=256)
    p.add_argument("--test-pairs", type=int, default=512)
    p.add_argument("--init-pairs", type=int, default=128)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=24)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args()
    res = run(args)
    stem = f"ends_{res['model']}"
    (args.out / f"{stem}.json").write_text(json.dumps(res, indent=1) + "\n")
    (args.out / f"{stem}.md").write_text(table(res))
    print(table(res))


if __name__ == "__main__":
    main()
