"""Every classical solver, exported as an NS solver, against an independent implementation.

The references below are written from the methods' textbook / paper formulas, step by step on
tensors, and share no code with ``bns.solvers`` (not the ``*_method`` functions, not the tracer,
not ``ab_weights``): Runge-Kutta from Butcher tableaus, Adams-Bashforth weights from moment
equations, exponential integrators from the network's raw output in diffusers' notation.
Then convergence orders on ODEs with closed-form solutions, NFE counts, the registry and bad
inputs.
"""

from __future__ import annotations

import math

import pytest
import torch

import bns
from bns.grids import GridError
from bns.models.gmm import gaussian_mixture_model
from bns.schedules import VP, CondOT, Cosine
from bns.solvers import SOLVER_NAMES, by_name
from bns.transforms import ScheduleChange

S = bns.solvers
F64 = torch.float64


def _rel(a, b) -> float:
    return float((a - b).abs().max() / b.abs().max())


# -- independent references -------------------------------------------------------------------

TABLEAUS = {  # (A, b, c)
    "euler": ([[0.0]], [1.0], [0.0]),
    "midpoint": ([[0, 0], [0.5, 0]], [0, 1], [0, 0.5]),
    "heun": ([[0, 0], [1, 0]], [0.5, 0.5], [0, 1]),
    "rk4": (
        [[0, 0, 0, 0], [0.5, 0, 0, 0], [0, 0.5, 0, 0], [0, 0, 1, 0]],
        [1 / 6, 1 / 3, 1 / 3, 1 / 6],
        [0, 0.5, 0.5, 1],
    ),
    "rk4_38": (
        [[0, 0, 0, 0], [1 / 3, 0, 0, 0], [-1 / 3, 1, 0, 0], [1, -1, 1, 0]],
        [1 / 8, 3 / 8, 3 / 8, 1 / 8],
        [0, 1 / 3, 2 / 3, 1],
    ),
}


def ref_rk(name, vel, x, grid):
    A, b, c = TABLEAUS[name]
    for i in range(len(grid) - 1):
        t, h = float(grid[i]), float(grid[i + 1] - grid[i])
        ks = []
        for s in range(len(b)):
            xs = x.clone()
            for j in range(s):
                if A[s][j]:
                    xs = xs + h * A[s][j] * ks[j]
            ks.append(vel(xs, t + c[s] * h))
        x = x + h * sum(bj * kj for bj, kj in zip(b, ks))
    return x


def ref_ab(order, vel, x, grid):
    """Variable-step AB: weights w with sum_k w_k tau_k^j = h^(j+1)/(j+1), tau_k = t_{i-k} - t_i."""
    us, ts = [], []
    for i in range(len(grid) - 1):
        t, h = float(grid[i]), float(grid[i + 1] - grid[i])
        us.append(vel(x, t))
        ts.append(t)
        q = min(order, len(us))
        tau = torch.tensor([ts[-1 - k] - t for k in range(q)], dtype=F64)
        V = torch.stack([tau**j for j in range(q)])
        mom = torch.tensor([h ** (j + 1) / (j + 1) for j in range(q)], dtype=F64)
        w = torch.linalg.solve(V, mom)
        x = x + sum(float(w[k]) * us[-1 - k] for k in range(q))
    return x


def ref_ipndm(vel, x, grid):
    coef = {1: [1], 2: [3, -1], 3: [23, -16, 5], 4: [55, -59, 37, -9]}
    den = {1: 1, 2: 2, 3: 12, 4: 24}
    us = []
    for i in range(len(grid) - 1):
        t, h = float(grid[i]), float(grid[i + 1] - grid[i])
        us.append(vel(x, t))
        q = min(4, len(us))
        x = x + h / den[q] * sum(c * us[-1 - k] for k, c in enumerate(coef[q]))
    return x


