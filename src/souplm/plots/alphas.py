"""Learned alphas as the SoupLM paper draws them (its Figures 5 and 6, and the appendix's per mapping).

For each mapping kind (q, k, v, o, gate, up, down, the norms) one figure: the layers on the x-axis, the
share of model 1 on the y-axis, one bar per layer coloured by the model that dominates that unit, and
a dashed line at the even split. Several tables (different meta sets, or lambda values) sit side by
side in one row of panels. A heatmap (layers x mappings, one panel per table) shows every unit at
once, and a small figure the global units (embed, final_norm, lm_head). PNG and SVG each.

Tables at `tensor` or `row` granularity are drawn per unit too: the unit's tensors and rows averaged.
"""

from __future__ import annotations

import os
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

from ..arch.units import MAPPING_KINDS, Unit, parse_unit_key, unit_of
from ..engine.coefficients import CoefficientTable
from ..errors import SoupError

# Model colours: the paper's green for model 1 and red for model 2, then a few more for N > 2.
COLOURS = ("#2e9e4f", "#d1453b", "#3b6fd1", "#d19a3b", "#8a3bd1", "#3bbfd1")
GLOBAL_ORDER = ("embed", "final_norm", "lm_head", "other")


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def unit_weights(table: CoefficientTable) -> dict[Unit, list[float]]:
    """Every unit's weight per model (tensors of a unit and rows of a tensor averaged)."""
    acc: dict[Unit, list[list[float]]] = defaultdict(list)
    for key, value in table.coefficients.items():
        if key == "default":
            continue
        unit = unit_of(key) if key.startswith(("model.", "lm_head.")) else parse_unit_key(key)
        acc[unit].append([_mean(v) if isinstance(v, (list, tuple)) else float(v) for v in value])
    return {u: [_mean([w[i] for w in ws]) for i in range(table.n_models)] for u, ws in acc.items()}


def _label(path: Path, taken: set[str]) -> str:
    name = path.parent.name if path.name == "coefficients.json" else path.stem
    return name if name not in taken else f"{name} ({path})"


def _save(fig, out: Path, stem: str) -> list[Path]:
    paths = []
    for ext in ("png", "svg"):
        p = out / f"{stem}.{ext}"
        fig.savefig(p, dpi=150 if ext == "png" else None, bbox_inches="tight")
        paths.append(p)
    return paths


def plot_alphas(
    tables: Sequence[str | os.PathLike | CoefficientTable],
    out_dir: str | os.PathLike,
    labels: Sequence[str] | None = None,
    model: int = 0,
) -> list[Path]:
    """Draw the alpha figures for one or more tables into `out_dir`; returns the files written.

    The figures are drawn beside `out_dir` and moved in at the end (souplm/io/output.py)."""
    from ..io.output import check_output, staged_dir

    check_output(out_dir, files=[t for t in tables if not isinstance(t, CoefficientTable)], what="output folder",
                 report=True)
    with staged_dir(out_dir) as staged:
        paths = _plot_alphas_into(tables, staged, labels, model)
    return [Path(out_dir) / p.relative_to(staged) for p in paths]


