"""Time to a solver: what each distillation setting costs and what it buys, from a cold cache.

    python benchmarks/time_to_solver.py --model fmnist-cfg --guidance 2 --nfe 4,8 \
        --configs previous,default

Each config is a set of ``DistillConfig`` overrides (``CONFIGS``; ``default`` is the current
defaults, ``previous`` the defaults before this benchmark: 520 train / 1024 validation pairs,
256 ranking pairs, 12 Gauss-Newton steps of 64 pairs, no stopping rule, tolerance 1e-5).
For each config and NFE it distills a solver and reports, from a cold cache:

- the network forwards and JVPs of every phase (ground truth per split, ranking, optimizer
  steps, validation) and their wall seconds; ground truth is charged at the per-pair rate
  measured when it was first solved (``gt_costs.json`` in the benchmark's cache), so that
  configs sharing pairs are charged as if each ran alone;
- the test PSNR on ``--test-pairs`` held-out pairs (tolerance 1e-5).

For ``previous`` (every Gauss-Newton step validated on 1024 pairs) it also replays stopping rules
and validation-set sizes on the recorded steps: every validated iterate is measured on the test
pairs and on the first 256 validation pairs, so a rule's choice and its cost up to the stop are
exact, with no second run. ``--ranking`` measures ranking the initial candidates on fewer
pairs, ``--tolerance`` the ground truth's own error against a much tighter reference.

Writes ``benchmarks/results/time_to_solver_<model>.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

from quality import RESULTS, machine

import bns
from bns.evaluate import evaluate_psnr
from bns.pairs import make_pairs
from bns.solvers.ends import resolve_end
from bns.specs import load_model
from bns.train import candidate_solvers, choose_initial_solver, distill

PREVIOUS = dict(
    train_pairs=520,
    val_pairs=1024,
    init_pairs=256,
    adam_steps=0,
    gn_steps=12,
    gn_batch_size=64,
    gn_patience=0,
    rtol=1e-5,
)
CONFIGS = {
    "previous": PREVIOUS,
    "default": {},
    "gnb32": {**PREVIOUS, "gn_batch_size": 32},
    "gnb16": {**PREVIOUS, "gn_batch_size": 16},
    "train256": {**PREVIOUS, "train_pairs": 256},
    "train128": {**PREVIOUS, "train_pairs": 128},
    "tol1e-4": {**PREVIOUS, "rtol": 1e-4},
}
RULES = [(1, 0.1), (2, 0.05), (2, 0.1), (2, 0.2), (3, 0.1), (0, 0.0)]  # (patience, min gain)


def _cache(args) -> Path:
    return Path(args.cache or os.environ.get("BNS_BENCH_CACHE", "/tmp/bns-bench-cache"))


class GroundTruth:
    """Pairs with their cold-cache cost: forwards and seconds per pair of each split and
    tolerance, measured when first solved and kept beside the cache."""

    def __init__(self, model, guidance: float, end: str, folder: Path) -> None:
        self.model, self.guidance, self.end, self.folder = model, guidance, end, folder
        self.path = folder / f"gt_costs_{model.name}_g{guidance:g}.json"
        self.rates = json.loads(self.path.read_text()) if self.path.exists() else {}

    def pairs(self, n: int, split: str, rtol: float) -> bns.pairs.Pairs:
        key = f"{split}:{rtol:g}"
        f0, t0 = self.model.forwards, time.perf_counter()
        kw = dict(seed=0, guidance=self.guidance, rtol=rtol, cache=self.folder, progress=False)
        p = make_pairs(self.model, n, split, end=self.end, **kw)
        spent, secs = self.model.forwards - f0, time.perf_counter() - t0
        old = self.rates.get(key, {"pairs": 0, "forwards": 0, "seconds": 0.0})
        if n > old["pairs"]:  # new pairs were solved: their cost joins the measured rate
            # (cached pairs cost nothing but, ending on the data, one evaluation each)
            new = n - old["pairs"]
            self.rates[key] = {
                "pairs": n,
                "forwards": old["forwards"] + spent,
                "seconds": old["seconds"] + secs,
                "new": new,
            }
            self.folder.mkdir(parents=True, exist_ok=True)
            self.path.write_text(json.dumps(self.rates, indent=1))
        return p

    def charge(self, n: int, split: str, rtol: float) -> dict:
        r = self.rates[f"{split}:{rtol:g}"]
        return {
            "forwards": round(n * r["forwards"] / r["pairs"]),
            "jvps": 0,
            "seconds": n * r["seconds"] / r["pairs"],
        }


def _config(name: str, nfe: int, guidance: float) -> bns.DistillConfig:
    cfg = bns.DistillConfig(nfe=nfe, guidance=guidance)
    return cfg.replace(**CONFIGS[name])


def _replay(records, test_psnr, val256, last_step, cost_at) -> list[dict]:
    """Each stopping rule, with the best iterate chosen on all validation pairs or on 256."""
    out = []
    by_step = {r["step"]: r for r in records}
    for val_name in ("val_all", "val256"):
        for patience, gain in RULES:
            best, best_step, stall, stop = -math.inf, 0, 0, last_step
            for step in range(0, last_step + 1):
                r = by_step.get(step)
                if r is None:  # rejected by Levenberg-Marquardt: not validated
                    stall += 1
                else:
                    v = r["val_psnr"] if val_name == "val_all" else val256[step]
                    g = v - best
                    if v > best:
                        best, best_step = v, step
                    if step > 0:
                        stall = 0 if g >= gain else stall + 1
                if step > 0 and 0 < patience <= stall:
                    stop = step
                    break
            out.append(
                {
                    "validation": val_name,
                    "patience": patience,
                    "min_gain": gain,
                    "stop_step": stop,
                    "best_step": best_step,
                    "test_psnr": test_psnr[best_step],
                    **cost_at(stop, val_name == "val256"),
                }
            )
    return out


def run_config(model, gt: GroundTruth, name, nfe, args, test, end) -> dict:
    cfg = _config(name, nfe, args.guidance)
    rtol = cfg.rtol or 1e-5
    train = gt.pairs(cfg.train_pairs, "train", rtol)
    val = gt.pairs(cfg.val_pairs, "val", rtol)
    records = []

    def callback(step, rec):
        records.append({"step": step, "val_psnr": rec["val_psnr"], "solver": rec["solver"]})
        records[-1]["cost"] = rec["cost"]

    t0 = time.perf_counter()
    solver, hist = distill(
        model, config=cfg, pairs=(train, val), progress=False, callback=callback, cache=False
    )
    wall = time.perf_counter() - t0
    cost = dict(hist["cost"])
    cost.pop("total", None)
    cost["ground_truth_train"] = gt.charge(cfg.train_pairs, "train", rtol)
    cost["ground_truth_val"] = gt.charge(cfg.val_pairs, "val", rtol)
    total = {k: sum(c[k] for c in cost.values()) for k in ("forwards", "jvps", "seconds")}
    p = evaluate_psnr(model, solver, test, args.guidance)
    row = {
        "config": name,
        "nfe": nfe,
        "settings": {k: getattr(cfg, k) for k in CONFIGS["previous"]}
        | {"gn_min_gain": cfg.gn_min_gain},
        "init": solver.meta["init"],
        "val_psnr": hist["best_val_psnr"],
        "test_psnr": float(p.mean()),
        "best_step": hist["best_step"],
        "steps_run": hist["steps_run"],
        "cost": cost,
        "total": total,
        "distill_wall_s": wall,
    }
    if name == "previous":
        test_by_step, val256 = {}, {}
        for r in records:
            s = r["solver"]
            test_by_step[r["step"]] = float(evaluate_psnr(model, s, test, args.guidance).mean())
            val256[r["step"]] = float(evaluate_psnr(model, s, val[:256], args.guidance).mean())
        ranking = cost["ranking"]

        def cost_at(step: int, small_val: bool = False) -> dict:
            """Cold-cache cost up to ``step``; ``small_val``: had 256 validation pairs been used
            (their ground truth and every validation scale down)."""
            rec = max((r for r in records if r["step"] <= step), key=lambda r: r["step"])
            c, share = rec["cost"], 256 / len(val) if small_val else 1.0
            small_gt = gt.charge(256, "val", rtol) if small_val else cost["ground_truth_val"]
            out = {}
            for k in ("forwards", "jvps", "seconds"):
                g = cost["ground_truth_train"][k] + small_gt[k]
                v = c["validation"][k] * share
                out[k] = round(g + ranking[k] + c["optimizer"][k] + v, 1)
            return out

        row["by_step"] = [
            {
                "step": r["step"],
                "val_psnr": r["val_psnr"],
                "val256": val256[r["step"]],
                "test_psnr": test_by_step[r["step"]],
                "cost": r["cost"],
            }
            for r in records
        ]
        row["replay"] = _replay(records, test_by_step, val256, hist["steps_run"], cost_at)
    return row


def ranking_study(model, gt, nfe, args, test, end) -> list[dict]:
    """Which initial solver ranking on k validation pairs picks, its test PSNR, its cost."""
    val = gt.pairs(256, "val", 1e-5)
    cfg = _config("previous", nfe, args.guidance)
    candidates = candidate_solvers(model, cfg)
    out = []
    for k in (16, 32, 64, 128, 256):
        f0, t0 = model.forwards, time.perf_counter()
        best, _, _ = choose_initial_solver(model, cfg.replace(init_pairs=k), val, candidates)
        row = {"nfe": nfe, "init_pairs": k, "candidates": len(candidates)}
        row.update(forwards=model.forwards - f0, seconds=time.perf_counter() - t0)
        row.update(init=best.meta["init"])
        row["test_psnr"] = float(evaluate_psnr(model, best, test, args.guidance).mean())
        out.append(row)
    return out


def tolerance_study(model, args, end) -> list[dict]:
    """The ground truth's own error (PSNR against rtol = atol = 1e-7) at looser tolerances."""
    n = args.tolerance_pairs
    kw = dict(seed=0, guidance=args.guidance, cache=False, progress=False, end=end)
    ref = make_pairs(model, n, "test", rtol=1e-7, batch_size=n, **kw)
    out = []
    for tol in (1e-3, 1e-4, 1e-5):
        p = make_pairs(model, n, "test", rtol=tol, batch_size=n, **kw)
        err = bns.metrics.psnr(p.x1, ref.x1)
        out.append(
            {
                "rtol": tol,
                "psnr_vs_1e-7": float(err.mean()),
                "worst": float(err.min()),
                "nfe_per_sample": p.nfe_per_sample,
            }
        )
    return out


