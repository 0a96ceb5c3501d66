"""Prompts are data, not the model: label splits, conditioning outside the fingerprint.

A text model written as a user would (a frozen "encoder" turns each prompt into a vector once,
kept as a buffer the network declares as conditioning data) is trained on some prompts and
evaluated on others, through the Python API and through the command line (a spec kind that
takes prompts, registered the way a user registers theirs).
"""

from __future__ import annotations

import hashlib
import json

import pytest
import torch
from torch import nn

import bns
from bns.cli import main, split_prompts
from bns.evaluate import evaluate_psnr
from bns.pairs import make_pairs, pair_noise
from bns.specs import register_spec

pytestmark = pytest.mark.usefixtures("one_thread")


def _encode(prompt: str, dim: int = 8) -> torch.Tensor:
    """A stand-in text encoder: a fixed vector per prompt."""
    seed = int(hashlib.sha256(prompt.encode()).hexdigest()[:8], 16)
    return torch.randn(dim, generator=torch.Generator().manual_seed(seed))


class TextNet(nn.Module):
    bns_conditioning = ("embeds",)  # prompt embeddings: data, not weights

    def __init__(self, prompts: list[str], dim: int = 8):
        super().__init__()
        torch.manual_seed(0)
        self.l1, self.l2 = nn.Linear(2 * dim + 1, 32), nn.Linear(32, dim)
        rows = [_encode(p, dim) for p in prompts] + [torch.zeros(dim)]  # the last: no prompt
        self.register_buffer("embeds", torch.stack(rows))

    def forward(self, x, t, y):
        h = torch.cat([x, self.embeds[y], t[:, None].to(x.dtype)], 1)
        return self.l2(torch.tanh(self.l1(h)))


def text_model(prompts) -> bns.Model:
    """``prompts``: a list (every split draws from all) or ``{"train": ..., "val": ...,
    "test": ...}``."""
    splits = None
    if isinstance(prompts, dict):
        order, splits, k = [], {}, 0
        for name in ("train", "val", "test"):
            order += prompts[name]
            splits[name] = range(k, k + len(prompts[name]))
            k += len(prompts[name])
        prompts = order
    return bns.Model(
        TextNet(prompts),
        "velocity",
        bns.schedules.CondOT(),
        (8,),
        num_classes=len(prompts),
        name="toy-text",
        label_splits=splits,
    )


PROMPTS = {"train": ["a cat", "a dog", "a fox"], "val": ["a cow"], "test": ["an owl", "a bee"]}
OTHER = {"train": ["a cat", "a dog", "a fox"], "val": ["a hen"], "test": ["a yak", "an elk"]}


def test_each_split_draws_its_own_labels():
    model = text_model(PROMPTS)
    for split, want in (("train", {0, 1, 2}), ("val", {3}), ("test", {4, 5})):
        _, y = pair_noise(model, 0, split, range(60))
        assert set(y.tolist()) == want
    # Test noise on training prompts: the same x0 as the test pairs, training labels.
    x_test, _ = pair_noise(model, 0, "test", range(10))
    x_seen, y_seen = pair_noise(model, 0, "test", range(10), labels="train")
    assert torch.equal(x_test, x_seen) and set(y_seen.tolist()) <= {0, 1, 2}
    # Without splits every split draws from all labels, as before.
    plain = text_model(PROMPTS["train"] + PROMPTS["val"] + PROMPTS["test"])
    _, y = pair_noise(plain, 0, "val", range(200))
    assert set(y.tolist()) == set(range(6))


def test_held_out_prompts_change_nothing_about_the_model():
    a, b = text_model(PROMPTS), text_model(OTHER)
    assert a.fingerprint() == b.fingerprint()
    more = text_model({**OTHER, "test": OTHER["test"] + ["a gnu", "a ram"]})  # more of them
    assert more.fingerprint() == a.fingerprint() and more.num_classes == a.num_classes + 2
    # The weights still count: another network is another model.
    c = text_model(PROMPTS)
    with torch.no_grad():
        c.net.l1.weight[0, 0] += 1e-3
    assert c.fingerprint() != a.fingerprint()

    # A network that does not declare its embeddings as conditioning hashes them as weights.
    class Plain(TextNet):
        bns_conditioning = ()

    p1 = bns.Model(Plain(["a"]), "velocity", bns.schedules.CondOT(), (8,), num_classes=1)
    p2 = bns.Model(Plain(["b"]), "velocity", bns.schedules.CondOT(), (8,), num_classes=1)
    assert p1.fingerprint() != p2.fingerprint()


def test_the_ground_truth_cache_keys_on_the_prompts_each_split_uses(tmp_path):
    a, b = text_model(PROMPTS), text_model(OTHER)
    kw = dict(cache=tmp_path, progress=False, batch_size=4)
    train_a = make_pairs(a, 6, "train", **kw)
    files = set(tmp_path.glob("*.safetensors"))
    train_b = make_pairs(b, 6, "train", **kw)  # the same training prompts: read from the cache
    assert set(tmp_path.glob("*.safetensors")) == files
    assert torch.equal(train_a.x1, train_b.x1)
    test_a, test_b = make_pairs(a, 6, "test", **kw), make_pairs(b, 6, "test", **kw)
    assert len(set(tmp_path.glob("*.safetensors"))) == len(files) + 2  # other prompts: solved
    assert torch.equal(test_a.x0, test_b.x0) and not torch.allclose(test_a.x1, test_b.x1)
    # Each pair's label is the index of its prompt; the ground truth is that prompt's.
    x1 = bns.ground_truth(b, test_b.x0.double(), test_b.y)
    assert (x1.float() - test_b.x1).abs().max() < 1e-4


