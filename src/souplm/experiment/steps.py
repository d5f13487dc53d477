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
    ADAMMS_MAPPING,
    ADAMMS_METRIC,
    ADAMMS_PAPER,
    META_SETS,
    ROLES,
    ROLES_EXTRA,
    STABLE_CORRELATION,
    STABLE_SIGN_AGREEMENT,
    TASK_SPECS,
    TASKS,
    Settings,
)
from souplm.experiment.stats import best_of, better, mean, pearson, stdev


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
    hashes: list[str] = field(default_factory=list)
    learn_computed: int = 0
    learn_cached: int = 0

    @property
    def pair_paths(self) -> list[str]:
        """(LLaVA, Vicuna) folders: the vanilla and learnable soups' models, LLaVA first (its architecture)."""
        return [str(self.family["llava"]), str(self.family["smollm2"])]

    @property
    def test_tasks(self) -> list[Any]:
        """The test tasks in the table order."""
        return [self.data.tasks[n] for n in TASKS]


def _role_of(ctx: Context, path: str) -> str:
    """A model folder's name in the study (LLaVA, Vicuna, Math, Shakespeare)."""
    for stage, role in ROLES.items():
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
        "optimizer": {"name": "adam", "lr": s.lr},
        "training": {"epochs": s.epochs, "batch_size": s.learn_batch, "max_length": s.max_length,
                     "evaluate": False},
        "meta_sets": [{"path": str(ctx.data.meta_sets[m]), "format": META_SETS[m][1],
                       "samples": min(s.meta_samples, ctx.data.meta_rows[m])} for m in spec.metas],
        "output": str(output),
        "seed": spec.seed,
        "merge": False,
    }


def _data_digest(ctx: Context, spec: LearnSpec) -> list[str]:
    """Content hashes of a soup's meta-set files: new data means a new soup folder."""
    return [hashlib.sha256(ctx.data.meta_sets[m].read_bytes()).hexdigest()[:16] for m in spec.metas]


def run_learn(ctx: Context, spec: LearnSpec) -> dict[str, Any]:
    """Learn one soup (or find it learned) and score it on every test task; returns its record."""
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
    scores = evaluate_table(ctx, table, table_path)
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


def evaluate_table(ctx: Context, table: Any, table_path: Path) -> dict[str, float]:
    """Scores of the (LLaVA, Vicuna) soup a coefficient table describes, in memory, through the cache."""
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
    results = evaluate_candidate(ctx.soup, recipe, key, ctx.test_tasks, limit=None, cache=ctx.store)
    return {n: float(r["score"]) for n, r in results.items()}


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
    plot_sweep(res, ctx.out / "results" / "vanilla_sweep", title="Vanilla soup: alpha * LLaVA + (1 - alpha) * Vicuna",
               labels=("LLaVA", "Vicuna"))  # roles, not the family's hashed folder names
    _drop_svg(ctx.out / "results")
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
        "scores": {f"{a:g}": {n: res.score(a, n) for n in TASKS} for a in res.alphas},
        "per_task": per_task,
        "figure": "results/vanilla_sweep.png",
        "evaluations": len(res.alphas) * len(TASKS),
    }


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
        "pair": "+".join(pair), "activation": "softmax", "reference": free["id"], "runs": runs,
        "comparisons": comparisons, "across_meta_sets": across,
        "mean_sign_agreement_across_meta_sets": mean([a["sign_agreement"] for a in across]),
        "thresholds": {"sign_agreement": STABLE_SIGN_AGREEMENT, "correlation": STABLE_CORRELATION},
        "stable": stable,
        "figures": {"metasets": sorted(str(p.relative_to(ctx.out)) for p in fig_meta.glob("*.png")),
                    "regularized": sorted(str(p.relative_to(ctx.out)) for p in fig_reg.glob("*.png"))},
    }


def step_greedy(ctx: Context) -> dict[str, Any]:
    """Step 4: greedy and uniform soups of the four variants, each greedy soup chosen on a dev task."""
    from souplm.search.greedy import greedy_soup

    paths = [str(ctx.family[k]) for k in ("llava", "smollm2", "math", "shakespeare")]
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
        })
    return {"ingredients": [_role_of(ctx, p) for p in paths], "runs": out}


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
        scores[info["name"]] = {"mean": mean(vals), "std": stdev(vals), "min": min(vals), "max": max(vals)}
    per_seed = [unit_alphas(ctx, r) for r in runs]
    keys = sorted(set.intersection(*(set(a) for a in per_seed)))
    unit_std = [stdev([a[k] for a in per_seed]) for k in keys]
    unit_mean = [mean([a[k] for a in per_seed]) for k in keys]
    pairs = [alpha_agreement(per_seed[i], per_seed[j]) for i in range(len(per_seed)) for j in range(i + 1, len(per_seed))]
    alphas = {"units": len(keys), "mean_unit_std": mean(unit_std), "max_unit_std": max(unit_std) if unit_std else 0.0,
              "mean_alpha": mean(unit_mean),
              "mean_sign_agreement": mean([p["sign_agreement"] for p in pairs]),
              "mean_correlation": mean([p["correlation"] for p in pairs])}
    whole = run_learn(ctx, LearnSpec(metas=pair, granularity="model", seed=s.seeds[0]))
    per_mapping = runs[0]
    granularity = {}
    for info in ctx.data.info["tasks"]:
        n, hib, margin = info["name"], info["higher_is_better"], info["min_margin"]
        pm, wm = per_mapping["scores"][n], whole["scores"][n]
        diff = (pm - wm) if hib else (wm - pm)  # > 0: per-mapping is better
        granularity[n] = {"per_mapping": pm, "whole_model": wm, "advantage": diff,
                          "per_mapping_wins": better(pm, wm, hib, margin), "seed_std": scores[n]["std"],
                          "beyond_seed_noise": abs(diff) > max(2 * scores[n]["std"], margin)}
    return {"pair": "+".join(pair), "seeds": list(s.seeds), "runs": [r["id"] for r in runs],
            "scores": scores, "alphas": alphas, "whole_model": whole,
            "whole_model_alpha_llava": whole["alpha_llava"]["mean"], "granularity": granularity,
            "per_mapping_wins": sum(1 for g in granularity.values() if g["per_mapping_wins"]),
            "budget": {"examples": per_mapping["examples"], "steps": per_mapping["steps"],
                       "whole_model_steps": whole["steps"]}}


