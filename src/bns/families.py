"""Solver families: parameterizations that map free parameters to an :class:`NSSolver`.

The trainer optimizes a family's parameters and never looks inside: it calls ``solver()`` to
build a differentiable NSSolver and ``param_groups()`` for the optimizer. A new family (a
time-only grid, a scale-time transformation, linear multistep coefficients) is one class
registered in :data:`FAMILIES`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .solver import NSSolver

__all__ = ["Family", "BNSFamily", "FAMILIES", "make_family"]


class Family(nn.Module):
    """Free parameters of a solver family, initialized from a classical solver.

    Subclasses set ``name``, build their parameters from ``init`` and implement
    :meth:`solver`. With the parameters at their initial values, ``solver()`` must equal
    ``init`` (to rounding): zero training steps return the initial solver.
    """

    name = "family"

    def __init__(self, init: NSSolver) -> None:
        super().__init__()
        self.register_buffer("t_ends", init.times[[0, -1]].clone())

    def solver(self) -> NSSolver:
        raise NotImplementedError

    def param_groups(self, lr: float, coef_lr: float) -> list[dict[str, Any]]:
        """Adam parameter groups: ``lr_mult`` scales the schedule's learning rate per group."""
        raise NotImplementedError

    def _times(self, logits: torch.Tensor) -> torch.Tensor:
        """Strictly increasing times with fixed ends: a softmax of ``logits`` as increments."""
        t0, t1 = self.t_ends
        dt = torch.softmax(logits, 0) * (t1 - t0)
        times = torch.cat([t0[None], t0 + torch.cumsum(dt, 0)])
        return torch.cat([times[:-1], t1[None]])  # the end exactly, not a rounded sum


class BNSFamily(Family):
    """The full non-stationary family: ``n`` time increments (softmax of free logits), ``a``
    (``n`` values) and the lower triangle of ``b``: ``(n^2 + 5n - 2) / 2`` free numbers."""

    name = "bns"

    def __init__(self, init: NSSolver) -> None:
        super().__init__(init)
        n, t = init.nfe, init.times
        self.logits = nn.Parameter(torch.log(t[1:] - t[:-1]))
        self.a = nn.Parameter(init.a.clone())
        self.b = nn.Parameter(init.b.clone())
        self.register_buffer("mask", torch.tril(torch.ones(n, n, dtype=torch.float64)))

    def solver(self) -> NSSolver:
        return NSSolver(self._times(self.logits), self.a, self.b * self.mask)

    def param_groups(self, lr: float, coef_lr: float) -> list[dict[str, Any]]:
        # The time logits are relative already; a and b are of the size of a step.
        return [
            {"params": [self.logits], "lr_mult": 1.0},
            {"params": [self.a, self.b], "lr_mult": coef_lr},
        ]


FAMILIES: dict[str, type[Family]] = {"bns": BNSFamily}


def make_family(name: str, init: NSSolver) -> Family:
    """The family ``name`` initialized at the solver ``init`` (strictly increasing times)."""
    if name not in FAMILIES:
        raise ValueError(f"unknown solver family {name!r}; known: {', '.join(FAMILIES)}")
    return FAMILIES[name](init)
