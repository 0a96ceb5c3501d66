"""Distillation: learn a BNS solver for a model from ground-truth pairs (bns-math.md, section 4).

Parameters: ``n`` time increments (a softmax of free logits, so times stay strictly increasing
with fixed ends), ``a`` (n values) and the lower triangle of ``b``. Loss: the mean over samples
of ``log MSE(x_n, x(1))``, end to end through every step, the network's inputs and its times;
the network's own weights stay frozen. Adam with cosine decay; the validation PSNR is measured
every ``val_every`` steps and the best solver is kept (the initial solver counts as step 0, so
zero steps return it exactly). A non-finite loss or gradient skips the step and halves the
learning rate. Checkpoints make ``resume=True`` continue a killed run to the same result.
"""

from __future__ import annotations

import json
import math
import os
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from . import grids
from .metrics import psnr
from .pairs import Pairs, make_pairs
from .schedules import CondOT
from .solver import NSSolver, sample
from .transforms import precondition as _precondition

__all__ = ["distill", "DistillConfig", "initial_solver", "evaluate_psnr", "TrainingError"]


class TrainingError(RuntimeError):
    """Distillation could not run (bad settings, a checkpoint that does not fit, ...)."""


@dataclass
class DistillConfig:
    """Everything that determines a distillation run (recorded in the artifact)."""

    nfe: int
    guidance: float = 1.0
    init: str = "auto"
    precondition: float | str | None = "auto"
    train_pairs: int = 520
    val_pairs: int = 1024
    steps: int = 1000
    batch_size: int = 40
    lr: float = 5e-3
    lr_final: float = 0.1  # cosine decay to lr * lr_final
    warmup: int = 25  # linear warm-up steps
    revert_db: float = 1.0  # a validation this far below the best: back to it, lr halved
    val_every: int = 25
    patience: int = 20  # validation rounds without improvement before stopping
    seed: int = 0
    grad_checkpoint: bool = False
    rtol: float = 1e-5
    atol: float = 1e-5
    data_range: float = 2.0
    max_skips: int = 20
    coef_lr_scale: float = 8.0  # learning rate of a, b relative to lr, times the mean step


def resolve_precondition(model: Any, init: str, precondition: float | str | None) -> float | None:
    """``"auto"``: sigma0 = 1 (the paper's choice, and the best of 0.5, 1, 2 in
    benchmarks/results/precondition_gmm-vp.md) for euler/midpoint inits, except on a CondOT model,
    where that change of scheduler is the identity and is skipped."""
    if precondition != "auto":
        return None if precondition is None else float(precondition)
    if init not in ("auto", "euler", "midpoint") or model.schedule == CondOT():
        return None
    return 1.0


