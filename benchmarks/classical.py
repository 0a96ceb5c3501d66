"""The best classical solver, measured, against BNS and diffusers' own schedulers.

    python benchmarks/classical.py --model fmnist-ddpm --nfe 4,6,8,10,12,16 \
        --test-pairs 256 --grid-pairs 64 --bns --diffusers

For each NFE: every classical solver on every grid of the model (``bns.solvers.grid_names``),
measured on ``--grid-pairs`` validation pairs (where each solver's grid is chosen) and on the
test pairs (where it is reported); the fixed grid rule that the project used before grids were
measured; with ``--diffusers``, diffusers' own schedulers on the same noise and ground truth
(``benchmarks/diffusers_schedulers.py``); with ``--bns``, a BNS solver distilled with the
default settings. Writes ``classical_<model>_g<guidance>.json`` and ``.md``.

    python benchmarks/classical.py --summary classical_A.json classical_B.json
    python benchmarks/classical.py --annotate quality_A.json classical_A_range512.json

``--summary`` prints one table of several runs (the README's); ``--annotate`` adds to a
quality, FID or optimizers result the gains of its BNS solvers over the measured best classical
solver of a run on the same test pairs.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
from pathlib import Path

from quality import RESULTS, machine

import bns
from bns.classical import candidates, psnr_matrix, shared_evaluations
from bns.evaluate import evaluate_psnr
from bns.pairs import make_pairs
from bns.solvers import by_name, grid_names
from bns.solvers.ends import resolve_end
from bns.specs import load_model


def _diffusers_module():
    path = Path(__file__).with_name("diffusers_schedulers.py")
    spec = importlib.util.spec_from_file_location("diffusers_schedulers", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["diffusers_schedulers"] = mod
    spec.loader.exec_module(mod)
    return mod


def _best(entries: list[dict], key: str) -> dict:
    return max(entries, key=lambda e: e[key])


def measure_nfe(model, nfe, val, test, guidance, end) -> dict:
    """Every (solver, grid) at ``nfe``: validation and test PSNR; the three ways to pick."""
    cands = candidates(model, nfe, end=end)
    f0 = model.forwards
    m_val = psnr_matrix(model, cands, val, guidance).mean(1)
    spent = model.forwards - f0
    m_test = psnr_matrix(model, cands, test, guidance).mean(1)
    rows = [
        {
            "solver": c.meta["solver"],
            "grid": c.meta["grid"],
            "val": round(float(v), 4),
            "test": round(float(t), 4),
        }
        for c, v, t in zip(cands, m_val, m_test)
    ]
    # The rule (by_name's grid="default"): what the tables quoted before grids were measured.
    rule = []
    for name in dict.fromkeys(r["solver"] for r in rows):
        s = by_name(name, nfe, model)
        grid = s.meta["grid"]
        rule.append(next(r for r in rows if r["solver"] == name and r["grid"] == grid))
    # Measured: each solver on its best grid on validation pairs (bns eval), best on test.
    chosen = []
    for name in dict.fromkeys(r["solver"] for r in rows):
        chosen.append(_best([r for r in rows if r["solver"] == name], "val"))
    return {
        "nfe": nfe,
        "candidates": rows,
        "rule_best": _best(rule, "test"),
        "measured_best": _best(chosen, "test"),
        "oracle_best": _best(rows, "test"),
        "grid_search": {
            "candidates": len(cands),
            "evaluations_per_pair": shared_evaluations(cands),
            "unshared_evaluations_per_pair": sum(c.nfe for c in cands),
            "forwards_on_val": spent,
        },
    }


def run_bns(model, nfe, guidance, test, end, gn_steps=None) -> dict:
    t0 = time.perf_counter()
    kw = {} if gn_steps is None else {"gn_steps": gn_steps}
    solver, hist = bns.distill(model, nfe, guidance=guidance, progress=False, **kw)
    seconds = time.perf_counter() - t0
    p = evaluate_psnr(model, solver, test, guidance)
    init = bns.solvers.solver_from_label(model, nfe, solver.meta["init"], end)
    return {
        "nfe": nfe,
        "test": round(float(p.mean()), 4),
        "init": solver.meta["init"],
        "init_test": round(float(evaluate_psnr(model, init, test, guidance).mean()), 4),
        "seconds": round(seconds, 1),
        "evaluations": solver.meta["cost"]["total"]["forwards"]
        + solver.meta["cost"]["total"]["jvps"],
        "ranking_forwards": solver.meta["cost"]["ranking"]["forwards"],
        "gn_steps": hist.get("gn_steps_run", None),
    }


def run(args) -> dict:
    model = load_model(args.model)
    end = resolve_end(model, args.end)
    kw = dict(seed=args.seed, guidance=args.guidance, progress=False, end=end)
    val = make_pairs(model, args.grid_pairs, "val", **kw)
    test = make_pairs(model, args.test_pairs, "test", **kw)
    res = {
        "model": model.name,
        "guidance": args.guidance,
        "end": end,
        "grids": list(grid_names(model)),
        "protocol": {
            "grid_pairs": len(val),
            "test_pairs": len(test),
            "seed": args.seed,
            "ground_truth": "dopri5, rtol = atol = 1e-5",
        },
        "machine": machine(),
        "command": "python " + " ".join(sys.argv),
        "nfes": [],
    }
    diff_best = {}
    if args.diffusers_json is not None:  # diffusers_schedulers.py's run on the same pairs
        saved = json.loads(args.diffusers_json.read_text())
        want = {"test_pairs": len(test), "seed": args.seed, "end": end}
        got = {k: saved["protocol"][k] for k in want}
        if got != want or saved["model"] != model.name or saved["guidance"] != args.guidance:
            raise SystemExit(f"{args.diffusers_json} was run on other pairs: {got} vs {want}")
        diff_best = {int(n): r for n, r in saved["best"].items()}
        res["diffusers_source"] = str(args.diffusers_json)
    elif args.diffusers:
        diff = _diffusers_module()
        rows = diff.run_schedulers(model, test, args.nfe, args.guidance)
        res["diffusers_rows"] = rows
        diff_best = diff.best_per_nfe(rows)
    for nfe in args.nfe:
        entry = measure_nfe(model, nfe, val, test, args.guidance, end)
        if nfe in diff_best:
            entry["diffusers_best"] = diff_best[nfe]
        if args.bns:
            entry["bns"] = run_bns(model, nfe, args.guidance, test, end, args.bns_gn_steps)
        res["nfes"].append(entry)
        print(_row(entry), flush=True)
    return res


def _cls(r: dict) -> str:
    return f"{r['solver']} ({r['grid']}) {r['test']:.2f}"


def _diff_name(d: dict) -> str:
    return f"{d['scheduler']} {d['psnr_mean']:.2f}"


def _row(e: dict) -> str:
    diff = e.get("diffusers_best")
    best_classical = max(e["measured_best"]["test"], diff["psnr_mean"] if diff else -1e9)
    cells = [
        str(e["nfe"]),
        f"**{e['bns']['test']:.2f}**" if "bns" in e else "",
        _cls(e["measured_best"]),
        _diff_name(diff) if diff else "",
        f"{e['bns']['test'] - best_classical:+.2f}" if "bns" in e else "",
        _cls(e["rule_best"]),
        f"{e['measured_best']['test'] - e['rule_best']['test']:+.2f}",
    ]
    return "| " + " | ".join(cells) + " |"


def markdown(res: dict) -> str:
    p = res["protocol"]
    lines = [
        f"### {res['model']}, guidance {res['guidance']:g}: test PSNR (dB) on {p['test_pairs']}"
        f" pairs ending on the {res['end'] if res['end'] == 'data' else 'range end'}",
        "",
        f"Grids measured: {', '.join(res['grids'])}. Each classical solver's grid is chosen on"
        f" {p['grid_pairs']} validation pairs; the best solver is then the best on test (as"
        " `bns eval` reports it). The rule is the fixed grid choice used before grids were"
        " measured. diffusers' best is the best of its schedulers with their defaults, Karras"
        " sigmas and both `final_sigmas_type`s (`diffusers_*.md`).",
        "",
        "| NFE | BNS (default settings) | best classical, measured (grid) | diffusers' best |"
        " BNS gain over the best of both | the rule's best classical (grid) | measured minus rule |",
        "|---|---|---|---|---|---|---|",
    ]
    lines += [_row(e) for e in res["nfes"]]
    if any("bns" in e for e in res["nfes"]):
        lines += [
            "",
            "| NFE | BNS init | its test PSNR | BNS wall s | evaluations | ranking forwards |",
        ]
        lines += ["|---|---|---|---|---|---|"]
        for e in res["nfes"]:
            b = e.get("bns")
            if b:
                lines.append(
                    f"| {e['nfe']} | {b['init']} | {b['init_test']:.2f} | {b['seconds']} |"
                    f" {b['evaluations']:,} | {b['ranking_forwards']:,} |"
                )
    lines += ["", "Every solver on every grid (test PSNR; validation in brackets):", ""]
    solvers = list(dict.fromkeys(r["solver"] for e in res["nfes"] for r in e["candidates"]))
    grids = res["grids"]
    for e in res["nfes"]:
        lines += [f"NFE {e['nfe']}:", "", "| solver | " + " | ".join(grids) + " |"]
        lines.append("|---|" + "---|" * len(grids))
        for s in solvers:
            cell = {r["grid"]: r for r in e["candidates"] if r["solver"] == s}
            if cell:
                vals = [
                    f"{cell[g]['test']:.2f} ({cell[g]['val']:.2f})" if g in cell else ""
                    for g in grids
                ]
                lines.append(f"| {s} | " + " | ".join(vals) + " |")
        gs = e["grid_search"]
        lines += [
            "",
            f"{gs['candidates']} candidates: {gs['evaluations_per_pair']} evaluations per pair"
            f" shared, against {gs['unshared_evaluations_per_pair']} one by one.",
            "",
        ]
    lines += [f"Machine: {res['machine']}. Command: `{res['command']}`."]
    return "\n".join(lines) + "\n"


def summary(paths: list[Path]) -> str:
    """One table of several result files: per model and NFE, BNS, the measured best classical
    solver with its grid, diffusers' best, and the gain over the better of the two."""
    lines = [
        "| model | NFE | BNS | best classical, measured (grid) | diffusers' best |"
        " BNS gain | the rule's best (grid) |",
        "|---|---|---|---|---|---|---|",
    ]
    for path in paths:
        res = json.loads(Path(path).read_text())
        for e in res["nfes"]:
            m, d = e["measured_best"], e.get("diffusers_best")
            best = max(m["test"], d["psnr_mean"] if d else -1e9)
            b = e.get("bns")
            rule = e["rule_best"]
            cells = [
                f"`{res['model']}`",
                str(e["nfe"]),
                f"**{b['test']:.2f}**" if b else "",
                f"{m['solver']} ({m['grid']}) {m['test']:.2f}",
                f"{d['scheduler']} {d['psnr_mean']:.2f}" if d else "",
                f"{b['test'] - best:+.2f}" if b else "",
                f"{rule['solver']} ({rule['grid']}) {rule['test']:.2f}",
            ]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _bns_rows(res: dict) -> list[tuple[str, int, float]]:
    """``(label, nfe, test PSNR)`` of the learned solvers in a quality, FID or optimizers file."""
    if "runs" in res:  # optimizers.py
        return [(r["config"], r["nfe"], r["test_psnr"]) for r in res["runs"]]
    return [(r["solver"], r["nfe"], r["psnr_mean"]) for r in res["rows"] if r["kind"] == "bns"]


