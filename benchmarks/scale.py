"""Scaling benchmark: ground truth and distillation on 1 and K workers under ``torchrun``.

    python benchmarks/scale.py                                  # this machine's CPUs, 1 vs 2
    python benchmarks/scale.py --device cuda --workers 1,2,4,8  # GPUs, one per worker

Each worker count K is its own ``torchrun --standalone --nproc-per-node K`` job, with the same
threads per worker (``--threads``, given to every worker through OMP_NUM_THREADS and
BNS_THREADS). For each K it measures:
- ground-truth throughput: pairs per second of ``make_pairs`` (no cache), whose batches of
  ``--gt-batch`` pairs are shared out among the workers;
- distillation step time: seconds per optimization step at the global batch ``--batch-size``
  (the step alone: this worker's share, the gradient's all-reduce and Adam);
- end-to-end time to a solver: the wall time of ``torchrun ... -m bns distill`` from a fresh
  cache (process start, model load, ground truth, initialization, distillation, the file);
and the efficiency of each, throughput of K / (K x throughput of 1). Writes
``benchmarks/results/scale_<device>.json`` and ``.md`` with the machine and the command.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
ROOT = Path(__file__).resolve().parents[1]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="fmnist-cfg")
    p.add_argument("--guidance", type=float, default=2.0)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--workers", default="1,2", help="worker counts, e.g. 1,2,4")
    p.add_argument("--threads", type=int, default=1, help="CPU threads per worker")
    p.add_argument("--gt-pairs", type=int, default=128, help="pairs of the throughput run")
    p.add_argument("--gt-batch", type=int, default=16, help="pairs per ground-truth solve")
    p.add_argument("--nfe", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=40, help="global batch of a step")
    p.add_argument("--steps", type=int, default=5, help="timed distillation steps")
    p.add_argument("--e2e-train", type=int, default=64, help="end to end: training pairs")
    p.add_argument("--e2e-val", type=int, default=32, help="end to end: validation pairs")
    p.add_argument("--e2e-steps", type=int, default=10, help="end to end: steps")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--worker", type=Path, help=argparse.SUPPRESS)  # inside torchrun: result file
    return p


def _timed(fn, sync) -> tuple[float, object]:
    sync()
    t0 = time.perf_counter()
    out = fn()
    sync()
    return time.perf_counter() - t0, out


def worker(args: argparse.Namespace) -> None:
    """One worker of a K-worker job: time ground truth and distillation steps."""
    import torch

    from bns.config import DistillConfig
    from bns.executor import current, local_cuda_device
    from bns.families import make_family
    from bns.pairs import make_pairs
    from bns.solvers import initial_solver
    from bns.specs import load_model
    from bns.train import _adam, _Loop

    device = (local_cuda_device() or torch.device("cuda")) if args.device == "cuda" else None
    model = load_model(args.model).to(device=device or torch.device("cpu"))
    w = current(model.device)

    def sync() -> None:
        if device is not None:
            torch.cuda.synchronize()
        w.all_sum(0.0)  # every worker here

    kw = dict(guidance=args.guidance, cache=False, progress=False, batch_size=args.gt_batch)
    make_pairs(model, args.gt_batch * w.size, "test", **kw)  # warm-up (and the process group)
    gt_s, train = _timed(lambda: make_pairs(model, args.gt_pairs, "train", **kw), sync)
    val = make_pairs(model, args.gt_batch, "val", **kw)
    cfg = DistillConfig(nfe=args.nfe, guidance=args.guidance, batch_size=args.batch_size)
    cfg = cfg.replace(adam_steps=args.steps, gn_steps=0)  # timed Adam steps
    init = initial_solver(model, args.nfe, "midpoint")
    loop = _Loop(model, cfg, make_family("bns", init), init, train, val, None)
    _adam(loop)  # warm-up

    def steps() -> None:
        for _ in range(args.steps):
            _adam(loop)

    step_s, _ = _timed(steps, sync)
    if w.main:
        result = {
            "workers": w.size,
            "threads_per_worker": torch.get_num_threads(),
            "ground_truth": {
                "pairs": args.gt_pairs,
                "seconds": gt_s,
                "pairs_per_s": args.gt_pairs / gt_s,
                "nfe_per_pair": train.nfe_per_sample,
            },
            "distill_step": {"steps": args.steps, "seconds_per_step": step_s / args.steps},
        }
        args.worker.write_text(json.dumps(result))


def _torchrun(k: int, argv: list[str], env: dict[str, str]) -> tuple[float, str]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={k}"]
    t0 = time.perf_counter()
    done = subprocess.run(cmd + argv, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(argv[:3])} on {k} workers failed:\n{done.stderr[-3000:]}")
    return time.perf_counter() - t0, done.stdout


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main() -> None:
    args = _parser().parse_args()
    if args.worker is not None:
        return worker(args)
    # This process only starts the jobs: no torch here (its import is seconds of a CPU).
    from importlib.metadata import version

    ks = [int(v) for v in args.workers.split(",")]
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"), BNS_THREADS=str(args.threads))
    env["OMP_NUM_THREADS"] = str(args.threads)
    load_before = os.getloadavg()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for k in ks:
            out = Path(tmp) / f"w{k}.json"
            _torchrun(k, [__file__, *sys.argv[1:], "--worker", str(out)], env)
            row = json.loads(out.read_text())
            distill = ["-m", "bns", "distill", "--model", args.model, "--quiet", "--init"]
            distill += ["midpoint", "--guidance", str(args.guidance), "--nfe", str(args.nfe)]
            distill += ["--train-pairs", str(args.e2e_train), "--val-pairs", str(args.e2e_val)]
            distill += ["--adam-steps", str(args.e2e_steps), "--val-every", str(args.e2e_steps)]
            distill += ["--batch-size", str(args.batch_size), "--gt-batch-size", str(args.gt_batch)]
            distill += ["--device", args.device, "--out", str(Path(tmp) / f"s{k}.json")]
            e2e_env = dict(env, BNS_CACHE_DIR=str(Path(tmp) / f"cache{k}"))
            row["end_to_end"] = {"seconds": _torchrun(k, distill, e2e_env)[0]}
            rows.append(row)
    one = rows[0]
    for r in rows:
        k = r["workers"] / one["workers"]
        gt = r["ground_truth"]["pairs_per_s"] / one["ground_truth"]["pairs_per_s"]
        step = one["distill_step"]["seconds_per_step"] / r["distill_step"]["seconds_per_step"]
        e2e = one["end_to_end"]["seconds"] / r["end_to_end"]["seconds"]
        r["efficiency"] = {"ground_truth": gt / k, "distill_step": step / k, "end_to_end": e2e / k}
    device = args.device
    if device == "cpu":
        machine = f"{_cpu_name()}, {os.cpu_count()} cores"
    else:
        import torch

        machine = f"{torch.cuda.get_device_name(0)} x {torch.cuda.device_count()}"
    result = {
        "machine": machine,
        "device": device,
        "torch": version("torch"),
        "model": args.model,
        "guidance": args.guidance,
        "settings": {k: v for k, v in vars(args).items() if k not in ("out", "worker")},
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
        "command": "python benchmarks/scale.py " + " ".join(sys.argv[1:]),
        "rows": rows,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"scale_{device}.json"
    path.write_text(json.dumps(result, indent=1) + "\n")
    path.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))


def markdown(res: dict) -> str:
    s = res["settings"]
    lines = [
        f"# Scaling on {res['device']}: {res['model']}, guidance {res['guidance']:g}",
        "",
        f"Machine: {res['machine']}; torch {res['torch']}; {s['threads']} thread(s) per worker.",
        f"Load average (1, 5, 15 min) before: {', '.join(f'{v:.2f}' for v in res['load_average_before'])};"
        f" after: {', '.join(f'{v:.2f}' for v in res['load_average_after'])}.",
        f"Command: `{res['command']}`",
        "",
        f"Ground truth: {s['gt_pairs']} pairs in solves of {s['gt_batch']}; distillation: NFE"
        f" {s['nfe']}, global batch {s['batch_size']}, {s['steps']} timed steps; end to end:"
        f" `torchrun -m bns distill` with {s['e2e_train']} + {s['e2e_val']} pairs and"
        f" {s['e2e_steps']} steps from a fresh cache, process start included.",
        "",
        "| workers | ground truth pairs/s | eff. | step s | eff. | end to end s | eff. |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in res["rows"]:
        e = r["efficiency"]
        lines.append(
            f"| {r['workers']} | {r['ground_truth']['pairs_per_s']:.2f} | {e['ground_truth']:.2f}"
            f" | {r['distill_step']['seconds_per_step']:.3f} | {e['distill_step']:.2f}"
            f" | {r['end_to_end']['seconds']:.1f} | {e['end_to_end']:.2f} |"
        )
    lines += ["", "Efficiency: throughput of K workers / (K x throughput of one)."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
