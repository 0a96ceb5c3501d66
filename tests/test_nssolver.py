"""NSSolver and sample(): the recurrence, dtypes and shapes, gradients, checkpointing, and the
solver file (exact floats, validation, compatibility checks, atomic writes)."""

from __future__ import annotations

import json
import math
import os
import stat

import pytest
import torch
from torch import nn

import bns
import bns.solver as solver_module
from bns import Model, NSSolver, SolverFileError, sample
from bns.models.gmm import GaussianMixtureNet, gaussian_mixture_model
from bns.schedules import VP, CondOT
from bns.solver import FORMAT_VERSION

F64 = torch.float64


def random_solver(n: int = 3, seed: int = 0, t_range=(0.0, 1.0), **meta) -> NSSolver:
    g = torch.Generator().manual_seed(seed)
    inc = torch.rand(n, generator=g, dtype=F64) + 0.1
    times = torch.cat([torch.zeros(1, dtype=F64), torch.cumsum(inc, 0) / inc.sum()])
    times = t_range[0] + (t_range[1] - t_range[0]) * times
    times[-1] = t_range[1]
    a = 1 + 0.1 * torch.randn(n, generator=g, dtype=F64)
    b = torch.tril(torch.randn(n, n, generator=g, dtype=F64)) / n
    return NSSolver(times, a, b, dict(meta))


class Field(nn.Module):
    """A velocity field with a nonlinear dependence on x and t (no closed-form solution needed)."""

    def forward(self, x, t, y=None):
        t = t.reshape(-1, *[1] * (x.dim() - 1)).to(x.dtype)
        return torch.sin(x) * (1 + t) - 0.5 * x * t * t


def field_model(sample_shape=(3,)) -> Model:
    return Model(Field(), "velocity", CondOT(), sample_shape=sample_shape, dtype=F64)


def hand_recurrence(u, x0, times, a, b):
    """x_{i+1} = a_i x_0 + sum_{j<=i} b_ij u_j, written out independently of bns."""
    n = len(a)
    us, xs, x = [], [x0], x0
    for i in range(n):
        us.append(u(x, float(times[i])))
        nxt = a[i] * x0
        for j in range(i + 1):
            nxt = nxt + b[i][j] * us[j]
        x = nxt
        xs.append(x)
    return x, xs


def test_sample_equals_the_hand_computed_recurrence():
    model = field_model()
    solver = random_solver(4)
    x0 = torch.randn(5, 3, generator=torch.Generator().manual_seed(1), dtype=F64)

    def u(x, t):
        tt = torch.full((x.shape[0], 1), t, dtype=F64)
        return torch.sin(x) * (1 + tt) - 0.5 * x * tt * tt

    want, want_traj = hand_recurrence(
        u, x0, solver.times.tolist(), solver.a.tolist(), solver.b.tolist()
    )
    got, traj = sample(model, x0, solver, return_trajectory=True)
    torch.testing.assert_close(got, want, rtol=1e-14, atol=1e-14)
    assert len(traj) == solver.nfe + 1
    assert traj[0] is not None and torch.equal(traj[0], x0)
    assert torch.equal(traj[-1], got)
    for g, w in zip(traj, want_traj):
        torch.testing.assert_close(g, w, rtol=1e-14, atol=1e-14)
    assert model.forwards == 5 * solver.nfe


