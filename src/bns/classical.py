"""The best classical solver of a model, measured: every solver on every grid a user could pick.

Which grid suits a classical solver depends on the model (its scheduler, but also how its
network embeds time), so nothing here assumes it: :func:`candidates` builds each solver on every
grid of :func:`bns.solvers.grid_names`, and :func:`psnr_matrix` measures them all on the same
pairs. Candidates share network evaluations where they can: solvers whose times and coefficients
agree up to step ``i`` reach the same state there, so their first ``i + 1`` velocities are
computed once (every grid that starts at ``t_min`` shares the first evaluation; Euler, AB2, AB3
and iPNDM on one grid share the first two). :func:`rank` adds successive halving: all candidates
on a few pairs, the leaders on the rest.

``bns eval`` picks each baseline's grid on validation pairs (:func:`best_classical`) and ``bns
distill --init best`` ranks its initial solvers the same way.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from . import executor
from .errors import InputError
from .metrics import psnr
from .model import in_phase
from .solver import NSSolver, ns_step
from .solvers import SOLVER_NAMES, by_name, grid_names, with_data_end

if TYPE_CHECKING:
    from .model import Model
    from .pairs import Pairs

__all__ = [
    "candidates",
    "psnr_matrix",
    "rank",
    "best_classical",
    "shared_evaluations",
    "rank_work",
    "RANK_FIRST",
    "RANK_KEEP",
]

# Successive halving in rank(): every candidate on RANK_FIRST pairs, the RANK_KEEP best of them
# on all pairs (measured: benchmarks/results/classical_*.md).
RANK_FIRST = 16
RANK_KEEP = 8


def label(solver: NSSolver) -> str:
    """``name@grid`` of a classical solver built by :func:`bns.solvers.by_name`."""
    return f"{solver.meta['solver']}@{solver.meta['grid']}"


def candidates(
    model: Model,
    nfe: int,
    names: tuple[str, ...] | list[str] = SOLVER_NAMES,
    grids: tuple[str, ...] | list[str] | None = None,
    end: str = "range",
) -> list[NSSolver]:
    """Each solver of ``names`` on each grid (default: every grid of the model) that can make
    exactly ``nfe`` evaluations; with ``end="data"``, each ending on the data."""
    unknown = [n for n in names if n not in SOLVER_NAMES]
    if unknown:
        raise InputError(f"unknown solver(s) {unknown}; known: {', '.join(SOLVER_NAMES)}")
    out = []
    for name in names:
        for grid in grids or grid_names(model):
            try:
                s = by_name(name, nfe, model, grid)
            except ValueError:
                continue  # an NFE this method cannot make, a grid this model has not
            out.append(with_data_end(s, model.schedule) if end == "data" else s)
    return out


def _key(values: Tensor) -> tuple[float, ...]:
    # Equal to 12 significant digits: the same step written two ways (DDIM and first-order
    # DPM-Solver++, say) differs in the last bits and should still be shared.
    return tuple(float(f"{v:.12g}") for v in values.tolist())


def _groups(solvers: list[NSSolver], idx: list[int], i: int, values) -> list[list[int]]:
    out: dict[tuple, list[int]] = {}
    for k in idx:
        out.setdefault(_key(values(solvers[k], i)), []).append(k)
    return list(out.values())


def _time(s: NSSolver, i: int) -> Tensor:
    return s.times[i : i + 1]


def _row(s: NSSolver, i: int) -> Tensor:
    return torch.cat([s.a[i : i + 1], s.b[i, : i + 1]])


def shared_evaluations(solvers: list[NSSolver]) -> int:
    """Velocity evaluations per sample that :func:`psnr_matrix` makes for ``solvers``
    together (at most the sum of their NFEs)."""

    def count(idx: list[int], i: int) -> int:
        total = 0
        for group in _groups(solvers, idx, i, _time):
            total += 1
            for sub in _groups(solvers, group, i, _row):
                rest = [k for k in sub if solvers[k].nfe > i + 1]
                total += count(rest, i + 1) if rest else 0
        return total

    return count(list(range(len(solvers))), 0) if solvers else 0


def rank_work(
    solvers: list[NSSolver], pairs: int, first: int = RANK_FIRST, keep: int = RANK_KEEP
) -> list[tuple[int, int]]:
    """``(evaluations per sample, pairs)`` of each round of :func:`rank`: exact for the first,
    an upper bound for the second (its ``keep`` solvers are known only after the first)."""
    if len(solvers) <= keep or pairs <= first:
        return [(shared_evaluations(solvers), pairs)]
    bound = sum(sorted((s.nfe for s in solvers), reverse=True)[:keep])
    return [(shared_evaluations(solvers), first), (bound, pairs - first)]


def _final_states(velocity, x0: Tensor, solvers: list[NSSolver]) -> list[Tensor]:
    """``x_n`` of every solver from ``x0``, each shared velocity computed once."""
    acc = torch.promote_types(x0.dtype, torch.float32)
    flat0 = x0.to(acc).reshape(-1)
    out: list[Tensor | None] = [None] * len(solvers)
    coef = [(s.a.to(x0.device, acc), s.b.to(x0.device, acc)) for s in solvers]

    def walk(idx: list[int], i: int, x: Tensor, us: list[Tensor]) -> None:
        for group in _groups(solvers, idx, i, _time):
            t = solvers[group[0]].times[i].to(x0.device)
            u = velocity(x.reshape(x0.shape), t).to(acc).reshape(-1)
            seen = us + [u]
            for sub in _groups(solvers, group, i, _row):
                a, b = coef[sub[0]]
                x_next = ns_step(flat0, seen, a[i], b[i, : i + 1])
                for k in sub:
                    if solvers[k].nfe == i + 1:
                        out[k] = x_next.reshape(x0.shape)
                rest = [k for k in sub if solvers[k].nfe > i + 1]
                if rest:
                    walk(rest, i + 1, x_next, seen)

    walk(list(range(len(solvers))), 0, flat0, [])
    return out  # type: ignore[return-value]


def psnr_matrix(
    model: Model,
    solvers: list[NSSolver],
    pairs: Pairs,
    guidance: float = 1.0,
    batch_size: int = 256,
    data_range: float = 2.0,
) -> Tensor:
    """Per-sample PSNR ``[len(solvers), N]`` (CPU float64) of every solver against the pairs'
    ground truth, shared evaluations computed once (see the module docstring).

    Equal to :func:`bns.evaluate.evaluate_psnr` per solver up to float rounding. Under
    ``torchrun`` each worker measures its share of the pairs and every worker gets all values.
    """

    def velocity(x: Tensor, t: Tensor, y: Tensor | None) -> Tensor:
        return model.velocity(x, t, y, guidance)

    def rows(part: slice) -> Tensor:
        mine, cols = pairs[part], [torch.zeros(0, len(solvers), dtype=torch.float64)]
        with torch.no_grad():
            for s in range(0, len(mine), batch_size):
                p = mine[s : s + batch_size].to(model.device)
                xs = _final_states(lambda x, t, y=p.y: velocity(x, t, y), p.x0, solvers)
                cols.append(torch.stack([psnr(x, p.x1, data_range).double().cpu() for x in xs], 1))
        return torch.cat(cols)

    local = executor.current(model.device).map_rows(len(pairs), rows, "evaluation")
    return local.t().contiguous()


def _mean(p: Tensor) -> float:
    # A solver that diverges on some sample (PSNR nan) ranks last.
    m = float(p.mean())
    return m if math.isfinite(m) or m == math.inf else -math.inf


def rank(
    model: Model,
    solvers: list[NSSolver],
    pairs: Pairs,
    guidance: float = 1.0,
    batch_size: int = 256,
    data_range: float = 2.0,
    first: int = RANK_FIRST,
    keep: int = RANK_KEEP,
) -> list[float]:
    """Mean PSNR of each solver on ``pairs``, by successive halving: all of them on the first
    ``first`` pairs, the ``keep`` best of those on all the pairs. A solver dropped after the
    first round keeps its mean over the first pairs (below every kept one, or nearly)."""
    with in_phase("ranking of the initial solvers"):
        return _rank(model, solvers, pairs, guidance, batch_size, data_range, first, keep)


def _rank(model, solvers, pairs, guidance, batch_size, data_range, first, keep) -> list[float]:
    if len(solvers) <= keep or len(pairs) <= first:
        return [
            _mean(p) for p in psnr_matrix(model, solvers, pairs, guidance, batch_size, data_range)
        ]
    head = psnr_matrix(model, solvers, pairs[:first], guidance, batch_size, data_range)
    scores = [_mean(p) for p in head]
    kept = sorted(range(len(solvers)), key=lambda k: scores[k], reverse=True)[:keep]
    tail = psnr_matrix(
        model, [solvers[k] for k in kept], pairs[first:], guidance, batch_size, data_range
    )
    for k, p in zip(kept, tail):
        scores[k] = _mean(torch.cat([head[k], p]))
    return scores


def best_classical(
    model: Model,
    nfes: list[int],
    pairs: Pairs,
    names: tuple[str, ...] | list[str] = SOLVER_NAMES,
    grids: tuple[str, ...] | list[str] | None = None,
    guidance: float = 1.0,
    end: str = "range",
    batch_size: int = 256,
    data_range: float = 2.0,
) -> list[tuple[str, int, NSSolver]]:
    """Each classical solver at each NFE it can make, on the grid that measures best on
    ``pairs`` (validation pairs: choose on them, report on others).

    ``solver.meta["grid"]`` names the chosen grid and ``meta["grid_psnr"]`` holds every grid's
    mean PSNR on ``pairs`` (a solver with one grid for the model is not measured). Returns ``(name, nfe, solver)`` like
    :func:`bns.evaluate.baseline_solvers`.
    """
    with in_phase("the choice of each baseline's grid"):
        return _best_classical(
            model, nfes, pairs, names, grids, guidance, end, batch_size, data_range
        )


def _best_classical(model, nfes, pairs, names, grids, guidance, end, batch_size, data_range):
    out = []
    for nfe in nfes:
        cands = candidates(model, nfe, names, grids, end)
        per_name = {n: [c for c in cands if c.meta["solver"] == n] for n in names}
        # A solver with one grid at this NFE has nothing to choose: it is not measured.
        choose = [c for c in cands if len(per_name[c.meta["solver"]]) > 1]
        scores = (
            psnr_matrix(model, choose, pairs, guidance, batch_size, data_range) if choose else []
        )
        score_of = {id(c): _mean(p) for c, p in zip(choose, scores)}
        for name in names:
            mine = per_name[name]
            if len(mine) == 1:
                out.append((name, nfe, mine[0]))
            elif mine:
                best = max(mine, key=lambda c: score_of[id(c)])
                best.meta["grid_psnr"] = {c.meta["grid"]: round(score_of[id(c)], 4) for c in mine}
                best.meta["grid_pairs"] = len(pairs)
                out.append((name, nfe, best))
    return out
