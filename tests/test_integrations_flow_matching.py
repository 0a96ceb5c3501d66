"""flow_matching integration: its ODESolver and our converted solvers agree (float64), and the
BNSSolver (a flow_matching Solver) is bns.sample. Also: ``import bns`` imports no integration."""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import pytest
import torch

import bns
from bns.models.gmm import gaussian_mixture_model


def test_import_bns_imports_no_integration():
    """The integrations are optional extras: ``import bns`` (and ``bns.integrations``) must not
    pull diffusers, transformers, flow_matching or k_diffusion."""
    code = (
        "import sys, bns, bns.integrations\n"
        "heavy = ('diffusers', 'transformers', 'flow_matching', 'k_diffusion', 'torchsde')\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in heavy))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


HAS_FLOW_MATCHING = importlib.util.find_spec("flow_matching") is not None
needs_flow_matching = pytest.mark.skipif(
    not HAS_FLOW_MATCHING, reason="flow_matching is not installed"
)
if HAS_FLOW_MATCHING:
    from flow_matching.solver import ODESolver, Solver
    from flow_matching.utils import ModelWrapper

    from bns.integrations.flow_matching import BNSSolver, model_from_wrapper
else:  # a stand-in, so that the import test above still runs

    class ModelWrapper(torch.nn.Module):
        def __init__(self, model):
            super().__init__()
            self.model = model


class MixtureVelocity(ModelWrapper):
    """flow_matching-style velocity model: the exact CondOT velocity of a labelled mixture.

    Records the shape of every ``t`` it is given (flow_matching hands a 0-d ``t``)."""

    def __init__(self, num_classes: int | None = None):
        ref = gaussian_mixture_model(dim=6, components=4, num_classes=num_classes, std=0.2, seed=1)
        super().__init__(ref.net)
        self.reference = ref
        self.t_shapes: list[tuple[int, ...]] = []

    def forward(self, x, t, **extras):
        self.t_shapes.append(tuple(t.shape))
        tb = t.reshape(-1).expand(x.shape[0]) if t.dim() == 0 else t
        return self.model(x, tb, extras.get("label"))


def _x0(b: int = 5, seed: int = 0) -> torch.Tensor:
    return torch.randn(b, 6, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@needs_flow_matching
@pytest.mark.parametrize(
    "method,convert", [("euler", bns.solvers.euler), ("midpoint", bns.solvers.midpoint)]
)
def test_ode_solver_equals_converted_solver(method, convert):
    wrapper = MixtureVelocity()
    # The exact mixture is a float64 oracle: the model runs it in float64.
    model = model_from_wrapper(wrapper, sample_shape=(6,), dtype=torch.float64)
    grid = torch.tensor([0.0, 0.1, 0.25, 0.5, 0.8, 1.0], dtype=torch.float64)  # uneven
    x0 = _x0()
    ref = ODESolver(wrapper).sample(x0, step_size=None, method=method, time_grid=grid)
    wrapper.t_shapes.clear()
    ours = bns.sample(model, x0, convert(grid))
    assert (ours - ref).abs().max() < 1e-10
    assert (ours - x0).abs().max() > 0.1
    # The adapter hands the wrapper the same 0-d t as ODESolver does.
    assert set(wrapper.t_shapes) == {()}


@needs_flow_matching
def test_ode_solver_with_step_size_equals_uniform_grid():
    wrapper = MixtureVelocity()
    model = model_from_wrapper(wrapper, sample_shape=(6,), dtype=torch.float64)
    x0 = _x0(seed=1)
    ref = ODESolver(wrapper).sample(
        x0,
        step_size=0.125,
        method="midpoint",
        time_grid=torch.tensor([0.0, 1.0], dtype=torch.float64),
    )
    ours = bns.sample(model, x0, bns.solvers.midpoint(bns.grids.uniform(8)))
    assert (ours - ref).abs().max() < 1e-10


@needs_flow_matching
def test_adapter_velocity_is_the_wrappers():
    wrapper = MixtureVelocity(num_classes=2)
    model = model_from_wrapper(wrapper, sample_shape=(6,), num_classes=2)
    # No dtype=: the wrapper is an nn.Module whose (float64) buffers give it.
    assert model.dtype == torch.float64
    x = _x0(4, seed=2)
    t = torch.tensor([0.1, 0.4, 0.6, 0.9], dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 1])
    # Distinct times go in as a [B] tensor.
    assert torch.allclose(model.velocity(x, t, y), wrapper.reference.velocity(x, t, y), atol=1e-14)
    # Guidance through bns.Model: label 2 is the wrapper's unconditional input.
    yc = torch.ones(4, dtype=torch.long)
    guided = model.velocity(x, 0.3, yc, guidance=2.5)
    assert torch.allclose(guided, wrapper.reference.velocity(x, 0.3, yc, guidance=2.5), atol=1e-14)
    assert (guided - model.velocity(x, 0.3, yc)).abs().max() > 1e-3


@needs_flow_matching
def test_bns_solver_is_a_flow_matching_solver_and_equals_bns_sample():
    wrapper = MixtureVelocity(num_classes=2)
    model = model_from_wrapper(wrapper, sample_shape=(6,), num_classes=2, dtype=torch.float64)
    base = bns.solvers.midpoint(bns.grids.uniform(3))
    g = torch.Generator().manual_seed(0)
    n = base.nfe
    # A BNS-like solver: every coefficient perturbed, so the whole history is used.
    solver = bns.NSSolver(
        base.times,
        base.a + 0.01 * torch.randn(n, generator=g, dtype=torch.float64),
        base.b + 0.01 * torch.tril(torch.randn(n, n, generator=g, dtype=torch.float64)),
    )
    fm = BNSSolver(wrapper, solver)
    assert isinstance(fm, Solver)
    x0 = _x0(4, seed=3)
    y = torch.tensor([0, 1, 1, 0])
    out = fm.sample(x0, label=y)
    ref = bns.sample(model, x0, solver, y=y)
    assert torch.equal(out, ref)
    traj = fm.sample(x0, return_intermediates=True, label=y)
    assert traj.shape == (n + 1, 4, 6) and torch.equal(traj[-1], ref) and torch.equal(traj[0], x0)
    # An independent reading of the NS update.
    xs, us = [x0], []
    for i in range(n):
        us.append(wrapper.reference.velocity(xs[-1], solver.times[i], y))
        xs.append(solver.a[i] * x0 + sum(solver.b[i, j] * us[j] for j in range(i + 1)))
    assert (xs[-1] - out).abs().max() < 1e-12


@needs_flow_matching
def test_bns_solver_float32_accumulates_in_float32():
    wrapper = MixtureVelocity()
    solver = bns.solvers.euler(bns.grids.uniform(4))
    out = BNSSolver(wrapper, solver).sample(_x0().float())
    assert out.dtype == torch.float32


@needs_flow_matching
def test_bad_inputs():
    with pytest.raises(TypeError, match="bns.NSSolver"):
        BNSSolver(MixtureVelocity(), "euler")
    with pytest.raises(TypeError, match="callable"):
        model_from_wrapper(3, sample_shape=(6,))


# -- the way users write code: a float32 network in a ModelWrapper, no dtype anywhere ----------


class TimeMLP(torch.nn.Module):
    """A small float32 velocity network ``v(x, t)``; records the dtypes it is called with."""

    def __init__(self):
        super().__init__()
        self.layers = torch.nn.Sequential(
            torch.nn.Linear(7, 32), torch.nn.Tanh(), torch.nn.Linear(32, 6)
        )
        self.seen: list[tuple[torch.dtype, torch.dtype]] = []

    def forward(self, x, t):
        self.seen.append((x.dtype, t.dtype))
        tb = t.reshape(-1, 1).expand(x.shape[0], 1).to(x.dtype)
        return self.layers(torch.cat([x, tb], dim=1))


class Wrapped(ModelWrapper):
    def forward(self, x, t, **extras):
        return self.model(x, t)


@needs_flow_matching
def test_a_float32_model_wrapper_works_as_users_write_it():
    torch.manual_seed(0)
    net = TimeMLP()
    wrapped = Wrapped(net)
    model = model_from_wrapper(wrapped, sample_shape=(6,))
    assert model.dtype == torch.float32  # from the weights, not from any state
    x0 = torch.randn(5, 6)
    # Ground truth integrates in float64 and still calls the network in float32.
    x1 = bns.ground_truth(model, x0)
    assert x1.dtype == torch.float64
    # flow_matching's own fine RK4 in float32 lands on it.
    grid = torch.linspace(0, 1, 33)
    with torch.no_grad():
        ref = ODESolver(wrapped).sample(x0, step_size=None, method="rk4", time_grid=grid)
    assert (ref.double() - x1).abs().max() < 1e-4 * x1.abs().max()
    assert (x1 - x0.double()).abs().max() > 0.1
    # BNSSolver and bns.sample agree on it, in float32.
    solver = bns.solvers.midpoint(bns.grids.uniform(4))
    with torch.no_grad():
        out = BNSSolver(wrapped, solver).sample(x0)
        ours = bns.sample(model, x0, solver)
    assert out.dtype == ours.dtype == torch.float32 and torch.equal(out, ours)
    assert {x for x, _ in net.seen} == {torch.float32}
    assert {t for _, t in net.seen} <= {torch.float32, torch.float64}
    # Distillation trains the solver only: the network's weights get no gradient.
    from bns.train import distill

    net.seen.clear()
    tiny = {"train_pairs": 8, "val_pairs": 8, "adam_steps": 3, "batch_size": 4}
    distill(model, 4, **tiny, cache=False, progress=False)
    assert net.seen and {x for x, _ in net.seen} == {torch.float32}
    assert all(p.grad is None and p.requires_grad for p in wrapped.parameters())
