"""Distillation: learn a BNS solver for a model from ground-truth pairs (docs/math.md, section 4).

The pieces, each in its own module: the settings (:mod:`bns.config`), the solver family that
maps free parameters to an NSSolver (:mod:`bns.families`), the pure loss and its gradient
(:mod:`bns.loss`), checkpoints (:mod:`bns.checkpoint`) and the frozen network
(:func:`bns.model.frozen`). This module holds :func:`distill` and the small loop that owns the
learning-rate schedule, validation and the best/revert policy.

Adam with warm-up and cosine decay; the validation PSNR is measured every ``val_every`` steps
and the best solver is kept. The initial solver counts as step 0, so zero steps (or steps that
never beat it) return it exactly. A validation ``revert_db`` below the best returns to the best
parameters with half the learning rate; a non-finite loss or gradient skips the step and halves
the learning rate. Checkpoints make ``resume=True`` continue a killed run to the same result.

One loop (:class:`_Loop`) serves every trainer: it minimizes an :class:`Objective` (the loss
of a family's parameters on training pairs, and its validation) with two strategies, Adam
steps (:func:`_adam`) and then Gauss-Newton steps (:func:`_gauss_newton`, through the small
interface :func:`bns.gauss_newton.gauss_newton_update`). :mod:`bns.guidance_range` trains its
solver in the same loop with an objective of its own.

The learning rate of an Adam parameter group at step ``k`` is the product of four factors,
each with one name:

- ``cfg.lr``: the base rate (of the time logits);
- ``lr_backoff``: the loop's running factor, 1 at the start, halved at every revert and at
  every non-finite step (checkpointed);
- ``lr_schedule(cfg, k)``: the warm-up and cosine decay;
- ``lr_mult``: the group's own multiplier (an optimizer group's key, from
  ``Family.param_groups``); the groups of step-size numbers (``a``, ``b``) take
  ``coef_lr_mult(model, cfg)``, which is the setting ``cfg.coef_lr_scale`` times the mean step.
"""

from __future__ import annotations

import glob
import json
import math
import os
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from . import executor
from .checkpoint import Checkpoint
from .classical import rank
from .config import DistillConfig, TrainingError, resolve_steps
from .cost import Ledger, uncounted
from .evaluate import evaluate_psnr
from .families import FAMILIES, Family, make_family, usable_inits
from .gauss_newton import check_forward_mode, gauss_newton_update
from .loss import loss_and_grad
from .model import Model, frozen
from .pairs import Pairs, make_pairs
from .solver import NSSolver
from .solvers import init_candidates
from .solvers.ends import resolve_end
from .solvers.initial import distinct_solvers

__all__ = [
    "distill",
    "DistillConfig",
    "TrainingError",
    "choose_initial_solver",
    "candidate_solvers",
    "coef_lr_mult",
    "lr_schedule",
    "Objective",
]


def _end(model: Model, cfg: DistillConfig) -> str:
    """``cfg.end`` resolved on the model: ``"range"`` or ``"data"``."""
    to_data = FAMILIES[cfg.family].ends_on_data
    if cfg.end == "auto" and not to_data:
        return "range"  # the restricted families keep their classical last step
    try:
        end = resolve_end(model, cfg.end)
    except ValueError as e:
        raise TrainingError(str(e)) from None
    if end == "data" and not to_data:
        raise TrainingError(
            f"family {cfg.family} ends on the model's range only; pass end range (--end range)"
            " or use family bns"
        )
    return end


def candidate_solvers(model: Model, cfg: DistillConfig) -> list[NSSolver]:
    """The initial solvers ``cfg.init`` allows that ``cfg.family`` can start from."""
    try:
        candidates = init_candidates(model, cfg.nfe, cfg.init, cfg.precondition, _end(model, cfg))
        return usable_inits(cfg.family, candidates)  # those the family can start from
    except ValueError as e:
        raise TrainingError(str(e)) from None


