"""Two workers under ``torchrun`` (gloo, CPU) give one worker's results, and faults end the job.

On the analytic model through the command line, and on a small network written as a user would
through the Python API: the ground-truth cache equals the single worker's bit for bit, the
distilled solver and eval's rows equal it to 1e-6. A killed worker ends the job with one line
naming it, and a rerun completes from the finished shards; a hung worker ends the job after the
timeout, and ``--resume`` continues to the uninterrupted solver.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import bns
from bns.cli import main
from bns.distributed import World
from bns.executor import _owners
from bns.models.gmm import gaussian_mixture_model
from bns.pairs import _digest, make_pairs

SRC = Path(bns.__file__).parents[1]

# A user's file: a small velocity network, a factory, and the Python API run the test compares.
# The factory can record its worker's pid (to kill it), slow the network down (to kill it in
# the middle; NET_SLEEP_TRAIN: in the optimizer steps alone) and count the ground-truth solves
# (to see which batches a rerun computes).
USER_FILE = r"""
import json, os, sys, time
from pathlib import Path
import torch
from torch import nn
import bns


class Net(nn.Module):
    def __init__(self, dim=8):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.l1, self.l2 = nn.Linear(dim + 1, 32), nn.Linear(32, dim)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(0.3 * torch.randn(p.shape, generator=g))

    def forward(self, x, t, y=None):
        if os.environ.get("NET_SLEEP"):
            time.sleep(float(os.environ["NET_SLEEP"]))
        if os.environ.get("NET_SLEEP_TRAIN") and torch.is_grad_enabled():  # optimizer steps only
            time.sleep(float(os.environ["NET_SLEEP_TRAIN"]))
        out = self.l2(torch.tanh(self.l1(torch.cat([x, t[:, None].to(x.dtype)], 1))))
        if os.environ.get("NET_FAIL_RANK", "none") == os.environ.get("RANK"):
            if os.environ.get("NET_FAIL_KIND") == "nan":
                return torch.where((t > 0.5)[:, None], float("nan"), out)
            raise RuntimeError("out of memory in the user's network")
        return out


class CondNet(nn.Module):  # a conditional network: one solver for a range of guidance scales
    def __init__(self):
        super().__init__()
        self.net, self.emb = Net(), nn.Embedding(4, 8)  # the last row: no label
        with torch.no_grad():
            self.emb.weight.copy_(torch.randn(4, 8, generator=torch.Generator().manual_seed(1)))

    def forward(self, x, t, y):
        return self.net(x + 0.5 * self.emb(y), t)


def cond_net():
    return bns.Model(CondNet(), "velocity", bns.schedules.CondOT(), (8,), num_classes=3, name="c")


def net():
    if os.environ.get("PIDS"):
        Path(os.environ["PIDS"], os.environ["RANK"]).write_text(str(os.getpid()))
    if os.environ.get("GT_LOG"):
        from bns import pairs
        real = pairs.ground_truth
        def counted(model, x0, *args, **kwargs):
            if os.environ.get("GT_LOG"):  # (a later command of the job may unset it)
                with open(Path(os.environ["GT_LOG"], str(os.getpid())), "a") as f:
                    f.write(f"{x0.shape[0]}\n")
            return real(model, x0, *args, **kwargs)
        pairs.ground_truth = counted
    return bns.Model(Net(), "velocity", bns.schedules.CondOT(), (8,), name="mlp")


def run(cache):
    from bns.evaluate import baseline_solvers, evaluate
    from bns.pairs import make_pairs
    model = net()
    solver, hist = bns.distill(model, 4, init="euler", train_pairs=48, val_pairs=24,
                               adam_steps=10, val_every=5, batch_size=8, gt_batch_size=8,
                               gn_steps=2, gn_batch_size=12,
                               cache=cache, progress=False)
    test = make_pairs(model, 20, "test", batch_size=8, cache=cache, progress=False)
    entries = baseline_solvers(model, [4], ["euler", "midpoint"]) + [("bns", 4, solver)]
    return {"solver": solver.to_dict(), "rows": evaluate(model, entries, test),
            "val_psnr": hist["val_psnr"], "forwards": hist["forwards"]}


