"""The paper's three ablation rounds (its section 3.3) and its generalization test (section 3.4) at this scale.

Round 1: each single meta set over epochs x learning rates (Fig. 2 heatmaps, Table 3). Round 2: the best pair of
meta sets over rows per meta set x activation x learning rate x epochs (Fig. 3). Round 3: the pair's mixing ratio
(Fig. 4). Every grid point is a softmax (or, in round 2, any activation) `layer_mapping` soup of (LLaVA, Vicuna)
scored on the dev tasks, and chosen by its mean rank over them (`stats.choose`); only the chosen settings are
scored on the test tasks, and the final one at every seed of `final_seeds`. The generalization step scores the
final setting, the bases and the vanilla soup at alpha 0.5 on tasks no meta set and no variant was built from.

The epoch axis comes from one trajectory per grid cell: the learner checkpoints after every epoch, and resuming
with more epochs gives the alphas of a fresh run of that length (each epoch's order depends only on the seed and
the epoch), so a snapshot of the table after 1, 3 and 9 epochs costs one 9-epoch run.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from souplm.experiment.common import log, stable_digest
from souplm.experiment.settings import ACTIVATIONS, GENERAL_TASKS, META_SETS, TASKS
from souplm.experiment.stats import choose, mean, mean_ranks, run_spread, stdev
from souplm.experiment.steps import (
    Context,
    LearnSpec,
    _data_digest,
    _drop_svg,
    average_items,
    evaluate_table,
    learn_config,
    role_table,
    vanilla_label,
)


@dataclass
class Budget:
    """How one round spent its time: learning calls and soups scored, with measured seconds."""

    grid_points: int = 0
    learn_runs: int = 0  # learn() calls that trained (a trajectory's epochs are one call per snapshot)
    learn_cached: int = 0
    learn_s: float = 0.0
    dev_soups: int = 0  # soups scored on the dev tasks
    dev_s: float = 0.0
    test_soups: int = 0  # soups scored on the test (or generalization) tasks
    test_s: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"grid_points": self.grid_points, "learn_runs": self.learn_runs, "learn_cached": self.learn_cached,
                "learn_s": self.learn_s, "dev_soups": self.dev_soups, "dev_s": self.dev_s,
                "test_soups": self.test_soups, "test_s": self.test_s, **self.extra}


def dev_names(ctx: Context) -> list[str]:
    """The dev tasks grid points are scored on, in the test tasks' order."""
    return [f"{n}-dev" for n in TASKS]


def dev_hib(ctx: Context) -> dict[str, bool]:
    """Higher-is-better of every dev task (as its test task)."""
    infos = {t["name"]: t["higher_is_better"] for t in ctx.data.info["tasks"]}
    return {f"{n}-dev": infos[n] for n in TASKS}


def _alpha_summary(table: Any) -> dict[str, Any]:
    alphas = [float(v[0]) for k, v in table.coefficients.items() if k != "default"]
    return {"mean": mean(alphas), "min": min(alphas), "max": max(alphas), "units": len(alphas)}


def _point(ctx: Context, spec: LearnSpec, table_path: Path, budget: Budget, name: str) -> dict[str, Any]:
    """A grid point's record: its setting, its alphas and its dev scores."""
    from souplm.engine.coefficients import CoefficientTable

    table = CoefficientTable.load(table_path)
    t0 = time.perf_counter()
    hits0 = ctx.store.hits
    results = evaluate_table(ctx, table, table_path, [ctx.data.dev_tasks[n] for n in dev_names(ctx)])
    if ctx.store.hits == hits0:
        budget.dev_soups += 1
        budget.dev_s += time.perf_counter() - t0
    s = ctx.settings
    losses = table.meta.get("epoch_losses") or []
    samples = list(spec.samples) if spec.samples is not None else [s.meta_samples] * len(spec.metas)
    return {
        "id": name, "metas": list(spec.metas), "meta": spec.meta_label, "activation": spec.activation,
        "seed": spec.seed, "epochs": s.epochs if spec.epochs is None else spec.epochs,
        "lr": s.lr if spec.lr is None else spec.lr,
        "samples": [max(1, min(n, ctx.data.meta_rows[m])) for n, m in zip(samples, spec.metas, strict=True)],
        "steps": table.meta.get("steps"), "loss_last_epoch": losses[-1] if losses else None,
        "alpha_llava": _alpha_summary(table),
        "dev": {n: float(r["score"]) for n, r in results.items()},
        "table": str(table_path.relative_to(ctx.work)),
    }


