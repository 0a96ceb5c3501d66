"""Solvers for part of the path (:meth:`bns.Model.span`): image-to-image starts (noised samples
of the whole range), hand-overs inside the path, their pairs, cost, artifacts and commands.

The network is a user's: a float32 class-conditional epsilon MLP on a VP schedule, no dtype=.
"""

from __future__ import annotations

import json
import textwrap

import pytest
import torch

import bns
from bns.cli import main
from bns.guidance_range import GuidanceRangeSolver
from bns.pairs import make_pairs, start_states
from bns.solver import SolverFileError

pytestmark = pytest.mark.usefixtures("one_thread")

DIM = 4
TINY = dict(train_pairs=8, val_pairs=8, init_pairs=8, adam_steps=4, val_every=2, batch_size=4)

_USER_FILE = """
import torch
from torch import nn

import bns


class EpsNet(nn.Module):
    def __init__(self, dim={dim}, classes=3):
        super().__init__()
        self.emb = nn.Embedding(classes + 1, 8)
        self.mlp = nn.Sequential(nn.Linear(dim + 9, 32), nn.SiLU(), nn.Linear(32, dim))

    def forward(self, x, t, y=None):
        h = torch.cat([x, t[:, None].to(x.dtype), self.emb(y)], 1)
        return 0.3 * self.mlp(h) + 0.5 * x


def factory():
    torch.manual_seed(0)
    return bns.Model(EpsNet(), prediction="eps", schedule="vp", sample_shape=({dim},),
                     t_range=(0.0, 1 - 1e-3), num_classes=3, name="user-eps")
"""


def _user_model(tmp_path) -> tuple[bns.Model, str]:
    src = tmp_path / "user_eps.py"
    src.write_text(textwrap.dedent(_USER_FILE.format(dim=DIM)))
    ns: dict = {}
    exec(compile(src.read_text(), str(src), "exec"), ns)
    return ns["factory"](), f"{src}:factory"


# -- the model over a span -------------------------------------------------------------------------


def test_span_is_the_same_network_over_part_of_the_range(tmp_path):
    model, _ = _user_model(tmp_path)
    img2img, base = model.span(0.4), model.span(None, 0.7)
    assert img2img.t_range == (0.4, model.t_range[1]) and base.t_range == (0.0, 0.7)
    assert img2img.net is model.net and img2img.parent is model and base.parent is model
    assert img2img.starts_from_data and not img2img.ends_inside
    assert base.ends_inside and not base.starts_from_data
    prints = {model.fingerprint(), img2img.fingerprint(), base.fingerprint()}
    assert len(prints) == 3
    assert model.span(0.0, model.t_range[1]) is model  # the whole range is the model itself
    assert img2img.span(0.2).t_range == (0.2, model.t_range[1])  # spans of the whole range
    assert img2img.span_info() == {
        "t_range": [0.4, model.t_range[1]],
        "whole_range": list(model.t_range),
        "start": "noised data",
    }
    for bad in [(0.5, 0.5), (0.6, 0.2), (-0.1, None), (None, 1.0), (float("nan"), None)]:
        with pytest.raises(ValueError, match="span of user-eps"):
            model.span(*bad)
    # The velocity is the model's wherever both are defined.
    x, t, y = torch.randn(3, DIM), torch.full((3,), 0.5), torch.tensor([0, 1, 2])
    assert torch.equal(img2img.velocity(x, t, y), model.velocity(x, t, y))


def test_start_state_is_the_forward_process(tmp_path):
    model, _ = _user_model(tmp_path)
    span = model.span(0.3)
    data, noise = torch.randn(5, DIM), torch.randn(5, DIM)
    v = bns.schedules.VP()(torch.tensor([0.3], dtype=torch.float64))
    expect = v.alpha * data.double() + v.sigma * noise.double()
    assert torch.allclose(span.start_state(data, noise).double(), expect, atol=1e-7)
    with pytest.raises(bns.model.ModelError, match="one shape"):
        span.start_state(data, noise[:2])


