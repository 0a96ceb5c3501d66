"""diffusers' own schedulers on bns's reference models: PSNR vs NFE on bns's test pairs.

    python benchmarks/diffusers_schedulers.py --model fmnist-ddpm --nfe 4,6,8,10,12,16 \
        --test-pairs 256 --out benchmarks/results

Every scheduler starts from the same noise ``pairs.x0`` (the noise at ``t_min``) and is scored
against the same ground truth ``pairs.x1`` as bns's solvers (benchmarks/quality.py), so the
numbers compare directly with the classical solvers there. Each scheduler runs as a diffusers
pipeline would run it (``set_timesteps``, ``scale_model_input``, ``step``), with diffusers'
defaults except for the options named in its label; the model output it receives is the one
it expects, at the noise level it means:

- VP models (epsilon prediction): the scheduler is built on a discrete schedule of the model
  (fmnist-ddpm: diffusers' default linear betas, which are the model's own ``alphas_cumprod``
  bit for bit; a continuous VP model: the model's ``alpha_t^2`` at ``N`` flow times spaced
  evenly over its ``t_range``, see :func:`scheduler_base`). At each call the scheduler's noise
  level, ``scheduler.sigmas[step]`` (``sqrt((1 - ac) / ac)``; DDIM: ``alphas_cumprod[timestep]``),
  is turned into a log-SNR ``lam``, the model is evaluated at ``t = schedule.t_from_log_snr(lam)``
  and its velocity is converted to the epsilon prediction there.
- Flow models (CondOT, velocity): diffusers' flow convention is ``x = (1 - s) x_data + s eps``
  with ``s = 1 - t`` and ``flow_prediction = eps - x_data = -u``; the model is evaluated at
  ``t = 1 - scheduler.sigmas[step]``.

Writes ``<out>/diffusers_<model>_g<guidance>.json`` and ``.md``. Another script can load this
file by path and call :func:`run_schedulers` on its own pairs and :func:`best_per_nfe`.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import Tensor

RESULTS = Path(__file__).parent / "results"
TINY = {"model": "gmm", "test_pairs": 8, "nfe": [4]}


def machine() -> str:
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (
        f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads,"
        f" {gpu}, torch {torch.__version__}"
    )


# -- which kind of model, and the scheduler settings that describe it ----------------------------


def model_kind(model: Any) -> str:
    """``"flow"`` (CondOT with unit noise, velocity) or ``"vp"`` (variance preserving)."""
    from bns.schedules import CondOT

    schedule = model.schedule
    if isinstance(schedule, CondOT):
        if schedule.sigma0 != 1.0:
            raise ValueError(
                f"{model.name}: CondOT with sigma0 = {schedule.sigma0} is no diffusers path"
            )
        return "flow"
    t = torch.linspace(0.05, 0.95, 19, dtype=torch.float64)
    v = schedule(t)
    if not torch.allclose(v.alpha**2 + v.sigma**2, torch.ones_like(t), atol=1e-9):
        raise ValueError(
            f"{model.name}: {schedule!r} is neither CondOT nor variance preserving; a diffusers"
            " DDPM-style scheduler needs alpha^2 + sigma^2 = 1"
        )
    return "vp"


def _lam_of_ac(ac: Tensor) -> Tensor:
    ac = ac.to(torch.float64)
    return 0.5 * (torch.log(ac) - torch.log1p(-ac))


def scheduler_base(
    model: Any, vp_discretization: str = "sampled", num_train_timesteps: int = 1000
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The config keys that put a diffusers scheduler on ``model``'s schedule, and a description.

    - flow: nothing (diffusers' flow sigmas are CondOT's ``1 - t``).
    - :class:`~bns.schedules.DiscreteVP`: diffusers' default (linear betas 1e-4..0.02) when its
      ``alphas_cumprod`` equal the model's exactly, else ``trained_betas`` of the model's.
    - another VP schedule, ``vp_discretization="sampled"``: ``alphas_cumprod[k] = alpha(t_k)^2``
      at ``t_k = t_max - k (t_max - t_min) / (N - 1)``, so that timestep ``N - 1`` is the
      model's ``t_min`` (where the ground truth starts) and timestep 0 its ``t_max``;
      ``"linear"``: diffusers' linear betas ``beta_min / N .. beta_max / N`` of a
      :class:`~bns.schedules.VP` (which approximate it, not exactly: see the description).
    """
    from bns.schedules import VP, DiscreteVP

    schedule = model.schedule
    if model_kind(model) == "flow":
        return {}, {"kind": "flow", "mapping": "t = 1 - sigma, flow_prediction = -velocity"}
    n = num_train_timesteps
    if isinstance(schedule, DiscreteVP):
        n = schedule.num_train_timesteps
        ac = schedule.alphas_cumprod
        default = torch.cumprod(1.0 - torch.linspace(1e-4, 0.02, 1000, dtype=torch.float32), 0)
        if n == 1000 and torch.equal(ac, default.to(torch.float64)):
            base: dict[str, Any] = {}
            how = "diffusers' default linear betas 1e-4..0.02 (equal to the model's alphas_cumprod)"
        else:
            base = {"num_train_timesteps": n, "trained_betas": _betas(ac)}
            how = "trained_betas of the model's own alphas_cumprod"
    elif vp_discretization == "sampled":
        t0, t1 = model.t_range
        t = t1 - torch.arange(n, dtype=torch.float64) * ((t1 - t0) / (n - 1))
        ac = torch.sigmoid(2 * schedule.log_snr(t))
        base = {"num_train_timesteps": n, "trained_betas": _betas(ac)}
        how = (
            f"alphas_cumprod[k] = alpha(t_k)^2 of the model at t_k = t_max - k (t_max - t_min)/{n - 1}"
            " (trained_betas)"
        )
    elif vp_discretization == "linear":
        if not isinstance(schedule, VP):
            raise ValueError(f"--vp-discretization linear needs a VP schedule, got {schedule!r}")
        start, end = schedule.beta_min / n, schedule.beta_max / n
        base = {"num_train_timesteps": n, "beta_start": start, "beta_end": end}
        ac = torch.cumprod(1.0 - torch.linspace(start, end, n, dtype=torch.float32), 0)
        how = f"linear betas beta_min/N .. beta_max/N = {start:g}..{end:g}, N = {n}"
    else:
        raise ValueError(f"vp_discretization must be sampled or linear, got {vp_discretization!r}")
    ac = torch.as_tensor(ac, dtype=torch.float32).to(torch.float64)  # diffusers holds float32
    lam = _lam_of_ac(ac)
    t0, t1 = (torch.tensor(v, dtype=torch.float64) for v in model.t_range)
    info = {
        "kind": "vp",
        "discretization": how,
        "mapping": "lam = -log(scheduler sigma) (DDIM: log-SNR of alphas_cumprod[timestep]),"
        " t = schedule.t_from_log_snr(lam), eps = (u - beta x) / gamma",
        "num_train_timesteps": int(lam.numel()),
        "scheduler_log_snr_at_noise_end": float(lam[-1]),
        "model_log_snr_at_t_min": float(schedule.log_snr(t0)),
        "scheduler_log_snr_at_timestep_0": float(lam[0]),
        "model_log_snr_at_t_max": float(schedule.log_snr(t1)),
    }
    if isinstance(schedule, VP):
        # How far diffusers' linear betas (the usual stand-in) are from this continuous schedule.
        lin = torch.cumprod(
            1.0 - torch.linspace(schedule.beta_min / n, schedule.beta_max / n, n), 0
        ).to(torch.float64)
        s = (torch.arange(n, dtype=torch.float64) + 1) / n
        info["linear_betas_max_abs_log_snr_error"] = float(
            (_lam_of_ac(lin) - schedule.log_snr(1 - s)).abs().max()
        )
    return base, info


