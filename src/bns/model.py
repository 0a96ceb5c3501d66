"""`Model`: a network, its prediction type and scheduler, seen as one velocity in flow time.

Every usual network output ``f`` turns into a velocity that is affine in ``x`` and ``f``:
``u_t(x) = beta_t x + gamma_t f_t(x)`` (docs/math.md, section 1). Classifier-free guidance
combines the conditional and unconditional velocities, ``u = u_0 + w (u_y - u_0)``, in one
batched network call.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import hashlib
import json
import math
import types
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
import torch.autograd.forward_ad as fwAD
from torch import Tensor, nn

from ._hashing import hash_tensor
from .errors import BNSError
from .schedules import Schedule, schedule_from_config

__all__ = [
    "Model",
    "PREDICTIONS",
    "prediction_coefficients",
    "ModelError",
    "NetworkError",
    "NonFiniteVelocity",
    "in_phase",
    "reachable_modules",
    "frozen",
]

PREDICTIONS = ("velocity", "eps", "x1", "v")
# What other libraries call them (diffusers' prediction_type, k-diffusion's denoiser): named in
# the error a user who writes theirs gets, never taken silently.
_PREDICTION_ELSEWHERE = {
    "epsilon": "eps",
    "v_prediction": "v",
    "sample": "x1",
    "x0": "x1",
}  # (diffusers' "flow" runs time the other way: bns.integrations.diffusers handles it)


def _is_dual(v: Tensor) -> bool:
    """Whether ``v`` carries a forward-mode tangent (a JVP evaluation)."""
    return fwAD.unpack_dual(v).tangent is not None


class ModelError(BNSError, ValueError):
    """A model was called with inputs it cannot take, or returned something unusable."""


class NetworkError(ModelError):
    """The network failed where it was called: it raised, or returned something unusable (not
    a tensor, the wrong shape, not floating point or, :class:`NonFiniteVelocity`, NaN or inf).

    Carries the flow time ``t`` of the call and, once known, the ``phase`` of the run it
    happened in (set by :func:`in_phase`). The message is one line::

        {model}: {what} at flow time t = {t} during {phase}{detail}
    """

    def __init__(
        self,
        model_name: str,
        what: str,
        t: float | None = None,
        detail: str = "",
        phase: str | None = None,
    ) -> None:
        super().__init__(model_name, what, t, detail, phase)
        self.model_name, self.what, self.t, self.detail = model_name, what, t, detail
        self.phase = phase

    def __str__(self) -> str:
        at = "" if self.t is None else f" at flow time t = {self.t:.6g}"
        during = "" if self.phase is None else f" during {self.phase}"
        return f"{self.model_name}: {self.what}{at}{during}{self.detail}"


class NonFiniteVelocity(NetworkError):
    """The network returned NaN or inf for finite inputs of a sane size: the network's fault,
    not the solver's (a diverging solver's non-finite or huge states are not blamed on it)."""

    def __init__(
        self,
        model_name: str,
        kinds: Sequence[str],
        t: float | None,
        bad: int,
        total: int,
        phase: str | None = None,
    ) -> None:
        what = f"the network returned {' and '.join(kinds)}"
        detail = f" ({bad} of {total} outputs, for finite inputs)"
        super().__init__(model_name, what, t, detail, phase)
        self.args = (model_name, tuple(kinds), t, bad, total, phase)  # what pickling replays
        self.kinds, self.bad, self.total = tuple(kinds), bad, total


@contextlib.contextmanager
def in_phase(phase: str) -> Iterator[None]:
    """Name ``phase`` (``"sampling"``, ``"validation"``, ...) in a :class:`NetworkError` raised
    inside the block. Phases nest; the outermost names the error (validation samples, and a
    network that fails there fails during validation)."""
    try:
        yield
    except NetworkError as e:
        e.phase = phase
        raise


# torch.OutOfMemoryError (older torch: torch.cuda's): a resource, not the network's fault.
_OOM = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)


def _primal(v: Tensor) -> Tensor:
    """``v`` without its forward-mode tangent, detached."""
    return fwAD.unpack_dual(v).primal.detach()


def _first_time(t: Tensor, rows: Tensor | None = None) -> float | None:
    """The flow time of the first row of ``t`` (of the first row where ``rows``), or None."""
    t = _primal(t).reshape(-1)
    if rows is not None:
        t = t[rows.to(t.device)]
    return float(t[0]) if t.numel() else None


def _sane_bound(dtype: torch.dtype) -> float:
    """The largest input magnitude at which NaN or inf out of the network is blamed on it:
    1e6 (a float16 network: 256, where squaring it nears its overflow). Beyond that the
    state has diverged (a solver's fault, e.g. an optimizer step with diverged coefficients,
    which training skips) and a network may overflow there without being faulty."""
    return min(1e6, math.sqrt(torch.finfo(dtype).max)) if dtype.is_floating_point else 1e6


def _first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__


def prediction_coefficients(
    prediction: str, schedule: Schedule, t: Tensor
) -> tuple[Tensor, Tensor]:
    """``(beta_t, gamma_t)`` such that ``u_t(x) = beta_t x + gamma_t f`` for a ``prediction`` net.

    - velocity: ``f = u``.
    - eps: ``f = E[eps | x_t]``, ``x_1 = (x - sigma eps) / alpha``.
    - x1: ``f = E[x_1 | x_t]``, ``eps = (x - alpha x_1) / sigma``.
    - v: ``f = alpha eps - sigma x_1``; with ``x = alpha x_1 + sigma eps`` this inverts to
      ``x_1 = (alpha x - sigma v) / n``, ``eps = (sigma x + alpha v) / n``, ``n = alpha^2 + sigma^2``.
    """
    a, s, da, ds = schedule(t)  # alpha, sigma and their derivatives
    if prediction == "velocity":
        return torch.zeros_like(t), torch.ones_like(t)
    if prediction == "eps":
        return da / a, ds - s * da / a
    if prediction == "x1":
        return ds / s, da - a * ds / s
    if prediction == "v":
        n = a * a + s * s
        return (da * a + ds * s) / n, (ds * a - da * s) / n
    raise ModelError(f"unknown prediction {prediction!r}; expected one of {PREDICTIONS}")


_LEAVES = (str, bytes, int, float, complex, bool, Tensor, type, types.ModuleType)
_FUNCTIONS = (types.FunctionType, types.MethodType, types.BuiltinFunctionType)


def _global_names(code: types.CodeType) -> set[str]:
    """The global names a function's code (and the code of functions nested in it) reads."""
    names = set(code.co_names)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names |= _global_names(const)
    return names


