"""The reference Fashion-MNIST models: shipped weights, the net's contract, quality, training."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

import bns
from bns.models import fmnist
from bns.models.unet import TinyUNet, UNetConfig

ROOT = Path(__file__).resolve().parents[1]
HAVE_DATA = (fmnist.DATA_DIR / "t10k-images-idx3-ubyte.gz").is_file()
needs_data = pytest.mark.skipif(not HAVE_DATA, reason="Fashion-MNIST is not installed")
NAMES = ("fmnist-cfg", "fmnist-vp", "fmnist-ddpm")
FACTORIES = {
    "fmnist-cfg": fmnist.fmnist_cfg,
    "fmnist-vp": fmnist.fmnist_vp,
    "fmnist-ddpm": fmnist.fmnist_ddpm,
}
# Pinned so that a silent change of the shipped weights or of the model settings is caught.
FINGERPRINTS = {
    "fmnist-cfg": "55bc0f453ed44680",
    "fmnist-vp": "ba656b307c50cbfe",
    "fmnist-ddpm": "95da82b730d1ba67",
}


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def models() -> dict[str, bns.Model]:
    return {name: FACTORIES[name]() for name in NAMES}


def _recorded(name: str) -> dict:
    return json.loads((fmnist.WEIGHTS_DIR / f"{name}.json").read_text())


# -- loading -------------------------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_weights_load_with_the_recipe_and_a_stable_fingerprint(models, name):
    model = models[name]
    recipe = fmnist.RECIPES[name]
    assert model.name == name and model.dtype == torch.float32
    assert model.sample_shape == (1, 28, 28)
    assert model.prediction == recipe.prediction and model.t_range == recipe.t_range
    assert model.schedule == recipe.schedule() and model.num_classes == recipe.num_classes
    # Two loads agree, the training run recorded the same fingerprint, and it is pinned.
    assert FACTORIES[name]().fingerprint() == model.fingerprint() == _recorded(name)["fingerprint"]
    assert model.fingerprint() == FINGERPRINTS[name]
    size = (fmnist.WEIGHTS_DIR / f"{name}.safetensors").stat().st_size
    assert size < 3_000_000  # the CPU demo needs a small net


def test_missing_weights_give_a_clear_error(tmp_path):
    with pytest.raises(fmnist.WeightsError, match="not found.*train_fmnist.py"):
        fmnist.fmnist_cfg(tmp_path / "nope.safetensors")


def test_corrupt_weights_give_a_clear_error(tmp_path):
    good = (fmnist.WEIGHTS_DIR / "fmnist-cfg.safetensors").read_bytes()
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00garbage" * 10)
    with pytest.raises(fmnist.WeightsError, match="corrupt"):
        fmnist.fmnist_cfg(bad)
    bad.write_bytes(good[: len(good) // 2])  # truncated download
    with pytest.raises(fmnist.WeightsError, match="corrupt"):
        fmnist.fmnist_cfg(bad)


def test_weights_of_the_other_model_are_refused():
    # The VP net has no label embedding: loading it as the conditional model must fail loudly.
    with pytest.raises(fmnist.WeightsError, match="fmnist-vp"):
        fmnist.fmnist_cfg(fmnist.WEIGHTS_DIR / "fmnist-vp.safetensors")
    # fmnist-vp and fmnist-ddpm have tensors of the same shapes: only the recorded name and
    # time embedding tell them apart, and each must refuse the other's weights.
    with pytest.raises(fmnist.WeightsError, match="fmnist-ddpm"):
        fmnist.fmnist_vp(fmnist.WEIGHTS_DIR / "fmnist-ddpm.safetensors")
    with pytest.raises(fmnist.WeightsError, match="fmnist-vp"):
        fmnist.fmnist_ddpm(fmnist.WEIGHTS_DIR / "fmnist-vp.safetensors")


def test_unknown_model_name():
    with pytest.raises(ValueError, match="unknown reference model"):
        fmnist.build_model("mnist")


# -- the network's contract ----------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_velocity_shape_and_finiteness_over_the_range(models, name):
    model = models[name]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 1, 28, 28, generator=g, dtype=torch.float64)
    lo, hi = model.t_range
    t = torch.tensor([lo, hi, 0.1, 0.5, 0.9, 0.99], dtype=torch.float64)
    u = model.velocity(x, t)
    assert u.shape == x.shape and u.dtype == torch.float64
    assert torch.isfinite(u).all()


def test_conditional_velocity_depends_on_the_label_and_10_is_unconditional(models):
    model = models["fmnist-cfg"]
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 1, 28, 28, generator=g)
    t = torch.full((4,), 0.4)
    u_none = model.velocity(x, t)
    u_null = model.velocity(x, t, torch.full((4,), 10))
    torch.testing.assert_close(u_none, u_null, rtol=0, atol=0)
    u = [model.velocity(x, t, torch.full((4,), k)) for k in range(10)]
    # Different classes must pull the same noisy image to clearly different places.
    for k in range(1, 10):
        rel = (u[k] - u[0]).norm() / u[0].norm()
        assert rel > 0.1, (k, float(rel))
    # The null branch is the class average, not one of the classes.
    assert min(float((uk - u_null).norm() / u_null.norm()) for uk in u) > 0.08


@pytest.mark.parametrize("name", NAMES)
def test_net_is_differentiable_in_time(models, name):
    # A continuous time embedding: autograd d/dt matches a central difference (float64 copy).
    net = TinyUNet(models[name].net.config)
    net.load_state_dict(models[name].net.state_dict())
    net = net.double()
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 1, 28, 28, generator=g, dtype=torch.float64)
    t = torch.tensor([0.3, 0.7], dtype=torch.float64, requires_grad=True)
    w = torch.randn(2, 1, 28, 28, generator=g, dtype=torch.float64)
    (grad,) = torch.autograd.grad((net(x, t) * w).sum(), t)
    h = 1e-7
    with torch.no_grad():
        fd = ((net(x, t + h) - net(x, t - h)) * w).flatten(1).sum(1) / (2 * h)
    assert grad.abs().min() > 1e-3
    torch.testing.assert_close(grad, fd, rtol=1e-5, atol=1e-6)


# -- fmnist-ddpm: built like a published DDPM model --------------------------------------
def test_ddpm_schedule_is_diffusers_linear_beta_and_the_range_ends_at_timestep_0(models):
    model = models["fmnist-ddpm"]
    sched = model.schedule
    assert isinstance(sched, bns.schedules.DiscreteVP) and sched.num_train_timesteps == 1000
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    torch.testing.assert_close(sched.alphas_cumprod, torch.cumprod(1 - betas, 0), rtol=1e-5, atol=0)
    try:
        from diffusers import DDPMScheduler
    except ImportError:
        pass
    else:  # the default DDPMScheduler, bit for bit
        assert torch.equal(sched.alphas_cumprod, DDPMScheduler().alphas_cumprod.double())
    # The range runs from timestep 999 to timestep 0 (sigma = sqrt(beta_0) = 0.01, not 0).
    lo, hi = model.t_range
    assert float(sched.timestep(lo)) == 999 and float(sched.timestep(hi)) == 0
    a, s, _, _ = sched(torch.tensor([lo, hi], dtype=torch.float64))
    assert abs(float(s[1]) - 0.01) < 1e-6 and abs(float(a[0]) - 4.0358e-5**0.5) < 1e-5
    # Everything is finite on the whole range, the ends included (an eps model at sigma = 0
    # would not be).
    x = torch.randn(2, 1, 28, 28, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    assert torch.isfinite(model.velocity(x, torch.tensor([lo, hi], dtype=torch.float64))).all()


def _time_mlp_inputs(model: bns.Model, t: torch.Tensor) -> torch.Tensor:
    seen = []
    hook = model.net.time_mlp.register_forward_hook(lambda m, i, o: seen.append(i[0]))
    try:
        with torch.no_grad():
            model.net(torch.zeros(len(t), 1, 28, 28), t)
    finally:
        hook.remove()
    return seen[0]


def test_ddpm_net_embeds_the_ddpm_timestep(models):
    # fmnist-ddpm's net sees k = (1 - t) 999, the diffusers timestep of t, at one radian per
    # timestep (as DDPM's sinusoidal embedding); fmnist-vp's sees 100 t.
    from bns.models.unet import time_features

    t = torch.tensor([0.0, 0.25, 0.5, 0.9, 1.0])
    ddpm, vp = models["fmnist-ddpm"], models["fmnist-vp"]
    k = ddpm.schedule.timestep(t.double()).float()
    torch.testing.assert_close(k, (1 - t) * 999)
    got = _time_mlp_inputs(ddpm, t)
    torch.testing.assert_close(got, time_features(k, 128, 1.0), rtol=0, atol=1e-6)
    # At timestep 0 (t = 1) every sine is 0 and every cosine 1; the fastest feature turns one
    # radian per timestep, i.e. by 999 rad per unit of flow time.
    assert torch.equal(got[-1], torch.cat([torch.zeros(64), torch.ones(64)]))
    torch.testing.assert_close(got[1, 0], torch.sin(torch.tensor(0.75 * 999)), rtol=0, atol=1e-4)
    torch.testing.assert_close(_time_mlp_inputs(vp, t), time_features(t * 100, 128, 1.0))
    cfg = ddpm.net.config
    assert cfg.timesteps == 1000 and cfg.time_scale == 1.0
    assert fmnist.RECIPES["fmnist-vp"].net.timesteps is None


@needs_data
def test_ddpm_net_varies_faster_in_time_than_fmnist_vp(models):
    # The point of fmnist-ddpm: its output is as rough in t as real DDPM models'. Along noisy
    # test images, the second difference of the net's output over one DDPM timestep (dt = 1e-3)
    # is about 25 times fmnist-vp's (measured: 3.4e-4 against 1.3e-5, relative, on the whole
    # grid of 601 times in [0.3, 0.9]; 3.1e-4 against 1.3e-5 on the 40 triples t - dt, t,
    # t + dt taken here, t spread over the same range).
    x1 = fmnist.load_fashion_mnist(split="test", limit=8)[0]
    eps = torch.randn(8, 1, 28, 28, generator=torch.Generator().manual_seed(8))
    centers = torch.linspace(0.301, 0.899, 40)
    ts = torch.stack([centers - 1e-3, centers, centers + 1e-3], 1)  # [40, 3]
    rough = {}
    for name in ("fmnist-vp", "fmnist-ddpm"):
        model, outs = models[name], []
        for tv in ts.flatten():
            t = torch.full((8,), float(tv))
            a, s = (v.float().reshape(-1, 1, 1, 1) for v in model.schedule(t.double())[:2])
            with torch.no_grad():
                outs.append(model.net(a * x1 + s * eps, t))
        f = torch.stack(outs).reshape(40, 3, 8, -1)  # [triple, t - dt / t / t + dt, 8, 784]
        d2 = (f[:, 2] - 2 * f[:, 1] + f[:, 0]).norm(dim=2)
        rough[name] = float(d2.mean() / f.norm(dim=3).mean())
    assert rough["fmnist-ddpm"] > 8 * rough["fmnist-vp"], rough


def test_ddpm_100_step_solver_is_close_to_dopri5_but_not_exact(models):
    # Midpoint with 50 steps (NFE 100) against the dopri5 ground truth: measured 48.6-53.7 dB
    # (fmnist-vp: 57.8 dB on average), and dopri5 needs more evaluations than on fmnist-vp
    # (212 here; fmnist-vp about 146): the rougher time dependence costs accuracy.
    model = models["fmnist-ddpm"]
    x0 = torch.randn(8, 1, 28, 28, generator=torch.Generator().manual_seed(9))
    gt, stats = bns.ground_truth(model, x0, return_stats=True)
    solver = bns.solvers.midpoint(bns.grids.uniform(50, model.t_range))
    with torch.no_grad():
        x = bns.sample(model, x0, solver)
    psnr = bns.metrics.psnr(x.double(), gt)
    assert float(psnr.min()) > 45 and float(psnr.mean()) < 56, psnr
    assert 170 < stats["nfe"] < 400, stats


# -- quality -------------------------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_samples_have_the_pixel_statistics_of_the_data(models, name):
    # An untrained net gives noise (CondOT: std 1, mean 0) or blows up (VP eps: x grows by
    # 1/alpha_0 ~ 150); a trained one gives images with Fashion-MNIST's mean -0.43, std 0.71.
    model = models[name]
    g = torch.Generator().manual_seed(3)
    x0 = torch.randn(64, 1, 28, 28, generator=g)
    solver = bns.solvers.midpoint(bns.grids.uniform(10, model.t_range))  # NFE 20
    with torch.no_grad():
        x = bns.sample(model, x0, solver)
    assert abs(float(x.mean()) - (-0.43)) < 0.1
    assert abs(float(x.std()) - 0.71) < 0.08
    # Most pixels are background (-1) or inside the data range.
    assert float((x.abs() > 1.2).float().mean()) < 0.02


@needs_data
@pytest.mark.parametrize("name", NAMES)
def test_loss_on_test_images_matches_training_and_beats_an_untrained_net(models, name):
    images, labels = fmnist.load_fashion_mnist(split="test", limit=512)
    model = models[name]
    y = labels if model.num_classes is not None else None

    def loss(m: bns.Model) -> float:
        with torch.no_grad():
            return float(fmnist.training_loss(m, images, y, torch.Generator().manual_seed(0)))

    trained = loss(model)
    untrained = loss(fmnist.build_model(name))
    recorded = _recorded(name)["test_loss_ema"]
    assert trained < 0.35 * untrained
    assert abs(trained - recorded) < 0.1 * recorded  # same loss as the training run measured


@needs_data
def test_guided_samples_look_like_their_class(models):
    # Nearest class-mean of the real test images (about 68% right on real images) recognises
    # the class of guided samples; an untrained or label-blind net would score about 10%.
    images, labels = fmnist.load_fashion_mnist(split="test")
    means = torch.stack([images[labels == k].mean(0).flatten() for k in range(10)])
    model = models["fmnist-cfg"]
    g = torch.Generator().manual_seed(4)
    y = torch.arange(10).repeat(6)
    solver = bns.solvers.midpoint(bns.grids.uniform(10, model.t_range))
    with torch.no_grad():
        x = bns.sample(model, torch.randn(60, 1, 28, 28, generator=g), solver, y=y, guidance=2.0)
    pred = torch.cdist(x.flatten(1), means).argmin(1)
    assert float((pred == y).float().mean()) > 0.6


# -- data and training ---------------------------------------------------------------------
def test_missing_dataset_gives_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="dataset-fashion-mnist"):
        fmnist.load_fashion_mnist(tmp_path)
    with pytest.raises(ValueError, match="split"):
        fmnist.load_fashion_mnist(split="validation")


def test_not_an_idx_file(tmp_path):
    import gzip

    for stem in ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):
        with gzip.open(tmp_path / stem, "wb") as f:
            f.write(b"\x00\x00\x08\x01" + bytes(100))
    with pytest.raises(ValueError, match="bad magic"):
        fmnist.load_fashion_mnist(tmp_path, "test")


@needs_data
def test_dataset_reads_as_images_in_range():
    x, y = fmnist.load_fashion_mnist(split="test")
    assert x.shape == (10000, 1, 28, 28) and y.shape == (10000,)
    assert float(x.min()) == -1.0 and float(x.max()) == 1.0
    assert torch.bincount(y).tolist() == [1000] * 10  # the test split is balanced


def _script():
    spec = importlib.util.spec_from_file_location("train_fmnist", ROOT / "scripts/train_fmnist.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_training_loss_targets(models):
    # With the exact target as the net's output the loss is 0: checks x_t and the target.
    for name in NAMES:
        model = models[name]
        g = torch.Generator().manual_seed(5)
        x1 = torch.rand(8, 1, 28, 28, generator=g) * 2 - 1
        seen = {}

        def oracle(xt, t, y=None, model=model, x1=x1, seen=seen):
            a, s, da, ds = (v.float().reshape(-1, 1, 1, 1) for v in model.schedule(t.double()))
            eps = (xt - a * x1) / s
            seen["t"] = t
            return da * x1 + ds * eps if model.prediction == "velocity" else eps

        m = bns.Model(
            oracle, model.prediction, model.schedule, (1, 28, 28), model.t_range, model.num_classes
        )
        y = torch.zeros(8, dtype=torch.long) if model.num_classes else None
        assert float(fmnist.training_loss(m, x1, y, g)) < 1e-8
        lo, hi = model.t_range
        assert bool(((seen["t"] >= lo) & (seen["t"] <= hi)).all())


@pytest.mark.parametrize("name", NAMES)
def test_training_reduces_the_loss_and_writes_a_loadable_model(tmp_path, name):
    if HAVE_DATA:
        images, labels = fmnist.load_fashion_mnist(split="test", limit=256)
    else:  # synthetic stand-in: bright rectangles on a dark background
        g = torch.Generator().manual_seed(6)
        images = -torch.ones(256, 1, 28, 28)
        for i in range(256):
            r, c = torch.randint(2, 14, (2,), generator=g).tolist()
            images[i, :, r : r + 12, c : c + 10] = 0.8
        labels = torch.arange(256) % 10
    result = fmnist.train(name, images, labels, steps=40, batch_size=16, lr=2e-3, warmup=5, seed=0)
    # last / first measured with batches of 16 (of 32): cfg 0.55 (0.50), vp and ddpm 0.27 (0.22);
    # on the synthetic stand-in 0.46 (0.40) and 0.24 (0.19)
    first, last = sum(result.losses[:8]) / 8, sum(result.losses[-8:]) / 8
    assert last < 0.7 * first, (first, last)
    path = fmnist.save_net(result.ema, name, tmp_path / f"{name}.safetensors")
    model = FACTORIES[name](path)
    assert isinstance(model, bns.Model) and model.name == name
    for (k, v), (k2, v2) in zip(result.ema.state_dict().items(), model.net.state_dict().items()):
        assert k == k2 and torch.equal(v, v2)


def test_training_script_end_to_end(tmp_path, capsys):
    script = _script()
    if not HAVE_DATA:
        pytest.skip("Fashion-MNIST is not installed")
    rc = script.main(
        ["--model", "fmnist-cfg", "--steps", "12", "--batch-size", "16", "--limit", "200",
         "--warmup", "4", "--grid-steps", "1", "--guidance", "1", "--log-every", "0",
         "--out", str(tmp_path)]
    )  # fmt: skip
    assert rc == 0
    info = json.loads((tmp_path / "fmnist-cfg.json").read_text())
    assert (
        info["recipe"]["steps"] == 12
        and info["fingerprint"]
        == fmnist.fmnist_cfg(tmp_path / "fmnist-cfg.safetensors").fingerprint()
    )
    for png in ("fmnist-cfg-loss.png", "fmnist-cfg-samples.png"):
        assert (tmp_path / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_training_script_reports_a_missing_dataset(tmp_path, capsys):
    rc = _script().main(["--model", "fmnist-vp", "--data", str(tmp_path), "--out", str(tmp_path)])
    assert rc == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "not found" in err and len(err.strip().splitlines()) == 1
    assert not list(tmp_path.glob("*.safetensors"))


def test_unet_rejects_labels_when_unconditional():
    net = TinyUNet(UNetConfig(channels=(8, 16), emb_dim=16))
    with pytest.raises(ValueError, match="unconditional"):
        net(torch.zeros(1, 1, 28, 28), torch.zeros(1), torch.zeros(1, dtype=torch.long))


def test_measure_reports_missing_weights(tmp_path, capsys):
    rc = _script().main(
        ["--model", "fmnist-cfg", "--measure", "--weights", str(tmp_path / "none.safetensors")]
    )
    assert rc == 2 and capsys.readouterr().err.startswith("error: weights of fmnist-cfg not found")


def test_training_script_needs_an_output_folder(capsys):
    assert _script().main(["--model", "fmnist-cfg"]) == 2
    assert "--out" in capsys.readouterr().err
