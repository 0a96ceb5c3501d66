"""GPU benchmark: ground-truth throughput, distillation step time and memory, BNS vs Euler
sampling time and (with ``--protocol``) the paper's full protocol, in one run.

    PYTHONPATH=src python benchmarks/gpu.py                       # cuda if available, else cpu
    PYTHONPATH=src python benchmarks/gpu.py --protocol --nfe 4,6,8,10,12,16
    PYTHONPATH=src python benchmarks/gpu.py --tiny --device cpu --out /tmp/gpu-tiny

Writes ``gpu_<device>.json`` and ``.md`` (``gpu_<device>_tiny.*`` with ``--tiny``) to ``--out``
(default ``benchmarks/results``), after every section, so a run cut short keeps what it measured.
Sections:

- ground truth: pairs/s and network forwards/s of the adaptive dopri5 solve (fmnist-cfg, guided,
  rtol = atol = 1e-5, no cache) at each ``--gt-batch-size``;
- distillation step: the time and peak memory of one loss-and-gradient pass of the BNS family
  (what every step of ``bns.distill`` runs) at NFE 8 and 16, without and with per-step gradient
  checkpointing and micro-batching, on fmnist-cfg and on a ~25M-parameter 64x64x3
  class-conditional U-Net with random weights (``TinyUNet``), batch 32;
- sampling: an NS solver with dense coefficients (the cost of any trained BNS solver) through
  ``bns.sample`` against a plain Euler loop at the same NFE, interleaved repeats, medians;
- protocol (``--protocol``): 520 train / 1024 val / 1024 test pairs, the default optimizer with
  patience, ``init="best"``; per (model, guidance, NFE) the BNS test PSNR, the best classical
  solver at NFE and at 2 x NFE, and the wall time including all the ground truth.

``--tiny`` runs everything at toy sizes (seconds on a CPU): a smoke test of the script. Targets
(pass/fail judged on a GPU at full sizes only): the protocol at NFE 8 on fmnist-cfg in under 60 s including
ground truth; the 25M U-Net at NFE 16, batch 32, under 8 GB with checkpointing; BNS sampling
within 1% of Euler's time.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import re
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from cost import _dense_solver, euler_loop, md_head, md_table, sampling_inputs, time_interleaved
from torch import nn

import bns
from bns.evaluate import baseline_solvers, best_rows, evaluate
from bns.families import make_family
from bns.loss import loss_and_grad
from bns.model import frozen
from bns.models.unet import TinyUNet, UNetConfig
from bns.pairs import Pairs, make_pairs
from bns.schedules import CondOT
from bns.solvers import initial_solver
from bns.specs import load_model

RESULTS = Path(__file__).parent / "results"

# 24.6M parameters: blocks at 32x32 (256 channels) and 16x16 (384), a stem at 64x64 (128).
UNET_25M = UNetConfig(
    in_channels=3, channels=(128, 256, 384), blocks=2, emb_dim=512, num_classes=1000
)
UNET_TINY = UNetConfig(in_channels=3, channels=(8, 16), blocks=1, emb_dim=16, num_classes=10)


@dataclass
class Sizes:
    """How much of everything a run measures."""

    gt_pairs: int = 1024
    gt_batches: tuple[int, ...] = (128, 1024)
    step_batch: int = 32
    micro_batch: int = 8
    step_repeats: int = 3
    step_nfes: tuple[int, ...] = (8, 16)
    sample_batch: dict[str, int] = field(default_factory=lambda: {"fmnist-cfg": 256, "unet": 32})
    sample_repeats: int = 20
    unet: UNetConfig = UNET_25M
    train_pairs: int = 520
    val_pairs: int = 1024
    test_pairs: int = 1024
    steps: int | None = None  # None: bns's default optimizer (Gauss-Newton steps)
    patience: int = 20


TINY = Sizes(
    gt_pairs=2,
    gt_batches=(2,),
    step_batch=2,
    micro_batch=1,
    step_repeats=1,
    sample_batch={"fmnist-cfg": 2, "unet": 2},
    sample_repeats=3,
    unet=UNET_TINY,
    train_pairs=2,
    val_pairs=2,
    test_pairs=2,
    steps=2,
    patience=1,
)


def _steps_text(steps: int | None) -> str:
    return "the default optimizer" if steps is None else f"up to {steps} Adam steps"


class Clock:
    """Wall time that waits for the device's queued work before each reading."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def __call__(self) -> float:
        self.sync()
        return time.perf_counter()


