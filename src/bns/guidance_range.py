"""One solver for a range of guidance scales (beyond the paper).

A BNS solver is trained for one guidance scale ``w``; a user who moves the slider needs another.
Here every parameter of the BNS family (time logits, ``a``, ``b``) is a polynomial in
``s = (log w - c) / r`` (``c``, ``r``: the centre and half-width of ``log w`` over the training
scales), ``theta(w) = theta_0 + s theta_1 + s^2 theta_2``, trained on ground-truth pairs at
several scales at once. At ``theta_1 = theta_2 = 0`` it is the initial solver at every ``w``.
:meth:`GuidanceRangeSolver.at` gives the ordinary :class:`bns.NSSolver` for any ``w`` in the
range, which samples, saves and drops into a scheduler as any other.

    rs, hist = bns.distill_guidance_range(model, 8, guidances=[1, 2, 4, 8])
    solver = rs.at(3.0)          # an NSSolver for w = 3
    rs.save("range.json")        # bns sample --solver range.json --guidance 3
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from . import executor
from ._io import atomic_write_text
from .config import DistillConfig, TrainingError, resolve_steps
from .errors import InputError
from .evaluate import evaluate_psnr
from .families import BNSFamily, _increasing
from .loss import LOSSES
from .model import Model, frozen
from .pairs import Pairs, make_pairs
from .solver import NSSolver, SolverFileError, _checksum, sample
from .train import (
    Objective,
    _history,
    _Loop,
    candidate_solvers,
    choose_initial_solver,
    run_loop,
    spanned,
    strictly_increasing,
)

__all__ = ["GuidanceRangeSolver", "distill_guidance_range", "FORMAT"]

FORMAT = "bns-guidance-range"
_NAMES = ("logits", "a", "b")


class GuidanceRangeSolver:
    """BNS parameters as polynomials in the log guidance scale: :meth:`at` gives the solver.

    ``coefs[name]`` has shape ``[degree + 1, *shape]`` for each BNS parameter (``logits``,
    ``a``, ``b``); ``t_ends`` are the fixed first and last times; ``w_range`` the training
    scales' range (``at`` refuses to extrapolate beyond it unless told to).
    """

    def __init__(
        self,
        coefs: dict[str, Tensor],
        t_ends: Tensor,
        w_range: tuple[float, float],
        meta: dict[str, Any] | None = None,
    ) -> None:
        lo, hi = (float(v) for v in w_range)
        if not (0 < lo < hi and math.isfinite(hi)):
            raise InputError(f"w_range must satisfy 0 < lo < hi, got {w_range}")
        self.coefs = {k: v.detach().to(torch.float64) for k, v in coefs.items()}
        self.t_ends = t_ends.detach().to(torch.float64)
        self.w_range = (lo, hi)
        self.meta = dict(meta or {})

    @property
    def nfe(self) -> int:
        return int(self.coefs["a"].shape[1])

    def s(self, w: float | Tensor) -> Tensor:
        """The normalized log guidance scale: -1 at the range's low end, +1 at its high end."""
        lo, hi = (math.log(v) for v in self.w_range)
        return (torch.log(torch.as_tensor(w, dtype=torch.float64)) - (lo + hi) / 2) / (
            (hi - lo) / 2
        )

    def at(self, w: float, extrapolate: bool = False) -> NSSolver:
        """The NS solver for guidance ``w`` (within the training range unless ``extrapolate``)."""
        w = float(w)
        lo, hi = self.w_range
        if not (lo - 1e-9 <= w <= hi + 1e-9) and not extrapolate:
            raise InputError(
                f"guidance {w:g} is outside the range this solver was trained on [{lo:g}, {hi:g}]"
            )
        return _solver(self.coefs, self.t_ends, self.s(w), {**self.meta, "guidance": w})

    # -- file -------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = {
            "format": FORMAT,
            "version": 2,
            "w_range": list(self.w_range),
            "t_ends": self.t_ends.tolist(),
            "coefs": {k: v.tolist() for k, v in self.coefs.items()},
            "meta": self.meta,
        }
        return {**d, "checksum": _checksum(d)}

    def save(self, path: str | os.PathLike) -> None:
        atomic_write_text(Path(path), json.dumps(self.to_dict()) + "\n")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> GuidanceRangeSolver:
        if not isinstance(d, dict) or d.get("format") != FORMAT:
            raise SolverFileError(f"not a {FORMAT} file")
        version = d.get("version")
        if version not in (1, 2) or isinstance(version, bool):
            raise SolverFileError(f"unknown {FORMAT} file version {version!r}")
        try:  # version 1 (before checksums) is read as it is
            intact = version == 1 or d.get("checksum") == _checksum(d)
        except (TypeError, ValueError, RecursionError) as e:  # not JSON: nesting, huge ints
            raise SolverFileError(f"corrupt {FORMAT} file: {e}") from None
        if not intact:
            raise SolverFileError(
                f"{FORMAT} file checksum does not match its contents (edited or corrupt)"
            )
        try:
            coefs = {k: torch.tensor(d["coefs"][k], dtype=torch.float64) for k in _NAMES}
            out = cls(
                coefs, torch.tensor(d["t_ends"], dtype=torch.float64), d["w_range"], d["meta"]
            )
            for w in out.w_range:  # every solver it gives must be valid
                out.at(w).validate(strict=True)
        except (
            KeyError,
            IndexError,
            TypeError,
            ValueError,
            RuntimeError,  # torch's, and RecursionError
            OverflowError,
            AttributeError,
        ) as e:
            why = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise SolverFileError(f"corrupt {FORMAT} file: {why}") from None
        return out

    @classmethod
    def load(
        cls, path: str | os.PathLike, model: Model | None = None, force: bool = False
    ) -> GuidanceRangeSolver:
        """Read a file written by :meth:`save`; given ``model``, refuse one trained for another
        (unless ``force``)."""
        path = Path(path)
        try:
            d = json.loads(path.read_text())
        except FileNotFoundError:
            raise SolverFileError(f"solver file not found: {path}") from None
        except (OSError, ValueError, RecursionError) as e:  # also: nesting, 5000-digit ints
            raise SolverFileError(f"cannot read {path}: {e}") from None
        out = cls.from_dict(d)
        if model is not None and not force:  # an NS solver's checks: span, model, times
            out.at(out.w_range[0]).check_compatible(model, where=str(path))
        return out


