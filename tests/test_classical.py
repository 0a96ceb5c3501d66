"""The measured best classical solver: every grid a user could pick, the grids themselves
against diffusers and ComfyUI, evaluations shared between candidates, and the choice made."""

from __future__ import annotations

import json
import math

import pytest
import torch

import bns
from bns import grids
from bns.classical import (
    best_classical,
    candidates,
    psnr_matrix,
    rank,
    rank_work,
    shared_evaluations,
)
from bns.evaluate import evaluate_psnr
from bns.models.gmm import gaussian_mixture_model
from bns.pairs import make_pairs
from bns.schedules import EDM, VP, DiscreteVP
from bns.solvers import by_name, grid_names, init_candidates

F64 = torch.float64


def _ddpm_linear() -> DiscreteVP:
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=F64)
    return DiscreteVP(torch.cumprod(1 - betas, 0))


def _sd() -> DiscreteVP:  # Stable Diffusion's scaled-linear schedule
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=F64) ** 2
    return DiscreteVP(torch.cumprod(1 - betas, 0))


# A VP epsilon model, where log-SNR steps beat uniform ones for ab3 by 7 dB at NFE 6, and a
# flow model on a shrunk range, where uniform beats log-SNR for DPM-Solver++ by 9 dB: the rule
# of by_name(grid="default") takes log-SNR for every exponential solver there.
def _vp():
    return gaussian_mixture_model(
        dim=8, components=3, std=0.2, schedule=VP(), prediction="eps", t_range=(0, 1 - 1e-3)
    )


def _flow_shrunk():
    return gaussian_mixture_model(dim=8, components=3, std=0.1, t_range=(1e-3, 1 - 1e-3))


def _pairs(model, n=32, split="val"):
    return make_pairs(model, n, split, cache=False, progress=False)


# -- the grids -------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", grids.SPACINGS)
@pytest.mark.parametrize("n_train", [1000, 50])
def test_timestep_spacings_are_diffusers_own(kind, n_train):
    diffusers = pytest.importorskip("diffusers")
    betas = torch.linspace(1e-4, 0.02, n_train, dtype=F64)
    schedule = DiscreteVP(torch.cumprod(1 - betas, 0))
    for steps in range(1, min(n_train - 1, 40)):
        ref = diffusers.DPMSolverMultistepScheduler(
            num_train_timesteps=n_train, timestep_spacing=kind
        )
        ref.set_timesteps(steps)
        ks = ref.timesteps.to(F64)
        try:
            g = grids.spacing(steps, schedule, (0.0, 1.0), kind)
        except grids.GridError:  # only where diffusers' timesteps repeat, miss or reach 0
            assert len(set(ks.tolist())) < steps or len(ks) != steps or ks.min() == 0
            continue
        # the timesteps diffusers evaluates, then the end of the range
        assert torch.equal(g[:-1], schedule.flow_time(ks).clamp(min=0.0))
        assert g[-1] == 1.0 and len(g) == steps + 1


def test_spacings_need_discrete_timesteps():
    with pytest.raises(grids.GridError, match="discrete timesteps"):
        grids.spacing(6, VP(), (0.0, 0.999), "trailing")
    with pytest.raises(grids.GridError, match="unknown timestep spacing"):
        grids.spacing(6, _ddpm_linear(), (0.0, 1.0), "middle")


@pytest.mark.parametrize(
    "kind,schedule", [("sd1", _sd()), ("sdxl", _sd()), ("svd", EDM(0.002, 700))]
)
@pytest.mark.parametrize("steps", [4, 6, 10, 16])
def test_ays_levels_are_interpolated_as_comfyui_does(kind, schedule, steps):
    np = pytest.importorskip("numpy")
    levels = np.array(grids.AYS_NOISE_LEVELS[kind])
    # ComfyUI's loglinear_interp, written out: log levels linear in [0, 1], reversed.
    xs, ys = np.linspace(0, 1, len(levels)), np.log(levels[::-1])
    want = np.exp(np.interp(np.linspace(0, 1, steps + 1), xs, ys))[::-1]
    g = grids.ays(steps, schedule, (0.0, 1.0), kind)
    s = torch.exp(-schedule.log_snr(g))  # noise level sigma / alpha at each time
    assert torch.allclose(s[:-1], torch.from_numpy(want[:-1].copy()), rtol=1e-9)
    assert (g[0], g[-1]) == (0.0, 1.0)