def annotate(result: Path, classical: Path) -> str:
    """Append to ``result``'s table (``.md``) and JSON the gains of its learned solvers over
    the measured best classical solver of ``classical`` (run on the same test pairs)."""
    res, cls = json.loads(result.read_text()), json.loads(classical.read_text())
    best = {e["nfe"]: e["measured_best"] for e in cls["nfes"]}
    lines = [
        "",
        f"### Against the measured best classical solver ({classical.name})",
        "",
        "The classical rows above took each solver's grid from a fixed rule. Measured over"
        f" every grid ({', '.join(cls['grids'])}; chosen on {cls['protocol']['grid_pairs']}"
        f" validation pairs, reported on the same {cls['protocol']['test_pairs']} test pairs):",
        "",
        "| solver | NFE | test PSNR | best classical at NFE, measured (grid) | gain | at 2 NFE |",
        "|---|---|---|---|---|---|",
    ]
    notes = []
    for label, nfe, psnr in _bns_rows(res):
        if nfe not in best:
            continue
        b, b2 = best[nfe], best.get(2 * nfe)
        two = f"{b2['solver']} ({b2['grid']}) {b2['test']:.2f}" if b2 else ""
        lines.append(
            f"| {label} | {nfe} | {psnr:.2f} | {b['solver']} ({b['grid']}) {b['test']:.2f} |"
            f" {psnr - b['test']:+.2f} | {two} |"
        )
        notes.append(
            {
                "solver": label,
                "nfe": nfe,
                "psnr": psnr,
                "best_classical": b,
                "best_classical_2n": b2,
            }
        )
    text = "\n".join(lines) + "\n"
    md = result.with_suffix(".md")
    old = md.read_text()
    cut = old.find("\n### Against the measured best classical solver")
    md.write_text((old if cut < 0 else old[:cut]) + text)  # rerunning replaces the section
    res["against_measured_classical"] = {"source": classical.name, "rows": notes}
    result.write_text(json.dumps(res, indent=1))
    return text


