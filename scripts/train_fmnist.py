"""Train a reference Fashion-MNIST model of bns and write its weights, recipe and figures.

    python scripts/train_fmnist.py --model fmnist-cfg --steps 20000 --threads 1 \
        --out src/bns/models/weights --figures docs/models

--model is one of bns.models.fmnist.RECIPES: fmnist-cfg, fmnist-vp or fmnist-ddpm (the recipe
fixes the net, schedule, prediction and time range; docs/models/models.md has the commands
that made the shipped weights).

With --measure it trains nothing: it loads the shipped (or --weights) model and prints the
forward time per sample (1 and 2 threads) and the PSNR of 8-NFE classical solvers against
dopri5 ground truth (how curved the trajectories are).

Writes OUT/<model>.safetensors (EMA weights), OUT/<model>.json (recipe, losses, wall time,
test loss, sample statistics), FIGURES/<model>-loss.png and FIGURES/<model>-samples*.png.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

import bns
from bns.models import fmnist


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, choices=sorted(fmnist.RECIPES))
    p.add_argument("--steps", type=int, default=20000)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=200, help="steps of linear lr warm-up")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--data", type=Path, default=fmnist.DATA_DIR)
    p.add_argument("--limit", type=int, default=None, help="use only the first N train images")
    p.add_argument("--out", type=Path, default=None, help="folder for weights and JSON")
    p.add_argument("--measure", action="store_true", help="measure the shipped model, no training")
    p.add_argument("--weights", type=Path, default=None, help="weights for --measure")
    p.add_argument("--figures", type=Path, default=None, help="folder for PNGs (default: --out)")
    p.add_argument("--guidance", default="1,2", help="guidance scales of the sample grids")
    p.add_argument("--grid-steps", type=int, default=50, help="midpoint steps of the grids")
    p.add_argument("--log-every", type=int, default=200)
    return p.parse_args(argv)


@torch.no_grad()
def test_loss(model: bns.Model, images: torch.Tensor, labels: torch.Tensor, seed: int = 0) -> float:
    """The training loss on fixed test images, noise and times (labels kept)."""
    g = torch.Generator().manual_seed(seed)
    y = labels if model.num_classes is not None else None
    total = 0.0
    for i in range(0, images.shape[0], 500):
        loss = fmnist.training_loss(
            model, images[i : i + 500], None if y is None else y[i : i + 500], g
        )
        total += float(loss) * images[i : i + 500].shape[0]
    return total / images.shape[0]


@torch.no_grad()
def sample_grid(model: bns.Model, steps: int, guidance: float, seed: int = 0) -> torch.Tensor:
    """100 samples (10 per class for a conditional model) by midpoint on ``steps`` steps."""
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(100, *model.sample_shape, generator=g)
    y = torch.arange(10).repeat_interleave(10) if model.num_classes is not None else None
    solver = bns.solvers.midpoint(bns.grids.uniform(steps, model.t_range))
    return bns.sample(model, x0, solver, y=y, guidance=guidance)


def save_png_grid(x: torch.Tensor, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = int(x.shape[0] ** 0.5)
    img = (
        x[: n * n, 0].clamp(-1, 1).reshape(n, n, 28, 28).permute(0, 2, 1, 3).reshape(n * 28, n * 28)
    )
    fig, ax = plt.subplots(figsize=(5, 5.3))
    ax.imshow(img.numpy(), cmap="gray", vmin=-1, vmax=1)
    ax.set_title(title, fontsize=9)
    ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def save_loss_curve(losses: list[float], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = torch.tensor(losses)
    k = max(1, len(losses) // 200)
    smooth = x[: len(x) // k * k].reshape(-1, k).mean(1)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(range(len(losses)), losses, color="0.8", lw=0.5, label="per step")
    ax.plot([(i + 0.5) * k for i in range(len(smooth))], smooth, color="C0", label=f"mean of {k}")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (MSE)")
    ax.set_title(title, fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def measure(name: str, weights: Path | None, n: int = 32) -> None:
    """Print forward time per sample and 8-NFE solver PSNR against dopri5 (``n`` samples)."""
    model = fmnist.build_model(name, fmnist.load_net(name, weights))
    net = model.net
    print(f"{name}: {sum(p.numel() for p in net.parameters())} parameters")
    x, t = torch.randn(256, 1, 28, 28), torch.rand(256)
    y = torch.randint(0, 11, (256,)) if model.num_classes else None
    for threads in (1, 2):
        torch.set_num_threads(threads)
        with torch.no_grad():
            for _ in range(3):
                net(x, t, y)
            best = float("inf")
            for _ in range(5):
                t0 = time.perf_counter()
                net(x, t, y)
                best = min(best, time.perf_counter() - t0)
        print(
            f"  {threads} thread(s): forward {best / 256 * 1e3:.3f} ms/sample (batch 256, best of 5)"
        )
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(n, *model.sample_shape, generator=g)
    y = torch.arange(n) % 10 if model.num_classes else None
    S, grids, sched = bns.solvers, bns.grids, model.schedule
    inner = (max(model.t_range[0], 1e-3), min(model.t_range[1], 1 - 1e-3))  # finite log-SNR
    solvers = {
        "euler 8": S.euler(grids.uniform(8, model.t_range)),
        "midpoint 4 steps": S.midpoint(grids.uniform(4, model.t_range)),
        "ddim 8": S.ddim(grids.uniform(8, model.t_range), sched),
        "dpm++2m 8 log-snr": S.dpm_solver_pp(grids.logsnr(8, sched, inner), sched, 2),
        "euler 100": S.euler(grids.uniform(100, model.t_range)),
        "midpoint 50 steps": S.midpoint(grids.uniform(50, model.t_range)),
    }
    for w in (1.0, 2.0) if model.num_classes else (1.0,):
        gt, stats = bns.ground_truth(model, x0, y, w, return_stats=True)
        print(f"  guidance {w:g}: dopri5 {stats['nfe']} evaluations")
        for label, solver in solvers.items():
            with torch.no_grad():
                p = bns.metrics.psnr(bns.sample(model, x0, solver, y, w).double(), gt)
            print(
                f"    {label:20s} NFE {solver.nfe:3d}  PSNR {float(p.mean()):6.2f} +- {float(p.std()):.2f}"
            )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.measure:
        try:
            measure(args.model, args.weights)
        except fmnist.WeightsError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        return 0
    if args.out is None:
        print("error: --out DIR is needed to train", file=sys.stderr)
        return 2
    figures = args.figures or args.out
    try:
        images, labels = fmnist.load_fashion_mnist(args.data, "train", args.limit)
        test_images, test_labels = fmnist.load_fashion_mnist(args.data, "test", 2000)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{args.model}: {images.shape[0]} train images, {args.steps} steps", flush=True)

    result = fmnist.train(
        args.model,
        images,
        labels,
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        seed=args.seed,
        warmup=args.warmup,
        log_every=args.log_every,
        log=lambda s: print(s, flush=True),
    )
    args.out.mkdir(parents=True, exist_ok=True)
    figures.mkdir(parents=True, exist_ok=True)
    weights = fmnist.save_net(result.ema, args.model, args.out / f"{args.model}.safetensors")
    model = fmnist.build_model(args.model, fmnist.load_net(args.model, weights))
    fresh = fmnist.build_model(args.model)

    t0 = time.perf_counter()
    grids = {}
    for w in (float(v) for v in args.guidance.split(",")):
        if model.num_classes is None and w != 1.0:
            continue
        x = sample_grid(model, args.grid_steps, w)
        grids[w] = x
        suffix = "" if w == 1.0 else f"-w{w:g}"
        kind = "rows: classes 0-9" if model.num_classes is not None else "unconditional"
        save_png_grid(
            x,
            figures / f"{args.model}-samples{suffix}.png",
            f"{args.model}, midpoint {args.grid_steps} steps (NFE {2 * args.grid_steps}), "
            f"guidance {w:g}, {kind}",
        )
    sample_s = time.perf_counter() - t0
    n = len(result.losses)
    tail = result.losses[-min(500, n) :]
    info = {
        "recipe": result.recipe,
        "command": "python scripts/train_fmnist.py "
        + " ".join(sys.argv[1:] if argv is None else argv),
        "fingerprint": model.fingerprint(),
        "parameters": sum(p.numel() for p in result.ema.parameters()),
        "final_train_loss": sum(tail) / len(tail),
        "final_train_loss_window": len(tail),
        "test_loss_ema": test_loss(model, test_images, test_labels),
        "test_loss_untrained": test_loss(fresh, test_images, test_labels),
        "test_images": int(test_images.shape[0]),
        "wall_time_s": round(result.wall_s, 1),
        "steps_per_s": round(n / result.wall_s, 3),
        "threads": args.threads,
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch thread(s), torch {torch.__version__}",
        "sample_stats": {
            f"guidance {w:g}": {"mean": float(x.mean()), "std": float(x.std())}
            for w, x in grids.items()
        },
        "data_stats": {"mean": float(images.mean()), "std": float(images.std())},
        "sample_grid_s": round(sample_s, 1),
        "loss_log_every_100": [
            sum(result.losses[i : i + 100]) / len(result.losses[i : i + 100])
            for i in range(0, n, 100)
        ],
    }
    (args.out / f"{args.model}.json").write_text(json.dumps(info, indent=1) + "\n")
    save_loss_curve(
        result.losses,
        figures / f"{args.model}-loss.png",
        f"{args.model}: {n} steps, batch {args.batch_size}, {result.wall_s / 60:.0f} min",
    )
    print(json.dumps({k: v for k, v in info.items() if k != "loss_log_every_100"}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
