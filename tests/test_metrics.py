"""PSNR and MSE: known values, per-sample shapes, dtypes and errors; the Frechet distance of FID
against closed forms and independent square roots."""

from __future__ import annotations

import math

import pytest
import torch

from bns.metrics import frechet_distance, mse, psnr


def test_psnr_known_values():
    ref = torch.zeros(2, 3, 4, 4)
    x = ref + 0.1  # MSE 0.01 for every sample
    torch.testing.assert_close(mse(x, ref), torch.full((2,), 0.01), rtol=1e-6, atol=0)
    want = 10 * math.log10(4 / 0.01)  # 26.0206 dB with R = 2
    assert abs(want - 26.0206) < 1e-4
    torch.testing.assert_close(psnr(x, ref), torch.full((2,), want), rtol=0, atol=1e-4)
    torch.testing.assert_close(
        psnr(x, ref, data_range=1.0), torch.full((2,), 20.0), rtol=0, atol=1e-4
    )
    x64 = torch.full((2, 3, 4, 4), 0.1, dtype=torch.float64)
    p64 = psnr(x64, torch.zeros_like(x64))
    torch.testing.assert_close(p64, torch.full((2,), want, dtype=torch.float64), rtol=0, atol=1e-12)


def test_psnr_is_per_sample():
    ref = torch.zeros(3, 5, dtype=torch.float64)
    x = torch.zeros(3, 5, dtype=torch.float64)
    x[0, 0] = 1.0  # MSE 1/5
    x[1] = 0.5  # MSE 1/4
    x[2, :2] = torch.tensor([3.0, -4.0])  # MSE 25/5
    p = psnr(x, ref)
    assert p.shape == (3,)
    want = torch.tensor([10 * math.log10(4 / m) for m in (0.2, 0.25, 5.0)], dtype=torch.float64)
    torch.testing.assert_close(p, want, rtol=0, atol=1e-12)
    # Samples of shape [] (a batch of scalars) and an empty batch work too.
    assert psnr(torch.ones(4), torch.zeros(4)).shape == (4,)
    assert psnr(torch.zeros(0, 3), torch.zeros(0, 3)).shape == (0,)


def test_identical_samples_give_infinite_psnr():
    x = torch.randn(2, 3)
    assert torch.all(psnr(x, x.clone()) == math.inf)


def test_dtypes():
    x = torch.ones(2, 3, dtype=torch.float16)
    ref = torch.zeros(2, 3, dtype=torch.float16)
    assert mse(x, ref).dtype == torch.float32
    assert mse(x, ref.double()).dtype == torch.float64
    assert psnr(x.bfloat16(), ref.bfloat16()).dtype == torch.float32


def test_errors():
    with pytest.raises(ValueError, match=r"shapes differ: \[2, 3\] vs \[2, 4\]"):
        psnr(torch.zeros(2, 3), torch.zeros(2, 4))
    with pytest.raises(ValueError, match="shapes differ"):
        mse(torch.zeros(2, 3), torch.zeros(3, 2))
    with pytest.raises(ValueError, match="0-d"):
        mse(torch.tensor(1.0), torch.tensor(0.0))
    for r in (0.0, -2.0, math.nan, math.inf):
        with pytest.raises(ValueError, match="data_range"):
            psnr(torch.ones(2, 3), torch.zeros(2, 3), data_range=r)


def _stats(features):
    f = features.double()
    d = f - f.mean(0)
    return f.mean(0), d.T @ d / (f.shape[0] - 1)


def _features(n, d, seed):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(d, d, generator=g, dtype=torch.float64) / d**0.5
    return torch.randn(n, d, generator=g, dtype=torch.float64) @ mix + torch.rand(d, generator=g)


@pytest.mark.parametrize("n", [40, 300])  # fewer samples than dimensions (as FID often has), more
def test_frechet_distance_of_a_set_to_itself_is_zero(n):
    mean, cov = _stats(_features(n, 64, 0))
    d = frechet_distance(mean, cov, mean, cov)
    assert abs(d) < 1e-11 * float(cov.trace())


def test_frechet_distance_closed_forms():
    # Commuting (diagonal) covariances: sum (sqrt(a) - sqrt(b))^2 plus the squared mean gap.
    a, b, m1, m2 = torch.tensor(
        [[1.0, 4.0, 0.25, 0.0], [9.0, 1.0, 0.25, 2.0], [0.0, 1.0, 2.0, 3.0], [1.0, 1.0, 0.0, 3.0]],
        dtype=torch.float64,
    )
    want = float(((a.sqrt() - b.sqrt()) ** 2).sum() + ((m1 - m2) ** 2).sum())
    assert frechet_distance(m1, torch.diag(a), m2, torch.diag(b)) == pytest.approx(want, abs=1e-12)
    # The same, rotated: the distance does not depend on the basis.
    q, _ = torch.linalg.qr(
        torch.randn(4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    )
    rot = frechet_distance(q @ m1, q @ torch.diag(a) @ q.T, q @ m2, q @ torch.diag(b) @ q.T)
    assert rot == pytest.approx(want, abs=1e-12)


def _independent(m1, c1, m2, c2):
    """tr sqrt(c1 c2) from the eigenvalues of the non-symmetric product (complex, general)."""
    tr_sqrt = torch.linalg.eigvals(c1 @ c2).sqrt().real.sum()
    return float(((m1 - m2) ** 2).sum() + c1.trace() + c2.trace() - 2 * tr_sqrt)


@pytest.mark.parametrize("d", [5, 64])
def test_frechet_distance_agrees_with_independent_square_roots(d):
    (m1, c1), (m2, c2) = _stats(_features(500, d, 1)), _stats(_features(300, d, 2) * 1.3)
    got = frechet_distance(m1, c1, m2, c2)
    assert got > 0
    assert got == pytest.approx(_independent(m1, c1, m2, c2), rel=1e-9)
    assert got == pytest.approx(frechet_distance(m2, c2, m1, c1), rel=1e-12)
    scipy_linalg = pytest.importorskip("scipy.linalg")
    root = scipy_linalg.sqrtm((c1 @ c2).numpy())
    want = float(((m1 - m2) ** 2).sum() + c1.trace() + c2.trace()) - 2 * float(root.trace().real)
    assert got == pytest.approx(want, rel=1e-9)


def test_frechet_distance_errors():
    with pytest.raises(ValueError, match="shapes do not fit"):
        frechet_distance(torch.zeros(3), torch.eye(3), torch.zeros(4), torch.eye(4))