def _betas(ac: Tensor) -> list[float]:
    ac = torch.as_tensor(ac, dtype=torch.float64)
    prev = torch.cat([torch.ones(1, dtype=torch.float64), ac[:-1]])
    return [float(b) for b in 1.0 - ac / prev]


# -- the scheduler configurations ------------------------------------------------------------


class SchedulerConfig(NamedTuple):
    """One diffusers scheduler class and the options it is run with (beyond the model's base).

    (A NamedTuple, not a dataclass, so that the module also loads by path without being
    registered in ``sys.modules``.)
    """

    label: str
    cls: str
    options: dict[str, Any] = {}  # never mutated


def _multistep_configs(base: dict[str, Any]) -> list[SchedulerConfig]:
    """DPM-Solver++ and UniPC (orders 2 and 3, default and Karras sigmas, both final sigmas),
    then DEIS (orders 2 and 3, default and Karras sigmas), each on ``base`` options."""
    finals = ("zero", "sigma_min")
    out = []
    for cls, short, extra in (
        ("DPMSolverMultistepScheduler", "DPM++", {"algorithm_type": "dpmsolver++"}),
        ("UniPCMultistepScheduler", "UniPC", {}),
    ):
        for order in (2, 3):
            for karras in (False, True):
                for final in finals:
                    opts = {**base, **extra, "solver_order": order, "final_sigmas_type": final}
                    if karras:
                        opts["use_karras_sigmas"] = True
                    tag = f"{short} {order}M" + (" karras" if karras else "")
                    out.append(SchedulerConfig(f"{tag} final={final}", cls, opts))
    for order in (2, 3):
        for karras in (False, True):
            opts = {**base, "solver_order": order}
            if karras:
                opts["use_karras_sigmas"] = True
            label = f"DEIS {order}M" + (" karras" if karras else "")
            out.append(SchedulerConfig(label, "DEISMultistepScheduler", opts))
    return out


