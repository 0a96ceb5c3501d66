"""diffusers' common scheduler tests, ported to BNSScheduler.

Upstream: ``tests/schedulers/test_schedulers.py`` of huggingface/diffusers, class
``SchedulerCommonTest`` (read at commit 58eb52c0), whose ten ``test_*`` methods every diffusers
scheduler's test class inherits (e.g. ``DPMSolverMultistepSchedulerTest`` in
``test_scheduler_dpm_multi.py``). Each test below names the upstream test it ports and says
what it checks in BNS terms; the one upstream check that does not apply to a scheduler holding
a learned solver (the ``_compatibles`` swap) says why in its test.

What differs from a classical scheduler, and shapes the ports: a BNSScheduler runs exactly the
``nfe`` steps of its solver, in order, from ``timesteps[0]`` (so "``num_inference_steps``" is
the solver's ``nfe`` and a step at ``timesteps[i]`` follows the steps before it); and its
config holds the solver. Every test runs on a flow-matching scheduler and on DDPM-style ones
of each prediction type (upstream's subclasses run their tests over configs the same way).

Beyond the ports: ``add_noise`` / ``scale_noise`` against diffusers' DDPM, DPM-Solver and
flow-matching Euler schedulers in float64, and ``trained_betas`` against diffusers' own
reading of them and against the model the solver was trained for.
"""

from __future__ import annotations

import inspect
import io
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import pytest
import torch

import bns

diffusers = pytest.importorskip("diffusers")

from diffusers import (  # noqa: E402
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    FlowMatchEulerDiscreteScheduler,
)

from bns.integrations.diffusers import BNSScheduler, DiffusersError  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

KINDS = ["flow", "epsilon", "v_prediction", "sample"]
NFE = 8  # upstream's add-noise test takes timesteps[5]: at least 6 steps
DEVICES = [
    "cpu",
    pytest.param(
        "cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
    ),
]


def _solver(nfe: int = NFE, seed: int = 0) -> bns.NSSolver:
    """Euler with every coefficient perturbed, so that each step uses the whole history."""
    base = bns.solvers.euler(bns.grids.uniform(nfe))
    g = torch.Generator().manual_seed(seed)
    a = base.a + 0.01 * torch.randn(nfe, generator=g, dtype=torch.float64)
    b = base.b + 0.01 * torch.tril(torch.randn(nfe, nfe, generator=g, dtype=torch.float64))
    return bns.NSSolver(base.times.clone(), a, b, {"solver": "perturbed"})


def _ddpm_alphas_cumprod() -> list[float]:
    return DDPMScheduler().alphas_cumprod.tolist()  # linear betas 1e-4 .. 0.02, 1000 steps


def get_scheduler_config(kind: str, **overrides: Any) -> dict[str, Any]:
    """The BNSScheduler keyword arguments of each kind (upstream's ``get_scheduler_config``)."""
    config: dict[str, Any] = {
        "solver": _solver().to_dict(),
        "prediction_type": kind,
        "num_train_timesteps": 1000,
    }
    if kind != "flow":
        config["alphas_cumprod"] = _ddpm_alphas_cumprod()
    config.update(overrides)
    return config


def _dummy_sample() -> torch.Tensor:
    """Upstream's ``dummy_sample`` (4 x 3 x 8 x 8 uniform), seeded."""
    return torch.rand((4, 3, 8, 8), generator=torch.Generator().manual_seed(0))


def _run(scheduler: BNSScheduler, sample: torch.Tensor, **step_kwargs: Any) -> list[Any]:
    """Every step of a run with upstream's residual ``0.1 * sample``; the step outputs."""
    scheduler.set_timesteps(scheduler.nfe)
    outs = []
    for t in scheduler.timesteps:
        out = scheduler.step(0.1 * sample, t, sample, **step_kwargs)
        outs.append(out)
        sample = out[0] if isinstance(out, tuple) else out.prev_sample
    return outs


@contextmanager
def _captured(logger_name: str) -> Iterator[io.StringIO]:
    """What a (diffusers) logger writes meanwhile (upstream's ``CaptureLogger``)."""
    logger = logging.getLogger(logger_name)
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    logger.addHandler(handler)
    try:
        yield stream
    finally:
        logger.removeHandler(handler)


