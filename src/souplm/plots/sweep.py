"""The SoupLM paper's Figure 1: score against the soup's alpha, one panel per task.

x is the weight of model A (alpha = 1 is A, alpha = 0 is B); dots are soups, the two horizontal lines
are the base models, and a star marks the best alpha per task.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any


def plot_sweep(result: Any, out_prefix: str | Path, title: str | None = None) -> list[Path]:
    """Draw a `SweepResult`; writes `<out_prefix>.png` and `<out_prefix>.svg` and returns both paths."""
    import matplotlib

    matplotlib.use("Agg")  # no display on servers; must precede pyplot
    import matplotlib.pyplot as plt

    tasks = result.tasks
    n = len(tasks)
    cols = min(n, 3)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.4 * rows), squeeze=False)
    names = [Path(m).name or str(m) for m in result.models]
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
