"""Schedulers: closed forms, derivatives against finite differences, log-SNR inverses, configs.

Everything runs in float64 and compares against an independent answer (the closed form written
out again here, or a central difference of the scheduler's own values).
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from bns.schedules import EDM, VP, CondOT, Cosine, DiscreteVP, Schedule, schedule_from_config

F64 = torch.float64
N_TRAIN = 1000


def linear_alphas_cumprod() -> torch.Tensor:
    """diffusers' "linear" schedule: betas from 1e-4 to 0.02 over 1000 steps."""
    betas = torch.linspace(1e-4, 0.02, N_TRAIN, dtype=F64)
    return torch.cumprod(1 - betas, 0)


def scaled_linear_alphas_cumprod() -> torch.Tensor:
    """diffusers' "scaled_linear" schedule (Stable Diffusion): betas linear in sqrt space."""
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, N_TRAIN, dtype=F64) ** 2
    return torch.cumprod(1 - betas, 0)


def all_schedules() -> list[Schedule]:
    return [
        CondOT(),
        CondOT(sigma0=0.5),
        VP(),
        VP(beta_min=0.05, beta_max=12.0),
        Cosine(),
        DiscreteVP(linear_alphas_cumprod()),
        DiscreteVP(scaled_linear_alphas_cumprod()),
        EDM(),
        EDM(sigma_min=0.01, sigma_max=50.0),
    ]


SCHEDULES = all_schedules()
IDS = [repr(s)[:40] for s in SCHEDULES]
VARIANCE_PRESERVING = [s for s in SCHEDULES if not isinstance(s, CondOT)]

# Interior times that sit 0.37 of a step away from every DiscreteVP knot t_k = 1 - k/999, so
# central differences with h << 1e-4 never straddle a knot.
T_INTERIOR = torch.tensor(
    [1 - (k + 0.37) / (N_TRAIN - 1) for k in (2, 40, 250, 499, 700, 900, 996)], dtype=F64
)
# Times close to the ends, for the smooth schedulers.
T_NEAR_ENDS = torch.tensor([1e-6, 1e-4, 1e-2, 1 - 1e-2, 1 - 1e-4, 1 - 1e-6], dtype=F64)


def central_difference(fn, t: torch.Tensor, h: float) -> torch.Tensor:
    return (fn(t + h) - fn(t - h)) / (2 * h)