# -- the ten SchedulerCommonTest tests ------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_from_save_pretrained(kind, tmp_path):
    """Ports ``test_from_save_pretrained``: a scheduler reloaded from ``save_config`` steps to
    the same outputs. Upstream compares one step; here every step of the run, since each BNS
    step uses the whole history (equal to the bit: nothing is random)."""
    scheduler = BNSScheduler(**get_scheduler_config(kind))
    scheduler.save_config(tmp_path)
    reloaded = BNSScheduler.from_pretrained(tmp_path)
    sample = _dummy_sample()
    for a, b in zip(_run(scheduler, sample), _run(reloaded, sample)):
        assert torch.equal(a.prev_sample, b.prev_sample)


@pytest.mark.parametrize("kind", KINDS)
def test_compatibles(kind):
    """Ports ``test_compatibles``, which builds every class of ``scheduler.compatibles`` from
    the scheduler's config and the scheduler back from theirs, and asks for the same config.

    Not applicable as a swap: ``_compatibles`` lists schedulers that can replace each other
    through ``from_config`` because they read one model description (betas or a flow shift)
    and nothing else. A BNSScheduler's config is a trained solver, which no other scheduler's
    config holds, so ``BNSScheduler.from_config(other.config)`` cannot build one (it refuses,
    pointing at ``from_solver``); and the other way a DDIM or flow-matching Euler built from a
    BNS config would drop the solver and, for flow models, the pipeline's ``shift``, which a
    BNS config does not keep. ``_compatibles`` is a class attribute over both kinds, so it is
    empty by design (upstream's test, run as is, fails on that empty list with an unbound
    name, not on an assertion). What applies is checked: the empty list, the refusal, and the
    round trip through the scheduler's own ``from_config`` that the upstream test ends with.
    """
    scheduler = BNSScheduler(**get_scheduler_config(kind))
    assert scheduler.compatibles == [] and BNSScheduler._compatibles == []
    other = FlowMatchEulerDiscreteScheduler() if kind == "flow" else DDIMScheduler()
    with pytest.raises(DiffusersError, match="from_solver"):
        BNSScheduler.from_config(other.config)
    again = BNSScheduler.from_config(scheduler.config)
    assert {k: v for k, v in again.config.items() if k in scheduler.config} == dict(
        scheduler.config
    )
    init_keys = inspect.signature(BNSScheduler.__init__).parameters
    assert not (set(again.config) - set(scheduler.config)) & set(init_keys)


@pytest.mark.parametrize("kind", KINDS)
def test_from_pretrained(kind, tmp_path):
    """Ports ``test_from_pretrained``: ``save_pretrained`` then ``from_pretrained`` gives the
    same config (less ``_use_default_values``, which a saved config does not carry)."""
    scheduler = BNSScheduler(**get_scheduler_config(kind))
    scheduler.save_pretrained(tmp_path)
    reloaded = BNSScheduler.from_pretrained(tmp_path)
    config = dict(scheduler.config)
    config.pop("_use_default_values", None)
    assert config == reloaded.config


@pytest.mark.parametrize("kind", KINDS)
def test_step_shape(kind):
    """Ports ``test_step_shape``: steps at the first two timesteps (upstream's
    ``default_timestep`` and ``default_timestep_2``, taken in that order as a BNS run must)
    return samples of the input's shape."""
    scheduler = BNSScheduler(**get_scheduler_config(kind))
    scheduler.set_timesteps(scheduler.nfe)
    sample = _dummy_sample()
    out_0 = scheduler.step(0.1 * sample, scheduler.timesteps[0], sample).prev_sample
    out_1 = scheduler.step(0.1 * sample, scheduler.timesteps[1], sample).prev_sample
    assert out_0.shape == sample.shape and out_1.shape == out_0.shape


@pytest.mark.parametrize("kind", KINDS)
def test_scheduler_outputs_equivalence(kind):
    """Ports ``test_scheduler_outputs_equivalence``: ``return_dict=False`` gives the tuple of
    the ``SchedulerOutput`` fields, with the same tensors (a fresh run each way)."""
    scheduler = BNSScheduler(**get_scheduler_config(kind))
    sample = _dummy_sample()
    as_dicts = _run(scheduler, sample)
    as_tuples = _run(scheduler, sample, return_dict=False)
    for d, t in zip(as_dicts, as_tuples):
        assert isinstance(t, tuple) and len(t) == len(d.values())
        for tuple_value, dict_value in zip(t, d.values()):
            assert torch.equal(tuple_value, dict_value)