def scheduler_configs(kind: str) -> list[SchedulerConfig]:
    """Every configuration run on a model of ``kind`` ("vp" or "flow"), in table order."""
    if kind == "vp":
        return [
            SchedulerConfig("DDIM", "DDIMScheduler"),
            SchedulerConfig("DDIM clip_sample=False", "DDIMScheduler", {"clip_sample": False}),
            SchedulerConfig(
                "DDIM trailing clip_sample=False",
                "DDIMScheduler",
                {"clip_sample": False, "timestep_spacing": "trailing"},
            ),
            *_multistep_configs({}),
        ]
    if kind != "flow":
        raise ValueError(f"kind must be vp or flow, got {kind!r}")
    flow = {"use_flow_sigmas": True, "prediction_type": "flow_prediction", "flow_shift": 1.0}
    return [
        SchedulerConfig("FlowMatchEuler", "FlowMatchEulerDiscreteScheduler", {"shift": 1.0}),
        SchedulerConfig(
            "FlowMatchEuler karras",
            "FlowMatchEulerDiscreteScheduler",
            {"shift": 1.0, "use_karras_sigmas": True},
        ),
        *_multistep_configs(flow),
    ]


def make_scheduler(config: SchedulerConfig, base: dict[str, Any]) -> Any:
    import diffusers

    cls = getattr(diffusers, config.cls)
    # FlowMatch schedulers take no DDPM betas; flow bases are empty anyway.
    return cls(**{**base, **config.options})


# -- the sampling loop ----------------------------------------------------------------------


class SkipConfig(Exception):
    """A configuration that cannot run meaningfully on this model (recorded, not raised)."""


def _check_noise_levels(scheduler: Any, kind: str) -> None:
    sigmas = getattr(scheduler, "sigmas", None)
    if kind == "flow" and sigmas is not None:
        s = torch.as_tensor(sigmas, dtype=torch.float64)
        if float(s.max()) > 1.0 + 1e-6:
            raise SkipConfig(
                f"{type(scheduler).__name__} with these options sets VP sigmas (up to"
                f" {float(s.max()):.3g}) and then reads them as flow sigmas: the options do not"
                " combine in diffusers (use_karras_sigmas takes precedence over use_flow_sigmas)"
            )


