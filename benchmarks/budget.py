"""Quality against a budget: ``--budget`` at 1/16, 1/8, 1/4 and 1/2 of the previous default.

    python benchmarks/budget.py --model fmnist-cfg --guidance 2 --nfe 8

The reference is the previous default run (520 train / 1024 validation pairs, ranking on 256,
12 Gauss-Newton steps of 64): its network evaluations (forwards + JVPs, ground truth included,
cold cache) are predicted by the estimator and a fraction of them is given as ``budget``. Each
budgeted run starts from a fresh cache (its ground truth is part of what it spends) and is
tested on the same held-out pairs. The best classical solver at the NFE is the floor a budget
must beat. Writes ``benchmarks/results/budget_<model>.json`` / ``.md`` and, with every model
run so far, the chart ``budget.png``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from quality import RESULTS, machine
from time_to_solver import PREVIOUS

import bns
from bns.estimate import estimate_cost
from bns.evaluate import baseline_solvers, best_rows, evaluate, evaluate_psnr
from bns.pairs import make_pairs
from bns.solvers.ends import resolve_end
from bns.specs import load_model

FRACTIONS = (1 / 16, 1 / 8, 1 / 4, 1 / 2)


def run(args) -> dict:
    model = load_model(args.model)
    end = resolve_end(model, "auto")
    kw = dict(guidance=args.guidance)
    test = make_pairs(
        model, args.test_pairs, "test", end=end, cache=args.cache, progress=False, **kw
    )
    with tempfile.TemporaryDirectory() as cache:
        ref = estimate_cost(model, args.nfe, cache=cache, **PREVIOUS, **kw)
    full = ref.total.forwards + ref.total.jvps
    rows = []
    for frac in FRACTIONS:
        budget = str(round(full * frac))
        with tempfile.TemporaryDirectory() as cache:
            solver, hist = bns.distill(
                model, args.nfe, cache=cache, progress=False, budget=budget, **kw
            )
        c = solver.meta["cost"]["total"]
        rows.append(
            {
                "fraction": frac,
                "budget": int(budget),
                "spent": c["forwards"] + c["jvps"],
                "seconds": c["seconds"],
                "settings": {
                    k: solver.meta["config"][k]
                    for k in ("train_pairs", "val_pairs", "init_pairs", "gn_batch_size", "gn_steps")
                },
                "steps_run": hist["steps_run"],
                "stopped_by_budget": hist["stopped_by_budget"],
                "init": solver.meta["init"],
                "test_psnr": float(evaluate_psnr(model, solver, test, args.guidance).mean()),
            }
        )
        r = rows[-1]
        print(
            f"{args.model} 1/{round(1 / frac)}: {r['spent']:,} of {r['budget']:,},"
            f" {r['test_psnr']:.2f} dB, {r['seconds']:.0f} s",
            flush=True,
        )
    classical = evaluate(
        model, baseline_solvers(model, [args.nfe], end=end), test, args.guidance, progress=False
    )
    best = best_rows(classical)[args.nfe]
    return {
        "model": args.model,
        "guidance": args.guidance,
        "nfe": args.nfe,
        "machine": machine(),
        "command": "python benchmarks/budget.py " + " ".join(sys.argv[1:]),
        "previous_default_evaluations": full,
        "best_classical": {"solver": best["solver"], "psnr": best["psnr_mean"]},
        "rows": rows,
    }


def _previous_default_psnr(model: str, nfe: int) -> float | None:
    path = RESULTS / f"time_to_solver_{model}_ablations.json"
    if not path.exists():
        return None
    runs = json.loads(path.read_text())["runs"]
    rows = [r for r in runs if r["config"] == "previous" and r["nfe"] == nfe]
    return rows[0]["test_psnr"] if rows else None


def chart(path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2), dpi=120)
    for f in sorted(RESULTS.glob("budget_*.json")):
        res = json.loads(f.read_text())
        xs = [r["fraction"] for r in res["rows"]]
        (line,) = ax.plot(
            xs,
            [r["test_psnr"] for r in res["rows"]],
            marker="o",
            label=f"{res['model']} (g {res['guidance']:g})",
        )
        ax.axhline(res["best_classical"]["psnr"], color=line.get_color(), ls=":", lw=1)
        prev = _previous_default_psnr(res["model"], res["nfe"])
        if prev is not None:  # the whole previous default, measured by time_to_solver.py
            ax.plot([1.0], [prev], marker="s", mfc="none", color=line.get_color())
    ax.set_xscale("log", base=2)
    ax.set_xticks([*FRACTIONS, 1.0], ["1/16", "1/8", "1/4", "1/2", "1 (previous\ndefault)"])
    ax.set_xlabel("--budget, as a fraction of the previous default's evaluations")
    ax.set_ylabel("test PSNR at NFE 8 (dB)")
    ax.set_title(
        "Quality for a budget (squares: the previous default; dotted: best classical)", fontsize=9
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="gmm")
    ap.add_argument("--guidance", type=float, default=1.0)
    ap.add_argument("--nfe", type=int, default=8)
    ap.add_argument("--test-pairs", type=int, default=256)
    ap.add_argument("--cache", default="/tmp/bns-bench-cache")
    args = ap.parse_args()
    res = run(args)
    out = RESULTS / f"budget_{args.model}"
    out.with_suffix(".json").write_text(json.dumps(res, indent=1))
    L = [
        f"### Quality for a budget: {args.model} (guidance {args.guidance:g}), NFE {args.nfe}",
        "",
        f"Machine: {res['machine']}. Command: `{res['command']}`. Previous default:"
        f" {res['previous_default_evaluations']:,} network evaluations (estimated, cold cache)."
        f" Best classical at NFE {args.nfe}: {res['best_classical']['solver']}"
        f" {res['best_classical']['psnr']:.2f} dB.",
        "",
        "| budget | evaluations | spent | s | train / val / ranking pairs, GN batch x steps |"
        " steps run | init | test dB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in res["rows"]:
        s = r["settings"]
        L.append(
            f"| 1/{round(1 / r['fraction'])} | {r['budget']:,} | {r['spent']:,} |"
            f" {r['seconds']:.0f} | {s['train_pairs']} / {s['val_pairs']} / {s['init_pairs']},"
            f" {s['gn_batch_size']} x {s['gn_steps']} | {r['steps_run']}"
            f"{' (budget)' if r['stopped_by_budget'] else ''} | {r['init']} |"
            f" {r['test_psnr']:.2f} |"
        )
    out.with_suffix(".md").write_text("\n".join(L) + "\n")
    chart(RESULTS / "budget.png")


if __name__ == "__main__":
    if sys.argv[1:] == ["--chart"]:  # only redraw the chart from the files
        chart(RESULTS / "budget.png")
    else:
        main()