def test_grids_of_each_kind_of_model():
    flow = gaussian_mixture_model(dim=4, components=2)
    assert grid_names(flow) == ("uniform",)  # no log-SNR grid reaches t = 0 or 1
    assert grid_names(_vp()) == ("uniform", "logsnr", "edm")
    ddpm = bns.Model(lambda x, t: x, "eps", _ddpm_linear(), (4,))
    assert grid_names(ddpm) == ("uniform", "logsnr", "edm", "linspace", "leading", "trailing")
    sd = bns.Model(lambda x, t: x, "eps", _sd(), (4,))
    assert {"ays-sd1", "ays-sdxl", "trailing"} <= set(grid_names(sd))
    assert "ays-svd" not in grid_names(sd)
    svd = bns.Model(lambda x, t: x, "eps", EDM(0.002, 700), (4,))
    assert "ays-svd" in grid_names(svd) and "ays-sd1" not in grid_names(svd)
    with pytest.raises(grids.GridError, match="AYS"):
        grids.ays(6, VP(), (0.0, 0.999), "sd1")


def test_a_leading_grid_starts_late_and_cannot_start_bns():
    ddpm = bns.Model(lambda x, t: -x, "eps", _ddpm_linear(), (4,))
    s = by_name("ab3", 6, ddpm, "leading")
    assert s.meta["grid"] == "leading" and float(s.times[0]) > 0.1  # diffusers' start
    labels = [c.meta["init"] for c in init_candidates(ddpm, 6, "ab3", None)]
    assert "ab3@trailing" in labels and "ab3@leading" not in labels
    with pytest.raises(ValueError, match="starts on the noise"):
        bns.solvers.initial_solver(ddpm, 6, "ab3", grid="leading")


# -- measuring many solvers at once ----------------------------------------------------------


def test_shared_evaluations_give_each_solver_its_own_psnr():
    model = _vp()
    pairs = _pairs(model, 12)
    cands = candidates(model, 6)
    f0 = model.forwards
    m = psnr_matrix(model, cands, pairs, batch_size=5)
    spent = model.forwards - f0
    shared = shared_evaluations(cands)
    assert spent == shared * len(pairs)
    # every grid starts at t_min; Euler, AB2, AB3 and iPNDM on one grid share two steps
    assert shared <= sum(c.nfe for c in cands) - 3 * (len(cands) // 12)
    for c, row in zip(cands, m):
        assert torch.allclose(row, evaluate_psnr(model, c, pairs), atol=1e-3)


def test_solvers_of_different_nfe_share_a_prefix():
    model = _vp()
    pairs = _pairs(model, 6)
    g = grids.uniform(8, model.t_range)
    e8, e4 = bns.solvers.euler(g), bns.solvers.euler(g[::2].contiguous())
    m = psnr_matrix(model, [e8, e4, e8], pairs)
    assert shared_evaluations([e8, e4, e8]) == 8 + 3  # the first evaluation in common
    assert torch.equal(m[0], m[2])
    assert torch.allclose(m[1], evaluate_psnr(model, e4, pairs), atol=1e-3)


def test_rank_halves_then_measures_the_leaders_on_all_pairs():
    model = _vp()
    pairs = _pairs(model, 24)
    cands = candidates(model, 6)
    scores = rank(model, cands, pairs, first=8, keep=3)
    head = [float(evaluate_psnr(model, c, pairs[:8]).mean()) for c in cands]
    full = [float(evaluate_psnr(model, c, pairs).mean()) for c in cands]
    kept = sorted(range(len(cands)), key=lambda k: head[k], reverse=True)[:3]
    for k in range(len(cands)):
        assert scores[k] == pytest.approx(full[k] if k in kept else head[k], abs=1e-3)
    rounds = rank_work(cands, 24, first=8, keep=3)
    assert rounds[0] == (shared_evaluations(cands), 8) and rounds[1] == (18, 16)
    assert rank_work(cands[:2], 24) == [(shared_evaluations(cands[:2]), 24)]


def test_a_diverging_candidate_ranks_last():
    model = _vp()
    pairs = _pairs(model, 8)
    good = by_name("ab3", 6, model, "logsnr")
    bad = bns.NSSolver(good.times, good.a, good.b * 1e30)
    scores = rank(model, [bad, good], pairs)
    assert scores[0] == -math.inf and math.isfinite(scores[1])


# -- the choice ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "make,solver,picked,rule",
    [(_vp, "ab3", "logsnr", "logsnr"), (_flow_shrunk, "dpmpp2m", "uniform", "logsnr")],
    ids=["vp-logsnr", "flow-uniform"],
)
def test_the_grid_search_picks_the_grid_that_measures_best(make, solver, picked, rule):
    model = make()
    val, test = _pairs(model, 32), _pairs(model, 32, "test")
    ((name, nfe, best),) = best_classical(model, [6], val, [solver])
    assert (name, nfe, best.meta["grid"]) == (solver, 6, picked)
    scores = best.meta["grid_psnr"]
    assert set(scores) == set(grid_names(model)) and best.meta["grid_pairs"] == 32
    # measurably better, on held-out pairs too: by 2 dB or more against each other grid
    held_out = {
        g: float(evaluate_psnr(model, by_name(solver, 6, model, g), test).mean()) for g in scores
    }
    assert all(held_out[picked] > held_out[g] + 2 for g in held_out if g != picked)
    assert by_name(solver, 6, model).meta["grid"] == rule  # the rule alone: not always it