def _learn_into(ctx: Context, spec: LearnSpec, folder: Path, budget: Budget) -> None:
    """Train `spec` in `folder`, continuing the trajectory there (its epoch checkpoint) if there is one."""
    from souplm.learn import learn

    t0 = time.perf_counter()
    learn(learn_config(ctx, spec, folder), resume=True, progress=ctx.progress)
    budget.learn_runs += 1
    budget.learn_s += time.perf_counter() - t0
    ctx.learn_computed += 1


def trajectory(ctx: Context, spec: LearnSpec, epochs: tuple[int, ...], budget: Budget) -> list[dict[str, Any]]:
    """One learning run snapshotted after each count of `epochs` (ascending): a grid point per count."""
    key_cfg = learn_config(ctx, replace(spec, epochs=0), Path("."))
    key_cfg.pop("output")
    counts = sorted(set(epochs))
    digest = stable_digest([key_cfg, counts, ctx.hashes, _data_digest(ctx, spec)])
    name = f"traj-{spec.meta_label}-{spec.activation}-lr{key_cfg['optimizer']['lr']:g}-s{spec.seed}-{digest}"
    folder = ctx.work / "learn" / name
    out = []
    for e in counts:
        snap = folder / f"coefficients-e{e}.json"
        if snap.is_file():
            budget.learn_cached += 1
            ctx.learn_cached += 1
        else:
            log(f"learning {name} to epoch {e}")
            _learn_into(ctx, replace(spec, epochs=e), folder, budget)
            shutil.copyfile(folder / "coefficients.json", snap)
        out.append(_point(ctx, replace(spec, epochs=e), snap, budget, f"{name}-e{e}"))
        budget.grid_points += 1
    return out


def single(ctx: Context, spec: LearnSpec, budget: Budget) -> dict[str, Any]:
    """One learned soup (no trajectory) as a grid point."""
    key_cfg = learn_config(ctx, spec, Path("."))
    key_cfg.pop("output")
    digest = stable_digest([key_cfg, ctx.hashes, _data_digest(ctx, spec)])
    samples = "-".join(str(n) for n in (spec.samples or ()))
    name = f"point-{spec.meta_label}-{spec.activation}-n{samples}-s{spec.seed}-{digest}"
    folder = ctx.work / "learn" / name
    table = folder / "coefficients.json"
    if table.is_file():
        budget.learn_cached += 1
        ctx.learn_cached += 1
    else:
        log(f"learning {name}")
        _learn_into(ctx, spec, folder, budget)
    budget.grid_points += 1
    return _point(ctx, spec, table, budget, name)


def score_test(ctx: Context, point: dict[str, Any], budget: Budget, tasks: list[Any] | None = None) -> dict[str, float]:
    """A chosen point scored on the test tasks (or `tasks`); its per-example values kept under its id."""
    from souplm.engine.coefficients import CoefficientTable

    path = ctx.work / point["table"]
    t0 = time.perf_counter()
    hits0 = ctx.store.hits
    results = evaluate_table(ctx, CoefficientTable.load(path), path, tasks)
    if ctx.store.hits == hits0:
        budget.test_soups += 1
        budget.test_s += time.perf_counter() - t0
    ctx.keep(point["id"], results)
    return {n: float(r["score"]) for n, r in results.items()}


def _spec_of(point: dict[str, Any], **over: Any) -> LearnSpec:
    base = LearnSpec(metas=tuple(point["metas"]), activation=point["activation"], seed=point["seed"],
                     epochs=point["epochs"], lr=point["lr"], samples=tuple(point["samples"]))
    return replace(base, **over)


def _annotate(points: list[dict[str, Any]], hib: dict[str, bool]) -> int:
    """Mean rank of every point (over all points of the grid), and the chosen one's index."""
    for p, r in zip(points, mean_ranks([p["dev"] for p in points], hib), strict=True):
        p["mean_rank"] = r
    return choose([p["dev"] for p in points], hib)


def table3(points: list[dict[str, Any]], tasks: list[str], hib: dict[str, bool]) -> dict[str, dict[str, float]]:
    """Mean and best dev score per task over a meta set's grid (the paper's Table 3)."""
    out = {}
    for t in tasks:
        vals = [p["dev"][t] for p in points]
        out[t] = {"mean": mean(vals), "best": max(vals) if hib[t] else min(vals)}
    return out


# -------------------------------------------------------------------------------------------- rounds