def test_euler_on_a_linear_ode():
    # u = -x (velocity prediction): Euler with n steps of h multiplies by (1 - h)^n.
    model = Model(lambda x, t, y=None: -x, "velocity", CondOT(), sample_shape=(2,))
    n = 5
    times = torch.linspace(0, 1, n + 1, dtype=F64)
    b = torch.tril(torch.full((n, n), 1.0 / n, dtype=F64))
    solver = NSSolver(times, torch.ones(n, dtype=F64), b)
    x0 = torch.tensor([[1.0, -2.0]], dtype=F64)
    torch.testing.assert_close(sample(model, x0, solver), x0 * (1 - 1 / n) ** n)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_any_sample_shape_and_dtype(dtype):
    shape = (2, 3, 4)  # [C, H, W]
    g = torch.Generator().manual_seed(0)
    d = math.prod(shape)
    net = GaussianMixtureNet(
        torch.randn(3, d, generator=g, dtype=F64),
        torch.full((3,), 0.3, dtype=F64),
        torch.ones(3, dtype=F64) / 3,
        torch.zeros(3, dtype=torch.long),
        CondOT(),
        "velocity",
        sample_shape=shape,
    )
    model = Model(net, "velocity", CondOT(), sample_shape=shape)
    solver = random_solver(3)
    x0 = torch.randn(2, *shape, generator=g, dtype=F64)
    ref = sample(model, x0, solver)
    out = sample(model, x0.to(dtype), solver)
    assert out.shape == (2, *shape) and out.dtype == dtype
    tol = 1e-12 if dtype == F64 else 1e-5
    torch.testing.assert_close(out.to(F64), ref, rtol=tol, atol=tol)
    # The same batch flattened to vectors gives the same samples: shapes do not mix samples.
    flat = Model(net, "velocity", CondOT(), sample_shape=(d,))
    torch.testing.assert_close(sample(flat, x0.reshape(2, d), solver).reshape(ref.shape), ref)


def test_half_precision_start_accumulates_in_float32():
    model = field_model()
    x0 = torch.randn(4, 3).to(torch.float16)
    out = sample(model, x0, random_solver(2))
    assert out.dtype == torch.float32


def test_velocity_override_and_labels_pass_through():
    model = gaussian_mixture_model(dim=3, components=4, num_classes=2, std=0.3)
    solver = random_solver(3)
    x0 = torch.randn(4, 3, dtype=F64)
    y = torch.tensor([0, 1, 1, 2])
    guided = sample(model, x0, solver, y, guidance=2.0)
    seen = []

    def velocity(x, t):
        seen.append(float(t))
        return model.velocity(x, t, y, 2.0)

    torch.testing.assert_close(sample(velocity, x0, solver), guided)
    assert seen == solver.times[:-1].tolist()
    assert not torch.allclose(sample(model, x0, solver, y), guided)


def _tiny_gmm():
    return gaussian_mixture_model(dim=2, components=2, std=0.5, seed=1)


def test_gradcheck_through_times_a_b_and_x0():
    model = _tiny_gmm()
    base = random_solver(3, seed=2)
    x0 = torch.randn(2, 2, generator=torch.Generator().manual_seed(3), dtype=F64)
    inner = base.times[1:-1].clone().requires_grad_(True)
    a = base.a.clone().requires_grad_(True)
    b_rows = torch.tril_indices(3, 3)
    b_vals = base.b[b_rows[0], b_rows[1]].clone().requires_grad_(True)
    x0 = x0.clone().requires_grad_(True)

    def run(inner, a, b_vals, x0):
        times = torch.cat([base.times[:1], inner, base.times[-1:]])
        b = torch.zeros(3, 3, dtype=F64).index_put((b_rows[0], b_rows[1]), b_vals)
        return sample(model, x0, NSSolver(times, a, b))

    assert torch.autograd.gradcheck(run, (inner, a, b_vals, x0))


def test_checkpoint_gives_the_same_values_and_gradients():
    model = gaussian_mixture_model(dim=3, components=3, std=0.3, seed=4)
    base = random_solver(4, seed=5)
    x0 = torch.randn(3, 3, generator=torch.Generator().manual_seed(6), dtype=F64)
    results = []
    for checkpoint in (False, True):
        times = base.times.clone().requires_grad_(True)
        a = base.a.clone().requires_grad_(True)
        b = base.b.clone().requires_grad_(True)
        x = x0.clone().requires_grad_(True)
        out = sample(model, x, NSSolver(times, a, b), checkpoint=checkpoint)
        loss = (out * out).sum().log()
        grads = torch.autograd.grad(loss, (times, a, b, x))
        results.append((out.detach(), grads))
    (o1, g1), (o2, g2) = results
    torch.testing.assert_close(o1, o2, rtol=0, atol=0)
    for u, v in zip(g1, g2):
        torch.testing.assert_close(u, v, rtol=1e-12, atol=1e-14)
    assert g1[0].abs().sum() > 0  # the times do get a gradient
    # Without grad, checkpoint is a no-op.
    with torch.no_grad():
        torch.testing.assert_close(sample(model, x0, base, checkpoint=True), o1)


