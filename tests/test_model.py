"""Model: prediction conversions, classifier-free guidance, input checks, dtypes, gradients and
the fingerprint.

The conversions are checked with an "oracle net": for a fixed pair (x1, eps) and
x_t = alpha_t x1 + sigma_t eps it returns the true target of its prediction type, so the
model's velocity must equal d/dt (alpha_t x1 + sigma_t eps), taken here by central differences.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from bns import Model, ModelError
from bns.model import PREDICTIONS, prediction_coefficients
from bns.models.gmm import gaussian_mixture_model
from bns.schedules import EDM, VP, CondOT, Cosine, DiscreteVP

F64 = torch.float64


def _discrete_vp() -> DiscreteVP:
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=F64)
    return DiscreteVP(torch.cumprod(1 - betas, 0))


SCHEDULES = [CondOT(), CondOT(sigma0=0.5), VP(), Cosine(), _discrete_vp(), EDM()]
SCHED_IDS = ["condot", "condot-s0.5", "vp", "cosine", "discrete-vp", "edm"]
# Interior times 0.37 of a step from the DiscreteVP knots (finite differences stay on one piece).
TIMES = [1 - (k + 0.37) / 999 for k in (10, 300, 600, 900, 990)]


class Oracle(nn.Module):
    """Returns the exact target of ``prediction`` for the fixed pair ``(x1, eps)``."""

    def __init__(self, x1, eps, schedule, prediction):
        super().__init__()
        self.x1, self.eps, self.schedule, self.prediction = x1, eps, schedule, prediction

    def forward(self, x, t, y=None):
        a, s, da, ds = (v.reshape(-1, *[1] * (x.dim() - 1)) for v in self.schedule(t))
        target = {
            "velocity": da * self.x1 + ds * self.eps,
            "eps": self.eps,
            "x1": self.x1,
            "v": a * self.eps - s * self.x1,
        }[self.prediction]
        return target.to(x.dtype)


@pytest.mark.parametrize("prediction", PREDICTIONS)
@pytest.mark.parametrize("sched", SCHEDULES, ids=SCHED_IDS)
def test_velocity_is_the_time_derivative_of_the_path(sched, prediction):
    g = torch.Generator().manual_seed(0)
    shape = (len(TIMES), 2, 3)  # [B, *sample_shape] with a 2-D sample
    x1 = torch.randn(shape, generator=g, dtype=F64)
    eps = torch.randn(shape, generator=g, dtype=F64)
    # The oracle holds float64 tensors as plain attributes: dtype= says it runs in float64.
    model = Model(
        Oracle(x1, eps, sched, prediction), prediction, sched, sample_shape=(2, 3), dtype=F64
    )
    t = torch.tensor(TIMES, dtype=F64)

    def path(tt):
        a, s, _, _ = sched(tt)
        return a[:, None, None] * x1 + s[:, None, None] * eps

    x_t = path(t)
    h = 1e-6
    want = (path(t + h) - path(t - h)) / (2 * h)
    got = model.velocity(x_t, t)
    assert got.dtype == F64 and got.shape == shape
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)


def test_prediction_coefficients_known_values():
    # CondOT at t: eps -> u = (x - eps) / t; x1 -> u = (x1 - x) / (1 - t).
    t = torch.tensor([0.25], dtype=F64)
    b, g = prediction_coefficients("eps", CondOT(), t)
    assert float(b) == pytest.approx(4.0, abs=1e-14) and float(g) == pytest.approx(-4.0, abs=1e-14)
    b, g = prediction_coefficients("x1", CondOT(), t)
    assert float(b) == pytest.approx(-1 / 0.75, abs=1e-14)
    assert float(g) == pytest.approx(1 / 0.75, abs=1e-14)
    b, g = prediction_coefficients("velocity", CondOT(), t)
    assert float(b) == 0 and float(g) == 1
    # Cosine v-prediction: u = (pi/2) (-v) ... beta = 0, gamma = -pi/2 (alpha^2 + sigma^2 = 1).
    b, g = prediction_coefficients("v", Cosine(), torch.tensor([0.3], dtype=F64))
    assert abs(float(b)) < 1e-15 and float(g) == pytest.approx(-math.pi / 2, abs=1e-14)
    with pytest.raises(ValueError, match="unknown prediction"):
        prediction_coefficients("score", CondOT(), t)


@pytest.mark.parametrize(
    "sched,t_range",
    [(CondOT(), (1e-3, 1 - 1e-3)), (VP(), (1e-3, 1 - 1e-3)), (Cosine(), (0.01, 0.99))],
    ids=["condot", "vp", "cosine"],
)
def test_gmm_gives_the_same_velocity_for_every_prediction(sched, t_range):
    x = torch.randn(6, 5, generator=torch.Generator().manual_seed(1), dtype=F64)
    t = torch.tensor([t_range[0], 0.05, 0.3, 0.6, 0.9, t_range[1]], dtype=F64)
    velocities = [
        gaussian_mixture_model(
            dim=5, components=3, std=0.2, schedule=sched, prediction=p, t_range=t_range, seed=3
        ).velocity(x, t)
        for p in PREDICTIONS
    ]
    for u in velocities[1:]:
        torch.testing.assert_close(u, velocities[0], rtol=1e-9, atol=1e-9)


# -- classifier-free guidance -------------------------------------------------------------------
def _conditional(**kw):
    kw = {"dim": 4, "components": 6, "num_classes": 3, "std": 0.3, "seed": 5, **kw}
    return gaussian_mixture_model(**kw)


def test_guidance_combines_conditional_and_unconditional():
    model = _conditional()
    g = torch.Generator().manual_seed(2)
    x = torch.randn(5, 4, generator=g, dtype=F64)
    t = torch.tensor([0.1, 0.3, 0.5, 0.7, 0.9], dtype=F64)
    y = torch.tensor([0, 1, 2, 1, 0])
    null = torch.full_like(y, 3)
    u_y = model.velocity(x, t, y)
    u_null = model.velocity(x, t, null)
    assert (u_y - u_null).abs().max() > 1e-2  # the labels matter, so the checks below do too
    for w in (0.0, 1.0, 2.5, 7.0):
        before = model.forwards
        u = model.velocity(x, t, y, guidance=w)
        torch.testing.assert_close(u, u_null + w * (u_y - u_null), rtol=1e-12, atol=1e-12)
        # A guided evaluation costs two forwards per sample, an unguided one costs one.
        assert model.forwards - before == (5 if w == 1.0 else 10)
    torch.testing.assert_close(model.velocity(x, t, y, guidance=1.0), u_y, rtol=0, atol=0)
    # No labels: the unconditional branch, whatever the guidance.
    torch.testing.assert_close(model.velocity(x, t), u_null, rtol=0, atol=0)
    torch.testing.assert_close(model.velocity(x, t, guidance=4.0), u_null, rtol=1e-12, atol=1e-12)
    # The null label K is the unconditional branch: it equals the mixture of all classes.
    uncond = gaussian_mixture_model(dim=4, components=6, std=0.3, seed=5).velocity(x, t)
    torch.testing.assert_close(u_null, uncond, rtol=1e-12, atol=1e-12)


def test_labels_as_a_list_and_on_x_device():
    model = _conditional()
    x = torch.randn(2, 4, dtype=F64)
    torch.testing.assert_close(
        model.velocity(x, 0.5, [0, 2]), model.velocity(x, 0.5, torch.tensor([0, 2]))
    )


# -- errors --------------------------------------------------------------------------------------
class WrongShape(nn.Module):
    def forward(self, x, t, y=None):
        return x[:, :-1]


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda m, u: m.velocity(torch.zeros(2, 5), 0.5), r"expected samples of shape \[B, 4\]"),
        (lambda m, u: m.velocity(torch.zeros(2, 4, 1), 0.5), "expected samples of shape"),
        (lambda m, u: m.velocity(torch.zeros(()), 0.5), "expected samples of shape"),
        (lambda m, u: m.velocity(torch.zeros(2, 4, dtype=torch.long), 0.5), "floating point"),
        (lambda m, u: m.velocity(torch.zeros(2, 4), 0.5, torch.tensor([0, 4])), r"in \[0, 3\]"),
        (lambda m, u: m.velocity(torch.zeros(2, 4), 0.5, torch.tensor([-1, 0])), r"in \[0, 3\]"),
        (lambda m, u: m.velocity(torch.zeros(2, 4), 0.5, torch.tensor([0])), r"shape \[2\]"),
        (lambda m, u: m.velocity(torch.zeros(2, 4), 0.5, torch.tensor([0.0, 1.0])), "integer"),
        (lambda m, u: m.velocity(torch.zeros(2, 4), torch.zeros(3)), r"t must be a scalar"),
        (lambda m, u: m.velocity(torch.zeros(2, 4), 0.5, guidance=math.nan), "finite"),
        (lambda m, u: u.velocity(torch.zeros(2, 4), 0.5, torch.tensor([0, 0])), "unconditional"),
        (lambda m, u: u.velocity(torch.zeros(2, 4), 0.5, guidance=2.0), "guidance must be 1"),
        (
            lambda m, u: Model(WrongShape(), schedule=CondOT(), sample_shape=(4,)).velocity(
                torch.zeros(2, 4), 0.5
            ),
            r"returned \[2, 3\] for an input of shape \[2, 4\]",
        ),
        (
            lambda m, u: Model(lambda x, t: None, schedule=CondOT(), sample_shape=(4,)).velocity(
                torch.zeros(2, 4), 0.5
            ),
            "returned NoneType",
        ),
    ],
)
def test_bad_inputs_raise_one_clear_model_error(call, match):
    cond = _conditional()
    uncond = gaussian_mixture_model(dim=4, components=2)
    with pytest.raises(ModelError, match=match):
        call(cond, uncond)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"prediction": "score"}, r"unknown prediction 'score'; expected one of .*'v'\)$"),
        ({"prediction": "epsilon"}, "bns calls 'epsilon' 'eps'"),  # diffusers' word
        ({"prediction": "v_prediction"}, "bns calls 'v_prediction' 'v'"),
        ({"schedule": None}, "needs a schedule"),
        ({"t_range": (0.5, 0.5)}, "t_range"),
        ({"t_range": (-0.1, 1.0)}, "t_range"),
        ({"t_range": (0.0, 1.5)}, "t_range"),
        ({"num_classes": 0}, "num_classes"),
    ],
)
def test_bad_constructor_arguments(kwargs, match):
    kw = {"prediction": "velocity", "schedule": CondOT(), "sample_shape": (4,), **kwargs}
    with pytest.raises(ValueError, match=match):
        Model(lambda x, t, y=None: x, **kw)


# -- dtypes and gradients ------------------------------------------------------------------------
class Spy(nn.Module):
    """Wraps a net and records the dtypes it was called with."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.seen = []

    def forward(self, x, t, y=None):
        self.seen.append((x.dtype, t.dtype))
        return self.inner(x, t, y)


