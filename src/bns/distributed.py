"""Several workers under ``torchrun``: one process group, shared-out work, one voice.

:class:`World` is the :class:`bns.executor.Executor` of a ``torchrun`` job (and so of
``accelerate launch``, Slurm's ``srun`` with torchrun, or a Kubernetes PyTorchJob):
:func:`bns.executor.current` returns it, and the rest of bns reaches this module through it
alone. How work is shared out (whole batches of ground truth, rows of an evaluation, a
training step's global batch) is written once, in :mod:`bns.executor`; this module holds the
primitives it runs on and what keeps a job honest:

- :func:`world` starts the process group if the program has not: ``gloo`` for a CPU run, and
  ``cpu:gloo,cuda:nccl`` for a CUDA one (NCCL for CUDA tensors), with a timeout of
  ``BNS_DIST_TIMEOUT`` seconds (default 300) on every collective. What bns itself exchanges is
  small (a solver's gradient of under 200 numbers, per-sample PSNRs, batches of pairs once) and
  goes through gloo on the CPU wherever the group has it: gloo's timeouts end in an error that
  bns can report, where NCCL's watchdog would abort the process. A CPU worker takes an equal
  share of the cores (``BNS_THREADS`` to choose), a CUDA worker the GPU of its local rank.
- Rank 0 alone writes and prints; the other ranks' warnings are silenced (once per job).
- A fault ends the job with one line that names the rank and why. A worker whose own compute
  raises says so itself (:func:`guard`); a worker that dies, or that makes no progress for the
  timeout, is named by a surviving one, from what each worker keeps in the launcher's store:
  its host and pid, and a heartbeat (the collectives it reached, the network forwards it ran).

Outside torchrun (no ``WORLD_SIZE`` above 1 and no process group) every function here acts as
the one worker there is and touches nothing.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import math
import os
import signal
import socket
import sys
import threading
import time
import warnings
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, NoReturn

import torch
from torch import Tensor

from .errors import BNSError, InputError
from .executor import Executor, _env_size

__all__ = [
    "World",
    "WorkerLost",
    "world",
    "guard",
    "watch",
    "wait_all",
    "on_rank0",
    "all_min",
    "all_sum",
    "all_gather_rows",
    "gather_flags",
    "broadcast_",
    "TIMEOUT_ENV",
    "THREADS_ENV",
]

TIMEOUT_ENV = "BNS_DIST_TIMEOUT"
THREADS_ENV = "BNS_THREADS"
DEFAULT_TIMEOUT = 300.0
_BEAT_S = 1.0  # how often a worker publishes its progress
_POLL_S = 0.25  # how often a waiting worker looks at the others
_OWN_ERROR = "an error of its own would be printed above"
_RERUN = (
    "the job stops here. Rerun to continue: finished ground-truth shards are kept, and"
    " --resume continues distillation from its last checkpoint"
)


class WorkerLost(BNSError, RuntimeError):
    """A worker of a multi-worker job failed, died or hung: the job cannot go on."""


@dataclass(frozen=True)
class World(Executor):
    """This process's place in a ``torchrun`` job: the :class:`bns.executor.Executor` whose
    primitives exchange through the process group, and report a fault with one line."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    local_size: int = 1

    def guard(self, what: str) -> contextlib.AbstractContextManager[None]:
        return guard(what)

    def watch(self, model: Any) -> None:
        watch(model)

    def wait_all(self, what: str) -> None:
        wait_all(what)

    def on_main(self, fn: Callable[[], Any]) -> Any:
        return on_rank0(fn)

    def all_min(self, value: int) -> int:
        return all_min(value)

    def all_sum(self, value: float) -> float:
        return all_sum(value)

    def sum_(self, t: Tensor) -> Tensor:
        return t if self.size == 1 else _all_reduce(t, "SUM")

    def gather_flags(self, flags: list[bool]) -> list[list[bool]]:
        return gather_flags(flags)

    def gather_rows(self, local: Tensor, counts: list[int]) -> Tensor:
        return all_gather_rows(local, counts)

    def broadcast_(self, t: Tensor, src: int) -> Tensor:
        return broadcast_(t, src)


ONE = World()


