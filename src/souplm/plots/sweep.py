"""The SoupLM paper's Figure 1: score against the soup's alpha, one panel per task.

x is the weight of model A (alpha = 1 is A, alpha = 0 is B); dots are soups, the two horizontal lines
are the base models, and a star marks the best alpha per task.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any


def _plain_y_axis(ax: Any, values: list[float]) -> None:
    """No offset or 1e-17 tick labels: plain numbers, and a readable band around a flat panel."""
    ax.ticklabel_format(axis="y", useOffset=False)
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return
    lo, hi = min(finite), max(finite)
    if hi - lo <= 1e-9 * max(1.0, abs(hi)):  # flat up to rounding: matplotlib would zoom into the noise
        pad = max(abs(hi) * 0.05, 1e-3)
        ax.set_ylim(lo - pad, hi + pad)


def plot_sweep(result: Any, out_prefix: str | Path, title: str | None = None,
               labels: tuple[str, str] | None = None) -> list[Path]:
    """Draw a `SweepResult`; writes `<out_prefix>.png` and `<out_prefix>.svg` and returns both paths.

    `labels`: what to call models A and B in the legends (e.g. their roles); default their folder names.
    """
    import matplotlib

    matplotlib.use("Agg")  # no display on servers; must precede pyplot
    import matplotlib.pyplot as plt

    tasks = result.tasks
    n = len(tasks)
    cols = min(n, 3)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.4 * rows), squeeze=False)
    names = list(labels) if labels else [Path(m).name or str(m) for m in result.models]
    for ax, info in zip(axes.flat, tasks):
        task = info["name"]
        xs = result.alphas
        ys = [result.score(a, task) for a in xs]
        ax.plot(xs, ys, "o-", color="tab:blue", label="soup", zorder=3)
        ax.axhline(result.base_score(0, task), color="tab:orange", ls="--", label=f"A: {names[0]}")
        ax.axhline(result.base_score(1, task), color="tab:green", ls=":", label=f"B: {names[1]}")
        best = result.best_alpha(task)
        ax.plot([best], [result.score(best, task)], marker="*", ms=16, color="tab:red", zorder=4,
                label=f"best alpha {best:g}")
        arrow = "higher is better" if info["higher_is_better"] else "lower is better"
        ax.set_title(task)
        ax.set_xlabel("alpha (weight of A)")
        ax.set_ylabel(f"{info['primary']} ({arrow})")
        ax.grid(alpha=0.3)
        _plain_y_axis(ax, [*ys, result.base_score(0, task), result.base_score(1, task)])
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[n:]:
        ax.set_visible(False)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    out_prefix = Path(out_prefix)
    paths = [out_prefix.with_suffix(".png"), out_prefix.with_suffix(".svg")]
    for p in paths:
        fig.savefig(p, dpi=130)
    plt.close(fig)
    return paths
