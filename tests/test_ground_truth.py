"""Ground truth against the exact trajectories of a single Gaussian.

For data N(mu, s^2 I) every scheduler's flow is affine: x_t = alpha_t mu + sqrt(alpha_t^2 s^2 +
sigma_t^2) z with z = (x_0 - alpha_0 mu) / sqrt(alpha_0^2 s^2 + sigma_0^2) (t_0 = t_min).
"""

from __future__ import annotations

import pytest
import torch

import bns
from bns import ModelError
from bns.models.gmm import gaussian_mixture_model
from bns.schedules import VP, CondOT, Cosine

F64 = torch.float64


def exact_endpoint(schedule, mu, s, x0, t_range):
    t0, t1 = (torch.tensor(v, dtype=F64) for v in t_range)
    a0, s0, _, _ = schedule(t0)
    a1, s1, _, _ = schedule(t1)
    z = (x0 - a0 * mu) / torch.sqrt(a0**2 * s**2 + s0**2)
    return a1 * mu + torch.sqrt(a1**2 * s**2 + s1**2) * z


CASES = [
    (CondOT(), "velocity", (0.0, 1.0)),
    (VP(), "eps", (0.0, 1 - 1e-3)),
    (Cosine(), "velocity", (0.0, 1.0)),
    (Cosine(), "x1", (0.0, 1 - 1e-3)),
    (VP(), "v", (1e-3, 1 - 1e-3)),
]
IDS = ["condot-velocity", "vp-eps", "cosine-velocity", "cosine-x1", "vp-v"]


@pytest.mark.parametrize("schedule,prediction,t_range", CASES, ids=IDS)
def test_single_gaussian_exact_trajectory(schedule, prediction, t_range):
    model = gaussian_mixture_model(
        dim=8, components=1, std=0.1, schedule=schedule, prediction=prediction, t_range=t_range
    )
    mu, s = model.net.means[0], model.net.stds[0]
    x0 = torch.randn(16, 8, generator=torch.Generator().manual_seed(0), dtype=F64)
    want = exact_endpoint(schedule, mu, s, x0, t_range)
    before = model.forwards
    out, stats = bns.ground_truth(model, x0, return_stats=True)
    assert out.shape == x0.shape and out.dtype == F64
    # Default tolerances (1e-5): every sample's RMS error is under 1e-4.
    rms = (out - want).pow(2).mean(1).sqrt()
    assert rms.max() < 1e-4, rms.max()
    # The reported NFE counts the velocity evaluations of the whole batch.
    assert stats["nfe"] == stats["forwards"] and stats["nfe"] > 6
    assert model.forwards - before == stats["nfe"] * x0.shape[0]
    # Tighter tolerances converge onto the exact answer.
    tight = bns.ground_truth(model, x0, rtol=1e-9, atol=1e-9)
    assert (tight - want).abs().max() < 1e-7


def test_float32_start_and_other_shapes():
    model = gaussian_mixture_model(dim=6, components=1, std=0.3, seed=2)
    x0 = torch.randn(3, 6)
    out = bns.ground_truth(model, x0, rtol=1e-8, atol=1e-8)
    want = exact_endpoint(model.schedule, model.net.means[0], model.net.stds[0], x0.to(F64), (0, 1))
    assert out.dtype == F64
    assert (out - want).abs().max() < 1e-6
    with pytest.raises(ModelError, match="expected samples of shape"):
        bns.ground_truth(model, torch.randn(3, 5))


def test_every_sample_meets_the_tolerance():
    # One hard sample in a batch of easy ones must not drift: the error norm is per sample.
    model = gaussian_mixture_model(dim=4, components=1, std=0.05, seed=3)
    mu, s = model.net.means[0], model.net.stds[0]
    x0 = torch.randn(8, 4, generator=torch.Generator().manual_seed(1), dtype=F64)
    x0[0] *= 4.0
    want = exact_endpoint(model.schedule, mu, s, x0, (0.0, 1.0))
    out = bns.ground_truth(model, x0)
    alone = bns.ground_truth(model, x0[:1])
    assert (out[0] - want[0]).abs().max() < 1e-4
    assert (out[0] - want[0]).abs().max() <= 2 * (alone[0] - want[0]).abs().max() + 1e-6


def test_conditional_and_guidance():
    # Two components with labels 0 and 1: a labelled trajectory is a single-Gaussian one.
    model = gaussian_mixture_model(dim=4, components=2, num_classes=2, std=0.2, seed=4)
    x0 = torch.randn(4, 4, generator=torch.Generator().manual_seed(2), dtype=F64)
    y = torch.tensor([0, 1, 1, 0])
    out = bns.ground_truth(model, x0, y, rtol=1e-9, atol=1e-9)
    means, stds = model.net.means[y], model.net.stds[y][:, None]
    want = exact_endpoint(model.schedule, means, stds, x0, (0.0, 1.0))
    assert (out - want).abs().max() < 1e-7

    # Guided: compare with an independent fixed-step RK4 on the guided velocity.
    w = 2.5
    before = model.forwards
    guided, stats = bns.ground_truth(
        model, x0, y, guidance=w, rtol=1e-9, atol=1e-9, return_stats=True
    )
    assert stats["forwards"] == 2 * stats["nfe"]
    assert model.forwards - before == stats["forwards"] * x0.shape[0]

    def u(x, t):
        return model.velocity(x, t, y, guidance=w)

    x, n = x0.clone(), 400
    h = 1.0 / n
    for i in range(n):
        t = i * h
        k1 = u(x, t)
        k2 = u(x + h / 2 * k1, t + h / 2)
        k3 = u(x + h / 2 * k2, t + h / 2)
        k4 = u(x + h * k3, t + h)
        x = x + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
    assert (guided - x).abs().max() < 1e-6
    assert (guided - out).abs().max() > 1e-2  # guidance did change the answer