class _Job:
    """What this process keeps about the job once its process group exists."""

    def __init__(self) -> None:
        self.ready = False
        self.store: Any = None  # the launcher's key-value store, under a "bns/" prefix
        self.seq = 0  # collectives (and waits) reached, the same count on every rank
        self.at = "start"
        self.published = ""
        self.models: list[weakref.ref] = []
        self.peers: dict[int, int | None] = {}  # rank -> pid, for the workers on this host
        self.rank = 0
        self.size = 1
        self.faulted = False  # a worker failed, died or hung: the group is not to be trusted
        self.speaking = False  # this worker reports the job's fault (its one line)
        self.stop = threading.Event()  # set at exit: the heartbeat thread ends
        self.beat: threading.Thread | None = None
        self.started = False  # bns started the process group (not the user's program)


_JOB = _Job()


def timeout_s() -> float:
    """``BNS_DIST_TIMEOUT`` (seconds, default 300): the longest wait on another worker."""
    text = os.environ.get(TIMEOUT_ENV, "")
    try:
        value = float(text) if text else DEFAULT_TIMEOUT
    except ValueError:
        raise InputError(f"{TIMEOUT_ENV} must be a number of seconds, got {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise InputError(f"{TIMEOUT_ENV} must be positive, got {text!r}")
    return value


def world(device: torch.device | str | None = None) -> World:
    """This process's :class:`World`. Under torchrun the first call starts the process group
    (unless the program did) for ``device``'s kind: see the module's docstring."""
    import torch.distributed as dist  # torch has imported it already; nothing starts here

    if not dist.is_available():
        return ONE
    if not dist.is_initialized():
        if _env_size() <= 1:
            return ONE
        _start(dist, device)
    size = dist.get_world_size()
    if size == 1:
        return ONE
    rank = dist.get_rank()
    if not _JOB.ready:
        _setup(dist, rank, size)
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    return World(rank, size, local_rank, int(os.environ.get("LOCAL_WORLD_SIZE", size)))


def _threads() -> int:
    given = os.environ.get(THREADS_ENV)
    if given:
        return max(1, int(given))
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on every platform
        cores = os.cpu_count() or 1
    return max(1, cores // int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1))


def _start(dist: Any, device: torch.device | str | None) -> None:
    device = torch.device(device) if device is not None else None
    cuda = device.type == "cuda" if device is not None else torch.cuda.is_available()
    if cuda:
        index = device.index if device is not None and device.index is not None else None
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if index is not None and index != local and torch.cuda.device_count() > 1:
            # Workers whose networks all sit on cuda:0 share one GPU and run no faster.
            warnings.warn(
                f"bns: worker of local rank {local} runs on cuda:{index}; put each worker's"
                f" network on its own GPU (model.to('cuda:{local}')) to use them all",
                stacklevel=3,
            )
        torch.cuda.set_device(local if index is None else index)
        backend = "cpu:gloo,cuda:nccl"
    else:
        # torchrun sets OMP_NUM_THREADS=1 by default: an equal share uses the machine.
        torch.set_num_threads(_threads())
        backend = "gloo"
    _import_group_defaults()
    dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s()))
    _JOB.started = True
    atexit.register(_close, dist)
    if threading.current_thread() is threading.main_thread():
        # The launcher stops the others with SIGTERM when a worker dies: say who and why.
        signal.signal(signal.SIGTERM, _on_sigterm)


def _import_group_defaults() -> None:
    """Import, before the process group exists, the torch modules whose functions take
    ``group=group.WORLD`` as a default argument.

    Such a default is evaluated once, at import. Imported after the group starts (torch's
    optimizers import ``torch._dynamo`` on first use, which imports these), the defaults hold
    the group itself: :func:`_close`'s ``destroy_process_group`` then cannot free it, gloo's
    threads outlive the exit handlers, and a worker whose work is done and written aborted in
    the interpreter's finalization now and then ("terminate called without an active
    exception"). Imported before, the defaults are ``None``."""
    with contextlib.suppress(ImportError):
        import torch.distributed.nn  # noqa: F401 - its functional API's defaults


def _close(dist: Any) -> None:
    """At a normal exit, end the process group bns started (after a fault, leave it: a peer
    may be gone, and the process ends anyway)."""
    if dist.is_initialized() and not _JOB.faulted:
        with contextlib.suppress(Exception):
            dist.destroy_process_group()


