"""The ComfyUI nodes (bns.integrations.comfyui) against a stand-in for ComfyUI.

ComfyUI is not on PyPI; tests/comfy_standin/ follows its contracts line by line (each piece
cites Comfy-Org/ComfyUI's file and function at commit a125cd84b054a57729b5eecab930ca9408719832).
The nodes run through the stand-in's SamplerCustom exactly as ComfyUI would call them, and
their samples must equal ``bns.sample`` on the same noise, which sees the same networks through
bns's own flow-time conventions.
"""

from __future__ import annotations

import importlib.util
import logging
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import bns
from bns.cli import main
from bns.schedules import CondOT, DiscreteVP
from bns.solvers import by_name, with_data_end

STANDIN = Path(__file__).parent / "comfy_standin"
SHAPE = (4, 6, 6)
CLASSES = 3


@pytest.fixture(scope="module", autouse=True)
def comfy():
    """The stand-in importable as ``comfy`` / ``comfy_extras`` for this module only."""
    sys.path.insert(0, str(STANDIN))
    try:
        import comfy.model_base  # noqa: F401
        import comfy.model_patcher  # noqa: F401
        import comfy.samplers
        import comfy_extras.nodes_custom_sampler  # noqa: F401

        assert Path(comfy.samplers.__file__).is_relative_to(STANDIN)
        yield
    finally:
        sys.path.remove(str(STANDIN))
        for name in [m for m in sys.modules if m.split(".")[0] in ("comfy", "comfy_extras")]:
            del sys.modules[name]


@pytest.fixture(autouse=True)
def _threads(one_thread):
    yield


class TinyNet(nn.Module):
    """A small latent-space network as a user writes one: float32, (x, timestep, y)."""

    def __init__(self, seed: int) -> None:
        super().__init__()
        torch.manual_seed(seed)
        c = SHAPE[0]
        self.inp = nn.Conv2d(c, 16, 3, padding=1)
        self.out = nn.Conv2d(16, c, 3, padding=1)
        self.time = nn.Linear(1, 16)
        self.label = nn.Embedding(CLASSES + 1, 16)

    def forward(self, x, timestep, y=None):
        h = self.inp(x) + self.time(timestep.reshape(-1, 1) / 1000.0)[:, :, None, None]
        if y is not None:
            h = h + self.label(y)[:, :, None, None]
        return 0.5 * x + self.out(torch.tanh(h))


def diffusers_alphas_cumprod() -> torch.Tensor:
    """SD's schedule as diffusers computes it (float32 scaled_linear betas and cumprod): what a
    solver distilled through bns's diffusers integration records."""
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float32) ** 2
    return torch.cumprod(1.0 - betas, dim=0).double()


# -- the two sides of every comparison ----------------------------------------------------------
def comfy_model(net: nn.Module, model_type: str, **settings):
    """The MODEL ComfyUI's Load Checkpoint gives: a ModelPatcher around a BaseModel."""
    from comfy.model_base import BaseModel, ModelConfig
    from comfy.model_patcher import ModelPatcher

    return ModelPatcher(BaseModel(net, model_type, ModelConfig(**settings)))


def bns_model_discrete(net, patcher, prediction, ac, t_range=(0.0, 1.0)):
    """The same network as a bns.Model: flow time t -> ComfyUI's own noise level (its
    log-sigma interpolation at timestep (1 - t) 999) and network timestep; the state is ComfyUI's
    x / sqrt(1 + s^2), which is what ComfyUI's EPS/V calculate_input hands the network."""
    ms = patcher.model.model_sampling

    def f(x, t, y=None):
        sigma = ms.sigma((1 - t.to(torch.float64)) * 999)
        return net(x, ms.timestep(sigma).float(), y)

    return bns.Model(
        f,
        prediction=prediction,
        schedule=DiscreteVP(ac),
        sample_shape=SHAPE,
        t_range=t_range,
        num_classes=CLASSES,
        name=f"tiny-{prediction}",
    )