@pytest.mark.parametrize("net_dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("x_dtype", [torch.float32, torch.float16, torch.float64])
def test_half_precision_net_returns_at_least_float32(net_dtype, x_dtype):
    ref = gaussian_mixture_model(dim=4, components=2, std=0.5, prediction="eps", t_range=(0.05, 1))
    spy = Spy(ref.net)
    half = Model(spy, "eps", ref.schedule, (4,), t_range=ref.t_range, dtype=net_dtype)
    x = torch.randn(3, 4, generator=torch.Generator().manual_seed(0)).to(x_dtype)
    u = half.velocity(x, 0.5)
    assert u.dtype == torch.promote_types(x_dtype, torch.float32)
    # t stays float32: in half precision the times near 1 would round by up to 0.004.
    assert spy.seen[-1] == (net_dtype, torch.float32)
    want = ref.velocity(x.to(F64), 0.5)
    tol = 1e-2 if net_dtype == torch.float16 else 5e-2
    torch.testing.assert_close(u.to(F64), want, rtol=tol, atol=tol)


def test_float32_input_gives_float32_velocity():
    model = gaussian_mixture_model(dim=4, components=2)
    x = torch.randn(3, 4)
    u = model.velocity(x, 0.5)
    assert u.dtype == torch.float32
    torch.testing.assert_close(u.to(F64), model.velocity(x.to(F64), 0.5), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("prediction", ["velocity", "eps", "v"])
def test_gradients_flow_to_x_and_t(prediction):
    model = gaussian_mixture_model(
        dim=3, components=2, std=0.4, schedule=VP(), prediction=prediction, t_range=(0, 0.99)
    )
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, generator=g, dtype=F64, requires_grad=True)
    t = torch.tensor([0.3, 0.7], dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, t: model.velocity(x, t), (x, t))


def test_gradients_flow_with_guidance():
    model = _conditional(dim=3)
    x = torch.randn(2, 3, dtype=F64, requires_grad=True)
    t = torch.tensor([0.4, 0.8], dtype=F64, requires_grad=True)
    y = torch.tensor([1, 2])
    assert torch.autograd.gradcheck(lambda x, t: model.velocity(x, t, y, guidance=3.0), (x, t))


def test_scalar_time_tensor_gets_a_gradient():
    model = gaussian_mixture_model(dim=3, components=2)
    x = torch.randn(4, 3, dtype=F64)
    t = torch.tensor(0.4, dtype=F64, requires_grad=True)
    (g,) = torch.autograd.grad(model.velocity(x, t).sum(), t)
    h = 1e-6
    fd = (model.velocity(x, 0.4 + h).sum() - model.velocity(x, 0.4 - h).sum()) / (2 * h)
    assert abs(float(g) - float(fd)) < 1e-6 * max(1.0, abs(float(fd)))


# -- fingerprint -----------------------------------------------------------------------------------
class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 3)
        self.register_buffer("scale", torch.tensor(2.0))  # a 0-d buffer

    def forward(self, x, t, y=None):
        return self.lin(x) * self.scale


