"""Fuzz bns's file readers with mutated solver, guidance-range, cache, shard and checkpoint files.

    python benchmarks/fuzz.py --solvers 10000 --caches 2000 --ranges 1000 --checkpoints 1000

Real files are made first on the built-in tiny Gaussian-mixture model: solvers of every family
(bns, time, scale-time, multistep), a classical rk4 solver (repeated times) and one taken from a
guidance-range solver; the guidance-range file itself; a ground-truth cache file and a shard of
one; distillation checkpoints. Each case mutates one of them (bit flips, truncation, appended
garbage, edited fields of the JSON or of the safetensors header, wrong types, huge numbers, NaN,
extra keys, re-signed edits, ...) and runs it through its reader (``NSSolver.load``,
``GuidanceRangeSolver.load``, ``pairs._read_cache``, ``pairs._Shards.read``,
``Checkpoint.load``) under a time limit per case and an address-space limit for the whole run.
Each case ends as one of:

- ``refused``: a bns error (``SolverFileError``, ``TrainingError``) of one line, or for a cache
  or shard None (recompute) with any warning one line;
- ``loaded-equal``: the values of the original file, bit for bit;
- ``accepted-resigned``: an edit that the fuzzer re-signed (recomputed the checksum or digest,
  or re-saved the checkpoint), loaded as a well-formed file: a checksum guards against
  corruption, not against a forger, so that is by design;
- ``nfe-differs``: a cache or shard read with the original pairs but another
  ``nfe_per_sample`` (a cost statistic; a file of an older bns, whose metadata had no digest
  of its own, is read so);
- ``loaded-different``: anything else that loaded (a corruption the reader missed);
- ``crash``: any other exception, or a message of several lines (a traceback's worth);
- ``hang``: over the time limit; ``oom``: a memory error, or a message about an allocation,
  or the peak memory grown by more than 256 MiB in one case.

Writes ``fuzz.json`` (counts per file kind, operator and outcome, examples of every bad
outcome, the most frequent refusals, the command, machine and wall time) and ``fuzz.md``.
``--kind solver --case 17`` reruns one case and prints its traceback.
"""

from __future__ import annotations

import argparse
import copy
import faulthandler
import hashlib
import io
import json
import math
import os
import platform
import random
import re
import resource
import signal
import struct
import sys
import tempfile
import time
import traceback
import warnings
import zipfile
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

RESULTS = Path(__file__).parent / "results"
OUTCOMES = (
    "refused",
    "loaded-equal",
    "accepted-resigned",
    "nfe-differs",
    "loaded-different",
    "crash",
    "hang",
    "oom",
)
BAD = ("loaded-different", "crash", "hang", "oom")
KINDS = ("solver", "range", "cache", "shard", "checkpoint")
TIME_LIMIT_S = 5.0
MEMORY_LIMIT_GIB = 2.0
RSS_GROWTH_MIB = 256  # more than this in one case counts as an unbounded allocation


# -- the files to mutate ----------------------------------------------------------------------
@dataclass
class Base:
    """One real file: its bytes, what its reader needs (``info``) and what it reads as."""

    kind: str
    name: str
    data: bytes
    info: dict[str, Any] = field(default_factory=dict)
    value: Any = None


def make_bases(folder: Path) -> dict[str, list[Base]]:
    """Write real files of every kind with the tiny GMM model under ``folder`` (a few seconds)."""
    import bns
    from bns.guidance_range import distill_guidance_range
    from bns.models.gmm import gaussian_mixture_model
    from bns.pairs import _Shards, make_pairs
    from bns.train import distill

    model = gaussian_mixture_model(dim=8, components=3, num_classes=3, std=0.1, seed=5)
    cache = folder / "cache"
    kw: dict[str, Any] = dict(cache=cache, progress=False)
    train = make_pairs(model, 24, "train", batch_size=8, **kw)
    val = make_pairs(model, 8, "val", **kw)
    out: dict[str, list[Base]] = {k: [] for k in KINDS}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a two-step run warns about its short schedule
        for family, init in (
            ("bns", "midpoint"),
            ("time", "midpoint"),
            ("scale-time", "euler"),
            ("multistep", "ab2"),
        ):
            ckpt = folder / f"{family}.ckpt"
            solver, _ = distill(
                model, 4, family=family, init=init, adam_steps=2, val_every=1, pairs=(train, val),
                progress=False, guidance=1.5, checkpoint_path=ckpt,
            )  # fmt: skip
            solver.meta = _untimed(solver.meta)
            solver.save(folder / f"{family}.json")
            out["solver"].append(_solver_base(f"{family}.json", folder, model))
            # Saved again into memory: the same state under the archive name "archive" rather
            # than the temporary file's (a pid and a uuid), so that a seed gives the same bytes.
            state = torch.load(ckpt, weights_only=True)
            if isinstance(state.get("scalars"), str):  # JSON, with the run's elapsed time
                state["scalars"] = json.dumps(_untimed(json.loads(state["scalars"])))
            buf = io.BytesIO()
            torch.save(state, buf)
            info = {"fingerprint": state["fingerprint"]}
            out["checkpoint"].append(Base("checkpoint", ckpt.name, buf.getvalue(), info))
        bns.solvers.by_name("rk4", 8, model).save(folder / "rk4.json")
        out["solver"].append(_solver_base("rk4.json", folder, model))
        rs, _ = distill_guidance_range(
            model, 4, [1, 3], adam_steps=2, train_pairs=16, val_pairs=8, init_pairs=8, batch_size=8,
            val_every=1, cache=folder / "range-cache", progress=False,
        )  # fmt: skip
        rs.meta = _untimed(rs.meta)
        rs.save(folder / "range.json")
        rs.at(2.0).save(folder / "range_at_2.json")
        out["solver"].append(_solver_base("range_at_2.json", folder, model))
        out["range"].append(Base("range", "range.json", (folder / "range.json").read_bytes()))
        out["range"][0].info["model"] = model

    (path,) = cache.glob("pairs-*-train-*.safetensors")
    key = json.loads(_st_split(path.read_bytes())[1]["__metadata__"]["key"])
    out["cache"].append(Base("cache", "train.safetensors", _sorted_st(path), {"key": key}))
    shards = _Shards(folder / "shards", key)
    lo, hi = 8, 16
    batch = {k: v[lo:hi] for k, v in _load_st(path.read_bytes()).items()}
    shards.write(lo, hi, {**batch, "nfe": torch.tensor([40.0], dtype=torch.float64)})
    shard = shards._path(lo, hi)
    info = {"key": key, "rows": (lo, hi)}
    out["shard"].append(Base("shard", shard.name, _sorted_st(shard), info))
    return out


