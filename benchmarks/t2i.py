"""Text-to-image benchmark: BNS against the pipeline's own scheduler and the classical NS solvers,
on held-out prompts, inside a diffusers text pipeline.

    python benchmarks/t2i.py --family sd3 --nfe 4,8,16 --guidance 2,6.5
    python benchmarks/t2i.py --tiny          # seconds: what the test suite runs

The pipeline is built offline from random components (``bns.integrations.diffusers.tiny``):
nothing is downloaded, so this runs anywhere, CI included. Its velocity field is random, so the
numbers measure the machinery on a real pipeline (its text encoders, guidance, schedulers and
call), not image quality. Prompts are split 60/20/20 into train / validation / test; BNS trains
on the training prompts and every PSNR is on the test prompts (held out), against the adaptive
ground truth on the same noise. The pipeline's default scheduler runs in the pipeline's own
``__call__`` (with ``latents=`` the same noise); the time per image is the wall time of that
call with the pipeline's scheduler and with ``BNSScheduler``. Writes
``benchmarks/results/t2i_<family>.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import torch
from quality import RESULTS, machine

from bns.classical import best_classical
from bns.cli import split_prompts
from bns.evaluate import evaluate
from bns.integrations.diffusers import BNSScheduler, model_from_pipeline
from bns.integrations.diffusers.tiny import tiny_pipeline
from bns.metrics import psnr
from bns.pairs import make_pairs
from bns.solvers.ends import resolve_end
from bns.train import distill

# Prompts in the tiny tokenizers' alphabet (lower-case words).
SUBJECTS = ["cat", "dog", "fox", "owl", "cow", "bee", "elk", "yak", "ram", "hen", "gnu", "emu"]
STYLES = ["a red", "a small", "a happy", "an old"]
FAMILIES = ("sd", "sd3")  # text pipelines called with guidance_scale (diffusers' CFG)


def prompts(n: int) -> list[str]:
    out = [f"{s} {x}" for x in SUBJECTS for s in STYLES]
    return out[:n]


def _pipeline_latents(pipe, scheduler, texts, x0, w, nfe, size) -> tuple[torch.Tensor, float]:
    """The pipeline's own call with ``scheduler`` on ``x0``; (latents, seconds)."""
    old = pipe.scheduler
    pipe.scheduler = scheduler
    call = dict(
        negative_prompt=[""] * len(texts),
        guidance_scale=w,
        num_inference_steps=nfe,
        height=size,
        width=size,
        output_type="latent",
    )
    try:
        with torch.no_grad():
            pipe(
                prompt=texts[:1], latents=x0[:1].to(pipe.dtype), **{**call, "negative_prompt": [""]}
            )
            t0 = time.perf_counter()  # after one warm-up call
            out = pipe(prompt=texts, latents=x0.to(pipe.dtype), **call).images
        return out, time.perf_counter() - t0
    finally:
        pipe.scheduler = old


