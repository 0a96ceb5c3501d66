"""benchmarks/fuzz.py at a small size: mutated solver, cache, shard and checkpoint files are
refused in one line or read as the original, never crash, hang or allocate without bound; and
the reader bugs the fuzzer found stay fixed."""

from __future__ import annotations

import datetime
import importlib.util
import json
import os
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

import bns
from bns.checkpoint import Checkpoint
from bns.config import TrainingError
from bns.models.gmm import gaussian_mixture_model
from bns.pairs import _digest, _read_cache, make_pairs
from bns.solver import NSSolver, SolverFileError, _checksum

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "fuzz.py"


def _fuzz():
    if "fuzz_bench" in sys.modules:
        return sys.modules["fuzz_bench"]
    spec = importlib.util.spec_from_file_location("fuzz_bench", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["fuzz_bench"] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_a_small_fuzz_run_finds_nothing(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT / "src"))
    env["BNS_CACHE_DIR"] = str(tmp_path / "cache")  # nothing should be cached, but never ~
    cmd = [sys.executable, str(SCRIPT), "--solvers", "300", "--caches", "60", "--ranges", "60"]
    cmd += ["--checkpoints", "40", "--seed", "1", "--out", str(tmp_path / "out")]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    res = json.loads((tmp_path / "out" / "fuzz.json").read_text())
    assert (tmp_path / "out" / "fuzz.md").read_text().count("| solver | 300 |") == 1
    files = {"solver": 300, "range": 60, "cache": 30, "shard": 30, "checkpoint": 40}
    assert {k: t["files"] for k, t in res["totals"].items()} == files
    for kind, t in res["totals"].items():
        bad = ("loaded-different", "nfe-differs", "crash", "hang", "oom")
        assert {o: t[o] for o in bad} == dict.fromkeys(bad, 0), (kind, res["examples"][kind])
        assert t["refused"] > 0
    # The fuzzer gets past the checksum (re-signed edits) and makes harmless edits too.
    assert res["totals"]["solver"]["accepted-resigned"] > 0
    assert res["totals"]["solver"]["loaded-equal"] > 0
    assert "benchmarks/fuzz.py --solvers 300" in res["command"] and res["torch"]


def test_the_fuzzer_tells_a_hang_an_allocation_and_a_crash_from_a_refusal():
    fuzz = _fuzz()

    def spin(data):
        while True:
            pass

    def refuse(data):
        raise SolverFileError("bad file")

    def traceback_in_message(data):
        raise SolverFileError("bad file\nTraceback (most recent call last): ...")

    def huge(data):
        return torch.empty(2**50, dtype=torch.uint8)  # a petabyte: no machine gives it

    def key_error(data):
        return {}["x"]

    got = {
        f.__name__: fuzz.run_case("solver", f, b"", time_limit=0.2)[0].outcome
        for f in (spin, refuse, traceback_in_message, huge, key_error)
    }
    assert got == {
        "spin": "hang",
        "refuse": "refused",
        "traceback_in_message": "crash",
        "huge": "oom",
        "key_error": "crash",
    }


# -- regressions: the reader bugs the fuzzer found ---------------------------------------------
@pytest.fixture(scope="module")
def model():
    return gaussian_mixture_model(dim=8, components=3, num_classes=3, std=0.1, seed=5)


def _refused(match: str, call, *args, **kw) -> None:
    with pytest.raises(SolverFileError, match=match) as e:
        call(*args, **kw)
    assert "\n" not in str(e.value)


def _resigned(d: dict) -> dict:
    d["checksum"] = _checksum(d)
    return d


def test_solver_files_json_cannot_parse_are_refused_in_one_line(model, tmp_path):
    path = bns.solvers.by_name("euler", 4, model).save(tmp_path / "s.json")
    text = path.read_text()
    # A 5000-digit integer raised Python's ValueError (int parsing limit), deep nesting a
    # RecursionError: both escaped NSSolver.load as tracebacks.
    path.write_text(text.replace('"nfe": 4', '"nfe": 1' + "0" * 5000))
    _refused("cannot read solver file.*4300 digits", NSSolver.load, path)
    path.write_text(text.replace('"nfe": 4', '"nfe": ' + "[" * 100_000 + "]" * 100_000))
    _refused("cannot read solver file.*recursion", NSSolver.load, path)
    d = json.loads(text)
    d["meta"] = {"x": torch.zeros(2)}  # from_dict of a dict that is not JSON at all
    _refused("malformed", NSSolver.from_dict, d)


