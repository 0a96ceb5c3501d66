"""Ground-truth pairs: seeding, disjoint splits, and the on-disk cache."""

from __future__ import annotations

import warnings

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import bns
from bns import pairs as pairs_mod
from bns.models.gmm import gaussian_mixture_model
from bns.pairs import make_pairs, pair_noise


@pytest.fixture(scope="module")
def model():
    return gaussian_mixture_model(dim=16, components=4, num_classes=2, std=0.2, seed=3)


def test_pairs_are_seeded_per_sample_and_splits_disjoint(model, tmp_path):
    tr = make_pairs(model, 12, "train", cache=tmp_path, progress=False)
    va = make_pairs(model, 12, "val", cache=tmp_path, progress=False)
    te = make_pairs(model, 12, "test", cache=tmp_path, progress=False)
    allx = torch.cat([tr.x0, va.x0, te.x0]).reshape(36, -1)
    assert torch.cdist(allx, allx).add(torch.eye(36) * 1e9).min() > 1.0  # no shared noise
    # Any pair regenerates alone: the same noise and label, and its ground truth.
    x0, y = pair_noise(model, 0, "train", [7])
    assert torch.equal(x0.float(), tr.x0[7:8]) and torch.equal(y, tr.y[7:8])
    x1 = bns.ground_truth(model, x0.float().double(), y)
    assert torch.allclose(x1.float(), tr.x1[7:8], atol=1e-4)
    # Another seed gives other pairs.
    other = make_pairs(model, 12, "train", seed=1, cache=False, progress=False)
    assert not torch.allclose(other.x0, tr.x0)
    assert tr.y.dtype == torch.long and set(tr.y.tolist()) <= {0, 1}


def test_cache_is_reused_extended_and_keyed(model, tmp_path, monkeypatch):
    first = make_pairs(model, 8, "train", cache=tmp_path, progress=False)
    calls = []
    real = pairs_mod.ground_truth

    def counting(m, x0, *a, **k):
        calls.append(x0.shape[0])
        return real(m, x0, *a, **k)

    monkeypatch.setattr(pairs_mod, "ground_truth", counting)
    again = make_pairs(model, 8, "train", cache=tmp_path, progress=False)
    assert calls == [] and torch.equal(again.x1, first.x1)
    fewer = make_pairs(model, 5, "train", cache=tmp_path, progress=False)
    assert calls == [] and torch.equal(fewer.x1, first.x1[:5])
    more = make_pairs(model, 11, "train", cache=tmp_path, progress=False)
    assert calls == [3]  # only the missing pairs were computed
    assert torch.equal(more.x1[:8], first.x1)
    # Everything that determines the pairs is in the key: another guidance is another file.
    make_pairs(model, 4, "train", guidance=2.0, cache=tmp_path, progress=False)
    assert calls == [3, 4]
    make_pairs(model, 4, "train", rtol=1e-6, cache=tmp_path, progress=False)
    assert calls == [3, 4, 4]
    assert not list(tmp_path.glob(".*"))  # no temporary files left behind


def test_env_var_sets_cache_dir(model, tmp_path, monkeypatch):
    monkeypatch.setenv("BNS_CACHE_DIR", str(tmp_path / "c"))
    make_pairs(model, 2, "test", progress=False)
    assert len(list((tmp_path / "c").glob("pairs-*.safetensors"))) == 1


def _only_file(folder):
    (path,) = list(folder.glob("pairs-*.safetensors"))
    return path


def test_corrupt_cache_is_regenerated_not_used(model, tmp_path):
    good = make_pairs(model, 6, "val", cache=tmp_path, progress=False)
    path = _only_file(tmp_path)
    path.write_bytes(b"\x00garbage" * 10)
    with pytest.warns(UserWarning, match="unreadable|stale or corrupt"):
        again = make_pairs(model, 6, "val", cache=tmp_path, progress=False)
    assert torch.allclose(again.x1, good.x1, atol=1e-6)