def unet_model(config: UNetConfig, device: torch.device, seed: int = 0) -> bns.Model:
    """A class-conditional velocity U-Net on 64x64x3 with random weights everywhere (its
    zero-initialized output layers too, so every layer does real work)."""
    torch.manual_seed(seed)
    net = TinyUNet(config)
    with torch.no_grad():
        for p in net.parameters():
            if p.dim() > 1 and not p.any():
                nn.init.normal_(p, std=0.02)
    n = sum(p.numel() for p in net.parameters())
    return bns.Model(
        net,
        prediction="velocity",
        schedule=CondOT(),
        sample_shape=(3, 64, 64),
        num_classes=config.num_classes,
        name=f"unet-{n / 1e6:.1f}M" if n >= 1e5 else f"unet-{n / 1e3:.0f}k",
    ).to(device)


def _mem_reset(device: torch.device) -> int | None:
    if device.type != "cuda":
        return None
    torch.cuda.reset_peak_memory_stats(device)
    return torch.cuda.memory_allocated(device)


def _gb(n: int | None) -> float | None:
    return None if n is None else n / 1e9


# -- sections ---------------------------------------------------------------------------------


def ground_truth_section(model, guidance, sizes: Sizes, clock: Clock) -> list[dict]:
    rows = []
    for batch in sizes.gt_batches:
        f0, t0 = model.forwards, clock()
        pairs = make_pairs(
            model,
            sizes.gt_pairs,
            "test",
            seed=777,
            guidance=guidance,
            batch_size=batch,
            cache=False,
            progress=False,
        )
        s = clock() - t0
        rows.append(
            {
                "model": model.name,
                "guidance": guidance,
                "pairs": sizes.gt_pairs,
                "batch": batch,
                "seconds": s,
                "pairs_per_s": sizes.gt_pairs / s,
                "forwards_per_s": (model.forwards - f0) / s,
                "nfe_per_sample": pairs.nfe_per_sample,
            }
        )
        print(f"ground truth: {rows[-1]}", file=sys.stderr)
    return rows


def step_cost(model, guidance, nfe, batch, micro, checkpoint, repeats, clock) -> dict:
    """Time and peak memory of the loss-and-gradient pass of one distillation step."""
    device = clock.device
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn((batch, *model.sample_shape), generator=g)
    y = torch.arange(batch) % model.num_classes if model.num_classes else None
    pairs = Pairs(x0, torch.randn(x0.shape, generator=g), y).to(device)
    family = make_family("bns", initial_solver(model, nfe, "midpoint"))
    row: dict[str, Any] = {"model": model.name, "nfe": nfe, "batch": batch}
    row.update(guidance=guidance, micro_batch=micro, checkpoint=checkpoint)

    def step():
        return loss_and_grad(
            family, model, pairs, guidance, micro_batch=micro, checkpoint=checkpoint
        )

    try:
        with frozen(model):
            step()  # warm-up (kernel selection, allocator)
            base = _mem_reset(device)
            times, f0 = [], model.forwards
            for _ in range(repeats):
                t0 = clock()
                loss, _ = step()
                times.append(clock() - t0)
    except torch.cuda.OutOfMemoryError:
        torch.cuda.empty_cache()
        return {**row, "error": "out of memory"}
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    s = statistics.median(times)
    row.update(seconds=s, forwards_per_s=(model.forwards - f0) / sum(times), loss=loss)
    row.update(peak_gb=_gb(peak), added_gb=_gb(None if peak is None else peak - base))
    return row


def distill_step_section(models, guidance, sizes: Sizes, clock: Clock) -> list[dict]:
    variants = [(0, False), (0, True), (sizes.micro_batch, False), (sizes.micro_batch, True)]
    rows = []
    for model in models:
        for nfe in sizes.step_nfes:
            for micro, ck in variants:
                r = step_cost(
                    model, guidance, nfe, sizes.step_batch, micro, ck, sizes.step_repeats, clock
                )
                rows.append(r)
                print(f"distill step: {r}", file=sys.stderr)
    return rows