@pytest.mark.parametrize("sched", SCHEDULES, ids=IDS)
def test_derivatives_equal_central_differences(sched):
    t = T_INTERIOR
    a, s, da, ds = sched(t)
    h = 1e-6
    fd_a = central_difference(lambda u: sched(u)[0], t, h)
    fd_s = central_difference(lambda u: sched(u)[1], t, h)
    # Central differences are O(h^2) + O(eps/h): relative 1e-6 catches any wrong coefficient.
    torch.testing.assert_close(da, fd_a, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(ds, fd_s, rtol=1e-6, atol=1e-9)
    fd_lam = central_difference(sched.log_snr, t, h)
    torch.testing.assert_close(sched.d_log_snr(t), fd_lam, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize(
    "sched", [s for s in SCHEDULES if not isinstance(s, DiscreteVP)], ids=lambda s: repr(s)[:40]
)
def test_derivatives_near_the_ends(sched):
    t = T_NEAR_ENDS
    a, s, da, ds = sched(t)
    # A step relative to the distance to the end: VP's sigma ~ sqrt(1 - t) bends hard there.
    h = 1e-3 * torch.minimum(t, 1 - t)
    torch.testing.assert_close(
        da, central_difference(lambda u: sched(u)[0], t, h), rtol=1e-5, atol=1e-6
    )
    torch.testing.assert_close(
        ds, central_difference(lambda u: sched(u)[1], t, h), rtol=1e-5, atol=1e-6
    )


@pytest.mark.parametrize("sched", SCHEDULES, ids=IDS)
def test_autograd_through_t_matches_returned_derivatives(sched):
    # BNS learns its grid, so the schedule must be differentiable in t, consistently.
    t = T_INTERIOR.clone().requires_grad_(True)
    a, s, da, ds = sched(t)
    (ga,) = torch.autograd.grad(a.sum(), t)
    t2 = T_INTERIOR.clone().requires_grad_(True)
    (gs,) = torch.autograd.grad(sched(t2)[1].sum(), t2)
    torch.testing.assert_close(ga, da.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gs, ds.detach(), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("sched", SCHEDULES, ids=IDS)
def test_alpha_increasing_sigma_decreasing(sched):
    t = torch.linspace(0, 1, 2001, dtype=F64)
    a, s, da, ds = sched(t)
    assert torch.all(a[1:] > a[:-1])
    assert torch.all(s[1:] < s[:-1])
    assert torch.all(da[1:-1] > 0) and torch.all(da >= 0)  # cosine: alpha'(1) = 0
    assert torch.all(ds[1:-1] < 0)  # cosine: sigma'(0) = 0; VP: sigma'(1) = -inf
    assert torch.all(a >= 0) and torch.all(s >= 0)


@pytest.mark.parametrize("sched", VARIANCE_PRESERVING, ids=lambda s: repr(s)[:40])
def test_variance_preserving(sched):
    t = torch.cat([torch.linspace(0, 1, 101, dtype=F64), T_NEAR_ENDS])
    a, s, da, ds = sched(t)
    torch.testing.assert_close(a * a + s * s, torch.ones_like(t), rtol=0, atol=1e-14)
    # ... and so a a' + s s' = 0 wherever s' is finite.
    inner = t < 1
    torch.testing.assert_close(
        (a * da + s * ds)[inner], torch.zeros_like(t[inner]), rtol=0, atol=1e-9
    )


@pytest.mark.parametrize("sched", SCHEDULES, ids=IDS)
def test_log_snr_inverse(sched):
    t = torch.cat([T_INTERIOR, T_NEAR_ENDS, torch.tensor([0.0, 1.0], dtype=F64)])
    lam = sched.log_snr(t)
    a, s, _, _ = sched(t)
    finite = torch.isfinite(lam)
    torch.testing.assert_close(lam[finite], (torch.log(a) - torch.log(s))[finite])
    back = sched.t_from_log_snr(lam)
    torch.testing.assert_close(back, t, rtol=0, atol=1e-12)
    # The default bisection of the base class inverts every scheduler too.
    back_bisect = Schedule.t_from_log_snr(sched, lam)
    torch.testing.assert_close(back_bisect, t, rtol=0, atol=1e-12)
    # And the other way round, on log-SNRs inside the scheduler's range.
    lo, hi = (float(v) for v in sched.log_snr(torch.tensor([1e-3, 1 - 1e-3], dtype=F64)))
    lam2 = torch.linspace(lo, hi, 37, dtype=F64)
    torch.testing.assert_close(
        sched.log_snr(sched.t_from_log_snr(lam2)), lam2, rtol=1e-10, atol=1e-9
    )


@pytest.mark.parametrize("sched", SCHEDULES, ids=IDS)
def test_t_from_log_snr_shapes_and_clamping(sched):
    # 0-d tensors and python floats work; log-SNRs outside the range clamp onto [0, 1].
    lam_mid = float(sched.log_snr(torch.tensor(0.5, dtype=F64)))
    assert sched.t_from_log_snr(torch.tensor(lam_mid, dtype=F64)).shape == ()
    assert abs(float(sched.t_from_log_snr(lam_mid)) - 0.5) < 1e-12
    lam = torch.tensor([[-math.inf, -1e3], [1e3, math.inf]], dtype=F64)
    t = sched.t_from_log_snr(lam)
    assert t.shape == (2, 2)
    torch.testing.assert_close(t, torch.tensor([[0.0, 0.0], [1.0, 1.0]], dtype=F64))


@pytest.mark.parametrize("sched", SCHEDULES, ids=IDS)
def test_bisection_inverse_is_differentiable(sched):
    t0 = T_INTERIOR[1:-1]
    lam = sched.log_snr(t0).detach().requires_grad_(True)
    t = Schedule.t_from_log_snr(sched, lam)
    (g,) = torch.autograd.grad(t.sum(), lam)
    torch.testing.assert_close(g, 1 / sched.d_log_snr(t0), rtol=1e-9, atol=0)


@pytest.mark.parametrize(
    "sched", [CondOT(), CondOT(0.5), Cosine(), VP()], ids=lambda s: repr(s)[:40]
)
def test_infinite_log_snr_at_the_ends(sched):
    lam = sched.log_snr(torch.tensor([0.0, 1.0], dtype=F64))
    if not isinstance(sched, VP):  # alpha_0 = 0
        assert lam[0] == -math.inf
    assert lam[1] == math.inf  # sigma_1 = 0 exactly (cos(pi/2) must not round to 6e-17)
    assert sched(torch.tensor(1.0, dtype=F64))[1] == 0


def test_condot_closed_form():
    t = torch.linspace(0, 1, 11, dtype=F64)
    for sigma0 in (1.0, 0.5, 2.0):
        a, s, da, ds = CondOT(sigma0)(t)
        torch.testing.assert_close(a, t, rtol=0, atol=0)
        torch.testing.assert_close(s, sigma0 * (1 - t), rtol=0, atol=1e-16)
        assert torch.all(da == 1) and torch.all(ds == -sigma0)
        lam = CondOT(sigma0).log_snr(torch.tensor([0.25], dtype=F64))
        assert abs(float(lam) - math.log(0.25 / (sigma0 * 0.75))) < 1e-14


def test_cosine_closed_form():
    t = torch.linspace(0, 1, 11, dtype=F64)
    a, s, da, ds = Cosine()(t)
    want = (
        [math.sin(math.pi * v / 2) for v in t.tolist()],
        [math.cos(math.pi * v / 2) for v in t.tolist()],
    )
    torch.testing.assert_close(a, torch.tensor(want[0], dtype=F64), rtol=0, atol=1e-15)
    torch.testing.assert_close(s, torch.tensor(want[1], dtype=F64), rtol=0, atol=1e-15)


@pytest.mark.parametrize("beta_min,beta_max", [(0.1, 20.0), (0.05, 12.0)])
def test_vp_closed_form(beta_min, beta_max):
    # bns-math.md: alpha_t = exp(-(1-t)^2 (b1 - b0)/4 - (1-t) b0/2), sigma_t = sqrt(1 - alpha^2).
    sched = VP(beta_min, beta_max)
    for t in (0.0, 0.1, 0.5, 0.9, 0.999, 1.0):
        a, s, da, ds = (float(v) for v in sched(torch.tensor(t, dtype=F64)))
        want_a = math.exp(-((1 - t) ** 2) * (beta_max - beta_min) / 4 - (1 - t) * beta_min / 2)
        assert abs(a - want_a) < 1e-15
        assert abs(s - math.sqrt(1 - want_a**2)) < 1e-12
        # alpha' = alpha (beta(s) / 2) with beta(s) = b0 + s (b1 - b0) the DDPM rate at s = 1-t.
        beta = beta_min + (1 - t) * (beta_max - beta_min)
        assert abs(da - want_a * beta / 2) < 1e-12


def test_vp_inverse_is_accurate_near_t_1():
    # Near t = 1 the inverse must not lose digits to cancellation.
    sched = VP()
    t = 1 - torch.logspace(-12, -3, 10, dtype=F64)
    back = sched.t_from_log_snr(sched.log_snr(t))
    torch.testing.assert_close(1 - back, 1 - t, rtol=1e-6, atol=0)


def test_edm_closed_form():
    sched = EDM(sigma_min=0.002, sigma_max=80.0)
    assert abs(float(sched.noise_level(0.0)) - 80.0) < 1e-12
    assert abs(float(sched.noise_level(1.0)) - 0.002) < 1e-15
    t = torch.tensor([0.0, 0.3, 0.7, 1.0], dtype=F64)
    s = (1 - t) * math.log(80.0) + t * math.log(0.002)
    s = torch.exp(s)
    a, sig, _, _ = sched(t)
    torch.testing.assert_close(a, 1 / torch.sqrt(1 + s * s), rtol=1e-14, atol=0)
    torch.testing.assert_close(sig, s / torch.sqrt(1 + s * s), rtol=1e-14, atol=0)
    torch.testing.assert_close(sched.log_snr(t), -torch.log(s), rtol=1e-14, atol=1e-14)


@pytest.mark.parametrize("make", [linear_alphas_cumprod, scaled_linear_alphas_cumprod])
def test_discrete_vp_matches_alphas_cumprod_at_the_knots(make):
    ac = make()
    sched = DiscreteVP(ac)
    assert sched.num_train_timesteps == N_TRAIN
    k = torch.arange(N_TRAIN, dtype=F64)
    t = sched.flow_time(k)
    torch.testing.assert_close(t, 1 - k / (N_TRAIN - 1))
    torch.testing.assert_close(sched.timestep(t), k, rtol=0, atol=1e-9)
    a, s, _, _ = sched(t)
    torch.testing.assert_close(a * a, ac, rtol=1e-12, atol=0)
    torch.testing.assert_close(s * s, 1 - ac, rtol=1e-10, atol=0)
    # Between knots the log-SNR is linear: the midpoint holds the mean of its neighbours.
    lam = 0.5 * (torch.log(ac) - torch.log1p(-ac))
    mid = sched.log_snr(sched.flow_time(k[:-1] + 0.5))
    torch.testing.assert_close(mid, 0.5 * (lam[:-1] + lam[1:]), rtol=0, atol=1e-12)
    # The inverse lands exactly on the knots and between them.
    torch.testing.assert_close(sched.t_from_log_snr(lam), t, rtol=0, atol=1e-12)
    torch.testing.assert_close(
        sched.t_from_log_snr(0.5 * (lam[:-1] + lam[1:])),
        sched.flow_time(k[:-1] + 0.5),
        rtol=0,
        atol=1e-12,
    )


def test_discrete_vp_inverse_gradient():
    sched = DiscreteVP(linear_alphas_cumprod())
    t0 = T_INTERIOR
    lam = sched.log_snr(t0).detach().requires_grad_(True)
    (g,) = torch.autograd.grad(sched.t_from_log_snr(lam).sum(), lam)
    torch.testing.assert_close(g, 1 / sched.d_log_snr(t0), rtol=1e-9, atol=0)


@pytest.mark.parametrize("sched", SCHEDULES, ids=IDS)
def test_float32_in_float32_out(sched):
    t = torch.tensor([0.2, 0.6], dtype=torch.float32)
    out = sched(t)
    assert all(v.dtype == torch.float32 for v in out)
    ref = sched(t.to(F64))
    for v, r in zip(out, ref):
        torch.testing.assert_close(v.to(F64), r, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("sched", SCHEDULES, ids=IDS)
def test_python_float_time(sched):
    a, s, da, ds = sched(0.5)
    assert a.dtype == F64 and a.shape == ()
    assert float(a) == float(sched(torch.tensor(0.5, dtype=F64))[0])


@pytest.mark.parametrize("sched", SCHEDULES, ids=IDS)
def test_config_round_trip(sched):
    cfg = json.loads(json.dumps(sched.config()))
    back = schedule_from_config(cfg)
    assert type(back) is type(sched)
    assert back == sched and hash(back) == hash(sched)
    t = torch.linspace(0, 1, 17, dtype=F64)
    for v, w in zip(back(t), sched(t)):
        torch.testing.assert_close(v, w, rtol=0, atol=0, equal_nan=True)


def test_equality_and_repr():
    assert VP() == VP(0.1, 20.0)
    assert VP() != VP(0.2, 20.0)
    assert CondOT() != CondOT(0.5)
    assert CondOT() != Cosine()
    assert "beta_max=20.0" in repr(VP())


@pytest.mark.parametrize(
    "make,match",
    [
        (lambda: CondOT(0.0), "sigma0"),
        (lambda: CondOT(-1.0), "sigma0"),
        (lambda: CondOT(math.nan), "sigma0"),
        (lambda: CondOT(math.inf), "sigma0"),
        (lambda: VP(0.0, 20.0), "beta_min"),
        (lambda: VP(20.0, 0.1), "beta_min < beta_max"),
        (lambda: VP(0.1, math.inf), "beta_max"),
        (lambda: EDM(0.0, 80.0), "sigma_min"),
        (lambda: EDM(80.0, 0.002), "sigma_min < sigma_max"),
        (lambda: EDM(0.002, math.nan), "sigma_max"),
        (lambda: DiscreteVP([0.5]), "at least 2"),
        (lambda: DiscreteVP([0.9, 1.0]), r"\(0, 1\)"),
        (lambda: DiscreteVP([0.9, 0.0]), r"\(0, 1\)"),
        (lambda: DiscreteVP([0.5, 0.9]), "strictly decreasing"),
        (lambda: DiscreteVP([0.9, 0.9]), "strictly decreasing"),
        (lambda: DiscreteVP([[0.9, 0.5]]), "1-D"),
        (lambda: DiscreteVP([0.9, math.nan]), r"\(0, 1\)"),
        (lambda: schedule_from_config({"name": "nope"}), "unknown scheduler"),
        (lambda: schedule_from_config({"beta_min": 0.1}), "unknown scheduler"),
        (lambda: schedule_from_config({"name": "vp", "bogus": 1}), "bad config"),
        (lambda: schedule_from_config("vp"), "must be a dict"),
    ],
)
def test_bad_arguments_raise_clear_errors(make, match):
    with pytest.raises(ValueError, match=match):
        make()
