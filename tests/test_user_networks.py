"""Networks written the way users write them: a float32 nn.Module with no dtype=, a closure, a
bound method, a bf16 module, autocast around the call, an explicit device. Each one goes through
ground truth, distillation and sampling with the Python API and the command line."""

from __future__ import annotations

import json
import math
import textwrap

import pytest
import torch
from torch import nn

import bns
from bns.cli import main
from bns.families import make_family
from bns.loss import loss_and_grad
from bns.pairs import Pairs, make_pairs
from bns.solvers import initial_solver

DIM = 6
TINY = dict(train_pairs=8, val_pairs=8, init_pairs=8, adam_steps=3, val_every=3, batch_size=4)


class UserNet(nn.Module):
    """A velocity MLP as a user writes it: float32 weights, sinusoidal time features computed
    from t and cast to the weights' dtype, and a record of what it was called with."""

    def __init__(self, dim: int = DIM) -> None:
        super().__init__()
        self.register_buffer("freqs", torch.arange(1, 5, dtype=torch.float32) * math.pi)
        self.mlp = nn.Sequential(nn.Linear(dim + 8, 32), nn.SiLU(), nn.Linear(32, dim))
        self.dropout = nn.Dropout(0.5)  # would make samples random if eval() were forgotten
        self.seen: list[tuple[torch.dtype, torch.dtype, bool]] = []

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        self.seen.append((x.dtype, t.dtype, self.training))
        arg = t[:, None] * self.freqs.to(t.dtype)
        temb = torch.cat([arg.sin(), arg.cos()], 1).to(x.dtype)
        return self.dropout(self.mlp(torch.cat([x, temb], 1)))


class Predictor:
    """Not a module: a user's object that holds one and exposes a method."""

    def __init__(self, net: nn.Module) -> None:
        self.net = net

    def predict(self, x, t):
        return self.net(x, t)


def _net(dtype=torch.float32) -> UserNet:
    torch.manual_seed(0)
    return UserNet().to(dtype)


def _wrap(kind: str, net: UserNet):
    if kind == "module":
        return net
    if kind == "closure":
        return lambda x, t: net(x, t)
    if kind == "bound-method":
        return Predictor(net).predict
    raise AssertionError(kind)


def _model(fn) -> bns.Model:
    return bns.Model(fn, "velocity", bns.schedules.CondOT(), (DIM,), name="user")


