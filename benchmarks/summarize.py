"""Summarize every ``benchmarks/results/quality_*.json`` into ``results/summary.md``: BNS against
the best classical solver at each NFE, and the targets of the benchmark issue.

    python benchmarks/summarize.py
"""

from __future__ import annotations

import json
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


def main() -> None:
    lines = [
        "### BNS vs the best classical solver (PSNR in dB against dopri5, held-out test pairs)",
        "",
        "| model | guidance | NFE | BNS | best classical (same NFE) | gain | best classical at 2 NFE |"
        " BNS >= it? | run |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for path in sorted(RESULTS.glob("quality_*.json")):
        d = json.loads(path.read_text())
        for nfe, t in sorted(d["targets"].items(), key=lambda kv: int(kv[0])):
            two = t.get("best_classical_at_2n")
            two_txt = f"{two} {t['best_classical_at_2n_psnr']:.2f}" if two else ""
            ok = (
                ""
                if not two
                else (
                    "yes"
                    if t["bns"] >= t["best_classical_at_2n_psnr"]
                    else f"no ({t['bns'] - t['best_classical_at_2n_psnr']:+.2f})"
                )
            )
            lines.append(
                f"| {d['model']} | {d['guidance']:g} | {nfe} | {t['bns']:.2f} |"
                f" {t['best_classical']} {t['best_classical_psnr']:.2f} | {t['gain_db']:+.2f} |"
                f" {two_txt} | {ok} | {path.stem} |"
            )
    lines += ["", "Each run's protocol, machine and command are in its own .md and .json file."]
    (RESULTS / "summary.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
