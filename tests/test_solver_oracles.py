"""Independent oracles run side by side with our NS solvers on the same model and grid.

diffusers' schedulers (DDIM, DPM-Solver++, UniPC, FlowMatchEuler) and torchdiffeq's fixed-grid
odeint are run in their own loops with the analytic Gaussian-mixture model as the network;
our solver is exported to NS form and run by ``bns.sample`` on the grid made of the same times.
All states of the trajectory are compared, not only the last.

How diffusers is configured, and why:
- The GMM uses ``DiscreteVP(alphas_cumprod)`` taken from the diffusers scheduler; diffusers
  timestep ``k`` is flow time ``1 - k / (N - 1)`` and the net is called at that flow time.
- ``final_sigmas_type="sigma_min"`` (DPM-Solver++, UniPC) and ``set_alpha_to_one=False`` (DDIM)
  make the last step land on timestep 0, flow time 1, where ``DiscreteVP`` is finite.
  Landing on sigma = 0 is checked with the flow-matching configuration instead
  (``use_flow_sigmas`` and ``final_sigmas_type="zero"`` on a CondOT velocity model over [0, 1]).
- diffusers keeps its noise levels in float32; after ``set_timesteps`` we replace them with
  float64 values of the same quantities, so both sides use one grid.
- DPM-Solver++ and FlowMatchEuler round the state to float32 inside ``step()`` (``sample.to(
  torch.float32)``, an upcast meant for half precision). That alone leaves errors up to ~1e-6
  (measured 1.2e-6 for dpmpp3m, 10 steps). :func:`_keep_float64` turns that one cast into a
  no-op during ``step()`` so every oracle is compared at float64 rounding (1e-10); the
  ``*_as_shipped`` test keeps the cast and checks the 2e-6 level.
"""

from __future__ import annotations

import contextlib

import pytest
import torch

import bns
from bns.models.gmm import gaussian_mixture_model
from bns.schedules import CondOT, DiscreteVP

diffusers = pytest.importorskip("diffusers")

DIM, BATCH = 16, 6


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def _compare(model, solver, x0, states, tol):
    """Compare diffusers' states after each step with the NS trajectory, return the max error."""
    _, traj = bns.sample(model, x0, solver, return_trajectory=True)
    assert len(traj) - 1 == len(states) == solver.nfe
    err = max(_rel(ours, theirs) for ours, theirs in zip(traj[1:], states))
    assert err < tol, f"{solver.meta.get('solver')}: max relative error {err:.3g} >= {tol:g}"
    return err


@contextlib.contextmanager
def _keep_float64():
    """Make ``tensor.to(torch.float32)`` of a float64 tensor a no-op (see the module docstring)."""
    original = torch.Tensor.to

    def to(self, *args, **kwargs):
        if args and args[0] is torch.float32 and self.dtype == torch.float64 and not kwargs:
            return self
        return original(self, *args, **kwargs)

    torch.Tensor.to = to
    try:
        yield
    finally:
        torch.Tensor.to = original


def _step(scheduler, out, k, x, exact=True):
    with _keep_float64() if exact else contextlib.nullcontext():
        return scheduler.step(out, k, x).prev_sample


def _vp_model(scheduler):
    ac = scheduler.alphas_cumprod.to(torch.float64)
    schedule = DiscreteVP(ac)
    return gaussian_mixture_model(
        dim=DIM, components=5, std=0.1, schedule=schedule, prediction="eps", t_range=(0.0, 1.0)
    ), schedule


def _float64_sigmas(scheduler, schedule: DiscreteVP):
    """Karras-style sigmas ``sqrt((1 - ac) / ac)`` at the timesteps, then timestep 0, in float64."""
    ac = schedule.alphas_cumprod
    ks = scheduler.timesteps.long()
    sig = torch.sqrt((1 - ac[ks]) / ac[ks])
    last = torch.sqrt((1 - ac[0]) / ac[0])
    scheduler.sigmas = torch.cat([sig, last[None]])
    grid = torch.cat([schedule.flow_time(ks.to(torch.float64)), torch.ones(1, dtype=torch.float64)])
    return grid


def _run_eps_loop(scheduler, model, schedule, x0, exact=True):
    states, x = [], x0.clone()
    for k in scheduler.timesteps:
        t = schedule.flow_time(k.to(torch.float64)).expand(x.shape[0])
        eps = model.net(x, t)
        x = _step(scheduler, eps, k, x, exact)
        states.append(x)
    return states


@pytest.fixture(scope="module")
def x0():
    return torch.randn(BATCH, DIM, generator=torch.Generator().manual_seed(3), dtype=torch.float64)