def _tiny_model(net=None, **kw):
    torch.manual_seed(0)
    return Model(net or Tiny(), schedule=CondOT(), sample_shape=(3,), **kw)


def test_fingerprint_is_stable_across_calls_and_copies():
    m = _tiny_model()
    fp = m.fingerprint()
    assert isinstance(fp, str) and len(fp) == 16 and int(fp, 16) >= 0
    assert m.fingerprint() == fp
    m.velocity(torch.zeros(2, 3), 0.5)
    assert m.fingerprint() == fp
    assert copy.deepcopy(m).fingerprint() == fp
    assert _tiny_model().fingerprint() == fp  # same seed, same weights


def test_fingerprint_follows_weight_changes():
    m = _tiny_model()
    fp = m.fingerprint()
    with torch.no_grad():
        m.net.lin.weight[0, 0] += 1e-3  # in place, after the fingerprint was cached
    fp2 = m.fingerprint()
    assert fp2 != fp
    m.net.scale.fill_(3.0)  # the 0-d buffer, in place
    fp3 = m.fingerprint()
    assert fp3 not in (fp, fp2)
    m.net.scale = torch.tensor(4.0)  # replaced, not modified in place
    fp4 = m.fingerprint()
    assert fp4 not in (fp, fp2, fp3)
    # Loading the original weights back gives the original fingerprint.
    m.net.load_state_dict(_tiny_model().net.state_dict())
    assert m.fingerprint() == fp


