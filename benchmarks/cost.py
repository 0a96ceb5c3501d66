"""Cost benchmark: ground truth, distillation, sampling overhead and distillation memory.

    python benchmarks/cost.py --model fmnist-cfg --guidance 2

Writes ``benchmarks/results/cost_<model>.json`` and ``.md``:
- ground truth: wall time and NFE per sample of the adaptive dopri5 solve;
- distillation: wall time and network forwards for ``--steps`` steps at NFE 8 (from midpoint);
- sampling: an NS solver with dense coefficients through ``bns.sample`` vs a plain Euler loop
  at the same NFE on the same model, timed interleaved in one run (median of repeats);
- memory: peak resident memory added by distillation steps at NFE 4, 8, 16 with and without
  per-step gradient checkpointing, each in a fresh subprocess (ru_maxrss).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

import bns
from bns.pairs import make_pairs
from bns.specs import load_model
from bns.train import distill

RESULTS = Path(__file__).parent / "results"


def _dense_solver(model, nfe: int) -> bns.NSSolver:
    """A midpoint solver with every coefficient perturbed off zero: the cost of a trained BNS."""
    s = bns.solvers.midpoint(bns.grids.uniform(nfe // 2, model.t_range))
    b = s.b + 1e-4 * torch.tril(torch.ones_like(s.b))
    return bns.NSSolver(s.times, s.a, b)


def euler_loop(model, x0, nfe, y, guidance):
    """The plain Euler sampler: what any library runs at this NFE."""
    t0, t1 = model.t_range
    h = (t1 - t0) / nfe
    x = x0
    for i in range(nfe):
        x = x + h * model.velocity(x, t0 + i * h, y, guidance)
    return x


def md_head(title: str, *notes: str) -> list[str]:
    """A markdown heading, then ``notes`` as one paragraph (the machine, the command, ...)."""
    return [f"### {title}", "", *notes, ""]


def md_table(header: list[str], rows: list[list]) -> list[str]:
    """The lines of a markdown table: the header, the separator and one line per row, and an
    empty line after it (none at all without rows)."""
    if not rows:
        return []
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows] + [""]


def time_interleaved(fns: dict, repeats: int, sync=None) -> dict[str, list[float]]:
    """Wall times of each function in ``fns``, interleaved repeat by repeat so that drifts (clock,
    other load) hit all alike, after one warm-up call each; ``sync()`` (e.g.
    ``torch.cuda.synchronize``) runs before each clock reading."""
    sync = sync or (lambda: None)
    times: dict[str, list[float]] = {name: [] for name in fns}
    with torch.no_grad():
        for fn in fns.values():
            fn()
        for _ in range(repeats):
            for name, fn in fns.items():
                sync()
                t = time.perf_counter()
                fn()
                sync()
                times[name].append(time.perf_counter() - t)
    return times


def sampling_inputs(model, batch: int, device=None):
    """Fixed noise and labels (every class in turn) for timing a sampler."""
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn((batch, *model.sample_shape), generator=g).to(device)
    y = torch.arange(batch, device=device) % model.num_classes if model.num_classes else None
    return x0, y


def time_sampling(model, guidance, nfe, batch, repeats):
    x0, y = sampling_inputs(model, batch)
    ns = _dense_solver(model, nfe)
    times = time_interleaved(
        {
            "ns": lambda: bns.sample(model, x0, ns, y, guidance),
            "euler": lambda: euler_loop(model, x0, nfe, y, guidance),
        },
        repeats,
    )
    ns_med, eu_med = statistics.median(times["ns"]), statistics.median(times["euler"])
    # The solver's own work, isolated: the same loops with a velocity that costs nothing.
    u = torch.randn_like(x0)

    def stub(x, t, *args):
        return u

    upd = {"ns": [], "euler": []}
    with torch.no_grad():
        for _ in range(20):
            t = time.perf_counter()
            bns.sample(stub, x0, ns)
            upd["ns"].append(time.perf_counter() - t)
            t = time.perf_counter()
            x = x0
            for i in range(nfe):
                x = x + (1.0 / nfe) * stub(x, i)
            upd["euler"].append(time.perf_counter() - t)
    extra = statistics.median(upd["ns"]) - statistics.median(upd["euler"])
    return {
        "nfe": nfe,
        "batch": batch,
        "repeats": repeats,
        "ns_s": ns_med,
        "euler_s": eu_med,
        "overhead_pct": 100 * (ns_med / eu_med - 1),
        "update_only_extra_s": extra,
        "update_only_overhead_pct": 100 * extra / eu_med,
    }


_MEM_CHILD = r"""
import json, sys, torch
from bns.specs import load_model
from bns.families import make_family
from bns.loss import log_mse
from bns.solver import sample
from bns.solvers import initial_solver
spec, guidance, nfe, ckpt, batch, threads = sys.argv[1:7]
torch.set_num_threads(int(threads))

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) / 1024  # MB
model = load_model(spec)
guidance, nfe, batch = float(guidance), int(nfe), int(batch)
for p in model.net.parameters():
    p.requires_grad_(False)
g = torch.Generator().manual_seed(0)
x0 = torch.randn((batch, *model.sample_shape), generator=g)
y = torch.arange(batch) % model.num_classes if model.num_classes else None
x1 = torch.randn_like(x0)
params = make_family("bns", initial_solver(model, nfe, "midpoint"))
saved = [0]

def pack(t):
    saved[0] += t.numel() * t.element_size()
    return t
