"""The study's steps (vanilla sweep, learnable, regularized, greedy, robustness, claims, AdaMMS) on a `Context`.

Each step returns plain data for results.json; none of them renders text (report.py does).
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from souplm.experiment.common import log, stable_digest
from souplm.experiment.data import Data
from souplm.experiment.settings import (
    ACTIVATIONS,
    ADAMMS_CRITERION,
    ADAMMS_METRIC,
    ADAMMS_PAPER,
    ADAMMS_SETTINGS,
    META_SETS,
    ROLES,
    ROLES_EXTRA,
    STABLE_CORRELATION,
    STABLE_SIGN_AGREEMENT,
    TASK_SPECS,
    TASKS,
    Settings,
)
from souplm.experiment.stats import (
    ALPHA,
    LEVEL,
    MIN_ITEMS,
    RESAMPLES,
    best_of,
    better,
    bootstrap_ratio,
    holm,
    item_columns,
    mcnemar,
    mean,
    paired_bootstrap,
    pearson,
    run_spread,
    stdev,
)

# The four variants of the greedy soup and of the setup table, in this order (LLaVA first: its architecture).
VARIANTS: tuple[str, ...] = ("llava", "smollm2", "math", "shakespeare")
# The test task each variant was made for (its speciality): the setup table's gap is measured there.
SPECIALITY: dict[str, str] = {"LLaVA": "easy-vqa", "Vicuna": "instruct-ppl", "Math": "math",
                              "Shakespeare": "shakespeare-ppl"}


@dataclass
class Context:
    """What every step needs: the family, the tasks, the caches, the settings and the counters."""

    family: dict[str, Path]
    work: Path
    out: Path
    settings: Settings
    data: Data
    store: Any  # ResultCache
    progress: bool = True
    soup: Any = None  # SoupModel over (LLaVA, Vicuna) for learned tables, built lazily
    soup4: Any = None  # (SoupModel over the four variants, their hashes) for the setup table, built lazily
    hashes: list[str] = field(default_factory=list)
    learn_computed: int = 0
    learn_cached: int = 0
    # Per-example (num, den) columns of every scored model, by label and task (stats.item_columns): the
    # intervals and paired tests are computed from these; results.json keeps only their summaries.
    items: dict[str, dict[str, tuple[list[float], list[float]]]] = field(default_factory=dict)
    # The family's roles, soup pair, variants and test tasks: the SmolLM2 family's unless a second family
    # (second_family.py) passes its own.
    roles: dict[str, str] = field(default_factory=lambda: dict(ROLES))
    pair: tuple[str, str] = ("llava", "smollm2")
    variants: tuple[str, ...] = VARIANTS
    task_names: tuple[str, ...] = TASKS

    def keep(self, label: str, results: dict[str, dict[str, Any]]) -> None:
        """Remember the per-example values of one model's task results under `label`."""
        for name, r in results.items():
            if r.get("items"):
                self.items.setdefault(label, {})[name] = item_columns(r)

    @property
    def pair_paths(self) -> list[str]:
        """(LLaVA, Vicuna) folders: the vanilla and learnable soups' models, LLaVA first (its architecture)."""
        return [str(self.family[k]) for k in self.pair]

    @property
    def test_tasks(self) -> list[Any]:
        """The test tasks in the table order."""
        return [self.data.tasks[n] for n in self.task_names]


def _role_of(ctx: Context, path: str) -> str:
    """A model folder's name in the study (LLaVA, Vicuna, Math, Shakespeare)."""
    for stage, role in ctx.roles.items():
        if Path(path) == Path(ctx.family[stage]):
            return role
    return Path(path).name


# ------------------------------------------------------------------------------------ learned soups


@dataclass(frozen=True)
class LearnSpec:
    """One learnable soup of (LLaVA, Vicuna)."""

    metas: tuple[str, ...]
    activation: str = "softmax"
    granularity: str = "layer_mapping"
    seed: int = 0
    lam: float = 0.0
    # Overrides of the settings' training budget (None: the settings' own; the learn config, and so the soup's
    # folder and digest, are then exactly what they were before these fields existed).
    epochs: int | None = None
    lr: float | None = None
    samples: tuple[int, ...] | None = None  # rows per meta set, in the order of `metas`

    @property
    def meta_label(self) -> str:
        """The meta sets as one label, e.g. `vqa+instruct`."""
        return "+".join(self.metas)


def learn_config(ctx: Context, spec: LearnSpec, output: Path) -> dict[str, Any]:
    """The `souplm learn` config of one learnable soup (no merged model: it is scored in memory)."""
    s = ctx.settings
    llava, vicuna = ctx.pair_paths
    return {
        "models": [llava, vicuna],
        "output_model": llava,
        "vocab_policy": "extend",
        "granularity": spec.granularity,
        "activation": spec.activation,
        "regularization": {"kind": "l1", "lambda": spec.lam} if spec.lam > 0 else {"kind": "none"},
        "optimizer": {"name": "adam", "lr": s.lr if spec.lr is None else spec.lr},
        "training": {"epochs": s.epochs if spec.epochs is None else spec.epochs, "batch_size": s.learn_batch,
                     "max_length": s.max_length, "evaluate": False},
        "meta_sets": [{"path": str(ctx.data.meta_sets[m]), "format": META_SETS[m][1],
                       "samples": max(1, min(s.meta_samples if spec.samples is None else spec.samples[i],
                                             ctx.data.meta_rows[m]))}
                      for i, m in enumerate(spec.metas)],
        "output": str(output),
        "seed": spec.seed,
        "merge": False,
    }


def _data_digest(ctx: Context, spec: LearnSpec) -> list[str]:
    """Content hashes of a soup's meta-set files: new data means a new soup folder."""
    return [hashlib.sha256(ctx.data.meta_sets[m].read_bytes()).hexdigest()[:16] for m in spec.metas]


