"""The shape of the package: one source of settings, core modules that depend on nothing above
them, small classes in the trainer, and artifacts that keep loading."""

from __future__ import annotations

import ast
import json
from dataclasses import fields
from pathlib import Path

import pytest
import torch

import bns
from bns.cli import build_parser
from bns.config import DistillConfig, config_from_args

SRC = Path(bns.__file__).parent
ROOT = SRC.parents[1]

CORE = [
    "schedules",
    "model",
    "solver",
    "solvers",
    "grids",
    "transforms",
    "ground_truth",
    "_io",
    "_hashing",
    "errors",
]
ABOVE_CORE = {"train", "loss", "families", "checkpoint", "config", "evaluate", "report", "cli"}
ABOVE_CORE |= {"gauss_newton", "guidance_range", "distributed", "executor"}
ABOVE_CORE |= {"demo", "specs", "integrations", "pairs", "cost", "estimate", "budget", "classical"}


def _imports(path: Path) -> set[str]:
    """The top-level bns modules a file imports (``from ..x import``, ``from . import x``,
    ``import bns.x``), as names like ``"train"``."""
    package = list(path.relative_to(SRC).parent.parts)  # [] for bns/, ["solvers"] for a subpackage
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level == 0:
                if not (node.module or "").startswith("bns"):
                    continue
                parts = node.module.split(".")[1:]
            else:
                base = package[: len(package) - (node.level - 1)]
                parts = base + (node.module.split(".") if node.module else [])
            if parts:
                out.add(parts[0])
            else:
                out.update(a.name for a in node.names)
        elif isinstance(node, ast.Import):
            out.update(a.name.split(".")[1] for a in node.names if a.name.startswith("bns."))
    return out


def _files(name: str) -> list[Path]:
    p = SRC / name
    return sorted(p.rglob("*.py")) if p.is_dir() else [SRC / f"{name}.py"]


@pytest.mark.parametrize("name", CORE)
def test_core_modules_import_nothing_above_the_core(name):
    for path in _files(name):
        bad = _imports(path) & ABOVE_CORE
        assert not bad, f"{path.relative_to(SRC)} imports {sorted(bad)}"


def _reach(name: str) -> set[str]:
    """The bns modules ``name`` imports, directly or through others (lazy imports included)."""
    seen, todo = set(), [name]
    while todo:
        m = todo.pop()
        if m in seen or not (SRC / f"{m}.py").exists() and not (SRC / m).is_dir():
            continue
        seen.add(m)
        for path in _files(m):
            todo.extend(_imports(path))
    return seen - {name}


def test_only_the_executor_reaches_the_workers_module():
    """Ground truth, evaluation and training run their work through :mod:`bns.executor`; what
    torchrun adds (bns.distributed) is reached through it alone (and by the command line, which
    ends a worker's process)."""
    users = {p.stem for p in SRC.rglob("*.py") if "distributed" in _imports(p)}
    assert users <= {"executor", "cli"}, sorted(users)


def test_evaluation_does_not_import_training():
    training = {"train", "loss", "families", "checkpoint", "config", "gauss_newton"}
    assert not _reach("evaluate") & training, sorted(_reach("evaluate") & training)


@pytest.mark.parametrize(
    "name", ["train", "loss", "families", "checkpoint", "config", "gauss_newton"]
)
def test_trainer_classes_are_small(name):
    tree = ast.parse((SRC / f"{name}.py").read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef):
            size = node.end_lineno - node.lineno + 1
            assert size <= 120, f"{name}.{node.name} has {size} lines"


def test_command_line_defaults_are_the_config_defaults():
    args = build_parser().parse_args(["distill", "--model", "gmm", "--nfe", "6", "--out", "x"])
    assert DistillConfig(**config_from_args(args)) == DistillConfig(nfe=6)
    given = build_parser().parse_args(
        ["distill", "--model", "gmm", "--nfe", "6", "--out", "x", "--micro-batch", "4"]
        + ["--precondition", "none", "--grad-checkpoint", "--lr", "0.01"]
    )
    cfg = DistillConfig(**config_from_args(given))
    assert (cfg.micro_batch, cfg.precondition, cfg.grad_checkpoint, cfg.lr) == (4, None, True, 0.01)