def _plot_alphas_into(
    tables: Sequence[str | os.PathLike | CoefficientTable],
    out_dir: str | os.PathLike,
    labels: Sequence[str] | None = None,
    model: int = 0,
) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")  # no display on servers; must precede pyplot
    import matplotlib.pyplot as plt
    from matplotlib.colors import TwoSlopeNorm
    from matplotlib.patches import Patch

    if not tables:
        raise SoupError("plot alphas: no tables given")
    loaded: list[tuple[str, CoefficientTable]] = []
    taken: set[str] = set()
    for i, t in enumerate(tables):
        table = t if isinstance(t, CoefficientTable) else CoefficientTable.load(t)
        if labels and i < len(labels):
            name = labels[i]
        else:
            name = "table" if isinstance(t, CoefficientTable) else _label(Path(t), taken)
        taken.add(name)
        if not 0 <= model < table.n_models:
            raise SoupError(f"plot alphas: --model {model} but {name} mixes {table.n_models} models")
        loaded.append((name, table))
    weights = [unit_weights(t) for _, t in loaded]
    if not any(weights):
        raise SoupError("plot alphas: the tables name no soup units")
    model_names = [Path(m).name or str(m) for m in loaded[0][1].models]
    n_models = max(t.n_models for _, t in loaded)
    legend = [Patch(color=COLOURS[i % len(COLOURS)], label=f"{model_names[i] if i < len(model_names) else i} dominates")
              for i in range(n_models)]
    share = f"share of {model_names[model] if model < len(model_names) else f'model {model + 1}'}"
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    layers = sorted({u.layer for w in weights for u in w if u.layer is not None})
    mappings = [m for m in MAPPING_KINDS if any(u.mapping == m and u.layer is not None for w in weights for u in w)]
    k = len(loaded)

    def bars(ax, units: list[Unit], w: dict[Unit, list[float]], xlabels: list[str]) -> None:
        xs, ys, cs = [], [], []
        for x, u in enumerate(units):
            if u in w:
                xs.append(x)
                ys.append(w[u][model])
                cs.append(COLOURS[max(range(len(w[u])), key=w[u].__getitem__) % len(COLOURS)])
        ax.bar(xs, ys, color=cs, width=0.8)
        ax.axhline(1.0 / n_models, color="0.3", linestyle="--", linewidth=0.8)
        ax.set_xticks(range(len(units)), xlabels, fontsize=7, rotation=90 if len(units) > 24 else 0)

    def ylim(axes, units: list[Unit]) -> None:
        """One y range for side-by-side panels: [0, 1], widened for linear alphas outside it."""
        ys = [w[u][model] for w in weights for u in units if u in w]
        lo, hi = min([0.0, *ys]), max([1.0, *ys])
        axes[0].set_ylim(lo - 0.02, hi + 0.02)  # shared y: one call sets every panel

    # 1) per mapping: layers on x, one panel per table
    for m in mappings:
        fig, axes = plt.subplots(1, k, figsize=(max(4.0, 0.22 * len(layers) + 1.5) * k, 3.0), squeeze=False,
                                 sharey=True)
        units = [Unit(layer, m) for layer in layers]
        for ax, (name, _), w in zip(axes[0], loaded, weights):
            bars(ax, units, w, [str(layer) for layer in layers])
            ax.set_title(f"{name}: {m}", fontsize=9)
            ax.set_xlabel("layer")
        ylim(axes[0], units)
        axes[0][0].set_ylabel(share)
        fig.legend(handles=legend, loc="upper right", fontsize=7, frameon=False)
        written += _save(fig, out, f"alphas_{m}")
        plt.close(fig)

    # 2) global units
    globals_present = [g for g in GLOBAL_ORDER if any(Unit(None, g) in w for w in weights)]
    if globals_present:
        fig, axes = plt.subplots(1, k, figsize=(2.8 * k, 2.8), squeeze=False, sharey=True)
        for ax, (name, _), w in zip(axes[0], loaded, weights):
            bars(ax, [Unit(None, g) for g in globals_present], w, globals_present)
            ax.set_title(name, fontsize=9)
        ylim(axes[0], [Unit(None, g) for g in globals_present])
        axes[0][0].set_ylabel(share)
        written += _save(fig, out, "alphas_global")
        plt.close(fig)

    # 3) heatmap: layers x mappings
    if layers and mappings:
        import numpy as np

        grids = []
        for w in weights:
            g = np.full((len(layers), len(mappings)), np.nan)
            for i, layer in enumerate(layers):
                for j, m in enumerate(mappings):
                    if Unit(layer, m) in w:
                        g[i, j] = w[Unit(layer, m)][model]
            grids.append(g)
        finite = np.concatenate([g[np.isfinite(g)] for g in grids])
        lo, hi = min(0.0, float(finite.min())), max(1.0, float(finite.max()))
        norm = TwoSlopeNorm(vcenter=1.0 / n_models, vmin=min(lo, 1.0 / n_models - 1e-6), vmax=hi)
        fig, axes = plt.subplots(1, k, figsize=(0.45 * len(mappings) * k + 2.0, 0.25 * len(layers) + 1.8),
                                 squeeze=False)
        image = None
        for ax, (name, _), g in zip(axes[0], loaded, grids):
            image = ax.imshow(g, cmap="RdYlGn", norm=norm, aspect="auto", interpolation="nearest")
            ax.set_xticks(range(len(mappings)), mappings, rotation=60, fontsize=7)
            ax.set_yticks(range(len(layers)), [str(layer) for layer in layers], fontsize=6)
            ax.set_title(name, fontsize=9)
            ax.set_xlabel("mapping")
        axes[0][0].set_ylabel("layer")
        fig.colorbar(image, ax=list(axes[0]), label=share, shrink=0.9)
        written += _save(fig, out, "heatmap")
        plt.close(fig)
    return written