def is_guidance_range_file(path: str | os.PathLike) -> bool:
    """Whether ``path`` holds a :class:`GuidanceRangeSolver` (read cheaply, never raises)."""
    try:
        with open(path) as f:
            head = f.read(64)
    except OSError:
        return False
    return f'"format": "{FORMAT}"' in head


def _solver(coefs: dict[str, Tensor], t_ends: Tensor, s: Tensor, meta: dict) -> NSSolver:
    """The NS solver of the BNS parameters ``sum_k s^k coefs[name][k]`` (differentiable)."""
    powers = torch.stack([s**k for k in range(coefs["a"].shape[0])])

    def value(name: str) -> Tensor:
        c = coefs[name]
        return torch.tensordot(powers.to(c.dtype), c, dims=1)

    logits, a, b = (value(n) for n in _NAMES)
    return NSSolver(_increasing(logits, t_ends), a, torch.tril(b), meta)


def distill_guidance_range(
    model: Model,
    nfe: int,
    guidances: list[float],
    *,
    degree: int = 2,
    config: DistillConfig | None = None,
    pairs: dict[float, tuple[Pairs, Pairs]] | None = None,
    cache: bool | str | os.PathLike = True,
    progress: bool = True,
    checkpoint_path: str | os.PathLike | None = None,
    resume: bool = False,
    **overrides: Any,
) -> tuple[GuidanceRangeSolver, dict[str, Any]]:
    """Train one solver for every guidance scale between ``min(guidances)`` and
    ``max(guidances)`` on pairs at each of ``guidances``.

    The options of :class:`bns.DistillConfig` apply (``adam_steps``, ``batch_size``, ``lr``, pair
    counts, ``init``, ``loss``, ``micro_batch``, ``grad_checkpoint``, batch sizes, ``max_skips``);
    each step trains on every scale, ``batch_size`` shared among them. It runs on the
    network's device, ends on the model's range and trains the full family with Adam alone
    (other ``family``, ``end=data`` or ``gn_steps`` are refused). It trains in the loop of
    :func:`bns.distill`: the revert rule (``revert_db``), ``patience``, checkpoints
    (``checkpoint_path``, ``resume=True``) and ``torchrun`` workers apply.
    The initial solver is the classical solver with the best mean validation PSNR over the
    scales, at every ``w``.
    Validation is the mean PSNR over the scales; the best iterate is kept. With ``span``
    (image-to-image) every scale's pairs start from that scale's samples, noised to the span's
    start, and the file records the span as :func:`bns.distill`'s does.
    """
    ws = sorted({float(w) for w in guidances})
    if len(ws) < 2 or ws[0] <= 0 or not all(math.isfinite(w) for w in ws):
        raise TrainingError(f"guidances must hold at least two finite scales > 0, got {guidances}")
    if model.num_classes is None:
        raise TrainingError(f"{model.name} is unconditional: it has no guidance to range over")
    if not 0 <= int(degree) <= 4:
        raise TrainingError(f"degree must be 0 to 4, got {degree}")
    mid = math.exp((math.log(ws[0]) + math.log(ws[-1])) / 2)
    cfg = (config or DistillConfig(nfe=int(nfe))).replace(nfe=int(nfe), guidance=mid, **overrides)
    cfg.check()
    cfg = resolve_steps(cfg, lambda: False)  # Adam alone (refused below if asked otherwise)
    refused = {"family": "bns", "gn_steps": 0, "starts": 1}
    for name, only in refused.items():
        if getattr(cfg, name) != only:
            raise TrainingError(f"a guidance-range solver takes {name} {only} only")
    if cfg.end == "data":
        raise TrainingError("a guidance-range solver ends on the model's range (end range)")
    if cfg.budget is not None:
        raise TrainingError("a guidance-range solver takes no budget: set its steps and pairs")
    model = spanned(model, cfg.span)  # image-to-image: every scale starts from noised samples
    with frozen(model):
        if pairs is None:
            kw = dict(seed=cfg.seed, rtol=cfg.rtol, atol=cfg.atol, cache=cache, progress=progress)
            kw.update(batch_size=cfg.gt_batch_size, end="range")
            pairs = {
                w: (
                    make_pairs(model, cfg.train_pairs, "train", guidance=w, **kw),
                    make_pairs(model, cfg.val_pairs, "val", guidance=w, **kw),
                )
                for w in ws
            }
        if sorted(pairs) != ws:
            raise TrainingError(f"pairs are given for {sorted(pairs)}, not for {ws}")
        device = model.device
        pairs = {w: (tr.to(device), va.to(device)) for w, (tr, va) in pairs.items()}
        init = _initial_solver(model, cfg, ws, pairs)
        return _train(model, cfg, ws, pairs, init, int(degree), progress, checkpoint_path, resume)


