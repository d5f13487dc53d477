"""The second family (issue 16 §6): the study's vanilla sweep, learnable soup and greedy soup on Gemma 3 270M.

The family (`python -m souplm.experiment.family build --family gemma3`) is Gemma 3 270M ("Gemma 3") and two
specialists fine-tuned from it, "Gemma-Math" and "Gemma-Shakespeare". The steps are the study's own
(`steps.step_vanilla`, `steps.run_learn`, `steps.step_greedy`) on a `Context` that names this family's roles,
soup pair, variants and test tasks; only the text tasks apply (no variant sees images). The soups:

- vanilla sweep: alpha * Gemma-Math + (1 - alpha) * Gemma-Shakespeare over the settings' alphas;
- learnable soup: softmax activation, `layer_mapping` granularity, learned on each text meta set the two
  specialists stand for (math, shakespeare) and on their mixed pair;
- greedy soup over the three models, chosen on each of the settings' held-out dev tasks;
- the setup table: every model alone on every task, with the gap each specialist opens on its speciality.

Every score has a bootstrap interval and every comparison a paired test (McNemar or paired bootstrap,
`stats`), Holm-adjusted over this section's comparisons.

Command line (results under `--out`, default scratch/second-family[-quick]; docs/RESULTS.md gets this section
through `report.py` when the study runs with the second family built)::

    python -m souplm.experiment.second_family [--quick | --large] [--cache DIR] [--out DIR]
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

from souplm.errors import SoupError
from souplm.experiment.common import log, rounded
from souplm.experiment.data import Data, prepare_data
from souplm.experiment.settings import FULL, LARGE, QUICK, Settings
from souplm.experiment.stats import ALPHA, LEVEL, RESAMPLES, bootstrap_ratio, holm

FAMILY = "gemma3"
ROLES: dict[str, str] = {"math": "Gemma-Math", "shakespeare": "Gemma-Shakespeare", "gemma3": "Gemma 3"}
PAIR: tuple[str, str] = ("math", "shakespeare")  # the vanilla and learnable soups' two models, alpha: Gemma-Math's
VARIANTS: tuple[str, ...] = ("math", "shakespeare", "gemma3")  # the greedy soup's ingredients (first: architecture)
TASK_NAMES: tuple[str, ...] = ("math", "shakespeare-ppl", "shakespeare-mc", "instruct-ppl")
META_CONFIGS: tuple[tuple[str, ...], ...] = (("math",), ("shakespeare",), ("math", "shakespeare"))
SPECIALITY: dict[str, str] = {"Gemma-Math": "math", "Gemma-Shakespeare": "shakespeare-ppl"}
STUDY_PIP = "pip install -e '.[study]'"


def text_only(data: Data) -> Data:
    """The study's data without the visual task, its dev task and its meta set."""
    keep = set(TASK_NAMES)
    info = dict(data.info)
    info["tasks"] = [t for t in data.info["tasks"] if t["name"] in keep]
    info["dev_tasks"] = [t for t in data.info["dev_tasks"] if t["name"].removesuffix("-dev") in keep]
    metas = {m for c in META_CONFIGS for m in c}
    info["meta_sets"] = [m for m in data.info["meta_sets"] if m["name"] in metas]
    return Data(tasks={n: t for n, t in data.tasks.items() if n in keep},
                dev_tasks={n: t for n, t in data.dev_tasks.items() if n.removesuffix("-dev") in keep},
                meta_sets={n: p for n, p in data.meta_sets.items() if n in metas},
                meta_rows={n: r for n, r in data.meta_rows.items() if n in metas}, info=info)


def _interval(ctx: Any, label: str, task: str) -> list[float] | None:
    cols = ctx.items.get(label, {}).get(task)
    if not cols:
        return None
    iv = bootstrap_ratio(cols[0], cols[1])
    return [iv.low, iv.high]


def _better_is(info: dict[str, Any], a: float, b: float) -> bool:
    return a > b if info["higher_is_better"] else a < b


