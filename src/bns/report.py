"""Reports: a markdown table, a PSNR-vs-NFE plot and a sample grid (matplotlib, imported lazily)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from torch import Tensor

from ._io import atomic_write, atomic_write_text
from .evaluate import best_rows

__all__ = [
    "markdown_table",
    "write_results",
    "plot_psnr_vs_nfe",
    "save_sample_grid",
    "comparison_grid",
]


def markdown_table(rows: list[dict[str, Any]], title: str | None = None) -> str:
    """Solvers as rows, NFEs as columns, cells ``mean ± std`` dB; the best classical solver and
    the gap of BNS over it at each NFE below."""
    nfes = sorted({r["nfe"] for r in rows})
    names: list[str] = []
    for r in rows:
        if r["solver"] not in names:
            names.append(r["solver"])
    cell = {(r["solver"], r["nfe"]): r for r in rows}

    def grid(r: dict[str, Any]) -> str:
        return f" ({r['grid']})" if r.get("grid") else ""

    lines = [f"### {title}", ""] if title else []
    lines.append("| solver | " + " | ".join(f"NFE {n}" for n in nfes) + " |")
    lines.append("|---|" + "---|" * len(nfes))
    for name in names:
        vals = []
        for n in nfes:
            r = cell.get((name, n))
            vals.append(f"{r['psnr_mean']:.2f} ± {r['psnr_std']:.2f}{grid(r)}" if r else "")
        lines.append(f"| {name} | " + " | ".join(vals) + " |")
    best = best_rows(rows, "classical")
    bns_best = best_rows(rows, "bns")
    if best:
        lines.append(
            "| *best classical* | "
            + " | ".join(
                f"{best[n]['solver']}{grid(best[n])} {best[n]['psnr_mean']:.2f}"
                if n in best
                else ""
                for n in nfes
            )
            + " |"
        )
    if bns_best and best:
        lines.append(
            "| *BNS gain (dB)* | "
            + " | ".join(
                f"{bns_best[n]['psnr_mean'] - best[n]['psnr_mean']:+.2f}"
                if n in best and n in bns_best
                else ""
                for n in nfes
            )
            + " |"
        )
    return "\n".join(lines) + "\n"


def write_results(
    rows: list[dict[str, Any]],
    json_path: Path,
    extra: dict | None = None,
    table_path: Path | None = None,
    title: str | None = None,
    more_tables: list[tuple[str, list[dict[str, Any]]]] = (),
) -> None:
    """Write the rows as JSON (``{"rows": [...], **extra}``) and, optionally, the markdown table
    (then one more table per ``(title, rows)`` of ``more_tables``)."""
    payload = {"rows": rows, **(extra or {})}
    atomic_write_text(Path(json_path), json.dumps(payload, indent=1) + "\n")
    if table_path is not None:
        text = markdown_table(rows, title)
        for more_title, more_rows in more_tables:
            text += "\n" + markdown_table(more_rows, more_title)
        atomic_write_text(Path(table_path), text)


def plot_psnr_vs_nfe(rows: list[dict[str, Any]], path: Path, title: str = "") -> None:
    """PSNR (mean) against NFE, one line per solver; BNS drawn bold."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    names: list[str] = []
    for r in rows:
        if r["solver"] not in names:
            names.append(r["solver"])
    for name in names:
        rs = sorted((r for r in rows if r["solver"] == name), key=lambda r: r["nfe"])
        kind = rs[0].get("kind", "classical")
        style = {
            "bns": dict(lw=2.6, marker="o", color="black", zorder=5),
            "init": dict(lw=1.2, ls="--", marker="x", color="gray"),
        }.get(kind, dict(lw=1.0, marker=".", alpha=0.85))
        ax.plot([r["nfe"] for r in rs], [r["psnr_mean"] for r in rs], label=name, **style)
    ax.set_xlabel("NFE (velocity evaluations)")
    ax.set_ylabel("PSNR vs ground truth (dB)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    _save_figure(fig, Path(path))
    plt.close(fig)


def save_sample_grid(
    columns: dict[str, Tensor],
    path: Path,
    title: str = "",
    reference: str | None = None,
    error_gain: float = 10.0,
) -> None:
    """Images ``[B, C, H, W]`` in [-1, 1], one row per named set (same noise across rows).

    With ``reference`` (a key of ``columns``), every other set gets a row below it with its
    absolute error against the reference, times ``error_gain`` (black = none), because errors of
    30-40 dB PSNR are hard to see in the images themselves.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if reference is not None:
        ref = columns[reference].detach().float()
        rows: dict[str, Tensor] = {}
        for name, x in columns.items():
            rows[name] = x
            if name != reference:
                err = (x.detach().float() - ref).abs() * error_gain
                rows[f"{name}: |error| x{error_gain:g}"] = err.clamp(0, 2) - 1
        columns = rows
    names = list(columns)
    n = min(v.shape[0] for v in columns.values())
    fig, axes = plt.subplots(
        len(names), n, figsize=(n * 0.9, len(names) * 1.0 + 0.4), dpi=120, squeeze=False
    )
    for i, name in enumerate(names):
        imgs = columns[name].detach().float().clamp(-1, 1)
        for j in range(n):
            ax = axes[i][j]
            img = imgs[j]
            if img.shape[0] == 1:
                ax.imshow(img[0].numpy(), cmap="gray", vmin=-1, vmax=1)
            else:
                ax.imshow(((img.permute(1, 2, 0) + 1) / 2).numpy())
            ax.set_xticks([])
            ax.set_yticks([])
            if j == 0:
                ax.set_ylabel(name, fontsize=7, rotation=0, ha="right", va="center")
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    _save_figure(fig, Path(path))
    plt.close(fig)


def comparison_grid(model, entries, rows, test, guidance: float, path: Path, title: str) -> None:
    """Ground truth, every BNS solver of ``rows`` and the best classical solver at its NFE, on
    the same test noise (the first 8 pairs), with each one's error against the ground truth."""
    import torch

    from .solver import sample

    p = test[: min(8, len(test))]
    best = best_rows(rows)
    solvers = {(name, nfe): s for name, nfe, s in entries}
    columns = {"ground truth": p.x1}
    with torch.no_grad():
        for r in rows:
            if r["kind"] != "bns":
                continue
            shown = [r] + ([best[r["nfe"]]] if r["nfe"] in best else [])
            for row in shown:
                columns[f"{row['solver']} {row['nfe']}"] = sample(
                    model, p.x0, solvers[row["solver"], row["nfe"]], p.y, guidance
                )
    save_sample_grid(columns, path, title, reference="ground truth")


def _save_figure(fig, path: Path) -> None:
    """Write ``fig`` atomically (a full disk leaves the old file or none, never half a PNG),
    in the format its name says (``png`` by default)."""
    fmt = path.suffix[1:].lower() or "png"
    atomic_write(path, lambda tmp: fig.savefig(tmp, format=fmt))