def choose_initial_solver(
    model: Model, cfg: DistillConfig, val: Pairs, candidates: list[NSSolver] | None = None
) -> tuple[NSSolver, dict[str, float], int]:
    """The initial solver ``cfg.init`` allows that is best on the first ``cfg.init_pairs``
    validation pairs (:func:`bns.classical.rank`: every candidate on 16 of them, the best 8 on
    all); also every candidate's PSNR and the network forwards spent measuring."""
    candidates = candidates or candidate_solvers(model, cfg)
    if len(candidates) == 1:
        return candidates[0], {}, 0
    subset = val[: cfg.init_pairs]
    f0 = model.forwards
    psnrs = rank(model, candidates, subset, cfg.guidance, cfg.eval_batch_size, cfg.data_range)
    scores = {c.meta["init"]: p for c, p in zip(candidates, psnrs)}
    best = max(candidates, key=lambda c: _finite_or(scores[c.meta["init"]]))
    return best, scores, model.forwards - f0


def pick_starts(candidates: list[NSSolver], scores: dict[str, float], k: int) -> list[NSSolver]:
    """The ``k`` initial solvers of a run with ``starts = k``: the best on validation, then in
    turn the best remaining one of the other kind (preconditioned, then not, ...), leaving out
    those that equal one taken. The best classical start is not always where Gauss-Newton ends
    best (docs/results.md, "How far the start can matter"); the other kind is the likeliest
    to end elsewhere."""
    ranked = sorted(candidates, key=lambda c: -_finite_or(scores.get(c.meta["init"], -math.inf)))
    ranked = distinct_solvers(ranked)
    out = ranked[:1]
    # the others only if they validated at all (a start that never does is kept by nothing)
    rest = [c for c in ranked[1:] if not scores or math.isfinite(scores.get(c.meta["init"], 0))]
    while rest and len(out) < k:
        want = not _preconditioned(out[-1])
        pick = next((c for c in rest if _preconditioned(c) == want), rest[0])
        out.append(pick)
        rest = [c for c in rest if c is not pick]
    return out


def _preconditioned(solver: NSSolver) -> bool:
    return "+pc" in solver.meta.get("init", "")


def strictly_increasing(times: torch.Tensor) -> bool:
    """Whether a solver's times increase strictly. A step can push two of them together (their
    softmax increment underflows): such a solver has a step of length zero, no solver file
    holds one, and the loop treats its validation as an overshoot, back to the best iterate."""
    return bool(torch.all(times[1:] > times[:-1]))


def _finite_or(v: float, default: float = -math.inf) -> float:
    return v if math.isfinite(v) else default


