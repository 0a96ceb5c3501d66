"""What a distillation run will cost, before it runs: ``bns distill --estimate``.

The work of every phase is known from the settings: a validation is ``val_pairs x nfe``
velocity evaluations, a Gauss-Newton step on ``B`` pairs is ``nfe x B`` forwards for the primal
run, ``nfe x B`` per Levenberg-Marquardt try, and ``B (nfe + sum_{s=1}^{nfe-1} (s + 2)(nfe - s))``
JVPs (the tangents of the coefficients that start acting at step ``s``, carried through the
``nfe - s`` remaining evaluations; :mod:`bns.gauss_newton`). Only two things are measured on the
user's model and device: the seconds of one forward and one JVP at the batch sizes the run will
use, and, where the cache does not already hold the pairs, the adaptive solver's evaluations per
sample, from a solve of a few pairs. The result is a :class:`bns.cost.Ledger` of predicted
forwards, JVPs and seconds per phase, the same one a run records in ``meta["cost"]``.

The optimizer and validation entries are upper bounds: they assume every Gauss-Newton step
runs, is accepted at the first try and is validated; the stopping rule (``gn_patience``)
usually ends the run earlier.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

from .classical import rank_work
from .config import DistillConfig, resolve_steps
from .cost import Ledger, Phase, uncounted
from .model import Model, frozen
from .solver import NSSolver
from .solvers.initial import distinct_solvers

__all__ = ["estimate_cost", "Estimator", "gn_step_work", "PILOT_PAIRS"]

PILOT_PAIRS = 16  # pairs of the one adaptive solve that measures its evaluations per sample
# A batch of 128 pairs takes more adaptive steps than a pilot of 16 (its steps follow its worst
# sample). With this factor the training split's ground truth on gmm and fmnist-cfg is
# predicted within 3% (benchmarks/results/estimate_*.md); another split can differ by 25%.
PILOT_TO_BATCH = 1.1


# Levenberg-Marquardt trial runs per Gauss-Newton step, on average: 1.4 to 1.8 over every run
# of benchmarks/time_to_solver.py (a step is tried again, with more damping, when it fails).
LM_TRIES = 1.5


def gn_step_work(nfe: int, pairs: int, tries: float = LM_TRIES) -> tuple[int, int]:
    """``(velocity evaluations, JVP evaluations)`` per sample-count of one Gauss-Newton step on
    ``pairs`` pairs: the primal run and ``tries`` Levenberg-Marquardt trial runs; the time
    tangents (one JVP per step) and the coefficients' tangents carried forward."""
    n = nfe
    evaluations = round(n * pairs * (1 + tries))
    jvps = n + sum((s + 2) * (n - s) for s in range(1, n))
    return evaluations, jvps * pairs