def test_fingerprint_distinguishes_0d_from_1d_buffers():
    a, b = Tiny(), Tiny()
    b.load_state_dict(a.state_dict())
    b.scale = torch.tensor([2.0])
    ma, mb = (Model(n, schedule=CondOT(), sample_shape=(3,)) for n in (a, b))
    assert ma.fingerprint() != mb.fingerprint()


@pytest.mark.parametrize(
    "change",
    [
        lambda m: setattr(m, "t_range", (0.0, 0.999)),
        lambda m: setattr(m, "schedule", CondOT(0.5)),
        lambda m: setattr(m, "prediction", "x1"),
        lambda m: setattr(m, "num_classes", 3),
        lambda m: setattr(m, "name", "other"),
    ],
)
def test_fingerprint_follows_setting_changes(change):
    m = _tiny_model()
    fp = m.fingerprint()
    change(m)
    assert m.fingerprint() != fp


def test_fingerprint_of_a_bound_method_hashes_the_module():
    net = Tiny()
    m = Model(net.forward, schedule=CondOT(), sample_shape=(3,))
    fp = m.fingerprint()
    with torch.no_grad():
        net.lin.bias.add_(1.0)
    assert m.fingerprint() != fp


def test_fingerprint_of_a_plain_function():
    def f(x, t, y=None):
        return x

    def g(x, t, y=None):
        return x

    fa = Model(f, schedule=CondOT(), sample_shape=(3,)).fingerprint()
    assert fa == Model(f, schedule=CondOT(), sample_shape=(3,)).fingerprint()
    assert fa != Model(g, schedule=CondOT(), sample_shape=(3,)).fingerprint()


def test_fingerprint_of_gmm_depends_on_seed_and_prediction():
    fps = {
        gaussian_mixture_model(dim=3, components=2, seed=s, prediction=p).fingerprint()
        for s in (0, 1)
        for p in ("velocity", "eps")
    }
    assert len(fps) == 4


def test_settings_and_repr():
    m = _conditional()
    s = m.settings()
    assert s["num_classes"] == 3 and s["sample_shape"] == [4] and s["prediction"] == "velocity"
    assert s["schedule"] == {"name": "condot", "sigma0": 1.0}
    assert m.null_label == 3
    assert "num_classes=3" in repr(m)