def distill(
    model: Model,
    nfe: int | None = None,
    *,
    config: DistillConfig | None = None,
    pairs: tuple[Pairs, Pairs] | None = None,
    cache: bool | str | os.PathLike = True,
    checkpoint_path: str | os.PathLike | None = None,
    resume: bool = False,
    progress: bool = True,
    callback: Callable[[int, dict[str, Any]], None] | None = None,
    device: torch.device | str | None = None,
    **overrides: Any,
) -> tuple[NSSolver, dict[str, Any]]:
    """Learn a BNS solver of ``nfe`` velocity evaluations for ``model``.

    Args:
        model: a :class:`bns.Model`.
        nfe: steps of the solver (velocity evaluations; a guided one is 2 network forwards).
        config: the settings (:class:`bns.DistillConfig`); keyword ``overrides`` replace its
            fields (``guidance=2.0, adam_steps=500, init="midpoint", micro_batch=8, ...``).
        pairs: ``(train, val)`` pairs to use instead of computing them.
        cache: the ground-truth cache: True (``$BNS_CACHE_DIR``), False or a folder.
        checkpoint_path: where to write periodic checkpoints; ``resume=True`` continues from it.
        callback: ``callback(step, record)`` after every validation.
        device: where ground truth and distillation run; default the network's device (or the
            CPU for a network without tensors). The network must already be there.

    Returns:
        ``(solver, history)``: the best solver (validated) and the training history.
    """
    cfg = config or DistillConfig(nfe=0 if nfe is None else int(nfe))
    if nfe is not None:
        overrides["nfe"] = nfe
    cfg = cfg.replace(**overrides)
    if pairs is not None and cfg.end == "auto":
        cfg = cfg.replace(end=pairs[0].end)  # given pairs say where the ground truth ends
    cfg.check()
    model = spanned(model, cfg.span)
    if cfg.guidance != 1.0 and model.num_classes is None:
        raise TrainingError(f"{model.name} is unconditional: guidance must be 1")
    device = torch.device(device) if device is not None else model.device or torch.device("cpu")
    if model.device is not None and _same_device(model.device, device):
        device = model.device  # "cuda" names the network's cuda:K
    elif model.device is not None:
        raise TrainingError(
            f"the network is on {model.device}, not on {device}: move it there first"
            " (model.to(device))"
        )
    candidates = candidate_solvers(model, cfg)  # bad settings fail before any ground truth
    with frozen(model):
        if cfg.gn_steps:  # asked for: a network without forward mode fails now, clearly
            check_forward_mode(model, cfg.guidance, device)
        cfg = resolve_steps(cfg, lambda: _supports_forward_mode(model, cfg, device))
        if cfg.budget is not None:  # the settings that fit it, from rank 0's estimate
            args = (model, cfg, candidates, device, cache, pairs is not None)
            cfg = executor.current(device).on_main(lambda: _fit_budget(*args))
    with frozen(model):
        return _distill(
            model,
            cfg,
            candidates,
            pairs,
            cache,
            checkpoint_path,
            resume,
            progress,
            callback,
            device,
        )


def spanned(model: Model, span: list[float | None] | None) -> Model:
    """``model`` over ``span`` (:attr:`DistillConfig.span`; None: as it is); TrainingError
    for a span outside its range."""
    if span is None:
        return model
    try:
        return model.span(*span)
    except ValueError as e:
        raise TrainingError(str(e)) from None


def _distill(
    model, cfg, candidates, pairs, cache, checkpoint_path, resume, progress, callback, device
) -> tuple[NSSolver, dict[str, Any]]:
    main = executor.current(device).main  # under torchrun: bns starts the process group
    progress = progress and main  # rank 0 alone shows progress and writes checkpoints
    end = _end(model, cfg)
    ledger = Ledger()
    if pairs is None:
        kw = dict(seed=cfg.seed, guidance=cfg.guidance, rtol=cfg.rtol, atol=cfg.atol, cache=cache)
        kw.update(progress=progress, batch_size=cfg.gt_batch_size, device=device, end=end)
        with ledger.phase("ground_truth_train", model):
            train = make_pairs(model, cfg.train_pairs, "train", **kw)
        with ledger.phase("ground_truth_val", model):
            val = make_pairs(model, cfg.val_pairs, "val", **kw)
    else:
        train, val = pairs
        cfg = cfg.replace(train_pairs=len(train), val_pairs=len(val))  # what was used
        if {train.end, val.end} != {end}:
            raise TrainingError(
                f"the pairs end at {train.end}/{val.end} but the solver is to end at {end}:"
                f" make them with make_pairs(..., end={end!r}) or pass end={train.end!r}"
            )
    train, val = train.to(device), val.to(device)
    with ledger.phase("ranking", model):
        init, scores, _ = choose_initial_solver(model, cfg, val, candidates)
    starts = pick_starts(candidates, scores, cfg.starts) if cfg.starts > 1 else [init]
    run_id = _run_id(model, cfg, train, val)
    if cfg.starts > 1 and len(starts) == 1:
        warnings.warn(
            f"bns: starts={cfg.starts}, but init {cfg.init!r} gives one initial solver: one start",
            stacklevel=3,
        )
    loops: list[_Loop] = []
    for k, start in enumerate(starts):  # each start to its end; the best validated is kept
        if loops and _budget_left(cfg, ledger) < loops[-1].step_cost:
            loops[-1].stopped_by_budget = True  # not one more step: no more starts
            break
        family = make_family(cfg.family, start)
        loop = _Loop(model, cfg, family, start, train, val, callback, ledger)
        loop.step_cost = loops[-1].step_cost if loops else 0.0
        if len(starts) == 1:
            run_loop(loop, run_id, checkpoint_path, resume, progress, main)
        else:
            path = start_checkpoint(checkpoint_path, k)
            args = (f"{run_id} start {k}", path, resume, progress, main)
            run_loop(loop, *args, finish=True, missing_ok=k > 0)  # (a later start: not begun)
        loops.append(loop)
    loop = max(loops, key=lambda lp: _finite_or(lp.best_psnr))  # the first of equals
    loop.stopped_by_budget = any(lp.stopped_by_budget for lp in loops)
    cost = loop.ledger.summed_over_workers()  # every worker's share of the work
    solver = loop.best
    solver.meta = _artifact_meta(model, cfg, end, loop, train, scores, cost)
    if len(starts) > 1:  # each start's validation PSNR (None: none was finite)
        solver.meta["starts"] = {
            lp.init.meta["init"]: lp.best_psnr if math.isfinite(lp.best_psnr) else None
            for lp in loops
        }
    solver.validate(t_range=model.t_range, strict=True)
    return solver, _history(loop, cost)