def test_tampered_or_stale_cache_is_detected(model, tmp_path):
    good = make_pairs(model, 6, "val", cache=tmp_path, progress=False)
    path = _only_file(tmp_path)
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    tensors["x1"] = tensors["x1"] + 1.0  # a tampered value under the old checksum
    save_file(tensors, str(path), metadata=meta)
    with pytest.warns(UserWarning, match="stale or corrupt"):
        again = make_pairs(model, 6, "val", cache=tmp_path, progress=False)
    assert torch.allclose(again.x1, good.x1, atol=1e-6)
    # A file whose key says another model (e.g. copied over) is stale.
    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata())
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    meta["key"] = meta["key"].replace(model.fingerprint(), "0" * 16)
    save_file(tensors, str(path), metadata=meta)
    with pytest.warns(UserWarning, match="stale or corrupt"):
        make_pairs(model, 6, "val", cache=tmp_path, progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the regenerated file is good again
        make_pairs(model, 6, "val", cache=tmp_path, progress=False)


def test_bad_arguments(model):
    with pytest.raises(ValueError, match="at least one pair"):
        make_pairs(model, 0, cache=False)
    with pytest.raises(ValueError, match="split"):
        make_pairs(model, 2, "holdout", cache=False)


def _shards(folder):
    return sorted(folder.glob("shards/*/*.safetensors"))


def test_a_crash_keeps_the_finished_batches_and_a_rerun_computes_only_the_rest(
    model, tmp_path, monkeypatch
):
    fresh = make_pairs(model, 20, "train", batch_size=4, cache=tmp_path / "fresh", progress=False)
    real, calls = pairs_mod.ground_truth, []

    def crashing(m, x0, *a, **k):
        calls.append(x0.shape[0])
        if calls == [4, 4, 4]:  # the third batch of the first run
            raise RuntimeError("out of memory")
        return real(m, x0, *a, **k)

    monkeypatch.setattr(pairs_mod, "ground_truth", crashing)
    with pytest.raises(RuntimeError, match="out of memory"):
        make_pairs(model, 20, "train", batch_size=4, cache=tmp_path, progress=False)
    assert [p.name for p in _shards(tmp_path)] == [
        "000000000-000000004.safetensors",
        "000000004-000000008.safetensors",
    ]
    assert not list(tmp_path.glob("pairs-*")) and not list(tmp_path.rglob(".*"))
    calls[:] = [0]
    again = make_pairs(model, 20, "train", batch_size=4, cache=tmp_path, progress=False)
    assert calls == [0, 4, 4, 4]  # batches 2 to 4; the first two are read from their shards
    for k in ("x0", "x1", "y"):  # the same batches, so the same bits as an uninterrupted run
        assert torch.equal(getattr(again, k), getattr(fresh, k))
    assert again.nfe_per_sample == fresh.nfe_per_sample
    assert not _shards(tmp_path) and not (tmp_path / "shards").exists()


def test_a_corrupt_shard_is_recomputed_not_used(model, tmp_path, monkeypatch):
    fresh = make_pairs(model, 8, "val", batch_size=4, cache=tmp_path / "fresh", progress=False)
    real = pairs_mod.ground_truth

    def crashing(m, x0, *a, **k):
        if len(_shards(tmp_path)) == 1:
            raise RuntimeError("killed")
        return real(m, x0, *a, **k)

    monkeypatch.setattr(pairs_mod, "ground_truth", crashing)
    with pytest.raises(RuntimeError):
        make_pairs(model, 8, "val", batch_size=4, cache=tmp_path, progress=False)
    (shard,) = _shards(tmp_path)
    shard.write_bytes(shard.read_bytes()[:-8] + b"\xff" * 8)  # a flipped value
    monkeypatch.setattr(pairs_mod, "ground_truth", real)
    with pytest.warns(UserWarning, match="stale or corrupt"):
        again = make_pairs(model, 8, "val", batch_size=4, cache=tmp_path, progress=False)
    assert torch.equal(again.x1, fresh.x1)


def test_a_cache_file_never_shrinks(model, tmp_path, monkeypatch):
    """A job that finishes fewer pairs after another wrote more leaves the longer file."""
    real, done = pairs_mod.ground_truth, []

    def with_a_second_job(m, x0, *a, **k):
        if not done:  # another job writes 12 pairs while this one computes its 5
            done.append(1)
            monkeypatch.setattr(pairs_mod, "ground_truth", real)
            make_pairs(model, 12, "test", cache=tmp_path, progress=False)
        return real(m, x0, *a, **k)

    monkeypatch.setattr(pairs_mod, "ground_truth", with_a_second_job)
    five = make_pairs(model, 5, "test", cache=tmp_path, progress=False)
    longer = make_pairs(model, 12, "test", cache=False, progress=False)
    cached = pairs_mod._read_cache(
        _only_file(tmp_path), pairs_mod._key(model, 1.0, 0, "test", 1e-5, 1e-5)
    )
    assert cached["tensors"]["x0"].shape[0] == 12
    assert torch.equal(cached["tensors"]["x0"], longer.x0) and torch.equal(five.x0, longer.x0[:5])