def _untimed(meta: dict) -> dict:
    """``meta`` with its timings (``wall_time_s``, ``seconds``, ``elapsed``) zeroed: the same
    files each run."""
    if isinstance(meta, dict):
        timings = ("wall_time_s", "seconds", "elapsed")
        return {k: 0.0 if k in timings else _untimed(v) for k, v in meta.items()}
    return meta


def _sorted_st(path: Path) -> bytes:
    """A safetensors file with its header's keys sorted (safetensors writes them in hash
    order, which changes from run to run): the same file each run."""
    _, header, data = _st_split(path.read_bytes())
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    return _st_join(text, data)


def _solver_base(name: str, folder: Path, model) -> Base:
    from bns.solver import NSSolver

    meta = NSSolver.load(folder / name).meta
    return Base("solver", name, (folder / name).read_bytes(), {"model": model, "meta": meta})


# -- running one file through its reader ------------------------------------------------------
class _Hang(BaseException):
    """Raised by the alarm; a BaseException so that no reader's ``except Exception`` eats it."""


def _on_alarm(signum, frame) -> None:
    raise _Hang()


def _write(path: Path, data: bytes) -> None:
    """Write ``data`` to a new file at ``path``: the tensors a reader returned may map the old
    file's pages (safetensors), which must not change under them (bns replaces files by rename,
    never in place, for the same reason)."""
    path.unlink(missing_ok=True)
    path.write_bytes(data)


def _reader(kind: str, base: Base, work: Path, mode: int) -> Callable[[bytes], Any]:
    """``read(data)``: write ``data`` where the reader looks and read it as bns does."""
    from bns.checkpoint import Checkpoint
    from bns.guidance_range import GuidanceRangeSolver
    from bns.pairs import _read_cache, _Shards
    from bns.solver import NSSolver

    if kind == "solver":
        path = work / "solver.json"
        model, guidance = base.info["model"], base.info["meta"].get("guidance")

        def read(data: bytes) -> Any:
            _write(path, data)
            # The three ways bns reads one: alone (the schedulers, which then check the range),
            # for a model and guidance (`bns sample`), for a model with --force.
            if mode == 0:
                return NSSolver.load(path)
            if mode == 1:
                return NSSolver.load(path, model=model, guidance=guidance)
            return NSSolver.load(path, model=model, force=True)

    elif kind == "range":
        path = work / "range.json"

        def read(data: bytes) -> Any:
            _write(path, data)
            return GuidanceRangeSolver.load(path, model=base.info["model"] if mode else None)

    elif kind == "cache":
        path = work / "pairs.safetensors"

        def read(data: bytes) -> Any:
            _write(path, data)
            return _read_cache(path, base.info["key"])

    elif kind == "shard":
        shards = _Shards(work / "shards", base.info["key"])
        path = shards._path(*base.info["rows"])
        path.parent.mkdir(parents=True, exist_ok=True)

        def read(data: bytes) -> Any:
            _write(path, data)
            return shards.read(*base.info["rows"])

    else:
        path = work / "run.ckpt"
        ckpt = Checkpoint(path, base.info["fingerprint"])

        def read(data: bytes) -> Any:
            _write(path, data)
            return ckpt.load()

    return read


def _normal(value: Any) -> Any:
    """What a reader returned, as plain data to compare (tensors stay tensors)."""
    if hasattr(value, "times") and hasattr(value, "meta"):  # an NSSolver
        return {"times": value.times, "a": value.a, "b": value.b, "meta": value.meta}
    if hasattr(value, "coefs"):  # a GuidanceRangeSolver
        return {
            "coefs": value.coefs,
            "t_ends": value.t_ends,
            "w_range": list(value.w_range),
            "meta": value.meta,
        }
    return value


def same(x: Any, y: Any) -> bool:
    """Equal bit for bit: tensors by dtype, shape and bytes, floats with the sign of zero."""
    if isinstance(x, torch.Tensor) or isinstance(y, torch.Tensor):
        from bns._hashing import tensor_bytes

        return (
            isinstance(x, torch.Tensor)
            and isinstance(y, torch.Tensor)
            and x.dtype == y.dtype
            and x.shape == y.shape
            and tensor_bytes(x) == tensor_bytes(y)
        )
    if type(x) is not type(y):
        return False
    if isinstance(x, dict):
        return set(x) == set(y) and all(same(x[k], y[k]) for k in x)  # key order aside
    if isinstance(x, (list, tuple)):
        return len(x) == len(y) and all(same(a, b) for a, b in zip(x, y))
    if isinstance(x, float):
        return struct.pack("<d", x) == struct.pack("<d", y)
    return x == y


def first_difference(x: Any, y: Any, path: str = "") -> str:
    """Where ``x`` and ``y`` first differ (for the report), "" if they are the same."""
    if isinstance(x, dict) and isinstance(y, dict):
        if set(x) != set(y):
            return f"{path or '/'}: keys {sorted(set(x) ^ set(y))[:5]} differ"
        for k in x:
            d = first_difference(x[k], y[k], f"{path}/{k}")
            if d:
                return d
        return ""
    if same(x, y):
        return ""

    def show(v: Any) -> str:
        if isinstance(v, torch.Tensor):
            return f"tensor {v.dtype} {list(v.shape)}"
        return repr(v)[:60]

    return f"{path or '/'}: {show(y)} instead of {show(x)}"


def _memory_error(e: BaseException) -> bool:
    """Whether ``e`` or an exception it was raised from is an allocation failure."""
    seen = 0
    while e is not None and seen < 20:
        if isinstance(e, MemoryError) or _mentions_memory(str(e)):
            return True
        e, seen = e.__cause__ or e.__context__, seen + 1
    return False


def _mentions_memory(msg: str) -> bool:
    return re.search(r"alloc|out of memory|memory error", msg, re.IGNORECASE) is not None


def _one_line(msg: str) -> bool:
    return bool(msg.strip()) and "\n" not in msg.strip() and "Traceback" not in msg


def _maxrss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


@dataclass
class Result:
    outcome: str
    detail: str = ""


def run_case(
    kind: str, read: Callable[[bytes], Any], data: bytes, time_limit: float = TIME_LIMIT_S
) -> tuple[Result, Any]:
    """Read ``data`` under the time limit and classify what happened; also returns the value
    read (None unless it loaded)."""
    previous = signal.signal(signal.SIGALRM, _on_alarm)
    try:
        return _run_case(kind, read, data, time_limit)
    finally:
        signal.signal(signal.SIGALRM, previous)