def step_round1(ctx: Context) -> dict[str, Any]:
    """Round 1: every single meta set over epochs x learning rates (softmax, `meta_samples` rows)."""
    s = ctx.settings
    budget = Budget()
    hib = dev_hib(ctx)
    points = []
    for m in META_SETS:
        for lr in s.round_lrs:
            points += trajectory(ctx, LearnSpec(metas=(m,), lr=lr), s.round_epochs, budget)
    _annotate(points, hib)
    per_meta = {}
    for m in META_SETS:
        mine = [p for p in points if p["metas"] == [m]]
        best = min(mine, key=lambda p: (p["mean_rank"], points.index(p)))
        per_meta[m] = {"table3": table3(mine, dev_names(ctx), hib), "chosen": best["id"],
                       "best_mean_rank": best["mean_rank"]}
    order = sorted(META_SETS, key=lambda m: (per_meta[m]["best_mean_rank"], list(META_SETS).index(m)))
    pair = tuple(order[:2])
    chosen = {m: next(p for p in points if p["id"] == per_meta[m]["chosen"]) for m in META_SETS}
    for m, p in chosen.items():
        per_meta[m]["test"] = score_test(ctx, p, budget)
    figures = [heatmap_round1(ctx, m, [p for p in points if p["metas"] == [m]]) for m in META_SETS]
    return {"points": points, "per_meta": per_meta, "order": order, "pair": list(pair),
            "epochs": list(s.round_epochs), "lrs": list(s.round_lrs), "samples": s.meta_samples,
            "dev_tasks": dev_names(ctx), "figures": figures, "budget": budget.to_json()}


def step_round2(ctx: Context, r1: dict[str, Any]) -> dict[str, Any]:
    """Round 2: the best pair over rows per meta set x activation x learning rate x epochs."""
    s = ctx.settings
    budget = Budget()
    hib = dev_hib(ctx)
    pair = tuple(r1["pair"])
    points = []
    for n in s.round2_samples:
        for act in ACTIVATIONS:
            for lr in s.round2_lrs:
                points += trajectory(ctx, LearnSpec(metas=pair, activation=act, lr=lr, samples=(n, n)),
                                     s.round_epochs, budget)
    best = points[_annotate(points, hib)]
    test = score_test(ctx, best, budget)
    by_activation = {a: {t: mean([p["dev"][t] for p in points if p["activation"] == a]) for t in dev_names(ctx)}
                     for a in ACTIVATIONS}
    by_samples = {str(n): {t: mean([p["dev"][t] for p in points if p["samples"][0] == n]) for t in dev_names(ctx)}
                  for n in s.round2_samples}
    figures = [heatmap_round2(ctx, n, [p for p in points if p["samples"][0] == n]) for n in s.round2_samples]
    return {"pair": list(pair), "points": points, "chosen": best["id"], "test": test,
            "by_activation": by_activation, "by_samples": by_samples, "samples": list(s.round2_samples),
            "lrs": list(s.round2_lrs), "epochs": list(s.round_epochs), "figures": figures,
            "budget": budget.to_json()}


def ratio_samples(ratio: float, total: int) -> tuple[int, int]:
    """Rows of the pair's two meta sets at `ratio` (the first one's share) of `total`: each at least 1."""
    a = max(1, min(total - 1, round(ratio * total)))
    return a, max(1, total - a)


def step_round3(ctx: Context, r2: dict[str, Any]) -> dict[str, Any]:
    """Round 3: the pair's mixing ratio at round 2's setting (same total rows), then the chosen setting at every
    seed of `final_seeds` on the test tasks."""
    s = ctx.settings
    budget = Budget()
    hib = dev_hib(ctx)
    best2 = next(p for p in r2["points"] if p["id"] == r2["chosen"])
    total = sum(best2["samples"])
    points = []
    for ratio in s.round3_ratios:
        spec = _spec_of(best2, samples=ratio_samples(ratio, total))
        p = single(ctx, spec, budget)
        p["ratio"] = ratio
        points.append(p)
    best = points[_annotate(points, hib)]
    seeds = []
    for sd in s.final_seeds:
        p = best if sd == best["seed"] else single(ctx, _spec_of(best, seed=sd), budget)
        seeds.append({"seed": sd, "id": p["id"], "test": score_test(ctx, p, budget), "point": p})
    seed_spread = {n: run_spread([x["test"][n] for x in seeds]) for n in TASKS}
    label = "rounds final (seed mean)"
    average_items(ctx, [x["id"] for x in seeds], label, TASKS)
    figure = plot_round3(ctx, points)
    return {"pair": r2["pair"], "total_samples": total, "points": points, "chosen": best["id"],
            "setting": {k: best[k] for k in ("metas", "activation", "epochs", "lr", "samples", "ratio")},
            "seeds": seeds, "seed_spread": seed_spread, "label": label, "figure": figure, "budget": budget.to_json()}