def _initial_solver(model, cfg, ws, pairs) -> NSSolver:
    """The candidate of ``cfg.init`` with the best mean validation PSNR over the scales."""
    cfg = cfg.replace(end="range")
    candidates = candidate_solvers(model, cfg)
    if len(candidates) == 1:
        return candidates[0]
    total: dict[str, float] = {}
    for w in ws:
        _, scores, _ = choose_initial_solver(
            model, cfg.replace(guidance=w), pairs[w][1], candidates
        )
        for label, v in scores.items():
            total[label] = total.get(label, 0.0) + (v if math.isfinite(v) else -math.inf)
    return max(candidates, key=lambda c: total[c.meta["init"]])


class _Coefs(torch.nn.Module):
    """The trained parameters: every BNS parameter's polynomial coefficients in ``s``
    (``[degree + 1, *shape]``, the initial solver's value at degree 0)."""

    def __init__(self, base: BNSFamily, degree: int) -> None:
        super().__init__()
        for name in _NAMES:
            p0 = getattr(base, name).detach()
            c = torch.zeros((degree + 1, *p0.shape), dtype=torch.float64)
            c[0] = p0
            setattr(self, name, torch.nn.Parameter(c))

    def param_groups(self, lr: float, coef_lr_mult: float) -> list[dict[str, Any]]:
        """As :meth:`bns.families.BNSFamily.param_groups`."""
        return [
            {"params": [self.logits], "lr_mult": 1.0},
            {"params": [self.a, self.b], "lr_mult": coef_lr_mult},
        ]


