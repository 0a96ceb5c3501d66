"""PSNR and MSE: known values, per-sample shapes, dtypes and errors."""

from __future__ import annotations

import math

import pytest
import torch

from bns.metrics import mse, psnr


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