def run_learn(ctx: Context, spec: LearnSpec, *, score: bool = True) -> dict[str, Any]:
    """Learn one soup (or find it learned) and, with `score`, score it on every test task; returns its record."""
    from souplm.engine.coefficients import CoefficientTable
    from souplm.learn import learn

    key_cfg = learn_config(ctx, spec, Path("."))
    key_cfg.pop("output")
    digest = stable_digest([key_cfg, ctx.hashes, _data_digest(ctx, spec)])
    lam = f"-l{spec.lam:g}" if spec.lam > 0 else ""
    name = f"{spec.meta_label}-{spec.activation}-{spec.granularity}-s{spec.seed}{lam}-{digest}"
    out = ctx.work / "learn" / name
    table_path = out / "coefficients.json"
    t0 = time.perf_counter()
    if table_path.is_file():
        ctx.learn_cached += 1
    else:
        log(f"learning {name}")
        learn(learn_config(ctx, spec, out), resume=True, progress=ctx.progress)
        ctx.learn_computed += 1
    learn_s = time.perf_counter() - t0
    table = CoefficientTable.load(table_path)
    results = evaluate_table(ctx, table, table_path) if score else {}
    ctx.keep(name, results)
    scores = {n: float(r["score"]) for n, r in results.items()}
    meta = table.meta
    losses = meta.get("epoch_losses") or []
    alphas = [float(v[0]) for k, v in table.coefficients.items() if k != "default"]
    return {
        "id": name, "meta": spec.meta_label, "metas": list(spec.metas), "activation": spec.activation,
        "granularity": spec.granularity, "seed": spec.seed, "lambda": spec.lam,
        "examples": meta.get("examples"), "steps": meta.get("steps"),
        "loss_first_epoch": losses[0] if losses else None, "loss_last_epoch": losses[-1] if losses else None,
        "alpha_llava": {"mean": mean(alphas), "min": min(alphas), "max": max(alphas), "units": len(alphas)},
        "scores": scores, "table": str(table_path.relative_to(ctx.work)), "learn_s": learn_s,
    }


def evaluate_table(ctx: Context, table: Any, table_path: Path, tasks: list[Any] | None = None) -> dict[str, dict[str, Any]]:
    """Task results of the (LLaVA, Vicuna) soup a coefficient table describes, in memory, through the cache
    (on the test tasks unless `tasks` are given)."""
    from souplm.engine.recipe import Recipe
    from souplm.evaluate.cache import soup_key
    from souplm.search.sweep import METHOD, SoupModel, evaluate_candidate

    llava, vicuna = ctx.pair_paths
    if ctx.soup is None:
        ctx.soup = SoupModel([llava, vicuna], batch_size=ctx.settings.eval_batch, progress=ctx.progress)
    recipe = Recipe.from_models([llava, vicuna], METHOD, normalize=False, output_model=llava,
                                vocab_policy="extend", coefficients=str(table_path))
    coeffs = stable_digest(table.coefficients, 32)
    key = soup_key(ctx.hashes, METHOD, {"coefficients": coeffs, "normalize": False, "vocab_policy": "extend"})
    return evaluate_candidate(ctx.soup, recipe, key, ctx.test_tasks if tasks is None else tasks, limit=None,
                              cache=ctx.store)


def unit_alphas(ctx: Context, run: dict[str, Any]) -> dict[str, float]:
    """LLaVA's share per soup unit of a learned run."""
    from souplm.engine.coefficients import CoefficientTable

    table = CoefficientTable.load(ctx.work / run["table"])
    return {k: float(v[0]) for k, v in table.coefficients.items() if k != "default"}


def role_table(ctx: Context, run: dict[str, Any]) -> Any:
    """A learned run's table with the models named by their roles (LLaVA, Vicuna), for the plots."""
    from souplm.engine.coefficients import CoefficientTable

    table = CoefficientTable.load(ctx.work / run["table"])
    return CoefficientTable([_role_of(ctx, m) for m in table.models], table.coefficients, table.meta)


def alpha_agreement(ref: dict[str, float], other: dict[str, float]) -> dict[str, float]:
    """How alike two alpha distributions are: side of 0.5 per unit, correlation, distance from 0.5."""
    keys = sorted(set(ref) & set(other))
    xs = [ref[k] - 0.5 for k in keys]
    ys = [other[k] - 0.5 for k in keys]
    agree = [1.0 if (x > 0) == (y > 0) else 0.0 for x, y in zip(xs, ys, strict=True)]
    return {"units": len(keys), "sign_agreement": mean(agree), "correlation": pearson(xs, ys),
            "mean_abs_dev_ref": mean([abs(x) for x in xs]), "mean_abs_dev": mean([abs(y) for y in ys])}


# -------------------------------------------------------------------------------------------- steps


def _drop_svg(folder: Path) -> None:
    """Keep the PNGs only: RESULTS.md shows those, and the SVG twins would double what git stores."""
    for p in folder.glob("*.svg"):
        p.unlink()