def data_prediction(model, x, t: float):
    """``E[x_1 | x_t]`` from the network's raw output (not through ``model.velocity``)."""
    tt = torch.full((x.shape[0],), t, dtype=F64)
    a, s, da, ds = (float(v) for v in model.schedule(torch.tensor(t, dtype=F64)))
    f = model.net(x, tt)
    if model.prediction == "x1":
        return f
    if model.prediction == "eps":
        return (x - s * f) / a
    if model.prediction == "v":
        return a * x - s * f
    # velocity: u = da x1 + ds eps and x = a x1 + s eps  =>  x1 = (s u - ds x) / (da s - ds a)
    return (s * f - ds * x) / (da * s - ds * a)


def _coeffs(schedule, grid):
    a, s, _, _ = schedule(grid)
    lam = torch.log(a) - torch.log(s)
    return a.tolist(), s.tolist(), lam.tolist()


def ref_ddim(model, x, grid):
    """DDIM in its eps form: x_t = alpha_t x1 + sigma_t eps."""
    a, s, _ = _coeffs(model.schedule, grid)
    for i in range(len(grid) - 1):
        x1 = data_prediction(model, x, float(grid[i]))
        eps = (x - a[i] * x1) / s[i]
        x = a[i + 1] * x1 + s[i + 1] * eps
    return x


def ref_dpmpp(model, x, grid, order, lower_order_final=True):
    """DPM-Solver++ multistep in diffusers' notation; infinite log-SNR ends are left to IEEE
    arithmetic (1/inf = 0, e^-inf = 0), an independent check of the solver's limits."""
    a, s, lam = _coeffs(model.schedule, grid)
    n = len(grid) - 1
    ms = []
    for i in range(n):
        ms.append(data_prediction(model, x, float(grid[i])))
        final = i == n - 1 and (
            (lower_order_final and n < 15) or s[n] == 0.0
        )  # diffusers' lower_order_final / final_sigmas_type="zero"
        second = i == n - 2 and lower_order_final and n < 15
        if order == 1 or i < 1 or final:
            k = 1
        elif order == 2 or i < 2 or second:
            k = 2
        else:
            k = 3
        h = lam[i + 1] - lam[i]
        x_new = (s[i + 1] / s[i]) * x - (a[i + 1] * math.expm1(-h)) * ms[-1]
        if k >= 2:
            r0 = (lam[i] - lam[i - 1]) / h
        if k == 2:
            D1 = (1 / r0) * (ms[-1] - ms[-2])
            x_new = x_new - 0.5 * (a[i + 1] * math.expm1(-h)) * D1
        if k == 3:
            r1 = (lam[i - 1] - lam[i - 2]) / h
            D1_0 = (1 / r0) * (ms[-1] - ms[-2])
            D1_1 = (1 / r1) * (ms[-2] - ms[-3])
            D1 = D1_0 + (r0 / (r0 + r1)) * (D1_0 - D1_1)
            D2 = (1 / (r0 + r1)) * (D1_0 - D1_1)
            x_new = (
                x_new
                + (a[i + 1] * (math.expm1(-h) / h + 1)) * D1
                - (a[i + 1] * ((math.exp(-h) - 1 + h) / h**2 - 0.5)) * D2
            )
        x = x_new
    return x


def _unipc_step(x, ms, lam, a, s, i, p, predict, m_new=None):
    """UniP-p (``m_new`` None) or UniC-p for the step nodes i -> i+1 (UniPC paper, B(h) = e^h - 1
    in data prediction: hh = -h); ``lam`` may hold +-1e30 for the infinite ends."""
    h = lam[i + 1] - lam[i]
    hh = -h
    rks, D1s = [], []
    for k in range(1, p):
        rk = (lam[i - k] - lam[i]) / h
        rks.append(rk)
        D1s.append((ms[i - k] - ms[i]) / rk)
    rks.append(1.0)
    h_phi_1 = math.expm1(hh)
    h_phi_k = h_phi_1 / hh - 1
    fact = 1
    B_h = math.expm1(hh)
    R, b = [], []
    for j in range(1, p + 1):
        R.append([r ** (j - 1) for r in rks])
        b.append(h_phi_k * fact / B_h)
        fact *= j + 1
        h_phi_k = h_phi_k / hh - 1 / fact
    R, b = torch.tensor(R, dtype=F64), torch.tensor(b, dtype=F64)
    x_t = (s[i + 1] / s[i]) * x - a[i + 1] * h_phi_1 * ms[i]
    if predict:
        if p == 1:
            return x_t
        rhos = [0.5] if p == 2 else torch.linalg.solve(R[:-1, :-1], b[:-1]).tolist()
        return x_t - a[i + 1] * B_h * sum(r * d for r, d in zip(rhos, D1s))
    rhos = [0.5] if p == 1 else torch.linalg.solve(R, b).tolist()
    corr = sum(r * d for r, d in zip(rhos[:-1], D1s)) if D1s else 0.0
    return x_t - a[i + 1] * B_h * (corr + rhos[-1] * (m_new - ms[i]))


