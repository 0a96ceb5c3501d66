"""Gauss-Newton steps: the forward-mode Jacobian against autograd, the normal equations'
gradient against the loss's, every family through the chain rule, and distillation with
``gn_steps`` on a user's network through the API and the command line."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn

import bns
from bns.cli import main
from bns.families import make_family
from bns.gauss_newton import coefficient_jacobian, levenberg_marquardt, normal_equations
from bns.loss import loss_and_grad
from bns.pairs import make_pairs
from bns.solver import NSSolver, sample
from bns.solvers import init_candidates
from bns.solvers.ends import with_data_end
from bns.train import TrainingError, distill

F64 = torch.float64


class TinyEps(nn.Module):
    """A class-conditional epsilon network the way a user writes one: float32 weights, time
    embedded as DDPM timesteps (t x 1000 through a sinusoid)."""

    def __init__(self, dim: int = 6, classes: int = 3) -> None:
        super().__init__()
        self.emb = nn.Embedding(classes + 1, 8)
        self.net = nn.Sequential(nn.Linear(dim + 16, 32), nn.SiLU(), nn.Linear(32, dim))

    def forward(self, x, t, y):
        ts = t.reshape(-1, 1).expand(x.shape[0], 1) * 1000.0
        freqs = torch.exp(torch.linspace(-6, 0, 4, device=x.device))[None]
        temb = torch.cat([torch.sin(ts * freqs), torch.cos(ts * freqs)], 1)
        return self.net(torch.cat([x, temb.to(x.dtype), self.emb(y)], 1))


def _model(dtype=None):
    torch.manual_seed(0)
    net = TinyEps()
    if dtype is not None:
        net = net.to(dtype)
    sched = bns.schedules.VP()
    return bns.Model(
        net,
        prediction="eps",
        schedule=sched,
        sample_shape=(6,),
        t_range=(0.0, 0.99),
        num_classes=3,
    )


def _theta(s: NSSolver) -> torch.Tensor:
    return torch.cat([s.times, s.a, s.b.reshape(-1)]).detach()


def _autograd_jacobian(model, s, x0, y, guidance):
    n = s.nfe

    def fn(theta):
        t, a = theta[: n + 1], theta[n + 1 : 2 * n + 1]
        b = theta[2 * n + 1 :].reshape(n, n)
        return sample(model, x0, NSSolver(t, a, b), y, guidance).reshape(x0.shape[0], -1)

    return torch.autograd.functional.jacobian(fn, _theta(s))


@pytest.mark.parametrize("guidance,end", [(1.0, "range"), (2.5, "range"), (1.0, "data")])
def test_the_jacobian_is_autograd_s(guidance, end):
    model = _model(F64)
    s = init_candidates(model, 5, "ab3", None, "range")[0]
    if end == "data":
        s = with_data_end(s, model)
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(3, 6, generator=g, dtype=F64)
    y = torch.tensor([0, 2, 1])
    xn, jac = coefficient_jacobian(model, s, x0, y, guidance, max_stack=4)  # several stacks
    ref = _autograd_jacobian(model, s, x0, y, guidance)
    assert torch.allclose(xn, sample(model, x0, s, y, guidance).reshape(3, -1), rtol=0, atol=1e-12)
    scale = ref.abs().max()
    assert (jac - ref).abs().max() <= 1e-11 * scale
    assert ref[:, :, 1 : s.nfe].abs().amax() > 0  # the times matter, and were checked


@pytest.mark.parametrize("family", ["bns", "time", "multistep", "scale-time"])
@pytest.mark.parametrize("loss", ["log-mse", "mse"])
def test_the_normal_equations_gradient_is_the_loss_gradient(family, loss):
    model = _model(F64)
    init = init_candidates(model, 4, "midpoint", None, "range")[0]
    fam = make_family(family, init).double()
    pairs = make_pairs(model, 6, "train", cache=False, progress=False, guidance=2.0)
    pairs = dataclasses.replace(pairs, x0=pairs.x0.double(), x1=pairs.x1.double())
    value, H, g = normal_equations(fam, model, pairs, 2.0, loss=loss, micro_batch=4)
    ref_loss, grads = loss_and_grad(fam, model, pairs, 2.0, loss=loss)
    ref = torch.cat([gr.reshape(-1) for gr in grads])
    assert math.isclose(value, ref_loss, rel_tol=1e-12)
    assert torch.allclose(g, ref, rtol=1e-9, atol=1e-12 * ref.abs().max())
    assert torch.allclose(H, H.T) and torch.linalg.eigvalsh(H).min() > -1e-9 * H.abs().max()
    # micro-batches give the whole batch's equations
    _, H1, g1 = normal_equations(fam, model, pairs, 2.0, loss=loss)
    assert torch.allclose(H1, H, rtol=1e-12) and torch.allclose(g1, g, rtol=1e-12)


def test_levenberg_marquardt_solves_a_least_squares_problem_and_refuses_a_worse_step():
    torch.manual_seed(0)
    A, b = torch.randn(20, 3, dtype=F64), torch.randn(20, dtype=F64)
    p = torch.zeros(3, dtype=F64)

    def loss():
        return float(((A @ p - b) ** 2).sum())

    H, g = 2 * A.T @ A, 2 * A.T @ (A @ p - b)
    value, lam = levenberg_marquardt([p], loss(), H, g, loss, lam=1e-6)
    assert torch.allclose(p, torch.linalg.lstsq(A, b[:, None]).solution[:, 0], atol=1e-6)
    assert lam == pytest.approx(1e-6 / 3) and value == loss()
    before = p.clone()
    value, lam = levenberg_marquardt([p], loss(), H, -g * 0 + 1.0, lambda: math.inf, lam=1.0)
    assert torch.equal(p, before) and lam == 4.0**8  # every try refused: nothing moved


@pytest.fixture(scope="module")
def user_pairs(tmp_path_factory):
    model = _model()  # float32 weights, no dtype=
    folder = tmp_path_factory.mktemp("cache")
    kw = dict(cache=folder, progress=False, guidance=2.0)
    return folder, make_pairs(model, 48, "train", **kw), make_pairs(model, 32, "val", **kw)


def test_gauss_newton_steps_improve_on_adam_and_keep_the_best(user_pairs):
    _, train, val = user_pairs
    model = _model()
    kw = dict(pairs=(train, val), progress=False, guidance=2.0, batch_size=16, init="midpoint")
    adam, h_adam = distill(model, 4, adam_steps=40, **kw)
    both, h_both = distill(model, 4, adam_steps=40, gn_steps=4, gn_batch_size=24, **kw)
    # Every step Levenberg-Marquardt kept is validated; a rejected one leaves the solver as it
    # was and is not.
    validated = 1 + 40 // 25 + 1 + 4 - h_both["gn_rejected"]
    assert h_both["steps_run"] == 44 and len(h_both["val_psnr"]) == validated
    assert h_both["best_val_psnr"] > h_adam["best_val_psnr"] + 1.0
    assert h_both["best_val_psnr"] == max(h_both["val_psnr"])
    assert h_both["forwards"] > h_adam["forwards"]
    for p in model.modules[0].parameters():
        assert p.grad is None and p.requires_grad  # frozen meanwhile, restored after
    # Gauss-Newton alone, from the initial solver, also climbs
    gn, h_gn = distill(model, 4, adam_steps=0, gn_steps=3, gn_batch_size=24, **kw)
    assert h_gn["best_val_psnr"] > h_gn["val_psnr"][0] + 1.0


def test_gauss_newton_is_refused_with_a_loss_that_is_not_a_sum_of_squares():
    with pytest.raises(TrainingError, match="sum-of-squares"):
        bns.DistillConfig(nfe=4, gn_steps=2, loss="l1").check()
    with pytest.raises(TrainingError, match="gn_steps must be a non-negative"):
        bns.DistillConfig(nfe=4, gn_steps=-1).check()


class _NoJvp(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return torch.tanh(x)

    @staticmethod
    def backward(ctx, g):
        return g


def _without_forward_mode() -> tuple[bns.Model, nn.Module]:
    """A user's closure around the network with a custom op that has no ``jvp``."""
    inner = _model().net

    def closure(x, t, y):
        return _NoJvp.apply(inner(x, t, y))

    model = bns.Model(
        closure,
        prediction="eps",
        schedule="vp",
        sample_shape=(6,),
        t_range=(0.0, 0.99),
        num_classes=3,
    )
    return model, inner