def step_vanilla(ctx: Context) -> dict[str, Any]:
    """Step 1: the vanilla sweep of alpha * LLaVA + (1 - alpha) * Vicuna, with the Figure 1 plot."""
    from souplm.plots.sweep import plot_sweep
    from souplm.search.sweep import sweep

    res = sweep(ctx.pair_paths, list(ctx.settings.alphas), ctx.test_tasks, out_dir=None, cache=ctx.store,
                batch_size=ctx.settings.eval_batch, progress=ctx.progress, vocab_policy="extend")
    sweep_dir = ctx.work / "sweep"  # the sweep's own tables, as `souplm sweep` writes them
    sweep_dir.mkdir(parents=True, exist_ok=True)
    res.to_csv(sweep_dir / "sweep.csv")
    (sweep_dir / "sweep.md").write_text(res.to_markdown())
    (sweep_dir / "sweep.json").write_text(json.dumps(res.to_json(), indent=1))
    first, second = (ctx.roles[k] for k in ctx.pair)
    plot_sweep(res, ctx.out / "results" / "vanilla_sweep", title=f"Vanilla soup: alpha * {first} + (1 - alpha) * {second}",
               labels=(first, second))  # roles, not the family's hashed folder names
    _drop_svg(ctx.out / "results")
    for a in res.alphas:
        ctx.keep(vanilla_label(a), res.results[a])
    per_task = {}
    for info in ctx.data.info["tasks"]:
        name, hib, margin = info["name"], info["higher_is_better"], info["min_margin"]
        llava, vicuna = res.score(1.0, name), res.score(0.0, name)
        inner = [a for a in res.alphas if 0.0 < a < 1.0]
        best_alpha = max(inner, key=lambda a: (-math.inf if math.isnan(res.score(a, name))
                                               else (1 if hib else -1) * res.score(a, name))) if inner else None
        best = res.score(best_alpha, name) if best_alpha is not None else float("nan")
        top_base = llava if better(llava, vicuna, hib) or math.isnan(vicuna) else vicuna
        per_task[name] = {
            "llava": llava, "vicuna": vicuna, "best_alpha": best_alpha, "best_soup": best,
            "half": res.score(0.5, name) if 0.5 in res.alphas else None,
            "beats_both": bool(best_alpha is not None and better(best, llava, hib, margin)
                               and better(best, vicuna, hib, margin)),
            "margin_over_best_base": (best - top_base) if hib else (top_base - best),
        }
    return {
        "alphas": res.alphas,
        "scores": {f"{a:g}": {n: res.score(a, n) for n in ctx.task_names} for a in res.alphas},
        "per_task": per_task,
        "figure": "results/vanilla_sweep.png",
        "evaluations": len(res.alphas) * len(ctx.task_names),
        "labels": {f"{a:g}": vanilla_label(a) for a in res.alphas},
    }


def vanilla_label(alpha: float) -> str:
    """The label of the vanilla soup at `alpha` in the intervals of results.json."""
    return f"vanilla a={alpha:g}"


def step_learnable(ctx: Context) -> dict[str, Any]:
    """Step 2: per-mapping soups, every activation x (each single meta set + the mixed pair)."""
    from tqdm.auto import tqdm

    configs = [(m,) for m in META_SETS] + [tuple(ctx.settings.pair)]
    specs = [LearnSpec(metas=c, activation=a) for c in configs for a in ACTIVATIONS]
    runs = []
    for spec in tqdm(specs, desc="learnable soups", unit="soup", disable=not ctx.progress):
        runs.append(run_learn(ctx, spec))
    summary: dict[str, dict[str, dict[str, float]]] = {}
    for c in configs:
        label = "+".join(c)
        summary[label] = {}
        for info in ctx.data.info["tasks"]:
            vals = [r["scores"][info["name"]] for r in runs if r["meta"] == label]
            summary[label][info["name"]] = {"mean": mean(vals), "best": best_of(vals, info["higher_is_better"])}
    by_activation = {
        a: {n: mean([r["scores"][n] for r in runs if r["activation"] == a]) for n in TASKS} for a in ACTIVATIONS
    }
    return {"runs": runs, "configs": ["+".join(c) for c in configs], "pair": "+".join(ctx.settings.pair),
            "summary": summary, "by_activation": by_activation}


def step_regularized(ctx: Context, learnable: dict[str, Any]) -> dict[str, Any]:
    """Step 3: L1-regularized soups on the pair, and alpha plots per mapping (Figs. 5 and 6)."""
    from souplm.plots.alphas import plot_alphas

    s = ctx.settings
    pair = tuple(s.pair)
    free = next(r for r in learnable["runs"] if r["metas"] == list(pair) and r["activation"] == "softmax")
    runs = [run_learn(ctx, LearnSpec(metas=pair, activation="softmax", lam=lam)) for lam in s.lambdas]
    ref = unit_alphas(ctx, free)
    comparisons = []
    for lam, run in zip(s.lambdas, runs, strict=True):
        c = {"lambda": lam, **alpha_agreement(ref, unit_alphas(ctx, run))}
        c["stable"] = bool(c["sign_agreement"] >= STABLE_SIGN_AGREEMENT and not math.isnan(c["correlation"])
                           and c["correlation"] >= STABLE_CORRELATION)
        comparisons.append(c)
    # Fig. 5: the unregularized alphas learned on each single meta set, side by side.
    singles = [next(r for r in learnable["runs"] if r["metas"] == [m] and r["activation"] == "softmax")
               for m in META_SETS]
    across = []
    names = list(META_SETS)
    for i in range(len(singles)):
        for j in range(i + 1, len(singles)):
            agreement = alpha_agreement(unit_alphas(ctx, singles[i]), unit_alphas(ctx, singles[j]))
            across.append({"a": names[i], "b": names[j], **agreement})
    fig_meta = ctx.out / "results" / "alphas_metasets"
    fig_reg = ctx.out / "results" / "alphas_regularized"
    for folder in (fig_meta, fig_reg):
        shutil.rmtree(folder, ignore_errors=True)
    plot_alphas([role_table(ctx, r) for r in singles], fig_meta, labels=names, model=0)
    reg_labels = ["lambda 0"] + [f"lambda {lam:g}" for lam in s.lambdas]
    plot_alphas([role_table(ctx, r) for r in [free, *runs]], fig_reg, labels=reg_labels, model=0)
    for folder in (fig_meta, fig_reg):
        _drop_svg(folder)
    stable = all(c["stable"] for c in comparisons)
    return {
        "seed_study": regularization_seed_study(ctx, pair),
        "pair": "+".join(pair), "activation": "softmax", "reference": free["id"], "runs": runs,
        "comparisons": comparisons, "across_meta_sets": across,
        "mean_sign_agreement_across_meta_sets": mean([a["sign_agreement"] for a in across]),
        "thresholds": {"sign_agreement": STABLE_SIGN_AGREEMENT, "correlation": STABLE_CORRELATION},
        "stable": stable,
        "figures": {"metasets": sorted(str(p.relative_to(ctx.out)) for p in fig_meta.glob("*.png")),
                    "regularized": sorted(str(p.relative_to(ctx.out)) for p in fig_reg.glob("*.png"))},
    }