def step_claims(ctx: Context, results: dict[str, Any]) -> dict[str, Any]:
    """Step 6: each of the paper's claims decided by a comparison of the numbers above."""
    infos = ctx.data.info["tasks"]
    n_tasks = len(infos)
    van = results["vanilla"]["per_task"]
    beats = [n for n, v in van.items() if v["beats_both"]]
    runs = results["learnable"]["runs"]
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
    return {
        "n_tasks": n_tasks,
        "vanilla_beats_bases": {"holds": bool(beats), "tasks": beats, "count": len(beats)},
        "learnable_beats_vanilla": {"holds": best_wins > n_tasks / 2, "best_wins": best_wins,
                                    "mean_wins": mean_wins, "per_task": learn_vs},
        "stable_under_regularization": {"holds": reg["stable"], "comparisons": reg["comparisons"],
                                        "thresholds": reg["thresholds"]},
        "finer_granularity_helps": {"holds": rob["per_mapping_wins"] > n_tasks / 2
                                    and any(g["beyond_seed_noise"] and g["per_mapping_wins"]
                                            for g in rob["granularity"].values()),
                                    "wins": rob["per_mapping_wins"],
                                    "beyond_noise": sum(1 for g in rob["granularity"].values()
                                                        if g["beyond_seed_noise"] and g["per_mapping_wins"])},
    }


def step_adamms(ctx: Context, llava_score: float) -> dict[str, Any]:
    """Step 7 (issue 6): LLaVA merged into the CogVLM-style variant through a mapping spec, alpha chosen
    by generation consistency on unlabeled questions, then checked against the labelled best alpha.

    The whole search is cached under a digest of its inputs (the models' content hashes, the grid, the
    questions), so a rerun reads it back instead of generating again.
    """
    from souplm.evaluate.cache import model_hash
    from souplm.search.adamms import SearchResult, adamms_search, plot_search

    s = ctx.settings
    target, source = ctx.family["cogvlm"], ctx.family["llava"]
    task = ctx.data.tasks["easy-vqa"]
    spec = TASK_SPECS["easy-vqa"]
    vqa_rows = [json.loads(line) for line in (ctx.work / "tasks" / "easy-vqa" / "data.jsonl").read_text().splitlines()]
    # Questions and images only: the answers are never read by the search.
    inputs = [{"prompt": spec["prompt"].format(question=r["question"]), "image": Path(r["image"])}
              for r in vqa_rows[: s.adamms_inputs]]
    key = stable_digest([model_hash(target), model_hash(source), list(s.adamms_alphas), ADAMMS_MAPPING,
                         ADAMMS_METRIC, [[r["prompt"], str(r["image"])] for r in inputs], vqa_rows,
                         spec["max_new_tokens"]])
    folder = ctx.work / "adamms" / key
    record = folder / "search.json"
    if not record.is_file():
        log(f"AdaMMS search {key}: {len(s.adamms_alphas)} alphas x {len(inputs)} unlabeled questions")
        adamms_search(target, source, list(s.adamms_alphas), inputs, mapping=ADAMMS_MAPPING, metric=ADAMMS_METRIC,
                      max_new_tokens=spec["max_new_tokens"], stop=spec["stop"], chat_template=True, check_task=task,
                      cache=ctx.store, batch_size=s.eval_batch, out_dir=folder, write_model=False, force=True,
                      progress=ctx.progress)
    found = json.loads(record.read_text())
    # Plotted again with the study's names for the two models (the search's own plot names folders).
    plot_search(replace(SearchResult.from_json(found), target=ROLES_EXTRA["cogvlm"], source=ROLES["llava"]),
                ctx.out / "results" / "adamms_search")
    _drop_svg(ctx.out / "results")
    built = target / "stage.json"  # the family build's record (dev accuracy before and after training)
    stage = json.loads(built.read_text())["metrics"] if built.is_file() else {}
    return {
        **{k: found[k] for k in ("alphas", "metric", "chosen", "differences", "check", "n_inputs", "timings")},
        "mapping": ADAMMS_MAPPING, "figure": "results/adamms_search.png", "search_dir": str(folder),
        "cogvlm_dev_accuracy": stage.get("dev_accuracy_all"),
        "cogvlm_dev_accuracy_before_training": stage.get("before_training", {}).get("dev_accuracy_all"),
        "llava_test_score": llava_score, "paper": ADAMMS_PAPER,
    }