def paper_alpha_tables(ctx: Context, r1: dict[str, Any], r2: dict[str, Any]) -> dict[str, Any]:
    """The round points at the paper's setting for alpha plots (its section 4: 9 epochs, lr 0.3, the largest
    sample count): the longest epoch count, the largest learning rate, the largest rows per meta set."""
    s = ctx.settings
    e, lr = max(s.round_epochs), max(s.round_lrs)
    singles = {m: next((p for p in r1["points"] if p["metas"] == [m] and p["epochs"] == e and p["lr"] == lr), None)
               for m in META_SETS}
    n, lr2 = max(s.round2_samples), max(s.round2_lrs)
    pair = next((p for p in r2["points"] if p["activation"] == "softmax" and p["epochs"] == e and p["lr"] == lr2
                 and p["samples"][0] == n), None)
    return {"epochs": e, "lr": lr, "single_samples": s.meta_samples, "singles": singles,
            "pair_lr": lr2, "pair_samples": n, "pair": pair}


def step_rounds(ctx: Context) -> dict[str, Any]:
    """The three rounds, and Fig. 5's alpha panels at the paper's setting (section 4)."""
    from souplm.plots.alphas import plot_alphas

    r1 = step_round1(ctx)
    r2 = step_round2(ctx, r1)
    r3 = step_round3(ctx, r2)
    paper = paper_alpha_tables(ctx, r1, r2)
    runs = [p for p in [*paper["singles"].values(), paper["pair"]] if p is not None]
    labels = [p["meta"] for p in runs]
    folder = ctx.out / "results" / "alphas_paper_setting"
    shutil.rmtree(folder, ignore_errors=True)
    plot_alphas([role_table(ctx, {"table": p["table"]}) for p in runs], folder, labels=labels, model=0)
    _drop_svg(folder)
    paper["figures"] = sorted(str(p.relative_to(ctx.out)) for p in folder.glob("*.png"))
    paper["singles"] = {m: (p["id"] if p else None) for m, p in paper["singles"].items()}
    paper["pair"] = paper["pair"]["id"] if paper["pair"] else None
    return {"round1": r1, "round2": r2, "round3": r3, "paper_alpha_setting": paper}


def step_general(ctx: Context, rounds: dict[str, Any]) -> dict[str, Any]:
    """The generalization test: the rounds' final setting (every seed), LLaVA, Vicuna and the vanilla soup at
    alpha 0.5 on tasks no meta set and no variant was built from."""
    from souplm.search.sweep import sweep

    tasks = [ctx.data.general_tasks[n] for n in GENERAL_TASKS]
    budget = Budget()
    t0 = time.perf_counter()
    res = sweep(ctx.pair_paths, [0.0, 0.5, 1.0], tasks, out_dir=None, cache=ctx.store,
                batch_size=ctx.settings.eval_batch, progress=ctx.progress, vocab_policy="extend")
    budget.extra["vanilla_s"] = time.perf_counter() - t0
    scores: dict[str, dict[str, float]] = {}
    names = {0.0: "Vicuna", 0.5: "vanilla 0.5", 1.0: "LLaVA"}
    labels = {}
    for a, who in names.items():
        ctx.keep(vanilla_label(a), res.results[a])
        scores[who] = {n: res.score(a, n) for n in GENERAL_TASKS}
        labels[who] = vanilla_label(a)
    r3 = rounds["round3"]
    per_seed = {}
    for x in r3["seeds"]:
        per_seed[str(x["seed"])] = score_test(ctx, x["point"], budget, tasks)
    average_items(ctx, [x["id"] for x in r3["seeds"]], r3["label"], GENERAL_TASKS)
    scores["rounds final (seed mean)"] = {n: mean([v[n] for v in per_seed.values()]) for n in GENERAL_TASKS}
    labels["rounds final (seed mean)"] = r3["label"]
    seed_spread = {n: {"std": stdev([v[n] for v in per_seed.values()]), "min": min(v[n] for v in per_seed.values()),
                       "max": max(v[n] for v in per_seed.values())} for n in GENERAL_TASKS}
    return {"tasks": list(GENERAL_TASKS), "models": list(scores), "scores": scores, "labels": labels,
            "per_seed": per_seed, "seed_spread": seed_spread, "budget": budget.to_json()}


