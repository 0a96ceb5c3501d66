"""Solver families (bns, time, scale-time, multistep): each starts exactly at its initial
solver, keeps its restriction while it learns (checked against the classical solvers of
bns.solvers and a numerical scale-time run), distills, and its file loads and samples."""

from __future__ import annotations

import json

import pytest
import torch

import bns
from bns.families import FAMILIES, ScaleTimeFamily, TimeFamily, make_family, usable_inits
from bns.loss import loss_and_grad
from bns.models.fmnist import ddpm_schedule
from bns.models.gmm import gaussian_mixture_model
from bns.pairs import make_pairs
from bns.solvers import initial_solver
from bns.solvers._trace import run
from bns.solvers.runge_kutta import euler_method, midpoint_method
from bns.train import TrainingError, distill
from bns.transforms import ScheduleChange, precondition

# (family, init, sigma0 of the preconditioning or None), at NFE 4
CASES = [
    ("bns", "dpmpp2m", None),
    ("time", "euler", None),
    ("time", "midpoint", 1.0),
    ("time", "ab3", None),
    ("time", "ipndm", 2.0),
    ("scale-time", "euler", None),
    ("scale-time", "midpoint", None),
    ("scale-time", "midpoint", 1.0),
    ("multistep", "ipndm", None),
    ("multistep", "midpoint", None),
]


@pytest.fixture(scope="module")
def vp():
    """An epsilon mixture on the discrete DDPM schedule of fmnist-ddpm: preconditioning changes
    its ODE (so every case differs), and its log-SNR is interpolated, not analytic."""
    mixture = dict(dim=8, components=3, std=0.2, seed=3)
    return gaussian_mixture_model(schedule=ddpm_schedule(), prediction="eps", **mixture)


@pytest.fixture(scope="module")
def data(vp):
    kw = dict(cache=False, progress=False)
    return make_pairs(vp, 48, "train", **kw), make_pairs(vp, 24, "val", **kw)


def _close(s1, s2, tol=1e-12):
    for name in ("times", "a", "b"):
        torch.testing.assert_close(getattr(s1, name), getattr(s2, name), rtol=0, atol=tol)


def _perturbed(family):
    """The family with every parameter moved at random, as training moves it."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in family.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return family


@pytest.mark.parametrize("family,init,pc", CASES)
def test_each_family_starts_at_its_initial_solver(vp, data, family, init, pc):
    solver, hist = distill(
        vp, 4, family=family, init=init, precondition=pc, adam_steps=0, pairs=data, progress=False
    )
    # init names the method; its grid (or preconditioning) is the one measured best
    assert solver.meta["init"].startswith(init)
    start = bns.solvers.solver_from_label(vp, 4, solver.meta["init"])
    _close(make_family(family, start).solver().detach(), start, tol=1e-13)
    assert torch.equal(solver.times, start.times) and torch.equal(solver.b, start.b)
    assert solver.meta["family"] == family and hist["steps_run"] == 0


@pytest.mark.parametrize("init", ["euler", "midpoint", "ab2", "ab3", "ipndm"])
@pytest.mark.parametrize("pc", [None, 1.0])
def test_time_keeps_the_classical_formula_on_its_learned_grid(vp, init, pc):
    """The coefficients of a moved grid are those bns.solvers' tracer gives on that grid."""
    fam = _perturbed(make_family("time", initial_solver(vp, 4, init, pc)))
    got = fam.solver().detach()
    grid = fam.grid().detach()
    tr = None if pc is None else precondition(vp.schedule, pc)
    builders = {
        "euler": lambda g: bns.solvers.euler(g, transform=tr),
        "midpoint": lambda g: bns.solvers.midpoint(g, transform=tr),
        "ab2": lambda g: bns.solvers.adams_bashforth(g, 2, transform=tr),
        "ab3": lambda g: bns.solvers.adams_bashforth(g, 3, transform=tr),
        "ipndm": lambda g: bns.solvers.ipndm(g, transform=tr),
    }
    want = builders[init](grid)
    assert not torch.allclose(got.times, initial_solver(vp, 4, init, pc).times)
    want.times[0], want.times[-1] = vp.t_range
    _close(got, want, tol=1e-12)


@pytest.fixture(scope="module")
def flow():
    """A CondOT velocity mixture on the full [0, 1]: log-SNR -inf and +inf at the ends."""
    return gaussian_mixture_model(dim=4, components=2, std=0.3, seed=1)