def test_span_pairs_start_from_noised_samples_of_the_whole_range(tmp_path):
    model, _ = _user_model(tmp_path)
    span = model.span(0.5)
    cache = tmp_path / "cache"
    kw = dict(cache=cache, progress=False, guidance=2.0)
    pairs = make_pairs(span, 6, "train", **kw)
    whole = make_pairs(model, 6, "train", end="data", **kw)  # read back from the cache
    assert torch.equal(pairs.y, whole.y)
    starts = start_states(span, 6, "train", **kw)
    assert torch.equal(starts.x0, pairs.x0) and torch.equal(starts.x1, whole.x1)
    # x0 = alpha x1 + sigma eps, with noise of its own (not the whole range's noise).
    v = span.schedule(torch.tensor([0.5], dtype=torch.float64))
    eps = (pairs.x0.double() - v.alpha * whole.x1.double()) / v.sigma
    assert eps.std() > 0.5 and not torch.allclose(eps.float(), whole.x0, atol=0.1)
    # The ground truth runs the span from there, and its cost counts the samples' too.
    with torch.no_grad():
        gt = bns.ground_truth(span, pairs.x0.double(), pairs.y, 2.0)
    assert torch.allclose(gt.float(), pairs.x1, atol=1e-5)
    assert pairs.nfe_per_sample > whole.nfe_per_sample
    files = sorted(p.name for p in cache.glob("*.safetensors"))
    assert len(files) == 2  # the whole range's, reused, and the span's


def test_distill_a_span_through_the_python_api(tmp_path):
    model, _ = _user_model(tmp_path)
    cache = tmp_path / "cache"
    solver, hist = bns.distill(
        model, 4, span=[0.4, None], guidance=2.0, cache=cache, progress=False, **TINY
    )
    span = model.span(0.4)
    assert float(solver.times[0]) == 0.4 and float(solver.times[-1]) == model.t_range[1]
    assert solver.meta["span"] == span.span_info()
    assert solver.meta["model_fingerprint"] == span.fingerprint()
    assert solver.meta["end"] == "data"  # it ends where the whole range does
    assert hist["best_val_psnr"] >= hist["val_psnr"][0]
    path = tmp_path / "s.json"
    solver.save(path)
    bns.NSSolver.load(path, model=span, guidance=2.0)
    with pytest.raises(SolverFileError, match=r"model.span\(0.4, 0.999\)"):
        bns.NSSolver.load(path, model=model)
    # A span that hands over inside the path ends there, never with a step to the data.
    base, _ = bns.distill(model, 2, span=":0.6", cache=cache, progress=False, **TINY)
    assert base.meta["end"] == "range" and float(base.times[-1]) == 0.6
    with pytest.raises(bns.TrainingError, match="ends inside the path"):
        bns.distill(model, 2, span=":0.6", end="data", cache=cache, progress=False, **TINY)
    for bad, match in [("0.7:0.2", "start before"), ("a:", "numbers"), ("0.2", "T0:T1")]:
        with pytest.raises(bns.TrainingError, match=match):
            bns.distill(model, 2, span=bad, cache=cache, progress=False, **TINY)
    with pytest.raises(bns.TrainingError, match="span of user-eps"):
        bns.distill(model, 2, span=":1.0", cache=cache, progress=False, **TINY)


def test_the_estimate_counts_the_samples_a_span_starts_from(tmp_path):
    model, _ = _user_model(tmp_path)
    cfg = dict(cache=tmp_path / "cache", **TINY, gn_steps=0, repeats=1)
    whole = bns.estimate_cost(model, 4, **cfg)
    span = bns.estimate_cost(model, 4, span="0.5:", **cfg)
    gt = ("ground_truth_train", "ground_truth_val")
    # The span's own solve is shorter, but it needs the whole range's samples first.
    assert all(span.phases[k].forwards > whole.phases[k].forwards for k in gt)
    make_pairs(model, 8, "train", cache=tmp_path / "cache", progress=False, end="data")
    cached = bns.estimate_cost(model, 4, span="0.5:", **cfg)
    assert cached.phases["ground_truth_train"].forwards < span.phases["ground_truth_train"].forwards