@pytest.mark.parametrize("kind", ["module", "closure", "bound-method"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_user_network_distills_and_samples(kind, dtype):
    net = _net(dtype)
    net.train()  # as a user leaves it after training
    model = _model(_wrap(kind, net))
    assert model.dtype == dtype and model.device == torch.device("cpu")
    before = {k: v.clone() for k, v in net.state_dict().items()}

    x0 = torch.randn(4, DIM, dtype=torch.float64)
    x1, stats = bns.ground_truth(model, x0, return_stats=True)  # float64 state, net's own dtype
    assert x1.dtype == torch.float64 and torch.all(torch.isfinite(x1))
    # in eval mode: with its dropout on, the adaptive solver would chase noise for ever
    assert stats["nfe"] < 500 and net.training

    solver, hist = bns.distill(model, 4, cache=False, progress=False, **TINY)
    assert hist["steps_run"] == 3
    # Frozen: no weight got a gradient or changed; eval mode inside, training mode restored.
    assert all(p.grad is None and p.requires_grad for p in net.parameters())
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())
    assert net.training and net.dropout.training
    assert {training for _, _, training in net.seen[-20:]} == {False}
    # What the network saw: x in its own dtype, t in float32 or wider.
    for x_dtype, t_dtype, _ in net.seen:
        assert x_dtype == dtype
        assert t_dtype in (torch.float32, torch.float64)

    net.eval()
    x = bns.sample(model, torch.randn(3, DIM), solver)
    assert x.dtype == torch.float32 and torch.all(torch.isfinite(x))


def test_a_plain_function_defaults_to_float32_and_says_to_pass_dtype():
    w = torch.randn(DIM, DIM, dtype=torch.float64)  # a tensor, not a module: nothing to read

    def velocity(x, t):
        return x @ w

    model = _model(velocity)
    assert model.dtype == torch.float32
    with pytest.raises(bns.ModelError, match="Pass dtype="):
        model.velocity(torch.randn(2, DIM), 0.5)
    ok = bns.Model(velocity, "velocity", bns.schedules.CondOT(), (DIM,), dtype=torch.float64)
    assert ok.velocity(torch.randn(2, DIM), 0.5).dtype == torch.float32


def test_closure_fingerprint_follows_the_weights_it_holds():
    net = _net()
    model = _model(_wrap("closure", net))
    fp = model.fingerprint()
    with torch.no_grad():
        net.mlp[0].weight[0, 0] += 1e-3
    assert model.fingerprint() != fp


def test_sample_state_is_float32_under_cpu_autocast():
    net = _net()
    net.eval()
    model = _model(net)
    solver = bns.solvers.midpoint(bns.grids.uniform(4))
    x0 = torch.randn(5, DIM)
    ref = bns.sample(model, x0, solver)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        x = bns.sample(model, x0, solver)
        u = model.velocity(x0, 0.3)
    assert x.dtype == torch.float32 and u.dtype == torch.float32
    # the network ran in bf16 under autocast; the sums did not: the error is the network's
    assert (x - ref).abs().max() < 0.05
    assert not torch.equal(x, ref)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (run where a GPU is lent)")
def test_sample_state_is_float32_under_cuda_autocast():
    net = _net().cuda().eval()
    model = _model(net)
    solver = bns.solvers.midpoint(bns.grids.uniform(4))
    with torch.autocast("cuda", dtype=torch.bfloat16):
        x = bns.sample(model, torch.randn(5, DIM, device="cuda"), solver)
    assert x.dtype == torch.float32 and x.device.type == "cuda"


@pytest.mark.parametrize(
    "device",
    [
        "cpu",
        pytest.param(
            "cuda",
            marks=pytest.mark.skipif(
                not torch.cuda.is_available(), reason="no CUDA device on this machine"
            ),
        ),
    ],
)
def test_the_whole_path_runs_on_an_explicit_device(device, tmp_path):
    net = _net().to(device)
    model = _model(net)
    solver, _ = bns.distill(model, 4, cache=tmp_path, progress=False, device=device, **TINY)
    assert all(p.grad is None for p in net.parameters())
    x = bns.sample(model, torch.randn(3, DIM, device=device), solver)
    assert x.device.type == device
    # Caches hold CPU tensors and the pairs do not depend on the device.
    pairs = make_pairs(model, 8, "train", cache=tmp_path, progress=False)
    assert pairs.x0.device.type == "cpu"
    cpu = make_pairs(_model(_net()), 8, "train", cache=False, progress=False)
    torch.testing.assert_close(pairs.x0, cpu.x0, rtol=0, atol=0)
    torch.testing.assert_close(pairs.x1, cpu.x1, rtol=1e-4, atol=1e-4)


def test_a_network_elsewhere_than_the_device_asked_for_is_refused():
    with pytest.raises(bns.TrainingError, match="move it there first"):
        bns.distill(_model(_net()), 4, device="meta", cache=False, progress=False, **TINY)
    # A device without its index names the network's own (found on an H100: cuda vs cuda:0).
    solver, _ = bns.distill(_model(_net()), 4, device="cpu:0", cache=False, progress=False, **TINY)
    assert solver.nfe == 4


def test_micro_batches_give_the_full_batch_gradient():
    net = _net().eval()
    model = _model(net)
    x0 = torch.randn(10, DIM)
    with torch.no_grad():
        x1 = bns.sample(model, x0, bns.solvers.rk4(bns.grids.uniform(10)))
    batch = Pairs(x0, x1, None)
    family = make_family("bns", initial_solver(model, 4, "midpoint"))
    full_loss, full = loss_and_grad(family, model, batch, 1.0)
    for k in (1, 3, 4):
        loss, grads = loss_and_grad(family, model, batch, 1.0, micro_batch=k)
        assert loss == pytest.approx(full_loss, rel=1e-6)
        for g, f in zip(grads, full):  # to 1e-6 of the gradient's size (float32 network)
            torch.testing.assert_close(g, f, rtol=1e-6, atol=1e-6 * float(f.abs().max()))
    kw = dict(pairs=(batch, batch), adam_steps=4, val_every=2, batch_size=8, progress=False)
    s1, _ = bns.distill(model, 4, init="midpoint", **kw)
    s2, _ = bns.distill(model, 4, init="midpoint", micro_batch=3, **kw)
    for name in ("times", "a", "b"):
        torch.testing.assert_close(getattr(s1, name), getattr(s2, name), rtol=1e-6, atol=1e-6)


_FACTORY = """
import math, torch
from torch import nn
import bns

class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear({dim} + 2, 32), nn.SiLU(), nn.Linear(32, {dim}))

    def forward(self, x, t):
        temb = torch.stack([torch.sin(math.pi * t), torch.cos(math.pi * t)], 1).to(x.dtype)
        return self.mlp(torch.cat([x, temb], 1))

def module():
    torch.manual_seed(0)
    return bns.Model(Net(), "velocity", bns.schedules.CondOT(), ({dim},), name="user-module")

def closure():
    torch.manual_seed(0)
    net = Net()
    return bns.Model(lambda x, t: net(x, t), "velocity", bns.schedules.CondOT(), ({dim},),
                     name="user-closure")

def bf16():
    torch.manual_seed(0)
    return bns.Model(Net().to(torch.bfloat16), "velocity", bns.schedules.CondOT(), ({dim},),
                     name="user-bf16")

class Sampler:
    def __init__(self):
        self.net = Net()

    def velocity(self, x, t):
        return self.net(x, t)

def method():
    torch.manual_seed(0)
    return bns.Model(Sampler().velocity, "velocity", bns.schedules.CondOT(), ({dim},),
                     name="user-method")

class Denoiser(nn.Module):  # k-diffusion's convention: D(x, sigma), the denoised x
    def __init__(self):
        super().__init__()
        self.net = Net()

    def forward(self, x, sigma):
        c = 1 / (sigma**2 + 1).sqrt()
        return x - sigma[:, None] * self.net(x * c[:, None], sigma.log() / 4)

def kdiffusion():
    from bns.integrations.k_diffusion import model_from_denoiser

    torch.manual_seed(0)
    return model_from_denoiser(Denoiser(), 0.02, 80.0, ({dim},), name="user-kdiffusion")

class Wrapper(nn.Module):  # flow_matching's ModelWrapper convention: model(x=, t=, **extras)
    def __init__(self):
        super().__init__()
        self.net = Net()

    def forward(self, x, t, **extras):
        return self.net(x, t.expand(x.shape[0]))

def flowmatching():
    from bns.integrations.flow_matching import model_from_wrapper

    torch.manual_seed(0)
    return model_from_wrapper(Wrapper(), ({dim},), name="user-flowmatching")
"""


@pytest.mark.parametrize(
    "factory", ["module", "closure", "bf16", "method", "kdiffusion", "flowmatching"]
)
def test_user_network_through_the_command_line(factory, tmp_path, capsys):
    src = tmp_path / "user_model.py"
    src.write_text(textwrap.dedent(_FACTORY.format(dim=DIM)))
    spec = f"{src}:{factory}"
    out = tmp_path / "s.json"
    common = ["--model", spec, "--cache-dir", str(tmp_path / "cache"), "--quiet"]
    args = ["distill", *common, "--nfe", "4", "--out", str(out), "--device", "cpu"]
    args += ["--train-pairs", "8", "--val-pairs", "8", "--adam-steps", "3", "--batch-size", "4"]
    assert main(args) == 0, capsys.readouterr().err
    assert bns.NSSolver.load(out).meta["model_name"] == f"user-{factory}"
    pt = tmp_path / "x.pt"
    assert main(["sample", *common, "--solver", str(out), "--n", "3", "--out", str(pt)]) == 0
    x = torch.load(pt)
    assert x.shape == (3, DIM) and x.dtype == torch.float32 and torch.all(torch.isfinite(x))
    js = tmp_path / "r.json"
    ev = ["eval", *common, "--solver", str(out), "--baselines", "euler", "--nfe", "4"]
    assert main(ev + ["--test-pairs", "4", "--json", str(js)]) == 0, capsys.readouterr().err
    assert {r["solver"] for r in json.loads(js.read_text())["rows"]} == {"euler", out.stem}


def test_cli_dtype_casts_a_builtin_model(tmp_path, capsys):
    out = tmp_path / "s.json"
    common = ["--model", "fmnist-cfg", "--cache-dir", str(tmp_path), "--quiet"]
    args = ["distill", *common, "--dtype", "bfloat16", "--nfe", "2", "--out", str(out)]
    args += ["--train-pairs", "2", "--val-pairs", "2", "--adam-steps", "1", "--batch-size", "2"]
    args += ["--init", "euler"]
    assert main(args) == 0, capsys.readouterr().err
    meta = bns.NSSolver.load(out).meta
    assert (
        meta["config"]["rtol"] is None
    )  # resolved from the network's dtype, recorded in the cache
    from bns.specs import load_model

    bf = load_model("fmnist-cfg").to(dtype=torch.bfloat16)
    assert meta["model_fingerprint"] == bf.fingerprint() != load_model("fmnist-cfg").fingerprint()
    from bns.ground_truth import default_tolerance

    assert default_tolerance(torch.bfloat16) > 1e-5


# A network held in a module-level global, called by a plain function: the most common script.
_GLOBAL_NET = nn.Sequential(nn.Linear(DIM + 1, 16), nn.Dropout(0.5), nn.Linear(16, DIM))


def _global_velocity(x, t):
    return _GLOBAL_NET(torch.cat([x, t[:, None].to(x.dtype)], 1))


def test_a_function_calling_a_global_network_is_found_frozen_and_fingerprinted():
    model = bns.Model(_global_velocity, "velocity", "condot", (DIM,))
    assert model.modules == [_GLOBAL_NET] and model.device == torch.device("cpu")
    before = model.fingerprint()
    _GLOBAL_NET.train()
    x0 = torch.randn(4, DIM)
    a = bns.ground_truth(model, x0)
    b = bns.ground_truth(model, x0)
    assert torch.equal(a, b) and _GLOBAL_NET.training  # dropout off meanwhile, restored after
    with torch.no_grad():
        _GLOBAL_NET[0].weight.data[0, 0] += 1e-3  # through .data: no version counter bump
    try:
        assert model.fingerprint() != before
    finally:
        with torch.no_grad():
            _GLOBAL_NET[0].weight.data[0, 0] -= 1e-3


def test_a_schedule_by_name_and_a_clear_error_for_a_wrong_one():
    model = bns.Model(_global_velocity, "velocity", "vp", (DIM,))
    assert isinstance(model.schedule, bns.schedules.VP)
    with pytest.raises(ValueError, match="unknown scheduler 'vpp'"):
        bns.Model(_global_velocity, "velocity", "vpp", (DIM,))
    with pytest.raises(ValueError, match="schedule must be"):
        bns.Model(_global_velocity, "velocity", 3, (DIM,))


def test_the_precision_of_a_bf16_network_called_in_float32_is_bf16():
    net = nn.Linear(DIM, DIM).to(torch.bfloat16)
    model = bns.Model(
        lambda x, t: net(x.to(torch.bfloat16)), "velocity", "condot", (DIM,), dtype=torch.float32
    )
    assert model.dtype == torch.float32 and model.precision == torch.bfloat16
    assert bns.default_tolerance(model.precision) == 1e-4
