"""A network that fails part-way (NaN or inf for t > 0.5, an exception, the wrong shape or
dtype) ends every phase with one clear line: what the network did, at which flow time, in
which phase; and it leaves nothing behind in the ground-truth cache or at the output path."""

from __future__ import annotations

import pickle
import re
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

import bns
from bns.cli import main
from bns.evaluate import evaluate_psnr
from bns.families import make_family
from bns.loss import loss_and_grad
from bns.model import NetworkError, NonFiniteVelocity
from bns.pairs import make_pairs

D = 4
TINY = dict(train_pairs=8, val_pairs=8, init_pairs=8, val_every=2, batch_size=4)


class FaultyNet(nn.Module):
    """A float32 velocity net as users write it; from ``fail_after`` calls on (0: at once),
    ``fault`` where t > 0.5: "nan", "inf", "raise", "shape", "int"; "float64" always returns
    float64. ``fault = None`` is a healthy net."""

    def __init__(self, fault: str | None = "nan", fail_after: int = 0) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(D + 1, D)
        self.fault, self.fail_after, self.calls = fault, fail_after, 0

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        out = 0.1 * self.lin(torch.cat([x, t[:, None].to(x.dtype)], 1))
        if self.fault is None or self.calls <= self.fail_after:
            return out
        if self.fault == "float64":
            return out.double()
        bad = t > 0.5
        if self.fault in ("nan", "inf"):
            return torch.where(bad[:, None], float(self.fault), out)
        if not bool(bad.any()):
            return out
        if self.fault == "raise":
            raise RuntimeError("boom\nsecond line")
        if self.fault == "shape":
            return out[:, :-1]
        if self.fault == "int":
            return out.long()
        raise AssertionError(self.fault)


def _model(net: nn.Module) -> bns.Model:
    return bns.Model(net, "velocity", bns.schedules.CondOT(), (D,), name="faulty")


def _euler4() -> bns.NSSolver:
    return bns.solvers.euler(bns.grids.uniform(4, (0.0, 1.0)))  # evaluates t = 0 .. 0.75


def _time(msg: str) -> float:
    m = re.search(r"at flow time t = ([0-9.e+-]+) during ", msg)
    assert m, msg
    return float(m.group(1))


def _check(e: BaseException, phase: str, kind: str = "NaN", t: float | None = None) -> str:
    """The error names ``kind``, a flow time past 0.5 (``t`` exactly) and ``phase``."""
    msg = str(e)
    assert isinstance(e, bns.ModelError) and "\n" not in msg, msg
    assert kind in msg and f"during {phase}" in msg, msg
    assert _time(msg) > 0.5 if t is None else _time(msg) == pytest.approx(t), msg
    return msg


def _files(folder) -> list:
    return [p for p in folder.rglob("*") if p.is_file()]


# -- the check itself ------------------------------------------------------------------------
def test_message_format_and_pickling():
    model = _model(FaultyNet("nan"))
    with pytest.raises(NonFiniteVelocity) as info:
        model.velocity(torch.randn(3, D), 0.75)
    assert str(info.value) == (
        "faulty: the network returned NaN at flow time t = 0.75 (3 of 3 outputs, for finite inputs)"
    )
    info.value.phase = "sampling"
    again = pickle.loads(pickle.dumps(info.value))
    assert type(again) is NonFiniteVelocity and str(again) == str(info.value)
    assert "at flow time t = 0.75 during sampling (3 of 3" in str(again)
    # Per-sample times: the time of the first faulty sample is named.
    with pytest.raises(NonFiniteVelocity, match=r"t = 0\.6 .*1 of 2 outputs"):
        model.velocity(torch.randn(2, D), torch.tensor([0.2, 0.6]))


def test_nonfinite_inputs_and_diverged_states_are_not_blamed_on_the_network():
    """NaN in, NaN out (a diverged solver: training skips the step), and so is an overflow on a
    huge state; both pass through for the caller to handle."""
    model = _model(FaultyNet(None))
    x = torch.randn(2, D)
    x[0, 1] = float("nan")
    u = model.velocity(x, 0.3)
    assert torch.isnan(u[0]).all() and torch.isfinite(u[1]).all()

    huge = _model(lambda x, t: x * 1e35)  # overflows to inf on a diverged state of 1e6 and more
    assert torch.isinf(huge.velocity(torch.full((1, D), 1e7), 0.3)).all()
    with pytest.raises(NonFiniteVelocity, match="inf"):
        huge.velocity(torch.full((1, D), 1e4), 0.3)