def ref_unipc(model, x, grid, order, lower_order_final=True):
    a, s, lam = _coeffs(model.schedule, grid)
    lam = [max(min(v, 1e30), -1e30) for v in lam]  # the infinite ends as a far limit
    n = len(grid) - 1
    ms, orders, last = [], [], None
    for i in range(n):
        m = data_prediction(model, x, float(grid[i]))
        if i > 0:
            x = _unipc_step(last, ms, lam, a, s, i - 1, orders[-1], False, m)
        ms.append(m)
        p = min(order, n - i) if lower_order_final else order
        p = min(p, i + 1)
        if i == n - 1 and s[n] == 0.0:
            p = 1
        orders.append(p)
        last = x
        x = _unipc_step(x, ms, lam, a, s, i, p, True)
    return x


# -- NS form == reference -----------------------------------------------------------------------

CASES = {
    # name: (schedule, prediction, t_range)
    "condot-velocity": (CondOT(), "velocity", (0.0, 1.0)),  # log-SNR infinite at both ends
    "condot-x1": (CondOT(), "x1", (0.0, 0.99)),
    "vp-eps": (VP(), "eps", (0.0, 1 - 1e-3)),
    "cosine-v": (Cosine(), "v", (0.0, 1.0)),
    "cosine-eps": (Cosine(), "eps", (1e-3, 1.0)),
}
STEPS = 7  # < 15, so diffusers' lower_order_final changes the last steps


def _grid(kind, model):
    tr = model.t_range
    if kind == "uniform":
        return bns.grids.uniform(STEPS, tr)
    if kind == "logsnr":
        return bns.grids.logsnr(STEPS, model.schedule, tr)
    if kind == "edm":
        return bns.grids.edm(STEPS, model.schedule, tr)
    g = torch.Generator().manual_seed(11)
    inner = torch.rand(STEPS - 1, generator=g, dtype=F64).sort().values
    return torch.cat(
        [torch.tensor([tr[0]]), tr[0] + (tr[1] - tr[0]) * inner, torch.tensor([tr[1]])]
    )


def _grids_for(case):
    sch, _, tr = CASES[case]
    finite = bool(torch.all(torch.isfinite(sch.log_snr(torch.tensor(tr, dtype=F64)))))
    return ["uniform", "random"] + (["logsnr", "edm"] if finite else [])


PARAMS = [(c, g) for c in CASES for g in _grids_for(c)]


@pytest.fixture(scope="module")
def models():
    return {
        c: gaussian_mixture_model(
            dim=32, components=6, std=0.1, schedule=s, prediction=p, t_range=tr
        )
        for c, (s, p, tr) in CASES.items()
    }


