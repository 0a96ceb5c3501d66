"""benchmarks/gpu.py runs end to end at toy sizes on the CPU and writes every section."""

from __future__ import annotations

import importlib
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import torch

import bns
from bns.estimate import gn_step_work
from bns.schedules import DiscreteVP

ROOT = Path(__file__).resolve().parents[1]


def _numbers(obj):
    if isinstance(obj, bool):
        return
    if isinstance(obj, (int, float)):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _numbers(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from _numbers(v)


def test_gpu_benchmark_tiny_on_cpu(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT / "src"))
    env["BNS_CACHE_DIR"] = str(tmp_path / "cache")  # nothing should be cached, but never ~
    cmd = [sys.executable, str(ROOT / "benchmarks" / "gpu.py"), "--tiny", "--device", "cpu"]
    cmd += ["--out", str(tmp_path / "out"), "--protocol", "--protocol-models", "fmnist-cfg:2"]
    cmd += ["--nfe", "4"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    (path,) = (tmp_path / "out").glob("gpu_*.json")
    res = json.loads(path.read_text())
    assert res["device"] == {"type": "cpu", "name": "cpu", "threads": 1}
    assert res["torch"] and "benchmarks/gpu.py --tiny" in res["command"]
    assert all(math.isfinite(v) for v in _numbers(res))
    assert res["sizes"]["gt_rtol"] == 1e-3  # --tiny: loosened (a full run: bns's default, 1e-5)
    assert [r["batch"] for r in res["ground_truth"]] == [2]
    assert (
        res["ground_truth"][0]["pairs_per_s"] > 0 and res["ground_truth"][0]["forwards_per_s"] > 0
    )
    steps = res["distill_step"]
    assert {
        (r["model"].split("-")[0], r["nfe"], r["micro_batch"] > 0, r["checkpoint"]) for r in steps
    } == {
        (m, n, micro, ck)
        for m in ("fmnist", "unet")
        for n in (4, 8)  # --tiny's NFEs (a full run: 8, 16)
        for micro in (0, 1)
        for ck in (0, 1)
    }
    assert all(r["seconds"] > 0 and r["peak_gb"] is None for r in steps)  # no CUDA memory on a CPU
    assert {(r["model"].split("-")[0], r["nfe"]) for r in res["sampling"]} == {
        (m, n) for m in ("fmnist", "unet") for n in (8, 16)
    }
    assert all(r["bns_s"] > 0 and r["euler_s"] > 0 for r in res["sampling"])
    (row,) = res["protocol"]
    assert row["model"] == "fmnist-cfg" and row["nfe"] == 4 and row["pairs"] == [2, 2, 2]
    assert row["best_classical"]["solver"] and row["best_classical_2nfe"]["solver"]
    assert row["wall_s"] >= row["ground_truth_s"] + row["distill_s"]
    assert set(res["targets"]) == {
        "protocol_nfe8_fmnist_cfg_under_60s",
        "unet_nfe16_batch32_checkpoint_under_8gb",
        "bns_sampling_within_1pct_of_euler",
    }
    assert all(t["pass"] is None for t in res["targets"].values())  # targets are for GPUs
    md = path.with_suffix(".md").read_text()
    assert "cpu" in md and "torch" in md and "| protocol |" in md
    # The large section: the real architectures at toy sizes, with guidance, in bf16.
    large = {r["arch"]: r for r in res["large"]}
    nfe = res["large_sizes"]["nfe"]
    assert set(large) == {"sd1.5", "sdxl", "sd3-medium"}
    assert large["sdxl"]["cls"] == "UNet2DConditionModel" == large["sd1.5"]["cls"]
    assert large["sd3-medium"]["cls"] == "SD3Transformer2DModel"
    assert large["sdxl"]["config"]["addition_embed_type"] == "text_time"
    schedulers = {k: r["sampling"]["scheduler"] for k, r in large.items()}
    assert schedulers == {
        "sd1.5": "DPMSolverMultistepScheduler",
        "sdxl": "DPMSolverMultistepScheduler",
        "sd3-medium": "FlowMatchEulerDiscreteScheduler",
    }
    for r in large.values():
        assert r["guidance"] > 1 and r["params"] > 0 and r["dtype"] == "bfloat16"
        gt, gn, adam = r["ground_truth"], r["gn_step"], r["adam_step"]
        assert gt["tolerance"] == 1e-2  # --tiny: loosened (full size: bns's default for bf16)
        assert gt["pairs_per_s"] > 0 and gt["forwards_per_s"] > 0 and gt["nfe_per_sample"] > 0
        assert gn["nfe"] == nfe and gn["micro_batch"] == 1 and gn["seconds"] > 0
        assert gn["jvps"] == 2 * gn_step_work(nfe, gn["pairs"])[1]  # guided: 2 forwards each
        assert 0 <= gn["lm_tries"] <= 8 and gn["peak_gb"] is None  # no CUDA memory on a CPU
        assert adam["checkpoint"] and adam["micro_batch"] == 1 and adam["seconds"] > 0
        assert r["sampling"]["bns_s"] > 0 and r["sampling"]["pipeline_s"] > 0
        proj = r["projected"]
        assert proj["settings"]["nfe"] == nfe and proj["settings"]["guidance"] == r["guidance"]
        phases = {k: v for k, v in proj["phases"].items() if k != "total"}
        assert phases["ground_truth_train"]["seconds"] > 0 and phases["optimizer"]["jvps"] > 0
        assert proj["total_s"] > 0
        assert math.isclose(
            proj["total_s"], sum(v["seconds"] for v in phases.values()), rel_tol=1e-3
        )
    assert "| large network (random weights) |" in md and "| projected time to a solver" in md
    assert "Random weights: these are real costs, not real quality." in md


def test_gpu_benchmark_large_configs_are_the_real_networks():
    """The large section's full-size configs build the real networks: their parameter counts
    (built on the meta device: no memory, no weights; here, not in a process of its own)."""
    import diffusers

    gpu = _benchmark("gpu")
    with torch.device("meta"):
        counts = {
            a.key: sum(p.numel() for p in getattr(diffusers, a.cls)(**a.config).parameters())
            for a in gpu.ARCHS
        }
    # runwayml/stable-diffusion-v1-5 unet, stabilityai/stable-diffusion-xl-base-1.0 unet,
    # stabilityai/stable-diffusion-3-medium-diffusers transformer
    assert counts == {"sd1.5": 859_520_964, "sdxl": 2_567_463_684, "sd3-medium": 2_028_328_000}


def _benchmark(name: str):
    """benchmarks/<name>.py imported here (with its folder on the path for its own imports)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))


def _run_benchmark(tmp_path, script: str, *args: str) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT / "src"))
    env["BNS_CACHE_DIR"] = str(tmp_path / "cache")
    cmd = [sys.executable, str(ROOT / "benchmarks" / script), *args, "--out", str(tmp_path)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]


def test_text_to_image_benchmark_tiny(tmp_path):
    """benchmarks/t2i.py on a tiny offline SD3 pipeline: BNS inside the pipeline's own call is
    bns.sample's BNS, every row is measured on held-out prompts, and the numbers are finite."""
    _run_benchmark(tmp_path, "t2i.py", "--tiny")
    res = json.loads((tmp_path / "t2i_sd3_tiny.json").read_text())
    assert res["pipeline"] == "StableDiffusion3Pipeline" and res["prompts"]["test"] == 2
    assert res["protocol"]["ground_truth_rtol"] == 1e-3  # --tiny: loosened (a smoke test)
    (row,) = res["rows"]
    assert abs(row["bns"] - row["bns_in_pipeline"]) < 1e-3
    assert row["pipeline_scheduler"] == "FlowMatchEulerDiscreteScheduler"
    assert row["s_per_image_bns"] > 0 and row["s_per_image_pipeline_scheduler"] > 0
    assert all(math.isfinite(v) for v in _numbers(res))
    assert "held-out prompts" in (tmp_path / "t2i_sd3_tiny.md").read_text()


def test_ablations_benchmark_tiny(tmp_path):
    args = ["--nfe", "4", "--nfe-single", "4", "--pair-counts", "16", "--guidance", "1,2"]
    args += ["--steps", "2", "--train-pairs", "16", "--val-pairs", "16", "--init-pairs", "8"]
    _run_benchmark(tmp_path, "ablations.py", *args, "--test-pairs", "16")
    res = json.loads((tmp_path / "ablations_gmm.json").read_text())
    assert {r["family"] for r in res["family"]} >= {"bns", "time", "scale-time", "multistep"}
    assert [r["loss"] for r in res["loss"]] == ["log-mse", "mse", "l1"]
    assert {(r["trained_at"], r["used_at"]) for r in res["transfer"]} == {
        (a, b) for a in (1.0, 2.0) for b in (1.0, 2.0)
    }
    assert len(res["class_halves"]) == 2 and (tmp_path / "ablations_gmm.png").stat().st_size
    text = (tmp_path / "ablations_gmm.md").read_text()
    assert "### Loss" in text and "### Training pairs" in text


def test_scale_benchmark_tiny(tmp_path, one_thread):
    args = ["--model", "gmm", "--guidance", "1", "--workers", "1,2", "--gt-pairs", "8"]
    args += ["--gt-batch", "4", "--nfe", "4", "--batch-size", "8", "--steps", "2"]
    args += ["--e2e-train", "16", "--e2e-val", "8", "--e2e-steps", "2"]
    _run_benchmark(tmp_path, "scale.py", *args)
    res = json.loads((tmp_path / "scale_cpu.json").read_text())
    assert res["torch"] == torch.__version__  # read without importing torch
    assert [r["workers"] for r in res["rows"]] == [1, 2]
    two = res["rows"][1]
    assert set(two["efficiency"]) == {"ground_truth", "distill_step", "end_to_end"}
    assert all(math.isfinite(v) and v > 0 for v in two["efficiency"].values())
    assert "| 2 |" in (tmp_path / "scale_cpu.md").read_text()


def test_optimizers_benchmark_tiny(tmp_path):
    args = ["--model", "gmm", "--nfe", "4", "--configs", "adam:3:0,gn:0:2,adam+gn:2:1"]
    _run_benchmark(
        tmp_path,
        "optimizers.py",
        *args,
        "--train-pairs",
        "24",
        "--val-pairs",
        "16",
        "--test-pairs",
        "16",
        "--gn-batch-size",
        "16",
    )
    res = json.loads((tmp_path / "optimizers_gmm_g1.json").read_text())
    runs = {r["config"]: r for r in res["runs"]}
    assert set(runs) == {"adam", "gn", "adam+gn"}
    assert runs["gn"]["steps_run"] == 2 and runs["adam+gn"]["steps_run"] == 3
    for r in runs.values():  # the best iterate is never below the initial solver
        assert r["val_psnr"] >= r["init_val_psnr"] and math.isfinite(r["test_psnr"])
        assert r["best_classical_2n"][1] > r["best_classical"][1]
    assert "| 4 | gn |" in (tmp_path / "optimizers_gmm_g1.md").read_text()


def test_classical_benchmark_tiny(tmp_path):
    """benchmarks/classical.py: every grid measured, the rule's pick beside it, and BNS (its
    diffusers column: tests/test_diffusers_schedulers_benchmark.py)."""
    args = ["--model", "gmm", "--nfe", "4", "--test-pairs", "8", "--grid-pairs", "8"]
    _run_benchmark(tmp_path, "classical.py", *args, "--bns", "--bns-gn-steps", "2")
    res = json.loads((tmp_path / "classical_gmm_g1.json").read_text())
    (e,) = res["nfes"]
    assert res["grids"] == ["uniform"] and e["nfe"] == 4
    # on one grid the measured choice is the rule's, and neither beats the best on test
    assert e["measured_best"] == e["rule_best"]
    assert e["oracle_best"]["test"] >= e["measured_best"]["test"]
    assert "diffusers_best" not in e
    assert e["bns"]["test"] > e["measured_best"]["test"]  # BNS from the best, trained
    gs = e["grid_search"]
    assert gs["evaluations_per_pair"] < gs["unshared_evaluations_per_pair"]
    assert gs["forwards_on_val"] == gs["evaluations_per_pair"] * 8
    assert "| 4 | **" in (tmp_path / "classical_gmm_g1.md").read_text()


def test_faults_benchmark_tiny(tmp_path):
    """benchmarks/faults.py: a kill inside a file write (the rename of a ground-truth shard,
    a checkpoint or the solver), a rerun with --resume, the same solver; phases are read off
    faulthandler's stacks."""
    faults = _benchmark("faults")  # its main here: the jobs it kills are processes of their own
    faults.main(["--kills", "1", "--write-share", "1", "--sleep", "0", "--out", str(tmp_path)])
    res = json.loads((tmp_path / "faults_single.json").read_text())
    s = res["summary"]
    assert s["kills"] == 1 and s["reruns_ok"] == 1 and s["differing_solvers"] == 0
    assert s["corrupt_cache_files"] == 0 and s["cache_files_checked"] >= 2
    (phase,) = s["phases"]
    assert phase.startswith("file write: ") and res["trials"][0]["job_rc"] == -9
    assert res["reference_writes"] >= 5  # shards, cache files, checkpoints, the solver
    phase_of = faults.phase_of
    stack = (
        'Thread 0x1 (most recent call first):\n  File "/x/torchdiffeq/_impl/rk_common.py", line 1'
        ' in _runge_kutta_step\n  File "/x/src/bns/ground_truth.py", line 80 in ground_truth\n'
        '  File "/x/src/bns/train.py", line 150 in distill\n'
    )
    assert phase_of(stack) == "ground truth"
    ranking = stack.replace("ground_truth.py", "classical.py").replace("torchdiffeq", "bns")
    assert phase_of(ranking) == "ranking"
    assert phase_of('  File "/x/src/bns/gauss_newton.py", line 9 in <module>\n') == "start-up"


def test_concurrency_benchmark_tiny(tmp_path):
    """benchmarks/concurrency.py: two jobs that share every cache file, started together,
    end with the solvers each makes alone; the shared cache verifies. The two jobs have the
    same settings: one run alone is the reference of both."""
    concurrency = _benchmark("concurrency")  # its main here: the jobs are processes of their own
    args = ["--rounds", "1", "--jobs", "2", "--share-references", "--out", str(tmp_path)]
    concurrency.main(args)
    res = json.loads((tmp_path / "concurrency.json").read_text())
    assert res["shared_references"] == {"flow-nfe4-again": "flow-nfe4"}
    (r,) = res["rounds"]
    assert r["jobs"] == 2 and r["failed_jobs"] == 0 and r["differing_solvers"] == 0
    assert r["cache_files"] == 2 and r["corrupt_cache_files"] == 0 and r["tmp_files_left"] == 0
    assert (
        "| solvers differing from the job alone | 0 |" in (tmp_path / "concurrency.md").read_text()
    )


def test_timestep_rounding_hands_the_network_integer_timesteps():
    """What benchmarks/timestep_rounding.py's claims rest on: the wrapped network sees the
    nearest integer timestep (the noise level stays exact), and snapped times are integer
    timesteps with the ends kept."""
    tr = _benchmark("timestep_rounding")
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    sched = DiscreteVP(torch.cumprod(1 - betas, 0))
    seen = []

    class Net(torch.nn.Module):
        def forward(self, x, t):
            seen.append(sched.timestep(t.double()))
            return x * 0 + t[:, None].to(x.dtype)

    model = bns.Model(Net(), "eps", sched, (2,), dtype=torch.float64)
    rounded = tr.rounded_model(model)
    t = torch.tensor([0.1234, 0.5, 0.9876], dtype=torch.float64)
    x = torch.randn(3, 2, dtype=torch.float64)
    exact, got = model.velocity(x, t), rounded.velocity(x, t)
    k = seen[-1]
    assert (
        torch.allclose(k, k.round(), atol=1e-9)
        and (k - sched.timestep(t)).abs().max() <= 0.5 + 1e-9
    )
    assert not torch.allclose(exact, got)  # the network's time changed, not the scaling alone
    solver = bns.solvers.by_name("euler", 4, model)
    snap = tr.snapped(solver, sched)
    ks = sched.timestep(snap.times)
    assert torch.allclose(ks, ks.round(), atol=1e-9)
    assert snap.t_range == solver.t_range and torch.equal(snap.a, solver.a)