def _budget_left(cfg: DistillConfig, ledger: Ledger) -> float:
    """What is left of ``cfg.budget`` (in its unit) after ``ledger``; infinite without one."""
    if cfg.budget is None:
        return math.inf
    from .budget import parse_budget

    budget = parse_budget(cfg.budget)
    return budget.value - _spent(budget, ledger)


def start_checkpoint(path: str | os.PathLike | None, k: int) -> Path | None:
    """Where start ``k`` of a run with several starts keeps its checkpoint: the run's own file
    for the first, ``PATH.startK`` beside it for the others. They stay with ``PATH``: whoever
    removes it removes them too (:func:`remove_checkpoints`)."""
    if path is None:
        return None
    return Path(path) if k == 0 else Path(f"{path}.start{k}")


def remove_checkpoints(path: str | os.PathLike) -> None:
    """Remove the checkpoint ``path`` and the other starts' files beside it (``PATH.start1``,
    ...), where they exist."""
    path = Path(path)
    for p in [path, *path.parent.glob(f"{glob.escape(path.name)}.start*")]:
        p.unlink(missing_ok=True)


def run_loop(
    loop: _Loop,
    run_id: str,
    checkpoint_path,
    resume: bool,
    progress: bool,
    main: bool,
    finish: bool = False,
    missing_ok: bool = False,
):
    """Run ``loop`` to its end, writing checkpoints of the run ``run_id`` to
    ``checkpoint_path`` (rank 0 alone: ``main``) and first continuing from one if ``resume``.
    With ``finish`` the last checkpoint says the run ended, and resuming from it runs nothing
    (one of several starts, done before the interruption); ``missing_ok``: no checkpoint to
    resume from is no news (a start the interrupted run had not begun)."""
    ckpt = Checkpoint(checkpoint_path, run_id) if checkpoint_path and main else None
    if resume:  # rank 0 reads the checkpoint and sends it to every worker
        state = executor.current().on_main(lambda: ckpt.load() if ckpt is not None else None)
        if state is None and ckpt is not None and not missing_ok:
            warnings.warn(f"bns: no checkpoint at {ckpt.path}; starting anew", stacklevel=3)
        elif state is not None:
            _restore_loop(loop, state)
            if state.get("finished"):
                return
    loop.run(ckpt, progress)
    if finish and ckpt is not None:
        ckpt.save({**_loop_state(loop), "finished": True})


def _fit_budget(model, cfg, candidates, device, cache, pairs_given) -> DistillConfig:
    from .budget import fit_budget
    from .estimate import Estimator

    with uncounted(model):  # the estimate's timing calls are not the run's work
        est = Estimator(model, cfg.guidance, device, cache)
        return fit_budget(cfg, est, _end(model, cfg), candidates, pairs_given)[0]