# -- construction and validation -----------------------------------------------------------------
def test_constructor_checks_shapes():
    with pytest.raises(ValueError, match="shapes do not fit"):
        NSSolver(torch.zeros(3), torch.zeros(3), torch.zeros(3, 3))
    with pytest.raises(ValueError, match="shapes do not fit"):
        NSSolver(torch.zeros(4), torch.zeros(3), torch.zeros(3, 2))
    with pytest.raises(ValueError, match="at least one step"):
        NSSolver(torch.zeros(1), torch.zeros(0), torch.zeros(0, 0))
    s = NSSolver([0.0, 0.5, 1.0], [1.0, 1.0], [[0.5, 0.0], [0.0, 0.5]])
    assert s.times.dtype == F64 and s.nfe == 2 and s.t_range == (0.0, 1.0)
    assert "nfe=2" in repr(s)


@pytest.mark.parametrize(
    "times,a,b,match",
    [
        ([0.0, math.nan, 1.0], [1.0, 1.0], [[1.0, 0.0], [1.0, 1.0]], "non-finite"),
        ([0.0, 0.5, 1.0], [1.0, math.inf], [[1.0, 0.0], [1.0, 1.0]], "non-finite"),
        ([0.0, 0.7, 0.6, 1.0], [1.0] * 3, [[1.0, 0, 0], [1, 1, 0], [1, 1, 1]], "non-decreasing"),
        ([0.5, 0.5, 0.5], [1.0, 1.0], [[1.0, 0.0], [1.0, 1.0]], "t_0 < t_n"),
        ([0.0, 0.5, 1.0], [1.0, 1.0], [[1.0, 0.3], [1.0, 1.0]], "lower triangular"),
    ],
)
def test_validate_and_save_refuse_bad_values(tmp_path, times, a, b, match):
    s = NSSolver(times, a, b)
    with pytest.raises(SolverFileError, match=match):
        s.validate()
    with pytest.raises(SolverFileError, match=match):
        s.save(tmp_path / "s.json")
    assert not (tmp_path / "s.json").exists()


def test_strict_validation_and_range():
    s = NSSolver([0.0, 0.5, 0.5, 1.0], [1.0] * 3, torch.tril(torch.ones(3, 3)))
    s.validate()  # Runge-Kutta stages may share a time
    with pytest.raises(SolverFileError, match="strictly increasing"):
        s.validate(strict=True)
    with pytest.raises(SolverFileError, match="model's range"):
        s.validate(t_range=(0.0, 0.999))


# -- the file ---------------------------------------------------------------------------------------
def test_save_load_round_trip_is_exact(tmp_path):
    times = torch.tensor([0.0, 0.1 + 0.2, 1 / 3, 2 / 3, 1.0], dtype=F64)
    times[3] = math.nextafter(2 / 3, 1)
    a = torch.tensor([1 / 7, -1e-300, 5e-324, 1.0 + 2**-52], dtype=F64)
    b = torch.tril(torch.randn(4, 4, generator=torch.Generator().manual_seed(0), dtype=F64))
    meta = {"solver": "bns", "guidance": 1.0, "val_psnr": 41.25, "nested": {"k": [1, 2]}}
    s = NSSolver(times, a, b, meta)
    path = s.save(tmp_path / "sub" / "solver.json")
    back = NSSolver.load(path)
    assert torch.equal(back.times, s.times) and torch.equal(back.a, s.a)
    assert torch.equal(back.b, s.b)
    assert back.meta == meta
    data = json.loads(path.read_text())
    assert data["format"] == "bns-ns-solver" and data["format_version"] == FORMAT_VERSION
    assert data["nfe"] == 4 and [len(r) for r in data["b"]] == [1, 2, 3, 4]
    # Identical samples after the round trip.
    model = field_model()
    x0 = torch.randn(3, 3, dtype=F64)
    assert torch.equal(sample(model, x0, back), sample(model, x0, s))


