"""Every Python block of the README runs, as written, on a small network defined here (the
distillation sizes, and the cost estimate's, shrunk so that it takes seconds)."""

from __future__ import annotations

import importlib
import re
import types
from pathlib import Path

import pytest
import torch
from torch import nn

import bns
from bns.cli import _subcommands, build_parser

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
SMALL = dict(train_pairs=6, val_pairs=6, init_pairs=6, adam_steps=2, val_every=2, batch_size=4)


class ConditionalEps(nn.Module):
    """An epsilon network on 3 x 32 x 32 images with 1000 classes (+ the null label), float32,
    written the way a user writes one."""

    def __init__(self) -> None:
        super().__init__()
        self.label = nn.Embedding(1001, 8)
        self.time = nn.Linear(1, 8)
        self.conv_in = nn.Conv2d(3, 8, 3, padding=1)
        self.conv_out = nn.Conv2d(8, 3, 3, padding=1)

    def forward(self, x, t, y=None):
        h = self.conv_in(x)
        emb = self.time(t[:, None].to(x.dtype))
        if y is not None:
            emb = emb + self.label(y)
        return 0.1 * self.conv_out(torch.tanh(h + emb[:, :, None, None]))


def test_the_readme_has_python_blocks():
    assert len(BLOCKS) >= 2


def test_readme_python_blocks_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("BNS_CACHE_DIR", str(tmp_path / "cache"))
    real = bns.distill

    def small(model, nfe=None, **kw):
        return real(model, nfe, **{**kw, **SMALL, "progress": False})

    monkeypatch.setattr(bns, "distill", small)
    real_estimate = bns.estimate_cost

    def small_estimate(model, nfe=None, **kw):  # the run above's sizes: its pairs are cached
        return real_estimate(model, nfe, **{**kw, **SMALL})

    monkeypatch.setattr(bns, "estimate_cost", small_estimate)
    torch.manual_seed(0)
    namespace = {"net": ConditionalEps()}
    for block in BLOCKS:
        exec(compile(block, str(README), "exec"), namespace)
    x = namespace["x"]
    assert x.dtype == torch.float32 and torch.all(torch.isfinite(x))
    assert (tmp_path / "bns_nfe8.json").exists()
    solver = namespace["solver"]
    assert solver.nfe == 8 and solver.meta["guidance"] == 2.0
    net = namespace["net"]
    assert all(p.grad is None for p in net.parameters())


def _dotted_names() -> list[str]:
    texts = [README.read_text()] + [p.read_text() for p in sorted(README.parent.glob("docs/*.md"))]
    return sorted({m for t in texts for m in re.findall(r"`[^`]*?\b(bns(?:\.\w+)+)", t)})


@pytest.mark.parametrize("name", _dotted_names())
def test_every_dotted_name_the_docs_use_resolves_as_written(name):
    """``bns.a.b`` in the README or docs works as typed: attribute by attribute from ``bns``,
    a submodule imported only where the object on the left is a package."""
    obj, path = bns, "bns"
    for part in name.split(".")[1:]:
        path += "." + part
        if not hasattr(obj, part) and isinstance(obj, types.ModuleType):
            importlib.import_module(path)
        assert hasattr(obj, part), f"{name}: {path} does not resolve"
        obj = getattr(obj, part)


@pytest.mark.parametrize("name", ["distill", "DistillConfig", "sample", "NSSolver", "Model"])
def test_names_the_readme_uses_are_public(name):
    assert name in bns.__all__ and hasattr(bns, name)


DOCS = [README, *sorted(README.parent.glob("docs/*.md"))]
COMMANDS = ("distill", "eval", "sample", "demo", "comfyui", "export")
# `bns CMD ...` wherever the README or a doc shows one: in a code span, a sentence or a block
# (``torchrun ... -m bns CMD`` included), up to the end of the span or line.
SHOWN = re.compile(rf"(?<![\w/.-])bns ((?:{'|'.join(COMMANDS)})\b[^`\n]*)")


def _shown_commands() -> list[tuple[str, str]]:
    return [(p.name, m.group(1)) for p in DOCS for m in SHOWN.finditer(p.read_text())]


def test_every_option_the_docs_show_exists_for_its_command():
    """A renamed or removed option fails here, not in a user's terminal: each ``--flag`` shown
    after ``bns CMD`` is one of CMD's options, spelled in full (placeholders, ``a|b`` and
    ``[--opt X]`` included; the values are checked below where a line is runnable)."""
    shown = _shown_commands()
    assert len(shown) > 30
    wrong = []
    for doc, text in shown:
        parser = build_parser()
        for token in text.split():
            token = token.strip("[](),;:")
            name = token.split("/")[0]  # "sample/eval": the first of the two
            if name in _subcommands(parser):
                parser = _subcommands(parser)[name]
            elif (
                token.startswith("--") and token.split("=")[0] not in parser._option_string_actions
            ):
                wrong.append(f"{doc}: {token.split('=')[0]} in `bns {text.strip()}`")
    assert not wrong, "\n".join(wrong)


def test_every_runnable_command_line_the_docs_show_parses():
    """The command lines of the README's and the docs' blocks, those with no placeholder, parse
    as written: options, values and their types (a program's output, ``bns distill
    --estimate: ...``, is not a command)."""
    found = re.compile(rf"^\s*(?:\S.*?-m )?bns ((?:{'|'.join(COMMANDS)})\b.*?)\s*(?:#.*)?$", re.M)
    lines = [(p.name, m.group(1)) for p in DOCS for m in found.finditer(p.read_text())]
    placeholder = re.compile(r"\.\.\.|\||\b[A-Z]{2,}\b|/path/|\S:(\s|$)|`")
    runnable = [(doc, text) for doc, text in lines if not placeholder.search(text)]
    assert len(runnable) >= 8
    for doc, text in runnable:
        try:
            build_parser().parse_args(text.split())
        except SystemExit:
            pytest.fail(f"{doc}: `bns {text}` does not parse")
