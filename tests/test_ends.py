"""Exact ends: a solver for a model that stops short of the data can end on it (``end="data"``).

On a user's epsilon network over a discrete DDPM schedule (written as a user writes it: a float32
``nn.Module``, no ``dtype=``), through the Python API and the command line. The independent
check against diffusers' DPM-Solver++ with ``final_sigmas_type="zero"`` is in
test_solver_oracles.py.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

import bns
from bns.cli import main
from bns.evaluate import baseline_solvers
from bns.pairs import data_prediction, make_pairs
from bns.schedules import DiscreteVP
from bns.solvers import with_data_end
from bns.solvers.ends import ends_short_of_data, resolve_end
from bns.solvers.initial import initial_solver

pytestmark = pytest.mark.usefixtures("one_thread")


class EpsNet(nn.Module):
    def __init__(self, dim: int = 6):
        super().__init__()
        torch.manual_seed(1)
        self.l1, self.l2 = nn.Linear(dim + 1, 32), nn.Linear(32, dim)

    def forward(self, x, t):
        return 0.3 * self.l2(torch.tanh(self.l1(torch.cat([x, t[:, None].to(x.dtype)], 1))))


def ddpm_model() -> bns.Model:
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)  # DDPM's linear schedule
    schedule = DiscreteVP(torch.cumprod(1 - betas, 0))
    return bns.Model(EpsNet(), "eps", schedule, (6,), name="user-ddpm")


def test_which_models_stop_short_of_the_data():
    model = ddpm_model()
    assert ends_short_of_data(model) and resolve_end(model, "auto") == "data"
    flow = bns.Model(lambda x, t: -x, "velocity", bns.schedules.CondOT(), (2,))
    assert not ends_short_of_data(flow) and resolve_end(flow, "auto") == "range"
    with pytest.raises(ValueError, match="reaches the data"):
        resolve_end(flow, "data")
    with pytest.raises(ValueError, match="end must be one of"):
        resolve_end(model, "zero")


def test_the_last_step_is_the_data_prediction_at_the_last_evaluation():
    model = ddpm_model()
    x0 = torch.randn(5, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for name, nfe in (("euler", 1), ("ab3", 5), ("midpoint", 6), ("unipc2", 4)):
        plain = bns.solvers.by_name(name, nfe, model)
        solver = with_data_end(plain, model)
        # Every row but the last is the plain solver's; the times stay.
        assert torch.equal(solver.times, plain.times)
        assert torch.equal(solver.a[:-1], plain.a[:-1]) and torch.equal(solver.b[:-1], plain.b[:-1])
        _, traj = bns.sample(model, x0, plain, return_trajectory=True)
        want = data_prediction(model, traj[-2], float(plain.times[-2]))
        got = bns.sample(model, x0, solver)
        assert (got - want).abs().max() < 1e-12 * want.abs().max(), name


def test_ground_truth_that_ends_on_the_data(tmp_path):
    model = ddpm_model()
    kw = dict(cache=tmp_path, progress=False, batch_size=4)
    plain = make_pairs(model, 6, "val", **kw)
    files = sorted(tmp_path.rglob("*.safetensors"))
    data = make_pairs(model, 6, "val", end="data", **kw)
    assert sorted(tmp_path.rglob("*.safetensors")) == files  # one cache serves both ends
    assert data.end == "data" and plain.end == "range" and data[:2].end == "data"
    assert torch.equal(data.x0, plain.x0)
    assert data.nfe_per_sample == plain.nfe_per_sample + 1
    want = data_prediction(model, plain.x1.double(), model.t_range[1])
    assert (data.x1 - want.float()).abs().max() < 1e-6
    # The residual noise the step removes is of the order of sigma at t_max (0.01).
    assert 1e-3 < float((data.x1 - plain.x1).abs().mean()) < 0.1


def test_distill_ends_on_the_data_by_default_on_such_a_model(tmp_path):
    model = ddpm_model()
    kw = dict(train_pairs=16, val_pairs=8, init_pairs=8, batch_size=8, val_every=2)
    solver, _ = bns.distill(
        model, 4, adam_steps=0, init="ddim", cache=tmp_path, progress=False, **kw
    )
    assert solver.meta["end"] == "data" and solver.meta["config"]["end"] == "auto"
    # Zero steps return the initial solver: here DDIM with its last step to sigma = 0.
    label = solver.meta["init"]  # DDIM on the grid that measured best
    assert label.startswith("ddim@")
    init = with_data_end(initial_solver(model, 4, "ddim", grid=label.split("@")[1]), model)
    assert torch.allclose(solver.a, init.a, atol=0) and torch.allclose(solver.b, init.b, atol=0)
    # Trained, it beats that start on pairs that end on the data.
    trained, hist = bns.distill(model, 4, adam_steps=20, cache=tmp_path, progress=False, **kw)
    assert trained.meta["end"] == "data" and hist["best_val_psnr"] >= hist["val_psnr"][0]
    ranged, _ = bns.distill(
        model, 4, adam_steps=0, end="range", init="ddim", cache=tmp_path, progress=False, **kw
    )
    assert ranged.meta["end"] == "range"
    assert torch.equal(ranged.b[:-1], solver.b[:-1]) and not torch.equal(ranged.b, solver.b)


def test_bad_ends_are_refused(tmp_path):
    model = ddpm_model()
    flow = bns.Model(EpsNet(), "velocity", bns.schedules.CondOT(), (6,))
    kw = dict(adam_steps=0, train_pairs=8, val_pairs=8, cache=tmp_path, progress=False)
    with pytest.raises(bns.TrainingError, match="reaches the data"):
        bns.distill(flow, 4, end="data", **kw)
    with pytest.raises(bns.TrainingError, match="family time ends on the model's range only"):
        bns.distill(model, 4, end="data", family="time", **kw)
    with pytest.raises(bns.TrainingError, match="end must be auto, range or data"):
        bns.distill(model, 4, end="zero", **kw)
    # Pairs that end elsewhere than asked.
    pairs = tuple(make_pairs(model, 8, s, cache=tmp_path, progress=False) for s in ("train", "val"))
    with pytest.raises(bns.TrainingError, match="the pairs end at range/range"):
        bns.distill(model, 4, end="data", pairs=pairs, adam_steps=0, progress=False)
    # Given pairs decide where "auto" ends.
    solver, _ = bns.distill(model, 4, pairs=pairs, adam_steps=0, init="ddim", progress=False)
    assert solver.meta["end"] == "range"


def test_command_line_end_to_end(tmp_path, capsys):
    model_file = tmp_path / "user.py"
    model_file.write_text(
        "import sys\n"
        f"sys.path.insert(0, {str(__file__.rsplit('/', 1)[0])!r})\n"
        "from test_ends import ddpm_model\n"
    )
    spec = f"{model_file}:ddpm_model"
    cache = ["--cache-dir", str(tmp_path / "cache"), "--quiet"]
    out = tmp_path / "s.json"
    argv = ["distill", "--model", spec, "--nfe", "4", "--out", str(out), *cache]
    argv += ["--train-pairs", "16", "--val-pairs", "8", "--init-pairs", "8", "--adam-steps", "4"]
    argv += ["--batch-size", "8", "--val-every", "2", "--init", "ddim"]
    assert main(argv) == 0
    solver = bns.NSSolver.load(out)
    assert solver.meta["end"] == "data"
    res = tmp_path / "e.json"
    ev = ["eval", "--model", spec, "--solver", str(out), "--nfe", "4", "--test-pairs", "8"]
    ev += ["--baselines", "ddim,euler", "--json", str(res), *cache]
    assert main(ev) == 0
    got = json.loads(res.read_text())
    assert got["end"] == "data"
    # eval's rows: against ground truth that ends on the data, baselines ending there too.
    model = ddpm_model()
    test = make_pairs(model, 8, "test", cache=tmp_path / "cache", progress=False, end="data")
    ddim_row = next(r for r in got["rows"] if r["solver"] == "ddim")
    # its grid, the best of the model's grids on the validation pairs
    assert ddim_row["grid"] == max(ddim_row["grid_psnr"], key=ddim_row["grid_psnr"].get)
    assert set(ddim_row["grid_psnr"]) == set(bns.solvers.grid_names(model))
    entries = baseline_solvers(model, [4], ["ddim"], end="data", grid=ddim_row["grid"])
    psnr = bns.evaluate.evaluate_psnr(model, entries[0][2], test)
    assert abs(ddim_row["psnr_mean"] - float(psnr.mean())) < 1e-6
    # Solvers that end differently, or an --end that is not theirs, are refused.
    ranged = tmp_path / "r.json"
    argv2 = [a if a != str(out) else str(ranged) for a in argv] + ["--end", "range"]
    assert main(argv2) == 0
    capsys.readouterr()
    assert main(ev[:4] + [str(out), str(ranged)] + ev[5:]) == 2
    assert "end at different points" in capsys.readouterr().err
    assert main(ev + ["--end", "range"]) == 2
    assert "--end range but the solvers end at data" in capsys.readouterr().err


def test_a_closure_and_a_bf16_network_end_on_the_data(tmp_path):
    """The exact end through a closure over a user's module, and through a bf16 network."""
    base = ddpm_model()
    net = base.net
    closure = bns.Model(lambda x, t: net(x, t), "eps", base.schedule, (6,), name="closure")
    half = ddpm_model()
    half.net.to(torch.bfloat16)
    assert half.dtype == torch.bfloat16 and closure.dtype == torch.float32
    kw = dict(train_pairs=8, val_pairs=8, init_pairs=8, batch_size=8, val_every=2, init="ddim")
    for model in (closure, half):
        solver, hist = bns.distill(model, 4, adam_steps=2, cache=tmp_path, progress=False, **kw)
        assert solver.meta["end"] == "data" and all(map(math.isfinite, hist["val_psnr"]))
        pairs = make_pairs(model, 4, "val", cache=tmp_path, progress=False, end="data")
        assert pairs.end == "data" and torch.isfinite(pairs.x1).all()
    # The closure is the same network as the module: the same ground truth to the data.
    a = make_pairs(closure, 4, "val", cache=False, progress=False, end="data")
    b = make_pairs(base, 4, "val", cache=False, progress=False, end="data")
    assert torch.allclose(a.x1, b.x1, atol=1e-6)