# ------------------------------------------------------------------------------------------- figures


def _grid_panel(ax: Any, grid: list[list[float]], xs: list[str], ys: list[str], title: str, hib: bool) -> None:
    import numpy as np

    arr = np.array(grid, dtype=float)
    im = ax.imshow(arr, cmap="viridis" if hib else "viridis_r", aspect="auto")
    ax.set_xticks(range(len(xs)), xs, fontsize=7)
    ax.set_yticks(range(len(ys)), ys, fontsize=7)
    ax.set_title(title, fontsize=8)
    for i in range(arr.shape[0]):
        for j in range(arr.shape[1]):
            ax.text(j, i, f"{arr[i, j]:.3f}", ha="center", va="center", fontsize=6, color="white")
    ax.figure.colorbar(im, ax=ax, fraction=0.046, pad=0.04)


def _save(ctx: Context, fig: Any, stem: str) -> str:
    import matplotlib.pyplot as plt

    path = ctx.out / "results" / f"{stem}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path.relative_to(ctx.out))


def heatmap_round1(ctx: Context, meta: str, points: list[dict[str, Any]]) -> str:
    """Fig. 2: one heatmap per dev task, x = learning rate, y = epochs, for one meta set."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = ctx.settings
    hib = dev_hib(ctx)
    tasks = dev_names(ctx)
    fig, axes = plt.subplots(1, len(tasks), figsize=(3.2 * len(tasks), 2.6))
    for ax, t in zip(axes, tasks, strict=True):
        grid = [[next(p["dev"][t] for p in points if p["epochs"] == e and p["lr"] == lr) for lr in s.round_lrs]
                for e in s.round_epochs]
        _grid_panel(ax, grid, [f"{lr:g}" for lr in s.round_lrs], [f"{e} ep" for e in s.round_epochs],
                    f"{t} ({'↑' if hib[t] else '↓'})", hib[t])
    fig.suptitle(f"Round 1: meta set {meta} (x: learning rate, y: epochs)", fontsize=9)
    return _save(ctx, fig, f"round1_{meta}")


def heatmap_round2(ctx: Context, n: int, points: list[dict[str, Any]]) -> str:
    """Fig. 3: one heatmap per dev task, x = learning rate, y = (activation, epochs), for one sample count."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = ctx.settings
    hib = dev_hib(ctx)
    tasks = dev_names(ctx)
    rows = [(a, e) for a in ACTIVATIONS for e in s.round_epochs]
    fig, axes = plt.subplots(1, len(tasks), figsize=(3.2 * len(tasks), 0.3 * len(rows) + 1.6))
    for ax, t in zip(axes, tasks, strict=True):
        grid = [[next(p["dev"][t] for p in points if p["activation"] == a and p["epochs"] == e and p["lr"] == lr)
                 for lr in s.round2_lrs] for a, e in rows]
        _grid_panel(ax, grid, [f"{lr:g}" for lr in s.round2_lrs], [f"{a} {e} ep" for a, e in rows],
                    f"{t} ({'↑' if hib[t] else '↓'})", hib[t])
    fig.suptitle(f"Round 2: {n} rows per meta set (x: learning rate, y: activation and epochs)", fontsize=9)
    return _save(ctx, fig, f"round2_n{n}")


def plot_round3(ctx: Context, points: list[dict[str, Any]]) -> str:
    """Fig. 4: each dev task's score against the share of the pair's first meta set."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    hib = dev_hib(ctx)
    tasks = dev_names(ctx)
    fig, axes = plt.subplots(1, len(tasks), figsize=(3.0 * len(tasks), 2.4))
    xs = [p["ratio"] for p in points]
    for ax, t in zip(axes, tasks, strict=True):
        ax.plot(xs, [p["dev"][t] for p in points], "o-")
        ax.set_title(f"{t} ({'↑' if hib[t] else '↓'})", fontsize=8)
        ax.set_xlabel(f"share of {points[0]['metas'][0]}", fontsize=7)
        ax.tick_params(labelsize=7)
    fig.suptitle("Round 3: mixing ratio of the pair", fontsize=9)
    return _save(ctx, fig, "round3_ratio")


def dump(obj: Any) -> str:
    """JSON of a record (for logs)."""
    return json.dumps(obj, sort_keys=True, default=str)
