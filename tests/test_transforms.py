"""Scale-time transformations (scheduler changes) and solvers exported through them.

A solver run numerically on the transformed ODE in ``r`` (``bns.solvers._trace.run``) must equal
its NS export (``trace`` with the transform) sampled by ``bns.sample`` in the original
coordinates; the transformed velocity must be the derivative of ``s_r x(t_r)`` along an exact
trajectory; ``t_of_r`` and ``r_of_t`` must be inverses, finite at the ends of [0, 1].
"""

from __future__ import annotations

import math

import pytest
import torch

import bns
from bns.models.gmm import gaussian_mixture_model
from bns.schedules import VP, CondOT, Cosine
from bns.solvers import exponential, multistep, runge_kutta
from bns.solvers._trace import run, trace
from bns.transforms import ScheduleChange, precondition

F64 = torch.float64

# (label, source scheduler, prediction of the model, model t_range, target scheduler)
PAIRS = [
    ("vp->condot0.5", VP(), "eps", (0.0, 1 - 1e-3), CondOT(0.5)),
    ("vp->condot1", VP(), "eps", (0.0, 1 - 1e-3), CondOT(1.0)),
    ("vp->condot2", VP(), "eps", (0.0, 1 - 1e-3), CondOT(2.0)),
    ("condot->cosine", CondOT(), "velocity", (0.0, 1.0), Cosine()),
    ("cosine->condot", Cosine(), "velocity", (0.0, 1.0), CondOT()),
]
IDS = [p[0] for p in PAIRS]


def _rel(a, b) -> float:
    return float((a - b).abs().max() / b.abs().max())


def _methods(target):
    """(label, method, kwargs) run the same way by ``run`` and ``trace``."""
    return [
        ("euler", runge_kutta.euler_method, {}),
        ("midpoint", runge_kutta.midpoint_method, {}),
        ("heun", runge_kutta.heun_method, {}),
        ("rk4", runge_kutta.rk4_method, {}),
        ("rk4_38", runge_kutta.rk38_method, {}),
        ("ab3", multistep.adams_bashforth_method, {"order": 3}),
        ("ipndm", multistep.ipndm_method, {"order": 4}),
        ("ddim", exponential.ddim_method, {"schedule": target}),
        ("dpmpp2m", exponential.dpm_solver_pp_method, {"schedule": target, "order": 2}),
        ("dpmpp3m", exponential.dpm_solver_pp_method, {"schedule": target, "order": 3}),
        ("unipc2", exponential.unipc_method, {"schedule": target, "order": 2}),
        ("unipc3", exponential.unipc_method, {"schedule": target, "order": 3}),
    ]


@pytest.mark.parametrize("label,source,prediction,t_range,target", PAIRS, ids=IDS)
def test_run_on_transformed_ode_equals_ns_export(label, source, prediction, t_range, target):
    model = gaussian_mixture_model(
        dim=32, components=6, std=0.1, schedule=source, prediction=prediction, t_range=t_range
    )
    change = ScheduleChange(source, target)
    r_range = change.r_range(model.t_range)
    grid = bns.grids.uniform(6, r_range)
    x0 = torch.randn(4, 32, generator=torch.Generator().manual_seed(0), dtype=F64)

    def velocity(x, t):
        return model.velocity(x, t)

    errors = {}
    for name, method, kw in _methods(target):
        direct = run(method, velocity, x0, grid, transform=change, **kw)
        solver = trace(method, grid, transform=change, **kw)
        solver.validate(t_range=model.t_range)  # exported times span the model's own range
        errors[name] = _rel(bns.sample(model, x0, solver), direct)
    bad = {k: f"{v:.2e}" for k, v in errors.items() if not v < 1e-10}
    assert not bad, f"{label}: {bad}"


@pytest.mark.parametrize("label,source,prediction,t_range,target", PAIRS, ids=IDS)
def test_transform_changes_the_solver(label, source, prediction, t_range, target):
    """The export with a transform is a different solver (else the test above proves little)."""
    change = ScheduleChange(source, target)
    grid_r = bns.grids.uniform(4, change.r_range(t_range))
    with_t = bns.solvers.midpoint(grid_r, transform=change)
    plain = bns.solvers.midpoint(change.t_of_r(grid_r))
    assert float((with_t.b - plain.b).abs().max()) > 1e-3


def _single_gaussian(source, prediction, t_range):
    model = gaussian_mixture_model(
        dim=8, components=1, std=0.5, schedule=source, prediction=prediction, t_range=t_range
    )
    mu, s = model.net.means[0], float(model.net.stds[0])
    z = torch.randn(3, 8, generator=torch.Generator().manual_seed(4), dtype=F64)

    def x_of_t(t: float):
        """The exact trajectory through noise ``z``: ``alpha mu + sqrt(alpha^2 s^2 + sigma^2) z``."""
        a, sig = (float(v) for v in source(torch.tensor(t, dtype=F64))[:2])
        return a * mu + math.sqrt(a * a * s * s + sig * sig) * z

    return model, x_of_t


