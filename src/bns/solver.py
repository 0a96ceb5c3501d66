"""`NSSolver`: a non-stationary solver as pure data, the sampler that runs it, and its file.

An NS solver with ``n`` steps evaluates the velocity at ``n`` points and forms each next point as
a fixed linear combination of the start point and all velocities so far (docs/math.md, section 2):

    u_i = u_{t_i}(x_i),    x_{i+1} = a_i x_0 + sum_{j <= i} b_{i,j} u_j,    i = 0 .. n-1.

``x_n`` is the sample. Times are non-decreasing with ``t_0 < t_n`` (Runge-Kutta stages may share a
time, e.g. RK4's two midpoint stages); a learned BNS solver has strictly increasing times.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import torch
from torch import Tensor

from ._io import atomic_write_text
from .errors import BNSError, InputError
from .model import in_phase

if TYPE_CHECKING:
    from .model import Model

__all__ = ["NSSolver", "SolverFileError", "Velocity", "sample", "ns_step", "FORMAT_VERSION"]

FORMAT_VERSION = 1


class SolverFileError(BNSError, ValueError):
    """A solver file is missing, corrupt, of another version, or does not fit the model."""


@dataclass
class NSSolver:
    """A non-stationary solver: ``times [n+1]`` (float64), ``a [n]``, ``b [n, n]`` lower triangular.

    ``b[i, j]`` is the weight of ``u_j`` in ``x_{i+1}``; entries above the diagonal are ignored and
    kept at zero. Tensors may require grad (training builds solvers from parameters). ``meta``
    holds JSON-able provenance (model fingerprint, guidance, training settings, validation PSNR).
    """

    times: Tensor
    a: Tensor
    b: Tensor
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.times = torch.as_tensor(self.times, dtype=torch.float64)
        self.a = torch.as_tensor(self.a, dtype=torch.float64)
        self.b = torch.as_tensor(self.b, dtype=torch.float64)
        n = self.a.numel()
        if self.times.shape != (n + 1,) or self.a.shape != (n,) or self.b.shape != (n, n):
            raise InputError(
                f"NSSolver shapes do not fit: times {list(self.times.shape)}, a {list(self.a.shape)},"
                f" b {list(self.b.shape)}; expected [n+1], [n], [n, n]"
            )
        if n < 1:
            raise InputError("an NSSolver needs at least one step")

    @property
    def nfe(self) -> int:
        """Velocity evaluations per sample (a guided evaluation is 2 network forwards)."""
        return int(self.a.numel())

    @property
    def t_range(self) -> tuple[float, float]:
        return float(self.times[0]), float(self.times[-1])

    def detach(self) -> NSSolver:
        return NSSolver(
            self.times.detach().clone(),
            self.a.detach().clone(),
            self.b.detach().clone(),
            dict(self.meta),
        )

    def validate(self, t_range: tuple[float, float] | None = None, strict: bool = False) -> None:
        """Raise :class:`SolverFileError` unless the values make a usable solver.

        Checks finite values, non-decreasing times with ``t_0 < t_n`` (strictly increasing with
        ``strict``), zeros above the diagonal of ``b`` and, given ``t_range``, that the times
        start and end on the model's range (to 1e-9).
        """
        for name in ("times", "a", "b"):
            if not torch.all(torch.isfinite(getattr(self, name))):
                raise SolverFileError(f"solver {name} holds non-finite values (NaN or inf)")
        dt = self.times[1:] - self.times[:-1]
        if strict and not torch.all(dt > 0):
            raise SolverFileError("solver times must be strictly increasing")
        if not torch.all(dt >= 0) or not self.times[-1] > self.times[0]:
            raise SolverFileError("solver times must be non-decreasing with t_0 < t_n")
        if torch.any(torch.triu(self.b, diagonal=1) != 0):
            raise SolverFileError("solver b must be lower triangular (x_{i+1} uses u_0..u_i only)")
        if t_range is not None:
            lo, hi = self.t_range
            if abs(lo - t_range[0]) > 1e-9 or abs(hi - t_range[1]) > 1e-9:
                raise SolverFileError(
                    f"solver times run over [{lo:.6g}, {hi:.6g}] but the model's range is"
                    f" [{t_range[0]:.6g}, {t_range[1]:.6g}]"
                )

    # -- file -------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        s = self.detach()
        n = s.nfe
        body = {
            "format": "bns-ns-solver",
            "format_version": FORMAT_VERSION,
            "nfe": n,
            "times": [float(v) for v in s.times],
            "a": [float(v) for v in s.a],
            # Row i holds b[i, 0..i]: the lower triangle only.
            "b": [[float(v) for v in s.b[i, : i + 1]] for i in range(n)],
            "meta": s.meta,
        }
        body["checksum"] = _checksum(body)
        return body

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> NSSolver:
        """Build and validate a solver from :meth:`to_dict` output; raises SolverFileError."""
        if not isinstance(d, dict) or d.get("format") != "bns-ns-solver":
            raise SolverFileError("not a bns solver file (missing 'format': 'bns-ns-solver')")
        version = d.get("format_version")
        if isinstance(version, bool) or not isinstance(version, int):
            raise SolverFileError("solver file has no integer format_version")
        if version > FORMAT_VERSION:
            raise SolverFileError(
                f"solver file has format version {version}, newer than this bns reads"
                f" ({FORMAT_VERSION}); upgrade bns"
            )
        if version < 1:
            raise SolverFileError(f"unknown solver format version {version}")
        try:
            intact = d.get("checksum") == _checksum(d)
        except (TypeError, ValueError, RecursionError) as e:  # not JSON: nesting, huge ints
            raise SolverFileError(f"solver file is malformed: {e}") from None
        if not intact:
            raise SolverFileError(
                "solver file checksum does not match its contents (edited or corrupt)"
            )
        try:
            if isinstance(d["nfe"], bool) or not isinstance(d["nfe"], int):
                raise SolverFileError(f"solver file nfe must be an integer, got {d['nfe']!r}")
            n = d["nfe"]
            times = _numbers(d["times"], "times")
            a = _numbers(d["a"], "a")
            rows = d["b"]
            if not isinstance(rows, list):
                raise SolverFileError("solver file is malformed: b must be a list of rows")
            if len(times) != n + 1 or len(a) != n or len(rows) != n:
                raise SolverFileError(
                    f"solver file shapes do not fit nfe = {n}: {len(times)} times (want {n + 1}),"
                    f" {len(a)} a (want {n}), {len(rows)} rows of b (want {n})"
                )
            b = torch.zeros(n, n, dtype=torch.float64)
            for i, row in enumerate(rows):
                if not isinstance(row, list) or len(row) != i + 1:
                    raise SolverFileError(f"solver file row {i} of b must hold {i + 1} values")
                b[i, : i + 1] = torch.tensor(_numbers(row, f"row {i} of b"), dtype=torch.float64)
            meta = d.get("meta", {})
            if not isinstance(meta, dict):
                raise SolverFileError("solver file 'meta' must be an object")
            if n < 1:
                raise SolverFileError(f"solver file has nfe = {n}; a solver needs at least 1 step")
            solver = cls(
                torch.tensor(times, dtype=torch.float64),
                torch.tensor(a, dtype=torch.float64),
                b,
                meta,
            )
        except SolverFileError:
            raise
        except (KeyError, TypeError, ValueError, OverflowError) as e:
            raise SolverFileError(f"solver file is malformed: {e}") from None
        solver.validate()
        return solver

    def save(self, path: str | os.PathLike) -> Path:
        """Write the solver as one JSON file, atomically (a crash never leaves half a file)."""
        self.validate()
        path = Path(path)
        try:
            text = json.dumps(self.to_dict(), indent=1, allow_nan=False)
        except (TypeError, ValueError) as e:
            raise SolverFileError(
                f"cannot save solver: its meta must be plain JSON (finite numbers, strings,"
                f" lists, dicts with string keys): {e}"
            ) from None
        atomic_write_text(path, text + "\n")
        return path

    @classmethod
    def load(
        cls,
        path: str | os.PathLike,
        model: Model | None = None,
        guidance: float | None = None,
        force: bool = False,
    ) -> NSSolver:
        """Read and validate a solver file; never unpickles.

        Given ``model`` (a :class:`bns.Model`), the solver must have been trained for it (same
        fingerprint) and span its time range; given ``guidance``, the same guidance scale.
        ``force=True`` skips the fingerprint and guidance checks, never the file's own validation
        nor the time range (a solver outside the model's range would evaluate it where it is
        undefined).
        """
        path = Path(path)
        if not path.is_file():
            raise SolverFileError(f"solver file not found: {path}")
        try:
            d = json.loads(path.read_text())
        # ValueError: also an integer of over 4300 digits; RecursionError: deep nesting
        except (OSError, ValueError, RecursionError) as e:
            raise SolverFileError(f"cannot read solver file {path}: {e}") from None
        try:
            solver = cls.from_dict(d)
        except SolverFileError as e:
            raise SolverFileError(f"{path}: {e}") from None
        if not force:
            solver.check_compatible(model, guidance, where=str(path))
        elif model is not None:
            try:
                solver.validate(t_range=model.t_range)
            except SolverFileError as e:
                raise SolverFileError(f"{path}: {e}") from None
        return solver

    def check_compatible(
        self, model: Model | None = None, guidance: float | None = None, where: str = "solver"
    ) -> None:
        """Refuse a solver trained for another model or guidance (see :meth:`load`)."""
        if model is not None:
            fp = self.meta.get("model_fingerprint")
            span = _span_range(self.meta)
            if fp is not None and span is not None and span != model.t_range:
                raise SolverFileError(
                    f"{where}: made for the part [{span[0]:g}, {span[1]:g}] of the path of"
                    f" {self.meta.get('model_name', '?')}, not for [{model.t_range[0]:g},"
                    f" {model.t_range[1]:g}]: use it with model.span({span[0]!r}, {span[1]!r})"
                )
            if fp is not None and fp != model.fingerprint():
                raise SolverFileError(
                    f"{where}: trained for model {self.meta.get('model_name', '?')} ({fp}), not"
                    f" for {model.name} ({model.fingerprint()}); pass force=True / --force to use"
                    " it anyway"
                )
            try:
                self.validate(t_range=model.t_range)
            except SolverFileError as e:
                raise SolverFileError(f"{where}: {e}") from None
        if guidance is not None and "guidance" in self.meta:
            try:
                trained = float(self.meta["guidance"])
            except (TypeError, ValueError, OverflowError):
                raise SolverFileError(
                    f"{where}: its meta guidance is not a number: {self.meta['guidance']!r:.60}"
                ) from None
            if not math.isclose(trained, float(guidance), abs_tol=1e-12):
                raise SolverFileError(
                    f"{where}: trained for guidance {trained:g}, asked for {float(guidance):g};"
                    f" sample at {trained:g} (guidance={trained:g}, --guidance {trained:g}), or pass"
                    " force=True / --force to use it anyway"
                )

    def __repr__(self) -> str:
        kind = self.meta.get("solver", "ns")
        return f"NSSolver({kind}, nfe={self.nfe}, t=[{self.t_range[0]:.4g}, {self.t_range[1]:.4g}])"


def _span_range(meta: dict[str, Any]) -> tuple[float, float] | None:
    """The flow-time range of a solver made for part of a path (``meta["span"]``), else None."""
    span = meta.get("span")
    if not isinstance(span, dict):
        return None
    try:
        lo, hi = (float(v) for v in span["t_range"])
    except (KeyError, TypeError, ValueError):
        return None
    return lo, hi


def _numbers(values: Any, what: str) -> list[float]:
    """The floats of a JSON list of numbers; refuses strings and booleans (which ``float``
    would take: "0.5", True) and anything but a list."""
    if not isinstance(values, list) or not all(
        isinstance(v, (int, float)) and not isinstance(v, bool) for v in values
    ):
        raise SolverFileError(f"solver file is malformed: {what} must be a list of numbers")
    return [float(v) for v in values]


def _checksum(d: dict[str, Any]) -> str:
    """sha256 over the canonical JSON of everything but the checksum itself."""
    body = {k: v for k, v in d.items() if k != "checksum"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


@runtime_checkable
class Velocity(Protocol):
    """What the sampler needs: ``u = velocity(x, t)``, ``x [B, *shape]``, ``t`` a 0-d float tensor.

    :class:`bns.Model` adapts a network to it; adapters (k-diffusion, flow_matching) pass plain
    closures.
    """

    def __call__(self, x: Tensor, t: Tensor) -> Tensor: ...


def ns_step(x0: Tensor, us: Tensor | list[Tensor], a_i: Tensor | float, b_i: Tensor) -> Tensor:
    """One NS update, ``x_{i+1} = a_i x_0 + sum_{j<=i} b_ij u_j``, with autocast off.

    ``x0`` and each ``u_j`` are flat ``[D]`` tensors of one float dtype (float32 or wider);
    ``b_i`` holds the ``i + 1`` weights of the velocities so far. ``us`` is a list (the
    differentiable path: a sum of terms, no copies of the history) or a ``[i + 1, D]`` matrix
    with ``a_i`` a Python float (inference: one fused matrix-vector product, one kernel).
    Autocast is off so that the state is summed in its own precision, never in the autocast
    dtype.
    """
    if torch.is_autocast_enabled(x0.device.type):
        with torch.autocast(x0.device.type, enabled=False):
            return ns_step(x0, us, a_i, b_i)
    if isinstance(us, Tensor):
        if isinstance(a_i, Tensor):
            return torch.addmv(x0 * a_i, us.t(), b_i)
        return torch.addmv(x0, us.t(), b_i, beta=a_i)
    x = a_i * x0
    for j, u in enumerate(us):
        x = x + b_i[j] * u
    return x


def sample(
    model: Model | Velocity,
    x0: Tensor,
    solver: NSSolver,
    y: Tensor | None = None,
    guidance: float | None = None,
    *,
    return_trajectory: bool = False,
    checkpoint: bool = False,
) -> Tensor | tuple[Tensor, list[Tensor]]:
    """Run an NS solver from noise ``x0`` (``[B, *sample_shape]``) and return ``x_n``.

    ``model`` is a :class:`bns.Model` (``y`` and ``guidance`` go to its velocity) or any
    :class:`Velocity` ``(x, t) -> u``. States are accumulated in at least float32, with autocast
    off (the network may run in half precision or under autocast); the result has that dtype.
    Differentiable with respect to ``x0``, the solver's times and coefficients. With
    ``return_trajectory`` it also returns ``[x_0, x_1, ..., x_n]``. ``checkpoint`` recomputes
    each network call in the backward pass (memory of one step).

    With labels ``y``, ``guidance`` defaults to the scale the solver was trained for
    (``solver.meta["guidance"]``, else 1); another scale runs with a warning, since the
    coefficients fit the trained one (:class:`bns.GuidanceRangeSolver` gives a solver for each
    scale of its range). Without labels, or for a plain velocity function, it is 1.

    A network that fails (raises, returns NaN or inf for finite states, ...) raises
    :class:`bns.model.NetworkError` naming the flow time, "during sampling" (or the phase
    of the run that sampled).
    """
    with in_phase("sampling"):
        return _sample(model, x0, solver, y, guidance, return_trajectory, checkpoint)


def _guidance(solver: NSSolver, guidance: float | None, y: Tensor | None) -> float:
    """The scale to sample at: the given one (a warning if the solver was trained for
    another), else the solver's. Without labels guidance does nothing: 1."""
    if y is None:
        return 1.0 if guidance is None else float(guidance)
    try:
        trained = float(solver.meta["guidance"])
    except (KeyError, TypeError, ValueError):
        trained = None
    if guidance is None:
        return 1.0 if trained is None else trained
    if trained is not None and not math.isclose(trained, float(guidance), abs_tol=1e-12):
        warnings.warn(
            f"bns: sampling at guidance {float(guidance):g} with a solver trained for"
            f" {trained:g}: its coefficients fit {trained:g}",
            UserWarning,
            stacklevel=4,
        )
    return float(guidance)