def bns_model_flow(net):
    """A flow network (ComfyUI's CONST: it predicts dx/dsigma at timestep 1000 sigma) as a
    bns velocity model: sigma = 1 - t, dx/dt = -dx/dsigma."""

    def f(x, t, y=None):
        return -net(x, (1 - t) * 1000.0, y)

    return bns.Model(
        f,
        prediction="velocity",
        schedule=CondOT(),
        sample_shape=SHAPE,
        t_range=(0.0, 1.0),
        num_classes=CLASSES,
        name="tiny-flow",
    )


def ns_solver(model, name, nfe, guidance=1.0, end=None, seed=0):
    """A classical solver with every coefficient moved a little: a genuine NS solver."""
    s = by_name(name, nfe, model)
    g = torch.Generator().manual_seed(seed)
    a = s.a + 0.02 * torch.randn(s.a.shape, generator=g, dtype=torch.float64)
    b = s.b + 0.02 * torch.tril(torch.randn(s.b.shape, generator=g, dtype=torch.float64))
    s = bns.NSSolver(s.times, a, b, {"model_settings": model.settings(), "guidance": guidance})
    if end == "data":
        s = with_data_end(s, model.schedule)
    return s


def run_sampler_custom(
    patcher, solver_path, cfg, seed=7, batch=2, sigmas=None, node=None, latent_image=None
):
    """SamplerCustom with BNS Sampler and BNS Sigmas, as in the documented workflow (an empty
    latent, or ``latent_image``: image-to-image)."""
    from comfy_extras.nodes_custom_sampler import SamplerCustom

    from bns.integrations.comfyui import NODE_CLASS_MAPPINGS

    (sampler,) = NODE_CLASS_MAPPINGS["BNSSampler"]().get_sampler(str(solver_path))
    if sigmas is None:
        (sigmas,) = NODE_CLASS_MAPPINGS["BNSSigmas"]().get_sigmas(patcher, str(solver_path))
    labels = torch.arange(batch) % CLASSES
    positive = {"y": labels}
    negative = {"y": torch.full_like(labels, CLASSES)}
    samples = torch.zeros(batch, *SHAPE) if latent_image is None else latent_image
    latent = {"samples": samples}
    node = node or SamplerCustom()
    out, denoised = node.sample(
        patcher, True, seed, cfg, positive, negative, sampler, sigmas, latent
    )
    noise = torch.randn((batch, *SHAPE), generator=torch.manual_seed(seed))
    return out["samples"], denoised["samples"], noise, labels, node


# -- samples equal bns.sample ---------------------------------------------------------------------
def assert_same(samples, want):
    """Equal to 1e-5 of the samples' scale. ComfyUI's path rounds in float32 at its own scale
    (``x - sigma eps`` at sigma 14.6 for SD's schedule): 3e-6 to 6e-6 on these epsilon samples
    of magnitude 12, 5e-7 on the v and flow ones of magnitude 2; every wrong conversion tried
    (no sqrt(1 + s^2), another start or end scale, sigma for sigma / alpha, coefficients one
    step off) is off by 7e-4 or more, 40 times the tolerance or far more."""
    want = want.detach()
    assert samples.shape == want.shape and samples.dtype == want.dtype == torch.float32
    scale = max(1.0, float(want.abs().max()))
    torch.testing.assert_close(samples, want, rtol=0, atol=1e-5 * scale)
    assert scale > 1.0 or float(want.abs().max()) > 0.1  # not a degenerate comparison