def test_init_best_starts_from_the_measured_best(tmp_path):
    model = _flow_shrunk()
    kw = dict(
        adam_steps=0, train_pairs=8, val_pairs=32, init_pairs=32, cache=tmp_path, progress=False
    )
    solver, hist = bns.distill(model, 6, init="dpmpp2m", precondition=None, **kw)
    assert solver.meta["init"] == "dpmpp2m@uniform"
    scores = solver.meta["init_candidates_psnr"]
    assert set(scores) == {"dpmpp2m@uniform", "dpmpp2m@logsnr", "dpmpp2m@edm"}
    assert scores["dpmpp2m@uniform"] > scores["dpmpp2m@logsnr"] + 5
    # a label pins one candidate; an old label (no grid) is the rule's grid
    pinned, _ = bns.distill(model, 6, init="dpmpp2m@edm", **kw)
    assert (
        pinned.meta["init"] == "dpmpp2m@edm"
        and "init_candidates_psnr" not in pinned.meta
        or (pinned.meta["init_candidates_psnr"] == {})
    )
    old = bns.solvers.solver_from_label(model, 6, "dpmpp2m")
    assert old.meta["grid"] == "logsnr" and old.meta["init"] == "dpmpp2m@logsnr"
    with pytest.raises(bns.TrainingError, match="unknown init"):
        bns.distill(model, 6, init="dpmpp2m@karras", **kw)


def test_eval_reports_each_baseline_on_its_measured_grid(tmp_path, capsys):
    from bns.cli import main

    # A user's file: a float32 nn.Module, no dtype given, its velocity on a shrunk range.
    (tmp_path / "mine.py").write_text(
        "import torch, bns\n"
        "from bns.models.gmm import gaussian_mixture_model\n"
        "class Net(torch.nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        self.ref = gaussian_mixture_model(dim=8, components=3, std=0.1)\n"
        "        self.scale = torch.nn.Parameter(torch.ones(()))\n"
        "    def forward(self, x, t):\n"
        "        return self.scale * self.ref.velocity(x.double(), t).float()\n"
        "def build():\n"
        "    return bns.Model(Net(), 'velocity', bns.schedules.CondOT(), (8,),"
        " t_range=(1e-3, 1 - 1e-3))\n"
    )
    spec = f"{tmp_path / 'mine.py'}:build"
    cache = ["--cache-dir", str(tmp_path / "cache"), "--quiet"]
    out = tmp_path / "e.json"
    argv = ["eval", "--model", spec, "--baselines", "dpmpp2m,ab3", "--nfe", "6"]
    argv += ["--test-pairs", "16", "--grid-pairs", "16", "--json", str(out), *cache]
    assert main(argv) == 0
    got = json.loads(out.read_text())
    rows = {r["solver"]: r for r in got["rows"]}
    assert rows["dpmpp2m"]["grid"] == "uniform" and rows["dpmpp2m"]["grid_pairs"] == 16
    assert set(rows["ab3"]["grid_psnr"]) == {"uniform", "logsnr", "edm"}
    assert {"grid_search", "ground_truth_val"} <= set(got["cost"])
    assert "(uniform)" in out.with_suffix(".md").read_text()
    # --grids default: the rule, nothing measured
    argv2 = [a if a != str(out) else str(tmp_path / "d.json") for a in argv] + [
        "--grids",
        "default",
    ]
    assert main(argv2) == 0
    rows2 = {r["solver"]: r for r in json.loads((tmp_path / "d.json").read_text())["rows"]}
    assert rows2["dpmpp2m"]["grid"] == "logsnr" and "grid_psnr" not in rows2["dpmpp2m"]
    assert rows2["dpmpp2m"]["psnr_mean"] < rows["dpmpp2m"]["psnr_mean"] - 5
    capsys.readouterr()
    assert main(argv + ["--grids", "uniform,karras"]) == 2
    assert "karras is not a grid of" in capsys.readouterr().err


def test_eval_on_a_model_with_one_grid_spends_nothing_choosing(tmp_path):
    from bns.cli import main

    out = tmp_path / "e.json"
    argv = ["eval", "--model", "gmm", "--baselines", "ab2,unipc2", "--nfe", "4"]
    argv += ["--test-pairs", "8", "--json", str(out), "--cache-dir", str(tmp_path), "--quiet"]
    assert main(argv) == 0
    got = json.loads(out.read_text())
    assert {r["grid"] for r in got["rows"]} == {"uniform"}  # CondOT on [0, 1]: the only grid
    assert "ground_truth_val" not in got["cost"] and "grid_search" not in got["cost"]