def _noise_lam(scheduler: Any, i: int, timestep: Tensor) -> Tensor:
    """The log-SNR the scheduler means at call ``i`` (VP)."""
    sigmas = getattr(scheduler, "sigmas", None)
    if sigmas is None:  # DDIM: the noise level is alphas_cumprod at the (integer) timestep
        ac = scheduler.alphas_cumprod[int(timestep)]
        return _lam_of_ac(torch.as_tensor(ac)).reshape(1)
    return -torch.log(torch.as_tensor(sigmas[i], dtype=torch.float64)).reshape(1)


def sample(
    model: Any,
    scheduler: Any,
    x0: Tensor,
    nfe: int,
    y: Tensor | None,
    guidance: float,
    kind: str,
    record: dict[str, Any] | None = None,
) -> Tensor:
    """Run ``scheduler`` for ``nfe`` inference steps from the noise ``x0``; the final sample.

    ``record`` (optional) receives ``calls`` (model evaluations), ``t_eval`` (the flow times
    evaluated), ``lam_gap`` (the largest log-SNR the model could not match, where the
    scheduler's noise level lies outside the model's schedule) and ``index_offsets`` (the
    scheduler's step_index minus the call's position, where they differ).
    """
    from bns.model import prediction_coefficients

    scheduler.set_timesteps(nfe)
    _check_noise_levels(scheduler, kind)
    schedule = model.schedule
    x = x0 * float(getattr(scheduler, "init_noise_sigma", 1.0))
    calls, t_eval, gap, offsets = 0, [], 0.0, set()
    shape = (-1,) + (1,) * (x.dim() - 1)
    for i, timestep in enumerate(scheduler.timesteps):
        # The noise level is the scheduler's own sigmas[step_index]; step() sets step_index at
        # its first call, so set it here first (the same call step() makes). diffusers picks
        # the second of duplicated first timesteps (rounded karras timesteps): then the index
        # is ahead of the loop's count, and the sigma it uses is the one to evaluate at.
        if getattr(scheduler, "step_index", 0) is None and hasattr(scheduler, "_init_step_index"):
            scheduler._init_step_index(timestep)
        index = getattr(scheduler, "step_index", None)
        index = i if index is None else int(index)
        if index != i:
            offsets.add(index - i)
        x_in = (
            scheduler.scale_model_input(x, timestep)
            if hasattr(scheduler, "scale_model_input")
            else x
        )
        if kind == "flow":
            s = torch.as_tensor(scheduler.sigmas[index], dtype=torch.float64)
            t = (1.0 - s).reshape(())
            with torch.no_grad():
                u = model.velocity(x_in, t, y, guidance)
            out = (-u).to(x.dtype)
        else:
            lam = _noise_lam(scheduler, index, timestep)
            t = schedule.t_from_log_snr(lam).reshape(())
            gap = max(gap, abs(float(schedule.log_snr(t.reshape(1))[0] - lam[0])))
            with torch.no_grad():
                u = model.velocity(x_in, t, y, guidance).to(torch.float64)
            beta, gamma = prediction_coefficients("eps", schedule, t.reshape(1))
            eps = (u - beta.reshape(shape) * x_in.to(torch.float64)) / gamma.reshape(shape)
            out = eps.to(x.dtype)
        calls += 1
        t_eval.append(float(t))
        x = scheduler.step(out, timestep, x).prev_sample
    if record is not None:
        record.update(calls=calls, t_eval=t_eval, lam_gap=gap, index_offsets=sorted(offsets))
    return x


def _stats(v: Tensor) -> dict[str, float | None]:
    v = v.to(torch.float64)

    def clean(z: Tensor) -> float | None:
        z = float(z)
        return z if math.isfinite(z) else None

    return {
        "psnr_mean": clean(v.mean()),
        "psnr_std": clean(v.std()) if v.numel() > 1 else 0.0,
        "psnr_median": clean(v.median()),
    }