@pytest.mark.parametrize(
    "t_range, end",
    [((0.0, 1.0), "data"), ((0.05, 1.0), None)],
    ids=["from-sigma-max-to-data", "from-inside-the-range"],
)
def test_epsilon_model_samples_equal_bns_sample(tmp_path, t_range, end):
    net = TinyNet(1)
    patcher = comfy_model(net, "EPS")
    model = bns_model_discrete(net, patcher, "eps", diffusers_alphas_cumprod(), t_range)
    solver = ns_solver(model, "dpmpp2m", 5, guidance=2.0, end=end)
    path = solver.save(tmp_path / "eps.json")
    samples, denoised, noise, labels, node = run_sampler_custom(patcher, path, cfg=2.0)
    want = bns.sample(model, noise, solver, y=labels, guidance=2.0)
    if end != "data":  # ComfyUI's x at the last sigma: sqrt(1 + s^2) times bns's state
        s_end = float(patcher.model.model_sampling.sigma_min)  # t = 1 is timestep 0
        want = want * (1 + s_end**2) ** 0.5
    assert_same(samples, want)
    # ComfyUI's callback contract: callback(step, x0, x, total_steps) once per step.
    steps = [c[0] for c in node.calls]
    assert steps == list(range(solver.nfe)) and {c[3] for c in node.calls} == {solver.nfe}
    assert all(c[1].shape == noise.shape and c[2].shape == noise.shape for c in node.calls)
    torch.testing.assert_close(denoised, node.calls[-1][1])


def test_v_model_samples_equal_bns_sample(tmp_path):
    net = TinyNet(2)
    patcher = comfy_model(net, "V_PREDICTION")
    sig = patcher.model.model_sampling.sigmas.double()
    model = bns_model_discrete(net, patcher, "v", 1 / (1 + sig**2))  # ComfyUI's own schedule
    solver = ns_solver(model, "dpmpp2m", 4, guidance=1.0)  # ends at t = 1, sigma_min
    path = solver.save(tmp_path / "v.json")
    samples, _, noise, labels, node = run_sampler_custom(patcher, path, cfg=1.0)
    s_end = float(patcher.model.model_sampling.sigma_min)
    want = bns.sample(model, noise, solver, y=labels) * (1 + s_end**2) ** 0.5
    assert_same(samples, want)
    assert [c[0] for c in node.calls] == list(range(4))


def test_flow_model_samples_equal_bns_sample(tmp_path):
    net = TinyNet(3)
    patcher = comfy_model(net, "FLOW", shift=3.0)  # SD3's shift: it moves grids, not the path
    model = bns_model_flow(net)
    solver = ns_solver(model, "midpoint", 6, guidance=1.5)
    path = solver.save(tmp_path / "flow.json")
    samples, _, noise, labels, _ = run_sampler_custom(patcher, path, cfg=1.5)
    want = bns.sample(model, noise, solver, y=labels, guidance=1.5)
    assert_same(samples, want)


@pytest.mark.parametrize("kind", ["eps", "flow"])
def test_image_to_image_span_solver_equals_bns_sample(tmp_path, kind):
    """A solver for a span that starts from noised data (bns distill --span 0.4:) on a VAE
    latent: ComfyUI noises the latent to the solver's first sigma, the sampler starts there."""
    net = TinyNet(4)
    if kind == "eps":
        patcher = comfy_model(net, "EPS")
        model = bns_model_discrete(net, patcher, "eps", diffusers_alphas_cumprod())
    else:
        patcher = comfy_model(net, "FLOW", shift=3.0)
        model = bns_model_flow(net)
    span = model.span(0.4)
    solver = ns_solver(span, "ab3", 4, guidance=2.0, end="data" if kind == "eps" else None)
    solver.meta["span"] = span.span_info()
    path = solver.save(tmp_path / "img2img.json")
    image = 0.8 * torch.randn((2, *SHAPE), generator=torch.Generator().manual_seed(3))
    samples, _, noise, labels, _ = run_sampler_custom(patcher, path, cfg=2.0, latent_image=image)
    want = bns.sample(span, span.start_state(image, noise), solver, y=labels, guidance=2.0)
    assert_same(samples, want)
    # Started as if from noise, it would be far off.
    wrong = bns.sample(span, noise, solver, y=labels, guidance=2.0)
    assert (samples - wrong).abs().max() > 1e-2