def _run_case(
    kind: str, read: Callable[[bytes], Any], data: bytes, time_limit: float
) -> tuple[Result, Any]:
    from bns.config import TrainingError
    from bns.solver import SolverFileError

    refusal = {"solver": SolverFileError, "range": SolverFileError, "checkpoint": TrainingError}
    rss0 = _maxrss_mib()
    # A hang inside C code would not return to the alarm: this ends the run (with stacks) then.
    faulthandler.dump_traceback_later(time_limit * 6, exit=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        signal.setitimer(signal.ITIMER_REAL, time_limit)
        try:
            value = read(data)
        except _Hang:
            return Result("hang", f"over {time_limit:g} s"), None
        except Exception as e:  # noqa: BLE001 - classifying every exception is the point
            msg = str(e)
            if _memory_error(e):
                return Result("oom", f"{type(e).__name__}: {msg[:300]}"), None
            if kind in refusal and isinstance(e, refusal[kind]) and _one_line(msg):
                return Result("refused", msg), None
            return Result("crash", f"{type(e).__name__}: {msg[:500]}"), None
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            faulthandler.cancel_dump_traceback_later()
    messages = [str(w.message) for w in caught]
    if _maxrss_mib() - rss0 > RSS_GROWTH_MIB:
        return Result("oom", f"peak memory grew by {_maxrss_mib() - rss0:.0f} MiB"), None
    if any(_mentions_memory(m) for m in messages):
        return Result("oom", " | ".join(messages)[:300]), None
    if not all(_one_line(m) for m in messages):
        return Result("crash", "warning of several lines: " + " | ".join(messages)[:500]), None
    if value is None and kind in ("cache", "shard"):
        return Result("refused", messages[0] if messages else "None (no warning)"), None
    return Result("loaded"), _normal(value)


# -- mutations: bytes ---------------------------------------------------------------------------
@dataclass
class Mutant:
    data: bytes
    resigned: bool = False  # the fuzzer recomputed the checksum / digest, or re-saved the file


GARBAGE = [
    b"\n",
    b"  \n\t ",
    b"\x00",
    b"\x00" * 64,
    b"{}",
    b"]",
    b'{"nfe": 4}',
    b"\xff\xfe\xfd",
    b"NaN",
    b"PK\x03\x04",
    b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ",
]


def bitflip(rng: random.Random, raw: bytes, lo: int = 0, hi: int | None = None) -> bytes:
    """Flip 1 to 8 random bits of ``raw[lo:hi]``."""
    b, hi = bytearray(raw), len(raw) if hi is None else hi
    for _ in range(rng.randint(1, 8)):
        b[rng.randrange(lo, hi)] ^= 1 << rng.randrange(8)
    return bytes(b)


def truncate(rng: random.Random, raw: bytes) -> bytes:
    return raw[: rng.randrange(len(raw))]


def append(rng: random.Random, raw: bytes) -> bytes:
    r = rng.random()
    if r < 0.4:
        return raw + rng.randbytes(rng.randint(1, 64))
    if r < 0.9:
        return raw + rng.choice(GARBAGE) * rng.randint(1, 3)
    return raw + raw  # the file twice


def splice(rng: random.Random, raw: bytes) -> bytes:
    """Delete, repeat, insert, zero or overwrite a random range of bytes."""
    i = rng.randrange(len(raw))
    j = min(len(raw), i + rng.randint(1, 64))
    how = rng.randrange(5)
    if how == 0:
        return raw[:i] + raw[j:]
    if how == 1:
        return raw[:j] + raw[i:j] + raw[j:]
    if how == 2:
        return raw[:i] + rng.randbytes(j - i) + raw[i:]
    if how == 3:
        return raw[:i] + bytes(j - i) + raw[j:]
    return raw[:i] + rng.randbytes(j - i) + raw[j:]


BYTE_OPS: dict[str, Callable[[random.Random, bytes], bytes]] = {
    "bitflip": bitflip,
    "truncate": truncate,
    "append": append,
    "splice": splice,
}


# -- mutations: JSON (solver and guidance-range files) ------------------------------------------
_NO = object()  # a raw token without a Python value (the reader cannot parse it either)

HUGE = [  # (JSON token, the value Python's json reads it as, or _NO)
    ("1e308", 1e308),
    ("-1e308", -1e308),
    ("1e999", math.inf),
    ("-1e999", -math.inf),
    ("1" + "0" * 400, 10**400),
    ("-1" + "0" * 400, -(10**400)),
    ("1" + "0" * 5000, _NO),  # over Python's int-parsing limit
    ("1e-400", 0.0),
    ("4.9e-324", 5e-324),
    ("-0.0", -0.0),
    ("18446744073709551617", 2**64 + 1),
    ("1000000000", 10**9),
]
NONFINITE = [("NaN", math.nan), ("Infinity", math.inf), ("-Infinity", -math.inf)]
WRONG = ["", "abc", "0.5", "NaN", [], [1, 2], [[]], {}, {"a": 1}, None, True, False, 0, -1, 1.5]


class Doc:
    """A parsed JSON file being edited; raw tokens (huge numbers, NaN) go in as placeholders."""

    def __init__(self, obj: Any, checksum: bool) -> None:
        self.obj = copy.deepcopy(obj)
        self.checksum = checksum  # whether the format carries a checksum to re-sign
        self.raw: dict[str, tuple[str, Any]] = {}
        self.text_edit: Callable[[str], str] | None = None

    def token(self, token: str, value: Any) -> str:
        mark = f"@@raw{len(self.raw)}@@"
        self.raw[mark] = (token, value)
        return mark

    def _values(self, node: Any) -> Any:
        if isinstance(node, str) and node in self.raw:
            if self.raw[node][1] is _NO:
                raise ValueError("no value")
            return self.raw[node][1]
        if isinstance(node, dict):
            return {k: self._values(v) for k, v in node.items()}
        if isinstance(node, list):
            return [self._values(v) for v in node]
        return node

    def dump(self, resign: bool, indent: Any = 1, **kw: Any) -> Mutant:
        """The file's bytes, with the checksum recomputed over the edited values if ``resign``
        (as a forger would: bns's sha256 over the sorted JSON of all but the checksum)."""
        signed = False
        if resign and self.checksum and isinstance(self.obj, dict):
            try:
                body = {k: v for k, v in self._values(self.obj).items() if k != "checksum"}
                digest = json.dumps(body, sort_keys=True).encode()
                self.obj["checksum"] = hashlib.sha256(digest).hexdigest()
                signed = True
            except (ValueError, RecursionError):
                pass  # a value no reader can parse: left unsigned
        text = json.dumps(self.obj, indent=indent, **kw)
        for mark, (token, _) in self.raw.items():
            text = text.replace(json.dumps(mark), token)
        if self.text_edit is not None:
            text = self.text_edit(text)
        return Mutant((text + "\n").encode(), signed)


def _paths(node: Any, prefix: tuple = ()) -> list[tuple]:
    """Every path below ``node`` (not the root itself)."""
    out = []
    items = (
        node.items()
        if isinstance(node, dict)
        else enumerate(node)
        if isinstance(node, list)
        else ()
    )
    for k, v in items:
        out.append((*prefix, k))
        out += _paths(v, (*prefix, k))
    return out


def _get(node: Any, path: tuple) -> Any:
    for k in path:
        node = node[k]
    return node


def _set(node: Any, path: tuple, value: Any) -> None:
    _get(node, path[:-1])[path[-1]] = value


def _numbers(obj: Any) -> list[tuple]:
    return [
        p
        for p in _paths(obj)
        if isinstance(_get(obj, p), (int, float)) and not isinstance(_get(obj, p), bool)
    ]


def _nested(depth: int) -> list:
    node: list = []
    for _ in range(depth - 1):
        node = [node]
    return node


def _shuffled(rng: random.Random, node: Any) -> Any:
    if isinstance(node, dict):
        keys = list(node)
        rng.shuffle(keys)
        return {k: _shuffled(rng, node[k]) for k in keys}
    if isinstance(node, list):
        return [_shuffled(rng, v) for v in node]
    return node


def j_reformat(rng: random.Random, doc: Doc) -> None:
    """Other whitespace and key order: the same values (should load equal)."""
    doc.obj = _shuffled(rng, doc.obj)
    spaces = rng.choice(["", " ", "\n", "\t", "\r\n", "   "])
    doc.text_edit = lambda text: spaces + text + spaces


def j_delete_key(rng: random.Random, doc: Doc) -> None:
    paths = [p for p in _paths(doc.obj) if isinstance(_get(doc.obj, p[:-1]), dict)]
    p = rng.choice(paths)
    del _get(doc.obj, p[:-1])[p[-1]]


def j_wrong_type(rng: random.Random, doc: Doc) -> None:
    p = rng.choice(_paths(doc.obj))
    _set(doc.obj, p, copy.deepcopy(rng.choice(WRONG)))


def j_huge_number(rng: random.Random, doc: Doc) -> None:
    paths = _numbers(doc.obj) if rng.random() < 0.8 else _paths(doc.obj)
    p = rng.choice(paths)
    _set(doc.obj, p, doc.token(*rng.choice(HUGE)))


def j_nonfinite(rng: random.Random, doc: Doc) -> None:
    p = rng.choice(_numbers(doc.obj))
    _set(doc.obj, p, doc.token(*rng.choice(NONFINITE)))


def j_nfe(rng: random.Random, doc: Doc) -> None:
    n = doc.obj.get("nfe", 4) if isinstance(doc.obj.get("nfe"), int) else 4
    choice = rng.choice(
        [0, -1, -(10**9), 10**9, 10**18, n + 1, n - 1, 1.5, float(n), str(n), True, None, [n]]
    )
    doc.obj["nfe"] = choice
    if rng.random() < 0.3 and isinstance(choice, int) and not isinstance(choice, bool):
        doc.obj.get("meta", {})["nfe"] = choice  # the copy in meta too, as a careful forger


def j_extra_key(rng: random.Random, doc: Doc) -> None:
    dicts = [()] + [p for p in _paths(doc.obj) if isinstance(_get(doc.obj, p), dict)]
    target = _get(doc.obj, rng.choice(dicts))
    value = rng.choice(
        [1, "x", None, [1, {"y": [None, {"z": {}}]}], {"a": {"b": {"c": [1, 2, 3]}}}, 1e300]
    )
    target[rng.choice(["extra", "nfe2", "__proto__", "", "times ", "\u00e9\u00e8"])] = value


def j_rows(rng: random.Random, doc: Doc) -> None:
    """Edit the rows of ``b``: reorder, repeat, drop, add, lengthen, square up."""
    rows = doc.obj.get("b")
    if not isinstance(rows, list) or len(rows) < 2:
        return j_wrong_type(rng, doc)
    how = rng.randrange(6)
    i, j = rng.sample(range(len(rows)), 2)
    if how == 0:
        rows[i], rows[j] = rows[j], rows[i]
    elif how == 1:
        rows.insert(i, copy.deepcopy(rows[j]))
    elif how == 2:
        del rows[i]
    elif how == 3:
        rows.append(rows[-1] + [0.0])
    elif how == 4:
        rows[i] = rows[i] + [0.0] if rng.random() < 0.5 else rows[i][:-1]
    else:
        n = len(rows)
        doc.obj["b"] = [r + [0.0] * (n - len(r)) for r in rows]  # the full matrix


def j_lengths(rng: random.Random, doc: Doc) -> None:
    name = rng.choice([k for k in ("times", "a") if isinstance(doc.obj.get(k), list)] or ["a"])
    values = doc.obj.setdefault(name, [])
    how = rng.randrange(3)
    if how == 0 and values:
        values.pop(rng.randrange(len(values)))
    elif how == 1:
        values.insert(rng.randrange(len(values) + 1), rng.choice([0.5, 1.0, 0.0]))
    else:
        doc.obj[name] = []


def j_header(rng: random.Random, doc: Doc) -> None:
    """Edit ``format``, ``format_version`` or ``checksum``."""
    name = rng.choice(["format", "format_version", "checksum"])
    doc.obj[name] = rng.choice(
        [
            None,
            0,
            1,
            2,
            -1,
            10**400,
            1.0,
            "1",
            True,
            "bns-ns-solver",
            "bns-guidance-range",
            "0" * 64,
        ]
    )


def j_deep(rng: random.Random, doc: Doc) -> None:
    """A deeply nested list in place of a value (Python's json recurses)."""
    depth = rng.choice([50, 500, 990, 2000, 100_000])
    p = rng.choice(_paths(doc.obj))
    value = _nested(depth) if depth <= 500 else _NO
    _set(doc.obj, p, doc.token("[" * depth + "]" * depth, value))


def j_duplicate_key(rng: random.Random, doc: Doc) -> None:
    """A key twice in the top object (json keeps the last one)."""
    if not isinstance(doc.obj, dict) or not doc.obj:
        return j_wrong_type(rng, doc)
    key = rng.choice(list(doc.obj))
    value = json.dumps(rng.choice([doc.obj[key], 7, "x", [1], None]))
    first = rng.random() < 0.5

    def edit(text: str) -> str:
        s = text.strip()
        entry = f"{json.dumps(key)}: {value}"
        return "{" + entry + ", " + s[1:] if first else s[:-1] + ", " + entry + "}"

    doc.text_edit = edit


def j_number_tweak(rng: random.Random, doc: Doc) -> None:
    """A plausible edit of one number: the next float, negated, doubled, a neighbour's."""
    main = [p for p in _numbers(doc.obj) if p and p[0] in ("times", "a", "b", "coefs", "t_ends")]
    p = rng.choice(main or _numbers(doc.obj))
    v = float(_get(doc.obj, p))
    how = rng.randrange(5)
    if how == 0:
        new = math.nextafter(v, math.inf)
    elif how == 1:
        new = -v
    elif how == 2:
        new = 2 * v + 1e-3
    elif how == 3:
        new = v + rng.uniform(-0.1, 0.1)
    else:
        parent = _get(doc.obj, p[:-1])
        new = float(parent[rng.randrange(len(parent))]) if isinstance(parent, list) else 0.0
    _set(doc.obj, p, new)


JSON_OPS: dict[str, Callable[[random.Random, Doc], None]] = {
    "reformat": j_reformat,
    "delete_key": j_delete_key,
    "wrong_type": j_wrong_type,
    "huge_number": j_huge_number,
    "nonfinite": j_nonfinite,
    "nfe": j_nfe,
    "extra_key": j_extra_key,
    "rows": j_rows,
    "lengths": j_lengths,
    "header": j_header,
    "deep_nesting": j_deep,
    "duplicate_key": j_duplicate_key,
    "number_tweak": j_number_tweak,
}
RANGE_OPS = ["reformat", "delete_key", "wrong_type", "huge_number", "nonfinite", "extra_key"]
RANGE_OPS += ["header", "deep_nesting", "duplicate_key", "number_tweak"]


def mutate_json(rng: random.Random, base: Base, op: str) -> Mutant:
    if op in BYTE_OPS:
        return Mutant(BYTE_OPS[op](rng, base.data))
    doc = Doc(json.loads(base.data), checksum=base.kind == "solver")
    JSON_OPS[op](rng, doc)
    # Half the edits are re-signed: those test the reader's checks behind the checksum.
    resign = op not in ("reformat", "duplicate_key") and rng.random() < 0.5
    indent = rng.choice([1, None, 2, "\t"]) if op == "reformat" else 1
    return doc.dump(resign, indent=indent)


# -- mutations: safetensors (cache and shard files) --------------------------------------------
def _st_split(raw: bytes) -> tuple[int, dict, bytes]:
    n = int.from_bytes(raw[:8], "little")
    return n, json.loads(raw[8 : 8 + n]), raw[8 + n :]


def _st_join(header: dict | bytes, data: bytes, pad: bool = True) -> bytes:
    text = header if isinstance(header, bytes) else json.dumps(header).encode()
    if pad:
        text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text + data


def _load_st(raw: bytes) -> dict[str, torch.Tensor]:
    from safetensors.torch import load

    return load(raw)


def _tensor_names(header: dict) -> list[str]:
    return [k for k in header if k != "__metadata__"]


def s_header_size(rng: random.Random, raw: bytes) -> Mutant:
    n = int.from_bytes(raw[:8], "little")
    size = rng.choice(
        [0, 1, 7, n - 1, n + 1, n + 8, len(raw), len(raw) + 1, 2**32, 2**63, 2**64 - 1]
    )
    return Mutant(size.to_bytes(8, "little") + raw[8:])


def s_shape(rng: random.Random, raw: bytes) -> Mutant:
    _, h, data = _st_split(raw)
    t = h[rng.choice(_tensor_names(h))]
    rows = t["shape"][0] if t["shape"] else 1
    t["shape"] = copy.deepcopy(
        rng.choice(
            [
                [10**12, 8],
                [10**12] * 3,
                [2**62, 2**62],
                [2**64 - 1],
                [],
                [0],
                [-1, 8],
                [rows + 1, *t["shape"][1:]],
                [rows - 1, *t["shape"][1:]],
                list(reversed(t["shape"])),
                [math.prod(t["shape"])],
                ["a"],
                [1.5],
                None,
            ]
        )
    )
    return Mutant(_st_join(h, data))


def s_dtype(rng: random.Random, raw: bytes) -> Mutant:
    _, h, data = _st_split(raw)
    t = h[rng.choice(_tensor_names(h))]
    t["dtype"] = rng.choice(
        ["F64", "F32", "F16", "BF16", "I64", "I32", "U8", "BOOL", "F8_E4M3", "X", "f32", 5, None]
    )
    return Mutant(_st_join(h, data))


def s_offsets(rng: random.Random, raw: bytes) -> Mutant:
    _, h, data = _st_split(raw)
    t = h[rng.choice(_tensor_names(h))]
    b, e = t["data_offsets"]
    t["data_offsets"] = rng.choice(
        [
            [0, 10**15],
            [e, b],
            [b, e + 1],
            [b + 1, e + 1],
            [0, len(data)],
            [b, 2**64 - 1],
            [-1, e],
            [str(b), e],
            [b],
            [b, e, e],
            None,
        ]
    )
    return Mutant(_st_join(h, data))


def s_entries(rng: random.Random, raw: bytes) -> Mutant:
    """Delete, rename or add a tensor entry of the header."""
    _, h, data = _st_split(raw)
    names = _tensor_names(h)
    how = rng.randrange(4)
    name = rng.choice(names)
    if how == 0:
        del h[name]
    elif how == 1:
        h[name + "9"] = h.pop(name)
    elif how == 2:
        h["z"] = {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}  # overlaps another
    else:
        h["z"] = {"dtype": "F32", "shape": [1], "data_offsets": [len(data), len(data) + 4]}
        data += b"\x00\x00\xc0\x7f"  # NaN, at the end: a well-formed extra tensor
    return Mutant(_st_join(h, data))


def s_metadata(rng: random.Random, raw: bytes) -> Mutant:
    """Edit the key, digest or nfe of ``__metadata__``, or the metadata itself."""
    _, h, data = _st_split(raw)
    meta = h.setdefault("__metadata__", {})
    which = rng.randrange(5)
    if which == 0:
        key = json.loads(meta["key"])
        edits = [
            None,
            "null",
            "{}",
            "{{",
            "[" * 100_000 + "]" * 100_000,
            "1" * 5000,
            json.dumps({**key, "seed": key.get("seed", 0) + 1}, sort_keys=True),
            json.dumps({**key, "extra": 1}, sort_keys=True),
            json.dumps(key),  # another key order: the same key
            json.dumps(key, sort_keys=True).replace('"version": 1', '"version": 1e999'),
        ]
        value = rng.choice(edits)
        if value is None:
            del meta["key"]
        else:
            meta["key"] = value
    elif which == 1:
        d = meta["digest"]
        meta["digest"] = rng.choice(
            ["", "0" * 64, d[:-1] + ("0" if d[-1] != "0" else "1"), d.upper()]
        )
    elif which == 2:
        meta["nfe_per_sample"] = rng.choice(
            [
                "nan",
                "inf",
                "-inf",
                "-1",
                "abc",
                "",
                "1e999",
                "1" * 5000,
                "0x10",
                " 12 ",
                "1e308",
                "0",
            ]
        )
    elif which == 3:
        meta[rng.choice(["extra", "", "key2"])] = rng.choice(["1", "x" * 1000, "[]"])
    else:
        h["__metadata__"] = rng.choice([None, 5, [], "x", {"key": 5}, {"digest": None}, {}])
    return Mutant(_st_join(h, data))


def s_header_text(rng: random.Random, raw: bytes) -> Mutant:
    """Edit the header's text: whitespace, key order, duplicate keys, nesting, other JSON."""
    n, h, data = _st_split(raw)
    text = raw[8 : 8 + n]
    how = rng.randrange(6)
    if how == 0:
        new = text.rstrip() + b" " * rng.randint(0, 64)  # other padding: the same header
    elif how == 1:
        new = json.dumps(_shuffled(rng, h), indent=rng.choice([None, 1])).encode()
    elif how == 2:
        name = rng.choice(_tensor_names(h))
        entry = json.dumps({name: h[name]})[1:-1].encode()
        new = b"{" + entry + b"," + text.strip()[1:]  # a tensor entry twice
    elif how == 3:
        new = b"[" * 100_000 + b"]" * 100_000
    elif how == 4:
        new = rng.choice([b"[]", b"null", b"1", b'"x"', b"{", b"", b"\xff\xfe{}"])
    else:
        new = text.replace(b"{", b"{" * 2, 1)
    return Mutant(_st_join(new, data, pad=rng.random() < 0.5))


def s_resign(rng: random.Random, raw: bytes) -> Mutant:
    """Edit the tensors and recompute the digest, as a forger would (bns's own digest)."""
    from safetensors.torch import save

    from bns.pairs import _digest, _meta_digest

    _, h, _ = _st_split(raw)
    meta = dict(h["__metadata__"])
    t = dict(sorted(_load_st(raw).items()))  # safetensors gives them in hash order
    n = t["x0"].shape[0]
    how = rng.randrange(10)
    if how == 0:
        t["x1"] = t["x1"] + 1e-3 * torch.randn(
            t["x1"].shape, generator=torch.Generator().manual_seed(rng.randrange(2**31))
        )
    elif how == 1:
        t["x1"] = t["x1"].clone()
        t["x1"][rng.randrange(n)] = math.nan
    elif how == 2:
        t["x0"] = t["x0"].double()
    elif how == 3 and "y" in t:
        t["y"] = t["y"][: n - 1]
    elif how == 4 and "y" in t:
        t["y"] = t["y"].float()
    elif how == 5:
        drop = rng.choice(["x1", "y"])
        t = {k: v for k, v in t.items() if k != drop}
    elif how == 6:
        t["z"] = torch.zeros(())
    elif how == 7:
        t["x0"], t["x1"] = t["x0"][:, :-1].contiguous(), t["x1"][:, :-1].contiguous()
    elif how == 8:
        t = {k: v[: n - 1].contiguous() for k, v in t.items()}
    else:
        t = {k: v[:0].contiguous() for k, v in t.items()}
    meta["digest"] = _digest(t)
    if "meta_digest" in meta:  # the digest of the metadata covers the tensors' digest
        meta["meta_digest"] = _meta_digest(meta)
    return Mutant(save(t, metadata=meta), resigned=True)


def _plain(op: Callable[[random.Random, bytes], bytes]) -> Callable[[random.Random, bytes], Mutant]:
    def mutate(rng: random.Random, raw: bytes) -> Mutant:
        return Mutant(op(rng, raw))

    return mutate


def _region(rng: random.Random, raw: bytes, part: str) -> Mutant:
    n = int.from_bytes(raw[:8], "little")
    lo, hi = (8, 8 + n) if part == "header" else (8 + n, len(raw))
    return Mutant(bitflip(rng, raw, lo, hi))


ST_OPS: dict[str, Callable[[random.Random, bytes], Mutant]] = {
    **{name: _plain(op) for name, op in BYTE_OPS.items()},
    "bitflip_header": lambda rng, raw: _region(rng, raw, "header"),
    "bitflip_data": lambda rng, raw: _region(rng, raw, "data"),
    "header_size": s_header_size,
    "shape": s_shape,
    "dtype": s_dtype,
    "offsets": s_offsets,
    "entries": s_entries,
    "metadata": s_metadata,
    "header_text": s_header_text,
    "resign": s_resign,
}


# -- mutations: checkpoints (torch.save zip files) ---------------------------------------------
def _members(raw: bytes) -> dict[str, tuple[int, int]]:
    """Where each zip member's data lies: name -> (start, end)."""
    out = {}
    with zipfile.ZipFile(io.BytesIO(raw)) as z:
        for info in z.infolist():
            o = info.header_offset
            name_len, extra_len = struct.unpack("<HH", raw[o + 26 : o + 30])
            start = o + 30 + name_len + extra_len
            out[info.filename] = (start, start + info.compress_size)
    return out


def _member_flip(rng: random.Random, raw: bytes, which: str) -> Mutant:
    spans = [
        s for name, s in _members(raw).items() if (name.endswith(".pkl")) == (which == "pickle")
    ]
    spans = [s for s in spans if s[1] > s[0]]
    lo, hi = rng.choice(spans)
    return Mutant(bitflip(rng, raw, lo, hi))


def _directory_flip(rng: random.Random, raw: bytes) -> Mutant:
    end = max(e for _, e in _members(raw).values())
    return Mutant(bitflip(rng, raw, end, len(raw)))  # the central directory and its end


def c_resave(rng: random.Random, raw: bytes) -> Mutant:
    """Re-save an edited state with torch.save: another fingerprint, none, or other values."""
    state = torch.load(io.BytesIO(raw), weights_only=True)
    how = rng.randrange(6)
    if how == 0:
        state["fingerprint"] = state["fingerprint"] + " "
    elif how == 1:
        del state["fingerprint"]
    elif how == 2:
        state["fingerprint"] = rng.choice([5, None, torch.zeros(2), ["x"]])
    elif how == 3:
        state = rng.choice([[1, 2], torch.zeros(3), "x", None, 5])
    else:
        tensors = [p for p in _paths(state) if isinstance(_get(state, p), torch.Tensor)]
        p = rng.choice(tensors)
        t = _get(state, p)
        _set(state, p, t + 1 if t.is_floating_point() else t * 2 + 1)
    buf = io.BytesIO()
    torch.save(state, buf)
    return Mutant(buf.getvalue(), resigned=True)


CKPT_OPS: dict[str, Callable[[random.Random, bytes], Mutant]] = {
    **{name: _plain(op) for name, op in BYTE_OPS.items()},
    "bitflip_pickle": lambda rng, raw: _member_flip(rng, raw, "pickle"),
    "bitflip_storage": lambda rng, raw: _member_flip(rng, raw, "storage"),
    "bitflip_directory": _directory_flip,
    "resave": c_resave,
}


def operators(kind: str) -> list[str]:
    if kind == "solver":
        return [*BYTE_OPS, *JSON_OPS]
    if kind == "range":
        return [*BYTE_OPS, *RANGE_OPS]
    if kind in ("cache", "shard"):
        return list(ST_OPS)
    return list(CKPT_OPS)


def mutate(rng: random.Random, base: Base, op: str) -> Mutant:
    if base.kind in ("solver", "range"):
        return mutate_json(rng, base, op)
    if base.kind in ("cache", "shard"):
        return ST_OPS[op](rng, base.data)
    return CKPT_OPS[op](rng, base.data)


# -- what a re-signed file may hold -----------------------------------------------------------
def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def well_formed(base: Base, mutant: Mutant, value: Any) -> bool:
    """Whether a re-signed file that loaded is what its writer could have written (types,
    shapes): if not, the reader let a malformed file through."""
    if base.kind == "solver":
        d = json.loads(mutant.data)
        n = d.get("nfe")
        rows = d.get("b")
        return (
            isinstance(n, int)
            and not isinstance(n, bool)
            and n >= 1
            and all(
                isinstance(d.get(k), list) and all(map(_is_number, d[k])) for k in ("times", "a")
            )
            and isinstance(rows, list)
            and all(isinstance(r, list) and all(map(_is_number, r)) for r in rows)
            and isinstance(d.get("meta", {}), dict)
        )
    if base.kind in ("cache", "shard"):
        t = value["tensors"] if base.kind == "cache" else value
        shape = tuple(base.info["key"]["sample_shape"])
        x0, x1, y = t.get("x0"), t.get("x1"), t.get("y")
        n = x0.shape[0] if x0 is not None and x0.dim() else -1
        nfe = value["nfe"] if base.kind == "cache" else float(t["nfe"])
        return (
            set(t) <= {"x0", "x1", "y", "nfe"}
            and x0 is not None
            and x1 is not None
            and x0.dtype == x1.dtype == torch.float32
            and x0.shape == x1.shape == (n, *shape)
            and (y is None or (y.dtype == torch.long and y.shape == (n,)))
            and (math.isnan(nfe) or 0 <= nfe < math.inf)
        )
    # a checkpoint: the same structure (keys, types, shapes, dtypes) as the run's own
    return _structure(value) == _structure(base.value)


def _pairs(value: dict) -> dict:
    """The tensors of what a cache or shard read gave, without its nfe statistic."""
    return {k: v for k, v in value.get("tensors", value).items() if k != "nfe"}


def _structure(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _structure(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_structure(v) for v in x]
    if isinstance(x, torch.Tensor):
        return ("tensor", x.dtype, tuple(x.shape))
    return type(x).__name__


# -- the run ------------------------------------------------------------------------------------
def _reason(msg: str, work: Path) -> str:
    """A refusal message with paths and numbers blanked, to count refusals by reason."""
    msg = msg.replace(str(work), "<dir>")
    msg = re.sub(r"/\S+", "<path>", msg)
    msg = re.sub(r"\d+(\.\d+)?(e[-+]?\d+)?", "N", msg)
    return msg[:120]


def case_rng(seed: int, kind: str, i: int) -> random.Random:
    return random.Random(f"{seed}:{kind}:{i}")


def fuzz(
    bases: dict[str, list[Base]],
    counts: dict[str, int],
    seed: int,
    work: Path,
    time_limit: float = TIME_LIMIT_S,
    only: int | None = None,
) -> dict[str, Any]:
    """Run ``counts[kind]`` cases of each kind; returns the counts and examples."""
    res: dict[str, Any] = {"totals": {}, "by_operator": {}, "examples": {}, "reasons": {}}
    res["wall_s"] = {}
    for kind, count in counts.items():
        if not count:
            continue
        ops = operators(kind)
        readers = {
            (b.name, mode): _reader(kind, b, work, mode) for b in bases[kind] for mode in range(3)
        }
        for b in bases[kind]:  # what the originals read as
            r, b.value = run_case(kind, readers[b.name, 0], b.data, time_limit)
            assert r.outcome == "loaded", f"the original {b.name} did not load: {r.detail}"
        totals: Counter = Counter()
        by_op: dict[str, Counter] = {op: Counter() for op in ops}
        examples: list[dict] = []
        reasons: Counter = Counter()
        t0 = time.perf_counter()
        for i in range(count) if only is None else [only]:
            rng = case_rng(seed, kind, i)
            op = ops[i % len(ops)]
            base = rng.choice(bases[kind])
            mutant = mutate(rng, base, op)
            mode = rng.randrange(3)
            r, value = run_case(kind, readers[base.name, mode], mutant.data, time_limit)
            if r.outcome == "loaded":
                if same(value, base.value):
                    r = Result("loaded-equal")
                elif mutant.resigned and well_formed(base, mutant, value):
                    r = Result("accepted-resigned")
                elif base.kind in ("cache", "shard") and same(_pairs(value), _pairs(base.value)):
                    r = Result("nfe-differs", first_difference(base.value, value))
                else:
                    diff = first_difference(base.value, value)
                    r = Result(
                        "loaded-different", ("re-signed: " if mutant.resigned else "") + diff
                    )
            totals[r.outcome] += 1
            by_op[op][r.outcome] += 1
            if r.outcome == "refused":
                reasons[_reason(r.detail, work)] += 1
            if r.outcome in BAD and sum(e["outcome"] == r.outcome for e in examples) < 10:
                examples.append(
                    {"case": i, "op": op, "base": base.name, "mode": mode, "outcome": r.outcome}
                    | {"resigned": mutant.resigned, "detail": r.detail[:300]}
                )
            if only is not None:
                print(f"{kind} case {i}: {op} on {base.name} (mode {mode}): {r.outcome} {r.detail}")
                read = readers[base.name, mode]
                try:
                    read(mutant.data)
                except Exception:  # noqa: BLE001 - show it
                    traceback.print_exc()
        res["wall_s"][kind] = round(time.perf_counter() - t0, 2)
        res["totals"][kind] = {o: totals[o] for o in OUTCOMES} | {"files": sum(totals.values())}
        res["by_operator"][kind] = {
            op: {o: c[o] for o in OUTCOMES if c[o]} for op, c in by_op.items()
        }
        res["examples"][kind] = examples
        res["reasons"][kind] = dict(reasons.most_common(12))
        bad = {o: totals[o] for o in BAD if totals[o]}
        print(
            f"{kind}: {sum(totals.values())} files, {dict(totals)}"
            + (f"  BAD {bad}" if bad else ""),
            flush=True,
        )
    return res


def limit_memory(gib: float) -> int:
    """Cap this process's address space at its present size plus ``gib``; returns the cap."""
    with open("/proc/self/status") as f:
        vm = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:"))
    cap = vm + int(gib * 2**30)
    resource.setrlimit(resource.RLIMIT_AS, (cap, resource.getrlimit(resource.RLIMIT_AS)[1]))
    return cap


def machine() -> str:
    return (
        f"{platform.machine()}, {os.cpu_count()} CPU cores, {torch.get_num_threads()} torch"
        f" threads, no GPU, Python {platform.python_version()}, torch {torch.__version__}"
    )


NOTES = {
    "range": "`GuidanceRangeSolver.load` (src/bns/guidance_range.py) was outside this round of"
    " fixes: its file carries no checksum, so an edited or corrupted number, key or type that"
    " still makes valid solvers loads as other values, and deeply nested JSON escapes as a"
    " RecursionError.",
}


def markdown(res: dict) -> str:
    L = ["### Fuzzing the file readers", ""]
    L += [
        f"Machine: {res['machine']}. Command: `{res['command']}`. Each case under a"
        f" {res['time_limit_s']:g} s alarm, with the address space capped at"
        f" {res['memory_limit_gib']:g} GiB over the process's size; {res['wall_s']['total']:.0f} s"
        " in all.",
        "",
        "| file kind | files | " + " | ".join(o.replace("-", " ") for o in OUTCOMES) + " |",
        "|---" * (len(OUTCOMES) + 2) + "|",
    ]
    for kind, t in res["totals"].items():
        L.append(f"| {kind} | {t['files']:,} | " + " | ".join(f"{t[o]:,}" for o in OUTCOMES) + " |")
    L += [
        "",
        "Refused: a bns error of one line (for a cache or shard: None, recompute, with a warning"
        " of one line). Accepted re-signed: an edit whose checksum (solver), digest (cache,"
        " shard) the fuzzer recomputed, or a checkpoint it re-saved, read as a well-formed file:"
        " a checksum detects corruption, not a forger. Nfe differs: the original pairs with"
        " another `nfe_per_sample`, a cost statistic that the cache's digest does not cover (the"
        " reader refuses one that is not NaN or a finite number >= 0).",
    ]
    for kind in res["totals"]:
        if kind in NOTES and any(res["totals"][kind][o] for o in BAD):
            L += ["", NOTES[kind]]
    L += ["", "By operator (outcome: count):", ""]
    L += ["| file kind | operator | outcomes |", "|---|---|---|"]
    for kind, ops in res["by_operator"].items():
        for op, c in ops.items():
            L.append(f"| {kind} | {op} | " + ", ".join(f"{o} {n}" for o, n in c.items()) + " |")
    bad = [(k, e) for k, ex in res["examples"].items() for e in ex]
    if bad:
        L += ["", "Examples of bad outcomes (rerun one with `--kind KIND --case N`):", ""]
        for kind, e in bad:
            L.append(
                f"- {kind} case {e['case']} ({e['op']} on {e['base']}): {e['outcome']}: {e['detail']}"
            )
    return "\n".join(L) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--solvers", type=int, default=10_000, help="mutated solver files")
    ap.add_argument("--caches", type=int, default=2_000, help="mutated cache + shard files")
    ap.add_argument("--ranges", type=int, default=1_000, help="mutated guidance-range files")
    ap.add_argument("--checkpoints", type=int, default=1_000, help="mutated checkpoints")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--time-limit", type=float, default=TIME_LIMIT_S, help="seconds per case")
    ap.add_argument("--memory-gib", type=float, default=MEMORY_LIMIT_GIB)
    ap.add_argument("--kind", choices=KINDS, help="with --case: rerun one case")
    ap.add_argument("--case", type=int, help="rerun case CASE of --kind and print its traceback")
    args = ap.parse_args()
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        folder, work = Path(tmp) / "bases", Path(tmp) / "work"
        folder.mkdir()
        work.mkdir()
        bases = make_bases(folder)
        t_bases = time.perf_counter() - t0
        limit_memory(args.memory_gib)  # after the real files: the readers alone run capped
        if args.case is not None:
            fuzz(bases, {args.kind: args.case + 1}, args.seed, work, args.time_limit, args.case)
            return
        counts = {
            "solver": args.solvers,
            "range": args.ranges,
            "cache": (args.caches + 1) // 2,
            "shard": args.caches // 2,
            "checkpoint": args.checkpoints,
        }
        res = fuzz(bases, counts, args.seed, work, args.time_limit)
    res["wall_s"]["making the files"] = round(t_bases, 2)
    res["wall_s"]["total"] = round(time.perf_counter() - t0, 2)
    res = {
        "command": "python benchmarks/fuzz.py " + " ".join(sys.argv[1:]),
        "machine": machine(),
        "torch": torch.__version__,
        "seed": args.seed,
        "time_limit_s": args.time_limit,
        "memory_limit_gib": args.memory_gib,
        "bases": {k: [b.name for b in v] for k, v in bases.items()},
        "outcomes": list(OUTCOMES),
        **res,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "fuzz.json").write_text(json.dumps(res, indent=1) + "\n")
    (args.out / "fuzz.md").write_text(markdown(res))


if __name__ == "__main__":
    main()