def _solvers(schedule):
    """(label, NS solver builder, reference(model, vel, x0, grid))."""
    out = [
        (n, getattr(S, n), lambda m, v, x, g, n=n: ref_rk(n, v, x, g))
        for n in ("euler", "midpoint", "heun", "rk4")
    ]
    out.append(("rk4_38", lambda g: S.rk4(g, "3/8"), lambda m, v, x, g: ref_rk("rk4_38", v, x, g)))
    for k in (1, 2, 3, 4):
        out.append(
            (
                f"ab{k}",
                lambda g, k=k: S.adams_bashforth(g, k),
                lambda m, v, x, g, k=k: ref_ab(k, v, x, g),
            )
        )
    out.append(("ipndm", S.ipndm, lambda m, v, x, g: ref_ipndm(v, x, g)))
    out.append(("ddim", lambda g: S.ddim(g, schedule), lambda m, v, x, g: ref_ddim(m, x, g)))
    for k in (1, 2, 3):
        for lof in (True, False):
            out.append(
                (
                    f"dpmpp{k}-lof{lof}",
                    lambda g, k=k, lof=lof: S.dpm_solver_pp(g, schedule, k, lower_order_final=lof),
                    lambda m, v, x, g, k=k, lof=lof: ref_dpmpp(m, x, g, k, lof),
                )
            )
            out.append(
                (
                    f"unipc{k}-lof{lof}",
                    lambda g, k=k, lof=lof: S.unipc(g, schedule, k, lower_order_final=lof),
                    lambda m, v, x, g, k=k, lof=lof: ref_unipc(m, x, g, k, lof),
                )
            )
    return out


@pytest.mark.parametrize("case,grid_kind", PARAMS)
def test_ns_form_equals_independent_reference(models, case, grid_kind):
    model = models[case]
    x0 = torch.randn(4, 32, generator=torch.Generator().manual_seed(1), dtype=F64)
    grid = _grid(grid_kind, model)

    def vel(x, t):
        return model.velocity(x, t)

    errors = {}
    for label, build, ref in _solvers(model.schedule):
        solver = build(grid)
        ours = bns.sample(model, x0, solver)
        theirs = ref(model, vel, x0, grid)
        assert torch.all(torch.isfinite(ours)), label
        errors[label] = _rel(ours, theirs)
    bad = {k: f"{v:.2e}" for k, v in errors.items() if not v < 1e-10}
    assert not bad, f"{case}/{grid_kind}: {bad}"


def test_references_are_sensitive():
    """The 1e-10 tolerance catches a wrong coefficient: solvers differ from each other by far
    more, e.g. diffusers' midpoint vs a 'heun'-type DPM-Solver++(2M)."""
    model = gaussian_mixture_model(
        dim=32, components=6, std=0.1, schedule=VP(), prediction="eps", t_range=(0.0, 1 - 1e-3)
    )
    x0 = torch.randn(4, 32, generator=torch.Generator().manual_seed(1), dtype=F64)
    grid = bns.grids.logsnr(STEPS, model.schedule, model.t_range)
    outs = {
        "dpm2": bns.sample(model, x0, S.dpm_solver_pp(grid, model.schedule, 2)),
        "dpm3": bns.sample(model, x0, S.dpm_solver_pp(grid, model.schedule, 3)),
        "uni2": bns.sample(model, x0, S.unipc(grid, model.schedule, 2)),
        "ddim": bns.sample(model, x0, S.ddim(grid, model.schedule)),
    }
    names = list(outs)
    for i, p in enumerate(names):
        for q in names[i + 1 :]:
            assert _rel(outs[p], outs[q]) > 1e-6, (p, q)


# -- convergence orders ------------------------------------------------------------------------

TW, CG = 0.25, 5.0  # the field is zero on [0, TW]: multistep warm-up steps are exact there


def _flat_riccati():
    """``dx/dt = g(t) x^2`` with ``g = CG (t - TW)_+^6``: ``x(1) = 1 / (1/x_0 - G(1))``."""

    def net(x, t):
        return (CG * torch.clamp(t - TW, min=0) ** 6)[:, None] * x * x

    model = bns.Model(net, "velocity", CondOT(), (4,), t_range=(0.0, 1.0))
    x0 = 0.5 + 0.5 * torch.rand(3, 4, generator=torch.Generator().manual_seed(0), dtype=F64)
    exact = 1 / (1 / x0 - CG * (1 - TW) ** 7 / 7)
    return model, x0, exact


def _slope(model, x0, exact, build, grids):
    errs = [_rel(bns.sample(model, x0, build(g)), exact) for g in grids]
    n = [len(g) - 1 for g in grids]
    return math.log(errs[-2] / errs[-1]) / math.log(n[-1] / n[-2]), errs