def end_command(rc: int) -> int:
    """End a command-line worker of a job bns started: every worker reaches the end (a
    barrier), output is flushed, and the process leaves without interpreter finalization.

    Finalizing an interpreter whose threads sit in the process group's C++ code has aborted
    finished workers now and then ("terminate called without an active exception"); the job's
    work is done and written by then, so nothing is lost by leaving at once. Outside such a
    job (the Python API, one process) this returns ``rc``."""
    import torch.distributed as dist

    if not (_JOB.started and _JOB.ready and not _JOB.faulted and dist.is_initialized()):
        return rc
    try:
        if rc == 0:  # a failed worker leaves at once: the others see it go (as before)
            _collective("the end of the job", dist.barrier)
    finally:
        _stop_heartbeat()
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        logging.shutdown()
        os._exit(rc)


def _setup(dist: Any, rank: int, size: int) -> None:
    _JOB.ready, _JOB.rank, _JOB.size = True, rank, size
    if rank != 0:
        # Rank 0 speaks for the job: every worker runs the same code on the same kind of data,
        # so a warning (bns's, torch's, the user's network's) would print once per worker.
        warnings.filterwarnings("ignore")
    try:
        from torch.distributed.distributed_c10d import _get_default_store

        restart = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        _JOB.store = dist.PrefixStore(f"bns/{restart}", _get_default_store())
        _JOB.store.set(f"worker/{rank}", f"{socket.gethostname()} {os.getpid()}")
        _publish()
    except Exception:  # noqa: BLE001 - no store: faults are reported less precisely
        _JOB.store = None
        return
    _start_heartbeat()


def _start_heartbeat() -> None:
    _JOB.beat = threading.Thread(target=_heartbeat, name="bns-heartbeat", daemon=True)
    _JOB.beat.start()
    atexit.register(_stop_heartbeat)  # runs before _close (atexit runs in reverse order)


def _stop_heartbeat() -> None:
    """End the heartbeat thread before the interpreter finalizes: a daemon thread still inside
    a store call then would abort the whole process when it re-takes the GIL ("terminate called
    without an active exception", pytorch/pytorch#38228), after the job's work is done."""
    _JOB.stop.set()
    if _JOB.beat is not None and _JOB.beat is not threading.current_thread():
        _JOB.beat.join(timeout=10.0)


def watch(model: Any) -> None:
    """Count ``model``'s network forwards as this worker's progress (for :func:`wait_all`)."""
    if _JOB.ready and not any(r() is model for r in _JOB.models):
        _JOB.models.append(weakref.ref(model))


def _progress() -> int:
    return _JOB.seq + sum(getattr(r(), "forwards", 0) for r in _JOB.models if r() is not None)


def _publish() -> None:
    value = f"{_JOB.seq} {_progress()}"
    if value != _JOB.published and _JOB.store is not None:
        _JOB.store.set(f"beat/{_JOB.rank}", value)
        _JOB.published = value


def _heartbeat() -> None:
    while not _JOB.stop.wait(_BEAT_S):
        try:
            _publish()
        except Exception:  # noqa: BLE001 - the store is gone: the job is ending
            return


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie has exited already
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except (OSError, IndexError):
        return True


def _local_peers(ranks: Any) -> dict[int, int]:
    """The pids of those of ``ranks`` that run on this host (read from the store once)."""
    host = socket.gethostname()
    for r in ranks:
        if r not in _JOB.peers and r != _JOB.rank:
            with contextlib.suppress(Exception):
                if _JOB.store.check([f"worker/{r}"]):
                    where, pid = _JOB.store.get(f"worker/{r}").decode().rsplit(" ", 1)
                    _JOB.peers[r] = int(pid) if where == host else None
    return {r: pid for r in ranks if (pid := _JOB.peers.get(r)) is not None}


def _quit() -> NoReturn:
    """End this worker quietly: another one reports the job's fault."""
    _JOB.faulted = True
    raise SystemExit(1)


def _claim() -> bool:
    """Whether this worker is the first to report the job's fault (one line per job)."""
    _JOB.faulted = True
    try:
        first = _JOB.store is None or int(_JOB.store.add("reported", 1)) == 1
    except Exception:  # noqa: BLE001
        first = True
    _JOB.speaking = _JOB.speaking or first
    return first