def run_second_family(family: dict[str, Path], work: Path, out: Path, settings: Settings, *,
                      progress: bool = True) -> dict[str, Any]:
    """Every step of issue 16 §6 on the built Gemma 3 family (resuming from the caches under `work`).

    Figures go under `out/results/gemma3/`; returns plain data for results.json (`render_second_family`).
    """
    from souplm.evaluate.cache import ResultCache, model_hash
    from souplm.experiment import steps as S

    missing = [k for k in VARIANTS if k not in family]
    if missing:
        raise SoupError(f"the second family lacks {', '.join(missing)}: python -m souplm.experiment.family build "
                        "--family gemma3")
    began = time.perf_counter()
    work.mkdir(parents=True, exist_ok=True)
    fig_out = out / "results" / FAMILY
    (fig_out / "results").mkdir(parents=True, exist_ok=True)  # step_vanilla writes its figure in ctx.out/results
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    data = text_only(prepare_data(work, settings))
    ctx = S.Context(family={k: Path(v) for k, v in family.items()}, work=work, out=fig_out, settings=settings,
                    data=data, store=ResultCache(work / "eval"), progress=progress, roles=dict(ROLES), pair=PAIR,
                    variants=VARIANTS, task_names=TASK_NAMES)
    ctx.hashes = [model_hash(p) for p in ctx.pair_paths]
    timings["data"] = time.perf_counter() - t0

    log("second family: vanilla sweep")
    t0 = time.perf_counter()
    vanilla = S.step_vanilla(ctx)
    vanilla["figure"] = str(Path("results") / FAMILY / vanilla["figure"])
    timings["vanilla"] = time.perf_counter() - t0

    log("second family: learnable soups (softmax, layer_mapping)")
    t0 = time.perf_counter()
    learn = [S.run_learn(ctx, S.LearnSpec(metas=m, activation="softmax", granularity="layer_mapping"))
             for m in META_CONFIGS]
    timings["learnable"] = time.perf_counter() - t0
    # The pair's in-memory soup (two 1 GB models and the soup) goes before the three-model soups come: with
    # both alive, the quick run was killed for memory (8.7 GB resident) on the 23 GB machine.
    ctx.soup = None
    gc.collect()

    log("second family: greedy soups")
    t0 = time.perf_counter()
    greedy = S.step_greedy(ctx)
    timings["greedy"] = time.perf_counter() - t0
    gc.collect()

    log("second family: every model alone (setup table)")
    t0 = time.perf_counter()
    bases: dict[str, dict[str, float]] = {}
    for stage in VARIANTS:
        results = S.uniform_soup_results(ctx, [str(ctx.family[stage])])
        ctx.keep(ROLES[stage], results)
        bases[ROLES[stage]] = {n: float(r["score"]) for n, r in results.items()}
    for g in greedy["runs"]:
        for k, members in g["members"].items():
            ctx.keep(g["labels"][k], S.uniform_soup_results(ctx, members))
    ctx.soup4 = None
    timings["bases"] = time.perf_counter() - t0

    infos = {t["name"]: t for t in data.info["tasks"]}
    comparisons: list[dict[str, Any]] = []

    def add(kind: str, task: str, a: str, b: str) -> None:
        c = S.compare(ctx, kind, task, a, b)
        if c is not None:
            comparisons.append(c)

    first, second = (ROLES[k] for k in PAIR)
    speciality = {}
    for role, task in SPECIALITY.items():
        others = [m for m in bases if m != role]
        hib = infos[task]["higher_is_better"]
        runner = max(others, key=lambda m: -math.inf if math.isnan(bases[m][task])
                     else (1 if hib else -1) * bases[m][task])
        speciality[role] = {"task": task, "runner_up": runner,
                            "gap": (1 if hib else -1) * (bases[role][task] - bases[runner][task])}
        add("speciality", task, role, runner)
    for role in bases:  # what each model loses elsewhere: every task, against the base model
        if role != ROLES["gemma3"]:
            for task in TASK_NAMES:
                if task != SPECIALITY.get(role):
                    add("specialist vs Gemma 3", task, role, ROLES["gemma3"])
    inner = [a for a in vanilla["alphas"] if 0.0 < a < 1.0]
    for task, pt in vanilla["per_task"].items():
        if pt["best_alpha"] is None:
            continue
        top = S.vanilla_label(1.0) if _better_is(infos[task], pt["llava"], pt["vicuna"]) else S.vanilla_label(0.0)
        add("best vanilla vs better base", task, S.vanilla_label(pt["best_alpha"]), top)
    half = S.vanilla_label(0.5) if 0.5 in inner else None
    for run in learn:
        for task in TASK_NAMES:
            if half:
                add("learnable vs vanilla 0.5", task, run["id"], half)
    for g in greedy["runs"]:
        for task in TASK_NAMES:
            add("greedy vs uniform", task, g["labels"]["greedy"], g["labels"]["uniform"])
    adjusted = holm([c["p"] for c in comparisons])
    for c, p in zip(comparisons, adjusted, strict=True):
        c["p_holm"] = p
        c["significant"] = bool(p < ALPHA)

    intervals = {label: {t: _interval(ctx, label, t) for t in TASK_NAMES} for label in ctx.items}
    total = time.perf_counter() - began
    return rounded({
        "family": FAMILY,
        "roles": {ROLES[k]: {"stage": k, "path": str(family[k])} for k in VARIANTS},
        "pair": [first, second],
        "tasks": data.info["tasks"],
        "settings": {"mode": settings.mode, "alphas": list(settings.alphas), "epochs": settings.epochs,
                     "lr": settings.lr, "meta_samples": settings.meta_samples,
                     "greedy_heldout": list(settings.greedy_heldout)},
        "bases": {"scores": bases, "speciality": speciality},
        "vanilla": vanilla,
        "learnable": learn,
        "greedy": greedy,
        "statistics": {"resamples": RESAMPLES, "level": LEVEL, "alpha": ALPHA, "correction": "holm",
                       "comparisons": comparisons, "intervals": intervals},
        "timings": {"steps_s": timings, "total_s": total},
    })


