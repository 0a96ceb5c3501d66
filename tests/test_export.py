"""bns export: a solver's grid in the conventions of stock schedulers (diffusers' sigmas= and
timesteps=, k-diffusion's sigmas, ComfyUI's ManualSigmas, JSON), checked against independent
formulas; every refusal is one line; and a learned time grid run by diffusers' own schedulers
gives bns's samples (benchmarks/export_equivalence.py, small)."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

import bns
from bns.cli import main
from bns.export import ExportError, export_text, grid_export, write_export
from bns.models.fmnist import ddpm_schedule
from bns.models.gmm import gaussian_mixture_model
from bns.schedules import EDM

ROOT = Path(__file__).resolve().parents[1]


def _learned(model, init: str, nfe: int = 4, family: str = "time", end: str = "range"):
    """A solver as distill writes it (the init's coefficients, meta of a trained family)."""
    name, _, grid = init.partition("@")
    s = bns.solvers.by_name(name, nfe, model, grid=grid or "default")
    if end == "data":
        s = bns.solvers.with_data_end(s, model.schedule)
    meta = {"solver": "bns", "family": family, "init": init, "end": end}
    meta["model_settings"] = model.settings()
    return bns.NSSolver(s.times, s.a, s.b, meta)


@pytest.fixture(scope="module")
def flow():
    return gaussian_mixture_model(dim=4, components=2, seed=1)


@pytest.fixture(scope="module")
def ddpm():
    return gaussian_mixture_model(
        dim=4, components=2, seed=1, schedule=ddpm_schedule(), prediction="eps"
    )


def test_flow_grid_is_one_minus_t(flow):
    s = _learned(flow, "unipc2@uniform", 5)
    info = grid_export(s)
    t = [float(v) for v in s.times]
    assert info["model_kind"] == "flow" and info["exact"] and info["method"] == "unipc2"
    assert info["sigmas"] == [1 - v for v in t]  # ends at sigma = 0 (t = 1)
    assert info["timesteps"] == [1000 * (1 - v) for v in t[:-1]]
    assert info["diffusers_sigmas"] == info["sigmas"][:-1] and info["nfe"] == 5
    assert info["diffusers"]["scheduler"] == "UniPCMultistepScheduler"
    assert json.loads(export_text(s, "sigmas")) == info["sigmas"]
    assert json.loads(export_text(s, "timesteps")) == info["timesteps"]
    comfy = export_text(s, "comfyui")
    assert [float(v) for v in comfy.split(",")] == info["sigmas"] and comfy.count("\n") == 1
    assert json.loads(export_text(s, "json")) == info


def test_ddpm_grid_is_karras_sigmas_at_timesteps(ddpm):
    """At integer timesteps k = (1 - t)(N - 1) the noise level is sqrt((1 - ac_k) / ac_k)."""
    k = torch.tensor([999.0, 700.0, 420.0, 130.0, 0.0], dtype=torch.float64)
    times = 1 - k / 999
    s = bns.solvers.dpm_solver_pp(times, ddpm.schedule, 2)
    s.meta.update(model_settings=ddpm.settings())
    info = grid_export(s)
    ac = ddpm.schedule.alphas_cumprod.to(torch.float64)
    want = ((1 - ac[k.long()]) / ac[k.long()]).sqrt()
    assert info["model_kind"] == "discrete" and info["exact"] and info["family"] == "dpmpp2m"
    torch.testing.assert_close(
        torch.tensor(info["sigmas"], dtype=torch.float64), want, rtol=1e-12, atol=0
    )
    torch.testing.assert_close(
        torch.tensor(info["timesteps"], dtype=torch.float64), k[:-1], rtol=0, atol=1e-9
    )
    assert info["diffusers"]["config"]["final_sigmas_type"] == "sigma_min"
    # a solver that ends on the data: k-diffusion's list ends with 0
    data = _learned(ddpm, "dpmpp2m@logsnr", 4, family="bns", end="data")
    info = grid_export(data)
    assert info["sigmas"][-1] == 0.0 and all(v > 0 for v in info["sigmas"][:-1])
    assert not info["exact"] and info["diffusers"] is None and "dropped" in info["note"]


def test_midpoint_exports_its_step_grid_and_edm_has_no_timesteps(flow):
    s = _learned(flow, "midpoint@uniform", 6)
    info = grid_export(s)
    assert info["times"] == [float(v) for v in s.times[::2]] and info["steps"] == 3
    edm = EDM(0.002, 80.0)
    model = gaussian_mixture_model(dim=4, components=2, seed=1, schedule=edm, prediction="x1")
    s = bns.solvers.by_name("euler", 4, model, grid="uniform")
    info = grid_export(s, model)
    t = s.times
    want = torch.exp((1 - t) * math.log(80.0) + t * math.log(0.002))  # s_t of EDM
    torch.testing.assert_close(
        torch.tensor(info["sigmas"], dtype=torch.float64), want, rtol=1e-12, atol=0
    )
    with pytest.raises(ExportError, match="has no timesteps"):
        export_text(s, "timesteps", model)


def test_refusals(flow, tmp_path):
    s = _learned(flow, "euler@uniform")
    with pytest.raises(ExportError, match="unknown format 'png'"):
        export_text(s, "png")
    bare = bns.NSSolver(s.times, s.a, s.b)
    with pytest.raises(ExportError, match="does not record its model's conventions"):
        grid_export(bare)
    assert grid_export(bare, flow)["conventions_from"] == "model"
    out = tmp_path / "t.json"
    out.write_text("old")
    edm = gaussian_mixture_model(dim=4, components=2, seed=1, schedule=EDM(), prediction="x1")
    with pytest.raises(ExportError, match="no timesteps"):
        write_export(bns.solvers.by_name("euler", 4, edm), "timesteps", out, edm)
    assert out.read_text() == "old" and list(tmp_path.iterdir()) == [out]


def test_the_command_line(flow, tmp_path, capsys):
    path = _learned(flow, "euler@uniform").save(tmp_path / "time.json")
    for fmt in ("sigmas", "timesteps", "comfyui", "json"):
        out = tmp_path / f"out.{fmt}"
        assert main(["export", str(path), "--format", fmt, "--out", str(out)]) == 0
        assert out.read_text() == export_text(bns.NSSolver.load(path), fmt)
    assert capsys.readouterr().err == ""
    assert main(["export", str(path), "--format", "sigmas"]) == 0  # standard output
    assert json.loads(capsys.readouterr().out) == grid_export(bns.NSSolver.load(path))["sigmas"]
    other = _learned(flow, "euler@uniform", family="bns").save(tmp_path / "bns.json")
    assert main(["export", str(other), "--format", "comfyui"]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("bns export: warning: only a time-family")
    bare = bns.NSSolver(*(getattr(bns.NSSolver.load(path), k) for k in ("times", "a", "b")))
    bare_path = bare.save(tmp_path / "bare.json")
    assert main(["export", str(bare_path), "--format", "json", "--model", "gmm"]) == 0
    capsys.readouterr()
    corrupt = tmp_path / "corrupt.json"
    corrupt.write_text("{not json")
    for argv, match in [
        ([str(tmp_path / "missing.json"), "--format", "json"], "missing.json"),
        ([str(corrupt), "--format", "json"], "corrupt.json"),
        ([str(path), "--format", "png"], "unknown format 'png'"),
        ([str(bare_path), "--format", "json"], "does not record its model's conventions"),
    ]:
        assert main(["export", *argv]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("bns export: error: ") and match in err[0]


def test_diffusers_schedulers_run_the_exported_time_grid():
    """Small benchmarks/export_equivalence.py: diffusers' Euler and UniPC on the exported grid
    of a distilled time-family solver give bns's samples (float32), and DPM-Solver++ those of
    bns's method on the rounded integer timesteps."""
    pytest.importorskip("diffusers")
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        from export_equivalence import run_case
    finally:
        sys.path.pop(0)
    for method, kind in [("euler", "flow"), ("unipc2", "flow"), ("dpmpp2m", "ddpm")]:
        row = run_case(method, kind, nfe=4, steps=2, pairs=8, test_pairs=8)
        if kind == "flow":
            assert abs(row["psnr_bns"] - row["psnr_diffusers"]) < 1e-3, row
            assert row["max_abs_diff_bns_diffusers"] < 1e-4, row
        else:
            assert abs(row["psnr_bns_rounded_grid"] - row["psnr_diffusers"]) < 1e-3, row
            assert row["psnr_bns_rounded_vs_diffusers"] > 100, row
