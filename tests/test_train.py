"""BNS distillation: identity at zero steps, frozen network, robustness, checkpoints and resume,
and the gain over its initialization on held-out pairs."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn

import bns
from bns.evaluate import evaluate_psnr
from bns.models.gmm import gaussian_mixture_model
from bns.pairs import make_pairs
from bns.solvers import init_candidates, initial_solver
from bns.train import TrainingError, distill


@pytest.fixture(scope="module")
def model():
    return gaussian_mixture_model(dim=24, components=6, num_classes=3, std=0.1, seed=5)


@pytest.fixture(scope="module")
def data(model, tmp_path_factory):
    folder = tmp_path_factory.mktemp("cache")
    kw = dict(cache=folder, progress=False)
    return make_pairs(model, 64, "train", **kw), make_pairs(model, 32, "val", **kw)


def _same(s1, s2):
    return torch.equal(s1.times, s2.times) and torch.equal(s1.a, s2.a) and torch.equal(s1.b, s2.b)


@pytest.mark.parametrize(
    "nfe,init,precondition",
    [(4, "midpoint", None), (5, "euler", None), (6, "midpoint", 1.0), (6, "ab3", 0.5)],
)
def test_zero_steps_return_the_initial_solver(model, data, nfe, init, precondition):
    solver, hist = distill(
        model, nfe, adam_steps=0, pairs=data, progress=False, init=init, precondition=precondition
    )
    assert _same(solver, initial_solver(model, nfe, init, precondition=precondition))
    assert hist["steps_run"] == 0 and len(hist["val_psnr"]) == 1
    # CondOT on [0, 1]: uniform time is the only grid, so the label names it.
    assert solver.meta["init"] == init + (
        "@uniform" if precondition is None else f"+pc{precondition:g}"
    )


def test_init_is_the_classical_solver(model):
    s = initial_solver(model, 6, "midpoint")
    ref = bns.solvers.midpoint(bns.grids.uniform(3, model.t_range))
    assert _same(s, ref)
    with pytest.raises(ValueError, match="multiple"):
        initial_solver(model, 5, "midpoint")
    with pytest.raises(ValueError, match="share times"):
        initial_solver(model, 8, "rk4")
    with pytest.raises(TrainingError, match="unknown init"):
        distill(model, 4, init="nope", adam_steps=0, cache=False, train_pairs=2, val_pairs=2)


def test_training_improves_validation_and_keeps_the_best(model, data):
    solver, hist = distill(
        model, 4, adam_steps=60, val_every=10, lr=5e-3, pairs=data, progress=False
    )
    assert hist["best_val_psnr"] == max(hist["val_psnr"])
    assert hist["best_val_psnr"] > hist["val_psnr"][0] + 3.0
    val_psnr = evaluate_psnr(model, solver, data[1]).mean().item()
    assert math.isclose(val_psnr, solver.meta["val_psnr"], rel_tol=1e-6)
    assert torch.all(solver.times[1:] > solver.times[:-1])
    assert solver.times[0] == model.t_range[0] and solver.times[-1] == model.t_range[1]
    meta = solver.meta
    assert meta["model_fingerprint"] == model.fingerprint() and meta["nfe"] == 4
    assert meta["train_forwards"] > 0 and meta["wall_time_s"] > 0
    assert meta["config"]["lr"] == 5e-3 and meta["config"]["train_pairs"] == 64


class _MLP(nn.Module):
    """A small velocity network whose weights must stay untouched."""

    def __init__(self, dim):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim + 1, 32), nn.Tanh(), nn.Linear(32, dim))

    def forward(self, x, t, y=None):
        return self.net(torch.cat([x, t[:, None].to(x.dtype)], 1))


def test_network_weights_are_frozen_and_restored():
    torch.manual_seed(0)
    net = _MLP(6)
    m = bns.Model(net, "velocity", bns.schedules.CondOT(), (6,), name="mlp")
    before = {k: v.clone() for k, v in net.state_dict().items()}
    x0 = torch.randn(16, 6)
    with torch.no_grad():
        x1 = bns.sample(m, x0, bns.solvers.rk4(bns.grids.uniform(20)))
    pairs = bns.pairs.Pairs(x0, x1, None)
    solver, hist = distill(
        m, 4, adam_steps=5, val_every=5, pairs=(pairs, pairs), progress=False, batch_size=8
    )
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k])
    assert all(p.grad is None and p.requires_grad for p in net.parameters())
    assert hist["steps_run"] == 5


def test_non_finite_steps_are_skipped_and_never_corrupt_the_best(model, data):
    calls = {"n": 0}
    real = model.velocity

    class Flaky:
        """The model, with NaN velocities during the 3rd and 4th training steps."""

        def __getattr__(self, name):
            return getattr(model, name)

        def velocity(self, x, t, y=None, guidance=1.0):
            u = real(x, t, y, guidance)
            if x.requires_grad or torch.is_grad_enabled():
                calls["n"] += 1
                if 2 * 4 < calls["n"] <= 4 * 4:
                    return u * float("nan")
            return u

    solver, hist = distill(Flaky(), 4, adam_steps=12, val_every=3, pairs=data, progress=False)
    assert hist["skipped"] == 2
    assert all(math.isfinite(v) for v in hist["val_psnr"])
    assert torch.all(torch.isfinite(solver.a)) and torch.all(torch.isfinite(solver.b))
    assert solver.meta["skipped_steps"] == 2


def test_guidance_needs_a_conditional_model():
    m = gaussian_mixture_model(dim=4, components=2, num_classes=None)
    with pytest.raises(TrainingError, match="unconditional"):
        distill(
            m,
            4,
            guidance=2.0,
            adam_steps=0,
            cache=False,
            train_pairs=2,
            val_pairs=2,
            progress=False,
        )


def test_grad_checkpointing_gives_the_same_solver(model, data):
    kw = dict(adam_steps=6, val_every=3, pairs=data, progress=False)
    s1, _ = distill(model, 4, **kw)
    s2, _ = distill(model, 4, grad_checkpoint=True, **kw)
    assert torch.allclose(s1.b, s2.b, atol=1e-6) and torch.allclose(s1.times, s2.times, atol=1e-9)


def test_save_load_gives_identical_samples(model, data, tmp_path):
    solver, _ = distill(
        model, 4, adam_steps=6, val_every=3, pairs=data, progress=False, guidance=1.5
    )
    path = solver.save(tmp_path / "s.json")
    loaded = bns.NSSolver.load(path, model=model, guidance=1.5)
    x0, y = data[1].x0, data[1].y
    assert torch.equal(bns.sample(model, x0, solver, y, 1.5), bns.sample(model, x0, loaded, y, 1.5))
    with pytest.raises(bns.SolverFileError, match="guidance"):
        bns.NSSolver.load(path, model=model, guidance=2.0)
    other = gaussian_mixture_model(dim=24, components=6, num_classes=3, std=0.1, seed=6)
    with pytest.raises(bns.SolverFileError, match="trained for model"):
        bns.NSSolver.load(path, model=other)
    bns.NSSolver.load(path, model=other, force=True)


# The run of the kill-and-resume test: the same settings in the script and in this process.
_RUN = dict(adam_steps=40, val_every=5, train_pairs=48, val_pairs=16, guidance=1.5)
_SCRIPT = r"""
import json, sys, time, torch
torch.set_num_threads(1)
from bns.models.gmm import gaussian_mixture_model
from bns.train import distill
ckpt, out, cache = sys.argv[1:4]
model = gaussian_mixture_model(dim=24, components=6, num_classes=3, std=0.1, seed=5)
def slow(step, record):
    time.sleep(0.4)