# ------------------------------------------------------------------------------------------------- report


def _fmt(v: float | None, d: int = 4) -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{d}f}"


def _cell(doc: dict[str, Any], label: str, task: str, score: float) -> str:
    iv = doc["statistics"]["intervals"].get(label, {}).get(task)
    return f"{_fmt(score)} [{_fmt(iv[0])}, {_fmt(iv[1])}]" if iv else _fmt(score)


def _arrow(info: dict[str, Any]) -> str:
    return "↑" if info["higher_is_better"] else "↓"


def render_second_family(doc: dict[str, Any]) -> str:
    """The second family's section of RESULTS.md, from its results.json entry alone."""
    tasks = [t["name"] for t in doc["tasks"]]
    infos = {t["name"]: t for t in doc["tasks"]}
    head = " | ".join(f"{n} ({infos[n]['metric']} {_arrow(infos[n])})" for n in tasks)
    first, second = doc["pair"]
    stats = doc["statistics"]
    out: list[str] = []
    add = out.append
    add("## Second family: Gemma 3 270M (issue 16 §6)")
    add("")
    roles = ", ".join(f"{r} (`{m['stage']}`)" for r, m in doc["roles"].items())
    add(f"Models: {roles}; the specialists are fine-tunes of Gemma 3 270M (`python -m souplm.experiment.family "
        "build --family gemma3`). Text tasks only (no variant sees images). Scores carry a "
        f"{stats['level']:.0%} bootstrap interval ({stats['resamples']} resamples over test items); comparisons "
        f"are paired tests, Holm-adjusted over the {len(stats['comparisons'])} of this section.")
    add("")
    add("### Every model alone")
    add("")
    add(f"| model | {head} |")
    add("|---|" + "---:|" * len(tasks))
    for role, scores in doc["bases"]["scores"].items():
        add(f"| {role} | " + " | ".join(_cell(doc, role, n, scores[n]) for n in tasks) + " |")
    add("")
    for role, sp in doc["bases"]["speciality"].items():
        c = next((c for c in stats["comparisons"] if c["kind"] == "speciality" and c["a"] == role), None)
        test = f" (p {_fmt(c['p'])}, Holm {_fmt(c['p_holm'])})" if c else ""
        add(f"- {role} on its speciality {sp['task']}: gap {_fmt(sp['gap'])} over the runner-up "
            f"{sp['runner_up']}{test}.")
    add("")
    van = doc["vanilla"]
    add(f"### Vanilla soup: alpha * {first} + (1 - alpha) * {second}")
    add("")
    add(f"![second family vanilla sweep]({van['figure']})")
    add("")
    add(f"| alpha ({first} share) | {head} |")
    add("|---|" + "---:|" * len(tasks))
    for a in van["alphas"]:
        name = f"{a:g} = {first}" if a == 1 else f"{a:g} = {second}" if a == 0 else f"{a:g}"
        label = van["labels"][f"{a:g}"]
        add(f"| {name} | " + " | ".join(_cell(doc, label, n, van["scores"][f"{a:g}"][n]) for n in tasks) + " |")
    add("")
    add(f"| task | {first} | {second} | best alpha | best soup | margin over the better base | beats both | p (Holm) |")
    add("|---|---:|---:|---:|---:|---:|:---:|---:|")
    for n in tasks:
        pt = van["per_task"][n]
        c = next((c for c in stats["comparisons"] if c["kind"] == "best vanilla vs better base" and c["task"] == n),
                 None)
        add(f"| {n} | {_fmt(pt['llava'])} | {_fmt(pt['vicuna'])} | {pt['best_alpha']} | {_fmt(pt['best_soup'])} | "
            f"{_fmt(pt['margin_over_best_base'], 5)} | {'yes' if pt['beats_both'] else 'no'} | "
            f"{_fmt(c['p_holm']) if c else 'n/a'} |")
    add("")
    add(f"### Learnable soup (softmax, layer_mapping; {doc['settings']['epochs']} epochs, lr {doc['settings']['lr']:g}, "
        f"{doc['settings']['meta_samples']} rows per meta set)")
    add("")
    add(f"| meta set | {first} alpha mean [min, max] | {head} |")
    add("|---|---|" + "---:|" * len(tasks))
    for r in doc["learnable"]:
        a = r["alpha_llava"]
        add(f"| {r['meta']} | {_fmt(a['mean'])} [{_fmt(a['min'])}, {_fmt(a['max'])}] | "
            + " | ".join(_cell(doc, r["id"], n, r["scores"][n]) for n in tasks) + " |")
    add("")
    sig = [c for c in stats["comparisons"] if c["kind"] == "learnable vs vanilla 0.5" and c["significant"]]
    total = sum(1 for c in stats["comparisons"] if c["kind"] == "learnable vs vanilla 0.5")
    add(f"Learnable soups against the vanilla soup at alpha 0.5: {len(sig)} of {total} (soup, task) comparisons "
        "differ significantly after Holm" + (": " + "; ".join(
            f"{c['a'].split('-softmax')[0]} on {c['task']} ({'better' if c['advantage'][0] > 0 else 'worse'}, "
            f"advantage {_fmt(c['advantage'][0])})" for c in sig) if sig else "") + ".")
    add("")
    add("### Greedy soup")
    add("")
    for g in doc["greedy"]["runs"]:
        ranking = ", ".join(f"{r['model']} {_fmt(r['score'])}" for r in g["ranking"])
        add(f"Chosen on {g['heldout']} ({g['metric']}): ranking {ranking}; greedy soup = {' + '.join(g['chosen'])} "
            f"(dev {_fmt(g['greedy_heldout_score'])}; uniform soup of all: dev {_fmt(g['uniform_heldout_score'])}).")
        add("")
        add(f"| soup | {head} |")
        add("|---|" + "---:|" * len(tasks))
        for k, res in g["test"].items():
            add(f"| {k} | " + " | ".join(_cell(doc, g["labels"][k], n, res[n]) for n in tasks) + " |")
        add("")
    t = doc["timings"]
    add("Wall time of this section's steps (s): " + ", ".join(f"{k} {v:.0f}" for k, v in t["steps_s"].items())
        + f"; total {t['total_s']:.0f}.")
    add("")
    return "\n".join(out)