def _supports_forward_mode(model: Model, cfg: DistillConfig, device: torch.device) -> bool:
    """Whether the network supports forward-mode differentiation (the automatic choice of
    Gauss-Newton steps); if not, a warning says Adam runs instead."""
    try:
        check_forward_mode(model, cfg.guidance, device)
    except TrainingError as e:
        warnings.warn(
            f"bns: {str(e).split(';')[0]}: distilling with Adam steps instead", stacklevel=4
        )
        return False
    return True


def _same_device(a: torch.device, b: torch.device) -> bool:
    """Whether two devices are one, an index left out meaning "any" (``cuda`` and ``cuda:0``)."""
    return a.type == b.type and (a.index is None or b.index is None or a.index == b.index)


def _run_id(model: Model, cfg: DistillConfig, train: Pairs, val: Pairs) -> str:
    ident = {"model": model.fingerprint(), "cfg": cfg.to_dict(), "n": [len(train), len(val)]}
    return json.dumps(ident, sort_keys=True)


def coef_lr_mult(model: Model, cfg: DistillConfig) -> float:
    """The ``lr_mult`` of the groups of ``a`` and ``b``: their learning rate relative to the
    time parameters'. They are of the size of a step (h = range / n): their learning rate
    scales with it (``cfg.coef_lr_scale`` times h), so Adam's unit-size steps move every
    parameter by the same relative amount."""
    return cfg.coef_lr_scale * (model.t_range[1] - model.t_range[0]) / cfg.nfe


def lr_schedule(cfg: DistillConfig, step: int) -> float:
    """The learning rate of ``step`` relative to ``cfg.lr``: linear warm-up over
    ``cfg.warmup`` steps, then a cosine decay to ``cfg.lr_final`` at ``cfg.adam_steps``."""
    cos = 0.5 * (1 + math.cos(math.pi * min(step / max(cfg.adam_steps, 1), 1.0)))
    warm = min(1.0, (step + 1) / cfg.warmup) if cfg.warmup > 0 else 1.0
    return warm * (cfg.lr_final + (1 - cfg.lr_final) * cos)


def _gauss_newton(loop: _Loop) -> float:
    """One Gauss-Newton step of ``loop``'s objective (:func:`bns.gauss_newton.gauss_newton_update`);
    the damping ``gn_lam`` carries over (and into checkpoints)."""
    if loop.step == loop.cfg.adam_steps > 0:  # after Adam: from its best iterate, not its last
        loop.family.load_state_dict(loop.best_params)
    o = loop.objective
    loss, loop.gn_lam, loop.gn_rejected = gauss_newton_update(
        o.family, o.model, o.train, loop.gen, loop.cfg, loop.gn_lam
    )
    return loss


def _spent(budget, ledger: Ledger) -> float:
    """What the run has spent of ``budget`` so far, the same number on every worker: all
    workers' evaluations, or rank 0's seconds."""
    ex = executor.current()
    if budget.kind == "evaluations":
        return ex.all_sum(float(ledger.total.forwards + ledger.total.jvps))
    return ex.on_main(lambda: ledger.total.seconds)


def _adam(loop: _Loop) -> float:
    """One Adam step of ``loop``'s objective; a non-finite loss or gradient skips it and halves
    the learning rate (``lr_backoff``)."""
    loop.objective.set_lr(loop.opt, loop.lr_backoff, lr_schedule(loop.cfg, loop.step))
    loss, params, grads = loop.objective.gradient(loop.gen)
    if grads is None:
        loop.skipped += 1
        loop.lr_backoff *= 0.5
        return math.nan
    for p, g in zip(params, grads):
        p.grad = g
    loop.opt.step()
    loop.opt.zero_grad(set_to_none=True)
    return loss