def write(model_name: str, payload: dict) -> None:
    out = RESULTS / f"time_to_solver_{model_name}{payload['tag']}"
    out.with_suffix(".json").write_text(json.dumps(payload, indent=1))
    L = [f"### Time to a solver on {model_name} (guidance {payload['guidance']:g})", ""]
    L += [f"Machine: {payload['machine']}. Command: `{payload['command']}`.", ""]
    L += [
        "| NFE | config | init | test dB | best / run steps | forwards | JVPs | s |"
        " GT fwd | ranking fwd | optimizer fwd+JVP | validation fwd |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in payload["runs"]:
        c, t = r["cost"], r["total"]
        gt = c["ground_truth_train"]["forwards"] + c["ground_truth_val"]["forwards"]
        opt = c["optimizer"]["forwards"] + c["optimizer"]["jvps"]
        L.append(
            f"| {r['nfe']} | {r['config']} | {r['init']} | {r['test_psnr']:.2f} |"
            f" {r['best_step']} / {r['steps_run']} | {t['forwards']:,} | {t['jvps']:,} |"
            f" {t['seconds']:.0f} | {gt:,} | {c['ranking']['forwards']:,} | {opt:,} |"
            f" {c['validation']['forwards']:,} |"
        )
    L.append("")
    for r in payload["runs"]:
        if "replay" not in r:
            continue
        L += [
            f"Stopping rules replayed on `previous` at NFE {r['nfe']} (test dB of the chosen"
            " step; cost from a cold cache up to the stop):",
            "",
            "| validation | patience | min gain dB | stop | best | test dB | forwards | JVPs | s |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for x in r["replay"]:
            L.append(
                f"| {x['validation']} | {x['patience'] or 'off'} | {x['min_gain']} |"
                f" {x['stop_step']} | {x['best_step']} | {x['test_psnr']:.2f} |"
                f" {x['forwards']:,.0f} | {x['jvps']:,.0f} | {x['seconds']:.0f} |"
            )
        L.append("")
    if payload.get("ranking"):
        L += [
            "Ranking the initial candidates on k validation pairs:",
            "",
            "| NFE | k | candidates | picks | its test dB | forwards | s |",
            "|---|---|---|---|---|---|---|",
        ]
        for x in payload["ranking"]:
            L.append(
                f"| {x['nfe']} | {x['init_pairs']} | {x['candidates']} | {x['init']} |"
                f" {x['test_psnr']:.2f} | {x['forwards']:,} | {x['seconds']:.1f} |"
            )
        L.append("")
    if payload.get("tolerance"):
        L += [
            f"Ground truth against rtol = atol = 1e-7 on {payload['tolerance_pairs']} test pairs:",
            "",
            "| rtol = atol | PSNR vs 1e-7 (mean) | worst | NFE per sample |",
            "|---|---|---|---|",
        ]
        for x in payload["tolerance"]:
            L.append(
                f"| {x['rtol']:g} | {x['psnr_vs_1e-7']:.2f} | {x['worst']:.2f} |"
                f" {x['nfe_per_sample']:.0f} |"
            )
        L.append("")
    out.with_suffix(".md").write_text("\n".join(L))


def recharge(model_name: str) -> None:
    """Charge the ground truth of every result file of ``model_name`` again at the per-pair
    rate of its first solve (the first run of the ablations file, made on an empty cache).

    Runs made before a bookkeeping fix could see a cached split that ends on the data (one
    evaluation per pair) as newly solved, and then charge later runs at that rate; the
    optimizer, validation and ranking entries were measured and are kept as they are."""
    first = json.loads((RESULTS / f"time_to_solver_{model_name}_ablations.json").read_text())
    r0 = first["runs"][0]
    rate = {
        split: {
            k: r0["cost"][f"ground_truth_{split}"][k] / r0["settings"][f"{split}_pairs"]
            for k in ("forwards", "seconds")
        }
        for split in ("train", "val")
    }
    for path in sorted(RESULTS.glob(f"time_to_solver_{model_name}_*.json")):
        payload = json.loads(path.read_text())
        for run in payload["runs"]:
            cost, st = run["cost"], run["settings"]
            old = {s: dict(cost[f"ground_truth_{s}"]) for s in ("train", "val")}
            for split in ("train", "val"):
                n = st[f"{split}_pairs"]
                cost[f"ground_truth_{split}"] = {
                    "forwards": round(n * rate[split]["forwards"]),
                    "jvps": 0,
                    "seconds": n * rate[split]["seconds"],
                }
            run["total"] = {
                k: sum(c[k] for c in cost.values()) for k in ("forwards", "jvps", "seconds")
            }
            for x in run.get("replay", []):
                share = 256 / st["val_pairs"] if x["validation"] == "val256" else 1.0
                for k in ("forwards", "seconds"):
                    x[k] += cost["ground_truth_train"][k] - old["train"][k]
                    x[k] += (cost["ground_truth_val"][k] - old["val"][k]) * share
        payload["recharged_from"] = f"{first['command']} (first run)"
        path.write_text(json.dumps(payload, indent=1))
        write(model_name, payload)


def summary() -> str:
    """The previous default against the current one, per model and NFE, from every result file:
    test PSNR, network evaluations (forwards + JVPs) and seconds, cold cache."""
    runs: dict[tuple[str, float, int], dict[str, dict]] = {}
    for path in sorted(RESULTS.glob("time_to_solver_*.json")):
        payload = json.loads(path.read_text())
        for r in payload["runs"]:
            key = (payload["model"], payload["guidance"], r["nfe"])
            if r["config"] in ("previous", "default"):
                runs.setdefault(key, {})[r["config"]] = r
    L = [
        "| model | NFE | previous: test dB, evaluations, s | default: test dB, evaluations, s |"
        " evaluations | s | test dB |",
        "|---|---|---|---|---|---|---|",
    ]
    for (model, g, nfe), d in sorted(runs.items()):
        cells = []
        for name in ("previous", "default"):
            r = d.get(name)
            if r is None:
                cells.append("not run")
                continue
            t = r["total"]
            cells.append(
                f"{r['test_psnr']:.2f}, {t['forwards'] + t['jvps']:,.0f}, {t['seconds']:.0f}"
            )
        ratio = ["", "", ""]
        if len(d) == 2:
            p, n = d["previous"], d["default"]
            ev = lambda r: r["total"]["forwards"] + r["total"]["jvps"]  # noqa: E731
            ratio = [
                f"{ev(n) / ev(p):.2f}",
                f"{n['total']['seconds'] / p['total']['seconds']:.2f}",
                f"{n['test_psnr'] - p['test_psnr']:+.2f}",
            ]
        name = model if g == 1 else f"{model} (g {g:g})"
        L.append(f"| {name} | {nfe} | {cells[0]} | {cells[1]} | {' | '.join(ratio)} |")
    text = "\n".join(L) + "\n"
    (RESULTS / "time_to_solver_summary.md").write_text(
        "### Time to a solver: the previous default against the current one (cold cache)\n\n"
        "Ratios are current / previous; evaluations are network forwards plus JVPs, ground"
        " truth included. `python benchmarks/time_to_solver.py --summary`.\n\n" + text
    )
    return text


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="gmm")
    ap.add_argument("--guidance", type=float, default=1.0)
    ap.add_argument("--nfe", default="4,8,16")
    ap.add_argument("--configs", default="previous,default")
    ap.add_argument("--test-pairs", type=int, default=256)
    ap.add_argument("--ranking", action="store_true")
    ap.add_argument("--tolerance", action="store_true")
    ap.add_argument("--tolerance-pairs", type=int, default=64)
    ap.add_argument("--cache", default=None, help="the benchmark's ground-truth cache folder")
    ap.add_argument("--tag", default="")
    ap.add_argument("--summary", action="store_true", help="only write the summary table")
    ap.add_argument(
        "--recharge", action="store_true", help="only charge the ground truth again (recharge())"
    )
    args = ap.parse_args(argv)
    if args.recharge:
        recharge(args.model)
        return
    if args.summary:
        print(summary())
        return
    nfes = [int(v) for v in args.nfe.split(",")]
    model = load_model(args.model)
    end = resolve_end(model, "auto")
    gt = GroundTruth(model, args.guidance, end, _cache(args))
    test = gt.pairs(args.test_pairs, "test", 1e-5)
    payload = {
        "model": args.model,
        "guidance": args.guidance,
        "machine": machine(),
        "command": "python benchmarks/time_to_solver.py "
        + " ".join(sys.argv[1:] if argv is None else argv),
        "tag": args.tag,
        "test_pairs": args.test_pairs,
        "runs": [],
    }
    for nfe in nfes:
        for name in args.configs.split(","):
            row = run_config(model, gt, name, nfe, args, test, end)
            payload["runs"].append(row)
            print(
                f"{args.model} nfe={nfe} {name}: test {row['test_psnr']:.2f} dB, best"
                f" {row['best_step']}/{row['steps_run']}, {row['total']['forwards']:,} fwd"
                f" + {row['total']['jvps']:,} jvp, {row['total']['seconds']:.0f} s",
                flush=True,
            )
            write(args.model, payload)
    if args.ranking:
        payload["ranking"] = [
            r for nfe in nfes for r in ranking_study(model, gt, nfe, args, test, end)
        ]
        write(args.model, payload)
    if args.tolerance:
        payload["tolerance_pairs"] = args.tolerance_pairs
        payload["tolerance"] = tolerance_study(model, args, end)
    write(args.model, payload)


if __name__ == "__main__":
    main()
