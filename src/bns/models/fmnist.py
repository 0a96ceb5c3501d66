"""The reference image models: small U-Nets trained on Fashion-MNIST, shipped as safetensors.

Three models, each a :class:`bns.Model` factory:

- :func:`fmnist_cfg`: class-conditional (10 classes, label 10 = no label), CondOT path,
  velocity prediction, trained with label dropout so classifier-free guidance works. It is the
  default model of ``bns demo``.
- :func:`fmnist_vp`: unconditional, VP path (beta 0.1..20), epsilon prediction; its net embeds
  ``100 t``, which makes the velocity smoother in ``t`` than published models.
- :func:`fmnist_ddpm`: unconditional, epsilon prediction, built like published DDPM models:
  the discrete schedule of diffusers' ``DDPMScheduler`` (1000 steps, linear beta 1e-4..0.02)
  and a net that embeds the DDPM timestep ``k = (1 - t) 999``; its range ends at timestep 0
  (sigma = 0.01), not at sigma = 0.

Images are ``(1, 28, 28)`` scaled to [-1, 1]. The weights were made by
``scripts/train_fmnist.py`` (recipe and metrics in ``weights/<name>.json``; see docs/models).
This module also holds what that script needs: the IDX reader, the loss and the training loop.
"""

from __future__ import annotations

import copy
import gzip
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import BNSError, InputError
from ..model import Model
from ..schedules import VP, CondOT, DiscreteVP, Schedule
from .unet import TinyUNet, UNetConfig

__all__ = [
    "DATA_DIR",
    "WEIGHTS_DIR",
    "RECIPES",
    "Recipe",
    "WeightsError",
    "fmnist_cfg",
    "fmnist_vp",
    "fmnist_ddpm",
    "ddpm_schedule",
    "load_fashion_mnist",
    "build_model",
    "load_net",
    "training_loss",
    "train",
]

DATA_DIR = Path("/usr/share/datasets/fashion-mnist")
WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
SAMPLE_SHAPE = (1, 28, 28)
CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)


class WeightsError(BNSError, RuntimeError):
    """Shipped weights are missing, corrupt, or do not match the model they are loaded into."""


@dataclass(frozen=True)
class Recipe:
    """Everything but the weights that defines a reference model."""

    name: str
    net: UNetConfig
    schedule: Callable[[], Schedule]
    prediction: str
    t_range: tuple[float, float]
    label_dropout: float = 0.0

    @property
    def num_classes(self) -> int | None:
        return self.net.num_classes


def ddpm_schedule(
    num_train_timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02
) -> DiscreteVP:
    """The schedule of diffusers' default ``DDPMScheduler`` (linear betas, as in Ho et al. 2020).

    Computed as diffusers does (float32 ``linspace`` of the betas, float32 cumulative product),
    so that ``alphas_cumprod`` equals ``DDPMScheduler().alphas_cumprod`` bit for bit.
    """
    betas = torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float32)
    return DiscreteVP(torch.cumprod(1.0 - betas, dim=0))


# The nets fold 28x28 into 14x14x4 and work at 14x14 and 7x7: about 9 M multiply-adds, a
# third of a millisecond per sample on one CPU core, which is what the CPU demo can afford.
_NET = dict(in_channels=1, channels=(32, 48), blocks=1, emb_dim=128, patch=2)

RECIPES: dict[str, Recipe] = {
    "fmnist-cfg": Recipe(
        name="fmnist-cfg",
        net=UNetConfig(num_classes=10, **_NET),
        schedule=CondOT,
        prediction="velocity",
        t_range=(0.0, 1.0),
        label_dropout=0.15,
    ),
    "fmnist-vp": Recipe(
        name="fmnist-vp",
        net=UNetConfig(num_classes=None, **_NET),
        schedule=VP,
        prediction="eps",
        t_range=(0.0, 1.0 - 1e-3),
    ),
    # Like a published DDPM model: the net sees the DDPM timestep k = (1 - t) 999 (time_scale
    # 1 on k, the highest frequency one radian per timestep), and the range is the full
    # discrete schedule, timestep 999 (t = 0, alpha = 0.0064) to timestep 0 (t = 1,
    # sigma = sqrt(1e-4) = 0.01). Trained on continuous t, i.e. fractional timesteps.
    "fmnist-ddpm": Recipe(
        name="fmnist-ddpm",
        net=UNetConfig(num_classes=None, time_scale=1.0, timesteps=1000, **_NET),
        schedule=ddpm_schedule,
        prediction="eps",
        t_range=(0.0, 1.0),
    ),
}


def _recipe(name: str) -> Recipe:
    if name not in RECIPES:
        raise InputError(f"unknown reference model {name!r}; known: {sorted(RECIPES)}")
    return RECIPES[name]


