"""Where Gauss-Newton ends from each initial solver: is the best classical solver the best start?

    python benchmarks/starts.py --model gmm-ddpm --nfe 4,8
    python benchmarks/starts.py --model fmnist-ddpm --nfe 4

For each NFE: the default run (``--init best``: the classical solver that validates best),
then the same run started from the next best candidates of its ranking, ``--plain`` without
preconditioning and ``--preconditioned`` with, each to the end of its Gauss-Newton steps. Reports
every run's validation PSNR after its first step and at its end, and its test PSNR (256 pairs),
and a run with ``--starts K``: the library's own choice of K starts, the best one kept.
``gmm-ddpm`` is the analytic Gaussian mixture on diffusers' DDPM schedule (1000 steps, linear
beta 1e-4..0.02) with epsilon prediction. Writes ``benchmarks/results/starts_<model>.json`` and
``.md``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time

import torch
from quality import save

import bns
from bns.evaluate import evaluate_psnr
from bns.models.gmm import GaussianMixtureNet
from bns.pairs import make_pairs
from bns.schedules import DiscreteVP
from bns.solvers.ends import resolve_end
from bns.specs import load_model


def gmm_ddpm() -> bns.Model:
    """An analytic 3-component Gaussian mixture in 8 dimensions on the DDPM schedule."""
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    schedule = DiscreteVP(torch.cumprod(1 - betas, 0))
    means = 0.5 * torch.randn(3, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    net = GaussianMixtureNet(
        means, torch.full((3,), 0.2), torch.ones(3) / 3, torch.arange(3), schedule, "eps",
        sample_shape=(8,),
    )  # fmt: skip
    return bns.Model(net, "eps", schedule, (8,), name="gmm-ddpm")


def _run(model, nfe, test, init: str | None, seed: int, starts: int = 1) -> tuple[dict, dict]:
    t0 = time.perf_counter()
    kw = {"init": init} if init else {}
    solver, hist = bns.distill(model, nfe, progress=False, seed=seed, starts=starts, **kw)
    val = hist["val_psnr"]
    row = {
        "init": solver.meta["init"],
        "init_val": val[0],
        "first_step_val": val[1] if len(val) > 1 else math.nan,
        "val": solver.meta["val_psnr"],
        "test": float(evaluate_psnr(model, solver, test).mean()),
        "steps": solver.meta["steps_run"],
        "seconds": time.perf_counter() - t0,
    }
    return row, solver.meta["init_candidates_psnr"]


def run(args: argparse.Namespace) -> dict:
    model = gmm_ddpm() if args.model == "gmm-ddpm" else load_model(args.model)
    out: dict = {"model": model.name, "per_nfe": {}}
    for nfe in args.nfe:
        end = resolve_end(model, bns.DistillConfig(nfe=nfe).end)  # where the default ends
        test = make_pairs(model, args.test_pairs, "test", seed=args.seed, progress=False, end=end)
        default, scores = _run(model, nfe, test, None, args.seed)
        scores = {k: v for k, v in scores.items() if v is not None}
        ranked = [k for k in sorted(scores, key=lambda k: -scores[k]) if k != default["init"]]
        plain = [k for k in ranked if "+pc" not in k][: args.plain]
        pre = [k for k in ranked if "+pc" in k][: args.preconditioned]
        rows = [{"start": "default", **default}]
        for name in plain + pre:
            rows.append({"start": name, **_run(model, nfe, test, name, args.seed)[0]})
        if args.starts > 1:  # the library's own choice of starts (--starts K)
            row = _run(model, nfe, test, None, args.seed, args.starts)[0]
            rows.append({"start": f"--starts {args.starts}", **row})
        out["per_nfe"][str(nfe)] = {"rows": rows, "candidates_psnr": scores}
        print(json.dumps(rows), file=sys.stderr, flush=True)
    return out


def table(out: dict) -> str:
    lines = [
        f"Gauss-Newton from each start on `{out['model']}` (default settings; validation PSNR"
        f" of the start, after the first step and at the end; test PSNR on {out['test_pairs']}"
        " pairs)",
        "",
        "| NFE | start | start dB | after step 1 | end (validation) | test dB | steps | s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for nfe, res in out["per_nfe"].items():
        for r in res["rows"]:
            start = f"{r['init']} (default)" if r["start"] == "default" else r["start"]
            if r["start"].startswith("--starts"):
                start = f"{r['start']} (kept {r['init']})"
            lines.append(
                f"| {nfe} | {start} | {r['init_val']:.2f} | {r['first_step_val']:.2f} |"
                f" {r['val']:.2f} | {r['test']:.2f} | {r['steps']} | {r['seconds']:.0f} |"
            )
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="gmm-ddpm", help="gmm-ddpm or a bns model spec")
    p.add_argument("--nfe", type=lambda s: [int(v) for v in s.split(",")], default=[4, 8])
    p.add_argument("--plain", type=int, default=3, help="next best starts without preconditioning")
    p.add_argument("--preconditioned", type=int, default=2, help="best preconditioned starts")
    p.add_argument("--starts", type=int, default=3, help="also a run with --starts K (1: none)")
    p.add_argument("--test-pairs", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    out = run(args)
    out["test_pairs"] = args.test_pairs
    save(f"starts_{out['model']}", out, table(out))


if __name__ == "__main__":
    main()
