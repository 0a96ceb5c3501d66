"""Half precision: what ground-truth tolerance a bfloat16 (or float16) network can resolve, and
whether BNS distilled from a bfloat16 network is as good as BNS from its float32 original.

    OMP_NUM_THREADS=1 python benchmarks/halfprec.py

On fmnist-cfg at guidance 2, on the CPU, everything against the float32 network's ground truth
at rtol = atol = 1e-5 (the reference):

(a) ground truth of the network cast to bfloat16 / float16 (``model.to(dtype=...)``) at each
    ``--tolerances`` value: dopri5 evaluations per sample (all pairs in one solve) and the PSNR
    to the reference; the float32 network at the same tolerances beside it, which separates the
    solver's tolerance from the network's rounding;
(b) BNS at NFE 8 distilled from the bfloat16 network (on its own ground truth at the default
    bfloat16 tolerance) and from the float32 network, with a small protocol, each sampled
    through either network and scored against the reference test pairs.

Writes ``benchmarks/results/halfprec_fmnist-cfg.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch
from cost import md_head, md_table

import bns
from bns.evaluate import evaluate_psnr
from bns.ground_truth import default_tolerance
from bns.metrics import psnr
from bns.pairs import make_pairs
from bns.solvers import solver_from_label
from bns.specs import load_model

RESULTS = Path(__file__).parent / "results"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
REF_TOL = 1e-5
DTYPES_B = ("float32", "bfloat16")  # the networks of part (b)


def _model(spec: str, dtype: str) -> bns.Model:
    return load_model(spec).to(dtype=DTYPES[dtype])


def _floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",")]


def _ground_truth(model: bns.Model, n: int, tol: float, guidance: float):
    """``n`` test pairs solved at rtol = atol = ``tol`` in one batch, uncached."""
    kw = dict(guidance=guidance, rtol=tol, atol=tol, batch_size=n, cache=False, progress=False)
    return make_pairs(model, n, "test", **kw)


def tolerance_rows(args, ref) -> list[dict]:
    """Part (a): each dtype's ground truth at each tolerance against the reference."""
    rows = []
    for dtype in args.dtypes.split(","):
        model = _model(args.model, dtype)
        n = args.f16_pairs if dtype == "float16" else args.tol_pairs
        for tol in args.tolerances:
            if dtype == "float32" and tol <= REF_TOL:
                continue  # the reference itself
            t = time.perf_counter()
            try:
                p = _ground_truth(model, n, tol, args.guidance)
            except (RuntimeError, FloatingPointError) as e:  # e.g. an op without this dtype
                rows.append({"dtype": dtype, "tol": tol, "error": str(e).splitlines()[0]})
                print(rows[-1], file=sys.stderr)
                break
            q = psnr(p.x1, ref.x1[:n]).double()
            rows.append(
                {
                    "dtype": dtype,
                    "tol": tol,
                    "pairs": n,
                    "nfe_per_sample": p.nfe_per_sample,
                    "psnr_mean": float(q.mean()),
                    "psnr_min": float(q.min()),
                    "seconds": time.perf_counter() - t,
                }
            )
            print(rows[-1], file=sys.stderr)
    return rows


def suggested_tolerance(rows: list[dict], dtype: str, slack_db: float) -> float | None:
    """The loosest tolerance whose mean PSNR to the reference is within ``slack_db`` of the
    best any tolerance reaches for ``dtype`` (tighter ones buy evaluations, not accuracy)."""
    ok = [r for r in rows if r["dtype"] == dtype and "psnr_mean" in r]
    if not ok:
        return None
    best = max(r["psnr_mean"] for r in ok)
    return max(r["tol"] for r in ok if r["psnr_mean"] >= best - slack_db)


def distill_rows(args, test) -> tuple[list[dict], dict]:
    """Part (b): BNS at ``args.nfe`` from each network, sampled through each network."""
    models = {d: _model(args.model, d) for d in DTYPES_B}
    solvers, info = {}, {}
    for dtype, model in models.items():
        t = time.perf_counter()
        solver, hist = bns.distill(
            model,
            args.nfe,
            guidance=args.guidance,
            end="range",  # its test pairs end on the range (make_pairs' default)
            train_pairs=args.train_pairs,
            val_pairs=args.val_pairs,
            adam_steps=args.steps,
            batch_size=args.batch_size,
            init="best",
            cache=False,
            progress=False,
        )
        solvers[f"bns ({dtype})"] = solver
        solvers[f"init {solver.meta['init']} ({dtype})"] = solver_from_label(
            model, args.nfe, solver.meta["init"], solver.meta.get("end", "range")
        )
        info[dtype] = {
            "ground_truth_tol": default_tolerance(model.dtype),
            "ground_truth_nfe_per_sample": solver.meta["ground_truth_nfe_per_sample"],
            "init": solver.meta["init"],
            "val_psnr": hist["best_val_psnr"],
            "best_step": hist["best_step"],
            "seconds": time.perf_counter() - t,
        }
        print(dtype, info[dtype], file=sys.stderr)
    rows = []
    for name, solver in solvers.items():
        row = {"solver": name}
        for dtype, model in models.items():
            p = evaluate_psnr(model, solver, test, args.guidance)
            row[f"psnr_{dtype}_net"] = float(p.mean())
            row[f"std_{dtype}_net"] = float(p.std())
        rows.append(row)
        print(row, file=sys.stderr)
    return rows, info