def test_ddim_matches_diffusers(x0):
    sch = diffusers.DDIMScheduler(
        timestep_spacing="trailing", set_alpha_to_one=False, clip_sample=False
    )
    model, schedule = _vp_model(sch)
    sch.set_timesteps(10)
    sch.alphas_cumprod = schedule.alphas_cumprod.clone()
    sch.final_alpha_cumprod = schedule.alphas_cumprod[0].clone()
    ks = sch.timesteps.long()
    grid = torch.cat([schedule.flow_time(ks.to(torch.float64)), torch.ones(1, dtype=torch.float64)])
    states = _run_eps_loop(sch, model, schedule, x0)
    err = _compare(model, bns.solvers.ddim(grid, schedule), x0, states, 1e-10)
    print(f"ddim vs diffusers DDIMScheduler: {err:.2e}")


@pytest.mark.parametrize("order", [2, 3])
@pytest.mark.parametrize("steps,lof", [(10, True), (20, True), (10, False)])
def test_dpm_solver_pp_matches_diffusers(x0, order, steps, lof):
    # 10 < 15 steps: with lower_order_final diffusers lowers the orders of the last steps.
    sch = diffusers.DPMSolverMultistepScheduler(
        algorithm_type="dpmsolver++",
        solver_order=order,
        final_sigmas_type="sigma_min",
        lower_order_final=lof,
    )
    model, schedule = _vp_model(sch)
    sch.set_timesteps(steps)
    grid = _float64_sigmas(sch, schedule)
    states = _run_eps_loop(sch, model, schedule, x0)
    solver = bns.solvers.dpm_solver_pp(grid, schedule, order, lower_order_final=lof)
    err = _compare(model, solver, x0, states, 1e-10)
    print(
        f"dpmpp{order}m ({steps} steps, lower_order_final={lof}) vs diffusers DPMSolverMultistepScheduler: {err:.2e}"
    )


@pytest.mark.parametrize("order", [2, 3])
@pytest.mark.parametrize("steps,lof", [(10, True), (20, True), (10, False)])
def test_dpm_solver_pp_to_sigma_zero_matches_diffusers(x0, order, steps, lof):
    """The exact end: diffusers' final step to sigma = 0 (``final_sigmas_type="zero"``) on a
    discrete VP model is bns's solver with its last step replaced by the step to the data
    (``with_data_end``), to float64 rounding, at every state."""
    sch = diffusers.DPMSolverMultistepScheduler(
        algorithm_type="dpmsolver++",
        solver_order=order,
        final_sigmas_type="zero",
        lower_order_final=lof,
    )
    model, schedule = _vp_model(sch)
    sch.set_timesteps(steps)
    grid = _float64_sigmas(sch, schedule)
    sch.sigmas[-1] = 0.0  # the end: sigma = 0 (grid[-1] = 1 only marks it on our side)
    states = _run_eps_loop(sch, model, schedule, x0)
    plain = bns.solvers.dpm_solver_pp(grid, schedule, order, lower_order_final=lof)
    solver = bns.solvers.with_data_end(plain, schedule)
    assert solver.meta["end"] == "data" and torch.equal(solver.times, plain.times)
    err = _compare(model, solver, x0, states, 1e-10)
    # The end differs from the plain solver's, which stops at sigma(t = 1) > 0.
    assert _rel(bns.sample(model, x0, plain), states[-1]) > 1e-4
    print(f"dpmpp{order}m to sigma 0 ({steps} steps, lof={lof}) vs diffusers: {err:.2e}")


def test_dpm_solver_pp_matches_diffusers_as_shipped(x0):
    """Without the float64 shim: diffusers' float32 state rounding is the only difference."""
    sch = diffusers.DPMSolverMultistepScheduler(
        algorithm_type="dpmsolver++", solver_order=3, final_sigmas_type="sigma_min"
    )
    model, schedule = _vp_model(sch)
    sch.set_timesteps(10)
    grid = _float64_sigmas(sch, schedule)
    states = _run_eps_loop(sch, model, schedule, x0, exact=False)
    err = _compare(model, bns.solvers.dpm_solver_pp(grid, schedule, 3), x0, states, 2e-6)
    print(f"dpmpp3m (10 steps, float32 state in diffusers) vs DPMSolverMultistep: {err:.2e}")


@pytest.mark.parametrize("order", [2, 3])
@pytest.mark.parametrize("steps,lof", [(6, True), (12, True), (6, False)])
def test_unipc_matches_diffusers(x0, order, steps, lof):
    sch = diffusers.UniPCMultistepScheduler(
        solver_order=order,
        solver_type="bh2",
        predict_x0=True,
        final_sigmas_type="sigma_min",
        lower_order_final=lof,
    )
    model, schedule = _vp_model(sch)
    sch.set_timesteps(steps)
    grid = _float64_sigmas(sch, schedule)
    states = _run_eps_loop(sch, model, schedule, x0)
    solver = bns.solvers.unipc(grid, schedule, order, lower_order_final=lof)
    err = _compare(model, solver, x0, states, 1e-10)
    print(
        f"unipc{order} ({steps} steps, lower_order_final={lof}) vs diffusers UniPCMultistepScheduler: {err:.2e}"
    )