@pytest.mark.parametrize("kind", KINDS)
def test_scheduler_public_api(kind):
    """Ports ``test_scheduler_public_api``: ``init_noise_sigma``, ``scale_model_input`` and
    ``step`` exist, and ``scale_model_input(sample, 0.0)`` keeps the shape."""
    scheduler = BNSScheduler(**get_scheduler_config(kind))
    for name in ("init_noise_sigma", "scale_model_input", "step"):
        assert hasattr(scheduler, name), name
    sample = _dummy_sample()
    assert scheduler.scale_model_input(sample, 0.0).shape == sample.shape


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", KINDS)
def test_add_noise_device(kind, device):
    """Ports ``test_add_noise_device``: after ``set_timesteps``, ``add_noise`` on a sample on
    ``device`` at ``timesteps[5]`` (a CPU tensor, as upstream) keeps the shape; here also the
    device and dtype, and ``scale_noise`` (flow pipelines' name) gives the same tensor."""
    scheduler = BNSScheduler(**get_scheduler_config(kind))
    scheduler.set_timesteps(scheduler.nfe)
    sample = scheduler.scale_model_input(_dummy_sample().to(device), 0.0)
    noise = torch.randn(sample.shape, generator=torch.Generator().manual_seed(1)).to(device)
    t = scheduler.timesteps[5][None]
    noised = scheduler.add_noise(sample, noise, t)
    assert noised.shape == sample.shape
    assert noised.device == sample.device and noised.dtype == sample.dtype
    assert torch.equal(scheduler.scale_noise(sample, t, noise), noised)


def test_deprecated_kwargs():
    """Ports ``test_deprecated_kwargs``: ``**kwargs`` in ``__init__`` exactly when the class
    lists ``_deprecated_kwargs`` (BNSScheduler has neither)."""
    has_kwargs = "kwargs" in inspect.signature(BNSScheduler.__init__).parameters
    assert has_kwargs == (len(BNSScheduler._deprecated_kwargs) > 0)


@pytest.mark.parametrize("kind", KINDS)
def test_trained_betas(kind, tmp_path):
    """Ports ``test_trained_betas``: a scheduler given upstream's ``trained_betas`` (a numpy
    array ``[0.1, 0.3]``) keeps its betas through ``save_pretrained`` / ``from_pretrained``.

    BNS differences: ``num_train_timesteps`` must be the betas' count (the timesteps handed to
    the network are on that grid; upstream keeps 1000 for two betas, which a DDPM scheduler
    would index out of range), and a flow-matching scheduler has no betas, so it refuses them.
    """
    if kind == "flow":
        with pytest.raises(DiffusersError, match="flow-matching"):
            BNSScheduler(**get_scheduler_config(kind), trained_betas=np.array([0.1, 0.3]))
        return
    config = get_scheduler_config(kind, num_train_timesteps=2, alphas_cumprod=None)
    scheduler = BNSScheduler(**config, trained_betas=np.array([0.1, 0.3]))
    scheduler.save_pretrained(tmp_path)
    reloaded = BNSScheduler.from_pretrained(tmp_path)
    assert scheduler.betas.tolist() == reloaded.betas.tolist()
    assert torch.equal(scheduler.alphas_cumprod, reloaded.alphas_cumprod)


@pytest.mark.parametrize("kind", KINDS)
def test_getattr_is_correct(kind):
    """Ports ``test_getattr_is_correct``: plain attributes and methods are read without a
    warning, a config entry read as an attribute warns (diffusers' FutureWarning), and a
    missing attribute raises diffusers' AttributeError message."""
    scheduler = BNSScheduler(**get_scheduler_config(kind))
    scheduler.dummy_attribute = 5
    scheduler.register_to_config(test_attribute=5)
    # Upstream reads each name both ways, getattr spelled out (hence the B009 waivers).
    with _captured("diffusers.configuration_utils") as log:
        assert hasattr(scheduler, "dummy_attribute")
        assert getattr(scheduler, "dummy_attribute") == 5  # noqa: B009
        assert scheduler.dummy_attribute == 5
    assert log.getvalue() == ""
    with _captured("diffusers.schedulers.scheduling_utils") as log:
        assert hasattr(scheduler, "save_pretrained")
        assert scheduler.save_pretrained == getattr(scheduler, "save_pretrained")  # noqa: B009
    assert log.getvalue() == ""
    with pytest.warns(FutureWarning):
        assert scheduler.test_attribute == 5
    with pytest.warns(FutureWarning):
        assert getattr(scheduler, "test_attribute") == 5  # noqa: B009
    with pytest.raises(AttributeError) as error:
        scheduler.does_not_exist  # noqa: B018 - the attribute access is the test
    assert str(error.value) == "'BNSScheduler' object has no attribute 'does_not_exist'"