def run_schedulers(
    model: Any,
    pairs: Any,
    nfes: Iterable[int],
    guidance: float = 1.0,
    batch_size: int = 256,
    configs: Sequence[SchedulerConfig] | Callable[[SchedulerConfig], bool] | None = None,
    vp_discretization: str = "sampled",
    skipped: list[dict[str, Any]] | None = None,
    progress: bool = False,
) -> list[dict]:
    """PSNR of every diffusers scheduler configuration at every NFE on ``pairs``.

    ``configs``: the configurations (default :func:`scheduler_configs` of the model's kind) or
    a predicate that selects among them. A configuration that raises in diffusers is left out
    of the rows and appended to ``skipped`` (``scheduler``, ``class``, ``nfe``, ``error``).
    Each row holds ``scheduler`` (the label), ``class``, ``config`` (the options on top of the
    base schedule), ``nfe`` (num_inference_steps), ``calls`` (model evaluations per sample,
    counted), ``psnr_mean``, ``psnr_std``, ``psnr_median`` (dB, ``None`` if not finite) and
    what :func:`sample` records: ``t_eval``, ``lam_gap``, ``index_offsets``.
    """
    from bns.metrics import psnr

    kind = model_kind(model)
    base, _ = scheduler_base(model, vp_discretization)
    if configs is None or callable(configs):
        chosen = [c for c in scheduler_configs(kind) if configs is None or configs(c)]
    else:
        chosen = list(configs)
    skipped = skipped if skipped is not None else []
    x0_all, x1_all = pairs.x0, pairs.x1
    y_all = pairs.y
    rows = []
    for config in chosen:
        for nfe in nfes:
            t_start = time.perf_counter()
            scores, record = [], {}
            try:
                for lo in range(0, x0_all.shape[0], batch_size):
                    hi = min(lo + batch_size, x0_all.shape[0])
                    y = None if y_all is None else y_all[lo:hi]
                    scheduler = make_scheduler(config, base)
                    x = sample(
                        model, scheduler, x0_all[lo:hi].float(), nfe, y, guidance, kind, record
                    )
                    scores.append(psnr(x.float(), x1_all[lo:hi].float(), 2.0))
            except Exception as e:  # noqa: BLE001 - diffusers' own errors are data here
                reason = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                skipped.append(
                    {"scheduler": config.label, "class": config.cls, "nfe": nfe, "error": reason}
                )
                if progress:
                    print(f"skipped {config.label} nfe {nfe}: {reason}", file=sys.stderr)
                continue
            row = {
                "scheduler": config.label,
                "class": config.cls,
                "config": dict(config.options),
                "nfe": int(nfe),
                "calls": record["calls"],
                **_stats(torch.cat(scores)),
                "t_eval": [round(t, 6) for t in record["t_eval"]],
                "lam_gap": record["lam_gap"],
                "index_offsets": record["index_offsets"],
                "seconds": round(time.perf_counter() - t_start, 2),
            }
            rows.append(row)
            if progress:
                print(
                    f"{config.label:36s} nfe {nfe:3d} calls {row['calls']:3d}:"
                    f" {row['psnr_mean']} dB",
                    file=sys.stderr,
                )
    return rows


def best_per_nfe(rows: Iterable[dict]) -> dict[int, dict[str, Any]]:
    """The row with the highest mean PSNR at each NFE (rows with no finite mean are ignored)."""
    best: dict[int, dict[str, Any]] = {}
    for r in rows:
        if r.get("psnr_mean") is None:
            continue
        n = r["nfe"]
        if n not in best or r["psnr_mean"] > best[n]["psnr_mean"]:
            best[n] = r
    return {
        n: {
            k: best[n][k]
            for k in ("scheduler", "class", "config", "psnr_mean", "psnr_std", "psnr_median")
        }
        for n in sorted(best)
    }


# -- report ---------------------------------------------------------------------------------