def test_a_re_signed_solver_with_strings_or_booleans_for_numbers_is_refused(model):
    good = bns.solvers.by_name("euler", 2, model).to_dict()
    for name, value in (("times", [0.0, "0.5", 1.0]), ("a", [1.0, True]), ("times", "012")):
        d = _resigned({**good, name: value})  # float() took all these: "0.5", True, "0", ...
        _refused(f"malformed: {name} must be a list of numbers", NSSolver.from_dict, d)
    d = _resigned({**good, "b": [[0.5], [0.0, "0.5"]]})
    _refused("malformed: row 1 of b must be a list of numbers", NSSolver.from_dict, d)
    d = _resigned({**good, "b": {"0": [0.5], "1": [0.0, 0.5]}})
    _refused("malformed: b must be a list of rows", NSSolver.from_dict, d)


def test_a_huge_nfe_is_refused_before_anything_is_allocated(model):
    good = bns.solvers.by_name("euler", 2, model).to_dict()
    for n in (10**9, 10**18, 10**400):  # b would be n x n float64: the lengths are checked first
        _refused("shapes do not fit", NSSolver.from_dict, _resigned({**good, "nfe": n}))


def test_a_meta_guidance_that_is_not_a_number_is_refused(model, tmp_path):
    d = bns.solvers.by_name("euler", 2, model).to_dict()
    for bad in ("abc", [2.0], {"w": 2}):
        d["meta"]["guidance"] = bad
        (tmp_path / "s.json").write_text(json.dumps(_resigned(d)))
        _refused("meta guidance is not a number", NSSolver.load, tmp_path / "s.json", guidance=2)
    d["meta"]["guidance"] = "2.0\n"  # parses as 2.0; the message of a mismatch stays one line
    (tmp_path / "s.json").write_text(json.dumps(_resigned(d)))
    _refused("trained for guidance", NSSolver.load, tmp_path / "s.json", guidance=3)


def _rewrite(path: Path, tensors: dict, meta: dict) -> None:
    from safetensors.torch import save_file

    path.unlink()
    save_file(tensors, str(path), metadata=meta)


def test_a_cache_with_a_bad_nfe_or_tensors_it_never_writes_is_regenerated(model, tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file

    make_pairs(model, 6, "train", cache=tmp_path, progress=False)
    (path,) = tmp_path.glob("*.safetensors")
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    tensors = {k: v.clone() for k, v in load_file(str(path)).items()}
    key = json.loads(meta["key"])
    assert _read_cache(path, key) is not None
    # nfe_per_sample is outside the digest: "abc" raised a ValueError out of the reader.
    for nfe in ("abc", "", "inf", "-1"):
        _rewrite(path, tensors, {**meta, "nfe_per_sample": nfe})
        with pytest.warns(UserWarning, match="(unreadable|stale or corrupt).*regenerating"):
            assert _read_cache(path, key) is None
    # Re-signed (the digest recomputed) tensors that _write_cache never writes.
    n = tensors["x0"].shape[0]
    for edit in (
        {"x0": tensors["x0"].double()},
        {"y": tensors["y"].float()},
        {"y": tensors["y"][: n - 1].clone()},
        {"z": torch.zeros(())},
        {"x0": tensors["x0"][:, :-1].clone(), "x1": tensors["x1"][:, :-1].clone()},
    ):
        forged = {**tensors, **edit}
        _rewrite(path, forged, {**meta, "digest": _digest(forged)})
        with pytest.warns(UserWarning, match="stale or corrupt"):
            assert _read_cache(path, key) is None


def test_a_checkpoint_with_a_flipped_bit_or_a_foreign_object_is_refused_in_one_line(tmp_path):
    ckpt = Checkpoint(tmp_path / "run.ckpt", "fp")
    ckpt.save({"params": {"a": torch.arange(4.0, dtype=torch.float64)}})
    assert torch.equal(ckpt.load()["params"]["a"], torch.arange(4.0, dtype=torch.float64))
    raw = bytearray(ckpt.path.read_bytes())
    with zipfile.ZipFile(ckpt.path) as z:
        (info,) = [i for i in z.infolist() if i.filename.endswith("data/0")]
    o = info.header_offset  # the member's data follows its 30-byte local header, name, extra
    name_len, extra_len = struct.unpack("<HH", raw[o + 26 : o + 30])
    raw[o + 30 + name_len + extra_len + 9] ^= 0x10  # a mantissa bit of a[1]
    ckpt.path.write_bytes(bytes(raw))  # torch.load alone reads a[1] as another number
    with pytest.raises(TrainingError, match="fails its CRC-32 check") as e:
        ckpt.load()
    assert "\n" not in str(e.value)
    torch.save({"fingerprint": "fp", "when": datetime.date(2020, 1, 1)}, ckpt.path)
    with pytest.raises(TrainingError, match="weights-only unpickling") as e:
        ckpt.load()  # torch's refusal ran over a dozen lines, advising weights_only=False
    assert "\n" not in str(e.value) and "weights_only` set to `False" not in str(e.value)
