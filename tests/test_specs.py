"""Model specs: every kind resolves through the registry, a new prefix is one entry, and every
bad spec ends with one clear SpecError line."""

from __future__ import annotations

import importlib
import sys
import types

import pytest
import torch

import bns
from bns import specs
from bns.models.gmm import gmm
from bns.specs import BUILTIN_MODELS, SpecError, load_model, register_spec

FACTORIES = """
from bns.models.gmm import gaussian_mixture_model


def small():
    return gaussian_mixture_model(dim=4, components=2, std=0.3, name="small")


def boom():
    raise RuntimeError("no weights here")


def not_a_model():
    return 3


not_callable = 5
"""


@pytest.fixture(autouse=True)
def _own_registry(monkeypatch):
    """Each test registers into a copy of the registry."""
    monkeypatch.setattr(specs, "_REGISTRY", dict(specs._REGISTRY))


@pytest.fixture
def model_file(tmp_path):
    path = tmp_path / "models.py"
    path.write_text(FACTORIES)
    return path


def _error(spec: str, **kwargs) -> str:
    with pytest.raises(SpecError) as e:
        load_model(spec, **kwargs)
    message = str(e.value)
    assert "\n" not in message  # one clear line
    return message


def test_builtin_names_resolve():
    model = load_model("gmm")
    assert isinstance(model, bns.Model) and model.fingerprint() == gmm().fingerprint()
    for module, factory in BUILTIN_MODELS.values():  # every entry names a factory
        assert callable(getattr(importlib.import_module(module), factory))
    assert BUILTIN_MODELS["fmnist-ddpm"] == ("bns.models.fmnist", "fmnist_ddpm")


def test_file_factory_resolves(model_file):
    model = load_model(f"{model_file}:small")
    assert isinstance(model, bns.Model) and model.name == "small"
    assert model.sample_shape == (4,)


def test_diffusers_prefix_resolves_with_prompts(tmp_path, monkeypatch):
    """``diffusers:PATH`` hands the folder and the prompts to model_from_pipeline (a stand-in
    here: the real one is tested with real pipelines in test_integrations_diffusers.py)."""
    calls = []

    def model_from_pipeline(path, prompts=None, dtype=None, **options):
        calls.append((path, prompts, dtype, *options.items()))
        return gmm()

    import bns.integrations  # noqa: F401 - the parent package stays real

    stub = types.ModuleType("bns.integrations.diffusers")
    stub.model_from_pipeline = model_from_pipeline
    monkeypatch.setitem(sys.modules, "bns.integrations.diffusers", stub)
    assert isinstance(load_model(f"diffusers:{tmp_path}", prompts=["a cat"]), bns.Model)
    assert isinstance(load_model(f"diffusers:{tmp_path}", dtype=torch.bfloat16), bns.Model)
    # The pipeline loads in the dtype itself (a pipeline runs in its own dtype, not cast later).
    assert calls == [(str(tmp_path), ["a cat"], None), (str(tmp_path), None, torch.bfloat16)]
    # Options of model_from_pipeline ride on the spec, typed.
    calls.clear()
    spec = f"diffusers:{tmp_path}?height=512&width=256&embedded_guidance=3.5&negative_prompt=a b"
    load_model(spec)
    assert calls == [
        (
            str(tmp_path),
            None,
            None,
            ("height", 512),
            ("width", 256),
            ("embedded_guidance", 3.5),
            ("negative_prompt", "a b"),
        )
    ]
    for bad, message in (
        ("?size=4", "unknown pipeline option 'size'"),
        ("?height=big", "height='big' is not a valid value"),
        ("?height", "cannot read the pipeline options"),
    ):
        assert message in _error(f"diffusers:{tmp_path}{bad}")


def test_other_kinds_are_cast_to_the_dtype(model_file):
    model = load_model(f"{model_file}:small", dtype=torch.bfloat16)
    assert model.dtype == torch.bfloat16


def test_unknown_spec_lists_every_kind():
    names = ", ".join(BUILTIN_MODELS)
    assert _error("nope") == (
        f"unknown model 'nope': use one of {names}, path/to/file.py:factory or diffusers:PATH"
    )
    # A path without ":factory" or a factory in a file that is not Python is no spec either.
    assert _error("models.py").startswith("unknown model 'models.py'")
    assert _error("models.txt:small").startswith("unknown model")


def test_prompts_apply_to_kinds_that_take_them(model_file):
    assert _error("gmm", prompts=["a cat"]) == "--prompts applies to diffusers:PATH models only"
    assert "--prompts applies" in _error(f"{model_file}:small", prompts=["a cat"])