# -- data ----------------------------------------------------------------------------------
def _read_idx(path: Path, magic: int, header: int) -> Tensor:
    with gzip.open(path, "rb") as f:
        raw = bytearray(f.read())  # writable, so torch can share it without a warning
    if len(raw) < header or int.from_bytes(raw[:4], "big") != magic:
        raise InputError(f"{path} is not an IDX file (bad magic number)")
    return torch.frombuffer(raw, dtype=torch.uint8, offset=header)


def load_fashion_mnist(
    path: str | Path = DATA_DIR, split: str = "train", limit: int | None = None
) -> tuple[Tensor, Tensor]:
    """Read Fashion-MNIST from its gzipped IDX files.

    Returns ``(images, labels)``: float32 ``[N, 1, 28, 28]`` in [-1, 1] and long ``[N]``.
    ``split`` is ``"train"`` (60000) or ``"test"`` (10000); ``limit`` keeps the first images.
    """
    prefix = {"train": "train", "test": "t10k"}.get(split)
    if prefix is None:
        raise InputError(f"split must be 'train' or 'test', got {split!r}")
    root = Path(path)
    img_path = root / f"{prefix}-images-idx3-ubyte.gz"
    lab_path = root / f"{prefix}-labels-idx1-ubyte.gz"
    for p in (img_path, lab_path):
        if not p.is_file():
            raise FileNotFoundError(
                f"Fashion-MNIST file {p} not found; install Debian's dataset-fashion-mnist or "
                "pass --data DIR holding the four *-idx*-ubyte.gz files"
            )
    images = _read_idx(img_path, 2051, 16)
    labels = _read_idx(lab_path, 2049, 8)
    n = labels.numel()
    if images.numel() != n * 28 * 28:
        raise InputError(f"{img_path}: {images.numel()} bytes of pixels for {n} labels")
    if limit is not None:
        n = min(n, int(limit))
    x = images[: n * 784].reshape(n, 1, 28, 28).float()
    y = labels[:n].long()
    return x / 127.5 - 1.0, y


# -- models --------------------------------------------------------------------------------
def build_model(name: str, net: nn.Module | None = None) -> Model:
    """The :class:`bns.Model` of reference model ``name`` around ``net`` (fresh if None)."""
    r = _recipe(name)
    net = TinyUNet(r.net) if net is None else net
    return Model(
        net,
        prediction=r.prediction,
        schedule=r.schedule(),
        sample_shape=SAMPLE_SHAPE,
        t_range=r.t_range,
        num_classes=r.num_classes,
        name=r.name,
        dtype=torch.float32,
    )


def load_net(name: str, path: str | Path | None = None) -> TinyUNet:
    """The trained network of ``name`` from ``path`` (default: the shipped weights), in eval mode.

    Raises:
        WeightsError: the file is missing, unreadable, or its tensors or recorded architecture
            do not match the recipe.
    """
    from safetensors import safe_open

    r = _recipe(name)
    path = Path(path) if path is not None else WEIGHTS_DIR / f"{name}.safetensors"
    if not path.is_file():
        raise WeightsError(
            f"weights of {name} not found at {path}; train them with "
            f"scripts/train_fmnist.py --model {name} (or reinstall bns)"
        )
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            state = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises several types for a damaged file
        raise WeightsError(f"weights file {path} is corrupt or not safetensors: {e}") from e
    try:
        config = UNetConfig.from_dict(json.loads(meta["config"]))
    except Exception as e:
        raise WeightsError(f"weights file {path} carries no valid network config") from e
    if meta.get("model") != name or config != r.net:
        raise WeightsError(
            f"weights file {path} is for {meta.get('model')!r} with {config}, not {name}"
        )
    net = TinyUNet(config)
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise WeightsError(f"weights file {path} does not fit {name}: {e}") from e
    bad = [k for k, v in state.items() if not torch.isfinite(v).all()]
    if bad:
        raise WeightsError(f"weights file {path} holds non-finite values in {bad[:3]}")
    return net.eval().requires_grad_(False)