def record_threads(folder):  # at this worker's very end, after bns's exit handlers (Linux)
    names = [Path(f"/proc/self/task/{t}/comm").read_text().strip()
             for t in os.listdir("/proc/self/task")] if os.path.isdir("/proc/self/task") else []
    Path(folder, "threads-" + os.environ["RANK"]).write_text(json.dumps(names))


if __name__ == "__main__":  # under torchrun: command lines, then the API run (result "-": none)
    import atexit
    from bns.cli import main
    commands, folder, result = json.loads(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
    folder.mkdir(parents=True, exist_ok=True)
    atexit.register(record_threads, folder)  # registered first: runs last
    for argv in commands:
        if isinstance(argv, dict):  # {"env": {NAME: value, or None to unset}, "argv": [...]}
            for name, value in argv["env"].items():
                os.environ.pop(name, None) if value is None else os.environ.update({name: value})
            argv = argv["argv"]
        assert main([a.format(out=folder) for a in argv]) == 0
    if result != "-":
        out = run(folder / "api")
        if os.environ["RANK"] == "0":
            Path(result).write_text(json.dumps(out))
"""

DISTILL = ["distill", "--nfe", "4", "--init", "midpoint", "--quiet", "--batch-size", "8"]
DISTILL += ["--train-pairs", "40", "--val-pairs", "24", "--init-pairs", "24", "--adam-steps", "10"]
DISTILL += ["--val-every", "5", "--gt-batch-size", "8"]
EVAL = ["eval", "--baselines", "euler,midpoint", "--nfe", "4,8", "--test-pairs", "20", "--quiet"]


@pytest.fixture()
def user_file(tmp_path):
    path = tmp_path / "user.py"
    path.write_text(USER_FILE)
    return path


def _env(cache: Path, **extra: str) -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(SRC), BNS_CACHE_DIR=str(cache))
    env.update({"BNS_DIST_TIMEOUT": "30", **extra})
    for name in (
        "RANK",
        "WORLD_SIZE",
        "LOCAL_RANK",
        "NET_SLEEP",
        "NET_SLEEP_TRAIN",
        "PIDS",
        "GT_LOG",
        "NET_FAIL_RANK",
        "NET_FAIL_KIND",
    ):
        if name not in extra:
            env.pop(name, None)
    return env


def _torchrun(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    """``torchrun --nproc-per-node 2 ARGS`` with stdout and stderr into ``log``.out/.err."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    out, err = open(f"{log}.out", "w"), open(f"{log}.err", "w")  # noqa: SIM115
    return subprocess.Popen(cmd + args, env=env, stdout=out, stderr=err)


def _finish(proc: subprocess.Popen, log: Path, timeout: float = 120) -> tuple[str, str]:
    assert proc.wait(timeout=timeout) == 0, Path(f"{log}.err").read_text()[-3000:]
    return Path(f"{log}.out").read_text(), Path(f"{log}.err").read_text()


def _one_worker(commands: list[list[str]], cache: Path) -> None:
    """The command lines run here, as one worker, with the ground-truth cache ``cache``."""
    os.environ["BNS_CACHE_DIR"] = str(cache)
    try:
        for argv in commands:
            assert main(argv) == 0
    finally:
        del os.environ["BNS_CACHE_DIR"]


def _caches(folder: Path) -> dict[str, tuple[dict, dict]]:
    """Every cache file: its tensors and its metadata, by name."""
    out = {}
    for path in sorted(folder.glob("pairs-*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            out[path.name] = ({k: f.get_tensor(k) for k in f.keys()}, f.metadata())
    return out


def _assert_same_caches(a: Path, b: Path) -> None:
    ca, cb = _caches(a), _caches(b)
    assert ca and set(ca) == set(cb)
    for name, (tensors, meta) in ca.items():
        other, other_meta = cb[name]
        assert meta == other_meta, name  # the key, the checksum and the NFE per sample
        assert set(tensors) == set(other)
        for k, v in tensors.items():  # bit for bit: same dtype, same bytes
            assert v.dtype == other[k].dtype and torch.equal(v, other[k]), (name, k)


def _assert_same_solver(a: dict, b: dict, tol: float = 1e-6) -> None:
    for key in ("times", "a", "b"):
        x = torch.tensor([v for row in a[key] for v in (row if isinstance(row, list) else [row])])
        y = torch.tensor([v for row in b[key] for v in (row if isinstance(row, list) else [row])])
        assert x.shape == y.shape and torch.allclose(x, y, rtol=0, atol=tol), key


def _assert_same_rows(a: list[dict], b: list[dict]) -> None:
    assert [(r["solver"], r["nfe"]) for r in a] == [(r["solver"], r["nfe"]) for r in b]
    for ra, rb in zip(a, b):
        for k in ("psnr_mean", "psnr_std", "psnr_median", "psnr_p05", "psnr_p95"):
            assert abs(ra[k] - rb[k]) <= 1e-6, (ra["solver"], k)
        assert ra["test_pairs"] == rb["test_pairs"] and ra["forwards"] == rb["forwards"]


# One fresh interpreter per run checks both: ``import bns`` starts no distributed machinery (the
# first part), and a worker's heartbeat ends before the interpreter finalizes (the second part).
IMPORT_CHECK = (
    "import sys, torch\n"
    "before = set(sys.modules)\n"
    "import bns, bns.cli\n"
    "new = sorted(m for m in set(sys.modules) - before if 'distributed' in m)\n"
    "import torch.distributed as dist\n"
    "from bns.distributed import world\n"
    "from bns.distributed import World\n"
    "print(new, dist.is_initialized(), world() == World(), dist.is_initialized())\n"
)
# A daemon thread still inside a C++ call that released the GIL aborts the process when the
# interpreter finalizes (pytorch/pytorch#38228): a finished job then failed with "terminate
# called without an active exception". The store's ``set`` here is such a call.
HEARTBEAT = (
    "import time, torch\n"
    "from bns import distributed as d\n"
    "class Store:\n"
    "    def set(self, key, value):\n"
    "        a, t = torch.randn(2000), time.monotonic()\n"
    "        while time.monotonic() - t < 1.0:\n"
    "            a + a\n"
    "d._JOB.ready, d._JOB.store, d._BEAT_S = True, Store(), 0.01\n"
    "d._start_heartbeat()\n"
    "time.sleep(0.2)\n"
)


@pytest.fixture(scope="module")
def fresh_interpreters() -> list[subprocess.CompletedProcess]:
    """Two fresh interpreters at once, each running the import check and then the heartbeat."""
    env = _env(Path("unused"))
    cmd = [sys.executable, "-c", IMPORT_CHECK + HEARTBEAT]
    procs = [
        subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    outputs = [p.communicate() for p in procs]
    return [subprocess.CompletedProcess(cmd, p.returncode, *o) for p, o in zip(procs, outputs)]


def test_import_bns_starts_no_distributed_machinery(fresh_interpreters):
    for done in fresh_interpreters:
        assert done.returncode == 0, done.stderr
        assert done.stdout.split() == ["[]", "False", "True", "False"]


def test_a_worker_ends_its_heartbeat_before_the_interpreter_finalizes(fresh_interpreters):
    for done in fresh_interpreters:
        assert done.returncode == 0 and "terminate" not in done.stderr, done.stderr


def test_shares_and_owners():
    for n in (1, 5, 8, 13):
        for size in (1, 2, 3):
            worlds = [World(r, size) for r in range(size)]
            cover = [i for w in worlds for i in range(n)[w.share(n)]]
            assert cover == list(range(n))  # contiguous, in rank order, all of them once
            assert worlds[0].counts(n) == [len(range(n)[w.share(n)]) for w in worlds]
    # A fresh run: batch i to rank i mod K. A rerun: a finished batch is provided by the first
    # worker that holds it, the missing ones go round-robin.
    assert _owners([[False] * 5, [False] * 5]) == [0, 1, 0, 1, 0]
    held = [[True, False, False, False, False], [True, True, False, False, True]]
    assert _owners(held) == [0, 1, 0, 1, 1]


@pytest.fixture(scope="module")
def two_worker_job(tmp_path_factory):
    """One ``torchrun`` job of two workers: the analytic model through the command line (``bns
    distill``, ``bns eval``), the small network through the Python API, and an eval of a network
    that warns; the same (less the warning eval) in this process, as one worker."""
    tmp_path = tmp_path_factory.mktemp("two-workers")
    user_file, warn_file = tmp_path / "user.py", tmp_path / "warn.py"
    user_file.write_text(USER_FILE)
    warn_file.write_text(WARNING_FILE)
    one, two = tmp_path / "one", tmp_path / "two"
    commands = [
        DISTILL + ["--model", "gmm", "--out", "{out}/s.json"],
        EVAL + ["--model", "gmm", "--solver", "{out}/s.json", "--json", "{out}/r.json"],
        # a budget: rank 0 fits it, and every worker stops where one worker would
        ["distill", "--model", "gmm", "--nfe", "4", "--quiet", "--budget", "10k"]
        + ["--gt-batch-size", "8", "--out", "{out}/b.json"],
        # two starts, each to its end, on s.json's cached pairs
        ["distill", "--model", "gmm", "--nfe", "4", "--quiet", "--starts", "2"]
        + ["--train-pairs", "40", "--val-pairs", "24", "--init-pairs", "24", "--gn-steps", "2"]
        + ["--gn-batch-size", "8", "--gt-batch-size", "8", "--out", "{out}/k.json"],
    ]
    # the network that warns, with a cache of its own (the job's cache is compared below)
    warn = ["eval", "--model", f"{warn_file}:net", "--baselines", "euler", "--nfe", "2"]
    warn += ["--test-pairs", "4", "--quiet", "--json", "{out}/e.json", "--cache-dir"]
    warn += ["{out}/warn-cache"]
    # a guidance-range solver, and a span solver (image-to-image), of the conditional network
    small = ["--quiet", "--train-pairs", "24", "--val-pairs", "16", "--init-pairs", "16"]
    small += ["--batch-size", "8", "--gt-batch-size", "8", "--adam-steps", "6", "--val-every", "3"]
    cond = ["distill", "--model", f"{user_file}:cond_net", "--nfe", "4", *small]
    commands += [
        cond + ["--guidance-range", "1,3", "--out", "{out}/g.json"],
        cond + ["--guidance", "2", "--span", "0.4:", "--gn-steps", "0", "--out", "{out}/p.json"],
    ]
    job = [str(user_file), json.dumps([*commands, warn]), str(two), str(tmp_path / "two.json")]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        proc = _torchrun(job, _env(two / "cache"), tmp_path / "job")
        _one_worker([[a.format(out=one) for a in argv] for argv in commands], one / "cache")
        ref = _user_module(user_file).run(one / "api")
        out, err = _finish(proc, tmp_path / "job")
    finally:
        torch.set_num_threads(threads)
    got = json.loads((tmp_path / "two.json").read_text())
    return SimpleNamespace(one=one, two=two, out=out, err=err, ref=ref, got=got)


def test_two_workers_give_one_workers_results(two_worker_job):
    job = two_worker_job
    one, two, ref, got = job.one, job.two, job.ref, job.got
    # rank 0 alone speaks: five distills (one says its two starts), two evals (the warning's
    # is the second)
    assert job.out.count("bns distill:") == 6 and job.out.count("rows ->") == 2
    # The analytic model, on the command line.
    _assert_same_caches(one / "cache", two / "cache")
    assert len([c for c in _caches(one / "cache") if c.startswith("pairs-gmm-")]) == 3
    assert not (two / "cache" / "shards").exists()
    s1, s2 = (json.loads((d / "s.json").read_text()) for d in (one, two))
    _assert_same_solver(s1, s2)
    assert s1["meta"]["best_step"] == s2["meta"]["best_step"]
    assert s1["meta"]["train_forwards"] == s2["meta"]["train_forwards"]  # all workers counted
    for phase, c1 in s1["meta"]["cost"].items():  # the ledger sums every worker's share
        c2 = s2["meta"]["cost"][phase]
        assert (c1["forwards"], c1["jvps"]) == (c2["forwards"], c2["jvps"]), phase
    b1, b2 = (json.loads((d / "b.json").read_text()) for d in (one, two))
    _assert_same_solver(b1, b2)
    assert b1["meta"]["config"]["train_pairs"] == 64  # the rung 10k evaluations buy
    assert b1["meta"]["cost"]["total"] == {
        **b2["meta"]["cost"]["total"],
        "seconds": b1["meta"]["cost"]["total"]["seconds"],
    }
    k1, k2 = (json.loads((d / "k.json").read_text()) for d in (one, two))
    _assert_same_solver(k1, k2)
    assert list(k1["meta"]["starts"]) == list(k2["meta"]["starts"])
    assert len(k1["meta"]["starts"]) == 2
    for name, v in k1["meta"]["starts"].items():
        assert k2["meta"]["starts"][name] == pytest.approx(v, abs=1e-6)
    assert not list(two.glob("k.json.ckpt*"))  # the starts' checkpoints are gone
    r1, r2 = (json.loads((d / "r.json").read_text())["rows"] for d in (one, two))
    _assert_same_rows(r1, r2)
    # The conditional network: one solver for guidance 1 to 3, and one for the span 0.4 to 1.
    g1, g2 = (json.loads((d / "g.json").read_text()) for d in (one, two))
    assert g1["meta"]["steps_run"] == g2["meta"]["steps_run"] == 6
    assert g1["meta"]["best_step"] == g2["meta"]["best_step"]
    for k, v in g1["coefs"].items():
        assert torch.allclose(torch.tensor(v), torch.tensor(g2["coefs"][k]), atol=1e-6), k
    p1, p2 = (json.loads((d / "p.json").read_text()) for d in (one, two))
    _assert_same_solver(p1, p2)
    assert p1["meta"]["span"] == p2["meta"]["span"] and p1["times"][0] == pytest.approx(0.4)
    # The small network, through the Python API.
    _assert_same_caches(one / "api", two / "api")
    _assert_same_solver(ref["solver"], got["solver"])
    _assert_same_rows(ref["rows"], got["rows"])
    assert ref["forwards"] == got["forwards"]
    assert got["val_psnr"] == pytest.approx(ref["val_psnr"], abs=1e-6)


def _user_module(path: Path):
    spec = importlib.util.spec_from_file_location("user_file", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _pids(folder: Path) -> dict[int, int]:
    deadline = time.time() + 60
    while time.time() < deadline and len(list(folder.iterdir())) < 2:
        time.sleep(0.05)
    return {int(p.name): int(p.read_text()) for p in folder.iterdir()}


def _shards(cache: Path) -> list[Path]:
    return sorted(cache.glob("shards/*/*.safetensors"))


def _solves(log: Path) -> int:
    return sum(len(p.read_text().split()) for p in log.iterdir())


def _killed_job(folder: Path, user_file: Path) -> SimpleNamespace:
    """A job whose rank 1 is killed (SIGKILL) in the ground truth, once 3 shards are written."""
    cache, pids, log = folder / "two", folder / "pids", folder / "log"
    pids.mkdir(parents=True)
    log.mkdir()
    args = ["-m", "bns", *DISTILL, "--model", f"{user_file}:net", "--train-pairs", "96"]
    args += ["--out", str(folder / "s.json")]
    env = _env(cache, NET_SLEEP="0.004", PIDS=str(pids), GT_LOG=str(log))
    proc = _torchrun(args, env, folder / "k")
    rank1 = _pids(pids)[1]
    deadline = time.time() + 60
    while time.time() < deadline and len(_shards(cache)) < 3:
        time.sleep(0.02)
    os.kill(rank1, signal.SIGKILL)
    t_kill = time.time()
    rc = proc.wait(timeout=60)
    seconds = time.time() - t_kill
    finished = _shards(cache)
    rows = []
    for path in finished:  # read now: the rerun merges the shards and removes them
        with safe_open(str(path), framework="pt") as f:
            rows.append(f.get_tensor("x1").shape[0])
    for p in log.iterdir():  # the rerun's solves alone are counted
        p.unlink()
    return SimpleNamespace(
        folder=folder, cache=cache, log=log, args=args, rank1=rank1, rc=rc, seconds=seconds,
        err=Path(f"{folder / 'k'}.err").read_text(), finished=finished, rows=rows,
        out_written=(folder / "s.json").exists(),
    )  # fmt: skip


def _hung_args(folder: Path, user_file: Path) -> list[str]:
    args = ["-m", "bns", *DISTILL, "--model", f"{user_file}:net", "--init", "euler"]
    return args + ["--adam-steps", "30", "--out", str(folder / "s.json")]


def _hung_job(folder: Path, user_file: Path, meanwhile: Callable[[], None]) -> SimpleNamespace:
    """A job whose rank 1 stops (SIGSTOP) in the optimizer steps, after the first checkpoint;
    ``meanwhile()`` runs in a thread while the job waits for it (an idle machine, else)."""
    cache, pids, out = folder / "two", folder / "pids", folder / "s.json"
    pids.mkdir(parents=True)
    args = _hung_args(folder, user_file)
    # slowed in the optimizer steps alone: the ground truth before them runs at full speed
    env = _env(cache, NET_SLEEP_TRAIN="0.002", PIDS=str(pids), BNS_DIST_TIMEOUT="3")
    proc = _torchrun(args, env, folder / "h")
    rank = _pids(pids)
    ckpt = out.with_name("s.json.ckpt")
    deadline = time.time() + 60
    while time.time() < deadline and not ckpt.exists():
        time.sleep(0.02)
    os.kill(rank[1], signal.SIGSTOP)  # hung: alive, silent
    t_stop = time.time()
    errors: list[BaseException] = []
    thread = threading.Thread(target=_catching(meanwhile, errors))
    thread.start()
    try:
        while time.time() - t_stop < 30 and proc.poll() is None:
            try:
                os.kill(rank[0], 0)
            except ProcessLookupError:
                break
            time.sleep(0.05)
        waited = time.time() - t_stop
    finally:
        os.kill(rank[1], signal.SIGCONT)
        thread.join()
    if errors:
        raise errors[0]
    rc = proc.wait(timeout=60)
    step = json.loads(torch.load(ckpt, weights_only=True)["scalars"])["step"]
    return SimpleNamespace(
        folder=folder, cache=cache, out=out, ckpt=ckpt, args=args, rc=rc, waited=waited,
        err=Path(f"{folder / 'h'}.err").read_text(), step=step, out_written=out.exists(),
    )  # fmt: skip


def _catching(fn: Callable[[], None], errors: list[BaseException]) -> Callable[[], None]:
    def run() -> None:
        try:
            fn()
        except BaseException as e:  # noqa: BLE001 - raised again in the main thread
            errors.append(e)

    return run


@pytest.fixture(scope="module")
def interrupted(tmp_path_factory):
    """A job with a killed worker and a job with a hung one; then one job continues both, one
    after the other (a launch for the two): the rerun of the first, on its ground-truth cache,
    and the ``--resume`` of the second, on its own. In this process, as one worker, while the
    second job waits for its hung worker: the two runs uninterrupted."""
    tmp_path = tmp_path_factory.mktemp("interrupted")
    user_file = tmp_path / "user.py"
    user_file.write_text(USER_FILE)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        kill = _killed_job(tmp_path / "kill", user_file)
        runs = [
            (kill.folder, kill.args),
            (tmp_path / "hang", _hung_args(tmp_path / "hang", user_file)),
        ]

        def uninterrupted() -> None:  # each job's command line, its --out here
            for folder, argv in runs:
                _one_worker([argv[2:-1] + [str(folder / "one.json")]], folder / "one")

        hang = _hung_job(tmp_path / "hang", user_file, meanwhile=uninterrupted)
        rerun = {"BNS_CACHE_DIR": str(kill.cache), "GT_LOG": str(kill.log)}
        resume = {"BNS_CACHE_DIR": str(hang.cache), "GT_LOG": None}
        commands = [
            {"env": rerun, "argv": kill.args[2:]},
            {"env": resume, "argv": [*hang.args[2:], "--resume"]},
        ]
        job = [str(user_file), json.dumps(commands), str(tmp_path), "-"]
        _finish(_torchrun(job, _env(tmp_path / "unused"), tmp_path / "c"), tmp_path / "c")
    finally:
        torch.set_num_threads(threads)
    return SimpleNamespace(kill=kill, hang=hang)


def _error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("bns distill: error:")]


def test_a_killed_worker_ends_the_job_and_a_rerun_reuses_the_finished_shards(interrupted):
    k = interrupted.kill
    assert k.rc != 0
    assert k.seconds < 30  # bounded, not the collective timeout
    lines = _error_lines(k.err)
    assert len(lines) == 1, k.err[-3000:]
    assert f"worker rank 1 of 2 (pid {k.rank1}) died first" in lines[0] and "Rerun" in lines[0]
    assert 3 <= len(k.finished) < 12 and not k.out_written
    # complete files (a write cut short stays a hidden temporary file)
    assert k.rows == [8] * len(k.finished)
    # The rerun solves only the batches that had not finished (12 train + 3 val in all).
    assert _solves(k.log) == 12 + 3 - len(k.finished)
    assert not _shards(k.cache)
    _assert_same_caches(k.folder / "one", k.cache)
    s1, s2 = (json.loads((k.folder / n).read_text()) for n in ("one.json", "s.json"))
    _assert_same_solver(s1, s2)


@pytest.mark.parametrize("kind", ["raise", "nan"])
def test_a_worker_whose_network_fails_ends_the_job_with_one_line_naming_it(
    kind, tmp_path, user_file, one_thread
):
    out, cache = tmp_path / "s.json", tmp_path / "c"
    args = ["-m", "bns", *DISTILL, "--model", f"{user_file}:net", "--out", str(out)]
    proc = _torchrun(args, _env(cache, NET_FAIL_RANK="1", NET_FAIL_KIND=kind), tmp_path / "f")
    assert proc.wait(timeout=120) != 0
    err = Path(f"{tmp_path / 'f'}.err").read_text()
    lines = [line for line in err.splitlines() if line.startswith("bns distill: error:")]
    assert len(lines) == 1, err[-3000:]
    assert "rank 1" in lines[0], lines[0]
    if kind == "raise":
        assert "out of memory in the user's network" in lines[0], lines[0]
    else:  # what, when and where
        assert "the network returned NaN at flow time t = " in lines[0], lines[0]
        assert "failed in ground truth (train): mlp: " in lines[0], lines[0]
        assert "during ground truth" in lines[0], lines[0]
    # The failing worker keeps no shard; the healthy one's finished shards are whole (and
    # verified: they are what a rerun reuses), and no temporary file is left.
    left = [p for p in cache.rglob("*") if p.is_file()]
    assert all(p.parent.parent.name == "shards" and p.suffix == ".safetensors" for p in left)
    for p in left:
        with safe_open(str(p), framework="pt") as f:
            assert f.metadata()["digest"] == _digest(load_file(str(p)))
    assert not out.exists() and not out.with_name("s.json.ckpt").exists()


def test_a_hung_worker_ends_the_job_and_resume_continues_to_the_same_solver(interrupted):
    h = interrupted.hang
    assert h.rc != 0
    assert 3 <= h.waited < 15  # the timeout, then rank 0 reports and ends
    lines = _error_lines(h.err)
    assert len(lines) == 1, h.err[-3000:]
    assert "worker rank 1 of 2 did not" in lines[0] and "within 3 s" in lines[0]
    assert 5 <= h.step < 30 and not h.out_written
    # --resume (in the continuing job) ends where one uninterrupted worker ends
    s1, s2 = (json.loads(p.read_text()) for p in (h.folder / "one.json", h.out))
    _assert_same_solver(s1, s2)
    assert s1["meta"]["best_step"] == s2["meta"]["best_step"] and not h.ckpt.exists()


CONCURRENT = r"""
import sys, torch
torch.set_num_threads(1)
from bns.models.gmm import gaussian_mixture_model
from bns.pairs import make_pairs
model = gaussian_mixture_model(dim=16, components=4, num_classes=2, std=0.2, seed=3)
p = make_pairs(model, int(sys.argv[2]), "train", batch_size=4, cache=sys.argv[1], progress=False)
torch.save({"x0": p.x0, "x1": p.x1, "y": p.y}, sys.argv[3])
"""


def test_two_jobs_on_one_cache_folder_never_corrupt_it(tmp_path, one_thread):
    """Two jobs at once on one cache: both get their pairs, the cache keeps the longer run."""
    script = tmp_path / "job.py"
    script.write_text(CONCURRENT)
    env = _env(tmp_path / "unused")
    jobs = [
        subprocess.Popen(
            [sys.executable, str(script), str(tmp_path / "c"), str(n), str(tmp_path / f"{n}.pt")],
            env=env,
        )
        for n in (40, 24)
    ]
    model = gaussian_mixture_model(dim=16, components=4, num_classes=2, std=0.2, seed=3)
    want = make_pairs(model, 40, "train", batch_size=4, cache=tmp_path / "r", progress=False)
    assert [j.wait(timeout=120) for j in jobs] == [0, 0]
    _assert_same_caches(tmp_path / "r", tmp_path / "c")
    for n in (40, 24):
        got = torch.load(tmp_path / f"{n}.pt")
        assert torch.equal(got["x0"], want.x0[:n]) and torch.equal(got["x1"], want.x1[:n])
        assert torch.equal(got["y"], want.y[:n])
    assert not list((tmp_path / "c").glob("shards/*/*"))


WARNING_FILE = """
import warnings
import torch
import bns


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor(0.5))

    def forward(self, x, t):
        warnings.warn("the user's network says hello", UserWarning)
        return -self.w * x


def net():
    return bns.Model(Net(), "velocity", bns.schedules.CondOT(), (4,))
"""


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="thread names from /proc")
def test_a_worker_frees_its_process_group_before_the_interpreter_ends(two_worker_job):
    """bns started the job's group, so its exit handler destroys it, and gloo's threads end
    there, before the interpreter finalizes (where they aborted a finished worker now and then).

    The job's Adam steps import ``torch._dynamo`` after the group starts, which imports
    ``torch.distributed.nn``: unless bns imported it first, its ``group=group.WORLD`` defaults
    held the group and its threads outlived every exit handler."""
    for rank in (0, 1):
        names = json.loads((two_worker_job.two / f"threads-{rank}").read_text())
        assert names and not [n for n in names if "gloo" in n], (rank, names)


def test_a_warning_prints_once_per_job_not_once_per_worker(two_worker_job):
    """The eval of the network that warns, in the job above (each worker calls it)."""
    err = two_worker_job.err
    assert err.count("UserWarning: the user's network says hello") == 1, err[-3000:]
    assert json.loads((two_worker_job.two / "e.json").read_text())["rows"]


@pytest.mark.parametrize("speaking", [True, False])
def test_a_sigterm_after_the_fault_is_claimed_prints_no_traceback(speaking):
    """torchrun stops the survivors of a dead worker with SIGTERM. The worker that reports the
    fault ends on its own, its line printed (the handler used to raise inside an atexit
    callback: "Exception ignored in atexit callback"; then to leave before the line, found by
    benchmarks/faults.py); one that another worker speaks for leaves at once, silent."""
    code = (
        "import atexit, os, signal, sys\n"
        "import bns.distributed as d\n"
        f"d._JOB.faulted, d._JOB.speaking = True, {speaking}\n"
        "signal.signal(signal.SIGTERM, d._on_sigterm)\n"
        "os.kill(os.getpid(), signal.SIGTERM)\n"
        "print('the line', file=sys.stderr, flush=True)\n"
        "signal.signal(signal.SIGTERM, d._on_sigterm)\n"
        "atexit.register(lambda: os.kill(os.getpid(), signal.SIGTERM))\n"
        "sys.exit(2)\n"
    )
    env = dict(os.environ, PYTHONPATH=str(SRC))
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    if speaking:
        assert done.returncode == 2 and done.stderr == "the line\n"
    else:
        assert done.returncode == 1 and done.stderr == ""


def test_one_worker_executor_solves_what_is_missing_and_keeps_it():
    """The executor's map_batches on one worker: held batches are taken as they are, the others
    solved once each and kept; a batch's tensors cross between workers byte for byte."""
    from bns.executor import ONE, _pack, _unpack

    solved, kept = [], []

    def solve(b):
        solved.append(b)
        return {"x": torch.arange(b[0], b[1], dtype=torch.float32), "nfe": torch.ones(1)}

    held = {(2, 4): {"x": torch.tensor([9.0, 9.0]), "nfe": torch.ones(1)}}
    out = ONE.map_batches(
        [(0, 2), (2, 4), (4, 5)],
        solve,
        held=held,
        keep=lambda b, t: kept.append(b),
        empty=lambda b: {"x": torch.empty(b[1] - b[0]), "nfe": torch.empty(1)},
        desc="test",
        progress=False,
    )
    assert solved == kept == [(0, 2), (4, 5)]
    assert [o["x"].tolist() for o in out] == [[0.0, 1.0], [9.0, 9.0], [4.0]]
    batch = {
        "x": torch.randn(3, 2),
        "y": torch.tensor([1, -2, 3]),
        "n": torch.tensor([0.1]).double(),
    }
    back = _unpack(_pack(batch, batch), {k: torch.empty_like(v) for k, v in batch.items()})
    assert all(torch.equal(back[k], v) and back[k].dtype == v.dtype for k, v in batch.items())
    assert ONE.map_rows(5, lambda part: torch.arange(5)[part] * 2, "rows").tolist() == [
        0,
        2,
        4,
        6,
        8,
    ]