solver, hist = distill(model, 4, cache=cache, progress=False, checkpoint_path=ckpt,
                       callback=slow, **RUN)
json.dump(solver.to_dict(), open(out, "w"))
""".replace("**RUN", "**" + repr(_RUN))


def test_kill_and_resume_ends_with_the_same_solver(model, tmp_path, one_thread):
    """A run killed (SIGKILL) in its process, resumed from its checkpoint here, ends where the
    uninterrupted run ends (the same model as the script's: the fixture's)."""
    script = tmp_path / "run.py"
    script.write_text(_SCRIPT)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(Path(bns.__file__).parents[1]))
    ckpt, cache, never = tmp_path / "s.ckpt", tmp_path / "cache", tmp_path / "never.json"
    proc = subprocess.Popen(
        [sys.executable, str(script), str(ckpt), str(never), str(cache)], env=env
    )
    deadline = time.time() + 240
    while time.time() < deadline:
        if ckpt.exists():
            state = torch.load(ckpt, weights_only=True)
            if json.loads(state["scalars"])["step"] >= 10:
                break
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    step_at_kill = json.loads(torch.load(ckpt, weights_only=True)["scalars"])["step"]
    assert 10 <= step_at_kill < 40 and not never.exists()
    # The resumed run and the uninterrupted one, on the cache the killed run filled.
    resumed, _ = distill(
        model, 4, cache=cache, progress=False, checkpoint_path=ckpt, resume=True, **_RUN
    )
    plain, _ = distill(model, 4, cache=cache, progress=False, **_RUN)
    ref = json.loads(json.dumps(plain.to_dict()))  # through JSON, as the script writes them
    res = json.loads(json.dumps(resumed.to_dict()))
    for key in ("times", "a", "b"):
        assert ref[key] == res[key]
    assert ref["meta"]["val_psnr"] == res["meta"]["val_psnr"]
    assert ref["meta"]["best_step"] == res["meta"]["best_step"]


def test_resume_refuses_a_checkpoint_of_other_settings(model, data, tmp_path):
    ckpt = tmp_path / "x.ckpt"
    distill(model, 4, adam_steps=4, val_every=2, pairs=data, progress=False, checkpoint_path=ckpt)
    with pytest.raises(TrainingError, match="other settings"):
        distill(
            model,
            4,
            adam_steps=4,
            val_every=2,
            lr=3e-2,
            pairs=data,
            progress=False,
            checkpoint_path=ckpt,
            resume=True,
        )
    ckpt.write_bytes(b"not a checkpoint")
    with pytest.raises(TrainingError, match="cannot read checkpoint"):
        distill(
            model,
            4,
            adam_steps=4,
            val_every=2,
            pairs=data,
            progress=False,
            checkpoint_path=ckpt,
            resume=True,
        )


def _vp_model():
    return gaussian_mixture_model(
        dim=8,
        components=3,
        std=0.2,
        schedule=bns.schedules.VP(),
        prediction="eps",
        t_range=(0.0, 1 - 1e-3),
    )


def test_init_best_starts_from_the_best_classical_solver_on_validation():
    vp = _vp_model()
    kw = dict(cache=False, progress=False)
    data = make_pairs(vp, 16, "train", **kw), make_pairs(vp, 24, "val", **kw)
    cands = init_candidates(vp, 6)
    labels = [c.meta["init"] for c in cands]
    # every classical solver that can start BNS at NFE 6 on every grid of the model,
    # preconditioned where that changes it
    grids = ("uniform", "logsnr", "edm")
    assert {
        f"{n}@{g}" for n in ("euler", "midpoint", "ab3", "ipndm", "ddim", "unipc3") for g in grids
    } | {"midpoint+pc1"} <= set(labels)
    assert not any(lab.startswith("heun") or lab.startswith("ddim+pc") for lab in labels)
    subset = data[1][:20]
    full = {c.meta["init"]: evaluate_psnr(vp, c, subset).mean().item() for c in cands}
    head = {c.meta["init"]: evaluate_psnr(vp, c, subset[:16]).mean().item() for c in cands}
    best = max(full, key=full.get)
    solver, hist = distill(vp, 6, adam_steps=0, pairs=data, init_pairs=20, **kw)
    assert solver.meta["init"] == best
    # Successive halving: all on 16 pairs, the best 8 of those on all 20.
    kept = sorted(head, key=head.get, reverse=True)[:8]
    expected = {k: full[k] if k in kept else head[k] for k in full}
    assert solver.meta["init_candidates_psnr"] == pytest.approx(expected, abs=1e-3)
    assert _same(solver, next(c for c in cands if c.meta["init"] == best))
    # "auto" preconditioning is measured, per model: on CondOT it is the identity, skipped.
    assert not any("+pc" in c.meta["init"] for c in init_candidates(_tiny_condot(), 4))


def _tiny_condot():
    return gaussian_mixture_model(dim=4, components=2, std=0.3)


def test_the_best_iterate_is_never_worse_than_the_initial_solver(model, data):
    """Whatever the optimizer does (here a learning rate far too large), the returned solver is
    at least as good on validation as the one it started from."""
    solver, hist = distill(
        model, 4, adam_steps=20, val_every=5, lr=5.0, warmup=0, pairs=data, progress=False
    )
    init_psnr = hist["val_psnr"][0]
    assert evaluate_psnr(model, solver, data[1]).mean().item() >= init_psnr - 1e-9
    assert hist["best_val_psnr"] >= init_psnr


def test_an_overshoot_reverts_to_the_best_with_half_the_learning_rate(model, data):
    """A learning rate far too large overshoots; training returns to its best point each time."""
    solver, hist = distill(
        model, 4, adam_steps=40, val_every=5, lr=0.5, warmup=0, pairs=data, progress=False
    )
    assert hist["reverts"] >= 1
    assert hist["best_val_psnr"] >= hist["val_psnr"][0]
    assert evaluate_psnr(model, solver, data[1]).mean().item() == pytest.approx(
        hist["best_val_psnr"], rel=1e-6
    )


def test_each_loss_is_what_it_says_and_trains(model, data):
    from bns.loss import l1, log_mse, mse

    x = torch.tensor([[1.0, 2.0], [0.0, 0.0]])
    ref = torch.tensor([[0.0, 0.0], [0.0, 3.0]])
    assert torch.allclose(mse(x, ref), torch.tensor([2.5, 4.5]))
    assert torch.allclose(l1(x, ref), torch.tensor([1.5, 1.5]))
    assert torch.allclose(log_mse(x, ref), torch.log(torch.tensor([2.5, 4.5])))
    kw = dict(pairs=data, adam_steps=30, val_every=5, init="euler", progress=False)
    for loss in ("mse", "l1"):
        solver, hist = distill(model, 4, loss=loss, **kw)
        assert solver.meta["config"]["loss"] == loss
        assert hist["best_val_psnr"] > hist["val_psnr"][0] + 1.0  # it trains
        # The training loss it reports is that loss: mse's is positive, log-mse's is not.
        assert all(v > 0 for v in hist["train_loss"] if math.isfinite(v))
    with pytest.raises(TrainingError, match="loss must be log-mse, mse or l1"):
        distill(model, 4, loss="huber", **kw)