def test_a_network_without_forward_mode_fails_before_any_ground_truth(tmp_path):
    wrapped, inner = _without_forward_mode()
    kw = dict(cache=tmp_path, progress=False, guidance=2.0, train_pairs=8, val_pairs=8)
    with pytest.raises(TrainingError, match="forward mode.*gn_steps=0"):
        distill(wrapped, 4, adam_steps=5, gn_steps=1, **kw)
    assert not list(tmp_path.iterdir()) and wrapped.forwards == 0  # nothing was solved
    assert all(p.requires_grad for p in inner.parameters())  # restored
    solver, _ = distill(wrapped, 4, adam_steps=1, gn_steps=0, init="euler", **kw)  # Adam alone runs
    assert solver.nfe == 4


def test_gauss_newton_through_the_command_line(user_pairs, tmp_path):
    folder, _, _ = user_pairs
    src = tmp_path / "user_net.py"
    src.write_text(
        "import torch, bns\n"
        f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r})\n"
        "from test_gauss_newton import _model\n"
        "def factory():\n    return _model()\n"
    )
    out = tmp_path / "s.json"
    cmd = [
        "distill",
        "--model",
        f"{src}:factory",
        "--nfe",
        "4",
        "--guidance",
        "2",
        "--train-pairs",
        "48",
        "--val-pairs",
        "32",
        "--init-pairs",
        "32",
        "--adam-steps",
        "0",
        "--gn-steps",
        "2",
        "--gn-batch-size",
        "16",
        "--init",
        "midpoint",
        "--cache-dir",
        str(folder),
        "--out",
        str(out),
    ]
    assert main(cmd) == 0
    meta = json.loads(out.read_text())["meta"]
    assert meta["config"]["gn_steps"] == 2 and meta["steps_run"] == 2
    assert meta["val_psnr"] > meta["init_candidates_psnr"].get("midpoint", -math.inf) or (
        meta["best_step"] > 0
    )