def test_a_registered_prefix_is_one_entry(model_file):
    seen = []

    def resolve(rest):
        seen.append(rest)
        if rest != "tiny":
            raise SpecError(f"toy has no model {rest!r}")
        return gmm()

    register_spec("toy:", resolve, usage="toy:NAME")
    assert isinstance(load_model("toy:tiny"), bns.Model) and seen == ["tiny"]
    assert _error("toy:huge") == "toy has no model 'huge'"
    # A prefix wins over the file matcher, and the unknown-spec message names the new kind.
    assert _error(f"toy:{model_file}:small") == f"toy has no model '{model_file}:small'"
    assert _error("nope").endswith("path/to/file.py:factory, diffusers:PATH or toy:NAME")
    # The model it gives is checked like any other.
    register_spec("bad:", lambda rest: "a string")
    assert _error("bad:x") == "bad:x did not give a bns.Model (got str)"
    # A registered kind that takes prompts gets them.
    register_spec("text:", lambda rest, prompts=None: gmm() if prompts else None, prompts=True)
    assert isinstance(load_model("text:x", prompts=["a"]), bns.Model)
    assert "diffusers:PATH or text:..." in _error("gmm", prompts=["a"])


def test_a_registered_matcher_needs_a_usage():
    with pytest.raises(TypeError, match="usage"):
        register_spec(lambda spec: spec == "x", lambda spec: gmm())
    register_spec(lambda spec: spec.endswith(".ckpt"), lambda spec: gmm(), usage="FILE.ckpt")
    assert isinstance(load_model("weights.ckpt"), bns.Model)


def test_missing_files_and_folders(tmp_path):
    assert _error(f"{tmp_path / 'missing.py'}:small") == (
        f"model file not found: {tmp_path / 'missing.py'}"
    )
    assert _error(f"diffusers:{tmp_path / 'nope'}") == (
        f"diffusers pipeline folder not found: {tmp_path / 'nope'}"
    )


def test_a_factory_that_raises(model_file):
    assert _error(f"{model_file}:boom") == (
        f"{model_file}:boom() failed: RuntimeError: no weights here"
    )


def test_a_factory_that_returns_no_model(model_file):
    spec = f"{model_file}:not_a_model"
    assert _error(spec) == f"{spec} did not give a bns.Model (got int)"


def test_a_file_without_the_factory_or_that_fails_to_import(model_file, tmp_path):
    assert _error(f"{model_file}:not_callable") == f"{model_file} has no callable 'not_callable'"
    broken = tmp_path / "broken.py"
    broken.write_text("raise ImportError('torch.nope')\n")
    assert _error(f"{broken}:f") == f"importing {broken} failed: ImportError: torch.nope"


def test_a_model_file_imports_its_network_from_beside_it(tmp_path, monkeypatch, capsys):
    """The way users split it: the network in one module, the factory in another next to it,
    run by the ``bns`` command from anywhere (which, unlike ``python -m bns``, puts neither the
    working folder nor the file's on ``sys.path``); a module named like the standard library's
    beside it does not replace that one."""
    monkeypatch.setattr(sys, "path", list(sys.path))  # put back after the test
    monkeypatch.chdir(tmp_path.parent)
    name = f"usernet_{abs(hash(str(tmp_path)))}"
    (tmp_path / f"{name}.py").write_text(
        "import torch\n\n\n"
        "class Net(torch.nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        self.lin = torch.nn.Linear(4, 4)\n\n"
        "    def forward(self, x, t):\n"
        "        return self.lin(x) * t[:, None]\n"
    )
    (tmp_path / "factory.py").write_text(
        f"import bns\nfrom {name} import Net\n\n\n"
        "def model():\n"
        "    return bns.Model(Net(), 'velocity', 'condot', (4,), name='split')\n"
    )
    (tmp_path / "secrets.py").write_text("raise RuntimeError('the user secrets module')\n")
    model = load_model(f"{tmp_path / 'factory.py'}:model")
    # on sys.path, last: a secrets.py or profile.py beside it shadows nothing bns imports later
    assert model.name == "split" and sys.path[-1] == str(tmp_path)
    from bns.cli import main

    out = tmp_path / "s.json"
    argv = ["distill", "--model", f"{tmp_path.name}/factory.py:model", "--nfe", "2", "--quiet"]
    argv += ["--train-pairs", "8", "--val-pairs", "8", "--init-pairs", "8", "--adam-steps", "1"]
    argv += ["--cache-dir", str(tmp_path / "c"), "--out", str(out)]
    assert main(argv) == 0, capsys.readouterr().err
    assert bns.NSSolver.load(out).meta["model_name"] == "split"
    sys.modules.pop(name, None)
    sys.modules.pop("secrets", None)
    import secrets  # the standard library's, found first

    assert callable(secrets.token_hex)
