"""Optimizers of distillation: Adam, Gauss-Newton (Levenberg-Marquardt) steps, and both.

    python benchmarks/optimizers.py --model fmnist-vp --nfe 6,8 \
        --configs adam:400:0,gn:0:12,adam+gn:200:8

Each config ``NAME:ADAM_STEPS:GN_STEPS[:INIT]`` distills a BNS solver at each NFE from the
initial solver INIT (default ``best``) on the same pairs; the table gives the validation and test
PSNR, the network forwards and seconds spent in distillation, the step of the best
validation, and the best classical solver at NFE n and 2n on the same test pairs (is n beating
2n?). Writes ``benchmarks/results/optimizers_<model>_g<guidance><tag>.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from quality import RESULTS, machine

from bns.classical import best_classical
from bns.evaluate import best_rows, evaluate
from bns.pairs import make_pairs
from bns.solvers.ends import resolve_end
from bns.specs import load_model
from bns.train import distill


def _configs(text: str) -> list[tuple[str, int, int, str]]:
    """``NAME:ADAM_STEPS:GN_STEPS[:INIT]`` items, comma-separated (INIT default ``best``)."""
    out = []
    for item in text.split(","):
        name, adam, gn, *init = item.split(":")
        out.append((name, int(adam), int(gn), init[0] if init else "best"))
    return out


def run(args: argparse.Namespace) -> dict:
    model = load_model(args.model)
    end = resolve_end(model, args.end)
    kw = dict(seed=0, guidance=args.guidance, progress=False, end=end)
    train = make_pairs(model, args.train_pairs, "train", **kw)
    val = make_pairs(model, args.val_pairs, "val", **kw)
    test = make_pairs(model, args.test_pairs, "test", **kw)
    entries, runs = [], []
    for nfe in args.nfe:
        for name, adam, gn, init in args.configs:
            t0 = time.perf_counter()
            solver, hist = distill(
                model,
                nfe,
                pairs=(train, val),
                guidance=args.guidance,
                adam_steps=adam,
                gn_steps=gn,
                gn_batch_size=args.gn_batch_size,
                batch_size=args.batch_size,
                init=init,
                progress=False,
            )
            runs.append(
                {
                    "config": name,
                    "nfe": nfe,
                    "adam_steps": adam,
                    "gn_steps": gn,
                    "init": solver.meta["init"],
                    "init_val_psnr": hist["val_psnr"][0],
                    "val_psnr": hist["best_val_psnr"],
                    "best_step": hist["best_step"],
                    "steps_run": hist["steps_run"],
                    "forwards": hist["forwards"],
                    "seconds": round(time.perf_counter() - t0, 1),
                    "val_curve": hist["val_psnr"],
                }
            )
            entries.append((name, nfe, solver))
            print(
                f"nfe {nfe} {name}: val {hist['best_val_psnr']:.2f} dB (init"
                f" {hist['val_psnr'][0]:.2f}), {hist['forwards']} forwards,"
                f" {runs[-1]['seconds']} s",
                file=sys.stderr,
                flush=True,
            )
    kinds = {c[0]: "bns" for c in args.configs}
    nfes = sorted({n for n in args.nfe} | {2 * n for n in args.nfe})
    rows = evaluate(
        model,
        entries + best_classical(model, nfes, val[:64], guidance=args.guidance, end=end),
        test,
        args.guidance,
        kinds=kinds,
    )
    best = best_rows(rows)
    for r in runs:
        row = next(x for x in rows if x["solver"] == r["config"] and x["nfe"] == r["nfe"])
        r["test_psnr"] = row["psnr_mean"]
        n = r["nfe"]
        r["best_classical"] = [best[n]["solver"], best[n]["psnr_mean"]]
        r["best_classical_2n"] = [best[2 * n]["solver"], best[2 * n]["psnr_mean"]]
    return {
        "model": model.name,
        "guidance": args.guidance,
        "runs": runs,
        "protocol": {
            "train_pairs": len(train),
            "val_pairs": len(val),
            "test_pairs": len(test),
            "batch_size": args.batch_size,
            "gn_batch_size": args.gn_batch_size,
            "end": end,
        },
        "machine": machine(),
        "command": " ".join(["python", "benchmarks/optimizers.py", *sys.argv[1:]]),
    }


def markdown(res: dict) -> str:
    lines = [
        f"### Optimizers on {res['model']}, guidance {res['guidance']:g}",
        "",
        f"Machine: {res['machine']}. Command: `{res['command']}`.",
        f"Protocol: {json.dumps(res['protocol'])}.",
        "",
        "| NFE | config | Adam steps | GN steps | init (val dB) | val dB | test dB | best step"
        " | forwards | s | best classical at n | at 2n |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in res["runs"]:
        c, c2 = r["best_classical"], r["best_classical_2n"]
        lines.append(
            f"| {r['nfe']} | {r['config']} | {r['adam_steps']} | {r['gn_steps']} |"
            f" {r['init']} ({r['init_val_psnr']:.2f}) | {r['val_psnr']:.2f} |"
            f" {r['test_psnr']:.2f} | {r['best_step']} | {r['forwards']:,} | {r['seconds']} |"
            f" {c[0]} {c[1]:.2f} | {c2[0]} {c2[1]:.2f} |"
        )
    lines.append("")
    lines.append(
        "Best step: Adam steps count first, then each Gauss-Newton step (one validation each);"
        " forwards: network forwards in distillation (training and validation)."
    )
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="gmm")
    p.add_argument("--guidance", type=float, default=1.0)
    p.add_argument("--nfe", type=lambda s: [int(v) for v in s.split(",")], default=[6, 8])
    p.add_argument("--configs", type=_configs, default=_configs("adam:400:0,gn:0:12,adam+gn:200:8"))
    p.add_argument("--train-pairs", type=int, default=520)
    p.add_argument("--val-pairs", type=int, default=256)
    p.add_argument("--test-pairs", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=24)
    p.add_argument("--gn-batch-size", type=int, default=64)
    p.add_argument("--end", default="range", choices=("auto", "range", "data"))
    p.add_argument("--tag", default="")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args()
    res = run(args)
    stem = f"optimizers_{res['model']}_g{args.guidance:g}{args.tag}"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{stem}.json").write_text(json.dumps(res, indent=1) + "\n")
    (args.out / f"{stem}.md").write_text(markdown(res))
    print(markdown(res))


if __name__ == "__main__":
    main()