def save_net(net: TinyUNet, name: str, path: str | Path) -> Path:
    """Write ``net``'s weights as safetensors, with the model name and config as metadata."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
    meta = {"model": name, "config": json.dumps(net.config.to_dict(), sort_keys=True)}
    tmp = path.with_suffix(path.suffix + ".tmp")
    save_file(state, str(tmp), metadata=meta)
    tmp.replace(path)  # atomic: a crash never leaves half a weights file
    return path


def fmnist_cfg(weights: str | Path | None = None) -> Model:
    """Class-conditional Fashion-MNIST model: CondOT, velocity, labels 0-9 and 10 = no label."""
    return build_model("fmnist-cfg", load_net("fmnist-cfg", weights))


def fmnist_vp(weights: str | Path | None = None) -> Model:
    """Unconditional Fashion-MNIST model: VP (beta 0.1..20), epsilon prediction."""
    return build_model("fmnist-vp", load_net("fmnist-vp", weights))


def fmnist_ddpm(weights: str | Path | None = None) -> Model:
    """Unconditional Fashion-MNIST model like published DDPMs: discrete linear-beta schedule
    (1000 steps, 1e-4..0.02), epsilon prediction, net embedding the timestep ``(1 - t) 999``."""
    return build_model("fmnist-ddpm", load_net("fmnist-ddpm", weights))


# -- training ------------------------------------------------------------------------------
def training_loss(
    model: Model,
    x1: Tensor,
    y: Tensor | None,
    generator: torch.Generator | None = None,
    label_dropout: float = 0.0,
) -> Tensor:
    """Mean squared error of ``model.net`` against its target on ``x_t = alpha x1 + sigma eps``.

    ``t`` is uniform in the model's range; the target is the velocity ``alpha' x1 + sigma' eps``
    (CondOT: ``x1 - eps``) or ``eps``. With ``label_dropout`` that fraction of labels is replaced
    by the "no label" class, which trains the unconditional branch used by guidance.
    """
    b = x1.shape[0]
    lo, hi = model.t_range
    t = lo + (hi - lo) * torch.rand(b, generator=generator)
    eps = torch.randn(x1.shape, generator=generator)
    a, s, da, ds = (v.to(x1.dtype).reshape(b, 1, 1, 1) for v in model.schedule(t.double()))
    xt = a * x1 + s * eps
    if model.prediction == "velocity":
        target = da * x1 + ds * eps
    elif model.prediction == "eps":
        target = eps
    else:
        raise InputError(f"training_loss supports velocity and eps models, not {model.prediction}")
    if y is not None and label_dropout > 0:
        drop = torch.rand(b, generator=generator) < label_dropout
        y = torch.where(drop, torch.full_like(y, model.num_classes), y)
    out = model.net(xt, t, y) if y is not None else model.net(xt, t)
    return (out - target).pow(2).mean()


@dataclass
class TrainResult:
    """What :func:`train` returns: the EMA net (use this one), the raw net and the loss log."""

    ema: TinyUNet
    net: TinyUNet
    losses: list[float]
    wall_s: float
    recipe: dict[str, Any]


def train(
    name: str,
    images: Tensor,
    labels: Tensor,
    *,
    steps: int,
    batch_size: int = 128,
    lr: float = 1e-3,
    seed: int = 0,
    ema_decay: float = 0.999,
    warmup: int = 200,
    net_config: UNetConfig | None = None,
    log_every: int = 0,
    log: Callable[[str], None] = print,
) -> TrainResult:
    """Train reference model ``name`` on ``images`` (``[N, 1, 28, 28]`` in [-1, 1]).

    AdamW with linear warm-up and cosine decay to a tenth of ``lr``, gradient clipping at 1,
    and an exponential moving average of the weights (decay ramped up over the first steps).
    ``net_config`` overrides the recipe's architecture (used by the tests for a tiny net).
    """
    if steps < 1 or batch_size < 1:
        raise InputError(f"steps and batch_size must be positive, got {steps}, {batch_size}")
    r = _recipe(name)
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    net = TinyUNet(net_config or r.net)
    ema = copy.deepcopy(net).requires_grad_(False)
    model = build_model(name, net)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=0.0)

    def lr_at(step: int) -> float:
        if step < warmup:
            return lr * (step + 1) / warmup
        frac = (step - warmup) / max(1, steps - warmup)
        return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))

    conditional = r.num_classes is not None
    losses: list[float] = []
    start = time.perf_counter()
    for step in range(steps):
        idx = torch.randint(0, images.shape[0], (batch_size,), generator=g)
        loss = training_loss(
            model, images[idx], labels[idx] if conditional else None, g, r.label_dropout
        )
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        decay = min(ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for pe, p in zip(ema.parameters(), net.parameters()):
                pe.lerp_(p, 1 - decay)
        losses.append(float(loss.detach()))
        if log_every and (step + 1) % log_every == 0:
            recent = sum(losses[-log_every:]) / log_every
            rate = (step + 1) / (time.perf_counter() - start)
            log(f"step {step + 1}/{steps} loss {recent:.4f} lr {lr_at(step):.2e} {rate:.2f} it/s")
    recipe = {
        "model": name,
        "net": (net_config or r.net).to_dict(),
        "schedule": r.schedule().config(),
        "prediction": r.prediction,
        "t_range": list(r.t_range),
        "label_dropout": r.label_dropout,
        "steps": steps,
        "batch_size": batch_size,
        "lr": lr,
        "lr_schedule": f"linear warm-up {warmup} steps, cosine to 0.1 lr",
        "optimizer": "AdamW(weight_decay=0), grad clip 1.0",
        "ema_decay": ema_decay,
        "seed": seed,
        "train_images": int(images.shape[0]),
    }
    ema.eval().requires_grad_(False)
    return TrainResult(ema, net, losses, time.perf_counter() - start, recipe)