def _flow_model():
    return gaussian_mixture_model(
        dim=DIM, components=5, std=0.1, schedule=CondOT(), prediction="velocity", t_range=(0.0, 1.0)
    )


def _run_flow_loop(scheduler, model, x0):
    """diffusers' flow convention: sigma = 1 - t, the net returns eps - x1 = -u."""
    states, x = [], x0.clone()
    sig = scheduler.sigmas
    for i, k in enumerate(scheduler.timesteps):
        t = (1 - sig[i]).expand(x.shape[0])
        x = _step(scheduler, -model.net(x, t), k, x)
        states.append(x)
    return states


@pytest.mark.parametrize(
    "name,cls,kw",
    [
        ("dpmpp2m", "DPMSolverMultistepScheduler", dict(solver_order=2)),
        ("dpmpp3m", "DPMSolverMultistepScheduler", dict(solver_order=3)),
        ("unipc2", "UniPCMultistepScheduler", dict(solver_order=2)),
        ("unipc3", "UniPCMultistepScheduler", dict(solver_order=3)),
    ],
)
def test_flow_sigmas_to_sigma_zero_match_diffusers(x0, name, cls, kw):
    """Flow-model configuration (as SD3 / Wan pipelines use it): the grid ends at sigma = 0,
    flow time 1, where our solvers take the first-order limit step."""
    sch = getattr(diffusers, cls)(
        use_flow_sigmas=True,
        prediction_type="flow_prediction",
        flow_shift=3.0,
        final_sigmas_type="zero",
        **kw,
    )
    sch.set_timesteps(8)
    sch.sigmas = sch.sigmas.to(torch.float64)
    grid = 1 - sch.sigmas
    assert float(grid[-1]) == 1.0
    model = _flow_model()
    states = _run_flow_loop(sch, model, x0)
    order = int(name[-2] if name.startswith("dpm") else name[-1])
    if name.startswith("dpm"):
        solver = bns.solvers.dpm_solver_pp(grid, CondOT(), order)
    else:
        solver = bns.solvers.unipc(grid, CondOT(), order)
    err = _compare(model, solver, x0, states, 1e-10)
    print(f"{name} flow sigmas to sigma = 0 vs diffusers {cls}: {err:.2e}")


def test_flow_match_euler_matches_diffusers(x0):
    sch = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0)
    sch.set_timesteps(12)
    sch.sigmas = sch.sigmas.to(torch.float64)
    grid = 1 - sch.sigmas  # [0, 1] exactly: sigmas run from 1 to 0
    assert float(grid[0]) == 0.0 and float(grid[-1]) == 1.0
    model = _flow_model()
    states = _run_flow_loop(sch, model, x0)
    err = _compare(model, bns.solvers.euler(grid), x0, states, 1e-10)
    print(f"euler vs diffusers FlowMatchEulerDiscreteScheduler: {err:.2e}")


@pytest.mark.parametrize(
    "method,build,stride",
    [
        ("euler", bns.solvers.euler, 1),
        ("midpoint", bns.solvers.midpoint, 2),
        ("rk4", lambda g: bns.solvers.rk4(g, variant="3/8"), 4),
    ],
)
def test_torchdiffeq_fixed_grid(x0, method, build, stride):
    torchdiffeq = pytest.importorskip("torchdiffeq")
    model = _flow_model()
    g = torch.Generator().manual_seed(5)
    grid = torch.cat([torch.zeros(1), torch.rand(7, generator=g).sort().values, torch.ones(1)])
    grid = grid.to(torch.float64)
    states = torchdiffeq.odeint(lambda t, x: model.velocity(x, t), x0, grid, method=method)
    solver = build(grid)
    _, traj = bns.sample(model, x0, solver, return_trajectory=True)
    ours = traj[::stride]  # the NS trajectory holds every stage; keep the step ends
    assert len(ours) == len(states)
    err = max(_rel(a, b) for a, b in zip(ours, states))
    assert err < 1e-12, f"{method}: {err:.3g}"
    print(f"{method} vs torchdiffeq odeint fixed grid: {err:.2e}")


def test_classic_rk4_is_not_torchdiffeq_rk4(x0):
    """The oracle above would catch a swapped variant: the two RK4s differ visibly."""
    torchdiffeq = pytest.importorskip("torchdiffeq")
    model = _flow_model()
    grid = torch.linspace(0, 1, 4, dtype=torch.float64)
    theirs = torchdiffeq.odeint(lambda t, x: model.velocity(x, t), x0, grid, method="rk4")[-1]
    ours = bns.sample(model, x0, bns.solvers.rk4(grid))
    assert _rel(ours, theirs) > 1e-6
