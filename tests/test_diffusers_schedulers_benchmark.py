"""benchmarks/diffusers_schedulers.py: diffusers' schedulers on bns's pairs, end to end.

The oracles run a scheduler for many steps: it must then land on bns's ground truth, which it
only does when the model output (epsilon or flow prediction) and the noise level of each call
are converted right.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "diffusers_schedulers.py"

pytest.importorskip("diffusers")


def _module(name: str = SCRIPT.name):
    path = SCRIPT.with_name(name)
    spec = importlib.util.spec_from_file_location(f"{path.stem}_bench", path)
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(path.parent))  # the scripts' own imports (quality.py)
    try:
        spec.loader.exec_module(module)  # by path, without registering it: as another script
    finally:
        sys.path.remove(str(path.parent))
    return module


@pytest.mark.usefixtures("one_thread")
def test_tiny_run_writes_results(tmp_path, monkeypatch):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT / "src"))
    env["BNS_CACHE_DIR"] = str(tmp_path / "cache")
    out = tmp_path / "out"
    cmd = [sys.executable, str(SCRIPT), "--tiny", "--quiet", "--out", str(out)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    res = json.loads((out / "diffusers_gmm_g1.json").read_text())
    assert res["model"] == "gmm" and res["guidance"] == 1.0
    assert res["protocol"]["test_pairs"] == 8 and res["protocol"]["end"] == "range"
    assert res["protocol"]["seed"] == 0 and res["protocol"]["nfe"] == [4]
    assert res["diffusers_version"] and res["machine"] and "--tiny" in res["command"]
    rows = res["rows"]
    classes = {r["class"] for r in rows}
    assert {
        "FlowMatchEulerDiscreteScheduler",
        "DPMSolverMultistepScheduler",
        "UniPCMultistepScheduler",
        "DEISMultistepScheduler",
    } <= classes
    assert "DDIMScheduler" not in classes  # VP only
    keys = {"scheduler", "class", "config", "nfe", "calls", "psnr_mean", "psnr_std", "psnr_median"}
    for r in rows:
        assert keys <= set(r)
        assert r["nfe"] == 4 and r["calls"] == 4  # one model call per inference step
        assert math.isfinite(r["psnr_mean"]) and r["psnr_mean"] > 0
    assert len({r["scheduler"] for r in rows}) == len(rows)
    # DPM-Solver++ / DEIS ignore use_flow_sigmas under karras sigmas: skipped, with the reason.
    assert res["skipped"] and all(s["error"] for s in res["skipped"])
    best = res["best"]["4"]
    assert best["psnr_mean"] == max(r["psnr_mean"] for r in rows)
    table = (out / "diffusers_gmm_g1.md").read_text()
    assert "diffusers' best" in table and best["scheduler"] in table
    # benchmarks/classical.py puts that best beside bns's own solvers, on the same pairs only
    # (its main, here: the script's command line is tests/test_benchmarks.py's)
    classical = _module("classical.py")
    cls = ["--model", "gmm", "--nfe", "4", "--grid-pairs", "8", "--out", str(out)]
    cls += ["--diffusers-json", str(out / "diffusers_gmm_g1.json")]
    monkeypatch.setenv("BNS_CACHE_DIR", str(tmp_path / "cache"))
    classical.main([*cls, "--test-pairs", "8"])
    (entry,) = json.loads((out / "classical_gmm_g1.json").read_text())["nfes"]
    assert entry["diffusers_best"] == {k: best[k] for k in entry["diffusers_best"]}
    with pytest.raises(SystemExit, match="other pairs"):
        classical.main([*cls, "--test-pairs", "16"])


@pytest.mark.usefixtures("one_thread")
def test_many_steps_reach_the_ground_truth(tmp_path):
    from bns.pairs import make_pairs
    from bns.solvers.ends import resolve_end
    from bns.specs import load_model

    bench = _module()
    flow = load_model("gmm")
    pairs = make_pairs(flow, 8, "test", cache=tmp_path, progress=False, end="range")
    chosen = {"DPM++ 2M final=zero", "UniPC 2M final=zero", "FlowMatchEuler"}
    rows = bench.run_schedulers(flow, pairs, [200], 1.0, configs=lambda c: c.label in chosen)
    assert {r["scheduler"] for r in rows} == chosen
    for r in rows:
        assert r["calls"] == 200
        assert r["psnr_mean"] > 45, r  # 58 to 93 dB when right; a wrong sign or time: < 25

    # A discrete VP epsilon model: timesteps and sigmas mapped through the log-SNR.
    vp = load_model("fmnist-ddpm")
    end = resolve_end(vp, "auto")
    pairs = make_pairs(vp, 2, "test", cache=tmp_path, progress=False, end=end)
    chosen = {"DPM++ 2M karras final=zero", "DDIM trailing clip_sample=False"}
    rows = bench.run_schedulers(vp, pairs, [200], 1.0, configs=lambda c: c.label in chosen)
    assert {r["scheduler"] for r in rows} == chosen
    for r in rows:
        assert r["calls"] == 200 and r["lam_gap"] < 1e-5
        assert r["psnr_mean"] > 40, r
    best = bench.best_per_nfe(rows)
    assert set(best) == {200} and best[200]["scheduler"] in chosen


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("name", ["gmm", "fmnist-ddpm"])
def test_multistep_schedulers_equal_bns_solvers_on_their_times(name):
    """At few steps, diffusers' DPM-Solver++ and UniPC on a bns model are bns's own
    dpm_solver_pp / unipc on the times the scheduler evaluates (ending on the data prediction
    for a model that stops short of it): the conversion is exact, not only convergent."""
    import torch

    from bns.metrics import psnr
    from bns.pairs import pair_noise
    from bns.solver import sample
    from bns.solvers.ends import resolve_end, with_data_end
    from bns.solvers.exponential import dpm_solver_pp, unipc
    from bns.specs import load_model

    bench = _module()
    model = load_model(name)
    kind = bench.model_kind(model)
    base, _ = bench.scheduler_base(model)
    x0, y = pair_noise(model, 0, "test", range(4))
    x0 = x0.float()
    configs = {c.label: c for c in bench.scheduler_configs(kind)}
    for label, method in (("DPM++ 2M final=zero", dpm_solver_pp), ("UniPC 2M final=zero", unipc)):
        record = {}
        scheduler = bench.make_scheduler(configs[label], base)
        x = bench.sample(model, scheduler, x0, 6, y, 1.0, kind, record)
        assert record["calls"] == 6
        grid = torch.tensor(record["t_eval"] + [model.t_range[1]], dtype=torch.float64)
        solver = method(grid, model.schedule, 2)
        if resolve_end(model, "auto") == "data":
            solver = with_data_end(solver, model.schedule)
        with torch.no_grad():
            ref = sample(model, x0, solver, y, 1.0)
        assert float(psnr(x.float(), ref.float(), 2.0).min()) > 90, label