@pytest.mark.parametrize("label,source,prediction,t_range,target", PAIRS, ids=IDS)
def test_transformed_velocity_is_derivative_of_transformed_path(
    label, source, prediction, t_range, target
):
    model, x_of_t = _single_gaussian(source, prediction, t_range)
    change = ScheduleChange(source, target)
    lo, hi = change.r_range(t_range)

    def xbar(r: float):
        t, _, s, _ = change(r)
        return float(s) * x_of_t(float(t))

    delta = 1e-5
    for frac in (0.1, 0.3, 0.5, 0.7, 0.9):
        r = lo + frac * (hi - lo)
        fd = (xbar(r + delta) - xbar(r - delta)) / (2 * delta)
        ubar = change.velocity(lambda x, t: model.velocity(x, t), xbar(r), r)
        assert _rel(ubar, fd) < 1e-8, (label, r)


@pytest.mark.parametrize("label,source,prediction,t_range,target", PAIRS, ids=IDS)
def test_t_of_r_and_r_of_t_are_inverses(label, source, prediction, t_range, target):
    change = ScheduleChange(source, target)
    lo, hi = change.r_range(t_range)
    r = torch.linspace(lo, hi, 41, dtype=F64)[1:-1]
    assert torch.allclose(change.r_of_t(change.t_of_r(r)), r, rtol=0, atol=1e-10)
    t = torch.linspace(*t_range, 41, dtype=F64)[1:-1]
    assert torch.allclose(change.t_of_r(change.r_of_t(t)), t, rtol=0, atol=1e-10)
    # and the range maps onto the model's range
    ends = change.t_of_r(torch.tensor([lo, hi], dtype=F64))
    assert torch.allclose(ends, torch.tensor(t_range, dtype=F64), rtol=0, atol=1e-9)
    # t_r increases
    assert torch.all(change.t_of_r(r)[1:] > change.t_of_r(r)[:-1])


@pytest.mark.parametrize(
    "source,target",
    [(CondOT(), Cosine()), (Cosine(), CondOT()), (CondOT(), CondOT(2.0)), (Cosine(), CondOT(0.5))],
)
def test_ends_of_unit_interval_are_finite(source, target):
    """Schedulers that reach alpha = 0 and sigma = 0 map [0, 1] onto [0, 1] with finite t', s
    and s'/s at both ends, so a solver on [0, 1] in r can be exported."""
    change = ScheduleChange(source, target)
    for r, t_expected in ((0.0, 0.0), (1.0, 1.0)):
        t, dt, s, dlog_s = change(r)
        assert math.isclose(float(t), t_expected, abs_tol=1e-12)
        assert all(math.isfinite(float(v)) for v in (dt, s, dlog_s)), (r, t, dt, s, dlog_s)
        assert float(dt) > 0 and float(s) > 0
    assert change.r_range((0.0, 1.0)) == (0.0, 1.0)
    # the transformed velocity of a [0, 1] model is finite at the ends too
    model = gaussian_mixture_model(dim=8, components=3, schedule=source)
    x = torch.randn(2, 8, dtype=F64)
    for r in (0.0, 1.0):
        assert torch.all(torch.isfinite(change.velocity(model.velocity, x, r)))


def test_vp_source_ends_are_finite_on_the_model_range():
    change = ScheduleChange(VP(), CondOT())
    lo, hi = change.r_range((0.0, 1 - 1e-3))
    assert 0.0 < lo < hi < 1.0
    for r in (lo, hi):
        assert all(math.isfinite(float(v)) for v in change(r))


@pytest.mark.parametrize("label,source,prediction,t_range,target", PAIRS, ids=IDS)
def test_exponential_solvers_are_invariant_to_scheduler_change(
    label, source, prediction, t_range, target
):
    """Data-prediction exponential integrators only see log-SNR and x / sigma: run on the
    transformed ODE with the target scheduler they equal the plain solver on the grid t_r. This
    is why ``schedule`` must be the transform's target."""
    change = ScheduleChange(source, target)
    grid_r = bns.grids.uniform(6, change.r_range(t_range))
    grid_t = change.t_of_r(grid_r)
    grid_t[0], grid_t[-1] = t_range  # exact ends, as the export pins them
    for build in (
        lambda g, s, **k: bns.solvers.ddim(g, s, **k),
        lambda g, s, **k: bns.solvers.dpm_solver_pp(g, s, 3, **k),
        lambda g, s, **k: bns.solvers.unipc(g, s, 3, **k),
    ):
        moved = build(grid_r, target, transform=change)
        plain = build(grid_t, source)
        assert torch.allclose(moved.times, plain.times, rtol=0, atol=1e-10)
        scale = float(plain.b.abs().max())
        assert float((moved.a - plain.a).abs().max()) < 1e-9
        assert float((moved.b - plain.b).abs().max()) < 1e-9 * scale
    # a time-stepping solver is not invariant
    assert not torch.allclose(
        bns.solvers.midpoint(grid_r, transform=change).b, bns.solvers.midpoint(grid_t).b
    )


def test_precondition_is_a_change_to_condot_sigma0():
    change = precondition(VP(), sigma0=2.0)
    assert change.target == CondOT(2.0) and change.source == VP()
    grid = bns.grids.uniform(4, change.r_range((0.0, 0.999)))
    a = bns.solvers.midpoint(grid, transform=change)
    b = bns.solvers.midpoint(grid, transform=ScheduleChange(VP(), CondOT(2.0)))
    assert torch.equal(a.b, b.b) and a.meta["transform"] == b.meta["transform"]