def regularization_seed_study(ctx: Context, pair: tuple[str, ...]) -> dict[str, Any]:
    """Issue 16 §5: every lambda at every seed of `reg_seeds`, against the right baseline. A lambda "keeps the
    pattern" when its soups put units on the same side of 0.5 as the unregularized soup of the same seed at
    least as often as two unregularized seeds agree with each other (and "changes it" when below that by
    more than the spread of the seed-to-seed agreements). Only alphas are compared: these soups are not scored."""
    s = ctx.settings
    seeds = list(s.reg_seeds)
    free = {sd: unit_alphas(ctx, run_learn(ctx, LearnSpec(metas=pair, seed=sd), score=sd == s.seeds[0]))
            for sd in seeds}
    base_pairs = [alpha_agreement(free[a], free[b]) for i, a in enumerate(seeds) for b in seeds[i + 1:]]
    base = [p["sign_agreement"] for p in base_pairs]
    baseline = {"mean_sign_agreement": mean(base), "min": min(base, default=float("nan")),
                "max": max(base, default=float("nan")), "mean_correlation": mean([p["correlation"] for p in base_pairs]),
                "pairs": len(base)}
    spread = (baseline["max"] - baseline["min"]) if base else float("nan")
    rows = []
    for lam in s.lambdas:
        reg = {sd: unit_alphas(ctx, run_learn(ctx, LearnSpec(metas=pair, lam=lam, seed=sd), score=sd == s.seeds[0]))
               for sd in seeds}
        same = [alpha_agreement(free[sd], reg[sd]) for sd in seeds]
        across = [alpha_agreement(reg[a], reg[b])["sign_agreement"] for i, a in enumerate(seeds) for b in seeds[i + 1:]]
        agree = mean([x["sign_agreement"] for x in same])
        if math.isnan(agree) or math.isnan(baseline["mean_sign_agreement"]):
            state = "inconclusive"
        elif agree >= baseline["mean_sign_agreement"]:
            state = "keeps the pattern"
        elif agree < baseline["mean_sign_agreement"] - spread:
            state = "changes the pattern"
        else:
            state = "inconclusive"
        rows.append({"lambda": lam, "sign_agreement_with_unregularized": agree,
                     "per_seed": [x["sign_agreement"] for x in same],
                     "correlation_with_unregularized": mean([x["correlation"] for x in same]),
                     "sign_agreement_between_seeds": mean(across),
                     "mean_abs_dev": mean([mean([abs(v - 0.5) for v in reg[sd].values()]) for sd in seeds]),
                     "state": state})
    states = {r["state"] for r in rows}
    verdict = ("holds" if states == {"keeps the pattern"} else "does not hold" if "changes the pattern" in states
               else "inconclusive")
    return {"seeds": seeds, "baseline": baseline, "lambdas": rows, "verdict": verdict}


def step_greedy(ctx: Context) -> dict[str, Any]:
    """Step 4: greedy and uniform soups of the four variants, each greedy soup chosen on a dev task."""
    from souplm.search.greedy import greedy_soup

    paths = [str(ctx.family[k]) for k in ctx.variants]
    out = []
    for heldout in ctx.settings.greedy_heldout:
        res = greedy_soup(paths, ctx.data.dev_tasks[heldout], test_tasks=ctx.test_tasks, cache=ctx.store,
                          batch_size=ctx.settings.eval_batch, progress=ctx.progress, vocab_policy="extend")
        out.append({
            "heldout": heldout, "metric": res.heldout["primary"], "higher_is_better": res.heldout["higher_is_better"],
            "ranking": [{"model": _role_of(ctx, m), "score": sc} for m, sc in res.ranking],
            "steps": [{**st, "ingredient": _role_of(ctx, st["ingredient"])} for st in res.steps],
            "chosen": [_role_of(ctx, m) for m in res.chosen],
            "greedy_heldout_score": res.greedy_score, "uniform_heldout_score": res.uniform_score,
            "test": res.test,
            "members": {"best single": [res.ranking[0][0]], "uniform": list(paths), "greedy": list(res.chosen)},
            "labels": {k: f"greedy {heldout}: {k}" for k in res.test},
        })
    return {"ingredients": [_role_of(ctx, p) for p in paths], "runs": out}


def uniform_soup_results(ctx: Context, members: list[str]) -> dict[str, dict[str, Any]]:
    """Test results of the uniform soup of `members` among the four variants, keyed as greedy_soup keys it
    (so a soup the greedy search scored is read from the cache, not computed again)."""
    from souplm.engine.recipe import Recipe
    from souplm.evaluate.cache import model_hash, soup_key
    from souplm.search.sweep import METHOD, SoupModel, evaluate_candidate

    paths = [str(ctx.family[k]) for k in ctx.variants]
    if ctx.soup4 is None:
        ctx.soup4 = (SoupModel(paths, batch_size=ctx.settings.eval_batch, progress=ctx.progress),
                     [model_hash(p) for p in paths])
    soup, hashes = ctx.soup4
    weights = [1.0 / len(members) if p in members else 0.0 for p in paths]
    key = soup_key(hashes, METHOD, {"weights": weights, "vocab_policy": "extend", "dtype": "float32"})
    recipe = Recipe.from_models(paths, METHOD, weights, output_model=paths[0], vocab_policy="extend")
    return evaluate_candidate(soup, recipe, key, ctx.test_tasks, limit=None, cache=ctx.store)


