"""Where bns's work runs: the boundary between what is computed and how workers share it.

Ground truth (:mod:`bns.pairs`), evaluation (:mod:`bns.evaluate`, :mod:`bns.classical`) and
distillation (:mod:`bns.train`, :mod:`bns.gauss_newton`, :mod:`bns.guidance_range`) ask
:func:`current` for an :class:`Executor` and hand it their work in three shapes:

- :meth:`Executor.map_batches`: batches of rows, each computed once by one worker (or read
  from where an earlier run kept it) and then held by every worker (ground truth);
- :meth:`Executor.map_rows`: one value per row, each worker computing a share (evaluation);
- :meth:`Executor.data_parallel`: a loss and its gradient over a global batch, each worker
  computing a share, summed (a training step).

Each is written once, here, over a few primitives (:meth:`~Executor.gather_flags`,
:meth:`~Executor.broadcast_`, :meth:`~Executor.sum_`, ...). The :class:`Executor` class itself
is the one worker of a plain process, whose primitives do nothing; under ``torchrun``,
:func:`current` returns :class:`bns.distributed.World`, which implements the primitives with
``torch.distributed`` and adds fault reports. No module above this one imports
:mod:`bns.distributed`, and a plain ``import bns`` never loads it.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor

from .errors import TrainingError

__all__ = ["Executor", "ONE", "current", "local_cuda_device"]

Batch = tuple[int, int]  # rows [lo, hi)


class Executor:
    """One worker doing all the work: rank 0 of 1. Subclasses (:class:`bns.distributed.World`)
    override the primitives; the three kinds of work are written once, over them."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0  # on this host: one worker per host writes a shared file

    @property
    def main(self) -> bool:
        """Rank 0: the worker that writes artifacts, logs and progress bars."""
        return self.rank == 0

    def share(self, n: int) -> slice:
        """This worker's contiguous share of ``n`` items (shares differ by one at most)."""
        return slice(self.rank * n // self.size, (self.rank + 1) * n // self.size)

    def counts(self, n: int) -> list[int]:
        """How many of ``n`` items each rank's :meth:`share` holds."""
        return [(r + 1) * n // self.size - r * n // self.size for r in range(self.size)]

    # -- primitives: one worker has no one to wait for or exchange with -------------------

    @contextlib.contextmanager
    def guard(self, what: str) -> Iterator[None]:
        """Run this worker's own compute (``what``, for the fault report)."""
        yield

    def watch(self, model: Any) -> None:
        """Count ``model``'s forwards as this worker's progress (for :meth:`wait_all`)."""

    def wait_all(self, what: str) -> None:
        """Wait until every worker gets here."""

    def on_main(self, fn: Callable[[], Any]) -> Any:
        """``fn()`` run on rank 0 alone, its result sent to every worker."""
        return fn()

    def all_min(self, value: int) -> int:
        """The smallest ``value`` over the workers."""
        return value

    def all_sum(self, value: float) -> float:
        """The sum of ``value`` over the workers."""
        return value

    def sum_(self, t: Tensor) -> Tensor:
        """``t`` summed over the workers (elementwise)."""
        return t

    def gather_flags(self, flags: list[bool]) -> list[list[bool]]:
        """Every worker's ``flags`` (one list per rank; the lists have one length)."""
        return [list(flags)] * self.size

    def gather_rows(self, local: Tensor, counts: list[int]) -> Tensor:
        """The workers' ``local`` tensors (rank r's with ``counts[r]`` rows) in rank order."""
        return local

    def broadcast_(self, t: Tensor, src: int) -> Tensor:
        """``t`` filled with rank ``src``'s values."""
        return t

    # -- the three kinds of work ----------------------------------------------------------

    def map_rows(self, n: int, rows: Callable[[slice], Tensor], what: str) -> Tensor:
        """``rows(part)`` gives one value per row of ``range(n)[part]``; returns all ``n``
        values, on every worker, each worker having computed its :meth:`share`."""
        with self.guard(what):
            local = rows(self.share(n))
        return self.gather_rows(local, self.counts(n))

    def map_batches(
        self,
        batches: list[Batch],
        solve: Callable[[Batch], dict[str, Tensor]],
        *,
        held: dict[Batch, dict[str, Tensor]],
        keep: Callable[[Batch, dict[str, Tensor]], None],
        empty: Callable[[Batch], dict[str, Tensor]],
        desc: str,
        progress: bool,
        postfix: Callable[[dict[str, Tensor]], dict[str, Any]] | None = None,
    ) -> list[dict[str, Tensor]]:
        """Every batch's tensors, on every worker. A batch some worker ``held`` already (read
        from a shard an earlier run kept) is taken from there; a missing one is solved once, by
        one worker (batch i of a fresh run by rank i mod K), who ``keep``-s it and sends it to
        the workers that lack it. ``empty(b)`` gives a batch's tensors' shapes and dtypes (what
        a receiver fills). ``desc`` names the work in the progress bar and in fault reports,
        ``postfix(tensors)`` what the bar shows of the batch last solved."""
        from tqdm.auto import tqdm

        done = dict(held)
        flags = self.gather_flags([b in done for b in batches])
        owners = _owners(flags)
        mine = [b for b, o in zip(batches, owners) if o == self.rank and b not in done]
        bar = tqdm(
            total=sum(hi - lo for lo, hi in mine),
            desc=desc + (f", rank 0 of {self.size}" if self.size > 1 else ""),
            unit="pair",
            disable=not (progress and self.main),
            leave=False,
        )
        with self.guard(desc):
            for b in mine:
                done[b] = solve(b)
                keep(b, done[b])
                bar.update(b[1] - b[0])
                if postfix is not None:
                    bar.set_postfix(postfix(done[b]))
        bar.close()
        self.wait_all(desc)
        for i, (b, owner) in enumerate(zip(batches, owners)):
            if self.size > 1 and not all(f[i] for f in flags):  # someone lacks it: owner sends
                like = empty(b)
                buf = _pack(done[b], like) if b in done else _pack(like, like)
                done[b] = _unpack(self.broadcast_(buf, owner), like)
        return [done[b] for b in batches]

    def data_parallel(
        self,
        step: Callable[[Tensor], tuple[float, list[Tensor] | None]],
        idx: Tensor,
        params: list[Tensor],
        model: Any,
    ) -> tuple[float, list[Tensor] | None, int]:
        """One data-parallel step: this worker runs ``step`` on its share of the global batch
        ``idx``; losses and gradients (each a mean over the share) are weighted by the share's
        size and summed over the workers, so K workers give one worker's result to rounding.

        ``step(part) -> (loss, grads)`` returns ``grads = None`` when they are not finite;
        then every worker gets ``(nan, None)``. Also returns all workers' network forwards.
        """
        part = idx[self.share(len(idx))]
        f0 = model.forwards
        with self.guard("a distillation step"):
            if len(idx) < self.size:
                raise TrainingError(
                    f"batch_size {len(idx)} is smaller than the {self.size} workers"
                )
            loss, grads = step(part)
        forwards = model.forwards - f0
        if self.size == 1:
            return loss, grads, forwards
        share = len(part) / len(idx)
        dev = params[0].device if params else torch.device("cpu")
        flat = [
            (g * share).reshape(-1).double()
            if grads is not None
            else p.new_zeros(p.numel()).double()
            for g, p in zip(grads or params, params)
        ]
        ok = grads is not None
        tail = [loss * share if ok else 0.0, 0.0 if ok else 1.0, float(forwards)]
        total = self.sum_(torch.cat([*flat, torch.tensor(tail, dtype=torch.float64, device=dev)]))
        loss, bad, forwards = total[-3:].tolist()
        if bad > 0:
            return math.nan, None, int(forwards)
        out, s = [], 0
        for p in params:
            out.append(total[s : s + p.numel()].reshape(p.shape).to(p.dtype))
            s += p.numel()
        return loss, out, int(forwards)


ONE = Executor()


def _env_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


def current(device: torch.device | str | None = None) -> Executor:
    """The executor of this process: :data:`ONE` in a plain process; under ``torchrun``
    (``WORLD_SIZE`` above 1, or a process group the program started) the job's
    :class:`bns.distributed.World`, whose first use starts the process group for ``device``'s
    kind."""
    import torch.distributed as dist  # torch has imported it already; nothing starts here

    if not dist.is_available() or (not dist.is_initialized() and _env_size() <= 1):
        return ONE
    from .distributed import world

    return world(device)


def local_cuda_device() -> torch.device | None:
    """The GPU of this worker's local rank under torchrun where CUDA is available, else None."""
    if _env_size() <= 1 or not torch.cuda.is_available():
        return None
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))


def _owners(held: list[list[bool]]) -> list[int]:
    """Which worker provides each batch: the first that holds it already, else the missing
    batches round-robin (batch i of a fresh run goes to rank i mod K)."""
    owners, k = [], 0
    for i in range(len(held[0])):
        holders = [r for r, h in enumerate(held) if h[i]]
        owners.append(holders[0] if holders else k % len(held))
        k += not holders
    return owners


# A batch travels between workers as one byte tensor: its tensors in ``like``'s order.
def _pack(batch: dict[str, Tensor], like: dict[str, Tensor]) -> Tensor:
    return torch.cat([batch[k].contiguous().reshape(-1).view(torch.uint8) for k in like])


def _unpack(buf: Tensor, like: dict[str, Tensor]) -> dict[str, Tensor]:
    out, s = {}, 0
    for name, t in like.items():
        size = t.numel() * t.element_size()
        out[name] = buf[s : s + size].view(t.dtype).reshape(t.shape).clone()
        s += size
    return out