@pytest.mark.parametrize("name", bns.solvers.SOLVER_NAMES)
@pytest.mark.parametrize("model", ["vp", "flow"])
def test_time_learns_the_grid_of_every_classical_method(request, model, name):
    """One implementation: at zero steps the family is the classical solver (rounding), on a
    moved grid it is bns.solvers' solver on that grid, and every logit gets a finite gradient,
    the exponential integrators' through the schedule's log-SNR of the learned times."""
    m = request.getfixturevalue(model)
    init = bns.solvers.by_name(name, 8, m)  # heun, rk4: stages share times, still a grid
    fam = make_family("time", init)
    _close(fam.solver().detach(), init, tol=1e-12)
    s = fam.solver()
    w = torch.linspace(1, 2, s.b.numel(), dtype=torch.float64).reshape(s.b.shape)
    (grad,) = torch.autograd.grad((s.b * w).sum() + s.a.sum(), fam.logits)
    assert torch.all(torch.isfinite(grad)) and torch.all(grad != 0), grad
    fam = _perturbed(fam)
    grid = fam.grid().detach()
    want = bns.solvers.build(name, grid, m.schedule)
    want.times[0], want.times[-1] = m.t_range
    _close(fam.solver().detach(), want, tol=1e-12)
    assert not torch.allclose(grid, init.times[:: bns.solvers.METHODS[name].per_step])


def test_a_trained_time_solver_is_the_classical_solver_on_its_grid(vp, data):
    solver, hist = distill(
        vp, 4, family="time", init="midpoint", precondition=None, adam_steps=10, val_every=5,
        pairs=data, progress=False,
    )  # fmt: skip
    assert hist["best_step"] > 0 and solver.meta["init"].startswith("midpoint@")
    _close(solver, bns.solvers.midpoint(solver.times[::2]), tol=1e-14)


class _Tabulated(ScheduleChange):
    """A scale-time transformation known only by its values at given ``r``: what a
    ScaleTimeFamily learns, to be run by the classical method through transforms.py's
    ``ubar_r(x) = (s'/s) x + t' s u_t(x / s)``."""

    def __init__(self, r, t, dt, s, dlog_s):
        self.table = [(float(ri), (t[j], dt[j], s[j], dlog_s[j])) for j, ri in enumerate(r)]

    def __call__(self, r):
        (_, values) = min(self.table, key=lambda e: abs(e[0] - float(r)))
        return tuple(torch.as_tensor(v, dtype=torch.float64) for v in values)

    def t_of_r(self, r):
        return self(r)[0]


