"""Several starts (``starts=K``, ``--starts K``): each initial solver distilled to its end, the
best validated kept. The run kept is the run from its start, bit for bit; the starts are the
best classical solver and then, in turn, the best of the other kind; a killed run resumes to
the same solver; the estimate counts every start.

The model where it matters is an analytic Gaussian mixture on diffusers' DDPM schedule with
epsilon prediction: there Gauss-Newton from the best classical start (Euler) stops 30 dB below
where it ends from a preconditioned one (benchmarks/results/starts_gmm-ddpm.md).
"""

from __future__ import annotations

import json

import pytest
import torch
from test_benchmarks import _benchmark

import bns
from bns.cli import main
from bns.config import TrainingError
from bns.models.gmm import gaussian_mixture_model
from bns.solvers.initial import distinct_solvers, init_candidates
from bns.train import pick_starts

RUN = dict(train_pairs=64, val_pairs=32, init_pairs=32, gt_batch_size=32, progress=False)


def ddpm_mixture() -> bns.Model:
    """benchmarks/starts.py's ``gmm-ddpm``: three components in 8 dimensions."""
    return _benchmark("starts").gmm_ddpm()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    model = ddpm_mixture()
    one, _ = bns.distill(model, 4, cache=cache, **RUN)
    three, hist = bns.distill(model, 4, cache=cache, starts=3, **RUN)
    winner, _ = bns.distill(model, 4, cache=cache, init=three.meta["init"], **RUN)
    return one, three, hist, winner, cache


def test_the_best_start_is_kept_and_equals_a_run_from_it(runs):
    one, three, hist, winner, _ = runs
    starts = three.meta["starts"]
    assert len(starts) == 3 and three.meta["init"] == max(starts, key=starts.get)
    assert next(iter(starts)) == one.meta["init"]  # the first start: the default's
    assert starts[one.meta["init"]] == one.meta["val_psnr"]  # that start is the default run
    assert three.meta["val_psnr"] == max(starts.values()) == hist["best_val_psnr"]
    for key in ("times", "a", "b"):
        assert torch.equal(getattr(three, key), getattr(winner, key))
    # On this model the default start ends far below another one.
    assert three.meta["val_psnr"] > one.meta["val_psnr"] + 10, starts
    assert "starts" not in one.meta and one.meta["config"]["starts"] == 1


def test_the_starts_alternate_kinds_and_skip_equal_solvers():
    model = ddpm_mixture()
    cands = init_candidates(model, 4, "best", "auto", "range")
    scores = {c.meta["init"]: float(i) for i, c in enumerate(reversed(cands))}  # any order
    picked = pick_starts(cands, scores, 4)
    best = max(cands, key=lambda c: scores[c.meta["init"]])
    assert picked[0] is best
    kinds = ["+pc" in c.meta["init"] for c in picked]
    assert all(a != b for a, b in zip(kinds, kinds[1:])), [c.meta["init"] for c in picked]
    assert len(distinct_solvers(picked)) == len(picked) == 4
    # a copy of a candidate under another name is never a second start
    twin = bns.NSSolver(best.times, best.a, best.b, {**best.meta, "init": "twin"})
    scores["twin"] = scores[best.meta["init"]] + 1
    assert [c.meta["init"] for c in pick_starts([*cands, twin], scores, 2)][0] == "twin"
    assert all(c is not best for c in pick_starts([*cands, twin], scores, 8))
    only = pick_starts(cands[:1], scores, 3)  # one candidate: one start
    assert len(only) == 1 and only[0] is cands[0]


def test_a_killed_run_of_several_starts_resumes_to_the_same_solver(runs, tmp_path):
    _, _, _, _, cache = runs
    model = ddpm_mixture()
    ckpt = tmp_path / "s.ckpt"
    kw = dict(starts=2, cache=cache, checkpoint_path=ckpt, **RUN)
    calls = []

    def killer(step, record):
        calls.append(step)
        if len(calls) == 16:  # in the second start (each validates about 13 times)
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        bns.distill(model, 4, callback=killer, **kw)
    first = torch.load(ckpt, weights_only=True)
    assert first.get("finished") is True  # the first start ended
    assert (tmp_path / "s.ckpt.start1").exists()  # the second was under way
    resumed, _ = bns.distill(model, 4, resume=True, **kw)
    plain, _ = bns.distill(model, 4, starts=2, cache=cache, **RUN)
    for key in ("times", "a", "b"):
        assert torch.equal(getattr(resumed, key), getattr(plain, key))
    assert resumed.meta["starts"] == plain.meta["starts"]
    # The files stay with the caller's: resuming the finished run runs nothing.
    assert torch.load(tmp_path / "s.ckpt.start1", weights_only=True)["finished"] is True
    calls.clear()
    again, _ = bns.distill(model, 4, resume=True, callback=killer, **kw)
    assert calls == [] and torch.equal(again.b, plain.b)
    # Resuming from a checkpoint that is not there says so, as with one start.
    gone = dict(kw, checkpoint_path=tmp_path / "missing.ckpt")
    with pytest.warns(UserWarning, match="no checkpoint at"):
        bns.distill(model, 4, resume=True, **gone)