def test_an_optimizer_step_with_diverged_coefficients_is_skipped_not_raised():
    model = _model(FaultyNet(None))
    init = _euler4()
    pairs = make_pairs(model, 4, "train", cache=False, progress=False)
    family = make_family("bns", init)
    with torch.no_grad():
        for p in family.parameters():
            p.fill_(1e30)  # the solver blows up; the network is fine
    loss, grads = loss_and_grad(family, model, pairs, 1.0)
    assert grads is None and loss != loss


# -- ground truth ----------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["nan", "inf"])
def test_ground_truth_names_nan_the_time_and_the_phase(kind, tmp_path):
    model = _model(FaultyNet(kind))
    with pytest.raises(NonFiniteVelocity) as info:
        bns.ground_truth(model, torch.randn(2, D))  # not torchdiffeq's "underflow in dt"
    _check(info.value, "ground truth", {"nan": "NaN", "inf": "inf"}[kind])
    with pytest.raises(NonFiniteVelocity) as info:
        make_pairs(model, 4, "train", cache=tmp_path, progress=False)
    _check(info.value, "ground truth (train)", {"nan": "NaN", "inf": "inf"}[kind])
    assert _files(tmp_path) == []


def test_a_network_failing_in_a_later_batch_leaves_no_shard(tmp_path):
    probe = FaultyNet(None)
    make_pairs(_model(probe), 2, "val", batch_size=2, cache=False, progress=False)
    net = FaultyNet("nan", fail_after=probe.calls)  # the first batch of 2 pairs is fine
    with pytest.raises(NonFiniteVelocity) as info:
        make_pairs(_model(net), 4, "val", batch_size=2, cache=tmp_path, progress=False)
    _check(info.value, "ground truth (val)")
    assert net.calls > probe.calls  # the second batch ran after the first was kept as a shard
    assert _files(tmp_path) == [] and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "fault,match",
    [
        (
            "raise",
            r"raised RuntimeError at flow time t = 0\.\d+ during ground truth \(test\): boom$",
        ),
        ("shape", r"returned \[\d, 3\] for an input of shape \[\d, 4\] at flow time"),
        ("int", r"returned int64 values at flow time t = 0\.\d+ during ground truth \(test\)"),
    ],
)
def test_a_network_that_raises_or_returns_the_wrong_thing(fault, match, tmp_path):
    with pytest.raises(NetworkError, match=match) as info:
        make_pairs(_model(FaultyNet(fault)), 2, "test", cache=tmp_path, progress=False)
    assert "\n" not in str(info.value) and _files(tmp_path) == []
    if fault == "raise":
        assert isinstance(info.value.__cause__, RuntimeError)  # the original, for tracebacks


def test_float64_output_of_a_float32_network_is_used():
    x0 = torch.randn(3, D)
    x = bns.sample(_model(FaultyNet("float64")), x0, _euler4())
    ref = bns.sample(_model(FaultyNet(None)), x0, _euler4())
    assert x.dtype == torch.float32 and torch.equal(x, ref)


# -- sampling and evaluation ------------------------------------------------------------------
@pytest.mark.parametrize("grad", [False, True], ids=["no-grad", "grad"])
def test_sample_names_the_time_and_phase(grad):
    x0 = torch.randn(3, D, requires_grad=grad)
    with pytest.raises(NonFiniteVelocity) as info:
        bns.sample(_model(FaultyNet("nan")), x0, _euler4())
    _check(info.value, "sampling", t=0.75)
    with pytest.raises(NetworkError) as info:
        bns.sample(_model(FaultyNet("raise")), x0, _euler4())
    assert str(info.value) == (
        "faulty: the network raised RuntimeError at flow time t = 0.75 during sampling: boom"
    )


def test_evaluate_psnr_names_evaluation():
    model = _model(FaultyNet(None))
    test = make_pairs(model, 4, "test", cache=False, progress=False)
    model.net.fault = "inf"
    with pytest.raises(NonFiniteVelocity) as info:
        evaluate_psnr(model, _euler4(), test)
    _check(info.value, "evaluation", "inf", t=0.75)


# -- distillation ------------------------------------------------------------------------------
def _pairs(model):
    kw = dict(cache=False, progress=False)
    return make_pairs(model, 8, "train", **kw), make_pairs(model, 8, "val", **kw)