class Objective:
    """What the loop minimizes: the loss of ``family``'s parameters on the training pairs at
    one guidance scale (:func:`distill`), and the validation PSNR. An objective gives Adam its
    batch gradient (:meth:`gradient`), Gauss-Newton its ``family``, ``model`` and ``train``
    pairs, and the loop its validation (:meth:`validate`)."""

    solver_type: Any = NSSolver  # what :meth:`validate` returns (and checkpoints hold)

    def __init__(self, model, cfg, family: Family, init: NSSolver, train, val) -> None:
        self.model, self.cfg, self.family, self.init = model, cfg, family, init
        self.train, self.val = train, val

    def set_lr(self, opt: torch.optim.Optimizer, backoff: float, schedule: float) -> None:
        """Every group's learning rate: ``cfg.lr * backoff * schedule * lr_mult``."""
        for group in opt.param_groups:
            group["lr"] = self.cfg.lr * backoff * schedule * group["lr_mult"]

    def gradient(self, gen: torch.Generator) -> tuple[float, list, list | None]:
        """The loss on ``batch_size`` training pairs drawn with replacement, the trained
        parameters and their gradients (None when not finite), summed over ``torchrun``'s
        workers."""
        cfg = self.cfg
        idx = torch.randint(len(self.train), (cfg.batch_size,), generator=gen)
        params = [p for p in self.family.parameters() if p.requires_grad]

        def step(part: torch.Tensor) -> tuple[float, list[torch.Tensor] | None]:
            kw = dict(micro_batch=cfg.micro_batch, checkpoint=cfg.grad_checkpoint, loss=cfg.loss)
            batch = self.train[part.to(self.train.x0.device)]
            return loss_and_grad(self.family, self.model, batch, cfg.guidance, **kw)

        # Each worker takes its share of the global batch; the gradients are summed over them.
        loss, grads, _ = executor.current().data_parallel(step, idx, params, self.model)
        return loss, params, grads

    def validate(self) -> tuple[float, NSSolver]:
        """The mean validation PSNR of the current parameters and their (detached) solver."""
        cfg = self.cfg
        solver = self.family.solver().detach()
        if not strictly_increasing(solver.times):
            return math.nan, solver  # an overshoot: the loop goes back to the best
        psnr = evaluate_psnr(
            self.model, solver, self.val, cfg.guidance, cfg.eval_batch_size, cfg.data_range
        )
        return float(psnr.mean()), solver

    def kept(self, step: int, solver: NSSolver) -> NSSolver:
        """The solver to keep as the best: the initial solver (step 0) as it is, not rebuilt
        from parameters."""
        return self.init.detach() if step == 0 else solver


