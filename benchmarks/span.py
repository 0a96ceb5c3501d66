"""Solvers for part of the path: image-to-image starts and base/refiner hand-overs, measured.

    python benchmarks/span.py --model fmnist-vp --spans 0.5:,:0.8,0.8: --nfe 4,8

For each span and NFE this runs what a user runs: ``bns distill --span`` with the default
settings, then ``bns eval`` on the solver's span, where every classical solver takes the grid
that measures best on validation pairs (``--grids all``), against ground truth on the same
span (image-to-image spans start from noised samples of the whole range, as the distillation
does). Writes ``benchmarks/results/span_<model>.json`` and ``.md``: BNS against the best
classical solver per span and NFE, with the distillation's wall time and network forwards.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import sys
import tempfile
import time
from pathlib import Path

from quality import RESULTS, machine

import bns
from bns.cli import main as bns_main


def _run(argv: list[str]) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = bns_main(argv)
    if code != 0:
        raise SystemExit(f"bns {' '.join(argv)} failed ({code})")
    return out.getvalue()


def run(args: argparse.Namespace) -> dict:
    work = Path(tempfile.mkdtemp(prefix="bns-span-"))
    common = ["--model", args.model, "--quiet"]
    if args.cache_dir:
        common += ["--cache-dir", str(args.cache_dir)]
    rows = []
    for span in args.spans:
        for nfe in args.nfe:
            path = work / f"span{span.replace(':', '_')}-nfe{nfe}.json"
            t0 = time.perf_counter()
            extra = ["--guidance", str(args.guidance)] if args.guidance != 1.0 else []
            _run(
                ["distill", *common, *extra, "--nfe", str(nfe), "--span", span, "--out", str(path)]
            )
            seconds = time.perf_counter() - t0
            solver = bns.NSSolver.load(path)
            js = work / f"eval-{path.stem}.json"
            _run(
                ["eval", *common, *extra, "--solver", str(path), "--name", "bns"]
                + ["--nfe", str(nfe), "--test-pairs", str(args.test_pairs), "--json", str(js)]
            )
            result = json.loads(js.read_text())
            found = result["rows"]
            mine = next(r for r in found if r["solver"] == "bns")
            best = max((r for r in found if r["solver"] != "bns"), key=lambda r: r["psnr_mean"])
            cost = solver.meta["cost"]
            row = {
                "span": span,
                "t_range": solver.meta["span"]["t_range"],
                "start": solver.meta["span"]["start"],
                "nfe": nfe,
                "end": solver.meta["end"],
                "bns_psnr": mine["psnr_mean"],
                "bns_psnr_std": mine["psnr_std"],
                "best_classical": best["solver"] + (f"@{best['grid']}" if best.get("grid") else ""),
                "best_classical_psnr": best["psnr_mean"],
                "gain_db": mine["psnr_mean"] - best["psnr_mean"],
                "init": solver.meta["init"],
                "distill_seconds": round(seconds, 1),
                "distill_forwards": cost["total"]["forwards"] + cost["total"]["jvps"],
                "ground_truth_nfe_per_sample": solver.meta["ground_truth_nfe_per_sample"],
            }
            rows.append(row)
            if not args.quiet:
                print(json.dumps(row), file=sys.stderr)
    return {
        "model": args.model,
        "guidance": args.guidance,
        "test_pairs": args.test_pairs,
        "rows": rows,
        "machine": machine(),
        "command": " ".join(["python", "benchmarks/span.py", *sys.argv[1:]]),
    }


def table(res: dict) -> str:
    lines = [
        f"### {res['model']}, guidance {res['guidance']:g}: solvers for part of the path"
        f" (PSNR, dB, {res['test_pairs']} test pairs on the span)",
        "",
        "| span (flow time) | starts from | NFE | BNS | best classical, measured (grid) | gain |"
        " distill time | distill evaluations (forwards + JVPs) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in res["rows"]:
        lo, hi = r["t_range"]
        fwd = f"{r['distill_forwards']:,}"
        lines.append(
            f"| [{lo:g}, {hi:g}] | {r['start']} | {r['nfe']} | {r['bns_psnr']:.2f} |"
            f" {r['best_classical']} {r['best_classical_psnr']:.2f} | {r['gain_db']:+.2f} |"
            f" {r['distill_seconds']:.0f} s | {fwd} |"
        )
    lines += ["", f"Machine: {res['machine']}. Command: `{res['command']}`.", ""]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="fmnist-vp")
    p.add_argument("--spans", type=lambda s: s.split(","), default=["0.5:", ":0.8", "0.8:"])
    p.add_argument("--nfe", type=lambda s: [int(v) for v in s.split(",")], default=[4, 8])
    p.add_argument("--guidance", type=float, default=1.0)
    p.add_argument("--test-pairs", type=int, default=256)
    p.add_argument("--cache-dir", type=Path)
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args()
    res = run(args)
    stem = f"span_{res['model']}"
    (args.out / f"{stem}.json").write_text(json.dumps(res, indent=1) + "\n")
    (args.out / f"{stem}.md").write_text(table(res))
    print(table(res))


if __name__ == "__main__":
    main()