def test_distill_help_shows_every_default(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["distill", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for f in fields(DistillConfig):
        flag = "--" + f.name.replace("_", "-")
        assert flag in text, flag
        if f.name != "nfe":
            shown = "none" if f.default is None else str(f.default)
            assert f"(default: {shown})" in text, f.name


def test_unknown_settings_are_refused():
    with pytest.raises(bns.TrainingError, match="unknown distillation setting"):
        DistillConfig(nfe=4).replace(stepz=3)


@pytest.mark.parametrize("path", sorted((ROOT / "benchmarks/results/solvers").glob("*.json")))
def test_shipped_benchmark_solvers_load_for_their_models(path):
    from bns.specs import load_model

    meta = json.loads(path.read_text())["meta"]
    model = load_model(meta["model_name"])
    # the fingerprint (and so the hashing of the weights) is what it was when they were made
    solver = bns.NSSolver.load(path, model=model, guidance=meta["guidance"])
    assert solver.meta["model_fingerprint"] == model.fingerprint()


def test_every_error_class_of_bns_derives_from_bns_error():
    """``except bns.BNSError`` catches whatever bns raises on purpose, and the command line
    prints those messages as they are: every exception class defined in bns derives from it."""
    found = []
    for path in sorted(SRC.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef) and any(
                getattr(b, "id", getattr(b, "attr", "")).endswith(("Error", "Exception"))
                or getattr(b, "id", "") in ("WorkerLost", "NetworkError", "ModelError")
                for b in node.bases
            ):
                found.append((path.relative_to(SRC).with_suffix(""), node.name))
    assert len(found) >= 12, found
    for module, name in found:
        parts = [p for p in module.parts if p != "__init__"]
        mod = __import__(".".join(["bns", *parts]), fromlist=[name])
        cls = getattr(mod, name)
        assert issubclass(cls, bns.BNSError), f"{module}.{name}"


def test_the_older_name_of_adam_steps_still_works_and_says_so(capsys):
    """``steps`` meant Adam iterations here and solver steps everywhere else: it is now
    ``adam_steps``. The older name is taken by replace (so bns.distill) and the command line."""
    with pytest.warns(FutureWarning, match="steps is now adam_steps"):
        cfg = DistillConfig(nfe=4).replace(steps=7)
    assert cfg.adam_steps == 7 and "steps" not in cfg.to_dict()
    with pytest.warns(FutureWarning):
        assert cfg.steps == 7
    with pytest.raises(bns.TrainingError, match="give adam_steps alone"):
        DistillConfig(nfe=4).replace(steps=7, adam_steps=7)
    argv = ["distill", "--model", "gmm", "--nfe", "4"]
    args = build_parser().parse_args([*argv, "--steps", "5"])
    assert DistillConfig(**config_from_args(args)).adam_steps == 5
    line = "bns distill: warning: --steps is now --adam-steps (the older flag will go)\n"
    assert capsys.readouterr().err == line
    args = build_parser().parse_args([*argv, "--adam-steps", "5"])
    assert DistillConfig(**config_from_args(args)).adam_steps == 5
    assert capsys.readouterr().err == ""  # the current flag: nothing to say


def test_a_bad_model_or_schedule_raises_a_bns_error():
    """``except bns.BNSError`` catches what a user's own bns.Model(...) call gets wrong (it
    raised plain ValueErrors once); each is still a ValueError."""

    def net(x, t):
        return x

    bad_models = [
        dict(prediction="noise"),
        dict(schedule=None),
        dict(t_range=(0.5, 0.2)),
        dict(num_classes=0),
        dict(num_classes=3, label_splits={"train": []}),
        dict(label_splits={"train": [0]}),
    ]
    for bad in bad_models:
        kw = {**dict(prediction="velocity", schedule="condot", sample_shape=(2,)), **bad}
        with pytest.raises(bns.BNSError) as e:
            bns.Model(net, **kw)
        assert isinstance(e.value, ValueError), bad
    bad_schedules = [
        lambda: bns.schedules.VP(-1.0, 20.0),
        lambda: bns.schedules.CondOT(sigma0=0.0),
        lambda: bns.schedules.DiscreteVP(torch.tensor([0.5, 0.9])),
        lambda: bns.schedules.schedule_from_config({"name": "nope"}),
    ]
    for make in bad_schedules:
        with pytest.raises(bns.BNSError) as e:
            make()
        assert isinstance(e.value, ValueError)
    model = bns.Model(net, "velocity", "condot", (2,))
    with pytest.raises(bns.BNSError):
        model.span(0.7, 0.2)
    # and what the other public functions refuse: an unknown solver, an NFE it cannot make
    from bns.solvers import initial_solver

    for bad in [lambda: initial_solver(model, 4, "nope"), lambda: initial_solver(model, 3, "rk4")]:
        with pytest.raises(bns.InputError) as e:
            bad()
        assert isinstance(e.value, ValueError)