base = status("VmRSS")  # no warm-up: its peak would hide the training step's
with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
    x = sample(model, x0, params.solver(), y, guidance, checkpoint=ckpt == "1")
saved_mb = saved[0] / 2**20
log_mse(x, x1).sum().backward()
peak = status("VmHWM")
print(json.dumps({"base_mb": base, "peak_mb": peak, "added_mb": peak - base,
                  "saved_for_backward_mb": saved_mb}))
"""


def memory(spec, guidance, nfe, checkpoint, batch, threads):
    out = subprocess.run(
        [
            sys.executable,
            "-c",
            _MEM_CHILD,
            spec,
            str(guidance),
            str(nfe),
            "1" if checkpoint else "0",
            str(batch),
            str(threads),
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="fmnist-cfg")
    p.add_argument("--guidance", type=float, default=2.0)
    p.add_argument("--gt-samples", type=int, default=64)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=24)
    p.add_argument("--sample-batch", type=int, default=64)
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--mem-batch", type=int, default=64)
    p.add_argument("--out", type=Path, default=RESULTS, help="results folder")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    model = load_model(args.model)
    res = {
        "model": model.name,
        "guidance": args.guidance,
        "machine": f"{platform.machine()}, {args.threads} threads, torch {torch.__version__}",
        "command": " ".join(["python", "benchmarks/cost.py", *sys.argv[1:]]),
    }

    t = time.perf_counter()
    pairs = make_pairs(
        model,
        args.gt_samples,
        "test",
        seed=12345,
        guidance=args.guidance,
        cache=False,
        progress=False,
    )
    gt_s = time.perf_counter() - t
    res["ground_truth"] = {
        "samples": args.gt_samples,
        "seconds": gt_s,
        "seconds_per_sample": gt_s / args.gt_samples,
        "nfe_per_sample": pairs.nfe_per_sample,
    }
    t = time.perf_counter()
    _, hist = distill(
        model,
        8,
        guidance=args.guidance,
        pairs=(pairs, pairs[:16]),
        init="midpoint",  # the steps' cost, not the search for the best initial solver
        adam_steps=args.steps,
        batch_size=args.batch_size,
        val_every=args.steps,
        progress=False,
    )
    d_s = time.perf_counter() - t
    res["distill_nfe8"] = {
        "steps": args.steps,
        "batch_size": args.batch_size,
        "seconds": d_s,
        "seconds_per_step": d_s / args.steps,
        "network_forwards": hist["forwards"],
    }
    res["sampling"] = [
        time_sampling(model, args.guidance, n, args.sample_batch, args.repeats) for n in (8, 16)
    ]
    res["memory"] = []
    for nfe in (4, 8, 16):
        for ck in (False, True):
            m = memory(args.model, args.guidance, nfe, ck, args.mem_batch, args.threads)
            res["memory"].append({"nfe": nfe, "checkpoint": ck, "batch": args.mem_batch, **m})
    mem = {(r["nfe"], r["checkpoint"]): r["added_mb"] for r in res["memory"]}

    def ratio(ck):
        return mem[16, ck] / mem[4, ck] if mem[4, ck] > 0 else float("nan")

    res["memory_ratio_16_over_4"] = {"checkpoint": ratio(True), "no_checkpoint": ratio(False)}

    lines = [
        f"### Cost on {model.name} (guidance {args.guidance:g})",
        "",
        f"Machine: {res['machine']}. Command: `{res['command']}`.",
        "",
        f"- Ground truth (dopri5, rtol = atol = 1e-5): {res['ground_truth']['nfe_per_sample']:.0f}"
        f" NFE per sample, {res['ground_truth']['seconds_per_sample'] * 1000:.1f} ms per sample"
        f" (batch of {args.gt_samples}).",
        f"- Distillation at NFE 8: {res['distill_nfe8']['seconds_per_step']:.3f} s per step"
        f" (batch {args.batch_size}), {hist['forwards']} network forwards for {args.steps} steps.",
        "",
        "| sampling | NFE | batch | NS solver (s) | Euler loop (s) | end-to-end overhead |"
        " NS update's own extra cost |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in res["sampling"]:
        lines.append(
            f"| dense NS vs Euler | {r['nfe']} | {r['batch']} | {r['ns_s']:.4f} |"
            f" {r['euler_s']:.4f} | {r['overhead_pct']:+.2f}% |"
            f" {r['update_only_overhead_pct']:+.2f}% ({r['update_only_extra_s'] * 1000:.2f} ms) |"
        )
    lines += [
        "",
        "| distillation memory | NFE 4 | NFE 8 | NFE 16 | NFE 16 / NFE 4 |",
        "|---|---|---|---|---|",
    ]
    saved = {(r["nfe"], r["checkpoint"]): r["saved_for_backward_mb"] for r in res["memory"]}
    for ck in (False, True):
        name = "per-step checkpointing" if ck else "no checkpointing"
        lines.append(
            f"| {name}: peak RSS added (MB) | "
            + " | ".join(f"{mem[n, ck]:.0f}" for n in (4, 8, 16))
            + f" | {ratio(ck):.2f} |"
        )
        lines.append(
            f"| {name}: kept for backward (MB) | "
            + " | ".join(f"{saved[n, ck]:.1f}" for n in (4, 8, 16))
            + f" | {saved[16, ck] / saved[4, ck]:.2f} |"
        )
    lines.append(f"\nMemory: batch {args.mem_batch}, one training step in a fresh process each.")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"cost_{model.name}.json").write_text(json.dumps(res, indent=1) + "\n")
    (args.out / f"cost_{model.name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