# -- add_noise / scale_noise against diffusers' own forward processes ----------------------------


def _x0_and_noise(batch: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(2)
    shape = (batch, 3, 8, 8)
    return (
        torch.randn(shape, generator=g, dtype=torch.float64),
        torch.randn(shape, generator=g, dtype=torch.float64),
    )


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_add_noise_is_ddpms_at_integer_timesteps(prediction_type):
    """DDPM's forward process ``sqrt(ac[k]) x + sqrt(1 - ac[k]) noise``, one timestep per batch
    element, in float64: equal to 1e-6 (DDPMScheduler's add_noise)."""
    reference = DDPMScheduler(beta_schedule="scaled_linear", prediction_type=prediction_type)
    scheduler = BNSScheduler.from_solver(_solver(), reference)
    x0, noise = _x0_and_noise()
    k = torch.tensor([0, 10, 500, 999])
    ours = scheduler.add_noise(x0, noise, k)
    theirs = reference.add_noise(x0, noise, k)
    assert ours.dtype == torch.float64
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)
    # One timestep for the whole batch broadcasts, as diffusers' does.
    torch.testing.assert_close(
        scheduler.add_noise(x0, noise, torch.tensor([500])),
        reference.add_noise(x0, noise, torch.tensor([500])),
        rtol=0,
        atol=1e-6,
    )


# diffusers' own set_timesteps trips a numpy 2 DeprecationWarning (np.array of a tensor).
@pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")
def test_add_noise_is_dpm_solvers_at_its_timesteps():
    """DPMSolverMultistepScheduler's add_noise (its inference sigmas, looked up by timestep) at
    the timesteps of its own grid, in float64: equal to 1e-6."""
    reference = DPMSolverMultistepScheduler()
    scheduler = BNSScheduler.from_solver(_solver(), reference)
    reference.set_timesteps(10)
    x0, noise = _x0_and_noise(3)
    k = reference.timesteps[[0, 4, 9]]
    torch.testing.assert_close(
        scheduler.add_noise(x0, noise, k), reference.add_noise(x0, noise, k), rtol=0, atol=1e-6
    )


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_scale_noise_is_flow_match_eulers(shift):
    """FlowMatchEulerDiscreteScheduler's ``scale_noise`` ``(1 - sigma) x + sigma noise`` at the
    timesteps of its (shifted) grid, in float64: equal to 1e-6, by both names."""
    reference = FlowMatchEulerDiscreteScheduler(shift=shift)
    scheduler = BNSScheduler.from_solver(_solver(), reference)
    reference.set_timesteps(10)
    x0, noise = _x0_and_noise(3)
    k = reference.timesteps[[0, 4, 9]]
    theirs = reference.scale_noise(x0, k, noise)
    torch.testing.assert_close(scheduler.scale_noise(x0, k, noise), theirs, rtol=0, atol=1e-6)
    torch.testing.assert_close(scheduler.add_noise(x0, noise, k), theirs, rtol=0, atol=1e-6)


@pytest.mark.parametrize("kind", KINDS)
def test_add_noise_at_the_schedulers_own_timesteps_is_its_schedule(kind):
    """At the scheduler's own (fractional) timesteps, ``add_noise`` uses the noise level its
    steps assume there: ``alpha(t_i) x + sigma(t_i) noise`` of the bns schedule at the solver's
    times (to the float32 rounding of the timesteps); half precision stays half."""
    scheduler = BNSScheduler(**get_scheduler_config(kind))
    scheduler.set_timesteps(scheduler.nfe)
    x0, noise = _x0_and_noise(1)
    for i, k in enumerate(scheduler.timesteps):
        v = scheduler.bns_schedule(scheduler.solver.times[i])
        expected = v.alpha * x0 + v.sigma * noise
        torch.testing.assert_close(scheduler.add_noise(x0, noise, k), expected, rtol=0, atol=1e-5)
    half = scheduler.add_noise(x0.half(), noise.half(), scheduler.timesteps[:1])
    assert half.dtype == torch.float16


@pytest.mark.parametrize("kind", ["flow", "epsilon"])
def test_add_noise_refuses_timesteps_off_the_training_range(kind):
    scheduler = BNSScheduler(**get_scheduler_config(kind))
    x0, noise = _x0_and_noise(1)
    top = 1000 if kind == "flow" else 999
    scheduler.add_noise(x0, noise, torch.tensor([top]))  # the noise end itself is fine
    for bad in (top + 1, -1, float("nan")):
        with pytest.raises(DiffusersError, match=rf"timesteps in \[0, {top}\]"):
            scheduler.add_noise(x0, noise, torch.tensor([bad]))