def _resign(d):
    """Recompute the checksum so that a test reaches the check it is aimed at."""
    d = dict(d)
    d["checksum"] = solver_module._checksum(d)
    return d


def _write(path, d):
    path.write_text(json.dumps(d))
    return path


@pytest.mark.parametrize(
    "edit,match",
    [
        (lambda d: {**d, "format": "something-else"}, "not a bns solver file"),
        (lambda d: _resign({**d, "format_version": FORMAT_VERSION + 1}), "newer than this bns"),
        (lambda d: _resign({**d, "format_version": "1"}), "integer format_version"),
        (lambda d: _resign({**d, "format_version": 0}), "unknown solver format version"),
        (lambda d: {**d, "a": [d["a"][0] + 1e-9] + d["a"][1:]}, "checksum"),
        (lambda d: {k: v for k, v in d.items() if k != "checksum"}, "checksum"),
        (lambda d: _resign({**d, "times": d["times"][:-1]}), r"shapes do not fit nfe = 3"),
        (lambda d: _resign({**d, "a": d["a"] + [1.0]}), r"4 a \(want 3\)"),
        (lambda d: _resign({**d, "nfe": 2}), "shapes do not fit"),
        (lambda d: _resign({**d, "nfe": 0, "times": [0.0], "a": [], "b": []}), "at least 1"),
        (lambda d: _resign({**d, "nfe": "3"}), "nfe must be an integer"),
        (lambda d: _resign({**d, "a": [math.nan] + d["a"][1:]}), "non-finite"),
        (lambda d: _resign({**d, "times": [0.0, 0.6, 0.4, 1.0]}), "non-decreasing"),
        (lambda d: _resign({**d, "b": [[1.0, 0.5]] + d["b"][1:]}), "row 0 of b must hold 1"),
        (lambda d: _resign({**d, "b": [[1.0, 0, 0], [1, 1, 0], [1, 1, 1]]}), "row 0 of b"),
        (lambda d: _resign({**d, "a": ["x"] + d["a"][1:]}), "malformed"),
        (lambda d: _resign({k: v for k, v in d.items() if k != "times"}), "malformed"),
        (lambda d: _resign({**d, "meta": [1, 2]}), "'meta' must be an object"),
        (lambda d: [d], "not a bns solver file"),
    ],
)
def test_load_refuses_bad_files(tmp_path, edit, match):
    d = random_solver(3).to_dict()
    path = _write(tmp_path / "bad.json", edit(d))
    with pytest.raises(SolverFileError, match=match) as info:
        NSSolver.load(path)
    assert str(path) in str(info.value)  # the message names the file


def test_load_refuses_missing_and_non_json_files(tmp_path):
    with pytest.raises(SolverFileError, match="not found"):
        NSSolver.load(tmp_path / "missing.json")
    with pytest.raises(SolverFileError, match="not found"):
        NSSolver.load(tmp_path)  # a directory
    (tmp_path / "x.json").write_text("{not json")
    with pytest.raises(SolverFileError, match="cannot read"):
        NSSolver.load(tmp_path / "x.json")
    (tmp_path / "y.json").write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(SolverFileError, match="cannot read"):
        NSSolver.load(tmp_path / "y.json")


def test_load_checks_the_model_and_guidance(tmp_path):
    model = gaussian_mixture_model(dim=3, components=2, num_classes=2)
    other = gaussian_mixture_model(dim=3, components=2, num_classes=2, seed=9)
    assert model.fingerprint() != other.fingerprint()
    s = random_solver(3, model_fingerprint=model.fingerprint(), model_name=model.name, guidance=2.0)
    path = s.save(tmp_path / "s.json")
    NSSolver.load(path, model, guidance=2.0)
    NSSolver.load(path, model)  # guidance not asked: not checked
    with pytest.raises(SolverFileError, match="trained for model .* force=True"):
        NSSolver.load(path, other)
    with pytest.raises(
        SolverFileError,
        match=r"trained for guidance 2, asked for 3; sample at 2 \(guidance=2, --guidance 2\)",
    ):
        NSSolver.load(path, model, guidance=3.0)
    assert torch.equal(NSSolver.load(path, other, guidance=3.0, force=True).a, s.a)


