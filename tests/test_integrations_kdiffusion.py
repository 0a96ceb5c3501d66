"""k-diffusion integration: its samplers on an exact Gaussian-mixture denoiser equal ours.

The denoiser is written independently in k-diffusion's coordinates (``x = x_1 + s eps``):
component ``k`` is ``N(mu_k, (s_k^2 + s^2) I)`` and ``E[x_1 | x, k] = mu_k + s_k^2/(s_k^2 + s^2)
(x - mu_k)``. k-diffusion is installed without its dependencies (it would pull torchvision and a
CUDA torch), so its package ``__init__`` cannot be imported; ``sampling.py`` is loaded from its
file with a stand-in for the one helper it takes from ``k_diffusion.utils``.
"""

from __future__ import annotations

import importlib.util
import math
import sys
import types
from pathlib import Path

import pytest
import torch

import bns
from bns.models.gmm import gaussian_mixture_model
from bns.schedules import EDM, Schedule, ScheduleValues
from bns.transforms import ScheduleChange


def _load_k_diffusion_sampling():
    spec = importlib.util.find_spec("k_diffusion")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("k-diffusion is not installed")
    path = Path(list(spec.submodule_search_locations)[0]) / "sampling.py"
    pytest.importorskip("torchsde")  # imported at the top of sampling.py
    pkg = types.ModuleType("_kdiff_sampling_pkg")
    pkg.__path__ = []
    utils = types.ModuleType("_kdiff_sampling_pkg.utils")
    utils.append_dims = lambda x, n: x.reshape(tuple(x.shape) + (1,) * (n - x.dim()))
    sys.modules.setdefault("_kdiff_sampling_pkg", pkg)
    sys.modules.setdefault("_kdiff_sampling_pkg.utils", utils)
    loader = importlib.util.spec_from_file_location("_kdiff_sampling_pkg.sampling", path)
    module = importlib.util.module_from_spec(loader)
    loader.loader.exec_module(module)
    return module


K = _load_k_diffusion_sampling()

from bns.integrations.k_diffusion import (  # noqa: E402
    KDiffusionError,
    model_from_denoiser,
    sample_bns,
)

DIM = 8
REF = gaussian_mixture_model(dim=DIM, components=4, std=0.2, seed=0).net


