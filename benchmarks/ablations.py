"""Ablations of BNS distillation: what each choice buys, on one model and one protocol.

    python benchmarks/ablations.py --model gmm --steps 300

On the same pairs (seed 0), budget and test set, one change at a time from the defaults:

- family (bns, time, scale-time, multistep) at each NFE;
- loss (log-MSE, MSE, L1);
- initial solver, and the preconditioning sigma0 of a Runge-Kutta init;
- training pairs, 16 to 1024: test PSNR and the train/test gap;
- guidance 1, 2, 4, 8: BNS's gain over the best classical solver at each;
- generalization: a solver trained at guidance w used at other w (against one trained there),
  and one trained on half of the classes tested on the other half.

Writes ``benchmarks/results/ablations_<model>.json``, ``.md`` and ``.png``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from quality import RESULTS, machine

import bns
from bns.evaluate import baseline_solvers, evaluate_psnr
from bns.pairs import make_pairs
from bns.specs import load_model
from bns.train import distill


class Bench:
    """Pairs per guidance (cached), a distill-and-test helper and the reduced protocol."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.model = load_model(args.model)
        self._pairs: dict = {}

    def pairs(self, split: str, n: int, guidance: float = 1.0, model=None) -> bns.pairs.Pairs:
        model = model or self.model
        key = (id(model), split, n, guidance)
        if key not in self._pairs:
            self._pairs[key] = make_pairs(
                model, n, split, guidance=guidance, seed=0, progress=False, cache=True
            )
        return self._pairs[key]

    def test(self, solver, guidance: float = 1.0, model=None) -> float:
        model = model or self.model
        test = self.pairs("test", self.args.test_pairs, guidance, model)
        return float(evaluate_psnr(model, solver, test, guidance).mean())

    def distill(self, nfe: int, guidance: float = 1.0, model=None, train_pairs=None, **kw):
        a = self.args
        model = model or self.model
        train = self.pairs("train", train_pairs or a.train_pairs, guidance, model)
        val = self.pairs("val", a.val_pairs, guidance, model)
        t0 = time.perf_counter()
        solver, hist = distill(
            model,
            nfe,
            guidance=guidance,
            pairs=(train, val),
            adam_steps=a.steps,
            batch_size=min(a.batch_size, len(train)),
            init_pairs=min(a.init_pairs, a.val_pairs),
            progress=False,
            **kw,
        )
        return solver, {"seconds": round(time.perf_counter() - t0, 1), "init": solver.meta["init"]}

    def best_classical(self, nfe: int, guidance: float = 1.0, model=None) -> tuple[str, float]:
        model = model or self.model
        test = self.pairs("test", self.args.test_pairs, guidance, model)
        scores = {
            name: float(evaluate_psnr(model, s, test, guidance).mean())
            for name, _, s in baseline_solvers(model, [nfe])
        }
        name = max(scores, key=scores.get)
        return name, scores[name]


def family_rows(b: Bench) -> list[dict]:
    rows = []
    for nfe in b.args.nfe:
        for family in ("bns", "time", "scale-time", "multistep"):
            solver, info = b.distill(nfe, family=family)
            rows.append({"nfe": nfe, "family": family, "psnr": b.test(solver), **info})
        name, psnr = b.best_classical(nfe)
        rows.append({"nfe": nfe, "family": f"best classical ({name})", "psnr": psnr})
    return rows


def loss_rows(b: Bench, nfe: int) -> list[dict]:
    rows = []
    for loss in ("log-mse", "mse", "l1"):
        solver, info = b.distill(nfe, loss=loss)
        rows.append({"loss": loss, "psnr": b.test(solver), **info})
    return rows


def init_rows(b: Bench, nfe: int) -> list[dict]:
    rows = []
    for init in ("best", "euler", "midpoint", "ipndm", "dpmpp2m"):
        solver, info = b.distill(nfe, init=init, precondition=None if init != "best" else "auto")
        start = bns.solvers.solver_from_label(b.model, nfe, solver.meta["init"])
        rows.append({**info, "asked": init, "psnr": b.test(solver), "init_psnr": b.test(start)})
    for sigma0 in (0.5, 1.0, 2.0):
        solver, info = b.distill(nfe, init="midpoint", precondition=sigma0)
        start = bns.solvers.solver_from_label(b.model, nfe, solver.meta["init"])
        rows.append(
            {
                **info,
                "asked": f"midpoint+pc{sigma0:g}",
                "psnr": b.test(solver),
                "init_psnr": b.test(start),
            }
        )
    return rows