@pytest.mark.parametrize("init,pc", [("euler", None), ("midpoint", None), ("midpoint", 1.0)])
def test_scale_time_is_the_transformed_base_method(vp, init, pc):
    """The exported NS solver samples as the base method run numerically on the learned
    scale-time transformation of the ODE."""
    fam = _perturbed(make_family("scale-time", initial_solver(vp, 4, init, pc)))
    v = {k: x.detach() for k, x in fam.values().items()}
    grid = v["r_grid"]
    h = float(grid[1] - grid[0])
    r = grid[:-1] if init == "euler" else torch.stack([grid[:-1], grid[:-1] + h / 2], 1).flatten()
    r = torch.cat([r, grid[-1:]])
    dt = torch.cat([v["dt"], torch.ones(1, dtype=torch.float64)])
    dlog_s = torch.cat([v["dlog_s"], torch.zeros(1, dtype=torch.float64)])
    transform = _Tabulated(r, v["t"], dt, v["s"], dlog_s)

    def velocity(x, t):  # a nonlinear field, in float64
        t = torch.as_tensor(t, dtype=torch.float64)
        return torch.sin(3 * x) * (1 + t) - x * t

    x0 = torch.randn(5, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    method = {"euler": euler_method, "midpoint": midpoint_method}[init]
    want = run(method, velocity, x0, grid, transform=transform)
    got = bns.sample(velocity, x0, fam.solver().detach())
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    assert torch.all(v["dt"] > 0) and torch.all(v["s"] > 0) and v["s"][0] == 1


def test_multistep_keeps_its_structure_while_it_learns(vp, data):
    solver, hist = distill(
        vp,
        4,
        family="multistep",
        init="ipndm",
        adam_steps=10,
        val_every=5,
        pairs=data,
        progress=False,
    )
    assert hist["best_step"] > 0
    assert torch.all(solver.a == 1)
    assert torch.all(torch.triu(solver.b, 1) == 0)
    fam = _perturbed(make_family("multistep", initial_solver(vp, 4, "ipndm")))
    s = fam.solver().detach()
    assert torch.all(s.a == 1)
    torch.testing.assert_close(torch.diff(s.b, dim=0), (fam.c * fam.mask).detach()[1:])
    assert torch.all(s.times[1:] > s.times[:-1])


@pytest.mark.parametrize("family,init,pc", CASES[::2])
def test_every_parameter_gets_a_finite_gradient(vp, data, family, init, pc):
    fam = make_family(family, initial_solver(vp, 4, init, pc))
    loss, grads = loss_and_grad(fam, vp, data[0][:8], 1.0)
    assert grads is not None
    names = [name for name, _ in fam.named_parameters()]
    for name, g in zip(names, grads):
        assert torch.all(torch.isfinite(g)) and g.abs().sum() > 0, name


@pytest.mark.parametrize("family", list(FAMILIES))
def test_each_family_distills_and_its_file_loads_and_samples(vp, data, family, tmp_path):
    """A few steps on the small mixture gain over the initial solver on validation, and the
    solver file reads back and samples through the shared path."""
    solver, hist = distill(
        vp, 4, family=family, adam_steps=30, val_every=10, lr=1e-2, pairs=data, progress=False
    )
    assert hist["best_val_psnr"] > hist["val_psnr"][0] + 0.5, hist["val_psnr"]
    path = solver.save(tmp_path / f"{family}.json")
    loaded = bns.NSSolver.load(path, model=vp)
    assert loaded.meta["family"] == family
    x0 = data[1].x0[:6]
    torch.testing.assert_close(bns.sample(vp, x0, loaded), bns.sample(vp, x0, solver))
    assert json.loads(path.read_text())["meta"]["init"] == solver.meta["init"]


def test_families_keep_the_initial_solvers_they_can_start_from(vp):
    cands = bns.solvers.init_candidates(vp, 4)
    labels = {f: {c.meta["init"] for c in usable_inits(f, cands)} for f in FAMILIES}
    assert labels["bns"] == {c.meta["init"] for c in cands}
    # every grid of the model but diffusers' leading spacing (it starts after t_min), and
    # preconditioned
    grids = [g for g in bns.solvers.grid_names(vp) if g != "leading"]
    assert "leading" in bns.solvers.grid_names(vp) and len(grids) == 5

    def every(methods, pc=True):
        return {f"{n}@{g}" for n in methods for g in grids} | (
            {f"{n}+pc1" for n in methods} if pc else set()
        )

    # every classical method that can start (heun and rk4 repeat times); the exponential
    # integrators are invariant under preconditioning
    time_step = ("euler", "midpoint", "ab2", "ab3", "ipndm")
    exponential = ("ddim", "dpmpp2m", "dpmpp3m", "unipc2", "unipc3")
    assert set(TimeFamily.METHODS) == set(bns.solvers.METHODS)
    assert labels["time"] == every(time_step) | every(exponential, pc=False)
    assert labels["scale-time"] == every(ScaleTimeFamily.METHODS)
    assert labels["multistep"] == every(time_step, pc=False)
    learned = bns.NSSolver(
        *(getattr(initial_solver(vp, 4, "euler"), k) for k in "times a b".split())
    )
    with pytest.raises(ValueError, match="family time starts from euler, midpoint"):
        make_family("time", learned)
    no_schedule = initial_solver(vp, 4, "dpmpp2m")
    del no_schedule.meta["schedule"]
    with pytest.raises(ValueError, match="records no schedule"):
        make_family("time", no_schedule)


def test_a_family_that_cannot_start_from_the_init_fails_before_ground_truth(vp):
    kw = dict(adam_steps=0, cache=False, train_pairs=2, val_pairs=2, progress=False)
    with pytest.raises(TrainingError, match="family scale-time starts from euler, midpoint"):
        distill(vp, 4, family="scale-time", init="ab3", **kw)
    with pytest.raises(TrainingError, match="family multistep starts from a solver with a_i = 1"):
        distill(vp, 4, family="multistep", init="euler", precondition=1.0, **kw)
    with pytest.raises(TrainingError, match="unknown solver family 'nope'"):
        distill(vp, 4, family="nope", **kw)


def test_a_family_resumes_from_its_state(vp):
    fam = _perturbed(make_family("scale-time", initial_solver(vp, 4, "midpoint", 1.0)))
    fresh = make_family("scale-time", initial_solver(vp, 4, "midpoint", 1.0))
    fresh.load_state_dict(fam.state_dict())
    _close(fresh.solver().detach(), fam.solver().detach(), tol=0)


def test_the_command_line_distills_a_family(tmp_path, monkeypatch):
    from bns.cli import main

    monkeypatch.setenv("BNS_CACHE_DIR", str(tmp_path / "cache"))
    out = tmp_path / "time.json"
    args = ["distill", "--model", "gmm", "--nfe", "4", "--family", "time", "--init", "midpoint"]
    args += [
        "--train-pairs",
        "8",
        "--val-pairs",
        "8",
        "--adam-steps",
        "2",
        "--quiet",
        "--out",
        str(out),
    ]
    assert main(args) == 0
    solver = bns.NSSolver.load(out)
    assert solver.meta["family"] == "time" and solver.meta["init"].startswith("midpoint@")


def test_a_builder_and_the_registry_name_a_solver_alike():
    """``meta["solver"]`` is the registry's name whichever way a solver is built, so the time
    family starts from either."""
    from bns.solvers import METHODS, build

    grid = bns.grids.uniform(4)
    built = {
        "euler": bns.solvers.euler(grid),
        "midpoint": bns.solvers.midpoint(grid),
        "ab2": bns.solvers.adams_bashforth(grid, 2),
        "ab3": bns.solvers.adams_bashforth(grid, 3),
        "ipndm": bns.solvers.ipndm(grid),
    }
    for name, solver in built.items():
        assert solver.meta["solver"] == build(name, grid).meta["solver"] == name in METHODS
        make_family("time", solver)  # accepted


def test_the_grid_keeps_every_step_when_a_logit_runs_away():
    """A softmax increment that would round away is raised to MIN_SHARE of the range, the rest
    scaled down: the times stay strictly increasing, ends exact, gradients finite. Ordinary
    logits give the plain softmax's times, bit for bit."""
    from bns.families import MIN_SHARE, _increasing

    ends = torch.tensor([0.0, 0.999], dtype=torch.float64)
    logits = torch.tensor([0.3, -1.2, 0.0, 0.7], dtype=torch.float64)
    plain = torch.cat([ends[:1], torch.cumsum(torch.softmax(logits, 0) * 0.999, 0)[:-1], ends[1:]])
    assert torch.equal(_increasing(logits, ends), plain)
    for away in (-40.0, -1e4):  # under 1e-16 of the range, then exactly 0
        lg = torch.tensor([0.3, away, 0.0, away], dtype=torch.float64, requires_grad=True)
        t = _increasing(lg, ends)
        assert t[0] == 0.0 and t[-1] == 0.999 and torch.all(t[1:] > t[:-1])
        assert torch.all(t[1:] - t[:-1] >= 0.5 * MIN_SHARE * 0.999)
        t.sum().backward()
        assert torch.all(torch.isfinite(lg.grad))


# A user's network (float32, no dtype=) on which Gauss-Newton at NFE 3 pushes two times
# together: the run once ended, after all its steps, with "solver times must be strictly
# increasing" and no solver.
_RUNAWAY = dict(nfe=3, guidance=2.0, train_pairs=32, val_pairs=16, init_pairs=16)


class _TinyCondEps(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb = torch.nn.Embedding(5, 4)
        self.net = torch.nn.Sequential(
            torch.nn.Linear(13, 32), torch.nn.SiLU(), torch.nn.Linear(32, 8)
        )

    def forward(self, x, t, y=None):
        h = torch.cat([x, t[:, None].to(x.dtype), self.emb(y)], dim=1)
        return 0.1 * self.net(h)


def _tiny_cond_eps() -> bns.Model:
    return bns.Model(
        _TinyCondEps(), "eps", "vp", (8,), t_range=(0.0, 1 - 1e-3), num_classes=4, name="tiny"
    )


def test_a_step_that_pushes_two_times_together_still_ends_with_a_solver(tmp_path, monkeypatch):
    model = _tiny_cond_eps()
    solver, hist = distill(model, **_RUNAWAY, cache=tmp_path, progress=False)
    dt = solver.times[1:] - solver.times[:-1]
    assert torch.all(dt > 0) and float(dt.min()) < 1e-6  # it went there, one step kept
    assert hist["best_val_psnr"] > hist["val_psnr"][0] + 10  # and gained by it
    # Without the floor, a solver whose times coincide is an overshoot: back to the best.
    monkeypatch.setattr(bns.families, "MIN_SHARE", 0.0)
    solver, hist = distill(model, **_RUNAWAY, cache=tmp_path, progress=False)
    assert torch.all(solver.times[1:] > solver.times[:-1])
    assert any(v != v for v in hist["val_psnr"]) and hist["reverts"] > 0