class _Loop:
    """The optimization of an :class:`Objective` (by default :func:`distill`'s, of ``family``
    on ``train`` and ``val``): learning-rate schedule, validation, best/revert, patience,
    checkpoint state. ``step`` is the step index (patience moves it on to the Gauss-Newton
    steps); ``steps_run`` counts the optimizer steps taken."""

    SCALARS = ("step", "lr_backoff", "skipped", "reverts", "bad_rounds", "elapsed", "gn_lam")
    SCALARS += ("gn_stall", "gn_rejections", "steps_run", "stopped_by_budget", "step_cost")

    def __init__(
        self, model, cfg, family: Family, init, train, val, callback, ledger=None, objective=None
    ) -> None:
        self.model, self.cfg, self.family, self.init = model, cfg, family, init
        self.train, self.val, self.callback = train, val, callback
        self.objective = objective or Objective(model, cfg, family, init, train, val)
        self.ledger = ledger if ledger is not None else Ledger()
        torch.manual_seed(cfg.seed)
        coef = coef_lr_mult(model, cfg)
        self.opt = torch.optim.Adam(family.param_groups(cfg.lr, coef), lr=cfg.lr)
        self.gen = torch.Generator().manual_seed(cfg.seed)
        self.step = self.skipped = self.reverts = self.bad_rounds = self.gn_stall = 0
        self.gn_rejections = self.steps_run = 0
        self.gn_rejected = self.stopped_by_budget = False
        self.step_cost = 0.0  # what the last step (and its validation) cost, in budget units
        self.lr_backoff, self.elapsed, self.gn_lam = 1.0, 0.0, 1e-3
        self.history: dict[str, list] = {"step": [], "train_loss": [], "val_psnr": [], "lr": []}
        self.best, self.best_psnr, self.best_step = init.detach(), -math.inf, 0
        self.best_params = self._params_copy()

    def _params_copy(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in self.family.state_dict().items()}

    def _lr(self, step: int) -> float:
        return self.cfg.lr * self.lr_backoff * lr_schedule(self.cfg, step)

    def _validate(self, loss: float) -> None:
        cfg = self.cfg
        with torch.no_grad(), self.ledger.phase("validation", self.model):
            v, solver = self.objective.validate()
        for key, value in zip(self.history, (self.step, loss, v, self._lr(self.step))):
            self.history[key].append(value)
        if math.isfinite(v) and v > self.best_psnr:
            self.best = self.objective.kept(self.step, solver)
            self.best_psnr, self.best_step, self.bad_rounds = v, self.step, 0
            self.best_params = self._params_copy()
        else:
            self.bad_rounds += 1
            if not (v > self.best_psnr - cfg.revert_db):
                # Overshot: back to the best with half the learning rate, so one learning rate
                # serves a model at 35 dB and one at 70 dB alike.
                self.family.load_state_dict(self.best_params)
                self.opt.state.clear()
                self.lr_backoff *= 0.5
                self.reverts += 1
        if self.callback is not None:
            record = {"val_psnr": v, "train_loss": loss, "best": self.best_psnr}
            record.update(solver=solver, cost=self.ledger.to_dict())
            self.callback(self.step, record)

    def run(self, ckpt: Checkpoint | None, progress: bool) -> None:
        from tqdm.auto import tqdm

        cfg = self.cfg
        if not self.history["step"]:
            self._validate(math.nan)
        last = cfg.adam_steps + cfg.gn_steps
        bar = tqdm(
            total=last,
            initial=self.step,
            desc=f"distill nfe={cfg.nfe}",
            unit="step",
            disable=not progress,
            leave=False,
        )
        from .budget import parse_budget

        budget = parse_budget(cfg.budget) if cfg.budget is not None else None
        while self.step < last:
            spent = _spent(budget, self.ledger) if budget is not None else 0.0
            if budget is not None and spent + self.step_cost > budget.value:
                self.stopped_by_budget = True
                break  # the next step would cross the budget: keep the best so far
            if self.bad_rounds >= cfg.patience:
                if self.step >= cfg.adam_steps:
                    break
                # Adam has stalled: on to the Gauss-Newton steps (if any).
                bar.update(cfg.adam_steps - self.step)
                self.step, self.bad_rounds = cfg.adam_steps, 0
                continue
            t_start = time.perf_counter()
            gn = self.step >= cfg.adam_steps
            with self.ledger.phase("optimizer", self.model):
                # the Gauss-Newton steps come after Adam's
                loss = _gauss_newton(self) if gn else _adam(self)
            self.step += 1
            self.steps_run += 1
            at_round = self.step % cfg.val_every == 0 or self.step >= cfg.adam_steps
            if gn and self.gn_rejected:
                # Levenberg-Marquardt kept nothing: the solver is the one last validated.
                self.gn_stall += 1
                self.gn_rejections += 1
                at_round = False
            elif at_round:
                best = self.best_psnr
                self._validate(loss)
                bar.set_postfix(val=f"{self.history['val_psnr'][-1]:.2f}dB")
                gain = self.best_psnr - best if math.isfinite(best) else math.inf
                self.gn_stall = 0 if not gn or gain >= cfg.gn_min_gain else self.gn_stall + 1
            self.elapsed += time.perf_counter() - t_start
            if ckpt is not None and at_round:
                ckpt.save(_loop_state(self))
            bar.update(1)
            if self.skipped > cfg.max_skips:
                warnings.warn("bns: too many non-finite steps; stopping early", stacklevel=3)
                break
            if budget is not None:  # what one more step (and its validation) will cost
                self.step_cost = _spent(budget, self.ledger) - spent
            if gn and 0 < cfg.gn_patience <= self.gn_stall:
                break  # the last gn_patience steps gained less than gn_min_gain dB
        bar.close()


