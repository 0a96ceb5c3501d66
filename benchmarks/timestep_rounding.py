"""What ComfyUI's integer timesteps cost a solver on a discrete DDPM model, and what helps.

    python benchmarks/timestep_rounding.py --model fmnist-ddpm --nfe 4,8

ComfyUI hands a discrete model's network the nearest integer timestep
(``ModelSamplingDiscrete.timestep`` is an argmin over its table of log-sigmas; with the log-SNR
linear between timesteps that is the nearest integer ``k``), while the noise level and the
scaling it applies are exact. A BNS solver learns fractional times, so there its network sees a
time up to half a timestep off. This measures, against the exact ground truth (test pairs):

- ``exact``: the solver with the network at its own times (bns, diffusers through bns);
- ``rounded``: the same solver with the network at the rounded timestep (ComfyUI);
- ``snapped``: the solver with its times moved to the nearest integer timesteps, coefficients
  kept (ComfyUI then rounds nothing);
- a solver distilled with the network at rounded timesteps (the same pairs), with the default
  Gauss-Newton steps and with Adam steps: the network's output is then piecewise constant in
  time, and its derivative in time (which both use) is zero;

for the default BNS solver and the best classical solvers (each on its best grid, chosen on
validation pairs). Writes ``benchmarks/results/timestep_rounding_<model>.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch
from quality import save
from torch import nn

import bns
from bns.classical import best_classical
from bns.evaluate import evaluate_psnr
from bns.pairs import make_pairs
from bns.schedules import DiscreteVP
from bns.solver import NSSolver
from bns.specs import load_model


class RoundedTimestep(nn.Module):
    """``net`` called at the nearest integer timestep of its flow time (what ComfyUI does)."""

    def __init__(self, net: nn.Module, schedule: DiscreteVP) -> None:
        super().__init__()
        self.net, self.schedule = net, schedule

    def forward(self, x: torch.Tensor, t: torch.Tensor, *rest: torch.Tensor) -> torch.Tensor:
        k = self.schedule.timestep(t.double()).round()
        return self.net(x, self.schedule.flow_time(k).to(t.dtype), *rest)


def rounded_model(model: bns.Model) -> bns.Model:
    return bns.Model(
        RoundedTimestep(model.net, model.schedule),
        prediction=model.prediction,
        schedule=model.schedule,
        sample_shape=model.sample_shape,
        t_range=model.t_range,
        num_classes=model.num_classes,
        name=f"{model.name}-rounded",
        dtype=model.dtype,
    )


def snapped(solver: NSSolver, schedule: DiscreteVP) -> NSSolver:
    k = schedule.timestep(solver.times).round()
    times = schedule.flow_time(k).to(torch.float64)
    return NSSolver(times, solver.a.detach(), solver.b.detach(), dict(solver.meta))


def _init_val(solver: NSSolver) -> float:
    """The validation PSNR of the solver the run started from."""
    return solver.meta["init_candidates_psnr"][solver.meta["init"]]


def _row(name: str, solver: NSSolver, model, rounded, test) -> dict:
    """Test PSNR of ``solver`` with the network at exact and at rounded timesteps, and of
    the solver with snapped times."""
    snap = snapped(solver, model.schedule)
    return {
        "solver": name,
        "exact": float(evaluate_psnr(model, solver, test).mean()),
        "rounded": float(evaluate_psnr(rounded, solver, test).mean()),
        "snapped": float(evaluate_psnr(model, snap, test).mean()),
    }


def run(args: argparse.Namespace) -> dict:
    model = load_model(args.model)
    if not isinstance(model.schedule, DiscreteVP):
        raise SystemExit(f"{args.model} has no discrete timesteps: nothing is rounded")
    rounded = rounded_model(model)
    kw = dict(seed=args.seed, progress=not args.quiet)
    out: dict = {"model": model.name, "spec": args.model, "per_nfe": {}}
    for nfe in args.nfe:
        t0 = time.perf_counter()
        solver, _ = bns.distill(model, nfe, **kw)
        end = solver.meta["end"]
        cfg = bns.DistillConfig(nfe=nfe)  # the pairs the default run used (cached)
        train = make_pairs(model, cfg.train_pairs, "train", end=end, **kw)
        val = make_pairs(model, cfg.val_pairs, "val", end=end, **kw)
        test = make_pairs(model, args.test_pairs, "test", end=end, **kw)
        aware, _ = bns.distill(rounded, nfe, pairs=(train, val), **kw)
        aware_adam, _ = bns.distill(
            rounded, nfe, pairs=(train, val), gn_steps=0, adam_steps=args.adam_steps, **kw
        )
        rows = [_row("bns", solver, model, rounded, test)]
        for how, s in (("Gauss-Newton", aware), ("Adam", aware_adam)):
            r = _row(f"bns distilled at rounded timesteps ({how})", s, model, rounded, test)
            r["val_psnr"], r["init_val_psnr"] = s.meta["val_psnr"], _init_val(s)
            rows.append(r)
        # the classical solvers that validate best, each on its best grid
        classical = best_classical(model, [nfe], val, end=end)
        ranked = sorted(classical, key=lambda c: -max(c[2].meta.get("grid_psnr", {"": 0}).values()))
        for name, _, s in ranked[: args.classical]:
            rows.append(_row(f"{name} ({s.meta.get('grid', '')})", s, model, rounded, test))
        out["per_nfe"][str(nfe)] = {"rows": rows, "seconds": time.perf_counter() - t0}
        print(json.dumps(out["per_nfe"][str(nfe)]), file=sys.stderr, flush=True)
    return out


def table(out: dict) -> str:
    lines = [
        f"Test PSNR (dB) against the exact ground truth on `{out['model']}`"
        f" ({out['test_pairs']} pairs)",
        "",
        "| NFE | solver (grid) | exact | rounded (ComfyUI) | snapped times | rounded - exact |",
        "|---|---|---|---|---|---|",
    ]
    for nfe, res in out["per_nfe"].items():
        for r in res["rows"]:
            lines.append(
                f"| {nfe} | {r['solver']} | {r['exact']:.2f} | {r['rounded']:.2f} | {r['snapped']:.2f}"
                f" | {r['rounded'] - r['exact']:+.2f} |"
            )
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="fmnist-ddpm")
    p.add_argument("--nfe", type=lambda s: [int(v) for v in s.split(",")], default=[4, 8])
    p.add_argument("--test-pairs", type=int, default=256)
    p.add_argument("--classical", type=int, default=3, help="best classical solvers shown")
    p.add_argument("--adam-steps", type=int, default=300, help="of the rounded Adam run")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args()
    out = run(args)
    out["test_pairs"] = args.test_pairs
    save(f"timestep_rounding_{out['model']}", out, table(out))


if __name__ == "__main__":
    main()