def sampling_section(models, guidance, sizes: Sizes, clock: Clock) -> list[dict]:
    rows = []
    for model in models:
        kind = "unet" if model.name.startswith("unet") else "fmnist-cfg"
        batch = sizes.sample_batch[kind]
        x0, y = sampling_inputs(model, batch, clock.device)
        for nfe in (8, 16):
            fns = _samplers(model, x0, y, nfe, guidance)
            t = time_interleaved(fns, sizes.sample_repeats, clock.sync)
            b, e = statistics.median(t["bns"]), statistics.median(t["euler"])
            rows.append(
                {
                    "model": model.name,
                    "guidance": guidance,
                    "nfe": nfe,
                    "batch": batch,
                    "repeats": sizes.sample_repeats,
                    "bns_s": b,
                    "euler_s": e,
                    "ratio": b / e,
                }
            )
            print(f"sampling: {rows[-1]}", file=sys.stderr)
    return rows


def _samplers(model, x0, y, nfe, guidance) -> dict:
    """BNS (a dense NS solver through ``bns.sample``) and a plain Euler loop at ``nfe``."""
    ns = _dense_solver(model, nfe)
    return {
        "bns": lambda: bns.sample(model, x0, ns, y, guidance),
        "euler": lambda: euler_loop(model, x0, nfe, y, guidance),
    }


def protocol_section(specs, nfes, sizes: Sizes, clock: Clock, deadline: float) -> list[dict]:
    """The paper's protocol per (model, guidance): ground truth for the three splits, then per
    NFE distillation from the best classical solver and the test PSNR of it and of every
    classical solver at NFE and 2 x NFE."""
    rows = []
    for spec in specs:
        name, _, g = spec.partition(":")
        guidance = float(g or 1.0)
        if time.perf_counter() > deadline:
            rows.append({"model": name, "guidance": guidance, "skipped": "time budget"})
            continue
        model = load_model(name).to(clock.device)
        kw = dict(seed=0, guidance=guidance, cache=False, progress=False)
        t0 = clock()
        train = make_pairs(model, sizes.train_pairs, "train", **kw)
        val = make_pairs(model, sizes.val_pairs, "val", **kw)
        test = make_pairs(model, sizes.test_pairs, "test", **kw)
        gt_s = clock() - t0
        for nfe in nfes:
            if time.perf_counter() > deadline:
                rows.append(
                    {"model": name, "guidance": guidance, "nfe": nfe, "skipped": "time budget"}
                )
                continue
            t1 = clock()
            solver, hist = bns.distill(
                model,
                nfe,
                guidance=guidance,
                pairs=(train, val),
                steps=sizes.steps,
                patience=sizes.patience,
                progress=False,
            )
            distill_s = clock() - t1
            entries = [("bns", nfe, solver), *baseline_solvers(model, [nfe, 2 * nfe])]
            res = evaluate(model, entries, test, guidance, kinds={"bns": "bns"})
            eval_s = clock() - t1 - distill_s
            best = best_rows(res)
            row = {
                "model": name,
                "guidance": guidance,
                "nfe": nfe,
                "bns_psnr": best_rows(res, "bns")[nfe]["psnr_mean"],
                "init": solver.meta["init"],
                "best_classical": _best(best.get(nfe)),
                "best_classical_2nfe": _best(best.get(2 * nfe)),
                "steps_run": hist["steps_run"],
                "best_step": hist["best_step"],
                "ground_truth_s": gt_s,
                "ground_truth_nfe_per_sample": train.nfe_per_sample,
                "distill_s": distill_s,
                "eval_s": eval_s,
                "wall_s": gt_s + distill_s + eval_s,
                "pairs": [len(train), len(val), len(test)],
            }
            rows.append(row)
            print(f"protocol: {row}", file=sys.stderr)
    return rows


def _best(row: dict | None) -> dict | None:
    return None if row is None else {"solver": row["solver"], "psnr": row["psnr_mean"]}


# -- targets and report -----------------------------------------------------------------------