# -- trained_betas ---------------------------------------------------------------------------


def _scaled_linear_betas() -> np.ndarray:
    """Stable Diffusion's betas, as a float64 array (as a user would hand them over)."""
    return np.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=np.float64) ** 2


def test_trained_betas_give_diffusers_own_schedule():
    """The same betas give a BNSScheduler the alphas_cumprod that diffusers' schedulers compute
    from them (float32 betas, float32 product): equal to the bit, in the attributes and in the
    config, and from_solver reads a pipeline's scheduler built from them to the same config."""
    betas = _scaled_linear_betas()
    reference = DDPMScheduler(trained_betas=betas)
    scheduler = BNSScheduler(
        **get_scheduler_config("epsilon", alphas_cumprod=None), trained_betas=betas
    )
    assert torch.equal(scheduler.betas, reference.betas)
    assert torch.equal(scheduler.alphas, reference.alphas)
    assert torch.equal(scheduler.alphas_cumprod, reference.alphas_cumprod)
    assert scheduler.config.alphas_cumprod == reference.alphas_cumprod.tolist()
    assert scheduler.config.trained_betas == betas.tolist()  # as given, a JSON list
    from_pipe = BNSScheduler.from_solver(_solver(), reference)
    assert from_pipe.config.alphas_cumprod == scheduler.config.alphas_cumprod
    by_keyword = BNSScheduler.from_solver(_solver(), prediction_type="epsilon", trained_betas=betas)
    assert by_keyword.config.alphas_cumprod == scheduler.config.alphas_cumprod
    # Without trained_betas the betas are read back from alphas_cumprod (to float32 rounding).
    torch.testing.assert_close(from_pipe.betas, reference.betas, rtol=1e-4, atol=1e-7)


def test_trained_betas_must_be_the_model_the_solver_was_trained_for():
    """A solver that records its model (bns.distill's ``meta["model_settings"]``) accepts the
    betas of that model's schedule and refuses others, in every way a config is built."""
    betas = _scaled_linear_betas()
    ac = DDPMScheduler(trained_betas=betas).alphas_cumprod.double()
    solver = _solver()
    solver.meta = {
        "model_settings": {
            "prediction": "eps",
            "schedule": bns.schedules.DiscreteVP(ac).config(),
        }
    }
    config = get_scheduler_config("epsilon", solver=solver.to_dict(), alphas_cumprod=None)
    BNSScheduler(**config, trained_betas=betas)
    BNSScheduler.from_solver(solver, trained_betas=betas)
    other = np.linspace(1e-4, 0.02, 1000)  # DDPM's linear betas: another model
    with pytest.raises(
        DiffusersError, match="another alphas_cumprod than that of its trained_betas"
    ):
        BNSScheduler(**config, trained_betas=other)
    with pytest.raises(DiffusersError, match="another alphas_cumprod"):
        BNSScheduler.from_solver(solver, trained_betas=other)
    with pytest.raises(DiffusersError, match="another alphas_cumprod than that of the pipeline's"):
        BNSScheduler.from_solver(solver, DDPMScheduler(trained_betas=other))
    with pytest.raises(DiffusersError, match="trained for a epsilon model"):
        BNSScheduler(**dict(config, prediction_type="v_prediction"), trained_betas=betas)


def test_trained_betas_misuse_is_refused():
    config = get_scheduler_config("epsilon", alphas_cumprod=None)
    with pytest.raises(DiffusersError, match="num_train_timesteps=1000 but the schedule has 2"):
        BNSScheduler(**config, trained_betas=[0.1, 0.3])
    two = dict(config, num_train_timesteps=2)
    with pytest.raises(DiffusersError, match="different schedules"):
        BNSScheduler(**dict(two, alphas_cumprod=[0.9, 0.5]), trained_betas=[0.1, 0.3])
    BNSScheduler(**dict(two, alphas_cumprod=[0.9, 0.63]), trained_betas=[0.1, 0.3])  # agree
    for bad in ([0.1, 1.0], [0.0, 0.3], [0.1, float("nan")], [0.1], [[0.1, 0.3]], "betas"):
        with pytest.raises(DiffusersError, match="trained_betas"):
            BNSScheduler(**two, trained_betas=bad)
    with pytest.raises(DiffusersError, match="flow-matching"):
        BNSScheduler.from_solver(
            _solver(), FlowMatchEulerDiscreteScheduler(), trained_betas=[0.1, 0.3]
        )
