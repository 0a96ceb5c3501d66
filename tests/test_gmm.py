"""The analytic Gaussian-mixture model against an independent computation of its score.

For x_t = alpha x_1 + sigma eps with x_1 a Gaussian mixture, p_t is the mixture of
N(alpha mu_k, (alpha^2 s_k^2 + sigma^2) I); Tweedie's formula turns its score (autograd through
torch.distributions here) into E[eps | x] = -sigma score and E[x_1 | x] = (x + sigma^2 score)/alpha.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import distributions as D

from bns.model import PREDICTIONS
from bns.models.gmm import GaussianMixtureNet, gaussian_mixture_model, gmm
from bns.schedules import EDM, VP, CondOT, Cosine

F64 = torch.float64


def reference_posterior(net, x, t, keep=None):
    """(E[x1 | x_t], E[eps | x_t]) from the score of p_t, components restricted to ``keep``."""
    a, s, _, _ = (v.reshape(-1, 1) for v in net.schedule(t))  # [B, 1]
    means, stds, logw = net.means, net.stds, net.log_weights
    x = x.detach().clone().requires_grad_(True)
    logps = []
    for i in range(x.shape[0]):
        k = torch.arange(len(stds)) if keep is None else keep[i]
        scale = torch.sqrt(a[i] ** 2 * stds[k] ** 2 + s[i] ** 2)  # [K]
        comp = D.Independent(D.Normal(a[i] * means[k], scale[:, None].expand_as(means[k])), 1)
        mix = D.MixtureSameFamily(D.Categorical(logits=logw[k]), comp)
        logps.append(mix.log_prob(x[i]))
    (score,) = torch.autograd.grad(torch.stack(logps).sum(), x)
    return (x.detach() + s**2 * score) / a, -s * score


SCHEDULES = [CondOT(), VP(), Cosine(), EDM()]


@pytest.mark.parametrize("sched", SCHEDULES, ids=["condot", "vp", "cosine", "edm"])
def test_posterior_matches_the_score_of_the_marginal(sched):
    model = gaussian_mixture_model(dim=3, components=4, std=0.3, schedule=sched, seed=2)
    net = model.net
    g = torch.Generator().manual_seed(0)
    t = torch.tensor([0.05, 0.3, 0.6, 0.9, 0.99], dtype=F64)
    x = torch.randn(5, 3, generator=g, dtype=F64)
    x1, eps = net.posterior(x, t)
    ref_x1, ref_eps = reference_posterior(net, x, t)
    torch.testing.assert_close(x1, ref_x1, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(eps, ref_eps, rtol=1e-9, atol=1e-9)
    # Every prediction type is the matching function of the posterior means.
    a, s, da, ds = (v.reshape(-1, 1) for v in sched(t))
    want = {
        "velocity": da * ref_x1 + ds * ref_eps,
        "eps": ref_eps,
        "x1": ref_x1,
        "v": a * ref_eps - s * ref_x1,
    }
    for p in PREDICTIONS:
        net.prediction = p
        torch.testing.assert_close(net(x, t), want[p], rtol=1e-9, atol=1e-9)


def test_conditional_posterior_uses_only_the_class_components():
    model = gaussian_mixture_model(dim=3, components=6, num_classes=3, std=0.3, seed=3)
    net = model.net
    t = torch.tensor([0.2, 0.5, 0.8, 0.4], dtype=F64)
    x = torch.randn(4, 3, generator=torch.Generator().manual_seed(1), dtype=F64)
    y = torch.tensor([0, 2, 1, 3])  # 3 is the null label: every component
    keep = [torch.nonzero(net.labels == int(c)).flatten() for c in y[:3]] + [torch.arange(6)]
    x1, eps = net.posterior(x, t, y)
    ref_x1, ref_eps = reference_posterior(net, x, t, keep)
    torch.testing.assert_close(x1, ref_x1, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(eps, ref_eps, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(net.labels, torch.arange(6) % 3)


def test_single_gaussian_velocity_closed_form():
    # x_t = alpha mu + sqrt(v_t) z: u_t(x) = alpha' mu + (v_t' / (2 v_t)) (x - alpha mu).
    for sched in SCHEDULES:
        model = gaussian_mixture_model(dim=4, components=1, std=0.4, schedule=sched, seed=5)
        mu, sd = model.net.means[0], model.net.stds[0]
        t = torch.tensor([0.1, 0.5, 0.9], dtype=F64)
        x = torch.randn(3, 4, generator=torch.Generator().manual_seed(2), dtype=F64)
        a, s, da, ds = (v.reshape(-1, 1) for v in sched(t))
        v = a * a * sd * sd + s * s
        dv = 2 * a * da * sd * sd + 2 * s * ds
        want = da * mu + dv / (2 * v) * (x - a * mu)
        torch.testing.assert_close(model.velocity(x, t), want, rtol=1e-12, atol=1e-12)


def test_vp_velocity_is_finite_at_t_1():
    # sigma' = -inf at t = 1 for VP, but sigma sigma' stays finite: so does the velocity.
    model = gaussian_mixture_model(dim=3, components=3, std=0.3, schedule=VP(), seed=1)
    x = torch.randn(4, 3, generator=torch.Generator().manual_seed(0), dtype=F64)
    u1 = model.velocity(x, 1.0)
    assert torch.all(torch.isfinite(u1))
    torch.testing.assert_close(u1, model.velocity(x, 1 - 1e-9), rtol=1e-6, atol=1e-6)


def test_works_on_image_shaped_samples():
    g = torch.Generator().manual_seed(0)
    shape = (2, 2, 3)
    net = GaussianMixtureNet(
        torch.randn(2, 12, generator=g, dtype=F64),
        torch.tensor([0.2, 0.3], dtype=F64),
        torch.tensor([0.4, 0.6], dtype=F64),
        torch.tensor([0, 1]),
        CondOT(),
        "eps",
        sample_shape=shape,
    )
    x = torch.randn(5, *shape, generator=g, dtype=F64)
    t = torch.full((5,), 0.4, dtype=F64)
    out = net(x, t)
    assert out.shape == x.shape
    torch.testing.assert_close(out.reshape(5, 12), net(x.reshape(5, 12), t))
    assert net.sample_data(7, g).shape == (7, *shape)
    assert net(x.float(), t.float()).dtype == torch.float32


def test_sample_data_follows_the_mixture_and_the_labels():
    model = gaussian_mixture_model(dim=2, components=4, num_classes=2, std=0.01, seed=7)
    net = model.net
    g = torch.Generator().manual_seed(0)
    y = torch.tensor([0, 1] * 200)
    x = net.sample_data(400, g, y)
    # Each point sits next to one of its class's means.
    dist = torch.cdist(x, net.means)  # [n, K]
    nearest = dist.argmin(1)
    assert torch.equal(net.labels[nearest], y)
    assert dist.min(1).values.max() < 0.1
    # Unlabelled draws use every component, in proportion to its weight.
    k = torch.cdist(net.sample_data(4000, g), net.means).argmin(1)
    freq = torch.bincount(k, minlength=4).to(F64) / 4000
    torch.testing.assert_close(freq, net.log_weights.exp(), rtol=0, atol=0.03)


def test_same_seed_same_model():
    a = gaussian_mixture_model(dim=3, components=2, seed=11)
    b = gaussian_mixture_model(dim=3, components=2, seed=11)
    c = gaussian_mixture_model(dim=3, components=2, seed=12)
    assert torch.equal(a.net.means, b.net.means) and not torch.equal(a.net.means, c.net.means)
    torch.testing.assert_close(a.net.log_weights.exp().sum(), torch.tensor(1.0, dtype=F64))
    assert a.fingerprint() == b.fingerprint() != c.fingerprint()


def test_builtin_gmm():
    m = gmm()
    assert m.name == "gmm" and m.sample_shape == (64,) and m.num_classes == 4
    assert m.net.num_classes == 4 and m.null_label == 4
    x = torch.randn(3, 64, dtype=F64)
    assert torch.all(torch.isfinite(m.velocity(x, 0.5, torch.tensor([0, 3, 4]), guidance=2.0)))


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"num_classes": 5, "components": 4}, "num_classes"),
        ({"std": 0.0}, "std"),
        ({"std": -1.0}, "std"),
        ({"std": math.nan}, "std"),
        ({"dim": 0}, "dim"),
        ({"components": 0}, "components"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        gaussian_mixture_model(**kwargs)


def test_net_argument_checks():
    args = (torch.zeros(2, 6, dtype=F64), torch.ones(2), torch.ones(2) / 2, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="sample_shape"):
        GaussianMixtureNet(*args, CondOT(), sample_shape=(2, 2))
    with pytest.raises(ValueError, match="labels must lie"):
        GaussianMixtureNet(*args, CondOT(), num_classes=1)
    # An explicit num_classes sets the null label (one past the largest label otherwise).
    assert GaussianMixtureNet(*args, CondOT(), num_classes=3).num_classes == 3
    assert GaussianMixtureNet(*args, CondOT()).num_classes == 2
