"""flow_matching (facebookresearch/flow_matching) integration.

flow_matching's convention is bns's: time ``t`` in [0, 1] with ``t = 0`` the source (noise) and
``t = 1`` the data, ``dx/dt = u_t(x)``, and the CondOT path ``x_t = t x_1 + (1 - t) x_0`` by
default. Its :class:`~flow_matching.solver.ODESolver` calls ``velocity_model(x=x, t=t, **extras)``
with a 0-d ``t`` (torchdiffeq's convention). So:

- :func:`model_from_wrapper` turns a velocity ``ModelWrapper`` into a :class:`bns.Model` (to
  distill a solver for it); the wrapper sees the same 0-d ``t`` as under ``ODESolver``.
- :class:`BNSSolver` is a flow_matching ``Solver`` that samples with a (trained) NS solver.

Example:
    >>> model = model_from_wrapper(wrapped, sample_shape=(2,))
    >>> solver, _ = bns.distill(model, nfe=8)
    >>> x1 = BNSSolver(wrapped, solver).sample(torch.randn(16, 2))
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from flow_matching.solver.solver import Solver
from torch import Tensor

from ..model import Model
from ..schedules import CondOT, Schedule
from ..solver import NSSolver, sample
from ._extras import ExtrasNet

__all__ = ["BNSSolver", "model_from_wrapper"]


def _time_like_ode_solver(t: Tensor) -> Tensor:
    """A 0-d ``t`` when the batch shares one time (as ODESolver passes it), else ``[B]``."""
    if t.dim() == 1 and t.numel() > 0 and bool(torch.all(t == t[0])):
        return t[0]
    return t


class _WrapperNet(ExtrasNet):
    def forward(self, x: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        return self.fn(x=x, t=_time_like_ode_solver(t), **self.extras_for(y))


def model_from_wrapper(
    model_wrapper: Callable[..., Tensor],
    sample_shape: Sequence[int],
    *,
    prediction: str = "velocity",
    schedule: Schedule | None = None,
    t_range: tuple[float, float] = (0.0, 1.0),
    num_classes: int | None = None,
    label_key: str = "label",
    extras: dict[str, Any] | None = None,
    name: str = "flow_matching",
    dtype: torch.dtype | None = None,
) -> Model:
    """A :class:`bns.Model` of a flow_matching ``ModelWrapper`` (or any ``f(x=, t=, **extras)``).

    Args:
        model_wrapper: called as ``model_wrapper(x=x, t=t, **extras)``; ``t`` is 0-d when the
            batch shares one time (as under ``ODESolver``), else ``[B]``.
        sample_shape: the shape of one sample.
        prediction, schedule: what the wrapper returns and on which path (default: the
            velocity of flow_matching's CondOT path).
        t_range: where the wrapper may be evaluated.
        num_classes: ``K`` for a label-conditional wrapper; bns's label ``y`` is passed as
            ``extras[label_key]`` and the label ``K`` must be the wrapper's unconditional input.
        extras: fixed keyword arguments passed on every call.
        name: the model's name in artifacts.
        dtype: the dtype the wrapper runs in (``x`` reaches it in it, ``t`` in it or float32).
            Default: that of its weights (a ``ModelWrapper`` is an ``nn.Module``), else float32;
            pass it for a plain function, e.g. ``torch.float64`` for an exact one.
    """
    if not callable(model_wrapper):
        raise TypeError(f"model_wrapper must be callable, got {type(model_wrapper).__name__}")
    net = _WrapperNet(model_wrapper, label_key if num_classes is not None else None, extras or {})
    return Model(
        net,
        prediction=prediction,
        schedule=schedule or CondOT(),
        sample_shape=tuple(sample_shape),
        t_range=t_range,
        num_classes=num_classes,
        name=name,
        dtype=dtype,
    )


class BNSSolver(Solver):
    """A flow_matching ``Solver`` that samples with a non-stationary solver.

    ``sample(x_init, **model_extras)`` runs ``solver`` on ``velocity_model(x=x, t=t,
    **model_extras)`` from ``x_init`` at ``t_0`` and returns the state at ``t_n`` (the same as
    :func:`bns.sample`; ``solver.nfe`` velocity evaluations). States accumulate in at least
    float32.

    Args:
        velocity_model: a ``ModelWrapper`` (or callable) returning the velocity in
            flow_matching's time.
        solver: the NS solver (from :func:`bns.distill`, :mod:`bns.solvers` or a file).
    """

    def __init__(self, velocity_model: Callable[..., Tensor], solver: NSSolver) -> None:
        super().__init__()
        if not isinstance(solver, NSSolver):
            raise TypeError(f"solver must be a bns.NSSolver, got {type(solver).__name__}")
        solver.validate()
        self.velocity_model = velocity_model
        self.solver = solver

    def sample(
        self,
        x_init: Tensor,
        return_intermediates: bool = False,
        enable_grad: bool = False,
        **model_extras: Any,
    ) -> Tensor:
        """Sample from ``x_init`` (``[B, ...]``). With ``return_intermediates`` return the states
        ``[x_0, ..., x_n]`` at the solver's times (``solver.times``) stacked, ``[n + 1, B, ...]``,
        like ODESolver returns its states at ``time_grid``."""

        def velocity(x: Tensor, t: Tensor) -> Tensor:
            t = torch.as_tensor(t, dtype=x.dtype, device=x.device)
            return self.velocity_model(x=x, t=t, **model_extras)

        with torch.set_grad_enabled(enable_grad):
            out = sample(velocity, x_init, self.solver, return_trajectory=return_intermediates)
        if return_intermediates:
            return torch.stack(out[1])
        return out
