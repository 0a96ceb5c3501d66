"""One solver for a range of guidance scales: identity at zero steps, training, file, CLI.

On a class-conditional network written as a user writes it (a float32 ``nn.Module`` with a label
embedding, no ``dtype=``), through the Python API and the command line.
"""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from torch import nn

import bns
from bns.cli import main
from bns.guidance_range import GuidanceRangeSolver
from bns.pairs import make_pairs
from bns.solver import SolverFileError
from bns.train import choose_initial_solver

pytestmark = pytest.mark.usefixtures("one_thread")


class CondNet(nn.Module):
    def __init__(self, dim: int = 6, classes: int = 3):
        super().__init__()
        torch.manual_seed(2)
        self.emb = nn.Embedding(classes + 1, 8)  # the last row: no label
        self.l1, self.l2 = nn.Linear(dim + 9, 32), nn.Linear(32, dim)

    def forward(self, x, t, y):
        h = torch.cat([x, self.emb(y), t[:, None]], 1)
        return 2 * self.l2(torch.tanh(3 * self.l1(h))) * torch.cos(4 * t[:, None]) - x


def cond_model() -> bns.Model:
    return bns.Model(
        CondNet(), "velocity", bns.schedules.CondOT(), (6,), num_classes=3, name="cond"
    )


KW = dict(train_pairs=32, val_pairs=16, init_pairs=16, batch_size=16, val_every=5)


def test_at_zero_steps_it_is_the_initial_solver_at_every_scale(tmp_path):
    model = cond_model()
    rs, hist = bns.distill_guidance_range(
        model, 4, [1, 4], adam_steps=0, cache=tmp_path, progress=False, **KW
    )
    # The start: the classical solver with the best mean validation PSNR over the scales.
    means = {}
    for w in (1.0, 4.0):
        val = make_pairs(model, 16, "val", guidance=w, cache=tmp_path, progress=False)
        cfg = bns.DistillConfig(nfe=4, guidance=w, end="range", **KW)
        _, scores, _ = choose_initial_solver(model, cfg, val)
        for k, v in scores.items():
            means[k] = means.get(k, 0.0) + v / 2
    best = max(means, key=means.get)
    assert rs.meta["init"] == best and rs.w_range == (1.0, 4.0)
    init = bns.solvers.solver_from_label(model, 4, best)
    for w in (1.0, 1.7, 4.0):
        s = rs.at(w)
        assert torch.allclose(s.times, init.times, atol=1e-12)
        assert torch.allclose(s.a, init.a, atol=1e-12) and torch.allclose(s.b, init.b, atol=1e-12)
        assert s.meta["guidance"] == w and s.meta["model_fingerprint"] == model.fingerprint()
    assert hist["best_step"] == 0


def test_training_improves_every_scale_and_interpolates_smoothly(tmp_path):
    model = cond_model()
    ws = [1.0, 2.0, 4.0]
    rs, hist = bns.distill_guidance_range(
        model, 4, ws, adam_steps=60, cache=tmp_path, progress=False, **KW
    )
    assert hist["best_val_psnr"] > hist["val_psnr"][0] + 1.0
    start, _ = bns.distill_guidance_range(
        model, 4, ws, adam_steps=0, cache=tmp_path, progress=False, **KW
    )
    # Better than its start at a scale it never saw (w = 3), on that scale's own pairs.
    test = make_pairs(model, 32, "test", guidance=3.0, cache=tmp_path, progress=False)
    trained = bns.evaluate.evaluate_psnr(model, rs.at(3.0), test, 3.0).mean()
    initial = bns.evaluate.evaluate_psnr(model, start.at(3.0), test, 3.0).mean()
    assert trained > initial
    # A smooth function of w: nearby scales give nearby coefficients.
    s1, s2 = rs.at(2.0), rs.at(2.0 * 1.001)
    assert (s1.b - s2.b).abs().max() < 1e-2 * (s1.b.abs().max())
    assert not torch.allclose(rs.at(1.0).b, rs.at(4.0).b)  # and it does vary with w
    with pytest.raises(ValueError, match="outside the range"):
        rs.at(5.0)
    rs.at(5.0, extrapolate=True).validate(strict=True)


def test_file_round_trip_and_bad_files(tmp_path):
    model = cond_model()
    rs, _ = bns.distill_guidance_range(
        model, 4, [1, 3], adam_steps=10, cache=tmp_path, progress=False, **KW
    )
    path = tmp_path / "range.json"
    rs.save(path)
    back = GuidanceRangeSolver.load(path, model=model)
    for w in (1.0, 2.0, 3.0):
        a, b = rs.at(w), back.at(w)
        assert torch.equal(a.times, b.times) and torch.equal(a.a, b.a) and torch.equal(a.b, b.b)
    other = cond_model()
    with torch.no_grad():
        other.net.l1.bias += 0.1
    with pytest.raises(SolverFileError, match="trained for model"):
        GuidanceRangeSolver.load(path, model=other)
    GuidanceRangeSolver.load(path, model=other, force=True)
    bad = json.loads(path.read_text())
    bad["coefs"]["a"] = [[float("nan")] * 4] * 3
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    with pytest.raises(SolverFileError, match="corrupt"):
        GuidanceRangeSolver.load(tmp_path / "bad.json")
    (tmp_path / "cut.json").write_text(path.read_text()[:50])
    with pytest.raises(SolverFileError, match="cannot read"):
        GuidanceRangeSolver.load(tmp_path / "cut.json")
    with pytest.raises(SolverFileError, match="not found"):
        GuidanceRangeSolver.load(tmp_path / "missing.json")