@pytest.mark.parametrize(
    "name,build,order,steps",
    [
        ("euler", S.euler, 1, 128),
        ("midpoint", S.midpoint, 2, 64),
        ("heun", S.heun, 2, 64),
        ("rk4", S.rk4, 4, 32),
        ("rk4_38", lambda g: S.rk4(g, "3/8"), 4, 32),
        ("ab2", lambda g: S.adams_bashforth(g, 2), 2, 128),
        ("ab3", lambda g: S.adams_bashforth(g, 3), 3, 128),
        ("ab4", lambda g: S.adams_bashforth(g, 4), 4, 128),
        ("ipndm", S.ipndm, 4, 128),  # AB4 on a uniform grid
    ],
)
def test_time_stepping_convergence_order(name, build, order, steps):
    model, x0, exact = _flat_riccati()
    grids = [bns.grids.uniform(n) for n in (steps, 2 * steps)]
    slope, errs = _slope(model, x0, exact, build, grids)
    assert abs(slope - order) < 0.3, f"{name}: slope {slope:.2f}, errors {errs}"


LW = -1.0  # data prediction constant below this log-SNR: warm-up steps are exact there


def _lambda_model():
    """An x1-prediction net whose output depends on the log-SNR only,
    ``m(lambda) = c + v (lambda - LW)_+^6``; then ``x/sigma`` is ``x_0/sigma_0 + int e^lambda m``."""
    sch, tr = CondOT(), (0.05, 0.95)
    g = torch.Generator().manual_seed(1)
    c = torch.randn(4, dtype=F64, generator=g)
    v = 3e-4 * torch.randn(4, dtype=F64, generator=g)

    def net(x, t):
        d = torch.clamp(sch.log_snr(t) - LW, min=0)
        return (c + v * (d**6)[:, None]).expand_as(x)

    def primitive(lam):  # an antiderivative of e^lam m(lam)
        out = math.exp(lam) * c
        if lam > LW:
            d = lam - LW
            poly = sum((-1) ** j * math.perm(6, j) * d ** (6 - j) for j in range(7))
            out = out + (math.exp(lam) * poly - math.exp(LW) * math.factorial(6)) * v
        return out

    model = bns.Model(net, "x1", sch, (4,), t_range=tr)
    x0 = torch.randn(3, 4, generator=torch.Generator().manual_seed(2), dtype=F64)
    l0, l1 = (float(v) for v in sch.log_snr(torch.tensor(tr, dtype=F64)))
    exact = (1 - tr[1]) * (x0 / (1 - tr[0]) + (primitive(l1) - primitive(l0)))
    return model, x0, exact


@pytest.mark.parametrize(
    "name,order,expected",
    [
        ("ddim", 1, 1),
        ("dpmpp", 1, 1),
        ("dpmpp", 2, 2),
        # diffusers' DPM-Solver++(3M) weights its second divided difference D2 by alpha h phi_3,
        # half of what a third-order Taylor match needs (D2 ~ h^2 m''/2): it converges at
        # order 2, and so does our exact reproduction of it.
        ("dpmpp", 3, 2),
        ("unipc", 1, 2),  # UniC raises the order by one
        ("unipc", 2, 3),
        ("unipc", 3, 4),
    ],
)
def test_exponential_convergence_order(name, order, expected):
    model, x0, exact = _lambda_model()
    sch = model.schedule
    if name == "ddim":
        build = lambda g: S.ddim(g, sch)  # noqa: E731
    elif name == "dpmpp":
        build = lambda g: S.dpm_solver_pp(g, sch, order, lower_order_final=False)  # noqa: E731
    else:
        build = lambda g: S.unipc(g, sch, order, lower_order_final=False)  # noqa: E731
    grids = [bns.grids.logsnr(n, sch, model.t_range) for n in (32, 64, 128)]
    slope, errs = _slope(model, x0, exact, build, grids)
    assert abs(slope - expected) < 0.3, f"{name}{order}: slope {slope:.2f}, errors {errs}"