def _sample(model, x0, solver, y, guidance, return_trajectory, checkpoint):
    if callable(getattr(model, "velocity", None)):  # a bns.Model, or anything shaped like one
        guidance = _guidance(solver, guidance, y)

        def velocity(x: Tensor, t: Tensor) -> Tensor:
            return model.velocity(x, t, y, guidance)

    elif callable(model):  # the function guides itself, if at all: the solver's meta is moot
        if y is not None or guidance not in (None, 1.0):
            raise TypeError("labels and guidance need a bns.Model, not a plain velocity function")
        velocity = model
    else:
        raise TypeError(
            f"model must be a bns.Model or a velocity(x, t), got {type(model).__name__}"
        )
    acc = torch.promote_types(x0.dtype, torch.float32)
    x_start = x0.to(acc)
    times = solver.times.to(x0.device)
    n, shape = solver.nfe, x_start.shape
    flat0 = x_start.reshape(-1)
    traj = [x_start] if return_trajectory else None
    a = solver.a.to(device=x0.device, dtype=acc)
    b = solver.b.to(device=x0.device, dtype=acc)
    us: list[Tensor] = []
    grad = torch.is_grad_enabled() and any(
        t.requires_grad for t in (x0, solver.times, solver.a, solver.b)
    )
    if not grad:
        us.append(velocity(x_start, times[0]).to(acc).reshape(-1))
        if not us[0].requires_grad:  # nothing to differentiate (not even network weights)
            a_floats = solver.a.tolist()  # from the CPU copy: no device sync
            return _sample_no_grad(velocity, us[0], flat0, shape, times, a_floats, b, traj)
    x = x_start
    for i in range(n):
        if i >= len(us):
            if checkpoint:
                u = torch.utils.checkpoint.checkpoint(velocity, x, times[i], use_reentrant=False)
            else:
                u = velocity(x, times[i])
            us.append(u.to(acc).reshape(-1))
        x = ns_step(flat0, us, a[i], b[i]).reshape(shape)
        if traj is not None:
            traj.append(x)
    return (x, traj) if traj is not None else x


def _sample_no_grad(velocity, u0, flat0, shape, times, a, b, traj):
    """The sampler when nothing needs a gradient: the velocities go into one preallocated
    matrix and each step is one matrix-vector product (:func:`ns_step`), with no per-term
    temporaries (what keeps an NS solver as cheap as Euler at the same NFE). No step waits
    for the device but for one check per network call that its output is finite
    (:meth:`bns.Model._forward`)."""
    n = len(a)
    with torch.no_grad():
        buf = torch.empty((n, flat0.numel()), dtype=flat0.dtype, device=flat0.device)
        buf[0] = u0
        x = flat0.reshape(shape)
        for i in range(n):
            if i > 0:
                buf[i] = velocity(x, times[i]).reshape(-1)
            x = ns_step(flat0, buf[: i + 1], a[i], b[i, : i + 1]).reshape(shape)
            if traj is not None:
                traj.append(x)
    return (x, traj) if traj is not None else x