def step_bases(ctx: Context, greedy: dict[str, Any]) -> dict[str, Any]:
    """Every variant alone on every test task (the setup table), and the greedy step's soups' per-example
    values (read back from the cache)."""
    scores = {}
    for stage in VARIANTS:
        results = uniform_soup_results(ctx, [str(ctx.family[stage])])
        ctx.keep(ROLES[stage], results)
        scores[ROLES[stage]] = {n: float(r["score"]) for n, r in results.items()}
    for g in greedy["runs"]:
        for k, members in g["members"].items():
            ctx.keep(g["labels"][k], uniform_soup_results(ctx, members))
    ctx.soup4 = None  # four models' tensors: let them go before the next step
    speciality = {}
    for role, task in SPECIALITY.items():
        hib = _info(ctx, task)["higher_is_better"]
        others = [m for m in scores if m != role]
        runner_up = max(others, key=lambda m: (-math.inf if math.isnan(scores[m][task])
                                               else (1 if hib else -1) * scores[m][task]))
        speciality[role] = {"task": task, "runner_up": runner_up,
                            "gap": (1 if hib else -1) * (scores[role][task] - scores[runner_up][task])}
    return {"models": list(scores), "scores": scores, "labels": {m: m for m in scores}, "speciality": speciality}


def step_robustness(ctx: Context, learnable: dict[str, Any]) -> dict[str, Any]:
    """Step 5: seeds of the pair softmax soup, and per-mapping against one learned whole-model alpha."""
    s = ctx.settings
    pair = tuple(s.pair)
    runs = []
    for seed in s.seeds:
        found = [r for r in learnable["runs"] if r["metas"] == list(pair) and r["activation"] == "softmax"
                 and r["seed"] == seed]
        runs.append(found[0] if found else run_learn(ctx, LearnSpec(metas=pair, seed=seed)))
    scores = {}
    for info in ctx.data.info["tasks"]:
        vals = [r["scores"][info["name"]] for r in runs]
        scores[info["name"]] = run_spread(vals)
    per_seed = [unit_alphas(ctx, r) for r in runs]
    keys = sorted(set.intersection(*(set(a) for a in per_seed)))
    unit_std = [stdev([a[k] for a in per_seed]) for k in keys]
    unit_mean = [mean([a[k] for a in per_seed]) for k in keys]
    pairs = [alpha_agreement(per_seed[i], per_seed[j]) for i in range(len(per_seed)) for j in range(i + 1, len(per_seed))]
    alphas = {"units": len(keys), "mean_unit_std": mean(unit_std), "max_unit_std": max(unit_std) if unit_std else 0.0,
              "mean_alpha": mean(unit_mean),
              "mean_sign_agreement": mean([p["sign_agreement"] for p in pairs]),
              "mean_correlation": mean([p["correlation"] for p in pairs])}
    # The whole-model soup at every seed too (issue 16 §1): the granularity claim compares the seeds'
    # item-by-item averages, and the spread of both sides is reported beside the item-level intervals.
    wholes = [run_learn(ctx, LearnSpec(metas=pair, granularity="model", seed=sd)) for sd in s.seeds]
    whole = wholes[0]
    average_items(ctx, [r["id"] for r in runs], PER_MAPPING_MEAN, TASKS)
    average_items(ctx, [r["id"] for r in wholes], WHOLE_MODEL_MEAN, TASKS)
    whole_scores = {}
    for info in ctx.data.info["tasks"]:
        vals = [r["scores"][info["name"]] for r in wholes]
        whole_scores[info["name"]] = run_spread(vals)
    per_mapping = runs[0]
    granularity = {}
    for info in ctx.data.info["tasks"]:
        n, hib, margin = info["name"], info["higher_is_better"], info["min_margin"]
        pm, wm = scores[n]["mean"], whole_scores[n]["mean"]
        diff = (pm - wm) if hib else (wm - pm)  # > 0: per-mapping is better
        spread = max(scores[n]["std"], whole_scores[n]["std"])
        granularity[n] = {"per_mapping": pm, "whole_model": wm, "advantage": diff,
                          "per_mapping_wins": better(pm, wm, hib, margin), "seed_std": spread,
                          "beyond_seed_noise": abs(diff) > max(2 * spread, margin)}
    return {"pair": "+".join(pair), "seeds": list(s.seeds), "runs": [r["id"] for r in runs],
            "scores": scores, "alphas": alphas, "whole_model": whole, "whole_model_runs": [r["id"] for r in wholes],
            "whole_model_scores": whole_scores, "labels": {"per-mapping": PER_MAPPING_MEAN,
                                                           "whole-model": WHOLE_MODEL_MEAN},
            "whole_model_alpha_llava": whole["alpha_llava"]["mean"], "granularity": granularity,
            "per_mapping_wins": sum(1 for g in granularity.values() if g["per_mapping_wins"]),
            "budget": {"examples": per_mapping["examples"], "steps": per_mapping["steps"],
                       "whole_model_steps": whole["steps"]}}


PER_MAPPING_MEAN = "per-mapping (seed mean)"
WHOLE_MODEL_MEAN = "whole-model (seed mean)"


def average_items(ctx: Context, labels: list[str], label: str, tasks: tuple[str, ...] | list[str]) -> None:
    """Item-by-item average of several soups' values (e.g. one configuration's seeds), kept under `label`:
    only where every soup has the task, on the same items."""
    for task in tasks:
        cols = [ctx.items[lb][task] for lb in labels if task in ctx.items.get(lb, {})]
        if cols and len(cols) == len(labels) and len({len(c[0]) for c in cols}) == 1:
            num = [mean([c[0][i] for c in cols]) for i in range(len(cols[0][0]))]
            ctx.items.setdefault(label, {})[task] = (num, list(cols[0][1]))


def _info(ctx: Context, task: str) -> dict[str, Any]:
    return next(t for t in [*ctx.data.info["tasks"], *ctx.data.info.get("general_tasks", [])] if t["name"] == task)