def initial_solver(
    model: Any, nfe: int, init: str = "auto", precondition: float | str | None = "auto"
):
    """The classical solver BNS starts from, as an NS solver with strictly increasing times.

    ``init``: "auto" (midpoint for even ``nfe``, euler for odd), "euler" or "midpoint" on a
    uniform grid, or any name of :func:`bns.solvers.by_name` (its best grid). With
    ``precondition = sigma0`` the RK solvers run on the model's ODE changed to the scheduler
    ``abar = r, sigmabar = sigma0 (1 - r)`` (bns-math.md, section 3).
    """
    from . import solvers

    precondition = resolve_precondition(model, init, precondition)
    if init == "auto":
        init = "midpoint" if nfe % 2 == 0 else "euler"
    if init in ("euler", "midpoint"):
        stages = 1 if init == "euler" else 2
        if nfe % stages:
            raise TrainingError(f"init {init} needs an NFE divisible by {stages}, got {nfe}")
        if precondition is not None:
            transform = _precondition(model.schedule, precondition)
            grid = grids.uniform(nfe // stages, transform.r_range(model.t_range))
            solver = getattr(solvers, init)(grid, transform=transform)
        else:
            solver = getattr(solvers, init)(grids.uniform(nfe // stages, model.t_range))
    else:
        if precondition is not None:
            raise TrainingError("preconditioning applies to the euler and midpoint inits")
        by_name = getattr(solvers, "by_name", None)
        if by_name is None:
            raise TrainingError(f"unknown init {init!r}")
        try:
            solver = by_name(init, nfe, model)
        except ValueError as e:
            raise TrainingError(str(e)) from None
    if solver.nfe != nfe:
        raise TrainingError(f"init {init} has NFE {solver.nfe}, not {nfe}")
    if not torch.all(solver.times[1:] > solver.times[:-1]):
        raise TrainingError(
            f"init {init} evaluates twice at one time (repeated stage times); BNS needs strictly"
            " increasing times: use euler, midpoint or a multistep/exponential solver"
        )
    # Pin the ends to the model's range exactly (transforms round at the last ulp).
    solver.times[0], solver.times[-1] = model.t_range
    return solver


class _Params(nn.Module):
    """Free parameters of an NS solver; :meth:`solver` builds the differentiable NSSolver."""

    def __init__(self, init: NSSolver) -> None:
        super().__init__()
        n = init.nfe
        t = init.times
        self.register_buffer("t_ends", t[[0, -1]].clone())
        self.logits = nn.Parameter(torch.log(t[1:] - t[:-1]))
        self.a = nn.Parameter(init.a.clone())
        self.b = nn.Parameter(init.b.clone())
        self.register_buffer("mask", torch.tril(torch.ones(n, n, dtype=torch.float64)))

    def solver(self) -> NSSolver:
        t0, t1 = self.t_ends
        dt = torch.softmax(self.logits, 0) * (t1 - t0)
        times = torch.cat([t0[None], t0 + torch.cumsum(dt, 0)])
        times = torch.cat([times[:-1], t1[None]])  # the end exactly, not a rounded sum
        return NSSolver(times, self.a, self.b * self.mask)


def evaluate_psnr(
    model: Any,
    solver: NSSolver,
    pairs: Pairs,
    guidance: float = 1.0,
    batch_size: int = 256,
    data_range: float = 2.0,
) -> Tensor:
    """Per-sample PSNR of ``solver`` against the pairs' ground truth (no gradients)."""
    out = []
    with torch.no_grad():
        for s in range(0, len(pairs), batch_size):
            p = pairs[s : s + batch_size]
            x = sample(model, p.x0, solver, p.y, guidance)
            out.append(psnr(x, p.x1, data_range))
    return torch.cat(out)


def _log_mse_loss(x: Tensor, ref: Tensor) -> Tensor:
    d = (x - ref.to(x.dtype)).reshape(x.shape[0], -1)
    return torch.log((d * d).mean(1)).mean()


def distill(
    model: Any,
    nfe: int,
    *,
    guidance: float = 1.0,
    init: str = "auto",
    precondition: float | str | None = "auto",
    train_pairs: int = 520,
    val_pairs: int = 1024,
    steps: int = 1000,
    batch_size: int = 40,
    lr: float = 5e-3,
    val_every: int = 25,
    patience: int = 20,
    seed: int = 0,
    grad_checkpoint: bool = False,
    pairs: tuple[Pairs, Pairs] | None = None,
    cache: bool | str | os.PathLike = True,
    checkpoint_path: str | os.PathLike | None = None,
    resume: bool = False,
    progress: bool = True,
    callback: Callable[[int, dict[str, Any]], None] | None = None,
    **config: Any,
) -> tuple[NSSolver, dict[str, Any]]:
    """Learn a BNS solver of ``nfe`` velocity evaluations for ``model`` at ``guidance``.

    Args:
        model: a :class:`bns.Model`.
        nfe: steps of the solver (velocity evaluations; a guided one is 2 network forwards).
        init: the initial classical solver (see :func:`initial_solver`).
        precondition: ``sigma0`` of the CondOT scheduler change applied to the initial solver,
            None for none, or "auto" (see :func:`resolve_precondition`).
        train_pairs, val_pairs: ground-truth pairs (from the cache or computed).
        steps, batch_size, lr, val_every, patience: the optimization.
        grad_checkpoint: recompute each step in the backward pass (memory of about one step).
        pairs: ``(train, val)`` pairs to use instead of computing them.
        checkpoint_path: where to write periodic checkpoints; ``resume=True`` continues from it.
        callback: ``callback(step, record)`` after every validation.

    Returns:
        ``(solver, history)``: the best solver (validated) and the training history.
    """
    cfg = DistillConfig(
        nfe=int(nfe),
        guidance=float(guidance),
        init=init,
        precondition=precondition,
        train_pairs=int(train_pairs),
        val_pairs=int(val_pairs),
        steps=int(steps),
        batch_size=int(batch_size),
        lr=float(lr),
        val_every=int(val_every),
        patience=int(patience),
        seed=int(seed),
        grad_checkpoint=bool(grad_checkpoint),
        **config,
    )
    _check_config(model, cfg)
    cfg.precondition = resolve_precondition(model, cfg.init, cfg.precondition)
    init_solver = initial_solver(model, cfg.nfe, cfg.init, cfg.precondition)
    if pairs is None:
        kw = dict(
            seed=cfg.seed,
            guidance=cfg.guidance,
            rtol=cfg.rtol,
            atol=cfg.atol,
            cache=cache,
            progress=progress,
        )
        train = make_pairs(model, cfg.train_pairs, "train", **kw)
        val = make_pairs(model, cfg.val_pairs, "val", **kw)
    else:
        train, val = pairs
        # Record what was used, not the defaults.
        cfg.train_pairs, cfg.val_pairs = len(train), len(val)
    return _Trainer(model, cfg, init_solver, train, val, checkpoint_path, progress, callback).run(
        resume
    )


def _check_config(model: Any, cfg: DistillConfig) -> None:
    if cfg.nfe < 1:
        raise TrainingError(f"nfe must be at least 1, got {cfg.nfe}")
    if cfg.steps < 0 or cfg.batch_size < 1 or cfg.val_every < 1 or not cfg.lr > 0:
        raise TrainingError("steps >= 0, batch_size >= 1, val_every >= 1 and lr > 0 are required")
    if cfg.train_pairs < 1 or cfg.val_pairs < 1:
        raise TrainingError("train_pairs and val_pairs must be at least 1")
    if cfg.guidance != 1.0 and model.num_classes is None:
        raise TrainingError(f"{model.name} is unconditional: guidance must be 1")


class _Trainer:
    def __init__(self, model, cfg, init_solver, train, val, checkpoint_path, progress, callback):
        self.model, self.cfg = model, cfg
        self.init_solver = init_solver
        self.train, self.val = train, val
        self.ckpt = Path(checkpoint_path) if checkpoint_path else None
        self.progress, self.callback = progress, callback
        torch.manual_seed(cfg.seed)
        self.params = _Params(init_solver)
        # The coefficients a, b of step i are of the size of the step (b ~ h = range / n): their
        # learning rate scales with it, so Adam's unit-size steps move every parameter by the
        # same relative amount whatever the NFE. The time logits are already relative.
        coef = cfg.coef_lr_scale * (model.t_range[1] - model.t_range[0]) / cfg.nfe
        self.opt = torch.optim.Adam(
            [
                {"params": [self.params.logits], "lr_mult": 1.0},
                {"params": [self.params.a, self.params.b], "lr_mult": coef},
            ],
            lr=cfg.lr,
        )
        self.gen = torch.Generator().manual_seed(cfg.seed)
        self.step = 0
        self.lr_scale = 1.0  # halved on every non-finite step
        self.skipped = 0
        self.reverts = 0
        self.best_params = {k: v.detach().clone() for k, v in self.params.state_dict().items()}
        self.bad_rounds = 0
        self.elapsed = 0.0
        self.forwards = 0
        self.history: dict[str, list] = {"step": [], "train_loss": [], "val_psnr": [], "lr": []}
        self.best = init_solver.detach()
        self.best_psnr = -math.inf
        self.best_step = 0

    # -- checkpoints ------------------------------------------------------------------------
    def _fingerprint(self) -> str:
        return json.dumps(
            {
                "model": self.model.fingerprint(),
                "cfg": asdict(self.cfg),
                "train": len(self.train),
                "val": len(self.val),
            },
            sort_keys=True,
        )

    def _save_checkpoint(self) -> None:
        state = {
            "fingerprint": self._fingerprint(),
            "params": self.params.state_dict(),
            "opt": self.opt.state_dict(),
            "gen": self.gen.get_state(),
            "scalars": json.dumps(
                {
                    "step": self.step,
                    "lr_scale": self.lr_scale,
                    "skipped": self.skipped,
                    "reverts": self.reverts,
                    "bad_rounds": self.bad_rounds,
                    "elapsed": self.elapsed,
                    "forwards": self.forwards,
                    "best_psnr": self.best_psnr if math.isfinite(self.best_psnr) else None,
                    "best_step": self.best_step,
                    "history": self.history,
                }
            ),
            "best": json.dumps(self.best.to_dict()),
            "best_params": self.best_params,
        }
        tmp = self.ckpt.with_name(self.ckpt.name + ".tmp")
        self.ckpt.parent.mkdir(parents=True, exist_ok=True)
        torch.save(state, tmp)
        os.replace(tmp, self.ckpt)

    def _load_checkpoint(self) -> bool:
        if self.ckpt is None or not self.ckpt.exists():
            return False
        try:
            state = torch.load(self.ckpt, weights_only=True)
            fp = state["fingerprint"]
        except Exception as e:  # noqa: BLE001 - any unreadable checkpoint is an error here
            raise TrainingError(f"cannot read checkpoint {self.ckpt}: {e}") from None
        if fp != self._fingerprint():
            raise TrainingError(
                f"checkpoint {self.ckpt} belongs to another model or other settings; remove it"
                " or run without --resume"
            )
        self.params.load_state_dict(state["params"])
        self.opt.load_state_dict(state["opt"])
        self.gen.set_state(state["gen"])
        s = json.loads(state["scalars"])
        self.step, self.lr_scale, self.skipped = s["step"], s["lr_scale"], s["skipped"]
        self.bad_rounds, self.elapsed, self.forwards = s["bad_rounds"], s["elapsed"], s["forwards"]
        self.best_psnr = -math.inf if s["best_psnr"] is None else s["best_psnr"]
        self.best_step, self.history = s["best_step"], s["history"]
        self.best = NSSolver.from_dict(json.loads(state["best"]))
        self.best_params = state["best_params"]
        self.reverts = s["reverts"]
        return True

    # -- the loop ---------------------------------------------------------------------------
    def _lr(self, step: int) -> float:
        c = self.cfg
        frac = min(step / max(c.steps, 1), 1.0)
        cos = 0.5 * (1 + math.cos(math.pi * frac))
        warm = min(1.0, (step + 1) / c.warmup) if c.warmup > 0 else 1.0
        return c.lr * self.lr_scale * warm * (c.lr_final + (1 - c.lr_final) * cos)

    def _validate(self, solver: NSSolver, loss: float) -> None:
        f0 = self.model.forwards
        val = evaluate_psnr(
            self.model, solver, self.val, self.cfg.guidance, data_range=self.cfg.data_range
        )
        self.forwards += self.model.forwards - f0
        v = float(val.mean())
        self.history["step"].append(self.step)
        self.history["train_loss"].append(loss)
        self.history["val_psnr"].append(v)
        self.history["lr"].append(self._lr(self.step))
        if math.isfinite(v) and v > self.best_psnr:
            # The initial solver (step 0) is kept as it is, not rebuilt from parameters.
            self.best = self.init_solver.detach() if self.step == 0 else solver.detach()
            self.best_psnr, self.best_step, self.bad_rounds = v, self.step, 0
            self.best_params = {k: v.detach().clone() for k, v in self.params.state_dict().items()}
        else:
            self.bad_rounds += 1
            if not (v > self.best_psnr - self.cfg.revert_db):
                # Overshot: go back to the best parameters with half the learning rate, so one
                # learning rate serves a model at 35 dB and one at 70 dB alike.
                self.params.load_state_dict(self.best_params)
                self.opt.state.clear()
                self.lr_scale *= 0.5
                self.reverts += 1
        if self.callback is not None:
            self.callback(self.step, {"val_psnr": v, "train_loss": loss, "best": self.best_psnr})

    def run(self, resume: bool) -> tuple[NSSolver, dict[str, Any]]:
        from tqdm.auto import tqdm

        cfg = self.cfg
        resumed = resume and self._load_checkpoint()
        if resume and not resumed and self.ckpt is not None:
            warnings.warn(
                f"bns: no checkpoint at {self.ckpt}; starting from the beginning", stacklevel=2
            )
        net = self.model.net
        frozen = (
            [p for p in net.parameters() if p.requires_grad] if isinstance(net, nn.Module) else []
        )
        was_training = net.training if isinstance(net, nn.Module) else False
        for p in frozen:
            p.requires_grad_(False)
        if isinstance(net, nn.Module):
            net.eval()
        try:
            if self.step == 0 and not self.history["step"]:
                with torch.no_grad():
                    self._validate(self.params.solver(), float("nan"))
            bar = tqdm(
                total=cfg.steps,
                initial=self.step,
                desc=f"distill nfe={cfg.nfe}",
                unit="step",
                disable=not self.progress,
                leave=False,
            )
            last_loss = float("nan")
            while self.step < cfg.steps and self.bad_rounds < cfg.patience:
                t_start = time.perf_counter()
                last_loss = self._train_step()
                self.step += 1
                if self.step % cfg.val_every == 0 or self.step == cfg.steps:
                    with torch.no_grad():
                        self._validate(self.params.solver(), last_loss)
                    bar.set_postfix(
                        val=f"{self.history['val_psnr'][-1]:.2f}dB", best=f"{self.best_psnr:.2f}dB"
                    )
                self.elapsed += time.perf_counter() - t_start
                if self.ckpt is not None and (
                    self.step % cfg.val_every == 0 or self.step == cfg.steps
                ):
                    self._save_checkpoint()
                bar.update(1)
                if self.skipped > cfg.max_skips:
                    warnings.warn("bns: too many non-finite steps; stopping early", stacklevel=2)
                    break
            bar.close()
        finally:
            for p in frozen:
                p.requires_grad_(True)
            if was_training:
                net.train()
        return self._result()

    def _train_step(self) -> float:
        cfg = self.cfg
        for group in self.opt.param_groups:
            group["lr"] = self._lr(self.step) * group["lr_mult"]
        idx = torch.randint(len(self.train), (cfg.batch_size,), generator=self.gen)
        batch = self.train[idx]
        f0 = self.model.forwards
        self.opt.zero_grad(set_to_none=True)
        x = sample(
            self.model,
            batch.x0,
            self.params.solver(),
            batch.y,
            cfg.guidance,
            checkpoint=cfg.grad_checkpoint,
        )
        loss = _log_mse_loss(x, batch.x1)
        if torch.isfinite(loss):
            loss.backward()
        self.forwards += self.model.forwards - f0
        grads_ok = torch.isfinite(loss) and all(
            p.grad is not None and torch.all(torch.isfinite(p.grad))
            for p in self.params.parameters()
        )
        if not grads_ok:
            self.skipped += 1
            self.lr_scale *= 0.5
            self.opt.zero_grad(set_to_none=True)
            return float("nan")
        self.opt.step()
        return float(loss.detach())

    def _result(self) -> tuple[NSSolver, dict[str, Any]]:
        cfg, model = self.cfg, self.model
        solver = self.best
        solver.meta = {
            "solver": "bns",
            "model_name": model.name,
            "model_fingerprint": model.fingerprint(),
            "model_settings": model.settings(),
            "guidance": cfg.guidance,
            "nfe": cfg.nfe,
            "network_forwards_per_sample": cfg.nfe
            * (2 if model.num_classes and cfg.guidance != 1 else 1),
            "init": cfg.init
            if cfg.init != "auto"
            else ("midpoint" if cfg.nfe % 2 == 0 else "euler"),
            "config": asdict(cfg),
            "val_psnr": self.best_psnr,
            "best_step": self.best_step,
            "steps_run": self.step,
            "train_forwards": self.forwards,
            "ground_truth_nfe_per_sample": self.train.nfe_per_sample,
            "wall_time_s": round(self.elapsed, 3),
            "skipped_steps": self.skipped,
            "reverts": self.reverts,
        }
        solver.validate(t_range=model.t_range, strict=True)
        history = dict(self.history)
        history.update(
            best_step=self.best_step,
            best_val_psnr=self.best_psnr,
            steps_run=self.step,
            skipped=self.skipped,
            reverts=self.reverts,
            forwards=self.forwards,
            wall_time_s=self.elapsed,
        )
        return solver, history