def test_label_splits_are_checked():
    net = TextNet(["a", "b"])
    args = ("velocity", bns.schedules.CondOT(), (8,))
    with pytest.raises(ValueError, match="outside"):
        bns.Model(net, *args, num_classes=2, label_splits={"train": [0, 2]})
    with pytest.raises(ValueError, match="empty"):
        bns.Model(net, *args, num_classes=2, label_splits={"train": []})
    with pytest.raises(ValueError, match="class-conditional"):
        bns.Model(net, *args, label_splits={"train": [0]})
    model = bns.Model(net, *args, num_classes=2, label_splits={"train": [0]})
    with pytest.raises(ValueError, match="not 'test'"):
        make_pairs(model, 2, "test", cache=False, progress=False)


def test_a_prompts_file_splits_by_a_seed():
    prompts = [f"prompt {i}" for i in range(10)]
    s = split_prompts(prompts, seed=0)
    assert [len(s[k]) for k in ("train", "val", "test")] == [6, 2, 2]
    assert sorted(s["train"] + s["val"] + s["test"]) == sorted(prompts)
    assert split_prompts(prompts, seed=0) == s and split_prompts(prompts, seed=1) != s
    assert [len(v) for v in split_prompts(prompts[:3]).values()] == [1, 1, 1]


@pytest.fixture()
def toy_kind():
    register_spec("toytext:", lambda rest, prompts=None: text_model(prompts), prompts=True)
    yield
    from bns import specs

    specs._REGISTRY.pop("toytext:")


def _write(path, lines):
    path.write_text("\n".join(lines) + "\n")
    return path


def test_train_on_some_prompts_evaluate_on_new_ones_from_the_command_line(tmp_path, toy_kind):
    tr = _write(tmp_path / "train.txt", PROMPTS["train"])
    va = _write(tmp_path / "val.txt", PROMPTS["val"])
    te = _write(tmp_path / "test.txt", PROMPTS["test"])
    new = _write(tmp_path / "new.txt", OTHER["test"])
    cache = tmp_path / "cache"
    out = tmp_path / "s.json"
    common = ["--model", "toytext:", "--cache-dir", str(cache), "--quiet"]
    argv = ["distill", *common, "--prompts", f"{tr},{va},{te}", "--nfe", "4", "--out", str(out)]
    argv += ["--train-pairs", "16", "--val-pairs", "8", "--init-pairs", "8", "--adam-steps", "4"]
    argv += ["--batch-size", "8", "--val-every", "2", "--init", "euler"]
    assert main(argv) == 0
    # New test prompts: the same model, so no --force; the report shows both prompt sets.
    res = tmp_path / "eval.json"
    argv = ["eval", *common, "--prompts", f"{tr},{va},{new}", "--solver", str(out)]
    argv += ["--baselines", "euler", "--nfe", "4", "--test-pairs", "8", "--json", str(res)]
    assert main(argv) == 0
    got = json.loads(res.read_text())
    assert {r["solver"] for r in got["rows"]} == {"euler", out.stem}
    assert {r["solver"] for r in got["rows_train_prompts"]} == {"euler", out.stem}
    # Held-out rows are on the new prompts, the others on the training prompts: both computed
    # here independently from the Python API on the same noise.
    model = text_model({"train": PROMPTS["train"], "val": PROMPTS["val"], "test": OTHER["test"]})
    solver = bns.NSSolver.load(out, model=model)
    kw = dict(cache=cache, progress=False)
    for rows, labels in ((got["rows"], None), (got["rows_train_prompts"], "train")):
        pairs = make_pairs(model, 8, "test", labels=labels, **kw)
        p = evaluate_psnr(model, solver, pairs)
        bns_row = next(r for r in rows if r["kind"] == "bns")
        assert abs(bns_row["psnr_mean"] - float(p.mean())) < 1e-6
    table = res.with_suffix(".md").read_text()
    assert "held-out prompts" in table and "training prompts" in table


def test_prompt_files_errors(tmp_path, toy_kind, capsys):
    tr = _write(tmp_path / "train.txt", PROMPTS["train"])
    empty = _write(tmp_path / "empty.txt", ["", "  "])
    two = _write(tmp_path / "two.txt", ["a", "b"])
    cases = [
        (f"{tr},{tmp_path / 'missing.txt'},{tr}", "prompts file not found"),
        (f"{tr},{empty},{tr}", "holds no prompt"),
        (f"{tr},{tr}", "one file or three"),
        (str(two), "at least 3 prompts"),
    ]
    for spec, message in cases:
        argv = ["distill", "--model", "toytext:", "--prompts", spec, "--nfe", "4"]
        argv += ["--out", str(tmp_path / "s.json")]
        assert main(argv) == 2
        assert message in capsys.readouterr().err
        assert not (tmp_path / "s.json").exists()