def compare(ctx: Context, kind: str, task: str, a: str, b: str, a_name: str | None = None,
            b_name: str | None = None, *, averaged: bool = False) -> dict[str, Any] | None:
    """A paired test of model `a` against model `b` on the same test items of `task` (labels of ctx.items).

    Accuracies of 0/1 items: McNemar's exact test, with the difference's paired bootstrap interval; anything
    else (bits per byte, item averages over several soups): the paired bootstrap. `advantage` is the
    difference turned so that > 0 means a is better (for bits per byte: b - a). `averaged`: a's items are
    averages over several soups (fractions), so the paired bootstrap even where they happen to be 0/1.
    """
    if task not in ctx.items.get(a, {}) or task not in ctx.items.get(b, {}):
        return None
    (na, da), (nb, db) = ctx.items[a][task], ctx.items[b][task]
    if len(na) != len(nb):
        return None
    binary = not averaged and all(d == 1.0 for d in da) and all(v in (0.0, 1.0) for v in (*na, *nb))
    t = mcnemar(na, nb) if binary else paired_bootstrap(na, nb, da, den_b=db)
    hib = _info(ctx, task)["higher_is_better"]
    d = t.diff
    adv = [d.estimate, d.low, d.high] if hib else [-d.estimate, -d.high, -d.low]
    return {"kind": kind, "task": task, "a": a_name or a, "b": b_name or b, **t.to_json(), "advantage": adv}


def step_statistics(ctx: Context, results: dict[str, Any]) -> dict[str, Any]:
    """Step 6: a 95% interval on every score (bootstrap over test items) and a paired test for every comparison
    the document makes, with Holm's correction over all of them."""
    intervals = {label: {task: bootstrap_ratio(num, den).to_json() for task, (num, den) in tasks.items()}
                 for label, tasks in sorted(ctx.items.items())}
    van = results["vanilla"]
    comps: list[dict[str, Any] | None] = []
    runs = results["learnable"]["runs"]
    average_items(ctx, [r["id"] for r in runs], "learnable mean", TASKS)  # every learnable soup is scored on every task
    for n in TASKS:
        hib = _info(ctx, n)["higher_is_better"]
        pt = van["per_task"][n]
        if pt["best_alpha"] is not None:
            best = vanilla_label(pt["best_alpha"])
            name = f"vanilla a={pt['best_alpha']:g}"
            comps.append(compare(ctx, "vanilla soup vs LLaVA", n, best, vanilla_label(1.0), name, "LLaVA"))
            comps.append(compare(ctx, "vanilla soup vs Vicuna", n, best, vanilla_label(0.0), name, "Vicuna"))
            top = max(runs, key=lambda r: (-math.inf if math.isnan(r["scores"][n])
                                           else (1 if hib else -1) * r["scores"][n]))
            comps.append(compare(ctx, "best learnable vs best vanilla", n, top["id"], best, None, name))
        if 0.5 in van["alphas"]:
            comps.append(compare(ctx, "mean learnable vs vanilla 0.5", n, "learnable mean", vanilla_label(0.5),
                                 averaged=True))
        reg = results["regularized"]
        for run in reg["runs"]:
            comps.append(compare(ctx, "regularized vs unregularized", n, run["id"], reg["reference"],
                                 f"lambda {run['lambda']:g}", "lambda 0"))
        comps.append(compare(ctx, "per-mapping vs whole-model", n, PER_MAPPING_MEAN, WHOLE_MODEL_MEAN,
                             "per-mapping (seed mean)", "whole-model (seed mean)", averaged=True))
        for g in results["greedy"]["runs"]:
            lb = g["labels"]
            if "greedy" in lb:
                comps.append(compare(ctx, f"greedy vs uniform ({g['heldout']})", n, lb["greedy"], lb["uniform"],
                                     "greedy", "uniform"))
                comps.append(compare(ctx, f"greedy vs best single ({g['heldout']})", n, lb["greedy"],
                                     lb["best single"], "greedy", "best single"))
    for role, sp in results.get("bases", {}).get("speciality", {}).items():
        comps.append(compare(ctx, "variant vs runner-up on its speciality", sp["task"], role, sp["runner_up"]))
    for r in results.get("adamms", {}).get("runs", []):
        best = r["check"]["best_interior_alpha"]
        for crit, ch in r["choices"].items():
            if ch["alpha"] != best:
                comps.append(compare(ctx, f"AdaMMS {crit} choice vs labelled best", r["task"],
                                     adamms_label(r["setting"], ch["alpha"]), adamms_label(r["setting"], best),
                                     f"{r['name']}: alpha {ch['alpha']:g}", f"alpha {best:g}"))
    comps += rounds_comparisons(ctx, results)
    found = [c for c in comps if c is not None]
    for c, p in zip(found, holm([c["p"] for c in found]), strict=True):
        c["p_holm"] = p
        c["significant"] = p < ALPHA
    return {"resamples": RESAMPLES, "level": LEVEL, "level_percent": round(100 * LEVEL), "alpha": ALPHA,
            "min_items": MIN_ITEMS,
            "correction": "holm",
            "n_comparisons": len(found), "intervals": intervals, "comparisons": found}


# The references the rounds' choice is compared with (issue 16 §7): the vanilla soup at alpha 0.5 and both bases.
ROUNDS_REFERENCES: tuple[tuple[float, str], ...] = ((0.5, "vanilla 0.5"), (1.0, "LLaVA"), (0.0, "Vicuna"))


def rounds_comparisons(ctx: Context, results: dict[str, Any]) -> list[dict[str, Any] | None]:
    """Paired tests of the setting the three rounds chose (its seeds' item-by-item average) against the vanilla
    soup at 0.5 and the bases, on every test task and every generalization task."""
    comps: list[dict[str, Any] | None] = []
    rd = results.get("rounds")
    if not rd:
        return comps
    label = rd["round3"]["label"]
    tasks = [("rounds choice vs", n) for n in TASKS]
    if results.get("general"):
        tasks += [("generalization: rounds choice vs", n) for n in results["general"]["tasks"]]
    for prefix, n in tasks:
        for alpha, name in ROUNDS_REFERENCES:
            comps.append(compare(ctx, f"{prefix} {name}", n, label, vanilla_label(alpha),
                                 "rounds choice (seed mean)", name, averaged=True))
    return comps