def test_bad_settings_are_refused(tmp_path):
    model = cond_model()
    kw = dict(adam_steps=0, cache=tmp_path, progress=False, **KW)
    with pytest.raises(bns.TrainingError, match="at least two"):
        bns.distill_guidance_range(model, 4, [2.0], **kw)
    with pytest.raises(bns.TrainingError, match="at least two"):
        bns.distill_guidance_range(model, 4, [0.0, 2.0], **kw)
    flow = bns.Model(lambda x, t: -x, "velocity", bns.schedules.CondOT(), (6,))
    with pytest.raises(bns.TrainingError, match="unconditional"):
        bns.distill_guidance_range(flow, 4, [1.0, 2.0], **kw)


def test_command_line(tmp_path, capsys):
    user = tmp_path / "user.py"
    user.write_text(
        "import sys\n"
        f"sys.path.insert(0, {str(__file__.rsplit('/', 1)[0])!r})\n"
        "from test_guidance_range import cond_model\n"
    )
    common = ["--model", f"{user}:cond_model", "--cache-dir", str(tmp_path / "c"), "--quiet"]
    out = tmp_path / "range.json"
    argv = ["distill", *common, "--nfe", "4", "--guidance-range", "1,2,4", "--out", str(out)]
    argv += ["--train-pairs", "32", "--val-pairs", "16", "--init-pairs", "16", "--adam-steps", "10"]
    argv += ["--batch-size", "16", "--val-every", "5"]
    assert main(argv) == 0
    assert "guidance 1 to 4" in capsys.readouterr().out
    assert not out.with_name("range.json.ckpt").exists()  # written while it ran, then removed
    first = json.loads(out.read_text())
    # --resume on a finished run: nothing to resume, and the solver is kept
    assert main([*argv, "--resume"]) == 2
    assert "its run finished, there is nothing to resume" in capsys.readouterr().err
    with pytest.warns(UserWarning, match="no checkpoint"):  # --resume reaches the loop
        assert main([*argv, "--resume", "--overwrite"]) == 0
    again = json.loads(out.read_text())
    for d in (first, again):  # all but the clock and the checksum over it
        del d["checksum"], d["meta"]["wall_time_s"]
    assert again == first
    res = tmp_path / "e.json"
    ev = ["eval", *common, "--solver", str(out), "--guidance", "3", "--nfe", "4"]
    ev += ["--baselines", "euler", "--test-pairs", "8", "--json", str(res)]
    assert main(ev) == 0
    rows = json.loads(res.read_text())["rows"]
    model = cond_model()
    want = GuidanceRangeSolver.load(out).at(3.0)
    test = make_pairs(model, 8, "test", guidance=3.0, cache=tmp_path / "c", progress=False)
    psnr = bns.evaluate.evaluate_psnr(model, want, test, 3.0).mean()
    assert abs(next(r for r in rows if r["kind"] == "bns")["psnr_mean"] - float(psnr)) < 1e-6
    # sample takes the solver at its --guidance (a .pt output: the samples themselves).
    pt = tmp_path / "s.pt"
    sample = ["sample", *common, "--solver", str(out), "--guidance", "2.5", "--n", "4"]
    assert main([*sample, "--out", str(pt)]) == 0
    got = torch.load(pt)
    x0 = torch.randn((4, 6), generator=torch.Generator().manual_seed(0))  # sample's --seed 0
    with torch.no_grad():
        want = bns.sample(
            model, x0, GuidanceRangeSolver.load(out).at(2.5), torch.arange(4) % 3, 2.5
        )
    assert torch.allclose(got, want, atol=1e-6)
    capsys.readouterr()
    assert main([*ev[:-2], "--json", str(tmp_path / "x.json"), "--guidance", "9"]) == 2
    assert "outside the range this solver was trained on [1, 4]" in capsys.readouterr().err
    # the file names no one scale: without --guidance, one line asks for it
    assert main(["sample", *common, "--solver", str(out), "--out", str(pt)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith("is a solver for guidance 1 to 4: pass --guidance W, W in that range")


def test_micro_batches_and_checkpointing_give_the_same_solver_and_no_weight_gets_a_grad(tmp_path):
    model = cond_model()
    kw = dict(adam_steps=6, cache=tmp_path, progress=False, init="midpoint", **KW)
    full, _ = bns.distill_guidance_range(model, 4, [1, 4], **kw)
    part, _ = bns.distill_guidance_range(
        model, 4, [1, 4], micro_batch=3, grad_checkpoint=True, **kw
    )
    for w in (1.0, 2.0, 4.0):
        a, b = full.at(w), part.at(w)
        for x, y in ((a.times, b.times), (a.a, b.a), (a.b, b.b)):
            assert torch.allclose(x, y, rtol=1e-6, atol=1e-9)
    assert all(p.grad is None for p in model.net.parameters())
    assert all(p.requires_grad for p in model.net.parameters())  # restored after
    with pytest.raises(bns.TrainingError, match="family bns only"):
        bns.distill_guidance_range(model, 4, [1, 4], family="multistep", **kw)
    with pytest.raises(bns.TrainingError, match="gn_steps 0 only"):
        bns.distill_guidance_range(model, 4, [1, 4], gn_steps=2, **kw)
    with pytest.raises(bns.TrainingError, match="end range"):
        bns.distill_guidance_range(model, 4, [1, 4], end="data", **kw)


def test_steps_run_counts_the_steps_that_ran(tmp_path):
    """A run that stops early (too many non-finite steps: a learning rate that diverges)
    records the steps it ran, not the steps it was given."""
    rs, hist = bns.distill_guidance_range(
        cond_model(), 4, [1, 4], adam_steps=40, lr=1e6, max_skips=1, cache=tmp_path, progress=False,
        **KW,
    )  # fmt: skip
    assert hist["skipped"] == 2 and rs.meta["steps_run"] == hist["steps_run"] < 40


def test_an_interrupted_run_resumes_to_the_same_solver(tmp_path, monkeypatch):
    """Guidance-range training runs in bns.distill's loop: checkpoints, and a run killed after
    one continues from it to the result of an uninterrupted run, bit for bit."""
    import bns.guidance_range as gr

    model = cond_model()
    kw = dict(adam_steps=20, cache=tmp_path, progress=False, **KW)
    full, h_full = bns.distill_guidance_range(model, 4, [1, 4], **kw)
    ck = tmp_path / "run.ckpt"
    real, calls = gr._RangeObjective.validate, []

    def killed_at_step_10(self):
        calls.append(1)
        if len(calls) == 3:  # steps 0 and 5 validated (and step 5 checkpointed)
            raise KeyboardInterrupt
        return real(self)

    monkeypatch.setattr(gr._RangeObjective, "validate", killed_at_step_10)
    with pytest.raises(KeyboardInterrupt):
        bns.distill_guidance_range(model, 4, [1, 4], checkpoint_path=ck, **kw)
    monkeypatch.undo()
    assert ck.exists()
    back, h_back = bns.distill_guidance_range(
        model, 4, [1, 4], checkpoint_path=ck, resume=True, **kw
    )
    for name in ("logits", "a", "b"):
        assert torch.equal(back.coefs[name], full.coefs[name])
    assert h_back["val_psnr"] == h_full["val_psnr"] and h_back["step"] == [0, 5, 10, 15, 20]
    assert back.meta["steps_run"] == full.meta["steps_run"] == 20
    other = dict(kw, adam_steps=21)  # other settings: refused
    with pytest.raises(bns.TrainingError, match="belongs to another"):
        bns.distill_guidance_range(model, 4, [1, 4], checkpoint_path=ck, resume=True, **other)


def test_patience_stops_early_and_steps_run_says_so(tmp_path):
    """Validation rounds that never improve (a learning rate too small to move anything) stop
    the run after ``patience`` of them; ``steps_run`` counts the steps taken."""
    rs, hist = bns.distill_guidance_range(
        cond_model(), 4, [1, 4], adam_steps=40, lr=1e-300, patience=2, cache=tmp_path,
        progress=False, **KW,
    )  # fmt: skip
    assert hist["step"] == [0, 5, 10] and hist["best_step"] == 0
    assert hist["steps_run"] == rs.meta["steps_run"] == 10


def test_sample_takes_the_solvers_guidance_unless_told_and_warns_at_another(tmp_path):
    """bns.sample with labels and no guidance samples at the scale the solver was trained for
    (it sampled at 1, silently, once); another scale runs, with a warning."""
    model = cond_model()
    rs, _ = bns.distill_guidance_range(
        model, 4, [1.0, 3.0], adam_steps=0, cache=tmp_path, progress=False, **KW
    )
    solver = rs.at(2.0)  # meta: guidance 2
    x0 = torch.randn(4, 6, generator=torch.Generator().manual_seed(0))
    y = torch.arange(4) % 3
    with torch.no_grad():
        at_2 = bns.sample(model, x0, solver, y, 2.0)
        assert torch.equal(bns.sample(model, x0, solver, y), at_2)
        with pytest.warns(UserWarning, match="guidance 3 with a solver trained for 2"):
            at_3 = bns.sample(model, x0, solver, y, 3.0)
    assert not torch.allclose(at_3, at_2)
    # Without labels guidance does nothing: 1, one forward per step, no warning; a plain
    # velocity function guides itself, whatever the solver was trained for.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        f0 = model.forwards
        with torch.no_grad():
            bns.sample(model, x0, solver)
        assert model.forwards - f0 == 4 * solver.nfe
        out = bns.sample(lambda x, t: -x, x0, solver)
    assert out.shape == x0.shape