class _RangeObjective(Objective):
    """The loss of the coefficients on the pairs of every scale at once (each step's batch
    shared among them), the validation PSNR their mean over the scales."""

    solver_type = GuidanceRangeSolver

    def __init__(self, model, cfg, coefs: _Coefs, init, pairs, rs: GuidanceRangeSolver):
        super().__init__(model, cfg, coefs, init, None, None)
        self.pairs, self.rs, self.ws = pairs, rs, sorted(pairs)

    def set_lr(self, opt: torch.optim.Optimizer, backoff: float, schedule: float) -> None:
        # The products in the order of this trainer's first version: its results bit for bit.
        for group in opt.param_groups:
            group["lr"] = self.cfg.lr * group["lr_mult"] * (backoff * schedule)

    def _solver_at(self, w: float) -> NSSolver:
        return _solver(dict(self.family.named_parameters()), self.rs.t_ends, self.rs.s(w), {})

    def gradient(self, gen: torch.Generator) -> tuple[float, list, list | None]:
        cfg, ws = self.cfg, self.ws
        # Every scale in every step, the batch shared among them: one consistent gradient for
        # the whole range (taking the scales in turn lets Adam chase each one's gradient).
        # Pair i of scale k is index k * L + i of the global batch that the workers share.
        L = max(len(self.pairs[w][0]) for w in ws)
        idx = []
        for k, w in enumerate(ws):
            n = len(self.pairs[w][0])
            per = max(1, min(cfg.batch_size // len(ws), n))
            idx.append(k * L + torch.randint(n, (per,), generator=gen))
        idx = torch.cat(idx)
        params = list(self.family.parameters())

        def step(part: Tensor) -> tuple[float, list[Tensor] | None]:
            grads = [torch.zeros_like(p) for p in params]
            loss = 0.0
            for k, w in enumerate(self.ws):
                train = self.pairs[w][0]
                mine = part[part // L == k] - k * L
                if not len(mine):
                    continue
                batch = train[mine.to(train.x0.device)]
                size = cfg.micro_batch or len(mine)  # micro-batches: the same gradient
                for s0 in range(0, len(mine), size):
                    b = batch[s0 : s0 + size]
                    solver = self._solver_at(w)
                    x = sample(self.model, b.x0, solver, b.y, w, checkpoint=cfg.grad_checkpoint)
                    term = LOSSES[cfg.loss](x, b.x1).sum() / len(part)
                    # gradients of the solver's numbers alone: no network weight gets a .grad
                    for g, gi in zip(grads, torch.autograd.grad(term, params)):
                        g += gi
                    loss += float(term.detach())
            if not (math.isfinite(loss) and all(torch.isfinite(g).all() for g in grads)):
                return math.nan, None
            return loss, grads

        loss, grads, _ = executor.current().data_parallel(step, idx, params, self.model)
        return loss, params, grads

    def validate(self) -> tuple[float, GuidanceRangeSolver]:
        cfg, ws = self.cfg, self.ws
        solvers = {w: self._solver_at(w).detach() for w in ws}
        if not all(strictly_increasing(s.times) for s in solvers.values()):
            scores = [math.nan]  # an overshoot (train.strictly_increasing)
        else:
            scores = [
                float(
                    evaluate_psnr(
                        self.model, s, self.pairs[w][1], w, cfg.eval_batch_size, cfg.data_range
                    ).mean()
                )
                for w, s in solvers.items()
            ]
        coefs = {k: v.detach().clone() for k, v in self.family.state_dict().items()}
        return sum(scores) / len(scores), GuidanceRangeSolver(
            coefs, self.rs.t_ends, self.rs.w_range
        )

    def kept(self, step: int, solver: GuidanceRangeSolver) -> GuidanceRangeSolver:
        return solver


def _train(model, cfg, ws, pairs, init, degree, progress, checkpoint_path, resume):
    base = BNSFamily(init)
    coefs = _Coefs(base, degree)
    rs = GuidanceRangeSolver(dict(coefs.named_parameters()), base.t_ends, (ws[0], ws[-1]))
    objective = _RangeObjective(model, cfg, coefs, init, pairs, rs)
    loop = _Loop(model, cfg, coefs, init, None, None, None, objective=objective)
    ident = {"model": model.fingerprint(), "cfg": cfg.to_dict(), "ws": ws, "degree": degree}
    ident["n"] = [[len(tr), len(va)] for tr, va in pairs.values()]
    main = executor.current(model.device or torch.device("cpu")).main
    progress = progress and main  # rank 0 alone shows progress and writes checkpoints
    run_loop(loop, json.dumps(ident, sort_keys=True), checkpoint_path, resume, progress, main)
    history = _history(loop, loop.ledger.summed_over_workers())
    history["steps_run"] = loop.steps_run  # the steps taken (patience skips the others)
    best, best_step, steps_run = loop.best_psnr, loop.best_step, loop.steps_run
    best_coefs = loop.best_params
    out = GuidanceRangeSolver(best_coefs, rs.t_ends, rs.w_range)
    out.meta = {
        "solver": "bns-guidance-range",
        "model_name": model.name,
        "model_fingerprint": model.fingerprint(),
        "model_settings": model.settings(),
        "nfe": cfg.nfe,
        "degree": degree,
        "trained_at": ws,
        "init": init.meta["init"],
        "config": cfg.to_dict(),
        "val_psnr": best,
        "best_step": best_step,
        "steps_run": steps_run,  # fewer than cfg.adam_steps when stopped early
        "wall_time_s": round(loop.elapsed, 3),
        "reverts": loop.reverts,
        **({"span": model.span_info()} if model.parent is not None else {}),
    }
    return out, history