def _diagnose(stalled: tuple[int, ...] = (), timed_out: bool = False) -> dict[int, str]:
    """What went wrong with the other workers, as far as the store and this host tell: who
    failed, who died, who stalled and (after a collective timed out) who never reached it."""
    store, found = _JOB.store, {}
    if store is None:
        return found
    host = socket.gethostname()
    t = f"{timeout_s():g} s ({TIMEOUT_ENV})"
    for r in range(_JOB.size):
        if r == _JOB.rank:
            continue
        try:
            if store.check([f"failed/{r}"]):
                found[r] = "failed: " + store.get(f"failed/{r}").decode()
                continue
            if not store.check([f"worker/{r}", f"beat/{r}"]):
                continue  # it never got as far as this one: nothing is known of it
            where, pid = store.get(f"worker/{r}").decode().rsplit(" ", 1)
            if where == host and not _alive(int(pid)):
                found[r] = f"(pid {pid}) died first: killed or crashed ({_OWN_ERROR})"
                continue
            seq = int(store.get(f"beat/{r}").decode().split()[0])
        except Exception:  # noqa: BLE001 - what cannot be read is not known
            continue
        if r in stalled:
            found[r] = f"made no progress for {t}: hung, stopped or too slow"
        elif timed_out and seq < _JOB.seq:
            found[r] = f"did not reach {_JOB.at} within {t}: hung, stopped or too slow"
        elif timed_out and _JOB.size == 2:  # it reached the collective, then stopped in it
            found[r] = f"did not answer in {_JOB.at} within {t}: hung, stopped or too slow"
    return found


def _lost(what: str, stalled: tuple[int, ...] = (), timed_out: bool = False) -> NoReturn:
    """End this worker: the first to report raises WorkerLost, the others exit quietly."""
    with contextlib.suppress(Exception):
        _publish()
    found = _diagnose(stalled, timed_out)
    if not _claim():
        _quit()
    n = _JOB.size
    if found:
        text = "; ".join(f"worker rank {r} of {n} {why}" for r, why in sorted(found.items()))
    else:
        text = f"worker rank {_JOB.rank} of {n} {what}"
    raise WorkerLost(f"{text}; {_RERUN}")


def _on_sigterm(signum: int, frame: Any) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second SIGTERM ends it at once
    if _JOB.speaking:
        # This worker reports the job's fault: it is printing its line, or past it, in its
        # exit handlers (where an exception would print a traceback). It ends on its own; a
        # second SIGTERM ends it at once.
        return
    if _JOB.faulted:  # another worker reports the fault: nothing to say, leave at once
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        os._exit(1)
    _lost("was stopped by the launcher (SIGTERM)")


@contextlib.contextmanager
def guard(what: str) -> Iterator[None]:
    """Run this worker's own compute: an error in it ends the job with one line that names
    this rank (and the other workers exit quietly). Outside torchrun it does nothing."""
    if world().size == 1:
        yield
        return
    try:
        yield
    except (WorkerLost, SystemExit):
        raise
    except Exception as e:
        lines = str(e).strip().splitlines()
        why = f"{type(e).__name__}: {lines[0]}" if lines else type(e).__name__
        if lines and isinstance(e, BNSError):
            why = lines[0]  # bns's own messages are written for people; a foreign one is named
        with contextlib.suppress(Exception):
            _JOB.store.set(f"failed/{_JOB.rank}", why)
        if not _claim():
            _quit()
        raise WorkerLost(f"worker rank {_JOB.rank} of {_JOB.size} failed in {what}: {why}") from e


def _collective(op: str, fn: Callable[[], Any]) -> Any:
    _JOB.seq += 1
    _JOB.at = f"{op} #{_JOB.seq}"
    t0 = time.monotonic()
    try:
        return fn()
    except RuntimeError as e:  # a peer died, hung or broke the connection
        lines = str(e).strip().splitlines()
        timed_out = time.monotonic() - t0 >= 0.9 * timeout_s()
        what = f"lost the others in {_JOB.at}: {lines[0] if lines else type(e).__name__}"
        _lost(what, timed_out=timed_out)


def _comm(t: Tensor) -> Tensor:
    """``t`` where bns exchanges it: on the CPU through gloo where the group has it (bns's
    exchanges are small, and gloo's timeouts end in an error bns can report), else on the GPU."""
    import torch.distributed as dist

    if "gloo" in str(dist.get_backend()):
        return t.cpu()
    return t.to(torch.device("cuda", torch.cuda.current_device()))


def _all_reduce(t: Tensor, op_name: str) -> Tensor:
    import torch.distributed as dist

    c = _comm(t)
    _collective(
        f"all_reduce {op_name}", lambda: dist.all_reduce(c, getattr(dist.ReduceOp, op_name))
    )
    return c.to(t.device)