def targets(res: dict) -> dict[str, dict]:
    """Each target's measured value and whether it passes (None: not measured or not a GPU)."""
    judged = res["device"]["type"] == "cuda" and not res["tiny"]  # sizes the targets name
    out = {}
    walls = [
        r["wall_s"]
        for r in res.get("protocol", [])
        if r.get("model") == "fmnist-cfg" and r.get("nfe") == 8 and "wall_s" in r
    ]
    out["protocol_nfe8_fmnist_cfg_under_60s"] = (max(walls) if walls else None, 60.0, "s")
    mem = [
        r.get("peak_gb")
        for r in res.get("distill_step", [])
        if r["model"].startswith("unet")
        and r["nfe"] == 16
        and r["checkpoint"]
        and r["micro_batch"] == 0
    ]
    out["unet_nfe16_batch32_checkpoint_under_8gb"] = (mem[0] if mem else None, 8.0, "GB")
    ratios = [r["ratio"] for r in res.get("sampling", [])]
    out["bns_sampling_within_1pct_of_euler"] = (max(ratios) if ratios else None, 1.01, "x")
    return {
        k: {
            "value": v,
            "limit": lim,
            "unit": unit,
            "pass": (v < lim if k.endswith("60s") else v <= lim)
            if judged and v is not None
            else None,
        }
        for k, (v, lim, unit) in out.items()
    }


def _f(v: Any, fmt: str = ".3g") -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return format(v, fmt)
    return str(v)


def _protocol_cells(r: dict) -> list:
    head = [r["model"], f"{r['guidance']:g}", r.get("nfe", "")]
    if "skipped" in r:
        return head + ["skipped"] + [""] * 7
    c1, c2 = (
        "" if c is None else f"{c['solver']} {c['psnr']:.2f}"
        for c in (r["best_classical"], r["best_classical_2nfe"])
    )
    times = [f"{r[k]:.1f}" for k in ("ground_truth_s", "distill_s", "wall_s")]
    steps = f"{r['steps_run']} ({r['best_step']})"
    return head + [f"{r['bns_psnr']:.2f}", r["init"], c1, c2, steps] + times


def markdown(res: dict) -> str:
    name, tiny = res["device"]["name"], " (tiny sizes)" if res["tiny"] else ""
    lines = md_head(
        f"GPU benchmark on {name}{tiny}",
        f"Device: {name} ({res['device']['type']}), torch {res['torch']}, {res['machine']}."
        f"\nCommand: `{res['command']}`.",
    )
    lines += md_table(
        ["ground truth (dopri5, 1e-5)", "guidance", "pairs", "batch", "s", "pairs/s"]
        + ["forwards/s", "NFE/sample"],
        [
            [r["model"], f"{r['guidance']:g}", r["pairs"], r["batch"], f"{r['seconds']:.2f}"]
            + [
                f"{r['pairs_per_s']:.1f}",
                f"{r['forwards_per_s']:.0f}",
                f"{r['nfe_per_sample']:.1f}",
            ]
            for r in res.get("ground_truth", [])
        ],
    )
    lines += md_table(
        ["distillation step (loss + gradient)", "NFE", "batch", "micro-batch", "checkpoint"]
        + ["s/step", "peak GB", "added GB"],
        [
            [r["model"], r["nfe"], r["batch"], r["micro_batch"] or "-"]
            + ["yes" if r["checkpoint"] else "no"]
            + (
                [r["error"], "", ""]
                if "error" in r
                else [f"{r['seconds']:.4f}", _f(r["peak_gb"]), _f(r["added_gb"])]
            )
            for r in res.get("distill_step", [])
        ],
    )
    lines += md_table(
        ["sampling (median)", "NFE", "batch", "BNS (NSSolver) s", "Euler loop s", "BNS / Euler"],
        [
            [f"{r['model']} (guidance {r['guidance']:g})", r["nfe"], r["batch"]]
            + [f"{r['bns_s']:.5f}", f"{r['euler_s']:.5f}", f"{r['ratio']:.4f}"]
            for r in res.get("sampling", [])
        ],
    )
    if res.get("protocol"):
        lines += md_table(
            ["protocol", "guidance", "NFE", "BNS", "init", "best classical"]
            + ["best classical at 2 NFE", "steps (best)", "ground truth s", "distill s"]
            + ["wall s incl. GT"],
            [_protocol_cells(r) for r in res["protocol"]],
        )
        p = res["sizes"]
        lines += [
            f"Protocol: {p['train_pairs']} train / {p['val_pairs']} val / {p['test_pairs']}"
            f" test pairs, {_steps_text(p['steps'])}, patience {p['patience']} validations,"
            " init best; PSNR in dB against dopri5 on the test pairs; ground truth counts all"
            " three splits.",
            "",
        ]
    verdict = {True: "pass", False: "FAIL", None: "not checked"}
    lines += md_table(
        ["target", "measured", "limit", "pass"],
        [
            [k, f"{_f(t['value'], '.4g')} {t['unit']}", f"{t['limit']:g}", verdict[t["pass"]]]
            for k, t in res["targets"].items()
        ],
    )
    return "\n".join(lines) + "\n"