def test_steps_resolve_to_gauss_newton_by_default_and_to_adam_when_asked():
    from bns.config import AUTO_ADAM_STEPS, AUTO_GN_STEPS, resolve_steps

    cfg = bns.DistillConfig(nfe=4)
    yes, no = (lambda: True), (lambda: False)
    assert (resolve_steps(cfg, yes).adam_steps, resolve_steps(cfg, yes).gn_steps) == (
        0,
        AUTO_GN_STEPS,
    )
    assert (resolve_steps(cfg, no).adam_steps, resolve_steps(cfg, no).gn_steps) == (
        AUTO_ADAM_STEPS,
        0,
    )
    l1 = cfg.replace(loss="l1")
    assert (resolve_steps(l1, yes).adam_steps, resolve_steps(l1, yes).gn_steps) == (
        AUTO_ADAM_STEPS,
        0,
    )
    both = [(None, 3, (0, 3)), (7, None, (7, 0)), (None, 0, (AUTO_ADAM_STEPS, 0)), (5, 2, (5, 2))]
    for steps, gn, want in both:
        got = resolve_steps(cfg.replace(adam_steps=steps, gn_steps=gn), no)
        assert (got.adam_steps, got.gn_steps) == want


def test_the_default_distillation_is_gauss_newton_or_adam_without_forward_mode(
    user_pairs, monkeypatch
):
    _, train, val = user_pairs
    kw = dict(pairs=(train, val), progress=False, guidance=2.0, gn_batch_size=16)
    solver, hist = distill(_model(), 4, **kw)
    assert solver.meta["config"]["adam_steps"] == 0 and solver.meta["config"]["gn_steps"] == 12
    assert hist["steps_run"] <= 12 and hist["best_val_psnr"] > hist["val_psnr"][0] + 1.0
    monkeypatch.setattr(bns.config, "AUTO_ADAM_STEPS", 3)
    wrapped, _ = _without_forward_mode()
    with pytest.warns(UserWarning, match="forward mode.*Adam steps instead"):
        solver, hist = distill(wrapped, 4, **kw)
    assert solver.meta["config"]["adam_steps"] == 3 and solver.meta["config"]["gn_steps"] == 0


def test_an_interrupted_gauss_newton_run_resumes_to_the_same_solver(user_pairs, tmp_path):
    _, train, val = user_pairs
    kw = dict(pairs=(train, val), progress=False, guidance=2.0, gn_steps=4, gn_batch_size=16)
    whole, _ = distill(_model(), 4, **kw)

    class Stop(Exception):
        pass

    def stop_at_3(step, record):
        if step == 3:
            raise Stop

    ckpt = tmp_path / "run.ckpt"
    with pytest.raises(Stop):
        distill(_model(), 4, checkpoint_path=ckpt, callback=stop_at_3, **kw)
    assert ckpt.exists()
    resumed, hist = distill(_model(), 4, checkpoint_path=ckpt, resume=True, **kw)
    assert hist["steps_run"] == 4
    for name in ("times", "a", "b"):
        assert torch.equal(getattr(whole, name), getattr(resumed, name))


def test_gauss_newton_steps_that_never_help_return_the_initial_solver(user_pairs, monkeypatch):
    """The best-iterate rule with Gauss-Newton: steps that only make things worse leave the
    initial solver, bit for bit."""
    import bns.gauss_newton as gn

    _, train, val = user_pairs

    def harmful(params, loss0, H, g, batch_loss, lam, max_tries=8):
        with torch.no_grad():
            for p in params:
                p += 0.5 * torch.randn_like(p)
        return loss0, lam

    monkeypatch.setattr(gn, "levenberg_marquardt", harmful)
    model = _model()
    kw = dict(pairs=(train, val), progress=False, guidance=2.0, init="midpoint")
    solver, hist = distill(model, 4, gn_steps=3, gn_batch_size=16, **kw)
    init, _ = distill(model, 4, adam_steps=0, **kw)
    assert hist["best_step"] == 0 and max(hist["val_psnr"][1:]) < hist["val_psnr"][0]
    for name in ("times", "a", "b"):
        assert torch.equal(getattr(solver, name), getattr(init, name))


def test_gauss_newton_on_a_bf16_network_keeps_float32_states(tmp_path):
    model = _model(torch.bfloat16)  # bf16 weights, no dtype=
    kw = dict(cache=tmp_path, progress=False, guidance=2.0, train_pairs=16, val_pairs=16)
    solver, hist = distill(model, 4, gn_steps=2, gn_batch_size=8, init="midpoint", **kw)
    assert hist["best_val_psnr"] >= hist["val_psnr"][0] and solver.times.dtype == F64
    x0 = torch.randn(3, 6)
    xn, jac = coefficient_jacobian(model, solver, x0, torch.tensor([0, 1, 2]), 2.0)
    assert xn.dtype == torch.float32 and jac.dtype == torch.float32
    assert all(p.grad is None and p.dtype == torch.bfloat16 for p in model.net.parameters())