# -- BNS Sigmas --------------------------------------------------------------------------------------
def test_sigmas_node_gives_the_solver_grid_in_comfyui_sigmas(tmp_path):
    from bns.integrations.comfyui import BNSSigmas

    net = TinyNet(4)
    patcher = comfy_model(net, "EPS")
    ac = diffusers_alphas_cumprod()
    model = bns_model_discrete(net, patcher, "eps", ac)
    for end in (None, "data"):
        solver = ns_solver(model, "dpmpp2m", 5, end=end)
        (sig,) = BNSSigmas().get_sigmas(patcher, str(solver.save(tmp_path / f"{end}.json")))
        # Independently: log sigma interpolated linearly between integer timesteps, from the
        # solver's own alphas_cumprod (float64).
        log_s = 0.5 * torch.log((1 - ac) / ac)
        k = (1 - solver.times) * 999
        lo = k.floor().long().clamp(0, 998)
        w = k - lo
        want = torch.exp((1 - w) * log_s[lo] + w * log_s[lo + 1])
        if end == "data":
            want[-1] = 0.0
        assert sig.dtype == torch.float32 and sig.shape == (6,)
        torch.testing.assert_close(sig.double(), want, rtol=1e-6, atol=0)
        # ... and ComfyUI's own sigma(timestep) map agrees (its float32, float64-built table).
        ms = patcher.model.model_sampling
        theirs = ms.sigma(k.float()).double()
        torch.testing.assert_close(sig[:-1].double(), theirs[:-1], rtol=3e-5, atol=0)
        assert sig[0] == pytest.approx(float(ms.sigma_max), rel=1e-5)  # starts at sigma_max

    flow_patcher = comfy_model(TinyNet(5), "FLOW", shift=3.0)
    solver = ns_solver(bns_model_flow(flow_patcher.model.diffusion_model), "midpoint", 4)
    (sig,) = BNSSigmas().get_sigmas(flow_patcher, str(solver.save(tmp_path / "flow.json")))
    torch.testing.assert_close(sig.double(), (1 - solver.times), rtol=0, atol=1e-7)
    assert sig[0] == 1.0 and sig[-1] == 0.0


# -- refusals ---------------------------------------------------------------------------------------
def _eps_setup(tmp_path, nfe=4):
    net = TinyNet(6)
    patcher = comfy_model(net, "EPS")
    model = bns_model_discrete(net, patcher, "eps", diffusers_alphas_cumprod())
    solver = ns_solver(model, "dpmpp2m", nfe, guidance=2.0)
    return patcher, model, solver.save(tmp_path / f"eps{nfe}.json")


def test_refuses_a_solver_of_another_model_kind(tmp_path):
    from bns.integrations.comfyui import ComfyUIError

    _, _, eps_path = _eps_setup(tmp_path)
    v_patcher = comfy_model(TinyNet(7), "V_PREDICTION")
    flow_patcher = comfy_model(TinyNet(7), "FLOW")
    edm_patcher = comfy_model(TinyNet(7), "EDM")
    with pytest.raises(ComfyUIError, match="made for an epsilon-prediction model .* v-prediction"):
        run_sampler_custom(v_patcher, eps_path, cfg=2.0, sigmas=torch.ones(5))
    with pytest.raises(ComfyUIError, match="made for an epsilon-prediction model .* flow model"):
        run_sampler_custom(flow_patcher, eps_path, cfg=2.0, sigmas=torch.ones(5))
    with pytest.raises(ComfyUIError, match="runs discrete epsilon / v-prediction .* EDM"):
        run_sampler_custom(edm_patcher, eps_path, cfg=2.0, sigmas=torch.ones(5))
    # BNS Sigmas refuses the same way (before any sampling).
    from bns.integrations.comfyui import BNSSigmas

    with pytest.raises(ComfyUIError, match="v-prediction"):
        BNSSigmas().get_sigmas(v_patcher, str(eps_path))
    # Same kind, another DDPM schedule (linear 1e-4..2e-2, the original DDPM's).
    ddpm = torch.cumprod(1 - torch.linspace(1e-4, 2e-2, 1000, dtype=torch.float64), 0)
    eps_patcher = comfy_model(TinyNet(7), "EPS")
    other = ns_solver(bns_model_discrete(TinyNet(7), eps_patcher, "eps", ddpm), "dpmpp2m", 4)
    with pytest.raises(ComfyUIError, match="another noise schedule"):
        BNSSigmas().get_sigmas(eps_patcher, str(other.save(tmp_path / "ddpm.json")))
    # A solver made for no ComfyUI model at all is refused by BNS Sampler itself.
    from bns.integrations.comfyui import BNSSampler

    edm = bns.Model(
        lambda x, t, y=None: x,
        prediction="x1",
        schedule=bns.schedules.EDM(),
        sample_shape=SHAPE,
        t_range=(0.0, 1.0),
    )
    path = ns_solver(edm, "euler", 3).save(tmp_path / "edm.json")
    with pytest.raises(ComfyUIError, match="made for a x1 model with scheduler EDM"):
        BNSSampler().get_sampler(str(path))


