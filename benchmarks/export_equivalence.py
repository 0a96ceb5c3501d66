"""A learned time grid, exported (``bns export``), run by diffusers' own schedulers.

    OMP_NUM_THREADS=1 python benchmarks/export_equivalence.py --out benchmarks/results

For each case a ``time``-family solver is distilled briefly on a reference model (a time grid
of a classical method, its coefficients that method's formula on the grid), exported with
:func:`bns.export.grid_export`, and run by the stock diffusers scheduler that the export names,
with the settings it lists (``set_timesteps(sigmas=...)`` or ``timesteps=...``). Both start
from the same noise (the test pairs' ``x0``) and are scored against the same ground truth
(``x1``, dopri5), as in benchmarks/diffusers_schedulers.py; the model is evaluated where the
scheduler's own ``sigmas[step]`` says (flow: ``t = 1 - sigma``; DDPM: the log-SNR of
``sigma``), and gets the output the scheduler expects (flow: ``-u``; epsilon).

- ``euler`` on the CondOT mixture: FlowMatchEulerDiscreteScheduler, ``sigmas=``.
- ``unipc2`` on the CondOT mixture: UniPCMultistepScheduler in flow mode, ``sigmas=``.
- ``dpmpp2m`` on the DDPM mixture: DPMSolverMultistepScheduler, ``timesteps=`` (diffusers
  takes integer timesteps only: the exported timesteps are rounded, so diffusers runs bns's
  DPM-Solver++(2M) on the rounded grid; that solver is measured too).

Writes ``<out>/export_equivalence.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

RESULTS = Path(__file__).parent / "results"


def _models() -> dict[str, Any]:
    from bns.models.fmnist import ddpm_schedule
    from bns.models.gmm import gaussian_mixture_model

    mix = dict(dim=16, components=4, std=0.2, seed=3)
    return {
        # t_min > 0: diffusers moves a first flow sigma of 1 to 1 - 1e-6 (and bns takes the
        # exact alpha = 0 limit there), which can flip a sample at a mode boundary
        "flow": gaussian_mixture_model(name="gmm16-flow", t_range=(1e-3, 1.0), **mix),
        "ddpm": gaussian_mixture_model(
            schedule=ddpm_schedule(), prediction="eps", name="gmm16-ddpm", **mix
        ),
    }


CASES = [("euler", "flow"), ("unipc2", "flow"), ("dpmpp2m", "ddpm")]


def make_scheduler(info: dict[str, Any]) -> Any:
    import diffusers

    d = info["diffusers"]
    return getattr(diffusers, d["scheduler"])(**d["config"])


def run_diffusers(model: Any, info: dict[str, Any], x0: torch.Tensor) -> torch.Tensor:
    """The stock scheduler of the export on ``model`` from ``x0``, as a pipeline runs it."""
    from bns.model import prediction_coefficients

    scheduler = make_scheduler(info)
    if info["model_kind"] == "flow":
        import numpy as np

        scheduler.set_timesteps(sigmas=np.array(info["diffusers_sigmas"]))
    else:
        scheduler.set_timesteps(timesteps=[round(k) for k in info["diffusers_timesteps"]])
    x = x0.to(torch.float32)
    shape = (-1,) + (1,) * (x.dim() - 1)
    schedule = model.schedule
    for i, timestep in enumerate(scheduler.timesteps):
        s = torch.as_tensor(scheduler.sigmas[i], dtype=torch.float64)
        if info["model_kind"] == "flow":
            t = (1.0 - s).reshape(())
            with torch.no_grad():
                out = -model.velocity(x, t, None, 1.0)
        else:
            t = schedule.t_from_log_snr(-torch.log(s).reshape(1)).reshape(())
            with torch.no_grad():
                u = model.velocity(x, t, None, 1.0).to(torch.float64)
            beta, gamma = prediction_coefficients("eps", schedule, t.reshape(1))
            out = (u - beta.reshape(shape) * x.to(torch.float64)) / gamma.reshape(shape)
        x = scheduler.step(out.to(x.dtype), timestep, x).prev_sample
    return x


def psnr(x: torch.Tensor, ref: torch.Tensor) -> float:
    from bns.metrics import psnr as per_sample

    return float(per_sample(x.to(torch.float64), ref.to(torch.float64)).mean())


def run_case(
    method: str, kind: str, nfe: int, steps: int, pairs: int, test_pairs: int
) -> dict[str, Any]:
    import bns
    from bns.export import grid_export
    from bns.pairs import make_pairs

    model = _models()[kind]
    kw = dict(cache=False, progress=False)
    data = (make_pairs(model, pairs, "train", **kw), make_pairs(model, pairs, "val", **kw))
    test = make_pairs(model, test_pairs, "test", **kw)
    init = f"{method}@uniform" if kind == "flow" else f"{method}@logsnr"
    solver, hist = bns.distill(
        model, nfe, family="time", init=init, adam_steps=steps, val_every=max(steps // 4, 1),
        pairs=data, progress=False, end="range",
    )  # fmt: skip
    info = grid_export(solver, model)
    x0, x1 = test.x0, test.x1
    row: dict[str, Any] = {
        "method": method,
        "model": model.name,
        "kind": kind,
        "nfe": nfe,
        "steps_run": hist["steps_run"],
        "init_val_psnr": hist["val_psnr"][0],
        "best_val_psnr": hist["best_val_psnr"],
        "scheduler": info["diffusers"]["scheduler"],
        "settings": info["diffusers"]["config"],
        "sigmas": info["diffusers_sigmas"],
    }
    x_bns = bns.sample(model, x0, solver)
    x_dif = run_diffusers(model, info, x0)
    row["psnr_bns"] = psnr(x_bns, x1)
    row["psnr_diffusers"] = psnr(x_dif, x1)
    row["psnr_bns_vs_diffusers"] = psnr(x_dif, x_bns)
    row["max_abs_diff_bns_diffusers"] = float((x_dif.double() - x_bns.double()).abs().max())
    if kind != "flow":  # diffusers' integer timesteps: bns's method on the rounded grid
        k = torch.tensor([round(v) for v in info["diffusers_timesteps"]], dtype=torch.float64)
        grid = torch.cat([1 - k / 999, solver.times[-1:]])
        rounded = bns.solvers.build(method, grid, model.schedule)
        x_r = bns.sample(model, x0, rounded)
        row["psnr_bns_rounded_grid"] = psnr(x_r, x1)
        row["psnr_bns_rounded_vs_diffusers"] = psnr(x_dif, x_r)
    return row


def markdown(res: dict[str, Any]) -> str:
    lines = [
        "# A learned time grid run by diffusers' own schedulers",
        "",
        f"`benchmarks/export_equivalence.py`, {res['machine']}, {res['seconds']:.0f} s. Each"
        f" `time`-family solver was distilled for {res['steps']} steps on {res['pairs']} + "
        f"{res['pairs']} pairs, exported with `bns export`, and run by the diffusers scheduler"
        f" the export names; PSNR (dB) against the dopri5 ground truth of {res['test_pairs']}"
        " test pairs from the same noise (mean of per-sample PSNR). *vs bns*: PSNR of diffusers'"
        " samples against bns's; *max diff*: their largest difference (diffusers runs in float32).",
        "",
        "| method | model | NFE | diffusers scheduler | PSNR bns | PSNR diffusers | vs bns |"
        " max diff | bns on rounded grid | diffusers vs it |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in res["rows"]:
        rg = r.get("psnr_bns_rounded_grid")
        rv = r.get("psnr_bns_rounded_vs_diffusers")
        lines.append(
            f"| {r['method']} | {r['model']} | {r['nfe']} | {r['scheduler']} |"
            f" {r['psnr_bns']:.3f} | {r['psnr_diffusers']:.3f} | {r['psnr_bns_vs_diffusers']:.1f} |"
            f" {r['max_abs_diff_bns_diffusers']:.1e} |"
            f" {'' if rg is None else f'{rg:.3f}'} | {'' if rv is None else f'{rv:.1f}'} |"
        )
    lines += ["", "Settings (as `bns export --format json` lists them under `diffusers`):", ""]
    for r in res["rows"]:
        lines.append(f"- {r['method']}: `{r['scheduler']}({json.dumps(r['settings'])})`")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--nfe", type=int, default=6)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--pairs", type=int, default=64)
    p.add_argument("--test-pairs", type=int, default=128)
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    rows = [run_case(m, k, args.nfe, args.steps, args.pairs, args.test_pairs) for m, k in CASES]
    res = {
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads,"
        f" torch {torch.__version__}",
        "steps": args.steps,
        "pairs": args.pairs,
        "test_pairs": args.test_pairs,
        "rows": rows,
        "seconds": time.perf_counter() - t0,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "export_equivalence.json").write_text(json.dumps(res, indent=1) + "\n")
    (args.out / "export_equivalence.md").write_text(markdown(res))
    print(markdown(res))
    return res


if __name__ == "__main__":
    main()