def _tally(comps: list[dict[str, Any]]) -> dict[str, Any]:
    """Significant wins and losses of a family of comparisons, and the rule's verdict: holds with significant
    gains on a majority of them and no significant loss; does not hold with a significant loss and no more
    significant gains than losses; inconclusive otherwise."""
    wins = [c["task"] for c in comps if c["significant"] and c["advantage"][0] > 0]
    losses = [c["task"] for c in comps if c["significant"] and c["advantage"][0] < 0]
    if len(wins) > len(comps) / 2 and not losses:
        v = "holds"
    elif losses and len(wins) <= len(losses):
        v = "does not hold"
    else:
        v = "inconclusive"
    return {"verdict": v, "n": len(comps), "significant_wins": wins, "significant_losses": losses}


def step_claims(ctx: Context, results: dict[str, Any]) -> dict[str, Any]:
    """Step 7: each of the paper's claims decided by the paired tests of step 6 (Holm-corrected), with the
    point comparisons beside them."""
    infos = ctx.data.info["tasks"]
    n_tasks = len(infos)
    van = results["vanilla"]["per_task"]
    beats = [n for n, v in van.items() if v["beats_both"]]
    runs = results["learnable"]["runs"]
    comps = results["statistics"]["comparisons"]

    def of(kind: str) -> list[dict[str, Any]]:
        return [c for c in comps if c["kind"] == kind]

    learn_vs = {}
    for info in infos:
        n, hib, margin = info["name"], info["higher_is_better"], info["min_margin"]
        best_learn = best_of([r["scores"][n] for r in runs], hib)
        mean_learn = mean([r["scores"][n] for r in runs])
        v = van[n]
        half = v["half"] if v["half"] is not None else float("nan")
        learn_vs[n] = {"best_learnable": best_learn, "best_vanilla": v["best_soup"],
                       "best_wins": better(best_learn, v["best_soup"], hib, margin),
                       "mean_learnable": mean_learn, "vanilla_half": half,
                       "mean_wins": better(mean_learn, half, hib, margin)}
    best_wins = sum(1 for x in learn_vs.values() if x["best_wins"])
    mean_wins = sum(1 for x in learn_vs.values() if x["mean_wins"])
    reg = results["regularized"]
    rob = results["robustness"]

    # Vanilla beats both bases on some task: both tests significant and positive on one task.
    by_task: dict[str, list[dict[str, Any]]] = {}
    for c in of("vanilla soup vs LLaVA") + of("vanilla soup vs Vicuna"):
        by_task.setdefault(c["task"], []).append(c)
    both = [t for t, cs in by_task.items() if len(cs) == 2 and all(c["significant"] and c["advantage"][0] > 0
                                                                   for c in cs)]
    behind = [t for t, cs in by_task.items() if any(c["significant"] and c["advantage"][0] < 0 for c in cs)]
    v_verdict = ("holds" if both else "does not hold" if by_task and len(behind) == len(by_task)
                 else "inconclusive")
    # Stable under regularization: a rule on the alpha pattern, judged against seed-to-seed variation.
    seed_sign = (reg["seed_study"]["baseline"]["mean_sign_agreement"] if "seed_study" in reg
                 else rob["alphas"]["mean_sign_agreement"])
    reg_sign = min((c["sign_agreement"] for c in reg["comparisons"]), default=float("nan"))
    if "seed_study" in reg:
        s_verdict = reg["seed_study"]["verdict"]
    elif reg["stable"]:
        s_verdict = "holds"
    elif not math.isnan(seed_sign) and not math.isnan(reg_sign) and reg_sign < seed_sign:
        s_verdict = "does not hold"
    else:
        s_verdict = "inconclusive"
    extra = {}
    if results.get("rounds"):
        extra["rounds_choice_beats_vanilla"] = {**_tally(of("rounds choice vs vanilla 0.5")),
                                                "vs_llava": _tally(of("rounds choice vs LLaVA")),
                                                "vs_vicuna": _tally(of("rounds choice vs Vicuna"))}
    if results.get("general"):
        extra["generalizes"] = {**_tally(of("generalization: rounds choice vs vanilla 0.5")),
                                "vs_llava": _tally(of("generalization: rounds choice vs LLaVA")),
                                "vs_vicuna": _tally(of("generalization: rounds choice vs Vicuna"))}
    return {
        **extra,
        "n_tasks": n_tasks,
        "level": results["statistics"]["alpha"],
        "n_comparisons": results["statistics"]["n_comparisons"],
        "vanilla_beats_bases": {"holds": bool(beats), "tasks": beats, "count": len(beats), "verdict": v_verdict,
                                "significant_tasks": both, "behind_a_base": behind},
        "learnable_beats_vanilla": {"holds": best_wins > n_tasks / 2, "best_wins": best_wins,
                                    "mean_wins": mean_wins, "per_task": learn_vs,
                                    **_tally(of("best learnable vs best vanilla")),
                                    "mean": _tally(of("mean learnable vs vanilla 0.5"))},
        "stable_under_regularization": {"holds": reg["stable"], "comparisons": reg["comparisons"],
                                        "thresholds": reg["thresholds"], "verdict": s_verdict,
                                        "seed_sign_agreement": seed_sign, "lowest_regularized_sign_agreement": reg_sign,
                                        "scores": _tally(of("regularized vs unregularized"))},
        "finer_granularity_helps": {"holds": rob["per_mapping_wins"] > n_tasks / 2
                                    and any(g["beyond_seed_noise"] and g["per_mapping_wins"]
                                            for g in rob["granularity"].values()),
                                    "wins": rob["per_mapping_wins"],
                                    "beyond_noise": sum(1 for g in rob["granularity"].values()
                                                        if g["beyond_seed_noise"] and g["per_mapping_wins"]),
                                    **_tally(of("per-mapping vs whole-model"))},
    }