class _Clock:
    """Seconds of one velocity evaluation (or JVP, or forward and backward) of ``model`` at a
    batch size, measured on the model's device: the median of a few calls after a warm-up."""

    def __init__(
        self,
        model: Model,
        guidance: float,
        device: Any,
        repeats: int = 3,
        max_timed_batch: int | None = None,
    ) -> None:
        self.model, self.guidance, self.device, self.repeats = model, guidance, device, repeats
        self.max_timed_batch = max_timed_batch
        self._memo: dict[tuple[str, int], float] = {}

    def _inputs(self, b: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        g = torch.Generator().manual_seed(0)
        x = torch.randn(b, *self.model.sample_shape, generator=g).to(self.device)
        y = None
        if self.model.num_classes is not None:
            y = torch.randint(self.model.num_classes, (b,), generator=g).to(self.device)
        return x, y

    def _time(self, fn: Callable[[], Any]) -> float:
        sync = torch.cuda.synchronize if torch.device(self.device or "cpu").type == "cuda" else None
        times = []
        for i in range(self.repeats + 1):
            if sync:
                sync()
            t0 = time.perf_counter()
            fn()
            if sync:
                sync()
            if i:  # the first call warms up (allocations, kernels, forward-mode scripting)
                times.append(time.perf_counter() - t0)
        return statistics.median(times)

    def __call__(self, kind: str, b: int) -> float:
        b = max(1, int(b))
        cap = self.max_timed_batch
        if cap and b > cap:  # a large network fills the device well below this: scaled
            return self(kind, cap) * b / cap
        if b > 16:  # timed at the nearest power of two and scaled: few distinct timings
            p = 2 ** round(math.log2(b))
            return self(kind, p) * b / p if p != b else self._timed(kind, b)
        return self._timed(kind, b)

    def _timed(self, kind: str, b: int) -> float:
        if (kind, b) in self._memo:
            return self._memo[kind, b]
        import torch.autograd.forward_ad as fwAD

        from .gauss_newton import _forward_mode

        m, w = self.model, self.guidance
        x, y = self._inputs(b)
        t = torch.tensor(0.5 * sum(m.t_range), dtype=torch.float64)

        def forward() -> None:
            with torch.no_grad():
                m.velocity(x, t, y, w)

        def jvp() -> None:
            with _forward_mode():
                m.velocity(fwAD.make_dual(x, torch.ones_like(x)), t, y, w)

        def backward() -> None:
            xg = x.clone().requires_grad_(True)
            with torch.enable_grad():
                m.velocity(xg, t, y, w).square().sum().backward()

        fn = {"forward": forward, "jvp": jvp, "backward": backward}[kind]
        self._memo[kind, b] = self._time(fn)
        return self._memo[kind, b]

    def rate(self, kind: str, total: int, batch: int) -> float:
        """Seconds of ``total`` sample evaluations run ``batch`` at a time."""
        if total <= 0:
            return 0.0
        batch = max(1, min(batch, total))
        full, rest = divmod(total, batch)
        return full * self(kind, batch) + (self(kind, rest) if rest else 0.0)


def _warm_up_adaptive_solver(x0: torch.Tensor) -> None:
    """One tiny solve without the network, so that the pilot's time is the solver's steady
    cost (imports and first-call set-up excluded)."""
    from torchdiffeq import odeint

    t = torch.tensor([0.0, 1.0], dtype=torch.float64, device=x0.device)
    odeint(lambda t, x: -x, x0[:1].double(), t, rtol=1e-5, atol=1e-5, method="dopri5")


class Estimator:
    """Predicted ledgers for one model, guidance and device: the timings and the adaptive
    solver's evaluations per sample are measured once and shared by every config asked about
    (``--budget`` compares several)."""

    def __init__(
        self,
        model: Model,
        guidance: float,
        device: Any,
        cache: Any,
        repeats: int = 3,
        pilot_pairs: int = PILOT_PAIRS,
        max_timed_batch: int | None = None,
    ):
        self.model, self.guidance, self.device, self.cache = model, guidance, device, cache
        self.clock = _Clock(model, guidance, device, repeats, max_timed_batch)
        self.pilot_pairs = pilot_pairs
        self._gt: dict[tuple, tuple[float, float]] = {}  # (split, ...) -> (nfe, overhead)
        self._parent: Estimator | None = None

    def _gt_rate(self, cfg: DistillConfig, split: str, missing: int, batch: int, nfe: float):
        """Evaluations per sample of a batch and the solver's own seconds per evaluation."""
        key = (cfg.rtol, cfg.atol)  # the splits are alike: one pilot serves both
        if key in self._gt:
            return self._gt[key]
        overhead = 0.0  # the adaptive solver's own seconds per evaluation (its error norms, ...)
        if missing and not math.isfinite(nfe):  # a pilot solve of a few pairs
            from .ground_truth import ground_truth
            from .pairs import pair_noise

            k = min(self.pilot_pairs, batch)
            x0, y = pair_noise(self.model, cfg.seed, "train", range(k))
            x0, y = x0.to(self.device), None if y is None else y.to(self.device)
            _warm_up_adaptive_solver(x0)
            t0 = time.perf_counter()
            _, stats = ground_truth(
                self.model, x0, y, cfg.guidance, cfg.rtol, cfg.atol, return_stats=True
            )
            per_eval = (time.perf_counter() - t0) / stats["nfe"]
            overhead = max(0.0, per_eval - self.clock("forward", k))
            nfe = stats["nfe"] * (PILOT_TO_BATCH if batch > k else 1.0)
        self._gt[key] = (nfe, overhead)
        return nfe, overhead

    def ground_truth(self, cfg: DistillConfig, split: str, n: int, end: str) -> Phase:
        from .pairs import cached_pairs

        clock, fpe = self.clock, self.model.forwards_per_evaluation(cfg.guidance)
        have, nfe = cached_pairs(
            self.model,
            split,
            seed=cfg.seed,
            guidance=cfg.guidance,
            rtol=cfg.rtol,
            atol=cfg.atol,
            cache=self.cache,
        )
        missing = max(0, n - have)
        batch = min(cfg.gt_batch_size, max(missing, 1))
        nfe, overhead = self._gt_rate(cfg, split, missing, batch, nfe) if missing else (nfe, 0.0)
        evals = round(missing * nfe) if missing else 0
        full, rest = divmod(missing, batch)
        seconds = full * nfe * (clock("forward", batch) + overhead) if missing else 0.0
        seconds += nfe * (clock("forward", rest) + overhead) if rest else 0.0
        phase = Phase(forwards=evals * fpe, seconds=seconds)
        if end == "data":  # the step to sigma = 0: one evaluation per pair, cached or not
            phase.forwards += n * fpe
            phase.seconds += clock.rate("forward", n, cfg.gt_batch_size)
        if missing and self.model.starts_from_data:  # the samples its starts are made of
            from .solvers.ends import resolve_end

            parent = self._whole_range()
            data = parent.ground_truth(cfg, split, n, resolve_end(parent.model, "auto"))
            phase.forwards += data.forwards
            phase.seconds += data.seconds
        return phase

    def _whole_range(self) -> Estimator:
        """The estimator of a span's whole-range model: the same network, so the same clock."""
        if self._parent is None:
            self._parent = Estimator(
                self.model.parent, self.guidance, self.device, self.cache, 1, self.pilot_pairs
            )
            self._parent.clock = self.clock
        return self._parent

    def ledger(
        self, cfg: DistillConfig, end: str, candidates: list[NSSolver], pairs_given: bool = False
    ) -> Ledger:
        """The predicted cost of a run with ``cfg`` (steps resolved) by phase."""
        clock, n = self.clock, cfg.nfe
        fpe = self.model.forwards_per_evaluation(cfg.guidance)
        ledger = Ledger()
        for split, count in (("train", cfg.train_pairs), ("val", cfg.val_pairs)):
            ledger.phases[f"ground_truth_{split}"] = (
                Phase() if pairs_given else self.ground_truth(cfg, split, count, end)
            )
        # Ranking: the candidates on the first init_pairs validation pairs, by successive
        # halving, shared evaluations once (exact in the first round, a bound in the second).
        ranked = min(cfg.init_pairs, cfg.val_pairs) if len(candidates) > 1 else 0
        rounds = rank_work(candidates, ranked) if ranked else []
        ledger.phases["ranking"] = Phase(
            forwards=sum(evals * m for evals, m in rounds) * fpe,
            seconds=sum(
                evals * clock.rate("forward", m, cfg.eval_batch_size) for evals, m in rounds
            ),
        )
        # The optimizer: Adam steps, then Gauss-Newton steps (each as if it ran and was kept).
        opt = Phase()
        if cfg.adam_steps:
            opt.forwards += cfg.adam_steps * cfg.batch_size * n * fpe
            chunk = cfg.micro_batch or cfg.batch_size
            opt.seconds += cfg.adam_steps * n * clock.rate("backward", cfg.batch_size, chunk)
        if cfg.gn_steps:
            B = min(cfg.gn_batch_size, cfg.train_pairs)
            chunk = cfg.micro_batch or B
            evals, jvps = gn_step_work(n, B)
            opt.forwards += cfg.gn_steps * evals * fpe
            opt.jvps += cfg.gn_steps * jvps * fpe
            step = (1 + LM_TRIES) * n * clock.rate("forward", B, chunk)
            # The JVPs: the time tangents at the batch, then per start step s its s + 2
            # tangents stacked (at most 1024 samples per call) through n - s evaluations.
            step += n * clock.rate("jvp", B, chunk)
            for s in range(1, n):
                stack = min(max(1, cfg.gn_max_stack // chunk), s + 2) * chunk
                step += (n - s) * clock.rate("jvp", (s + 2) * B, stack)
            opt.seconds += cfg.gn_steps * step
        validations = 1 + (cfg.adam_steps + cfg.val_every - 1) // cfg.val_every + cfg.gn_steps
        per_val = n * clock.rate("forward", cfg.val_pairs, cfg.eval_batch_size)
        val = Phase(forwards=validations * cfg.val_pairs * n * fpe, seconds=validations * per_val)
        # Several starts: each its own steps and validations.
        k = min(cfg.starts, len(distinct_solvers(candidates))) if cfg.starts > 1 else 1
        for name, phase in (("optimizer", opt), ("validation", val)):
            ledger.phases[name] = Phase(k * phase.forwards, k * phase.jvps, k * phase.seconds)
        return ledger


def estimate_cost(
    model: Model,
    nfe: int | None = None,
    *,
    config: DistillConfig | None = None,
    cache: Any = True,
    device: torch.device | str | None = None,
    repeats: int = 3,
    pilot_pairs: int = PILOT_PAIRS,
    max_timed_batch: int | None = None,
    return_config: bool = False,
    **overrides: Any,
) -> Ledger | tuple[Ledger, DistillConfig]:
    """The predicted cost of ``bns.distill(model, nfe, config=config, **overrides)`` per phase
    (forwards, JVPs, seconds), from a few timed calls of the network; nothing is solved but a
    pilot of :data:`PILOT_PAIRS` pairs where the cache lacks the ground truth.

    Returns a :class:`bns.cost.Ledger` whose ``optimizer`` and ``validation`` entries assume
    every optimizer step runs (the most the run can spend there). With ``budget=`` set, the
    settings are those the budget chooses (:func:`bns.budget.fit_budget`). ``return_config``
    also returns the settings estimated (steps resolved, the budget's choices made).
    ``pilot_pairs`` sets the pilot solve's size; ``max_timed_batch`` times no call of more
    pairs than that (larger ones scale linearly: a large network fills a GPU well below).
    """
    from .train import _end, _supports_forward_mode, candidate_solvers, spanned

    cfg = config or DistillConfig(nfe=0 if nfe is None else int(nfe))
    if nfe is not None:
        overrides["nfe"] = nfe
    cfg = cfg.replace(**overrides)
    cfg.check()
    model = spanned(model, cfg.span)
    device = torch.device(device) if device is not None else model.device or torch.device("cpu")
    with frozen(model), uncounted(model):  # an estimate, not work
        cfg = resolve_steps(cfg, lambda: _supports_forward_mode(model, cfg, device))
        est = Estimator(model, cfg.guidance, device, cache, repeats, pilot_pairs, max_timed_batch)
        end, candidates = _end(model, cfg), candidate_solvers(model, cfg)
        if cfg.budget is not None:
            from .budget import fit_budget

            cfg, _ = fit_budget(cfg, est, end, candidates)
        ledger = est.ledger(cfg, end, candidates)
        return (ledger, cfg) if return_config else ledger