def test_refuses_sigmas_of_another_step_count(tmp_path):
    from bns.integrations.comfyui import BNSSigmas, ComfyUIError

    patcher, model, path = _eps_setup(tmp_path, nfe=4)
    _, _, path5 = _eps_setup(tmp_path, nfe=5)
    (sig5,) = BNSSigmas().get_sigmas(patcher, str(path5))
    with pytest.raises(
        ComfyUIError,
        match=r"got 6 sigmas \(5 steps\) but the solver takes 4 steps; connect BNS Sigmas",
    ):
        run_sampler_custom(patcher, path, cfg=2.0, sigmas=sig5)


def test_refuses_sigmas_that_are_not_the_solver_grid(tmp_path):
    import comfy.samplers

    from bns.integrations.comfyui import BNSSigmas, ComfyUIError

    patcher, _, path = _eps_setup(tmp_path, nfe=4)
    normal = comfy.samplers.normal_scheduler(patcher.get_model_object("model_sampling"), 4)
    assert normal.numel() == 5
    with pytest.raises(ComfyUIError, match="not the solver's own grid.*connect BNS Sigmas"):
        run_sampler_custom(patcher, path, cfg=2.0, sigmas=normal)
    (own,) = BNSSigmas().get_sigmas(patcher, str(path))
    nudged = own.clone()
    nudged[2] *= 1.001
    with pytest.raises(ComfyUIError, match="connect BNS Sigmas"):
        run_sampler_custom(patcher, path, cfg=2.0, sigmas=nudged)


def test_warns_when_cfg_is_not_the_solver_guidance(tmp_path, caplog):
    patcher, _, path = _eps_setup(tmp_path)
    with caplog.at_level(logging.WARNING, logger="bns.integrations.comfyui"):
        run_sampler_custom(patcher, path, cfg=2.0)
    assert not [r for r in caplog.records if r.name == "bns.integrations.comfyui"]
    with caplog.at_level(logging.WARNING, logger="bns.integrations.comfyui"):
        run_sampler_custom(patcher, path, cfg=3.5)
    msgs = [r.getMessage() for r in caplog.records if r.name == "bns.integrations.comfyui"]
    assert len(msgs) == 1
    assert "trained for guidance 2 but the sampler guides with cfg 3.5" in msgs[0]
    assert "Set cfg to 2" in msgs[0]


def test_sampler_node_reports_a_missing_or_bad_file_in_one_line(tmp_path):
    from bns.integrations.comfyui import BNSSampler, ComfyUIError

    with pytest.raises(ComfyUIError, match="solver file not found"):
        BNSSampler().get_sampler(str(tmp_path / "nope.json"))
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    with pytest.raises(ComfyUIError, match="not a bns solver file") as e:
        BNSSampler().get_sampler(str(bad))
    assert "\n" not in str(e.value)
    with pytest.raises(ComfyUIError, match="no solver file given"):
        BNSSampler().get_sampler("  ")
    # ComfyUI reruns the node when the file changes (IS_CHANGED: its contents).
    _, _, path = _eps_setup(tmp_path)
    before = BNSSampler.IS_CHANGED(str(path))
    assert before == BNSSampler.IS_CHANGED(str(path))
    path.write_text(path.read_text().replace('"guidance": 2.0', '"guidance": 3.0'))
    assert before != BNSSampler.IS_CHANGED(str(path))