def all_min(value: int) -> int:
    """The smallest ``value`` over the workers."""
    if world().size == 1:
        return value
    return int(_all_reduce(torch.tensor([value], dtype=torch.int64), "MIN"))


def all_sum(value: float) -> float:
    """The sum of ``value`` over the workers."""
    if world().size == 1:
        return value
    return float(_all_reduce(torch.tensor([value], dtype=torch.float64), "SUM"))


def gather_flags(flags: list[bool]) -> list[list[bool]]:
    """Every worker's ``flags`` (one list per rank; the lists have one length)."""
    import torch.distributed as dist

    w = world()
    if w.size == 1 or not flags:
        return [list(flags)] * w.size
    t = _comm(torch.tensor(flags, dtype=torch.uint8))
    out = [torch.empty_like(t) for _ in range(w.size)]
    _collective("all_gather", lambda: dist.all_gather(out, t))
    return [[bool(v) for v in o.tolist()] for o in out]


def all_gather_rows(local: Tensor, counts: list[int]) -> Tensor:
    """The workers' ``local`` tensors (rank r's with ``counts[r]`` rows) stacked in rank order."""
    import torch.distributed as dist

    if len(counts) == 1:
        return local
    pad = torch.zeros((max(counts) - local.shape[0], *local.shape[1:]), dtype=local.dtype)
    t = _comm(torch.cat([local.cpu(), pad]))
    out = [torch.empty_like(t) for _ in counts]
    _collective("all_gather", lambda: dist.all_gather(out, t))
    return torch.cat([o[:c].cpu() for o, c in zip(out, counts)]).to(local.device)


def broadcast_(t: Tensor, src: int) -> Tensor:
    """``t`` filled with rank ``src``'s values (in place where the group can take it)."""
    import torch.distributed as dist

    if world().size == 1:
        return t
    c = _comm(t)
    _collective(f"broadcast from rank {src}", lambda: dist.broadcast(c, src))
    if c is not t:
        t.copy_(c)
    return t


def on_rank0(fn: Callable[[], Any]) -> Any:
    """``fn()`` run on rank 0 alone, its result sent to every worker (who wait for it). If it
    raises, rank 0 raises the error and the others exit quietly (one line for the job)."""
    import torch.distributed as dist

    if world().size == 1:
        return fn()
    box: list[Any] = [None]
    if _JOB.rank == 0:
        try:
            box[0] = (True, fn())
        except Exception:
            _claim()
            box[0] = (False, None)
            _collective("broadcast_object", lambda: dist.broadcast_object_list(box, src=0))
            raise
    _collective("broadcast_object", lambda: dist.broadcast_object_list(box, src=0))
    ok, value = box[0]
    if not ok:
        _quit()
    return value


def wait_all(what: str) -> None:
    """Wait until every worker gets here, however long their share of the work takes, as long
    as each one keeps making progress (forwards of a :func:`watch`-ed model, collectives).

    A worker that dies, or makes none for ``BNS_DIST_TIMEOUT`` seconds, ends the job.
    """
    w = world()
    if w.size == 1:
        return
    store = _JOB.store
    if store is None:  # no store to watch the others through: a plain collective
        _all_reduce(torch.zeros(1), "SUM")
        return
    _JOB.seq += 1
    _JOB.at = f"{what} #{_JOB.seq}"
    _publish()
    key = f"reached/{_JOB.seq}"
    store.add(key, 1)
    limit = timeout_s()
    beats = [f"beat/{r}" for r in range(w.size)]
    last: dict[int, tuple[bytes, float]] = {}
    while True:
        try:
            if int(store.add(key, 0)) >= w.size:
                return
            if int(store.add("reported", 0)) > 0:  # another worker is reporting a fault
                _quit()
            values = store.multi_get(beats)
        except (RuntimeError, OSError) as e:
            _lost(f"lost the launcher's store while waiting at {_JOB.at}: {e}")
        now, stalled = time.monotonic(), []
        for r, v in enumerate(values):
            if r == w.rank or int(v.split()[0]) >= _JOB.seq:
                continue  # this one, or one that has arrived
            if r not in last or last[r][0] != v:
                last[r] = (v, now)
            elif now - last[r][1] > limit:
                stalled.append(r)
        if stalled or any(not _alive(pid) for pid in _local_peers(last).values()):
            _lost(f"stopped waiting at {_JOB.at}", tuple(stalled))
        time.sleep(_POLL_S)