@pytest.mark.parametrize(
    "when,phase",
    [
        ("ranking", "ranking of the initial solvers"),
        ("validation", "validation"),
        ("adam", "an optimizer step"),
        ("gauss-newton", "an optimizer step"),
    ],
)
def test_distill_names_the_phase(when, phase):
    net = FaultyNet(None)
    model = _model(net)
    pairs = _pairs(model)  # ground truth of a healthy network
    kw = dict(TINY, pairs=pairs, cache=False, progress=False, adam_steps=2, gn_steps=0)
    if when == "ranking":
        kw.update(init="best")
    else:
        kw.update(init="euler")  # one candidate: no ranking, validation comes first
    if when == "gauss-newton":
        kw.update(adam_steps=0, gn_steps=2)

    def turn_bad(step, record):  # after the validation of the initial solver
        net.fault = "nan"

    if when in ("adam", "gauss-newton"):
        kw.update(callback=turn_bad)
    else:
        net.fault = "nan"
    with pytest.raises(NonFiniteVelocity) as info:
        bns.distill(model, 4, **kw)
    _check(info.value, phase)


# -- the command line ----------------------------------------------------------------------------
_FACTORY = """
import torch
from torch import nn
import bns

class Net(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear({dim} + 1, {dim})

    def forward(self, x, t):
        out = 0.1 * self.lin(torch.cat([x, t[:, None].to(x.dtype)], 1))
        return torch.where((t > 0.5)[:, None], float("nan"), out)

def nan_net():
    return bns.Model(Net(), "velocity", bns.schedules.CondOT(), ({dim},), name="nan-net")
"""


def test_cli_distill_with_a_nan_network_writes_nothing(tmp_path, capsys):
    src = tmp_path / "user_model.py"
    src.write_text(textwrap.dedent(_FACTORY.format(dim=D)))
    cache, out = tmp_path / "cache", tmp_path / "out" / "s.json"
    args = ["distill", "--model", f"{src}:nan_net", "--cache-dir", str(cache), "--quiet"]
    args += ["--nfe", "4", "--out", str(out), "--device", "cpu", "--train-pairs", "4"]
    args += ["--val-pairs", "4", "--adam-steps", "2", "--batch-size", "4"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert err.startswith("bns distill: error: nan-net: the network returned NaN at flow time")
    assert "during ground truth (train)" in err and _time(err) > 0.5
    assert not out.exists() and not out.with_name("s.json.ckpt").exists()
    assert not cache.exists() or _files(cache) == []


_TURNS_BAD = """
import torch
from torch import nn
import bns

class Net(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear({dim} + 1, {dim})
        self.grad_calls = 0

    def forward(self, x, t):
        out = 0.1 * self.lin(torch.cat([x, t[:, None].to(x.dtype)], 1))
        self.grad_calls += torch.is_grad_enabled()  # optimizer steps, not ground truth
        return out if self.grad_calls <= {ok_calls} else out * float("inf")

def net():
    return bns.Model(Net(), "velocity", bns.schedules.CondOT(), ({dim},), name="turns-bad")
"""


def test_cli_distill_whose_network_turns_bad_leaves_no_checkpoint(tmp_path, capsys):
    """The network fails in the third Adam step, after a checkpoint was written at the
    second: the run ends with one line, and neither the solver nor the checkpoint stays (a
    stale temporary file of a killed writer in the output folder goes too)."""
    src = tmp_path / "user_model.py"
    src.write_text(textwrap.dedent(_TURNS_BAD.format(dim=D, ok_calls=8)))  # 2 steps of 4
    out = tmp_path / "out" / "s.json"
    out.parent.mkdir()
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    ).stdout.strip()
    from bns._io import HOST

    stale = out.parent / f".s.json.ckpt.{dead}-{HOST}.{'ab' * 16}.tmp"
    stale.write_text("half a checkpoint")
    args = ["distill", "--model", f"{src}:net", "--cache-dir", str(tmp_path / "c"), "--quiet"]
    args += ["--nfe", "4", "--out", str(out), "--device", "cpu", "--train-pairs", "4"]
    args += ["--val-pairs", "4", "--init", "euler", "--adam-steps", "6", "--val-every", "2"]
    args += ["--gn-steps", "0", "--batch-size", "4"]
    saved = []
    real_save = bns.checkpoint.Checkpoint.save

    def save(self, state):
        saved.append(self.path)
        real_save(self, state)

    bns.checkpoint.Checkpoint.save = save
    try:
        assert main(args) == 2
    finally:
        bns.checkpoint.Checkpoint.save = real_save
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert "the network returned inf" in err and "during an optimizer step" in err, err
    assert saved == [out.with_name("s.json.ckpt")]  # one was written, at step 2
    assert list(out.parent.iterdir()) == []


def test_the_error_classes_are_part_of_the_public_api():
    assert bns.NonFiniteVelocity is bns.model.NonFiniteVelocity
    assert issubclass(bns.NonFiniteVelocity, bns.NetworkError)
    assert issubclass(bns.NetworkError, bns.ModelError) and issubclass(bns.ModelError, ValueError)