def test_importing_the_nodes_does_not_import_comfyui():
    code = (
        "import sys, bns, bns.integrations.comfyui as c, bns.integrations.comfyui.conventions;"
        " assert set(c.NODE_CLASS_MAPPINGS) == {'BNSSampler', 'BNSSigmas'};"
        " bad = [m for m in sys.modules if m.split('.')[0] in ('comfy', 'comfy_extras',"
        " 'folder_paths')]; assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


# -- bns comfyui install ----------------------------------------------------------------------------
def _fake_comfyui(root: Path) -> Path:
    (root / "custom_nodes").mkdir(parents=True)
    (root / "comfy").mkdir()
    (root / "comfy" / "samplers.py").write_text("")
    return root


def _load_like_comfyui(folder: Path):
    """nodes.py, load_custom_node (Comfy-Org/ComfyUI a125cd84b054a57729b5eecab930ca9408719832):
    a folder is imported from its __init__.py by file location
    and must hold NODE_CLASS_MAPPINGS (and may hold NODE_DISPLAY_NAME_MAPPINGS)."""
    name = str(folder).replace(".", "_x_")
    spec = importlib.util.spec_from_file_location(name, folder / "__init__.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    finally:
        del sys.modules[name]
    return module


def test_cli_install_writes_a_shim_comfyui_loads(tmp_path, capsys):
    from bns.integrations.comfyui import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

    root = _fake_comfyui(tmp_path / "ComfyUI")
    assert main(["comfyui", "install", str(root)]) == 0
    target = root / "custom_nodes" / "bns_nodes"
    assert str(target) in capsys.readouterr().out
    assert sorted(p.name for p in target.iterdir()) == ["__init__.py"]
    module = _load_like_comfyui(target)
    assert module.NODE_CLASS_MAPPINGS is NODE_CLASS_MAPPINGS
    assert module.NODE_DISPLAY_NAME_MAPPINGS == {
        "BNSSampler": "BNS Sampler",
        "BNSSigmas": "BNS Sigmas",
    }
    assert module.NODE_DISPLAY_NAME_MAPPINGS is NODE_DISPLAY_NAME_MAPPINGS
    # Again: our own folder is updated, no --force needed; nothing is left beside it.
    assert main(["comfyui", "install", str(root)]) == 0
    assert sorted(p.name for p in (root / "custom_nodes").iterdir()) == ["bns_nodes"]


def test_cli_install_refusals(tmp_path, capsys):
    plain = tmp_path / "plain"
    plain.mkdir()
    assert main(["comfyui", "install", str(plain)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "is not a ComfyUI checkout" in err
    (plain / "custom_nodes").mkdir()  # still no comfy package
    assert main(["comfyui", "install", str(plain)]) == 2
    assert "is not a ComfyUI checkout" in capsys.readouterr().err

    root = _fake_comfyui(tmp_path / "ComfyUI")
    theirs = root / "custom_nodes" / "bns_nodes"
    theirs.mkdir()
    (theirs / "__init__.py").write_text("NODE_CLASS_MAPPINGS = {}\n")
    (theirs / "notes.txt").write_text("mine")
    assert main(["comfyui", "install", str(root)]) == 2
    err = capsys.readouterr().err.strip()
    assert "was not written by bns comfyui install; pass --force" in err and "\n" not in err
    assert (theirs / "notes.txt").read_text() == "mine"  # untouched
    assert main(["comfyui", "install", str(root), "--force"]) == 0
    assert sorted(p.name for p in theirs.iterdir()) == ["__init__.py"]
    assert sorted(p.name for p in (root / "custom_nodes").iterdir()) == ["bns_nodes"]
    assert "NODE_CLASS_MAPPINGS" in _load_like_comfyui(theirs).__dict__