def test_load_refuses_times_outside_the_model_range_even_with_force(tmp_path):
    model = gaussian_mixture_model(dim=3, components=2, schedule=VP(), t_range=(0.0, 0.999))
    s = random_solver(3, model_fingerprint=model.fingerprint())
    path = s.save(tmp_path / "s.json")
    for force in (False, True):
        with pytest.raises(SolverFileError, match="model's range"):
            NSSolver.load(path, model, force=force)
    ok = random_solver(3, t_range=(0.0, 0.999), model_fingerprint=model.fingerprint())
    NSSolver.load(ok.save(tmp_path / "ok.json"), model)


def test_save_is_atomic_and_keeps_the_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "s.json"
    good = random_solver(3, seed=1)
    good.save(path)
    before = path.read_bytes()

    def boom(*args, **kwargs):
        raise OSError("disk full")

    # A failure while writing the data ...
    monkeypatch.setattr(solver_module.os, "fsync", boom)
    with pytest.raises(OSError, match="disk full"):
        random_solver(3, seed=2).save(path)
    monkeypatch.undo()
    assert path.read_bytes() == before
    # ... or in the final rename leaves the old file and no temporary behind.
    monkeypatch.setattr(solver_module.os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        random_solver(3, seed=2).save(path)
    monkeypatch.undo()
    assert path.read_bytes() == before
    # A solver whose meta is not JSON fails before touching the file.
    with pytest.raises(SolverFileError, match="meta must be plain JSON"):
        random_solver(3, seed=2, val_psnr=math.nan).save(path)
    with pytest.raises(SolverFileError, match="meta must be plain JSON"):
        random_solver(3, seed=2, tensor=torch.zeros(2)).save(path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.json"]
    assert torch.equal(NSSolver.load(path).a, good.a)


def test_saved_file_has_the_usual_permissions(tmp_path):
    # mkstemp would make the file private (0600); a solver is meant to be shared.
    umask = os.umask(0o022)
    os.umask(umask)
    path = random_solver(2).save(tmp_path / "s.json")
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask


def test_detach_and_to_dict_do_not_share_storage():
    s = random_solver(2)
    s.times.requires_grad_(True)
    d = s.detach()
    assert not d.times.requires_grad
    d.a[0] = 123.0
    assert float(s.a[0]) != 123.0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_inference_path_equals_the_differentiable_path(dtype):
    """With nothing to differentiate the sampler takes its matrix-vector path; it agrees with the
    term-by-term differentiable path to rounding, and is bitwise the same in either grad mode."""
    m = gaussian_mixture_model(dim=10, components=3, std=0.2, seed=2)
    base = bns.solvers.midpoint(bns.grids.uniform(3))
    g = torch.Generator().manual_seed(1)
    n = base.nfe
    dense = bns.NSSolver(
        base.times,
        base.a + 0.01 * torch.randn(n, generator=g, dtype=torch.float64),
        base.b + 0.01 * torch.tril(torch.randn(n, n, generator=g, dtype=torch.float64)),
    )
    x0 = torch.randn(5, 10, generator=g, dtype=dtype)
    with torch.no_grad():
        fast, ftraj = bns.sample(m, x0, dense, return_trajectory=True)
    assert torch.equal(fast, bns.sample(m, x0, dense))  # grad mode on, nothing requires grad
    slow, straj = bns.sample(m, x0.clone().requires_grad_(True), dense, return_trajectory=True)
    assert slow.requires_grad
    tol = 1e-6 if dtype == torch.float32 else 1e-13
    for a, b in zip(ftraj, straj):
        assert torch.allclose(a, b.detach(), rtol=tol, atol=tol)