def test_a_start_that_never_validates_is_recorded_and_the_file_saves(runs, tmp_path, monkeypatch):
    _, _, _, _, cache = runs
    real = bns.train.Objective.validate

    def nan_for_preconditioned(self):
        v, solver = real(self)
        return (float("nan"), solver) if "+pc" in self.init.meta["init"] else (v, solver)

    monkeypatch.setattr(bns.train.Objective, "validate", nan_for_preconditioned)
    solver, _ = bns.distill(ddpm_mixture(), 4, starts=2, cache=cache, **RUN)
    (pc,) = [k for k in solver.meta["starts"] if "+pc" in k]
    assert solver.meta["starts"][pc] is None and "+pc" not in solver.meta["init"]
    solver.save(tmp_path / "s.json")  # a finite file: no -inf or NaN in its meta
    assert bns.NSSolver.load(tmp_path / "s.json").meta["starts"][pc] is None


def test_a_budget_pays_for_every_start(tmp_path):
    """The budget's fit counts every start (a smaller rung than one start's), and the run with
    its three starts stays within it."""
    model = ddpm_mixture()
    kw = dict(gt_batch_size=32, progress=False, budget="40k")
    _, one = bns.estimate_cost(
        model,
        4,
        cache=tmp_path / "e",
        repeats=1,
        return_config=True,
        **{k: v for k, v in kw.items() if k != "progress"},
    )
    solver, _ = bns.distill(model, 4, starts=3, cache=tmp_path / "c", **kw)
    total = solver.meta["cost"]["total"]
    assert total["forwards"] + total["jvps"] <= 40_000
    assert solver.meta["config"]["train_pairs"] < one.train_pairs
    assert len(solver.meta["starts"]) == 3


def test_the_estimate_counts_every_start(tmp_path):
    model = ddpm_mixture()
    kw = dict(cache=tmp_path, repeats=1, gn_steps=2, gn_patience=0, **RUN)
    kw.pop("progress")
    one = bns.estimate_cost(model, 4, **kw)
    three = bns.estimate_cost(model, 4, starts=3, **kw)
    for phase in ("optimizer", "validation"):
        assert three[phase].forwards == 3 * one[phase].forwards
        assert three[phase].jvps == 3 * one[phase].jvps
    assert three["ranking"].forwards == one["ranking"].forwards


def test_bad_starts_are_refused_in_one_line(tmp_path):
    with pytest.raises(TrainingError, match="starts must be a positive integer, got 0"):
        bns.distill(ddpm_mixture(), 4, starts=0, progress=False, cache=tmp_path)
    cond = gaussian_mixture_model(dim=4, components=2, num_classes=2)
    with pytest.raises(TrainingError, match="takes starts 1 only"):
        bns.distill_guidance_range(cond, 4, [1, 3], starts=2, progress=False, cache=tmp_path)


USER_FILE = """
import math, torch
from torch import nn
import bns

class Eps(nn.Module):  # a user's epsilon network, float32, no dtype given
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.mlp = nn.Sequential(nn.Linear(6 + 2, 32), nn.SiLU(), nn.Linear(32, 6))

    def forward(self, x, t):
        temb = torch.stack([torch.sin(math.pi * t), torch.cos(math.pi * t)], 1).to(x.dtype)
        return 0.3 * self.mlp(torch.cat([x, temb], 1))

def net():
    return bns.Model(Eps(), "eps", bns.schedules.VP(), (6,), name="user-eps")
"""


def test_starts_through_the_command_line_on_a_user_network(tmp_path, capsys):
    user = tmp_path / "user.py"
    user.write_text(USER_FILE)
    out = tmp_path / "s.json"
    argv = ["distill", "--model", f"{user}:net", "--nfe", "4", "--starts", "2", "--quiet"]
    argv += ["--train-pairs", "24", "--val-pairs", "16", "--init-pairs", "16", "--gn-steps", "2"]
    argv += ["--gt-batch-size", "24", "--cache-dir", str(tmp_path / "c"), "--out", str(out)]
    assert main(argv) == 0
    meta = json.loads(out.read_text())["meta"]
    said = capsys.readouterr().out
    assert (
        "bns distill: 2 starts: " + ", ".join(f"{k} {v:.2f} dB" for k, v in meta["starts"].items())
        in said
    )
    assert len(meta["starts"]) == 2 and meta["config"]["starts"] == 2
    assert meta["init"] == max(meta["starts"], key=meta["starts"].get)
    assert not list(tmp_path.glob("s.json.ckpt*"))  # nothing of the checkpoints is left
    kinds = ["+pc" in name for name in meta["starts"]]
    assert kinds[0] != kinds[1]
    capsys.readouterr()
    assert main([*argv[:-2], "--estimate"]) == 0
    assert (
        "2 Gauss-Newton steps of 24 pairs, from each of up to 2 starts" in capsys.readouterr().out
    )


def test_starts_through_the_api_on_a_closure_over_a_user_network(tmp_path):
    """A closure over a float32 module (no dtype given): the kept start is the run from it."""
    namespace: dict = {}
    exec(USER_FILE, namespace)  # the same user network as the command line's
    net = namespace["Eps"]()
    model = bns.Model(lambda x, t: net(x, t), "eps", bns.schedules.VP(), (6,), name="closure")
    kw = dict(train_pairs=24, val_pairs=16, init_pairs=16, gt_batch_size=24, gn_steps=2)
    kw.update(cache=tmp_path, progress=False)
    two, _ = bns.distill(model, 4, starts=2, **kw)
    alone, _ = bns.distill(model, 4, init=two.meta["init"], **kw)
    assert len(two.meta["starts"]) == 2
    assert torch.equal(two.b, alone.b) and torch.equal(two.times, alone.times)