# -- the command line ----------------------------------------------------------------------------


def test_span_through_the_command_line(tmp_path, capsys):
    model, spec = _user_model(tmp_path)
    common = ["--model", spec, "--cache-dir", str(tmp_path / "cache"), "--quiet"]
    out = tmp_path / "img2img.json"
    args = ["distill", *common, "--nfe", "4", "--span", "0.4:", "--out", str(out)]
    args += ["--train-pairs", "8", "--val-pairs", "8", "--adam-steps", "3", "--batch-size", "4"]
    assert main(args) == 0, capsys.readouterr().err
    assert bns.NSSolver.load(out).meta["span"]["start"] == "noised data"
    # eval takes the solver's span: baselines and ground truth on the same part of the path.
    js = tmp_path / "r.json"
    ev = ["eval", *common, "--solver", str(out), "--baselines", "euler", "--nfe", "4"]
    assert main(ev + ["--test-pairs", "4", "--json", str(js), "--grids", "default"]) == 0
    result = json.loads(js.read_text())
    assert result["model_fingerprint"] == model.span(0.4).fingerprint()
    assert {r["solver"] for r in result["rows"]} == {"euler", "img2img"}
    # sample starts from the given clean samples, noised to the span's start.
    data = torch.randn(2, DIM)
    torch.save(data, tmp_path / "data.pt")
    pt = tmp_path / "x.pt"
    smp = ["sample", *common, "--solver", str(out), "--n", "3", "--labels", "1", "--seed", "5"]
    assert main(smp + ["--data", str(tmp_path / "data.pt"), "--out", str(pt)]) == 0
    x = torch.load(pt)
    g = torch.Generator().manual_seed(5)
    span = model.span(0.4)
    x0 = span.start_state(data[[0, 1, 0]], torch.randn((3, DIM), generator=g))
    with torch.no_grad():
        ref = bns.sample(span, x0, bns.NSSolver.load(out), torch.ones(3, dtype=torch.long))
    assert torch.allclose(x, ref.float(), atol=1e-6)
    capsys.readouterr()


def test_one_solver_for_a_range_of_guidance_over_a_span(tmp_path, capsys):
    """Image-to-image with CFG between 1 and 3: every scale's pairs start from noised samples
    of the whole range at that scale; the file records the span, and eval and sample take it."""
    model, spec = _user_model(tmp_path)
    span, cache = model.span(0.4), tmp_path / "cache"
    kw = dict(TINY, adam_steps=0, cache=cache, progress=False)
    start, hist = bns.distill_guidance_range(model, 4, [1, 3], span="0.4:", **kw)
    assert float(start.at(2.0).times[0]) == 0.4 and start.meta["span"] == span.span_info()
    assert start.meta["model_fingerprint"] == span.fingerprint()
    # Its validation is on the span's pairs: the mean over the scales of each one's PSNR.
    val = {w: make_pairs(span, 8, "val", guidance=w, cache=cache, progress=False) for w in (1, 3)}
    psnr = [bns.evaluate.evaluate_psnr(span, start.at(w), val[w], w).mean() for w in (1, 3)]
    assert hist["val_psnr"][0] == pytest.approx(float(sum(psnr) / 2), abs=1e-6)
    # The command line: distill, then eval and sample find the span in the file.
    common = ["--model", spec, "--cache-dir", str(cache), "--quiet"]
    out = tmp_path / "range.json"
    argv = ["distill", *common, "--nfe", "4", "--guidance-range", "1,3", "--span", "0.4:"]
    argv += ["--train-pairs", "8", "--val-pairs", "8", "--init-pairs", "8", "--adam-steps", "4"]
    assert main([*argv, "--batch-size", "4", "--val-every", "2", "--out", str(out)]) == 0
    rs = GuidanceRangeSolver.load(out, model=span)
    assert rs.meta["span"] == span.span_info() and rs.meta["steps_run"] == 4
    with pytest.raises(SolverFileError, match=r"use it with model.span\(0.4, 0.999\)"):
        GuidanceRangeSolver.load(out, model=model)
    js = tmp_path / "r.json"
    ev = ["eval", *common, "--solver", str(out), "--guidance", "2", "--baselines", "euler"]
    assert main([*ev, "--nfe", "4", "--test-pairs", "4", "--json", str(js)]) == 0
    assert json.loads(js.read_text())["model_fingerprint"] == span.fingerprint()
    data = torch.randn(2, DIM)
    torch.save(data, tmp_path / "data.pt")
    pt = tmp_path / "x.pt"
    smp = ["sample", *common, "--solver", str(out), "--guidance", "2", "--n", "2"]
    assert main([*smp, "--labels", "1", "--data", str(tmp_path / "data.pt"), "--out", str(pt)]) == 0
    x0 = span.start_state(data, torch.randn((2, DIM), generator=torch.Generator().manual_seed(0)))
    with torch.no_grad():
        want = bns.sample(span, x0, rs.at(2.0), torch.ones(2, dtype=torch.long), 2.0)
    assert torch.allclose(torch.load(pt), want.float(), atol=1e-6)
    capsys.readouterr()


