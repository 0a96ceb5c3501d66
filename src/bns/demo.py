"""``bns demo``: the main job on the embedded default model, end to end, with a report folder.

Ground-truth pairs (cached), a BNS solver distilled at one NFE with the library's defaults,
every classical solver at NFE 4, 8 and 16 on held-out test pairs, and a folder with the table,
the plot, the sample grid and the solver. The first run, ground truth included, takes between two and
three minutes on a 2-core CPU; the README states its sizes and measured time.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

__all__ = ["run_demo", "DemoSizes", "FULL", "QUICK"]


@dataclass(frozen=True)
class DemoSizes:
    train_pairs: int
    val_pairs: int
    test_pairs: int
    adam_steps: int | None  # None: the default optimizer (Gauss-Newton steps where possible)
    batch_size: int
    val_every: int
    nfes: tuple[int, ...]


FULL = DemoSizes(
    train_pairs=128,  # the library's defaults (DistillConfig)
    val_pairs=128,
    test_pairs=256,
    adam_steps=None,
    batch_size=40,
    val_every=25,
    nfes=(4, 8, 16),
)
QUICK = DemoSizes(
    train_pairs=16, val_pairs=8, test_pairs=16, adam_steps=4, batch_size=8, val_every=2, nfes=(4, 8)
)


def run_demo(
    out: Path,
    model_spec: str = "fmnist-cfg",
    guidance: float = 2.0,
    nfe: int = 8,
    quick: bool = False,
    cache: Any = True,
    progress: bool = True,
    sizes: DemoSizes | None = None,
    device: Any = None,
) -> dict[str, Any]:
    """Run the demo and write ``out/``: results.json, results.md, psnr_vs_nfe.png, samples.png
    and the solver ``bns_nfe{nfe}.json``. Returns the results payload."""
    from .classical import best_classical
    from .evaluate import best_rows, evaluate
    from .pairs import make_pairs
    from .report import comparison_grid, markdown_table, plot_psnr_vs_nfe, write_results
    from .solvers import solver_from_label
    from .solvers.ends import resolve_end
    from .specs import load_model
    from .train import distill

    sz = sizes or (QUICK if quick else FULL)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    model = load_model(model_spec).to(device)
    say = print if progress else (lambda *a, **k: None)
    say(f"bns demo: {model.name} (guidance {guidance:g}), BNS at NFE {nfe}; report in {out}/")

    end = resolve_end(model, "auto")  # on the data where the model stops short of it
    kw = dict(seed=0, guidance=guidance, cache=cache, progress=progress, end=end)
    t0 = time.perf_counter()
    train = make_pairs(model, sz.train_pairs, "train", **kw)
    val = make_pairs(model, sz.val_pairs, "val", **kw)
    test = make_pairs(model, sz.test_pairs, "test", **kw)
    t_gt = time.perf_counter() - t0
    say(
        f"  ground truth: {sz.train_pairs}/{sz.val_pairs}/{sz.test_pairs} train/val/test pairs,"
        f" {train.nfe_per_sample:.0f} NFE per sample (dopri5), {t_gt:.1f} s"
    )

    solver_path = out / f"bns_nfe{nfe}.json"
    settings = {
        "train_pairs": sz.train_pairs,
        "val_pairs": sz.val_pairs,
        "adam_steps": sz.adam_steps,
        "batch_size": sz.batch_size,
        "val_every": sz.val_every,
        "end": end,
    }
    solver = _reusable(solver_path, model, guidance, settings)
    t0 = time.perf_counter()
    if solver is None:
        solver, _ = distill(
            model, nfe, guidance=guidance, pairs=(train, val), progress=progress, **settings
        )
        solver.save(solver_path)
        say(
            f"  distilled: validation PSNR {solver.meta['val_psnr']:.2f} dB, best step"
            f" {solver.meta['best_step']} of {solver.meta['steps_run']},"
            f" {time.perf_counter() - t0:.1f} s -> {solver_path}"
        )
        from .cost import Ledger

        cost = {k: v for k, v in solver.meta["cost"].items() if k != "total"}
        say(Ledger.from_dict(cost).table("  distillation cost (ground truth above)"))
    else:
        say(f"  reusing the solver in {solver_path} (same model and settings)")
    t_distill = time.perf_counter() - t0

    t0 = time.perf_counter()
    init = solver_from_label(model, nfe, solver.meta.get("init", "midpoint"), end)
    entries = [("bns", nfe, solver), (f"init ({init.meta['init']})", nfe, init)]
    # each baseline on its best grid, chosen on the validation pairs
    entries += best_classical(model, list(sz.nfes), val[:64], guidance=guidance, end=end)
    kinds = {"bns": "bns", entries[1][0]: "init"}
    rows = evaluate(model, entries, test, guidance, kinds=kinds, progress=progress)
    t_eval = time.perf_counter() - t0

    best = best_rows(rows)
    bns_row = rows[0]
    best_same = best.get(nfe)
    best_double = best.get(2 * nfe)
    summary = {
        "model": model.name,
        "guidance": guidance,
        "nfe": nfe,
        "bns_psnr": bns_row["psnr_mean"],
        "best_classical": best_same
        and {
            "solver": best_same["solver"],
            "grid": best_same.get("grid"),
            "psnr": best_same["psnr_mean"],
        },
        "best_classical_at_2nfe": best_double
        and {
            "solver": best_double["solver"],
            "grid": best_double.get("grid"),
            "psnr": best_double["psnr_mean"],
        },
        "sizes": asdict(sz),
        "seconds": {
            "ground_truth": round(t_gt, 1),
            "distill": round(t_distill, 1),
            "evaluate": round(t_eval, 1),
            "total": round(time.perf_counter() - t_start, 1),
        },
    }
    title = f"{model.name}, guidance {guidance:g}, {len(test)} test pairs"
    write_results(rows, out / "results.json", {"summary": summary}, out / "results.md", title)
    plot_psnr_vs_nfe(rows, out / "psnr_vs_nfe.png", title)
    if len(model.sample_shape) == 3:
        comparison_grid(model, entries, rows, test, guidance, out / "samples.png", title)
    say("")
    say(markdown_table(rows, title))
    if best_same is not None:
        say(
            f"bns demo: BNS at NFE {nfe}: {bns_row['psnr_mean']:.2f} dB; best classical at NFE"
            f" {nfe}: {best_same['solver']} {best_same['psnr_mean']:.2f} dB"
            f" ({bns_row['psnr_mean'] - best_same['psnr_mean']:+.2f} dB)"
            + (
                f"; best classical at NFE {2 * nfe}: {best_double['solver']}"
                f" {best_double['psnr_mean']:.2f} dB"
                if best_double
                else ""
            )
        )
    say(
        f"bns demo: done in {summary['seconds']['total']:.0f} s; report in {out}/ (results.md,"
        " results.json, psnr_vs_nfe.png, samples.png, " + solver_path.name + ")"
    )
    return {"rows": rows, "summary": summary}


def _reusable(path, model, guidance, settings):
    """The solver already in ``path`` if it was trained for this model, guidance and settings."""
    from .solver import NSSolver, SolverFileError

    if not path.exists():
        return None
    try:
        solver = NSSolver.load(path, model=model, guidance=guidance)
    except SolverFileError:
        return None
    from .config import AUTO_ADAM_STEPS, AUTO_GN_STEPS, current_names

    cfg = current_names(solver.meta.get("config", {}), warn=False)  # older files: older names
    if not all(cfg.get(k) == v for k, v in settings.items() if v is not None):
        return None
    if settings.get("adam_steps") is None:  # the default optimizer: either automatic choice
        steps = (cfg.get("adam_steps"), cfg.get("gn_steps"))
        if steps not in ((0, AUTO_GN_STEPS), (AUTO_ADAM_STEPS, 0)):
            return None
    return solver