def test_exponential_solvers_converge_on_full_condot_range():
    """On [0, 1] of a CondOT flow model (log-SNR -inf to +inf) the limits are right: the error
    against an accurate ground truth falls at least at first order as the steps double."""
    model = gaussian_mixture_model(dim=16, components=4, std=0.2, seed=3)
    x0 = torch.randn(16, 16, generator=torch.Generator().manual_seed(0), dtype=F64)
    gt = bns.ground_truth(model, x0, rtol=1e-10, atol=1e-10)
    for build in (
        lambda g: S.ddim(g, model.schedule),
        lambda g: S.dpm_solver_pp(g, model.schedule, 2),
        lambda g: S.dpm_solver_pp(g, model.schedule, 3),
        lambda g: S.unipc(g, model.schedule, 2),
        lambda g: S.unipc(g, model.schedule, 3),
    ):
        errs = [_rel(bns.sample(model, x0, build(bns.grids.uniform(n))), gt) for n in (16, 32, 64)]
        assert errs[0] > 1.8 * errs[1] > 3.2 * errs[2], errs


def test_alpha_zero_start_is_the_limit():
    """A grid starting at t = eps -> 0 gives coefficients that approach those of t = 0 (the
    history weights fall like 1/|log eps|)."""
    sch = CondOT()
    base = torch.tensor([0.0, 0.2, 0.4, 0.6, 0.8, 0.9], dtype=F64)
    for build in (
        lambda g: S.dpm_solver_pp(g, sch, 3, lower_order_final=False),
        lambda g: S.unipc(g, sch, 3, lower_order_final=False),
    ):
        at0 = build(base)
        diffs = []
        for eps in (1e-10, 1e-40, 1e-160):
            g = base.clone()
            g[0] = eps
            s = build(g)
            diffs.append(max(float((s.a - at0.a).abs().max()), float((s.b - at0.b).abs().max())))
        assert diffs[0] > 3.5 * diffs[1] > 3.5**2 * diffs[2] > 0, diffs


# -- NFE, registry, errors -----------------------------------------------------------------------


def test_nfe_counts():
    g = bns.grids.uniform(5)
    sch = CondOT()
    assert S.euler(g).nfe == 5
    assert S.midpoint(g).nfe == S.heun(g).nfe == 10
    assert S.rk4(g).nfe == S.rk4(g, "3/8").nfe == 20
    assert S.adams_bashforth(g, 3).nfe == S.ipndm(g).nfe == 5
    assert S.ddim(g, sch).nfe == S.dpm_solver_pp(g, sch, 3).nfe == S.unipc(g, sch, 3).nfe == 5
    # times: every evaluation inside the grid, non-decreasing, ending at the grid's end
    for s in (S.rk4(g), S.unipc(g, sch, 2)):
        assert float(s.times[0]) == 0.0 and float(s.times[-1]) == 1.0
        assert torch.all(s.times[1:] >= s.times[:-1])


def test_rk4_variants_differ_and_bad_variant():
    g = bns.grids.uniform(3)
    assert not torch.allclose(S.rk4(g).b, S.rk4(g, "3/8").b)
    assert torch.allclose(
        S.rk4(g).times[:5], torch.tensor([0, 1 / 6, 1 / 6, 1 / 3, 1 / 3], dtype=F64)
    )
    with pytest.raises(ValueError, match="variant"):
        S.rk4(g, "ralston")


def test_ddim_is_first_order_dpm_solver_pp():
    g = bns.grids.logsnr(6, VP(), (0.0, 0.999))
    a, b = S.ddim(g, VP()), S.dpm_solver_pp(g, VP(), 1)
    assert torch.allclose(a.a, b.a, rtol=0, atol=1e-14) and torch.allclose(
        a.b, b.b, rtol=0, atol=1e-14
    )


@pytest.mark.parametrize("name", SOLVER_NAMES)
def test_by_name_exact_nfe(name):
    model = gaussian_mixture_model(
        dim=8, components=3, schedule=VP(), prediction="eps", t_range=(0.0, 0.999)
    )
    for grid in ("best", "uniform", "logsnr", "edm"):
        s = by_name(name, 8, model, grid)
        assert s.nfe == 8 and s.meta["solver"] == name
        s.validate(t_range=model.t_range)


