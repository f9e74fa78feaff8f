"""PNG plots of the experiments' tables (matplotlib, Agg backend, imported only when plotting).

Each function takes the rows of :mod:`bench.evals.scoring` and writes one PNG; fonts and sizes are fixed
and no timestamps are embedded (``metadata``), so the same tables give the same files.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from bench.evals.scoring import passkey_grid

_META = {"Software": None}  # no matplotlib version stamp: same data, same bytes


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _plain_numbers(axis) -> None:
    from matplotlib.ticker import FuncFormatter

    formatter = FuncFormatter(lambda v, _: f"{v:g}")
    axis.set_major_formatter(formatter)
    axis.set_minor_formatter(formatter)


def _style(method: str) -> dict:
    """Unscaled: a thick grey line underneath (others that equal it stay visible on top); the plugin's
    methods solid; static methods dashed."""
    if method == "unscaled":
        return {"color": "0.55", "linewidth": 4, "alpha": 0.6, "linestyle": "-", "zorder": 1}
    return {"linestyle": "-" if method.startswith("dynamic") else "--", "linewidth": 1.4, "zorder": 2}


def _length_label(n: int) -> str:
    return f"{n // 1024}k" if n % 1024 == 0 else str(n)


def _save_length_plot(plt, fig, ax, lengths: Sequence[int], ylabel: str, title: str, path: Path) -> Path:
    """Finish a plot against context length (log2 axis, one tick per length) and write it to ``path``."""
    ax.set_xscale("log", base=2)
    ax.set_xticks(lengths, [_length_label(n) for n in lengths])
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=7)
    ax.set_title(title, fontsize=10)
    ax.grid(True, linewidth=0.3)
    fig.savefig(path, dpi=110, bbox_inches="tight", metadata=_META)
    plt.close(fig)
    return path


def passkey_heatmaps(rows: Sequence[Mapping], methods: Sequence[str], variant: str, path: Path, *,
                     labels: Mapping[str, str], title: str) -> Path:
    """One heatmap per method: context length (rows) x needle depth (columns), accuracy over seeds."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(methods), figsize=(3.2 * len(methods) + 1, 3.4), squeeze=False)
    image = None
    for ax, method in zip(axes[0], methods):
        lengths, depths, grid = passkey_grid(rows, method, variant)
        values = [[float("nan") if v is None else v for v in line] for line in grid]
        image = ax.imshow(values or [[float("nan")]], vmin=0, vmax=1, cmap="RdYlGn", aspect="auto",
                          origin="lower")
        ax.set_xticks(range(len(depths)), [f"{d:g}" for d in depths], fontsize=7)
        ax.set_yticks(range(len(lengths)), [_length_label(n) for n in lengths], fontsize=8)
        for i, line in enumerate(grid):
            for j, v in enumerate(line):
                if v is not None:
                    ax.text(j, i, f"{v:.2g}", ha="center", va="center", fontsize=7)
        ax.set_title(labels.get(method, method), fontsize=9)
        ax.set_xlabel("needle depth", fontsize=8)
    axes[0][0].set_ylabel("context length", fontsize=8)
    if image is not None:
        fig.colorbar(image, ax=axes[0].tolist(), shrink=0.8, label="accuracy")
    fig.suptitle(title, fontsize=10)
    fig.savefig(path, dpi=110, bbox_inches="tight", metadata=_META)
    plt.close(fig)
    return path


def perplexity_lines(table: Sequence[Mapping], methods: Sequence[str], path: Path, *,
                     labels: Mapping[str, str], original_context: int, title: str,
                     value: str = "ppl") -> Path:
    """Perplexity against context length, one line per method (the paper's Figure 1), log-log axes; where
    a point is the mean of several documents, a bar spans their minimum to maximum."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.2))
    lengths = sorted({row["length"] for row in table})
    for method in methods:
        rows = sorted((row for row in table if row["method"] == method), key=lambda row: row["length"])
        if not rows:
            continue
        x, y = [row["length"] for row in rows], [row[value] for row in rows]
        line, = ax.plot(x, y, marker="o", markersize=3, label=labels.get(method, method), **_style(method))
        if value == "ppl" and any(row.get("documents", 1) > 1 for row in rows):
            spread = [[row[value] - row.get("ppl_min", row[value]) for row in rows],
                      [row.get("ppl_max", row[value]) - row[value] for row in rows]]
            ax.errorbar(x, y, yerr=spread, fmt="none", ecolor=line.get_color(), elinewidth=0.8, capsize=2,
                        alpha=0.8, zorder=line.get_zorder())
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    if lengths and lengths[0] <= original_context <= lengths[-1]:
        ax.axvline(original_context, color="grey", linewidth=0.8, linestyle=":")
        ax.text(original_context, 0.98, f" L = {original_context}", transform=ax.get_xaxis_transform(),
                fontsize=7, va="top", color="grey")
    ax.set_xticks(lengths, [_length_label(n) for n in lengths])
    _plain_numbers(ax.yaxis)
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("perplexity")
    finite = [row[value] for row in table if row[value] < 1e4]
    if finite:
        ax.set_ylim(min(finite) * 0.9, min(max(finite) * 1.1, 1e4))
    ax.legend(fontsize=7)
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", linewidth=0.3)
    fig.savefig(path, dpi=110, bbox_inches="tight", metadata=_META)
    plt.close(fig)
    return path


def short_context_lines(table: Sequence[Mapping], methods: Sequence[str], path: Path, *,
                        labels: Mapping[str, str], title: str) -> Path:
    """Perplexity change against the unscaled model (percent) at each length, one line per method."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    lengths = sorted({row["length"] for row in table})
    for method in methods:
        points = sorted((row["length"], row["delta_pct"]) for row in table
                        if row["method"] == method and row["delta_pct"] is not None)
        if points:
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", markersize=3,
                    label=labels.get(method, method), **_style(method))
    ax.axhline(0, color="grey", linewidth=0.8)
    return _save_length_plot(plt, fig, ax, lengths, "perplexity vs unscaled (%)", title, path)


def passkey_accuracy_lines(table: Sequence[Mapping], methods: Sequence[str], variant: str, path: Path, *,
                           labels: Mapping[str, str], title: str) -> Path:
    """Passkey accuracy against context length, one line per method, bars spanning the Wilson 95 %
    interval of each point (the rows of :func:`bench.evals.scoring.passkey_accuracy`)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    rows = [row for row in table if row["variant"] == variant]
    lengths = sorted({row["length"] for row in rows})
    shift = {m: (i - (len(methods) - 1) / 2) * 0.025 for i, m in enumerate(methods)}  # side by side
    for method in methods:
        mine = sorted((row for row in rows if row["method"] == method), key=lambda row: row["length"])
        if not mine:
            continue
        x = [row["length"] * 2 ** shift[method] for row in mine]
        y = [row["accuracy"] for row in mine]
        bars = [[row["accuracy"] - row["low"] for row in mine], [row["high"] - row["accuracy"] for row in mine]]
        ax.errorbar(x, y, yerr=bars, marker="o", markersize=3, capsize=3, label=labels.get(method, method),
                    **_style(method))
    ax.set_ylim(-0.05, 1.05)
    return _save_length_plot(plt, fig, ax, lengths, "accuracy (Wilson 95 % interval)", title, path)