def _device_info(device: torch.device) -> dict:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        mem = torch.cuda.get_device_properties(device).total_memory / 1e9
        return {"type": "cuda", "name": name, "memory_gb": mem}
    return {"type": "cpu", "name": "cpu", "threads": torch.get_num_threads()}


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tiny", action="store_true", help="toy sizes: a smoke test (CPU, seconds)")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--guidance", type=float, default=2.0, help="guidance of the cost sections")
    p.add_argument(
        "--sections", default="ground_truth,distill_step,sampling", help="comma-separated"
    )
    p.add_argument("--protocol", action="store_true", help="also run the full protocol")
    p.add_argument(
        "--protocol-models",
        default="fmnist-cfg:1,fmnist-cfg:2,fmnist-cfg:4,fmnist-vp:1",
        help="MODEL:GUIDANCE,...",
    )
    p.add_argument(
        "--nfe", type=lambda s: [int(v) for v in s.split(",")], default=[4, 6, 8, 10, 12, 16]
    )
    p.add_argument("--budget-s", type=float, default=math.inf, help="skip protocol runs after")
    args = p.parse_args(argv)
    start = time.perf_counter()
    device = torch.device(args.device)
    sizes = TINY if args.tiny else Sizes()
    clock = Clock(device)
    info = _device_info(device)
    res: dict[str, Any] = {
        "device": info,
        "torch": torch.__version__,
        "machine": f"{platform.machine()}, {torch.get_num_threads()} CPU threads",
        "command": " ".join(
            ["python", "benchmarks/gpu.py", *(sys.argv[1:] if argv is None else argv)]
        ),
        "tiny": args.tiny,
        "sizes": {k: v for k, v in asdict(sizes).items() if k != "unet"},
        "unet_config": sizes.unet.to_dict(),
    }
    if device.type == "cuda":
        res["tf32"] = {
            "matmul": torch.backends.cuda.matmul.allow_tf32,
            "cudnn": torch.backends.cudnn.allow_tf32,
        }
    stem = f"gpu_{_slug(info['name'])}{'_tiny' if args.tiny else ''}"
    args.out.mkdir(parents=True, exist_ok=True)

    def write() -> None:
        res["targets"] = targets(res)
        res["total_s"] = time.perf_counter() - start
        (args.out / f"{stem}.json").write_text(json.dumps(res, indent=1) + "\n")
        (args.out / f"{stem}.md").write_text(markdown(res))

    sections = args.sections.split(",") if args.sections else []
    fmnist = load_model("fmnist-cfg").to(device)
    unet = unet_model(sizes.unet, device)
    res["unet_params"] = sum(p.numel() for p in unet.net.parameters())
    if "ground_truth" in sections:
        res["ground_truth"] = ground_truth_section(fmnist, args.guidance, sizes, clock)
        write()
    if "distill_step" in sections:
        res["distill_step"] = distill_step_section([fmnist, unet], args.guidance, sizes, clock)
        write()
    if "sampling" in sections:
        res["sampling"] = sampling_section([fmnist, unet], args.guidance, sizes, clock)
        write()
    if args.protocol:
        specs = args.protocol_models.split(",")
        deadline = start + args.budget_s
        res["protocol"] = protocol_section(specs, args.nfe, sizes, clock, deadline)
    write()
    text = markdown(res)
    print(text)
    print(f"wrote {args.out / stem}.json and .md ({res['total_s']:.1f} s)", file=sys.stderr)
    return res


if __name__ == "__main__":
    main()