def reachable_modules(obj: Any, depth: int = 4) -> list[nn.Module]:
    """The ``nn.Module`` objects that a network callable holds, outermost first.

    Found through: the object itself, a bound method's owner, a ``functools.partial``'s function
    and arguments, a closure's cells, the globals a function reads (``net`` in
    ``def f(x, t): return net(x, t)``), ``__wrapped__``, and the attributes of a callable object,
    down to ``depth`` levels. A module's own submodules are not listed (they belong to it).
    """
    found: dict[int, nn.Module] = {}
    seen: set[int] = set()

    def visit(o: Any, level: int) -> None:
        if o is None or level > depth or id(o) in seen:
            return
        seen.add(id(o))
        if isinstance(o, nn.Module):
            found.setdefault(id(o), o)
        elif isinstance(o, (list, tuple, set, frozenset)):
            for v in o:
                visit(v, level + 1)
        elif isinstance(o, dict):
            for v in o.values():
                visit(v, level + 1)
        elif isinstance(o, functools.partial):
            for v in (o.func, o.args, o.keywords):
                visit(v, level + 1)
        elif not isinstance(o, _LEAVES):
            visit(getattr(o, "__self__", None), level + 1)
            visit(getattr(o, "__wrapped__", None), level + 1)
            for cell in getattr(o, "__closure__", None) or ():
                try:
                    visit(cell.cell_contents, level + 1)
                except ValueError:  # an empty cell
                    pass
            if isinstance(o, types.FunctionType):  # a module-level net a function calls
                for name in _global_names(o.__code__):
                    if name in o.__globals__:
                        visit(o.__globals__[name], level + 1)
            if not isinstance(o, _FUNCTIONS) and isinstance(getattr(o, "__dict__", None), dict):
                for v in vars(o).values():  # a callable object's attributes
                    visit(v, level + 1)

    visit(obj, 0)
    return list(found.values())


