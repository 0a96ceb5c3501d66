"""Time grids: exact ends, monotonicity, the spacing each grid promises, and its errors."""

from __future__ import annotations

import math

import pytest
import torch

from bns import grids
from bns.grids import GridError, check_grid
from bns.schedules import EDM, VP, CondOT, Cosine, DiscreteVP

F64 = torch.float64


def _discrete_vp() -> DiscreteVP:
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=F64)
    return DiscreteVP(torch.cumprod(1 - betas, 0))


# (schedule, a t_range with finite log-SNR at both ends)
FINITE = [
    (VP(), (0.0, 1 - 1e-3)),
    (CondOT(), (1e-3, 1 - 1e-3)),
    (Cosine(), (0.01, 0.99)),
    (_discrete_vp(), (0.0, 1.0)),
    (EDM(), (0.0, 1.0)),
]
IDS = ["vp", "condot", "cosine", "discrete-vp", "edm"]


def _is_increasing(g):
    return bool(torch.all(g[1:] > g[:-1]))


@pytest.mark.parametrize("t_range", [(0.0, 1.0), (1e-3, 1 - 1e-3), (0.1, 0.7)])
@pytest.mark.parametrize("steps", [1, 3, 10])
def test_uniform(steps, t_range):
    g = grids.uniform(steps, t_range)
    assert g.dtype == F64 and g.shape == (steps + 1,)
    assert float(g[0]) == t_range[0] and float(g[-1]) == t_range[1]
    want = torch.tensor(
        [t_range[0] + i * (t_range[1] - t_range[0]) / steps for i in range(steps + 1)], dtype=F64
    )
    torch.testing.assert_close(g, want, rtol=0, atol=1e-15)


@pytest.mark.parametrize("schedule,t_range", FINITE, ids=IDS)
@pytest.mark.parametrize("steps", [1, 4, 17])
def test_logsnr_grid_is_equally_spaced_in_log_snr(schedule, t_range, steps):
    g = grids.logsnr(steps, schedule, t_range)
    assert g.dtype == F64 and g.shape == (steps + 1,)
    assert float(g[0]) == t_range[0] and float(g[-1]) == t_range[1]  # exact, not rounded
    assert _is_increasing(g)
    lam = schedule.log_snr(g)
    d = lam[1:] - lam[:-1]
    torch.testing.assert_close(
        d, torch.full_like(d, float(lam[-1] - lam[0]) / steps), rtol=1e-9, atol=1e-9
    )


@pytest.mark.parametrize("schedule,t_range", FINITE, ids=IDS)
@pytest.mark.parametrize("rho", [1.0, 3.0, 7.0])
def test_edm_grid_is_equally_spaced_in_s_to_the_one_over_rho(schedule, t_range, rho):
    steps = 9
    g = grids.edm(steps, schedule, t_range, rho=rho)
    assert float(g[0]) == t_range[0] and float(g[-1]) == t_range[1]
    assert _is_increasing(g)
    a, s, _, _ = schedule(g)
    level = (s / a) ** (1 / rho)  # noise level s = sigma / alpha
    d = level[1:] - level[:-1]
    torch.testing.assert_close(
        d, torch.full_like(d, float(level[-1] - level[0]) / steps), rtol=1e-8, atol=1e-10
    )


def test_edm_grid_reproduces_karras_sigmas():
    # On the EDM scheduler the grid's noise levels are Karras et al.'s formula (eq. 5).
    sched = EDM(sigma_min=0.002, sigma_max=80.0)
    n, rho = 18, 7.0
    g = grids.edm(n, sched, (0.0, 1.0), rho)
    i = torch.arange(n + 1, dtype=F64)
    karras = (80.0 ** (1 / rho) + i / n * (0.002 ** (1 / rho) - 80.0 ** (1 / rho))) ** rho
    torch.testing.assert_close(sched.noise_level(g), karras, rtol=1e-12, atol=0)


@pytest.mark.parametrize(
    "schedule,t_range",
    [
        (CondOT(), (0.0, 1.0)),
        (CondOT(), (0.1, 1.0)),
        (Cosine(), (0.0, 0.9)),
        (Cosine(), (0.1, 1.0)),
        (VP(), (0.0, 1.0)),
    ],
    ids=["condot", "condot-t1", "cosine-t0", "cosine-t1", "vp-t1"],
)
@pytest.mark.parametrize("grid", [grids.logsnr, grids.edm])
def test_infinite_log_snr_ends_are_refused(grid, schedule, t_range):
    with pytest.raises(GridError, match=r"infinite .* inside \(0, 1\)"):
        grid(4, schedule, t_range)


@pytest.mark.parametrize("steps", [0, -1, 2.5, None, "3", True, math.inf, math.nan])
@pytest.mark.parametrize("grid", ["uniform", "logsnr", "edm"])
def test_bad_steps(grid, steps):
    call = {
        "uniform": lambda: grids.uniform(steps),
        "logsnr": lambda: grids.logsnr(steps, VP(), (0.0, 0.999)),
        "edm": lambda: grids.edm(steps, VP(), (0.0, 0.999)),
    }[grid]
    with pytest.raises(GridError, match="steps must be a positive integer"):
        call()


def test_integral_float_steps_are_accepted():
    assert grids.uniform(4.0).shape == (5,)


@pytest.mark.parametrize(
    "t_range", [(0.5, 0.5), (0.7, 0.2), (-0.1, 1.0), (0.0, 1.1), (math.nan, 1.0)]
)
def test_bad_t_range(t_range):
    for call in (
        lambda: grids.uniform(3, t_range),
        lambda: grids.logsnr(3, VP(), t_range),
        lambda: grids.edm(3, VP(), t_range),
    ):
        with pytest.raises(GridError, match="t_range"):
            call()
    with pytest.raises(GridError, match="two numbers"):
        grids.uniform(3, (0.0,))


@pytest.mark.parametrize("rho", [0.0, -7.0, math.inf, math.nan])
def test_bad_rho(rho):
    with pytest.raises(GridError, match="rho"):
        grids.edm(4, VP(), (0.0, 0.999), rho=rho)


def test_check_grid():
    g = check_grid([0.0, 0.25, 1.0], (0.0, 1.0))
    assert g.dtype == F64 and g.tolist() == [0.0, 0.25, 1.0]
    with pytest.raises(GridError, match="1-D tensor of at least 2"):
        check_grid(torch.zeros(2, 2))
    with pytest.raises(GridError, match="1-D tensor of at least 2"):
        check_grid([0.5])
    with pytest.raises(GridError, match="non-finite"):
        check_grid([0.0, math.nan, 1.0])
    with pytest.raises(GridError, match="strictly increasing"):
        check_grid([0.0, 0.5, 0.5, 1.0])
    with pytest.raises(GridError, match="strictly increasing"):
        check_grid([1.0, 0.0])
    with pytest.raises(GridError, match="leaves the model's range"):
        check_grid([0.0, 1.0], (0.0, 0.999))
    with pytest.raises(GridError, match="leaves the model's range"):
        check_grid([-0.01, 0.5], (0.0, 1.0))


def test_grid_error_is_a_value_error():
    assert issubclass(GridError, ValueError)
