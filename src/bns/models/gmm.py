"""The analytic model: a Gaussian mixture whose exact velocity has a closed form.

Data ``x_1 ~ sum_k w_k N(mu_k, s_k^2 I)``. Given ``x_t = alpha x_1 + sigma eps`` the component
posterior and the posterior means of ``x_1`` and ``eps`` are exact, so the "network" predicts
any target (velocity, eps, x1, v) with no error under any scheduler. Components carry class
labels, so conditional velocities and classifier-free guidance are exact too. It is the
ground-truth model of the tests and the built-in model ``gmm``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ..errors import InputError
from ..model import Model
from ..schedules import CondOT, Schedule

__all__ = ["GaussianMixtureNet", "gmm", "gaussian_mixture_model"]


class GaussianMixtureNet(nn.Module):
    """``net(x, t, y=None)``: the exact ``prediction`` of a labelled Gaussian mixture.

    Args:
        means: ``[K, D]`` component means (``D`` = product of ``sample_shape``).
        stds: ``[K]`` component standard deviations (> 0).
        weights: ``[K]`` mixture weights.
        labels: ``[K]`` class of each component; label ``num_classes`` (or None) selects all.
        schedule, prediction: the path and the target the net returns.
        sample_shape: the shape of one sample (default ``(D,)``).
        num_classes: the number of classes (default: one past the largest label).
    """

    def __init__(
        self,
        means: Tensor,
        stds: Tensor,
        weights: Tensor,
        labels: Tensor,
        schedule: Schedule,
        prediction: str = "velocity",
        sample_shape: tuple[int, ...] | None = None,
        num_classes: int | None = None,
    ) -> None:
        super().__init__()
        self.register_buffer("means", torch.as_tensor(means, dtype=torch.float64))
        self.register_buffer("stds", torch.as_tensor(stds, dtype=torch.float64))
        self.register_buffer(
            "log_weights", torch.log(torch.as_tensor(weights, dtype=torch.float64))
        )
        self.register_buffer("labels", torch.as_tensor(labels, dtype=torch.long))
        self.schedule = schedule
        self.prediction = prediction
        self.sample_shape = tuple(sample_shape or (self.means.shape[1],))
        if math.prod(self.sample_shape) != self.means.shape[1]:
            raise InputError(
                f"sample_shape {self.sample_shape} does not hold {self.means.shape[1]} values"
            )
        # The null label must be the Model's (K), not one past the largest label in use.
        self.num_classes = int(self.labels.max()) + 1 if num_classes is None else int(num_classes)
        if int(self.labels.max()) >= self.num_classes:
            raise InputError(f"component labels must lie in [0, {self.num_classes})")

    def posterior(self, x: Tensor, t: Tensor, y: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """``(E[x_1 | x_t], E[eps | x_t])`` computed in float64, shapes ``[B, D]``."""
        x1, score = self._posterior(x, t, y)
        s = self.schedule(t.to(torch.float64).reshape(-1)).sigma.reshape(-1, 1)
        return x1, s * score

    def _posterior(self, x: Tensor, t: Tensor, y: Tensor | None) -> tuple[Tensor, Tensor]:
        """``E[x_1 | x_t]`` and ``E[(x - alpha mu_k) / var_k]`` (``E[eps | x_t] / sigma``)."""
        xf = x.reshape(x.shape[0], -1).to(torch.float64)
        t = t.to(torch.float64).reshape(-1)
        v = self.schedule(t)
        a, s = v.alpha[:, None], v.sigma[:, None]  # [B, 1]
        var = a * a * self.stds**2 + s * s  # [B, K]
        diff = xf[:, None, :] - a[:, :, None] * self.means[None]  # [B, K, D]
        d = xf.shape[1]
        logp = (
            self.log_weights
            - 0.5 * (diff * diff).sum(-1) / var
            - 0.5 * d * torch.log(2 * math.pi * var)
        )
        if y is not None:
            allowed = (self.labels[None, :] == y[:, None]) | (y[:, None] >= self.num_classes)
            logp = logp.masked_fill(~allowed, -math.inf)
        p = torch.softmax(logp, dim=-1)  # [B, K]
        r = diff / var[:, :, None]  # (x - alpha mu_k) / var_k
        x1 = (p[:, :, None] * (self.means[None] + (a * self.stds**2)[:, :, None] * r)).sum(1)
        return x1, (p[:, :, None] * r).sum(1)

    def forward(self, x: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        x1, score = self._posterior(x, t, y)
        a, s, da, ds = (
            v.to(torch.float64).reshape(-1, 1)
            for v in self.schedule(t.to(torch.float64).reshape(-1))
        )
        eps = s * score
        if self.prediction == "velocity":
            # sigma' eps = (sigma sigma') score. A VP scheduler has sigma' = -inf where sigma = 0
            # (t = 1), yet sigma sigma' = -alpha alpha' stays finite there.
            s_ds = torch.where(torch.isfinite(ds), s * ds, -a * da)
            f = da * x1 + s_ds * score
        elif self.prediction == "eps":
            f = eps
        elif self.prediction == "x1":
            f = x1
        elif self.prediction == "v":
            f = a * eps - s * x1
        else:
            raise InputError(f"unknown prediction {self.prediction!r}")
        return f.to(x.dtype).reshape(x.shape)

    def sample_data(
        self, n: int, generator: torch.Generator | None = None, y: Tensor | None = None
    ) -> Tensor:
        """Draw ``n`` data points (of class ``y`` where given), shape ``[n, *sample_shape]``."""
        logits = self.log_weights.expand(n, -1)
        if y is not None:
            logits = logits.masked_fill(self.labels[None, :] != y[:, None], -math.inf)
        k = torch.multinomial(torch.softmax(logits, -1), 1, generator=generator).squeeze(1)
        z = torch.randn(n, self.means.shape[1], generator=generator, dtype=torch.float64)
        return (self.means[k] + self.stds[k, None] * z).reshape(n, *self.sample_shape)


def gaussian_mixture_model(
    dim: int = 64,
    components: int = 8,
    num_classes: int | None = None,
    std: float = 0.1,
    scale: float = 1.0,
    schedule: Schedule | None = None,
    prediction: str = "velocity",
    t_range: tuple[float, float] = (0.0, 1.0),
    seed: int = 0,
    name: str | None = None,
) -> Model:
    """A :class:`bns.Model` over a random labelled Gaussian mixture in ``dim`` dimensions.

    Means are ``scale``-sized random directions, components have standard deviation ``std``
    (small ``std``: strongly curved trajectories); component ``k`` has label ``k % num_classes``.
    """
    if int(dim) < 1 or int(components) < 1:
        raise InputError(f"need dim >= 1 and components >= 1, got {dim}, {components}")
    if num_classes is not None and not 1 <= int(num_classes) <= int(components):
        raise InputError(
            f"num_classes must lie in [1, components = {components}] so that every class has a"
            f" component, got {num_classes}"
        )
    if not (math.isfinite(std) and std > 0):
        raise InputError(f"std must be a finite number > 0, got {std}")
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(components, dim, generator=g, dtype=torch.float64)
    means = scale * means
    stds = std * (0.5 + torch.rand(components, generator=g, dtype=torch.float64))
    weights = 0.5 + torch.rand(components, generator=g, dtype=torch.float64)
    weights = weights / weights.sum()
    nc = num_classes or 1
    labels = torch.arange(components) % nc
    schedule = schedule or CondOT()
    net = GaussianMixtureNet(means, stds, weights, labels, schedule, prediction, num_classes=nc)
    return Model(
        net,
        prediction=prediction,
        schedule=schedule,
        sample_shape=(dim,),
        t_range=t_range,
        num_classes=num_classes,
        name=name or f"gmm{dim}",
    )


def gmm() -> Model:
    """The built-in ``gmm`` model: 64 dimensions, 16 components in 4 classes, curved trajectories."""
    return gaussian_mixture_model(dim=64, components=16, num_classes=4, std=0.15, name="gmm")