def pairs_rows(b: Bench, nfe: int) -> list[dict]:
    rows = []
    for n in b.args.pair_counts:
        solver, info = b.distill(nfe, train_pairs=n)
        train = b.pairs("train", n)
        psnr_train = float(evaluate_psnr(b.model, solver, train).mean())
        psnr_test = b.test(solver)
        rows.append(
            {
                "train_pairs": n,
                "psnr_test": psnr_test,
                "psnr_train": psnr_train,
                "gap": psnr_train - psnr_test,
                **info,
            }
        )
    return rows


def guidance_rows(b: Bench, nfe: int) -> tuple[list[dict], dict]:
    rows, solvers = [], {}
    for w in b.args.guidance:
        solver, info = b.distill(nfe, guidance=w)
        solvers[w] = solver
        name, best = b.best_classical(nfe, w)
        psnr = b.test(solver, w)
        rows.append(
            {
                "guidance": w,
                "bns": psnr,
                "best_classical": name,
                "best_classical_psnr": best,
                "gain": psnr - best,
                **info,
            }
        )
    return rows, solvers


def transfer_rows(b: Bench, solvers: dict) -> list[dict]:
    """A solver trained at w_train used at each w_test, against the one trained at w_test."""
    rows = []
    for w_train, solver in solvers.items():
        for w_test, own in solvers.items():
            rows.append(
                {
                    "trained_at": w_train,
                    "used_at": w_test,
                    "psnr": b.test(solver, w_test),
                    "own_psnr": b.test(own, w_test),
                }
            )
    return rows