def markdown(res: dict[str, Any]) -> str:
    rows, nfes = res["rows"], res["protocol"]["nfe"]
    labels: list[str] = []
    for r in rows:
        if r["scheduler"] not in labels:
            labels.append(r["scheduler"])
    cell = {(r["scheduler"], r["nfe"]): r for r in rows}
    p = res["protocol"]
    lines = [
        f"### diffusers schedulers on {res['model']}, guidance {res['guidance']:g}:"
        f" PSNR (dB) vs bns ground truth, {p['test_pairs']} test pairs",
        "",
        "| scheduler | " + " | ".join(f"NFE {n}" for n in nfes) + " |",
        "|---|" + "---|" * len(nfes),
    ]

    def fmt(r: dict | None) -> str:
        if r is None:
            return "skipped"
        if r["psnr_mean"] is None:
            return "nan"
        flag = "" if r["calls"] == r["nfe"] else f" ({r['calls']} calls)"
        return f"{r['psnr_mean']:.2f} ± {r['psnr_std']:.2f}{flag}"

    for label in labels:
        lines.append(f"| {label} | " + " | ".join(fmt(cell.get((label, n))) for n in nfes) + " |")
    best = res["best"]
    lines.append(
        "| *diffusers' best* | "
        + " | ".join(
            f"{best[str(n)]['scheduler']} {best[str(n)]['psnr_mean']:.2f}" if str(n) in best else ""
            for n in nfes
        )
        + " |"
    )
    lines += ["", "Configurations (options on top of the base schedule):", ""]
    seen = set()
    for r in rows:
        if r["scheduler"] not in seen:
            seen.add(r["scheduler"])
            lines.append(f"- {r['scheduler']}: `{r['class']}({json.dumps(r['config'])[1:-1]})`")
    if res["skipped"]:
        lines += ["", "Skipped (diffusers raised, or the options do not combine):", ""]
        grouped: dict[tuple[str, str], list[int]] = {}
        for s in res["skipped"]:
            grouped.setdefault((s["scheduler"], s["error"]), []).append(s["nfe"])
        for (label, error), skipped_nfes in grouped.items():
            lines.append(f"- {label} (NFE {', '.join(map(str, skipped_nfes))}): {error}")
    lines += [
        "",
        "NFE is num_inference_steps; every run made exactly that many model calls (counted)"
        " unless a cell says otherwise. Cells: mean ± std over the test pairs; nan: the"
        " scheduler's samples were not finite.",
        f"Schedule: {json.dumps(res['schedule'])}.",
        f"Notes: {res['notes']}",
        f"Machine: {res['machine']}. Command: `{res['command']}`. diffusers {res['diffusers_version']}.",
        f"Protocol: {json.dumps(p)}.",
    ]
    return "\n".join(lines) + "\n"


NOTES = {
    "vp": (
        "Every scheduler starts from the ground truth's noise x0 (the noise at t_min) and is scored"
        " against x1 = the model's data prediction at t_max after the adaptive ODE solution (end"
        " 'data'). DDIM's default timestep_spacing 'leading' first evaluates timestep"
        " (nfe - 1) * (1000 // nfe) (not 999), so it starts from noise at a lower noise level than the"
        " ground truth; 'trailing' starts at 999. DDIM's default clip_sample=True clips the data"
        " prediction to [-1, 1]. final=sigma_min (and DEIS's default final step) ends at the noise"
        " level of timestep 0, with that noise left in the sample; final=zero ends on the data"
        " prediction. DEIS with karras sigmas repeats the last sigma: its last step is empty (one"
        " of the NFE model calls is wasted). From 15 steps on, lower_order_final no longer lowers"
        " the order of a final step to sigma_min: DPM++ then takes a high-order last step, and"
        " with karras sigmas (whose last sigma already is sigma_min) a step of length zero, which"
        " the 3M update divides by (nan: the samples are not finite)."
    ),
    "flow": (
        "Every scheduler starts from the ground truth's noise x0 (t = 0, sigma = 1) and is scored"
        " against the adaptive ODE solution at t = 1. The multistep schedulers' flow sigmas start"
        " at 1 - 1/N_train (DPM++, DEIS: sigma 0.999) or 1 - 1e-6 (UniPC), not at 1. final=sigma_min"
        " ends at sigma sqrt((1 - ac0)/ac0) = 0.01 of diffusers' default DDPM betas (DPM++) or at"
        " the last flow sigma (UniPC), as does DEIS always: noise is left in the sample."
        " DPM++ / DEIS with karras sigmas ignore use_flow_sigmas (skipped); UniPC maps the karras"
        " sigmas of its DDPM betas to flow sigmas s / (1 + s), which start at 0.9937, not 1."
        " FlowMatchEuler's default sigmas are linspace(1, 1/1000, nfe) and then 0: its last step"
        " (from sigma 0.001) is almost empty; with karras sigmas (rho 7 between 1 and 0.001) its"
        " first step is very long."
    ),
}