def run(args: argparse.Namespace) -> dict:
    torch.manual_seed(0)
    folder = Path(tempfile.mkdtemp(prefix="bns-t2i-"))
    pipe = tiny_pipeline(args.family, folder)
    pipe.set_progress_bar_config(disable=True)
    splits = split_prompts(prompts(args.prompts), seed=0)
    model = model_from_pipeline(pipe, prompts=splits, negative_prompt="")
    texts = splits["train"] + splits["val"] + splits["test"]
    size = model.sample_shape[-1] * pipe.vae_scale_factor
    end = resolve_end(model, "auto")  # a DDPM-style pipeline ends on the data (sigma = 0)
    default = pipe.scheduler
    rows, summary = [], []
    for w in args.guidance:
        kw = dict(guidance=w, progress=False, batch_size=args.gt_batch, end=end, rtol=args.rtol)
        train = make_pairs(model, args.train_pairs, "train", **kw)
        val = make_pairs(model, args.val_pairs, "val", **kw)
        test = make_pairs(model, args.test_pairs, "test", **kw)
        seen = make_pairs(model, args.test_pairs, "test", labels="train", **kw)
        for nfe in args.nfe:
            t0 = time.perf_counter()
            solver, hist = distill(
                model,
                nfe,
                guidance=w,
                pairs=(train, val),
                adam_steps=args.steps,
                batch_size=min(args.batch_size, len(train)),
                init_pairs=min(128, len(val)),
                progress=False,
            )
            t_distill = time.perf_counter() - t0
            entries = [
                ("bns", nfe, solver),
                *best_classical(model, [nfe], val[:64], guidance=w, end=end),
            ]
            res = evaluate(model, entries, test, w, kinds={"bns": "bns"}, progress=False)
            res_seen = evaluate(model, entries[:1], seen, w, kinds={"bns": "bns"}, progress=False)
            classical = max((r for r in res if r["kind"] != "bns"), key=lambda r: r["psnr_mean"])
            ours = next(r for r in res if r["kind"] == "bns")
            # The pipeline's own scheduler and BNSScheduler inside the pipeline's call.
            batch = [texts[int(i)] for i in test.y]
            stock, t_stock = _pipeline_latents(pipe, default, batch, test.x0, w, nfe, size)
            bns_sched = BNSScheduler.from_solver(solver, default)
            mine, t_bns = _pipeline_latents(pipe, bns_sched, batch, test.x0, w, nfe, size)
            ref = test.x1.to(stock.dtype)
            p_stock = float(psnr(stock.float(), ref.float()).mean())
            p_bns_pipe = float(psnr(mine.float(), ref.float()).mean())
            row = {
                "guidance": w,
                "nfe": nfe,
                "bns": ours["psnr_mean"],
                "bns_in_pipeline": p_bns_pipe,
                "bns_on_training_prompts": res_seen[0]["psnr_mean"],
                "bns_init": solver.meta["init"],
                "best_classical": classical["solver"],
                "best_classical_psnr": classical["psnr_mean"],
                "pipeline_scheduler": type(default).__name__,
                "pipeline_scheduler_psnr": p_stock,
                "s_per_image_pipeline_scheduler": t_stock / len(test),
                "s_per_image_bns": t_bns / len(test),
                "distill_s": round(t_distill, 1),
                "best_step": hist["best_step"],
            }
            rows.append(row)
            summary.append({k: v for k, v in row.items() if not isinstance(v, list)})
            print(json.dumps(row), file=sys.stderr)
    return {
        "family": args.family,
        "pipeline": type(pipe).__name__,
        "denoiser_parameters": sum(p.numel() for p in model.modules[0].parameters()),
        "sample_shape": list(model.sample_shape),
        "end": end,
        "prompts": {k: len(v) for k, v in splits.items()},
        "ground_truth_nfe_per_sample": train.nfe_per_sample if rows else math.nan,
        "rows": rows,
        "protocol": {
            "train_pairs": args.train_pairs,
            "val_pairs": args.val_pairs,
            "test_pairs": args.test_pairs,
            "steps": args.steps,
            "batch_size": args.batch_size,
            **({} if args.rtol is None else {"ground_truth_rtol": args.rtol}),
        },
        "machine": machine(),
        "command": " ".join(["python", "benchmarks/t2i.py", *sys.argv[1:]]),
    }


def table(res: dict) -> str:
    lines = [
        f"### {res['pipeline']} (tiny, random weights, offline): PSNR (dB) on held-out prompts",
        "",
        f"{res['prompts']} prompts; {res['protocol']}; latents {res['sample_shape']}.",
        "",
        "| guidance | NFE | BNS | BNS in the pipeline | BNS, training prompts | best classical NS |"
        " pipeline's scheduler | s/image (pipeline's / BNS) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in res["rows"]:
        lines.append(
            f"| {r['guidance']:g} | {r['nfe']} | {r['bns']:.2f} | {r['bns_in_pipeline']:.2f} |"
            f" {r['bns_on_training_prompts']:.2f} | {r['best_classical']}"
            f" {r['best_classical_psnr']:.2f} | {r['pipeline_scheduler']}"
            f" {r['pipeline_scheduler_psnr']:.2f} | {r['s_per_image_pipeline_scheduler']:.4f} /"
            f" {r['s_per_image_bns']:.4f} |"
        )
    lines += ["", f"Machine: {res['machine']}. Command: `{res['command']}`.", ""]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--family", default="sd3", choices=FAMILIES)
    p.add_argument("--nfe", type=lambda s: [int(v) for v in s.split(",")], default=[4, 8, 16])
    p.add_argument(
        "--guidance", type=lambda s: [float(v) for v in s.split(",")], default=[2.0, 6.5]
    )
    p.add_argument("--prompts", type=int, default=40)
    p.add_argument("--train-pairs", type=int, default=256)
    p.add_argument("--val-pairs", type=int, default=128)
    p.add_argument("--test-pairs", type=int, default=128)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=24)
    p.add_argument("--gt-batch", type=int, default=64)
    p.add_argument(
        "--rtol",
        type=float,
        default=None,
        help="ground-truth tolerance (default: bns's for the network's dtype)",
    )
    p.add_argument("--tiny", action="store_true", help="toy sizes (seconds), for the tests")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args()
    if args.tiny:
        args.nfe, args.guidance, args.prompts = [4], [2.0], 10
        args.train_pairs = args.val_pairs = args.test_pairs = 8
        args.steps, args.batch_size = 3, 8
        # a smoke test of the machinery, not a measurement: at bns's float32 default the
        # ground truth of the random network takes ~300 evaluations a pair, at 1e-3 ~30
        args.rtol = 1e-3 if args.rtol is None else args.rtol
    res = run(args)
    stem = f"t2i_{args.family}" + ("_tiny" if args.tiny else "")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{stem}.json").write_text(json.dumps(res, indent=1) + "\n")
    (args.out / f"{stem}.md").write_text(table(res))
    print(table(res))


if __name__ == "__main__":
    main()