def main(argv=None) -> dict:
    if argv is None and "--summary" in sys.argv[1:2]:
        print(summary([Path(a) for a in sys.argv[2:]]))
        return {}
    if argv is None and "--annotate" in sys.argv[1:2]:  # --annotate RESULT.json CLASSICAL.json
        print(annotate(Path(sys.argv[2]), Path(sys.argv[3])))
        return {}
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("--guidance", type=float, default=1.0)
    p.add_argument("--nfe", type=lambda s: [int(v) for v in s.split(",")], default=[4, 6, 8])
    p.add_argument("--test-pairs", type=int, default=256)
    p.add_argument("--grid-pairs", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--end", default="auto", choices=("auto", "range", "data"))
    p.add_argument("--bns", action="store_true", help="also distill BNS (default settings)")
    p.add_argument(
        "--bns-gn-steps",
        type=int,
        default=None,
        help="Gauss-Newton steps of --bns's distillation (default: bns's)",
    )
    p.add_argument("--diffusers", action="store_true", help="also run diffusers' schedulers")
    p.add_argument(
        "--diffusers-json",
        type=Path,
        help="take diffusers' rows from a diffusers_schedulers.py result on the same pairs",
    )
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--tag", default="", help="suffix of the result files' names")
    args = p.parse_args(argv)
    res = run(args)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"classical_{res['model']}_g{args.guidance:g}{args.tag}"
    (args.out / f"{stem}.json").write_text(json.dumps(res, indent=1))
    (args.out / f"{stem}.md").write_text(markdown(res))
    print(markdown(res).split("\n\n")[2])
    return res


if __name__ == "__main__":
    main()