def _loop_state(loop: _Loop) -> dict[str, Any]:
    """Everything a checkpoint needs to continue ``loop`` to the same result."""
    scalars = {k: getattr(loop, k) for k in loop.SCALARS}
    best_psnr = loop.best_psnr if math.isfinite(loop.best_psnr) else None
    scalars.update(best_psnr=best_psnr, best_step=loop.best_step, history=loop.history)
    scalars.update(ledger=loop.ledger.to_dict())
    return {
        "params": loop.family.state_dict(),
        "opt": loop.opt.state_dict(),
        "gen": loop.gen.get_state(),
        "scalars": json.dumps(scalars),
        "best": json.dumps(loop.best.to_dict()),
        "best_params": loop.best_params,
    }


def _restore_loop(loop: _Loop, state: dict[str, Any]) -> None:
    loop.family.load_state_dict(state["params"])
    loop.opt.load_state_dict(state["opt"])
    loop.gen.set_state(state["gen"])
    s = json.loads(state["scalars"])
    s.setdefault("lr_backoff", s.get("lr_scale", 1.0))  # its older name
    s.setdefault("steps_run", s["step"])  # not recorded before: the step index
    for k in loop.SCALARS:
        setattr(loop, k, s.get(k, 0))
    loop.best_psnr = -math.inf if s["best_psnr"] is None else s["best_psnr"]
    loop.best_step, loop.history = s["best_step"], s["history"]
    done = Ledger.from_dict(
        s.get("ledger", {})
    )  # what the interrupted run spent before its checkpoint
    for name in ("optimizer", "validation"):
        loop.ledger.phases[name] = done[name]
    loop.best = loop.objective.solver_type.from_dict(json.loads(state["best"]))
    loop.best_params = state["best_params"]


def _training_evaluations(cost: Ledger) -> int:
    """Network forwards and JVPs of the optimizer steps and their validations."""
    return sum(cost[k].forwards + cost[k].jvps for k in ("optimizer", "validation"))


def _history(loop: _Loop, cost: Ledger) -> dict[str, Any]:
    h = dict(loop.history)
    h.update(best_step=loop.best_step, best_val_psnr=loop.best_psnr, steps_run=loop.steps_run)
    h.update(skipped=loop.skipped, reverts=loop.reverts, forwards=_training_evaluations(cost))
    h.update(wall_time_s=loop.elapsed, cost=cost.to_dict())
    h.update(stopped_by_budget=loop.stopped_by_budget, gn_rejected=loop.gn_rejections)
    return h


def _artifact_meta(model, cfg, end: str, loop: _Loop, train: Pairs, scores, cost) -> dict:
    """What the solver file records about how it was made."""
    return {
        "solver": "bns",
        "family": cfg.family,
        "model_name": model.name,
        "model_fingerprint": model.fingerprint(),
        "model_settings": model.settings(),
        "guidance": cfg.guidance,
        "nfe": cfg.nfe,
        "end": end,
        "network_forwards_per_sample": cfg.nfe * model.forwards_per_evaluation(cfg.guidance),
        "init": loop.init.meta["init"],
        "init_candidates_psnr": {k: v if math.isfinite(v) else None for k, v in scores.items()},
        "init_forwards": cost["ranking"].forwards,
        "config": cfg.to_dict(),
        "val_psnr": loop.best_psnr,
        "best_step": loop.best_step,
        "steps_run": loop.steps_run,  # the steps taken (fewer where patience stopped them)
        "train_forwards": _training_evaluations(cost),
        "ground_truth_nfe_per_sample": train.nfe_per_sample,
        "wall_time_s": round(loop.elapsed, 3),
        "skipped_steps": loop.skipped,
        "reverts": loop.reverts,
        "cost": cost.to_dict(),
        **({"span": model.span_info()} if model.parent is not None else {}),
    }