def run(args: argparse.Namespace) -> dict[str, Any]:
    import diffusers

    import bns
    from bns.pairs import make_pairs
    from bns.schedules import VP
    from bns.solvers.ends import resolve_end
    from bns.specs import load_model

    model = load_model(args.model)
    end = resolve_end(model, args.end)
    t0 = time.perf_counter()
    pairs = make_pairs(
        model,
        args.test_pairs,
        "test",
        seed=args.seed,
        guidance=args.guidance,
        end=end,
        progress=not args.quiet,
    )
    t_gt = time.perf_counter() - t0
    skipped: list[dict[str, Any]] = []
    _, schedule_info = scheduler_base(model, args.vp_discretization)
    rows = run_schedulers(
        model,
        pairs,
        args.nfe,
        args.guidance,
        batch_size=args.batch_size,
        vp_discretization=args.vp_discretization,
        skipped=skipped,
        progress=not args.quiet,
    )
    kind = model_kind(model)
    return {
        "rows": rows,
        "best": {str(n): r for n, r in best_per_nfe(rows).items()},
        "skipped": skipped,
        "model": model.name,
        "guidance": args.guidance,
        "protocol": {
            "test_pairs": len(pairs),
            "seed": args.seed,
            "end": end,
            "nfe": args.nfe,
            "batch_size": args.batch_size,
            "vp_discretization": args.vp_discretization if isinstance(model.schedule, VP) else None,
        },
        "schedule": schedule_info,
        "notes": NOTES[kind],
        "ground_truth": {"seconds": round(t_gt, 1), "nfe_per_sample": pairs.nfe_per_sample},
        "machine": machine(),
        "command": " ".join(["python", "benchmarks/diffusers_schedulers.py", *sys.argv[1:]]),
        "diffusers_version": diffusers.__version__,
        "bns_version": bns.__version__,
    }


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=None, help="default fmnist-ddpm (gmm with --tiny)")
    p.add_argument("--guidance", type=float, default=1.0)
    p.add_argument("--nfe", type=lambda s: [int(v) for v in s.split(",")], default=None)
    p.add_argument("--test-pairs", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--end", default="auto", choices=("auto", "range", "data"))
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument(
        "--vp-discretization",
        default="sampled",
        choices=("sampled", "linear"),
        help="discrete schedule of a continuous VP model (see scheduler_base)",
    )
    p.add_argument("--tag", default="", help="suffix of the results files")
    p.add_argument("--tiny", action="store_true", help=f"a few seconds: {TINY}")
    p.add_argument("--out", type=Path, default=RESULTS, help="results folder")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    defaults = (
        TINY
        if args.tiny
        else {"model": "fmnist-ddpm", "test_pairs": 256, "nfe": [4, 6, 8, 10, 12, 16]}
    )
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    res = run(args)
    from bns.report import write_results

    stem = f"diffusers_{res['model']}_g{args.guidance:g}{args.tag}"
    args.out.mkdir(parents=True, exist_ok=True)
    write_results(
        res["rows"], args.out / f"{stem}.json", {k: v for k, v in res.items() if k != "rows"}
    )
    text = markdown(res)
    (args.out / f"{stem}.md").write_text(text)
    if not args.quiet:
        print(text)
    return res


if __name__ == "__main__":
    main()
