"""Evaluation: PSNR against ground truth on held-out test pairs, for BNS and classical solvers.

Under ``torchrun`` the pairs are shared out among the workers and the values gathered: every
worker gets the rows one worker would.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from . import executor
from .errors import InputError
from .metrics import psnr
from .model import Model, in_phase
from .pairs import Pairs
from .solver import NSSolver, sample
from .solvers import SOLVER_NAMES

__all__ = ["baseline_solvers", "evaluate", "evaluate_psnr", "best_rows"]


def evaluate_psnr(
    model: Model,
    solver: NSSolver,
    pairs: Pairs,
    guidance: float = 1.0,
    batch_size: int = 256,
    data_range: float = 2.0,
) -> Tensor:
    """Per-sample PSNR of ``solver`` against the pairs' ground truth (no gradients), on the
    model's device (the pairs are moved batch by batch); a CPU float64 tensor ``[N]``.

    Under ``torchrun`` each worker measures its contiguous share of the pairs and every worker
    gets all ``N`` values, in order; ``model.forwards`` counts this worker's forwards.
    """
    device = model.device

    def rows(part: slice) -> Tensor:
        mine, out = pairs[part], [torch.zeros(0, dtype=torch.float64)]
        with in_phase("evaluation"), torch.no_grad():
            for s in range(0, len(mine), batch_size):
                p = mine[s : s + batch_size].to(device)
                x = sample(model, p.x0, solver, p.y, guidance)
                out.append(psnr(x, p.x1, data_range).double().cpu())
        return torch.cat(out)

    return executor.current(device).map_rows(len(pairs), rows, "evaluation")


def baseline_solvers(
    model: Model,
    nfes: list[int],
    names: tuple[str, ...] | list[str] = SOLVER_NAMES,
    end: str = "range",
    grid: str = "default",
) -> list[tuple[str, int, NSSolver]]:
    """Each classical solver at each NFE it can reach exactly, on one ``grid`` (default: the
    fixed rule of :func:`bns.solvers.by_name`; :func:`bns.classical.best_classical` measures
    every grid instead). With ``end="data"`` its last step is the step to sigma = 0, as
    diffusers' ``final_sigmas_type="zero"``.

    An NFE a method cannot reach (midpoint at an odd NFE, RK4 at one not divisible by 4) is
    skipped; an unknown name is an error.
    """
    from .solvers import by_name, with_data_end

    unknown = [n for n in names if n not in SOLVER_NAMES]
    if unknown:
        raise InputError(f"unknown baseline(s) {unknown}; known: {', '.join(SOLVER_NAMES)}")
    out = []
    for name in names:
        for nfe in nfes:
            try:
                solver = by_name(name, nfe, model, grid)
                if end == "data":
                    solver = with_data_end(solver, model.schedule)
                out.append((name, nfe, solver))
            except ValueError:
                continue  # this NFE is not reachable by this method
    return out


def evaluate(
    model: Model,
    entries: list[tuple[str, int, NSSolver]],
    test: Pairs,
    guidance: float = 1.0,
    data_range: float = 2.0,
    kinds: dict[str, str] | None = None,
    progress: bool = False,
    batch_size: int = 256,
) -> list[dict[str, Any]]:
    """One row per ``(name, nfe, solver)``: PSNR mean, std, median and 5/95% quantiles;
    ``batch_size`` pairs are sampled at a time."""
    from tqdm.auto import tqdm

    rows = []
    per = model.forwards_per_evaluation(guidance)
    quiet = not progress or not executor.current(model.device).main  # rank 0 alone shows progress
    for name, nfe, solver in tqdm(entries, desc="evaluate", disable=quiet, leave=False):
        p = evaluate_psnr(model, solver, test, guidance, batch_size, data_range).double()
        q = torch.quantile(p, torch.tensor([0.05, 0.5, 0.95], dtype=torch.float64))
        kind = (kinds or {}).get(name, "classical")
        extra = {}
        if kind == "classical" and "grid" in solver.meta:  # which grid, and why that one
            extra = {
                k: solver.meta[k] for k in ("grid", "grid_psnr", "grid_pairs") if k in solver.meta
            }
        rows.append(
            {
                "solver": name,
                **extra,
                "nfe": int(nfe),
                "forwards": int(nfe) * per,
                "kind": kind,
                "psnr_mean": float(p.mean()),
                "psnr_std": float(p.std()) if len(p) > 1 else 0.0,
                "psnr_median": float(q[1]),
                "psnr_p05": float(q[0]),
                "psnr_p95": float(q[2]),
                "psnr_samples": [round(float(v), 4) for v in p],
                "test_pairs": len(test),
            }
        )
    return rows


def best_rows(rows: list[dict[str, Any]], kind: str = "classical") -> dict[int, dict[str, Any]]:
    """The best row of ``kind`` at each NFE (by mean PSNR)."""
    best: dict[int, dict[str, Any]] = {}
    for r in rows:
        if r.get("kind") == kind and (
            r["nfe"] not in best or r["psnr_mean"] > best[r["nfe"]]["psnr_mean"]
        ):
            best[r["nfe"]] = r
    return best