def _role(stage: str) -> str:
    return {**ROLES, **ROLES_EXTRA}[stage]


def adamms_label(setting: int, alpha: float) -> str:
    """The label of AdaMMS setting `setting`'s soup at `alpha` in the intervals of results.json."""
    return f"adamms {setting} a={alpha:g}"


def _labelled(check: dict[str, Any], alpha: float) -> dict[str, Any]:
    """How one choice fares on the labels (as search.compare_with_labels does for the chosen alpha)."""
    sign = 1.0 if check["higher_is_better"] else -1.0
    scores = {float(a): v for a, v in check["scores"].items()}
    best = check["best_interior_score"]
    interior = sorted(scores)[1:-1]
    return {"alpha": alpha, "score": scores[alpha], "gap": sign * (best - scores[alpha]),
            "rank": 1 + sum(1 for a in interior if sign * scores[a] > sign * scores[alpha]),
            "agree": scores[alpha] == best}


def run_adamms_setting(ctx: Context, i: int, setting: dict[str, Any]) -> dict[str, Any]:
    """One AdaMMS search (target <- source on a task's unlabeled test questions), cached under a digest of
    its inputs; the check task's per-example values of every alpha kept for the intervals."""
    from souplm.evaluate.cache import model_hash
    from souplm.search.adamms import SearchResult, _alpha_key, _key_parts, adamms_search, plot_search

    s = ctx.settings
    target, source = ctx.family[setting["target"]], ctx.family[setting["source"]]
    tname = setting["task"]
    task, spec = ctx.data.tasks[tname], TASK_SPECS[tname]
    rows = [json.loads(line) for line in (ctx.work / "tasks" / tname / "data.jsonl").read_text().splitlines()]
    # Questions (and images) only: the answers are never read by the search.
    inputs = [{"prompt": spec["prompt"].format(question=r["question"]),
               "image": Path(r["image"]) if "image" in r else None} for r in rows[: s.adamms_inputs]]
    key = stable_digest([model_hash(target), model_hash(source), list(s.adamms_alphas), setting,
                         ADAMMS_CRITERION, ADAMMS_METRIC, [[r["prompt"], str(r["image"])] for r in inputs], rows,
                         spec["max_new_tokens"], "criterion-2"])
    folder = ctx.work / "adamms" / key
    record = folder / "search.json"
    if not record.is_file():
        log(f"AdaMMS search {key}: {_role(setting['target'])} <- {_role(setting['source'])} on {tname}, "
            f"{len(s.adamms_alphas)} alphas x {len(inputs)} unlabeled questions")
        adamms_search(target, source, list(s.adamms_alphas), inputs, mapping=setting["mapping"],
                      vocab_policy=setting["vocab_policy"], metric=ADAMMS_METRIC, criterion=ADAMMS_CRITERION,
                      max_new_tokens=spec["max_new_tokens"], stop=spec["stop"], chat_template=True, check_task=task,
                      cache=ctx.store, batch_size=s.eval_batch, out_dir=folder, write_model=False, force=True,
                      progress=ctx.progress)
    found = json.loads(record.read_text())
    parts = _key_parts(target, source, None, setting["mapping"], "linear")
    for a in found["alphas"]:
        hit = ctx.store.get(_alpha_key(parts, float(a)), task.name, task.cache_version, None)
        if hit is not None:
            ctx.keep(adamms_label(i, float(a)), {task.name: hit})
    # Plotted again with the study's names for the two models (the search's own plot names folders).
    figure = ctx.out / "results" / f"adamms_search_{i}"
    plot_search(replace(SearchResult.from_json(found), target=_role(setting["target"]),
                        source=_role(setting["source"])), figure)
    check = found["check"]
    choices = {"adamms": float(found["chosen"]), "mean": float(found["alternatives"]["mean token_f1"])}
    return {
        "setting": i, "name": f"{_role(setting['target'])} <- {_role(setting['source'])}", "task": tname,
        "target": _role(setting["target"]), "source": _role(setting["source"]), "mapping": setting["mapping"],
        **{k: found[k] for k in ("alphas", "metric", "criterion", "chosen", "minima", "differences", "check",
                                 "n_inputs", "timings")},
        "choices": {c: _labelled(check, a) for c, a in choices.items()},
        "labels": {f"{float(a):g}": adamms_label(i, float(a)) for a in found["alphas"]},
        "figure": str(figure.with_suffix(".png").relative_to(ctx.out)), "search_dir": str(folder),
    }


def step_adamms(ctx: Context, llava_score: float) -> dict[str, Any]:
    """Step 8 (issue 6, 16 §4): AdaMMS searches in several settings (target <- source on a task), alpha chosen
    by generation consistency on unlabeled questions with the authors' criterion (and souplm's older
    criterion on the same answers), each checked against the labelled best alpha: the agreement rate has a
    denominator. Each search is cached under a digest of its inputs, so a rerun reads it back."""
    runs = [run_adamms_setting(ctx, i, st) for i, st in enumerate(ADAMMS_SETTINGS)
            if st["target"] in ctx.family and st["source"] in ctx.family]
    _drop_svg(ctx.out / "results")
    built = ctx.family["cogvlm"] / "stage.json"  # the family build's record (dev accuracy before and after training)
    stage = json.loads(built.read_text())["metrics"] if built.is_file() else {}
    agreement = {c: {"agree": sum(1 for r in runs if r["choices"][c]["agree"]), "settings": len(runs),
                     "mean_gap": mean([r["choices"][c]["gap"] for r in runs])} for c in ("adamms", "mean")}
    return {
        "runs": runs, "agreement": agreement, "criterion": ADAMMS_CRITERION, "metric": ADAMMS_METRIC,
        "cogvlm_dev_accuracy": stage.get("dev_accuracy_all"),
        "cogvlm_dev_accuracy_before_training": stage.get("before_training", {}).get("dev_accuracy_all"),
        "llava_test_score": llava_score, "paper": ADAMMS_PAPER,
    }