# ---------------------------------------------------------------------------------------------------- CLI


def built_second_family(cache: str | Path | None = None, quick: bool = False) -> dict[str, Path] | None:
    """The built Gemma 3 family's folders, or None (with a log line saying how to build it) when it is not."""
    from souplm.experiment.family import family_paths

    try:
        return family_paths(cache, quick, family=FAMILY)
    except SoupError as exc:
        log(f"second family skipped: {exc}")
        return None


def default_out(quick: bool) -> Path:
    return Path("scratch/second-family-quick" if quick else "scratch/second-family")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m souplm.experiment.second_family",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="the quick family and sizes (minutes)")
    parser.add_argument("--large", action="store_true", help="issue 16 §2's test-set sizes")
    parser.add_argument("--cache", default=None, help="family folder (default $SOUPLM_CACHE/family)")
    parser.add_argument("--out", default=None, help="where second_family.md and results/ go")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    args = parser.parse_args(argv)
    try:
        if args.large and args.quick:
            raise SoupError("--large and --quick: choose one")
        import torch

        from souplm.data import sources
        from souplm.experiment.family import cache_root, family_dir, family_paths

        torch.set_num_threads(args.threads)
        paths = family_paths(args.cache, args.quick, family=FAMILY)
        sources.use_data_dir(cache_root(args.cache) / "data")
        settings = QUICK if args.quick else LARGE if args.large else FULL
        out = Path(args.out) if args.out else default_out(args.quick)
        work = family_dir(args.cache, args.quick, FAMILY) / ("experiment" if settings.mode != "large" else
                                                             "experiment-large")
        doc = run_second_family(paths, work, out, settings)
        (out / "results").mkdir(parents=True, exist_ok=True)
        (out / "results" / "second_family.json").write_text(json.dumps(doc, indent=1) + "\n")
        (out / "second_family.md").write_text(render_second_family(doc))
        log(f"wrote {out / 'second_family.md'}")
    except SoupError as exc:
        print(f"souplm: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    if "OMP_WAIT_POLICY" not in os.environ:
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
        os.execv(sys.executable, [sys.executable, "-m", "souplm.experiment.second_family", *sys.argv[1:]])
    sys.exit(main())