def _tolerance_cells(r: dict) -> list:
    if "error" in r:
        return [r["dtype"], f"{r['tol']:g}", f"failed: {r['error']}", "", "", "", ""]
    numbers = (
        ("nfe_per_sample", ".1f"),
        ("psnr_mean", ".2f"),
        ("psnr_min", ".2f"),
        ("seconds", ".1f"),
    )
    return [r["dtype"], f"{r['tol']:g}", r["pairs"]] + [format(r[k], f) for k, f in numbers]


def markdown(res: dict) -> str:
    a = res["args"]
    lines = md_head(
        f"Half precision on {a['model']} (guidance {a['guidance']:g}): ground truth and BNS",
        f"Reference: the float32 network's ground truth at rtol = atol = {REF_TOL:g} (dopri5).",
        f"Machine: {res['machine']}. Command: `{res['command']}`.",
    )
    lines += [
        "(a) Ground truth of each network dtype at each tolerance (rtol = atol), all pairs in one"
        " solve: dopri5 evaluations per sample, PSNR (dB) to the reference (mean, worst pair).",
        "",
    ]
    lines += md_table(
        ["dtype", "tolerance", "pairs", "NFE / sample", "PSNR mean", "PSNR min", "seconds"],
        [_tolerance_cells(r) for r in res["tolerances"]],
    )
    s = res["suggested"]
    lines += [
        f"Loosest tolerance within {res['slack_db']:g} dB of the best PSNR any tolerance reaches: "
        + ", ".join(f"{d} {'n/a' if v is None else f'{v:g}'}" for d, v in s.items())
        + ". Current defaults (bns.default_tolerance): "
        + ", ".join(f"{d} {v:g}" for d, v in res["defaults"].items())
        + ".",
        "",
    ]
    if res.get("distill"):
        p = res["protocol"]
        lines += [
            f"(b) BNS at NFE {a['nfe']} ({p}), sampled through each network, PSNR (dB) against"
            f" the reference on {a['test_pairs']} test pairs:",
            "",
        ]
        lines += md_table(
            ["solver", "float32 network", "bfloat16 network"],
            [
                [r["solver"]]
                + [f"{r[f'psnr_{d}_net']:.2f} ± {r[f'std_{d}_net']:.2f}" for d in DTYPES_B]
                for r in res["distill"]
            ],
        )
        for d, i in res["distill_info"].items():
            lines.append(
                f"- from {d}: ground truth at tolerance {i['ground_truth_tol']:g}"
                f" ({i['ground_truth_nfe_per_sample']:.1f} NFE / sample), init {i['init']},"
                f" validation {i['val_psnr']:.2f} dB (on its own ground truth) at step"
                f" {i['best_step']}, {i['seconds']:.0f} s"
            )
    lines.append(f"\nTotal {res['total_s']:.0f} s.")
    return "\n".join(lines) + "\n"


OPTIONS = [  # integer options: name, default, help
    ("tol-pairs", 32, "pairs per tolerance in (a)"),
    ("f16-pairs", 16, "pairs per tolerance for float16 in (a) (slow on a CPU)"),
    ("nfe", 8, "NFE of the BNS solvers in (b)"),
    ("train-pairs", 128, "training pairs in (b)"),
    ("val-pairs", 64, "validation pairs in (b)"),
    ("test-pairs", 128, "test pairs in (b)"),
    ("steps", 150, "distillation steps in (b)"),
    ("batch-size", 16, "distillation batch in (b)"),
]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="fmnist-cfg")
    p.add_argument("--guidance", type=float, default=2.0)
    p.add_argument("--dtypes", default="float32,bfloat16,float16")
    p.add_argument("--slack-db", type=float, default=1.0)
    p.add_argument("--tolerances", type=_floats, default=[1e-2, 3e-3, 1e-3, 3e-4, 1e-4, 3e-5, 1e-5])
    for name, default, text in OPTIONS:
        p.add_argument(f"--{name}", type=int, default=default, help=text)
    p.add_argument("--no-distill", action="store_true", help="part (a) only")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args()
    start = time.perf_counter()
    ref_model = _model(args.model, "float32")
    n_ref = max(args.tol_pairs, args.f16_pairs, 0 if args.no_distill else args.test_pairs)
    ref = _ground_truth(ref_model, n_ref, REF_TOL, args.guidance)
    res = {
        "args": {k: v for k, v in vars(args).items() if k != "out"},
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()}"
        f" threads, torch {torch.__version__}",
        "command": " ".join(["python", "benchmarks/halfprec.py", *sys.argv[1:]]),
        "reference": {"tol": REF_TOL, "pairs": n_ref, "nfe_per_sample": ref.nfe_per_sample},
        "defaults": {d: default_tolerance(DTYPES[d]) for d in DTYPES},
        "slack_db": args.slack_db,
    }
    res["tolerances"] = tolerance_rows(args, ref)
    res["suggested"] = {
        d: suggested_tolerance(res["tolerances"], d, args.slack_db) for d in ("bfloat16", "float16")
    }
    if not args.no_distill:
        res["protocol"] = (
            f"{args.train_pairs} train / {args.val_pairs} val pairs, {args.steps} steps, batch"
            f" {args.batch_size}, init best"
        )
        res["distill"], res["distill_info"] = distill_rows(args, ref[: args.test_pairs])
    res["total_s"] = time.perf_counter() - start
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"halfprec_{args.model}"
    clean = json.loads(json.dumps(res), parse_constant=lambda c: None)  # no NaN/inf in JSON
    (args.out / f"{stem}.json").write_text(json.dumps(clean, indent=1) + "\n")
    (args.out / f"{stem}.md").write_text(markdown(res))
    print(markdown(res))


if __name__ == "__main__":
    main()
