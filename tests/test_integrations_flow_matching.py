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
    model = model_from_wrapper(wrapper, sample_shape=(6,))
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
    model = model_from_wrapper(wrapper, sample_shape=(6,))
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
    model = model_from_wrapper(wrapper, sample_shape=(6,), num_classes=2)
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