@contextlib.contextmanager
def frozen(net: Any) -> Iterator[list[nn.Module]]:
    """Freeze every module reachable from ``net`` (see :func:`reachable_modules`) for a while.

    Inside, no weight requires grad and every module is in eval mode (dropout off, batch-norm
    statistics fixed); both are restored exactly on exit, module by module and weight by weight.
    """
    modules = net.modules if isinstance(net, Model) else reachable_modules(net)
    params = {id(p): p for m in modules for p in m.parameters()}
    grads = [(p, p.requires_grad) for p in params.values()]
    modes = [(sub, sub.training) for m in modules for sub in m.modules()]
    try:
        for p, _ in grads:
            p.requires_grad_(False)
        for m in modules:
            m.eval()
        yield modules
    finally:
        for p, flag in grads:
            p.requires_grad_(flag)
        for sub, flag in modes:
            sub.training = flag


def _dtype_and_device(modules: list[nn.Module]) -> tuple[torch.dtype | None, torch.device | None]:
    """The dtype and device of the first floating parameter (else buffer) of ``modules``."""
    for tensors in ("parameters", "buffers"):
        for m in modules:
            for v in getattr(m, tensors)():
                if v.is_floating_point():
                    return v.dtype, v.device
    return None, None


def _content_check(tensors: list[Tensor]) -> bytes:
    """Per tensor, its sum and 8 values spread over it, as float64 bytes: one read of every
    weight and one copy from each device, far cheaper than hashing."""
    parts: dict[torch.device, list[Tensor]] = {}
    with torch.no_grad():
        for v in tensors:
            v = v.detach()
            if v.numel() == 0 or v.is_complex():
                continue
            flat = v.reshape(-1)
            k = min(8, flat.numel())
            idx = torch.arange(k, device=v.device) * (flat.numel() - 1) // max(k - 1, 1)
            vals = flat[idx].double()
            total = flat.sum().double()  # in its own dtype: one fast read
            parts.setdefault(v.device, []).append(torch.cat([total[None], vals]))
    return b"".join(torch.cat(p).cpu().numpy().tobytes() for p in parts.values())


def _conditioning_names(module: nn.Module) -> set[str]:
    """State-dict names of the buffers that modules under ``module`` declare as conditioning
    data (class attribute ``bns_conditioning``)."""
    names = set()
    for prefix, m in module.named_modules():
        for name in getattr(m, "bns_conditioning", ()):
            names.add(f"{prefix}.{name}" if prefix else name)
    return names


def _check_label_splits(
    splits: Mapping[str, Sequence[int]] | None, num_classes: int | None
) -> dict[str, tuple[int, ...]] | None:
    if splits is None:
        return None
    if num_classes is None:
        raise ModelError("label_splits needs a class-conditional model (num_classes)")
    out = {}
    for split, labels in splits.items():
        labels = tuple(int(v) for v in labels)
        if not labels:
            raise ModelError(f"label_splits[{split!r}] is empty")
        bad = [v for v in labels if not 0 <= v < num_classes]
        if bad:
            raise ModelError(
                f"label_splits[{split!r}] holds labels outside [0, {num_classes}): {bad[:5]}"
            )
        out[str(split)] = labels
    return out