def test_by_name_best_grids():
    flow = gaussian_mixture_model(dim=8, components=3)  # CondOT on [0, 1]
    vp = gaussian_mixture_model(
        dim=8, components=3, schedule=VP(), prediction="eps", t_range=(0.0, 0.999)
    )
    shrunk = gaussian_mixture_model(dim=8, components=3, t_range=(1e-3, 1 - 1e-3))
    assert by_name("dpmpp2m", 8, flow).meta["grid"] == "uniform"  # log-SNR infinite at the ends
    assert by_name("midpoint", 8, flow).meta["grid"] == "uniform"
    assert by_name("unipc2", 8, vp).meta["grid"] == "logsnr"
    assert by_name("midpoint", 8, vp).meta["grid"] == "logsnr"
    assert by_name("ab2", 8, shrunk).meta["grid"] == "uniform"
    assert by_name("ddim", 8, shrunk).meta["grid"] == "logsnr"
    # the solver is the named one, on that grid
    ref = S.dpm_solver_pp(bns.grids.logsnr(8, VP(), (0.0, 0.999)), VP(), 2)
    assert torch.equal(by_name("dpmpp2m", 8, vp).b, ref.b)
    ref = S.midpoint(bns.grids.uniform(4))
    assert torch.equal(by_name("midpoint", 8, flow).b, ref.b)


def test_by_name_errors():
    model = gaussian_mixture_model(dim=8, components=3)
    with pytest.raises(ValueError, match="unknown solver 'dpm'"):
        by_name("dpm", 8, model)
    with pytest.raises(ValueError, match="unknown grid"):
        by_name("euler", 8, model, grid="karras")
    with pytest.raises(ValueError, match="multiple of 2"):
        by_name("midpoint", 7, model)
    with pytest.raises(ValueError, match="multiple of 4"):
        by_name("rk4", 10, model)
    for nfe in (0, -4, 2.5):
        with pytest.raises(ValueError, match="positive integer"):
            by_name("euler", nfe, model)
    with pytest.raises(GridError, match="infinite"):
        by_name("dpmpp2m", 8, model, grid="logsnr")  # CondOT on [0, 1]


BUILDERS = [
    S.euler,
    S.midpoint,
    S.heun,
    S.rk4,
    lambda g: S.adams_bashforth(g, 3),
    S.ipndm,
    lambda g: S.ddim(g, CondOT()),
    lambda g: S.dpm_solver_pp(g, CondOT(), 2),
    lambda g: S.unipc(g, CondOT(), 2),
]


@pytest.mark.parametrize("build", BUILDERS)
@pytest.mark.parametrize(
    "grid,match",
    [
        ([0.0, 0.5, 0.4, 1.0], "strictly increasing"),
        ([0.0, 0.5, 0.5, 1.0], "strictly increasing"),
        ([0.0, float("nan"), 1.0], "non-finite"),
        ([0.0, 0.5, float("inf")], "non-finite"),
        ([0.5], "at least 2"),
        ([[0.0, 1.0]], "1-D"),
    ],
)
def test_bad_grids(build, grid, match):
    with pytest.raises(GridError, match=match):
        build(torch.tensor(grid, dtype=F64))


@pytest.mark.parametrize("build", BUILDERS[6:])
def test_exponential_grid_outside_schedule(build):
    with pytest.raises(GridError, match="leaves \\[0, 1\\]"):
        build(torch.tensor([0.0, 0.5, 1.2], dtype=F64))
    with pytest.raises(GridError, match="leaves \\[0, 1\\]"):
        build(torch.tensor([-0.1, 0.5, 1.0], dtype=F64))


def test_exponential_argument_errors():
    g = bns.grids.uniform(4)
    with pytest.raises(ValueError, match="order must be 1, 2 or 3"):
        S.dpm_solver_pp(g, CondOT(), 4)
    with pytest.raises(ValueError, match="order must be 1, 2 or 3"):
        S.unipc(g, CondOT(), 0)
    with pytest.raises(ValueError, match="needs the model's schedule"):
        S.ddim(g)
    change = ScheduleChange(VP(), CondOT())
    with pytest.raises(ValueError, match="target"):
        S.dpm_solver_pp(g, VP(), 2, transform=change)
