"""`Model`: a network, its prediction type and scheduler, seen as one velocity in flow time.

Every usual network output ``f`` turns into a velocity that is affine in ``x`` and ``f``:
``u_t(x) = beta_t x + gamma_t f_t(x)`` (bns-math.md, section 1). Classifier-free guidance
combines the conditional and unconditional velocities, ``u = u_0 + w (u_y - u_0)``, in one
batched network call.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ._hashing import tensor_bytes
from .schedules import Schedule

__all__ = ["Model", "PREDICTIONS", "prediction_coefficients", "ModelError"]

PREDICTIONS = ("velocity", "eps", "x1", "v")


class ModelError(ValueError):
    """A model was called with inputs it cannot take, or returned something unusable."""


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
    a, s, da, ds = schedule(t)
    if prediction == "velocity":
        return torch.zeros_like(t), torch.ones_like(t)
    if prediction == "eps":
        return da / a, ds - s * da / a
    if prediction == "x1":
        return ds / s, da - a * ds / s
    if prediction == "v":
        n = a * a + s * s
        return (da * a + ds * s) / n, (ds * a - da * s) / n
    raise ValueError(f"unknown prediction {prediction!r}; expected one of {PREDICTIONS}")


class Model:
    """A pre-trained network seen as a velocity field ``u_t(x)`` in flow time.

    Args:
        net: ``net(x, t, y=None) -> f`` with ``x`` of shape ``[B, *sample_shape]``, ``t`` a float
            tensor ``[B]`` in flow time and ``y`` a long tensor ``[B]`` or None.
        prediction: what the net predicts: ``"velocity"``, ``"eps"``, ``"x1"`` (data) or ``"v"``.
        schedule: the scheduler of the path the net was trained on.
        sample_shape: the shape of one sample, e.g. ``(C, H, W)``.
        t_range: ``(t_min, t_max)`` inside [0, 1] where the net may be evaluated (an epsilon
            model is singular where alpha = 0, a data model where sigma = 0).
        num_classes: ``K`` for a class-conditional net; the label ``K`` means "no label" (the
            unconditional branch of classifier-free guidance).
        name: a readable name, recorded in artifacts.
        dtype: the dtype the network runs in (default: that of the input).

    Example:
        >>> model = Model(net, prediction="eps", schedule=VP(), sample_shape=(1, 28, 28),
        ...               t_range=(0.0, 1 - 1e-3))
        >>> u = model.velocity(x, 0.5)
    """

    def __init__(
        self,
        net: Callable[..., Tensor],
        prediction: str = "velocity",
        schedule: Schedule | None = None,
        sample_shape: Sequence[int] = (),
        t_range: tuple[float, float] = (0.0, 1.0),
        num_classes: int | None = None,
        name: str = "model",
        dtype: torch.dtype | None = None,
    ) -> None:
        if prediction not in PREDICTIONS:
            raise ValueError(f"unknown prediction {prediction!r}; expected one of {PREDICTIONS}")
        if schedule is None:
            raise ValueError("a Model needs a schedule (e.g. bns.schedules.CondOT())")
        t_min, t_max = (float(v) for v in t_range)
        if not (0.0 <= t_min < t_max <= 1.0):
            raise ValueError(f"t_range must satisfy 0 <= t_min < t_max <= 1, got {t_range}")
        if num_classes is not None and int(num_classes) < 1:
            raise ValueError(f"num_classes must be a positive integer, got {num_classes}")
        self.net = net
        self.prediction = prediction
        self.schedule = schedule
        self.sample_shape = tuple(int(d) for d in sample_shape)
        self.t_range = (t_min, t_max)
        self.num_classes = None if num_classes is None else int(num_classes)
        self.name = name
        self.dtype = dtype
        self.forwards = 0  # network forwards (a guided evaluation counts 2 per sample)
        self._fingerprint: str | None = None
        self._fingerprint_key: Any = None

    # -- evaluation -------------------------------------------------------------------------
    @property
    def null_label(self) -> int | None:
        return self.num_classes

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
        net_dtype = self.dtype or x.dtype
        f = (
            self.net(x.to(net_dtype), t.to(net_dtype), y)
            if y is not None
            else (self.net(x.to(net_dtype), t.to(net_dtype)))
        )
        if not isinstance(f, Tensor) or f.shape != x.shape:
            shape = list(f.shape) if isinstance(f, Tensor) else type(f).__name__
            raise ModelError(
                f"{self.name}: the network returned {shape} for an input of shape {list(x.shape)}"
            )
        self.forwards += x.shape[0]
        return f

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
        if self.num_classes is not None and guidance != 1.0:
            null = torch.full_like(y, self.null_label)
            f = self._forward(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, null]))
            f_c, f_u = f.to(out_dtype).chunk(2)
            # u is affine in f with the same (beta, gamma) for both branches, so guiding f is
            # the same as guiding u.
            f = f_u + guidance * (f_c - f_u)
        else:
            f = self._forward(x, t, y).to(out_dtype)
        return beta * x.to(out_dtype) + gamma * f

    __call__ = velocity

    # -- identity ---------------------------------------------------------------------------
    def settings(self) -> dict[str, Any]:
        """Everything but the weights that determines the velocity field."""
        return {
            "name": self.name,
            "prediction": self.prediction,
            "schedule": self.schedule.config(),
            "sample_shape": list(self.sample_shape),
            "t_range": list(self.t_range),
            "num_classes": self.num_classes,
        }

    def _module(self) -> nn.Module | None:
        """The ``nn.Module`` holding the weights: the net itself or the owner of a bound method."""
        if isinstance(self.net, nn.Module):
            return self.net
        owner = getattr(self.net, "__self__", None)
        return owner if isinstance(owner, nn.Module) else None

    def fingerprint(self) -> str:
        """A hash of the network's weights and the model's settings (hex, 16 characters).

        Cached, but recomputed whenever a setting or a weight changes (in place, through the
        tensor's version counter, or by replacing a tensor).
        """
        settings = json.dumps(self.settings(), sort_keys=True)
        module = self._module()
        state = sorted(module.state_dict().items()) if module is not None else []
        # Cheap key: the settings and, per tensor, its storage and in-place version counter.
        key = (
            settings,
            tuple(
                (k, v.data_ptr(), v._version, tuple(v.shape), v.dtype, str(v.device))
                for k, v in state
            ),
        )
        if self._fingerprint is None or self._fingerprint_key != key:
            h = hashlib.sha256()
            h.update(settings.encode())
            if module is not None:
                for name, value in state:
                    h.update(name.encode())
                    v = value.detach().cpu().contiguous().reshape(-1)
                    h.update(str(v.dtype).encode() + str(tuple(v.shape)).encode())
                    if value.dim() == 0:
                        # Flattened, a 0-d buffer would hash like a [1] one. Only 0-d tensors get
                        # the marker, so fingerprints recorded before this fix stay valid.
                        h.update(b"0-d")
                    h.update(tensor_bytes(v))
            else:
                h.update(repr(getattr(self.net, "__qualname__", type(self.net).__name__)).encode())
            self._fingerprint = h.hexdigest()[:16]
            self._fingerprint_key = key
        return self._fingerprint

    def __repr__(self) -> str:
        return (
            f"Model(name={self.name!r}, prediction={self.prediction!r}, schedule={self.schedule!r},"
            f" sample_shape={self.sample_shape}, t_range={self.t_range},"
            f" num_classes={self.num_classes})"
        )