class Model:
    """A pre-trained network seen as a velocity field ``u_t(x)`` in flow time.

    Args:
        net: ``net(x, t, y=None) -> f`` with ``x`` of shape ``[B, *sample_shape]``, ``t`` a float
            tensor ``[B]`` in flow time and ``y`` a long tensor ``[B]`` or None.
        prediction: what the net predicts: ``"velocity"``, ``"eps"``, ``"x1"`` (data) or ``"v"``.
        schedule: the scheduler of the path the net was trained on, or its name
            (``"condot"``, ``"vp"``, ``"cosine"``, ``"edm"``: default parameters).
        sample_shape: the shape of one sample, e.g. ``(C, H, W)``.
        t_range: ``(t_min, t_max)`` inside [0, 1] where the net may be evaluated (an epsilon
            model is singular where alpha = 0, a data model where sigma = 0).
        num_classes: ``K`` for a class-conditional net; the label ``K`` means "no label" (the
            unconditional branch of classifier-free guidance).
        name: a readable name, recorded in artifacts.
        dtype: the dtype the network runs in. Default: that of the network's parameters (of an
            ``nn.Module``, a bound method's owner, or a module a closure holds), else float32.
            Never the ODE state's dtype: ground truth integrates in float64 and still calls a
            float32 network in float32.
        label_splits: which labels each split of pairs draws from (``{"train": range(0, 40),
            "val": ..., "test": ...}``), e.g. training and held-out prompts of a text model.
            Default: every split draws from all ``num_classes`` labels.

    Conditioning data is not the model: a module may name buffers that hold it (prompt
    embeddings, indexed by label along dim 0) in a class attribute ``bns_conditioning =
    ("embeds", ...)``. The fingerprint skips them and the number of labels, so a solver stays
    valid on new prompts, however many; the ground-truth caches key on the rows their split
    uses (:meth:`conditioning_digest`).

    Example:
        >>> model = Model(net, prediction="eps", schedule=VP(), sample_shape=(1, 28, 28),
        ...               t_range=(0.0, 1 - 1e-3))
        >>> u = model.velocity(x, 0.5)
    """

    def __init__(
        self,
        net: Callable[..., Tensor],
        prediction: str = "velocity",
        schedule: Schedule | str | None = None,
        sample_shape: Sequence[int] = (),
        t_range: tuple[float, float] = (0.0, 1.0),
        num_classes: int | None = None,
        name: str = "model",
        dtype: torch.dtype | None = None,
        label_splits: Mapping[str, Sequence[int]] | None = None,
    ) -> None:
        if prediction not in PREDICTIONS:
            ours = _PREDICTION_ELSEWHERE.get(prediction)
            hint = f"; bns calls {prediction!r} {ours!r}" if ours else ""
            raise ModelError(
                f"unknown prediction {prediction!r}; expected one of {PREDICTIONS}{hint}"
            )
        if schedule is None:
            raise ModelError("a Model needs a schedule (e.g. bns.schedules.CondOT())")
        if isinstance(schedule, str):  # a name: that scheduler with its default parameters
            schedule = schedule_from_config({"name": schedule})
        if not isinstance(schedule, Schedule):
            raise ModelError(
                f"schedule must be a bns.schedules.Schedule or its name, got {type(schedule).__name__}"
            )
        t_min, t_max = (float(v) for v in t_range)
        if not (0.0 <= t_min < t_max <= 1.0):
            raise ModelError(f"t_range must satisfy 0 <= t_min < t_max <= 1, got {t_range}")
        if num_classes is not None and int(num_classes) < 1:
            raise ModelError(f"num_classes must be a positive integer, got {num_classes}")
        self.net = net
        self.prediction = prediction
        self.schedule = schedule
        self.sample_shape = tuple(int(d) for d in sample_shape)
        self.t_range = (t_min, t_max)
        self.num_classes = None if num_classes is None else int(num_classes)
        self.label_splits = _check_label_splits(label_splits, self.num_classes)
        self.name = name
        self._dtype = dtype
        self._modules: list[nn.Module] | None = None
        self.forwards = 0  # network forwards (a guided evaluation counts 2 per sample)
        self.jvps = 0  # forward-mode (JVP) network calls per sample, not also counted as forwards
        self._fingerprint: str | None = None
        self._fingerprint_key: Any = None
        self.parent: Model | None = None  # the whole-range model of a span (see span())

    # -- evaluation -------------------------------------------------------------------------
    @property
    def null_label(self) -> int | None:
        return self.num_classes

    @property
    def modules(self) -> list[nn.Module]:
        """The ``nn.Module`` objects that hold the network's weights (see reachable_modules)."""
        if self._modules is None:
            self._modules = reachable_modules(self.net)
        return self._modules

    def _placement(self) -> tuple[torch.dtype, torch.device | None]:
        """``(dtype, device)`` of the network, read from its weights in one pass."""
        dtype, device = _dtype_and_device(self.modules)
        return self._dtype or dtype or torch.float32, device

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the network runs in: ``dtype=``, else its weights', else float32."""
        return self._placement()[0]

    @property
    def precision(self) -> torch.dtype:
        """The precision the network computes in: the narrower of :attr:`dtype` and its
        weights' dtype (a bf16 pipeline called in float64 computes in bf16). The default
        ground-truth tolerance follows it (:func:`bns.default_tolerance`)."""
        called, _ = self._placement()
        weights, _ = _dtype_and_device(self.modules)
        if weights is None or torch.finfo(weights).eps <= torch.finfo(called).eps:
            return called
        return weights

    @property
    def device(self) -> torch.device | None:
        """Where the network's weights are (None for a network without tensors)."""
        return self._placement()[1]

    def to(
        self, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> Model:
        """Move (and cast) the network's modules in place, like ``nn.Module.to``; returns self.

        With ``dtype`` the model also runs the network in that dtype from now on.
        """
        for m in self.modules:
            m.to(device=device, dtype=dtype)
        if dtype is not None and self._dtype is not None:
            self._dtype = dtype
        return self

    # -- part of the path ------------------------------------------------------------------
    @property
    def starts_from_data(self) -> bool:
        """Whether samples start from noised data (a span that starts inside the path) rather
        than from pure noise."""
        return self.parent is not None and self.t_range[0] > self.parent.t_range[0]

    @property
    def ends_inside(self) -> bool:
        """Whether this is a span that ends before its parent's end (on the path, not the
        data: no final step to sigma = 0)."""
        return self.parent is not None and self.t_range[1] < self.parent.t_range[1]

    def span(self, t_start: float | None = None, t_end: float | None = None) -> Model:
        """The same network over the part ``[t_start, t_end]`` of this model's range (flow
        time; either end defaults to this model's).

        A span that starts inside the path starts from noised data, as image-to-image does:
        ``x = alpha(t_start) x_1 + sigma(t_start) eps``, where ``x_1`` are this model's own
        samples (its ground truth from noise) and ``eps`` fresh noise (docs/guide.md,
        "Part of the path"). A span that ends inside the path stops there (the first half of a
        base/refiner split). The result shares the network; its fingerprint differs from this
        model's, so a solver trained for a span refuses the whole range and vice versa.
        """
        root = self.parent if self.parent is not None else self
        lo, hi = root.t_range
        t0 = self.t_range[0] if t_start is None else float(t_start)
        t1 = self.t_range[1] if t_end is None else float(t_end)
        if not (math.isfinite(t0) and math.isfinite(t1) and lo <= t0 < t1 <= hi):
            raise ModelError(
                f"a span of {self.name} must satisfy {lo:g} <= t_start < t_end <= {hi:g}"
                f" (its range, in flow time), got [{t0:g}, {t1:g}]"
            )
        if (t0, t1) == root.t_range:
            return root
        out = copy.copy(root)
        out.t_range = (t0, t1)
        out.parent = root
        out.forwards = out.jvps = 0
        out._fingerprint = out._fingerprint_key = None
        return out

    def span_info(self) -> dict[str, Any] | None:
        """What a solver of this span records (None for a whole range): its range, the whole
        range, and where its samples start (``"noise"`` or ``"noised data"``)."""
        if self.parent is None:
            return None
        return {
            "t_range": list(self.t_range),
            "whole_range": list(self.parent.t_range),
            "start": "noised data" if self.starts_from_data else "noise",
        }

    def start_state(self, data: Tensor, noise: Tensor) -> Tensor:
        """The state at this model's first time ``t_0`` of clean ``data`` noised by the forward
        process: ``alpha(t_0) data + sigma(t_0) noise`` (what image-to-image starts from;
        computed in float64, returned in ``data``'s dtype, float32 at least)."""
        if data.shape != noise.shape:
            raise ModelError(
                f"data and noise must have one shape, got {list(data.shape)} and"
                f" {list(noise.shape)}"
            )
        v = self.schedule(torch.tensor([self.t_range[0]], dtype=torch.float64))
        dtype = torch.promote_types(data.dtype, torch.float32)
        out = float(v.alpha) * data.to(torch.float64) + float(v.sigma) * noise.to(torch.float64)
        return out.to(dtype)

    def forwards_per_evaluation(self, guidance: float = 1.0) -> int:
        """Network forwards per sample of one velocity evaluation: 2 with guidance, else 1."""
        return 2 if self.num_classes is not None and float(guidance) != 1.0 else 1

    def _check_inputs(self, x: Tensor, y: Tensor | None, guidance: float) -> Tensor | None:
        """Validate the inputs; return the labels as a long tensor on ``x``'s device (or None)."""
        if not isinstance(x, Tensor) or not x.is_floating_point():
            raise ModelError(f"{self.name}: samples must be a floating point tensor")
        if x.dim() < 1 or tuple(x.shape[1:]) != self.sample_shape:
            raise ModelError(
                f"{self.name}: expected samples of shape [B, {', '.join(map(str, self.sample_shape))}],"
                f" got {list(x.shape)}"
            )
        if not math.isfinite(guidance):
            raise ModelError(f"{self.name}: guidance must be finite, got {guidance}")
        if y is not None:
            if self.num_classes is None:
                raise ModelError(f"{self.name} is unconditional but labels were given")
            y = torch.as_tensor(y, device=x.device)
            if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
                raise ModelError(f"labels must be an integer tensor, got {y.dtype}")
            if y.shape != (x.shape[0],):
                raise ModelError(f"labels must have shape [{x.shape[0]}], got {list(y.shape)}")
            if y.numel() and (int(y.min()) < 0 or int(y.max()) > self.num_classes):
                raise ModelError(
                    f"labels must lie in [0, {self.num_classes}] ({self.num_classes} = no label)"
                )
            y = y.long()
        if guidance != 1.0 and self.num_classes is None:
            raise ModelError(f"{self.name} is unconditional: guidance must be 1, got {guidance}")
        return y

    def _forward(self, x: Tensor, t: Tensor, y: Tensor | None) -> Tensor:
        net_dtype, device = self._placement()
        device = device or x.device
        # t keeps at least float32: in bf16 the times near 1 would round by about 0.004.
        t_dtype = torch.promote_types(net_dtype, torch.float32)
        args = [x.to(device=device, dtype=net_dtype), t.to(device=device, dtype=t_dtype)]
        if y is not None:
            args.append(y.to(device))
        try:
            f = self.net(*args)
        except (NetworkError, _OOM):
            raise  # a bns.Model inside said what failed; out of memory is not the network's fault
        except Exception as e:  # noqa: BLE001 - one clear line that says where it failed
            if type(e).__module__.split(".")[0] == "bns":
                # bns's own, raised while the network ran: a torchrun worker lost (the SIGTERM
                # handler raises in the main thread, wherever it is), a bns.Model inside
                raise
            line = _first_line(e)
            if isinstance(e, RuntimeError) and any(
                k in str(e) for k in ("dtype", "scalar type", "Double", "Half", "BFloat")
            ):
                raise NetworkError(
                    self.name,
                    f"the network failed when called in {net_dtype} (inputs x {net_dtype},"
                    f" t {t_dtype})",
                    _first_time(t),
                    f": {line}. Pass dtype= to bns.Model to name the dtype it runs in",
                ) from e
            raise NetworkError(
                self.name, f"the network raised {type(e).__name__}", _first_time(t), f": {line}"
            ) from e
        if not isinstance(f, Tensor) or f.shape != x.shape:
            shape = list(f.shape) if isinstance(f, Tensor) else type(f).__name__
            raise NetworkError(
                self.name,
                f"the network returned {shape} for an input of shape {list(x.shape)}",
                _first_time(t),
                f" (expected a tensor of shape {list(x.shape)})",
            )
        if not f.is_floating_point():
            raise NetworkError(
                self.name,
                f"the network returned {str(f.dtype).removeprefix('torch.')} values",
                _first_time(t),
                f" (expected a floating point tensor, e.g. {str(net_dtype).removeprefix('torch.')})",
            )
        # A network's NaN or inf must stop the run where it happens, not as a solver's failure
        # later. One sum and one device sync per network call (the only sync of a step in
        # bns.sample's no-grad path): NaN and inf propagate into the sum, and a sum that
        # merely overflows goes on to the exact check, which finds nothing. On the CPU the sum
        # is ~30x cheaper than isfinite(f).all() (measured: 25 us vs 800 us, 64 x 3072 floats).
        # Under forward mode, on the primal.
        out = _primal(f)
        if not bool(torch.isfinite(out.sum(dtype=torch.promote_types(out.dtype, torch.float32)))):
            self._check_finite(out, args[0], t, net_dtype)
        if _is_dual(x) or _is_dual(t):
            self.jvps += x.shape[0]
        else:
            self.forwards += x.shape[0]
        return f.to(x.device)

    def _check_finite(self, f: Tensor, x: Tensor, t: Tensor, net_dtype: torch.dtype) -> None:
        """Raise :class:`NonFiniteVelocity` if the network's output ``f`` holds NaN or inf in
        a row whose input ``x`` is finite and of a sane size (see :func:`_sane_bound`); rows
        whose input was already non-finite or huge are the solver's doing (training skips such
        steps). Runs only once an output is known to be non-finite."""
        b = f.shape[0]
        if b == 0:
            return
        f, x = f.reshape(b, -1), _primal(x).reshape(b, -1)
        bad = ~torch.isfinite(f).all(1)
        sane = torch.isfinite(x).all(1)
        if x.shape[1]:
            sane &= x.abs().amax(1) <= _sane_bound(net_dtype)
        blamed = bad & sane
        if not bool(blamed.any()):
            return
        kinds = [
            k
            for k, m in (("NaN", torch.isnan(f[blamed])), ("inf", torch.isinf(f[blamed])))
            if bool(m.any())
        ]
        rows = blamed.nonzero()[:, 0]
        raise NonFiniteVelocity(self.name, kinds, _first_time(t, rows), int(rows.numel()), b)

    def velocity(
        self, x: Tensor, t: Tensor | float, y: Tensor | None = None, guidance: float = 1.0
    ) -> Tensor:
        """The velocity ``u_t(x)``, shape of ``x``, computed in at least float32.

        ``t`` is a float, a 0-d tensor or a tensor ``[B]``; gradients flow through ``x`` and ``t``.
        With ``guidance = w != 1`` (conditional models) it is ``u_null + w (u_y - u_null)``; a
        missing ``y`` means the unconditional branch alone.
        """
        guidance = float(guidance)
        y = self._check_inputs(x, y, guidance)
        b = x.shape[0]
        out_dtype = torch.promote_types(x.dtype, torch.float32)
        t = torch.as_tensor(t, dtype=torch.float64, device=x.device)
        if t.dim() == 0:
            t = t.expand(b)
        elif t.shape != (b,):
            raise ModelError(f"t must be a scalar or have shape [{b}], got {list(t.shape)}")
        beta, gamma = prediction_coefficients(self.prediction, self.schedule, t)
        shape = (b,) + (1,) * (x.dim() - 1)
        beta = beta.to(out_dtype).reshape(shape)
        gamma = gamma.to(out_dtype).reshape(shape)

        if self.num_classes is not None and y is None:
            y = torch.full((b,), self.null_label, dtype=torch.long, device=x.device)
        guided = self.forwards_per_evaluation(guidance) == 2
        if guided:
            null = torch.full_like(y, self.null_label)
            f = self._forward(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, null]))
        else:
            f = self._forward(x, t, y)
        # The combination runs in out_dtype even under autocast (only the network is autocast).
        with torch.autocast(x.device.type, enabled=False):
            f = f.to(out_dtype)
            if guided:
                f_c, f_u = f.chunk(2)
                # u is affine in f with the same (beta, gamma) for both branches, so guiding f
                # is the same as guiding u.
                f = f_u + guidance * (f_c - f_u)
            return beta * x.to(out_dtype) + gamma * f

    __call__ = velocity

    # -- identity ---------------------------------------------------------------------------
    def settings(self) -> dict[str, Any]:
        """Everything but the weights that determines the velocity field (and, for a span
        that starts inside the path, where its samples start)."""
        out = {
            "name": self.name,
            "prediction": self.prediction,
            "schedule": self.schedule.config(),
            "sample_shape": list(self.sample_shape),
            "t_range": list(self.t_range),
            "num_classes": self.num_classes,
        }
        if self.starts_from_data:  # the start depends on the whole range's samples
            out["start"] = {"from": "noised data", "data_range": list(self.parent.t_range)}
        return out

    def fingerprint(self) -> str:
        """A hash of the network's weights and the model's settings (hex, 16 characters).

        Every byte of every weight and buffer counts (sha256, read in place or in 64 MiB chunks
        from a GPU: seconds for a billion weights). Cached, but recomputed whenever a setting or
        a weight changes (in place, through the tensor's version counter or, for writes through
        ``.data``, a content check of its sum and sampled values; or by replacing a tensor). A network without tensors is known by its qualified name.
        """
        skips = [_conditioning_names(m) for m in self.modules]
        identity = self.settings()
        if any(skips):  # labels index conditioning data: how many there are is data too
            identity["num_classes"] = "conditioning"
        settings = json.dumps(identity, sort_keys=True)
        states = [
            sorted((k, v) for k, v in m.state_dict(keep_vars=True).items() if k not in skip)
            for m, skip in zip(self.modules, skips)
        ]
        # Cheap key: the settings and, per tensor, its storage and in-place version counter,
        # plus a content check (the sum and a few values) for writes through ``.data``, which
        # bypass the version counter (as EMA updates do).
        key = (
            settings,
            tuple(
                (k, v.data_ptr(), v._version, tuple(v.shape), v.dtype, str(v.device))
                for state in states
                for k, v in state
            ),
            _content_check([v for state in states for _, v in state]),
        )
        if self._fingerprint is None or self._fingerprint_key != key:
            h = hashlib.sha256()
            h.update(settings.encode())
            for state in states:
                for name, value in state:
                    h.update(name.encode())
                    h.update(
                        str(value.dtype).encode() + str(tuple(value.reshape(-1).shape)).encode()
                    )
                    if value.dim() == 0:
                        h.update(b"0-d")  # flattened, a 0-d buffer would hash like a [1] one
                    hash_tensor(h, value)
            if not states:
                h.update(repr(getattr(self.net, "__qualname__", type(self.net).__name__)).encode())
            self._fingerprint = h.hexdigest()[:16]
            self._fingerprint_key = key
        return self._fingerprint

    def labels_for(self, split: str) -> list[int] | None:
        """The labels pairs of ``split`` draw from (None: all ``num_classes``)."""
        if self.label_splits is None or self.num_classes is None:
            return None
        if split not in self.label_splits:
            raise ModelError(
                f"{self.name} has label splits {sorted(self.label_splits)}, not {split!r}"
            )
        return list(self.label_splits[split])

    def conditioning_digest(self, labels: Sequence[int] | None = None) -> str | None:
        """A hash of the conditioning data (``bns_conditioning`` buffers) that ``labels`` and
        the null label use (all of it for None); None where the network names none."""
        found = [
            (name, v)
            for m in self.modules
            for names in [_conditioning_names(m)]
            if names
            for name, v in sorted(m.state_dict(keep_vars=True).items())
            if name in names
        ]
        if not found:
            return None
        h = hashlib.sha256()
        rows = None
        if labels is not None and self.num_classes is not None:
            rows = torch.tensor([*labels, self.num_classes], dtype=torch.long)
        for name, v in found:
            v = v.detach()
            if rows is not None and v.dim() > 0 and v.shape[0] == self.num_classes + 1:
                v = v[rows.to(v.device)]  # indexed by label: just the rows this split uses
            h.update(name.encode() + str(v.dtype).encode() + str(tuple(v.shape)).encode())
            hash_tensor(h, v.contiguous())
        return h.hexdigest()[:16]

    def __repr__(self) -> str:
        return (
            f"Model(name={self.name!r}, prediction={self.prediction!r}, schedule={self.schedule!r},"
            f" sample_shape={self.sample_shape}, t_range={self.t_range},"
            f" num_classes={self.num_classes})"
        )
