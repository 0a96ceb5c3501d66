"""The command line: the three commands end to end, and one clear line for every bad input."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import bns
from bns.cli import main

MODEL_FILE = """
from bns.models.gmm import gaussian_mixture_model
def small():
    return gaussian_mixture_model(dim=8, components=3, num_classes=None, std=0.2, seed={seed},
                                  name="small")
def not_a_model():
    return 42
def img():
    import torch
    from bns import Model
    from bns.models.gmm import GaussianMixtureNet
    from bns.schedules import CondOT
    g = torch.Generator().manual_seed(0)
    means = 0.5 * torch.randn(3, 16, generator=g, dtype=torch.float64)
    net = GaussianMixtureNet(means, torch.full((3,), 0.2), torch.ones(3) / 3, torch.arange(3),
                             CondOT(), "velocity", sample_shape=(1, 4, 4), num_classes=3)
    return Model(net, "velocity", CondOT(), (1, 4, 4), num_classes=3, name="img")
"""


@pytest.fixture()
def env(tmp_path, monkeypatch):
    monkeypatch.setenv("BNS_CACHE_DIR", str(tmp_path / "cache"))
    (tmp_path / "m.py").write_text(MODEL_FILE.format(seed=0))
    (tmp_path / "other.py").write_text(MODEL_FILE.format(seed=1))
    return tmp_path


def _distill(env, out, *extra):
    return main(
        [
            "distill",
            "--model",
            f"{env / 'm.py'}:small",
            "--nfe",
            "4",
            "--train-pairs",
            "16",
            "--val-pairs",
            "8",
            "--adam-steps",
            "6",
            "--val-every",
            "3",
            "--batch-size",
            "8",
            "--quiet",
            "--out",
            str(out),
            *extra,
        ]
    )


def test_distill_eval_sample_end_to_end(env, capsys):
    out = env / "s.json"
    assert _distill(env, out) == 0
    assert "validation PSNR" in capsys.readouterr().out
    solver = bns.NSSolver.load(out)
    assert solver.nfe == 4 and solver.meta["model_name"] == "small"
    assert not out.with_name("s.json.ckpt").exists()

    js = env / "r.json"
    assert (
        main(
            [
                "eval",
                "--model",
                f"{env / 'm.py'}:small",
                "--solver",
                str(out),
                "--baselines",
                "euler,midpoint",
                "--nfe",
                "2,4",
                "--test-pairs",
                "8",
                "--quiet",
                "--json",
                str(js),
                "--plot",
                str(env / "p.png"),
            ]
        )
        == 0
    )
    rows = json.loads(js.read_text())["rows"]
    got = {(r["solver"], r["nfe"]) for r in rows}
    # the solver file's row is named by its stem (s.json: "s"), kind "bns"
    assert got == {("euler", 2), ("euler", 4), ("midpoint", 2), ("midpoint", 4), ("s", 4)}
    assert {r["solver"] for r in rows if r["kind"] == "bns"} == {"s"}
    for r in rows:
        assert {"solver", "nfe", "psnr_mean", "psnr_std"} <= set(r) and len(r["psnr_samples"]) == 8
    assert (env / "r.md").read_text().count("| euler |") == 1
    assert (env / "p.png").stat().st_size > 1000
    assert "bns eval" in capsys.readouterr().out

    pt = env / "x.pt"
    assert (
        main(
            [
                "sample",
                "--model",
                f"{env / 'm.py'}:small",
                "--solver",
                str(out),
                "--n",
                "5",
                "--out",
                str(pt),
            ]
        )
        == 0
    )
    x = torch.load(pt)
    assert x.shape == (5, 8) and torch.all(torch.isfinite(x))


def _error(capsys, argv):
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    return err


def test_bad_inputs_end_with_one_clear_line(env, capsys):
    m = f"{env / 'm.py'}:small"
    assert "unknown model" in _error(
        capsys, ["distill", "--model", "nope", "--nfe", "4", "--out", str(env / "a.json")]
    )
    assert "not found" in _error(
        capsys, ["distill", "--model", "missing.py:f", "--nfe", "4", "--out", str(env / "a.json")]
    )
    assert "did not give a bns.Model" in _error(
        capsys,
        [
            "distill",
            "--model",
            f"{env / 'm.py'}:not_a_model",
            "--nfe",
            "4",
            "--out",
            str(env / "a.json"),
        ],
    )
    assert "solver file not found" in _error(
        capsys,
        ["sample", "--model", m, "--solver", str(env / "none.json"), "--out", str(env / "g.png")],
    )
    bad = env / "bad.json"
    bad.write_text("{not json")
    assert "cannot read solver file" in _error(
        capsys, ["eval", "--model", m, "--solver", str(bad), "--json", str(env / "e.json")]
    )
    assert not (env / "e.json").exists()

    good = env / "s.json"
    assert _distill(env, good) == 0
    capsys.readouterr()
    content = good.read_text()
    # An existing artifact is never overwritten by accident.
    assert "exists" in _error(capsys, ["distill", "--model", m, "--nfe", "4", "--out", str(good)])
    assert good.read_text() == content
    # --resume continues an interrupted run: on a finished one (no OUT.ckpt) it is refused,
    # whatever the settings (it once replaced an NFE 4 solver with an NFE 5 one, silently).
    for nfe in ("4", "5"):
        argv = ["distill", "--model", m, "--nfe", nfe, "--out", str(good), "--resume"]
        assert "its run finished, there is nothing to resume" in _error(capsys, argv)
        assert good.read_text() == content
    # A solver of another model, or another guidance, is refused.
    assert "trained for model" in _error(
        capsys,
        [
            "sample",
            "--model",
            f"{env / 'other.py'}:small",
            "--solver",
            str(good),
            "--out",
            str(env / "x.pt"),
        ],
    )
    # A tampered solver is refused.
    d = json.loads(content)
    d["a"][0] = 0.5
    (env / "t.json").write_text(json.dumps(d))
    assert "checksum" in _error(
        capsys,
        ["sample", "--model", m, "--solver", str(env / "t.json"), "--out", str(env / "x.pt")],
    )
    assert "unconditional" in _error(
        capsys,
        ["distill", "--model", m, "--nfe", "4", "--guidance", "3", "--out", str(env / "c.json")],
    )
    assert "multiple of 2" in _error(
        capsys,
        ["distill", "--model", m, "--nfe", "3", "--init", "midpoint", "--out", str(env / "c.json")],
    )
    assert "not images" in _error(
        capsys, ["sample", "--model", m, "--solver", str(good), "--out", str(env / "x.png")]
    )
    assert not (env / "c.json").exists()


def test_console_script_runs_as_a_process(env):
    exe = Path(sys.executable).with_name("bns")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "bns.cli"]
    r = subprocess.run(
        cmd + ["sample", "--model", "nope", "--solver", "x", "--out", "y"],
        capture_output=True,
        text=True,
        env=dict(os.environ),
    )
    assert r.returncode == 2 and r.stderr.startswith("bns sample: error:")
    assert "Traceback" not in r.stderr


def test_a_warning_on_the_command_line_is_one_line_in_the_commands_name(env):
    """bns's own warning says what it says; the network's says its kind and where."""
    spec = importlib.util.spec_from_file_location("user_models", env / "m.py")
    user = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(user)
    solver = bns.solvers.by_name("euler", 2, user.img())
    solver.meta["guidance"] = 2.0  # as if trained at 2
    solver.save(env / "g2.json")
    noisy = env / "noisy.py"
    noisy.write_text(
        MODEL_FILE.format(seed=0)
        + "def loud():\n    import warnings\n    m = img()\n    f = m.net.forward\n"
        + "    def forward(*a):\n        warnings.warn('the net\\nsays hi')\n        return f(*a)\n"
        + "    m.net.forward = forward\n    return m\n"
    )
    at = [i for i, t in enumerate(noisy.read_text().splitlines(), 1) if "warnings.warn" in t]
    exe = Path(sys.executable).with_name("bns")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "bns"]
    argv = ["sample", "--solver", str(env / "g2.json"), "--guidance", "1", "--force", "--n", "2"]
    r = subprocess.run(
        cmd + argv + ["--model", f"{noisy}:loud", "--out", str(env / "x.pt")],
        capture_output=True,
        text=True,
        env=dict(os.environ),
    )
    assert r.returncode == 0, r.stderr
    lines = r.stderr.splitlines()
    assert lines == [
        "bns sample: warning: sampling at guidance 1 with a solver trained for 2: its"
        " coefficients fit 2",
        f"bns sample: warning: UserWarning: the net says hi ({noisy}:{at[0]})",
    ], r.stderr


def test_demo_quick_on_the_analytic_model(env, capsys):
    out = env / "demo"
    assert (
        main(
            ["demo", "--quick", "--model", "gmm", "--guidance", "1.5", "--out", str(out), "--quiet"]
        )
        == 0
    )
    res = json.loads((out / "results.json").read_text())
    names = {r["solver"] for r in res["rows"]}
    assert "bns" in names and "init (midpoint@uniform)" in names and "euler" in names
    assert (out / "results.md").exists() and (out / "psnr_vs_nfe.png").exists()
    assert bns.NSSolver.load(out / "bns_nfe8.json").meta["guidance"] == 1.5


def test_image_model_grids_from_eval_and_sample(env, capsys):
    m = f"{env / 'm.py'}:img"
    out = env / "img.json"
    assert (
        main(
            [
                "distill",
                "--model",
                m,
                "--nfe",
                "4",
                "--guidance",
                "2",
                "--train-pairs",
                "8",
                "--val-pairs",
                "4",
                "--adam-steps",
                "2",
                "--val-every",
                "1",
                "--quiet",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    grid = env / "cmp.png"
    assert (
        main(
            [
                "eval",
                "--model",
                m,
                "--solver",
                str(out),
                "--baselines",
                "euler,dpmpp2m",
                "--nfe",
                "4",
                "--test-pairs",
                "8",
                "--quiet",
                "--json",
                str(env / "e.json"),
                "--samples",
                str(grid),
            ]
        )
        == 0
    )
    assert grid.stat().st_size > 1000
    assert json.loads((env / "e.json").read_text())["guidance"] == 2  # the solver's, not 1
    png = env / "s.png"
    assert (
        main(
            [
                "sample",
                "--model",
                m,
                "--guidance",
                "2",
                "--solver",
                str(out),
                "--n",
                "6",
                "--labels",
                "0,2",
                "--out",
                str(png),
            ]
        )
        == 0
    )
    assert png.stat().st_size > 1000
    # Without --guidance, sample runs at the solver's scale: the samples of --guidance 2.
    smp = ["sample", "--model", m, "--solver", str(out), "--n", "3"]
    assert main([*smp, "--out", str(env / "a.pt")]) == 0
    assert main([*smp, "--guidance", "2", "--out", str(env / "b.pt")]) == 0
    a, b = torch.load(env / "a.pt"), torch.load(env / "b.pt")
    assert torch.equal(a, b)
    assert main([*smp, "--guidance", "1", "--force", "--out", str(env / "u.pt")]) == 0
    assert (torch.load(env / "u.pt") - a).abs().max() > 1e-3  # (the scale matters here)
    err = _error(capsys, [*smp, "--guidance", "3", "--out", str(env / "c.pt")])
    assert "trained for guidance 2, asked for 3" in err
    # Solvers of two scales in one eval: --guidance says which.
    one = env / "g1.json"
    distill1 = ["distill", "--model", m, "--nfe", "4", "--train-pairs", "8", "--val-pairs", "4"]
    distill1 += ["--adam-steps", "2", "--val-every", "1", "--quiet", "--out", str(one)]
    assert main(distill1) == 0
    ev = ["eval", "--model", m, "--solver", str(out), str(one), "--baselines", "euler"]
    ev += ["--nfe", "4", "--test-pairs", "4", "--quiet", "--json", str(env / "two.json")]
    assert "trained at different guidance scales (1, 2): pass --guidance W" in _error(capsys, ev)
    assert not (env / "two.json").exists()
    # A solver file that records no scale (a classical one saved by hand) fits any: no conflict.
    from bns.specs import load_model

    bns.solvers.by_name("euler", 4, load_model(m)).save(env / "plain.json")
    ev[ev.index(str(one))] = str(env / "plain.json")
    assert main(ev) == 0
    assert json.loads((env / "two.json").read_text())["guidance"] == 2


def test_eval_batch_sizes_change_memory_not_results(env, tmp_path_factory, monkeypatch, capsys):
    out = env / "s.json"
    assert _distill(env, out) == 0

    def rows(tag, *sizes):
        js = env / f"{tag}.json"
        argv = [
            "eval",
            "--model",
            f"{env / 'm.py'}:small",
            "--solver",
            str(out),
            "--baselines",
            "midpoint",
            "--nfe",
            "4",
            "--test-pairs",
            "8",
            "--quiet",
            "--json",
            str(js),
        ]
        assert main(argv + list(sizes)) == 0
        found = json.loads(js.read_text())["rows"]
        return {(r["solver"], r["nfe"]): torch.tensor(r["psnr_samples"]) for r in found}

    ref = rows("default")
    small = rows("small", "--eval-batch-size", "3")  # same cached ground truth
    assert ref.keys() == small.keys()
    assert all(torch.allclose(ref[k], small[k], rtol=1e-6) for k in ref)
    # Ground truth solved 3 pairs at a time (a fresh cache): the adaptive steps differ with
    # the batch, so the pairs agree to the tolerance, not bit for bit.
    monkeypatch.setenv("BNS_CACHE_DIR", str(tmp_path_factory.mktemp("gt3")))
    gt3 = rows("gt3", "--gt-batch-size", "3")
    assert all((ref[k] - gt3[k]).abs().max() < 0.05 for k in ref)
    capsys.readouterr()
    bad = [
        "eval",
        "--model",
        f"{env / 'm.py'}:small",
        "--baselines",
        "midpoint",
        "--eval-batch-size",
        "0",
        "--json",
        str(env / "z.json"),
    ]
    assert main(bad) == 2
    assert "--eval-batch-size must be a positive integer" in capsys.readouterr().err
    assert not (env / "z.json").exists()


def test_eval_rows_are_named_by_their_solver_files(env, capsys):
    """Two solver files in one eval: each row says which file it is (its stem, its folder where
    stems agree, or --name), and names that would be ambiguous are refused."""
    import shutil

    s = env / "s.json"
    assert _distill(env, s) == 0
    for sub in ("a", "b"):
        (env / sub).mkdir()
        shutil.copy(s, env / sub / "s.json")
    shutil.copy(s, env / "fast.json")
    base = ["eval", "--model", f"{env / 'm.py'}:small", "--nfe", "4", "--baselines", "euler"]
    base += ["--test-pairs", "8", "--quiet"]

    def rows(*argv):
        js = env / "e.json"
        assert main([*base, *argv, "--json", str(js)]) == 0
        return [r["solver"] for r in json.loads(js.read_text())["rows"] if r["kind"] == "bns"]

    assert rows("--solver", str(s), str(env / "fast.json")) == ["s", "fast"]
    assert rows("--solver", str(env / "a" / "s.json"), str(env / "b" / "s.json")) == ["a/s", "b/s"]
    assert rows("--solver", str(s), str(env / "fast.json"), "--name", "one,two") == ["one", "two"]
    out = capsys.readouterr().out
    assert "one nfe=4:" in out and "vs best classical euler" in out
    # a solver whose NFE has no baseline row: said, with what to add
    js = env / "e2.json"
    base2 = [a if a != "4" else "2" for a in base]
    assert main([*base2, "--solver", str(s), "--json", str(js)]) == 0
    assert "s nfe=4: no baseline at NFE 4 to compare with (--nfe 2): add 4 to --nfe" in (
        capsys.readouterr().out
    )
    for argv, says in [
        (["--solver", str(s), "--name", "x,y"], "one distinct name per --solver file"),
        (["--solver", str(s), str(s)], "names one file twice"),
        (["--solver", str(s), "--name", "euler"], "classical solvers' names"),
    ]:
        assert main([*base, *argv, "--json", str(env / "x.json")]) == 2
        err = capsys.readouterr().err
        assert says in err and len(err.strip().splitlines()) == 1
        assert not (env / "x.json").exists()


@pytest.mark.parametrize(
    "argv, said",
    [
        (["distill", "--model", "gmm", "--nfe", "4", "--guidence", "2", "--out", "x.json"],
         "bns distill: error: unrecognized arguments: --guidence 2; did you mean --guidance?"),
        (["distill", "--model", "gmm", "--nfe", "four", "--out", "x.json"],
         "bns distill: error: argument --nfe: invalid"),
        (["comfyui", "install", "--forse", "x"],
         "bns comfyui install: error: unrecognized argument: --forse; did you mean --force?"),
        (["distil"], "bns: error: argument command: invalid choice: 'distil'"),
        (["--quiet", "demo"], "bns demo: error: unrecognized argument: --quiet; --quiet goes after 'bns demo'"),
    ],
)  # fmt: skip
def test_a_bad_option_is_one_line_naming_the_nearest(argv, said, capsys):
    """argparse's own refusals, as every other bad input: one line (no usage block), in the
    command's name, with the nearest known option for a misspelled one."""
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith(said) and len(err.splitlines()) == 1, err
    assert err.rstrip().endswith("--help)")


def test_every_option_of_every_command_says_what_it_does():
    """--help is where a user looks: no option without a help text, and a default said once."""
    import argparse

    from bns.cli import _subcommands, build_parser

    missing, twice = [], []
    todo = [build_parser()]
    while todo:
        parser = todo.pop()
        todo += _subcommands(parser).values()
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction) or not action.option_strings:
                continue
            text = action.help or ""
            if not text.strip():
                missing.append(f"{parser.prog} {action.option_strings[0]}")
            if text.count("(default:") > 1:
                twice.append(f"{parser.prog} {action.option_strings[0]}")
    assert not missing, missing
    assert not twice, twice


def test_bns_debug_shows_the_traceback_and_0_turns_it_off(env, monkeypatch, capsys):
    argv = ["sample", "--model", "gmm", "--solver", str(env / "none.json"), "--out", "x.pt"]
    monkeypatch.setenv("BNS_DEBUG", "1")
    with pytest.raises(bns.SolverFileError, match="solver file not found"):
        main(argv)
    monkeypatch.setenv("BNS_DEBUG", "0")
    assert main(argv) == 2
    assert capsys.readouterr().err.startswith("bns sample: error: solver file not found")