def test_span_command_line_refusals(tmp_path, capsys):
    _, spec = _user_model(tmp_path)
    common = ["--model", spec, "--cache-dir", str(tmp_path / "cache"), "--quiet"]
    out = tmp_path / "s.json"

    def distill(path) -> list[str]:
        args = ["distill", *common, "--nfe", "2", "--out", str(path), "--adam-steps", "1"]
        return args + ["--train-pairs", "4", "--val-pairs", "4", "--batch-size", "4"]

    base = distill(out)

    def error(args) -> str:
        assert main(args) != 0
        err = capsys.readouterr().err.strip()
        assert "Traceback" not in err and len(err.splitlines()) == 1, err
        return err

    with pytest.raises(SystemExit):  # argparse's own refusal, as for every malformed option
        main(base + ["--span", "0.2:1.5"])
    assert "flow times in [0, 1], got '1.5'" in capsys.readouterr().err
    assert "span of user-eps" in error(base + ["--span", ":1.0"])
    assert not out.exists()
    assert main(base + ["--span", "0.5:"]) == 0, capsys.readouterr().err
    pt = tmp_path / "x.pt"
    smp = ["sample", *common, "--solver", str(out), "--out", str(pt)]
    assert "pass --data" in error(smp)
    torch.save(torch.randn(2, DIM + 1), tmp_path / "bad.pt")
    assert "expected a tensor [K, 4]" in error(smp + ["--data", str(tmp_path / "bad.pt")])
    torch.save(torch.full((2, DIM), float("nan")), tmp_path / "nan.pt")
    assert "NaN" in error(smp + ["--data", str(tmp_path / "nan.pt")])
    (tmp_path / "junk.pt").write_text("not a tensor")
    assert "cannot read" in error(smp + ["--data", str(tmp_path / "junk.pt")])
    assert "no such file" in error(smp + ["--data", str(tmp_path / "none.pt")])
    assert not pt.exists()
    # A whole-range solver has no use for --data.
    whole = tmp_path / "whole.json"
    assert main(distill(whole)) == 0
    assert "starts from noise" in error(
        [
            "sample",
            *common,
            "--solver",
            str(whole),
            "--data",
            str(tmp_path / "bad.pt"),
            "--out",
            str(pt),
        ]
    )
    ev = ["eval", *common, "--solver", str(out), str(whole), "--json", str(tmp_path / "r.json")]
    assert "different parts of the path" in error(ev)