def class_half_rows(b: Bench, nfe: int) -> list[dict]:
    """Trained on the first half of the classes, tested on the other half (label splits)."""
    k = b.model.num_classes
    if not k or k < 2:
        return []
    seen, unseen = list(range(k // 2)), list(range(k // 2, k))
    half = load_model(b.args.model)
    half.label_splits = {"train": seen, "val": seen, "test": unseen}
    full = load_model(b.args.model)
    full.label_splits = {"train": list(range(k)), "val": list(range(k)), "test": unseen}
    rows = []
    for name, model in (("half of the classes", half), ("all classes", full)):
        solver, info = b.distill(nfe, model=model)
        rows.append(
            {"trained_on": name, "psnr_on_unseen_half": b.test(solver, model=model), **info}
        )
    return rows


def _md_table(rows: list[dict], cols: list[str]) -> str:
    def fmt(v):
        return f"{v:.2f}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in cols) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def report(res: dict) -> str:
    a = res["protocol"]
    n1 = a["nfe_single"]
    sections = [
        ("Family, per NFE", "family", ["nfe", "family", "psnr", "init", "seconds"]),
        (f"Loss (NFE {n1})", "loss", ["loss", "psnr", "init", "seconds"]),
        (
            f"Initialization and preconditioning sigma0 (NFE {n1})",
            "init",
            ["asked", "init", "init_psnr", "psnr", "seconds"],
        ),
        (
            f"Training pairs (NFE {n1})",
            "pairs",
            ["train_pairs", "psnr_train", "psnr_test", "gap", "seconds"],
        ),
        (
            f"Guidance (NFE {n1})",
            "guidance",
            ["guidance", "bns", "best_classical", "best_classical_psnr", "gain"],
        ),
        (
            f"A solver trained at one guidance, used at another (NFE {n1})",
            "transfer",
            ["trained_at", "used_at", "psnr", "own_psnr"],
        ),
        (
            f"Trained on half of the classes, tested on the other half (NFE {n1})",
            "class_halves",
            ["trained_on", "psnr_on_unseen_half", "seconds"],
        ),
    ]
    out = [
        f"## Ablations on {res['model']} (PSNR in dB on {a['test_pairs']} test pairs; "
        f"{a['train_pairs']} train / {a['val_pairs']} val pairs, {a['steps']} steps, "
        f"batch {a['batch_size']})",
        "",
    ]
    for title, key, cols in sections:
        if res.get(key):  # sections not run (--sections) are left out
            out += [f"### {title}", _md_table(res[key], cols)]
    out += [f"Machine: {res['machine']}. Command: `{res['command']}`.", ""]
    return "\n".join(out)


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(18, 4), dpi=110)
    ax = axes[0]
    for fam in dict.fromkeys(r["family"] for r in res["family"]):
        rs = [r for r in res["family"] if r["family"] == fam]
        ax.plot([r["nfe"] for r in rs], [r["psnr"] for r in rs], marker="o", label=fam)
    ax.set(xlabel="NFE", ylabel="test PSNR (dB)", title="family")
    ax.legend(fontsize=7)
    ax = axes[1]
    rs = res["pairs"]
    ax.semilogx([r["train_pairs"] for r in rs], [r["psnr_test"] for r in rs], "o-", label="test")
    ax.semilogx([r["train_pairs"] for r in rs], [r["psnr_train"] for r in rs], "s--", label="train")
    ax.set(xlabel="training pairs", ylabel="PSNR (dB)", title="training pairs")
    ax.legend(fontsize=7)
    ax = axes[2]
    rs = res["guidance"]
    ax.plot([r["guidance"] for r in rs], [r["bns"] for r in rs], "o-", label="BNS")
    ax.plot(
        [r["guidance"] for r in rs],
        [r["best_classical_psnr"] for r in rs],
        "s--",
        label="best classical",
    )
    ax.set(xlabel="guidance w", ylabel="test PSNR (dB)", title="guidance")
    ax.legend(fontsize=7)
    ax = axes[3]
    for w_train in dict.fromkeys(r["trained_at"] for r in res["transfer"]):
        rs = [r for r in res["transfer"] if r["trained_at"] == w_train]
        ax.plot(
            [r["used_at"] for r in rs],
            [r["psnr"] for r in rs],
            marker="o",
            label=f"trained at w={w_train:g}",
        )
    rs = [r for r in res["transfer"] if r["trained_at"] == r["used_at"]]
    ax.plot(
        [r["used_at"] for r in rs],
        [r["own_psnr"] for r in rs],
        "k--",
        lw=2,
        label="trained at each w",
    )
    ax.set(xlabel="guidance used", ylabel="test PSNR (dB)", title="guidance transfer")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="gmm")
    p.add_argument("--nfe", type=lambda s: [int(v) for v in s.split(",")], default=[4, 6, 8])
    p.add_argument("--nfe-single", type=int, default=6, help="the NFE of the other ablations")
    p.add_argument(
        "--guidance", type=lambda s: [float(v) for v in s.split(",")], default=[1.0, 2.0, 4.0, 8.0]
    )
    p.add_argument(
        "--pair-counts",
        type=lambda s: [int(v) for v in s.split(",")],
        default=[16, 32, 64, 128, 256, 512, 1024],
    )
    p.add_argument("--train-pairs", type=int, default=256)
    p.add_argument("--val-pairs", type=int, default=256)
    p.add_argument("--init-pairs", type=int, default=128)
    p.add_argument("--test-pairs", type=int, default=512)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=24)
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--tag", default="")
    p.add_argument(
        "--sections",
        default="family,loss,init,pairs,guidance",
        help="which ablations to run (guidance includes the transfer and class halves)",
    )
    args = p.parse_args()
    b = Bench(args)
    n1 = args.nfe_single
    t0 = time.perf_counter()
    res: dict = {"model": b.model.name}
    steps = [
        ("family", lambda: family_rows(b)),
        ("loss", lambda: loss_rows(b, n1)),
        ("init", lambda: init_rows(b, n1)),
        ("pairs", lambda: pairs_rows(b, n1)),
    ]
    chosen = args.sections.split(",")
    for name, fn in steps:
        res[name] = fn() if name in chosen else []
        print(f"{name}: done, {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    if b.model.num_classes and "guidance" in chosen:
        res["guidance"], solvers = guidance_rows(b, n1)
        res["transfer"] = transfer_rows(b, solvers)
        res["class_halves"] = class_half_rows(b, n1)
    else:
        res["guidance"], res["transfer"], res["class_halves"] = [], [], []
    res["protocol"] = {k: v for k, v in vars(args).items() if k not in ("out",)}
    res["protocol"]["out"] = str(args.out)
    res["seconds"] = round(time.perf_counter() - t0, 1)
    res["machine"] = machine()
    res["command"] = " ".join(["python", "benchmarks/ablations.py", *sys.argv[1:]])
    stem = f"ablations_{b.model.name}{args.tag}"
    (args.out / f"{stem}.json").write_text(json.dumps(res, indent=1) + "\n")
    (args.out / f"{stem}.md").write_text(report(res))
    plot(res, args.out / f"{stem}.png")
    print(report(res))


if __name__ == "__main__":
    main()