def denoiser(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Exact E[x_1 | x_1 + sigma eps = x] for the mixture, in k-diffusion's coordinates."""
    mu, sd, log_w = REF.means, REF.stds, REF.log_weights
    var = sd[None, :] ** 2 + sigma.reshape(-1, 1) ** 2  # [B, K]
    diff = x[:, None, :] - mu[None]  # [B, K, D]
    logp = log_w - 0.5 * (diff**2).sum(-1) / var - 0.5 * DIM * torch.log(var)
    p = torch.softmax(logp, -1)
    shrink = (sd[None, :] ** 2 / var)[..., None]
    return (p[..., None] * (mu[None] + shrink * diff)).sum(1).to(x.dtype)


class LinearVE(Schedule):
    """k-diffusion's own ODE coordinates: ``alpha = 1``, ``sigma = s`` linear in ``r``."""

    name = "linear_ve"

    def __init__(self, s_min: float, s_max: float):
        self.s_min, self.s_max = s_min, s_max

    def __call__(self, r):
        r = torch.as_tensor(r, dtype=torch.float64)
        s = self.s_max + r * (self.s_min - self.s_max)
        return ScheduleValues(
            alpha=torch.ones_like(r),
            sigma=s,
            d_alpha=torch.zeros_like(r),
            d_sigma=torch.full_like(r, self.s_min - self.s_max),
        )

    def log_snr(self, r):
        return -torch.log(self(r).sigma)

    def t_from_log_snr(self, lam):
        return (torch.exp(-torch.as_tensor(lam, dtype=torch.float64)) - self.s_max) / (
            self.s_min - self.s_max
        )

    def config(self):
        return {"name": self.name, "s_min": self.s_min, "s_max": self.s_max}


def _setup(n: int = 6):
    """k-diffusion's Karras sigmas (n nonzero levels, then 0), the matching EDM scheduler and
    the flow-time grid of the nonzero levels."""
    sigmas = K.get_sigmas_karras(n, 0.002, 80.0).to(torch.float64)
    schedule = EDM(float(sigmas[-2]), float(sigmas[0]))
    grid = schedule.t_from_log_snr(-torch.log(sigmas[:-1]))
    grid[0], grid[-1] = 0.0, 1.0
    x = 80.0 * torch.randn(5, DIM, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    return sigmas, schedule, grid, x


def test_adapted_denoiser_has_the_exact_velocity():
    sigmas, schedule, _, _ = _setup()
    # The oracle is a plain float64 function: name its dtype (a Model's default is float32).
    model = model_from_denoiser(
        denoiser, schedule.sigma_min, schedule.sigma_max, (DIM,), dtype=torch.float64
    )
    exact = gaussian_mixture_model(
        dim=DIM, components=4, std=0.2, seed=0, schedule=schedule, prediction="velocity"
    )
    g = torch.Generator().manual_seed(1)
    x = torch.randn(6, DIM, generator=g, dtype=torch.float64)
    t = torch.tensor([0.0, 0.1, 0.4, 0.7, 0.95, 1.0], dtype=torch.float64)
    assert (model.velocity(x, t) - exact.velocity(x, t)).abs().max() < 1e-12


def test_sample_euler_is_euler_in_k_diffusions_coordinates():
    """k-diffusion's Euler steps (x, s); bns's Euler on the ODE changed to the scheduler
    alpha = 1, sigma = s (linear in r) steps the same coordinates."""
    sigmas, schedule, _, x = _setup()
    ref = K.sample_euler(denoiser, x, sigmas, disable=True)
    r = (sigmas[:-1] - schedule.sigma_max) / (schedule.sigma_min - schedule.sigma_max)
    solver = bns.solvers.euler(
        r, transform=ScheduleChange(schedule, LinearVE(schedule.sigma_min, schedule.sigma_max))
    )
    out = sample_bns(denoiser, x, sigmas, solver=solver, disable=True)
    assert (out - ref).abs().max() < 1e-10 * ref.abs().max()
    # Without the final 0: no denoising step, the sample stays at sigma_min.
    ref_nz = K.sample_euler(denoiser, x, sigmas[:-1], disable=True)
    out_nz = sample_bns(denoiser, x, sigmas[:-1], solver=solver, disable=True)
    assert (out_nz - ref_nz).abs().max() < 1e-10 * ref_nz.abs().max()
    assert (out_nz - out).abs().max() > 1e-4  # the final denoising step does something


def test_sample_euler_is_ddim():
    """The same Euler is DDIM (the first-order exponential integrator) on the flow-time grid."""
    sigmas, schedule, grid, x = _setup()
    ref = K.sample_euler(denoiser, x, sigmas, disable=True)
    out = sample_bns(denoiser, x, sigmas, solver=bns.solvers.ddim(grid, schedule), disable=True)
    assert (out - ref).abs().max() < 1e-10 * ref.abs().max()
    # bns's plain Euler in the rescaled coordinates is another method.
    plain = sample_bns(denoiser, x, sigmas, solver=bns.solvers.euler(grid), disable=True)
    assert (plain - ref).abs().max() > 1e-3


@pytest.mark.parametrize("final_zero", [True, False])
def test_sample_dpmpp_2m_is_dpm_solver_pp(final_zero):
    sigmas, schedule, grid, x = _setup(8)
    if not final_zero:
        sigmas = sigmas[:-1]
    ref = K.sample_dpmpp_2m(denoiser, x, sigmas, disable=True)
    # k-diffusion's 2M keeps second order to the last nonzero sigma.
    solver = bns.solvers.dpm_solver_pp(grid, schedule, 2, lower_order_final=False)
    out = sample_bns(denoiser, x, sigmas, solver=solver, disable=True)
    assert (out - ref).abs().max() < 1e-10 * ref.abs().max()
    first_order = sample_bns(
        denoiser, x, sigmas, solver=bns.solvers.ddim(grid, schedule), disable=True
    )
    assert (first_order - ref).abs().max() > 1e-4


def _bns_like(solver: bns.NSSolver) -> bns.NSSolver:
    g = torch.Generator().manual_seed(0)
    n = solver.nfe
    a = solver.a + 0.01 * torch.randn(n, generator=g, dtype=torch.float64)
    b = solver.b + 0.01 * torch.tril(torch.randn(n, n, generator=g, dtype=torch.float64))
    return bns.NSSolver(solver.times, a, b)


def test_sample_bns_is_bns_sample_on_the_adapted_model():
    sigmas, schedule, _, x = _setup()
    # The oracle is a plain float64 function: name its dtype (a Model's default is float32).
    model = model_from_denoiser(
        denoiser, schedule.sigma_min, schedule.sigma_max, (DIM,), dtype=torch.float64
    )
    solver = _bns_like(bns.solvers.midpoint(bns.grids.uniform(3)))
    solver.meta = {"model_settings": model.settings()}  # as bns.distill records it
    out = sample_bns(denoiser, x, solver=solver, disable=True)  # schedule from the metadata
    s0, s1 = schedule.sigma_max, schedule.sigma_min
    ref = bns.sample(model, x / math.sqrt(1 + s0**2), solver) * math.sqrt(1 + s1**2)
    # Equal to rounding (torch's vectorized exp may differ in the last bit by batch size).
    assert (out - ref).abs().max() < 1e-13 * ref.abs().max()
    # The same with the scheduler given explicitly, or read off k-diffusion's sigmas.
    bare = bns.NSSolver(solver.times, solver.a, solver.b)
    assert torch.equal(sample_bns(denoiser, x, solver=bare, schedule=schedule, disable=True), out)
    assert torch.equal(sample_bns(denoiser, x, sigmas[:-1], solver=bare, disable=True), out)


def test_callback_sees_k_diffusion_quantities():
    sigmas, schedule, grid, x = _setup(4)
    seen = []
    sample_bns(
        denoiser,
        x,
        sigmas,
        solver=bns.solvers.ddim(grid, schedule),
        callback=seen.append,
        disable=True,
    )
    assert [d["i"] for d in seen] == [0, 1, 2, 3]  # 3 steps + the final denoising
    got = torch.stack([d["sigma"] for d in seen])
    assert torch.allclose(got, sigmas[:-1], rtol=1e-12)
    for d in seen:
        assert torch.allclose(d["denoised"], denoiser(d["x"], d["sigma"].expand(5)), atol=1e-12)
    assert torch.allclose(seen[0]["x"], x, rtol=1e-14)


def test_float32_input():
    sigmas, schedule, grid, x = _setup()
    solver = bns.solvers.ddim(grid, schedule)
    out = sample_bns(denoiser, x.float(), sigmas.float(), solver=solver, disable=True)
    ref = sample_bns(denoiser, x, sigmas, solver=solver, disable=True)
    assert out.dtype == torch.float32
    assert (out.double() - ref).abs().max() < 1e-4 * ref.abs().max()


def test_bad_inputs():
    sigmas, schedule, grid, x = _setup()
    solver = bns.solvers.ddim(grid, schedule)
    with pytest.raises(KDiffusionError, match="first sigma is 10"):
        sample_bns(denoiser, x, torch.tensor([10.0, 1.0, 0.0]), solver=solver, schedule=schedule)
    with pytest.raises(KDiffusionError, match="last nonzero sigma"):
        sample_bns(denoiser, x, sigmas[:-2], solver=solver, schedule=schedule)
    with pytest.raises(KDiffusionError, match="cannot tell the noise levels"):
        sample_bns(denoiser, x, solver=solver)
    flow = bns.solvers.euler(bns.grids.uniform(3))
    flow.meta = {"model_settings": {"schedule": {"name": "condot", "sigma0": 1.0}}}
    with pytest.raises(KDiffusionError, match="not a k-diffusion"):
        sample_bns(denoiser, x, sigmas, solver=flow)
    with pytest.raises(TypeError, match="bns.NSSolver"):
        sample_bns(denoiser, x, sigmas, solver="euler")


# -- the way users write code: a float32 nn.Module denoiser, no dtype anywhere -----------------


class Net(torch.nn.Module):
    """A small float32 network ``F(c_in x, c_noise)``; records the dtypes it is called with."""

    def __init__(self):
        super().__init__()
        self.body = torch.nn.Sequential(
            torch.nn.Linear(DIM + 1, 32), torch.nn.SiLU(), torch.nn.Linear(32, DIM)
        )
        self.seen: list[tuple[torch.dtype, torch.dtype]] = []

    def forward(self, x, c_noise):
        self.seen.append((x.dtype, c_noise.dtype))
        return self.body(torch.cat([x, c_noise.reshape(-1, 1).to(x.dtype)], dim=1))


class KarrasDenoiser(torch.nn.Module):
    """k-diffusion's ``layers.Denoiser`` preconditioning (EDM's c_skip, c_out, c_in)."""

    def __init__(self, inner_model, sigma_data=1.0):
        super().__init__()
        self.inner_model = inner_model
        self.sigma_data = sigma_data

    def forward(self, input, sigma):
        s = sigma.reshape(-1, 1)
        c_skip = self.sigma_data**2 / (s**2 + self.sigma_data**2)
        c_out = s * self.sigma_data / (s**2 + self.sigma_data**2) ** 0.5
        c_in = 1 / (s**2 + self.sigma_data**2) ** 0.5
        return self.inner_model(input * c_in, sigma.log() / 4) * c_out + input * c_skip


def test_a_float32_module_denoiser_works_as_users_write_it():
    torch.manual_seed(0)
    net = Net()
    model = model_from_denoiser(KarrasDenoiser(net), 0.002, 80.0, (DIM,))
    assert model.dtype == torch.float32  # from the weights, not from any state
    x0 = torch.randn(4, DIM)
    # Ground truth integrates in float64 and still calls the network in float32.
    x1 = bns.ground_truth(model, x0)
    assert x1.dtype == torch.float64 and torch.isfinite(x1).all()
    # A fine float32 RK4 lands on it (the EDM path is smooth in flow time).
    with torch.no_grad():
        fine = bns.sample(model, x0, bns.solvers.rk4(bns.grids.uniform(32)))
    assert fine.dtype == torch.float32
    assert (fine.double() - x1).abs().max() < 1e-3 * x1.abs().max()
    # k-diffusion's sampler convention on the same denoiser is bns.sample on the model.
    solver = bns.solvers.euler(bns.grids.uniform(4))
    with torch.no_grad():
        ours = sample_bns(model.net.fn, 80.0 * x0, solver=solver, schedule=model.schedule)
        ref = bns.sample(model, x0 * (80.0 / math.sqrt(1 + 80.0**2)), solver)
    assert ours.dtype == torch.float32
    assert (ours - ref * math.sqrt(1 + 0.002**2)).abs().max() < 1e-5 * ref.abs().max()
    assert {x for x, _ in net.seen} == {torch.float32}
    assert {t for _, t in net.seen} <= {torch.float32, torch.float64}
    # Distillation trains the solver only: the network's weights get no gradient.
    from bns.train import distill

    tiny = {"train_pairs": 8, "val_pairs": 8, "adam_steps": 3, "batch_size": 4}
    distill(model, 4, **tiny, cache=False, progress=False)
    assert all(p.grad is None and p.requires_grad for p in net.parameters())
    assert {x for x, _ in net.seen} == {torch.float32}
