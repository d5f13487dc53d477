"""`run_experiment`: every step in order, timed, resuming from the caches; writes results.json and RESULTS.md."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from souplm.experiment.common import log, rounded
from souplm.experiment.data import prepare_data
from souplm.experiment.report import render_markdown
from souplm.experiment.rounds import step_general, step_rounds
from souplm.experiment.settings import ROLES, Settings
from souplm.experiment.steps import (
    Context,
    step_adamms,
    step_bases,
    step_claims,
    step_greedy,
    step_learnable,
    step_regularized,
    step_robustness,
    step_statistics,
    step_vanilla,
)


@contextmanager
def timed(ctx: Context, timings: dict[str, Any], step: str) -> Iterator[None]:
    """Wall time of a step, with how much of it was computed now versus found in the caches."""
    hits0, miss0 = ctx.store.hits, ctx.store.misses
    lc0, lk0 = ctx.learn_computed, ctx.learn_cached
    log(f"step {step}")
    t0 = time.perf_counter()
    yield
    wall = time.perf_counter() - t0
    rec = {"wall_s": wall, "wall_min": wall / 60, "evaluations_computed": ctx.store.misses - miss0,
           "evaluations_cached": ctx.store.hits - hits0, "soups_learned": ctx.learn_computed - lc0,
           "soups_cached": ctx.learn_cached - lk0}
    log(f"step {step} done in {wall:.0f} s")
    timings[step] = rec


def merge_timings(path: Path, now: dict[str, Any]) -> dict[str, Any]:
    """Per step: this run's time, and the time of the last run that computed the step (kept on disk)."""
    history = json.loads(path.read_text()) if path.is_file() else {}
    out = {}
    for step, rec in now.items():
        if rec["evaluations_computed"] or rec["soups_learned"] or step not in history:
            history[step] = rec
        out[step] = {"this_run": rec, "computed": history[step]}
    path.write_text(json.dumps(history, indent=1, sort_keys=True) + "\n")
    return out


# ------------------------------------------------------------------------------------------ pipeline


def run_experiment(
    family: dict[str, Path], work: Path, out: Path, settings: Settings, *, progress: bool = True,
    family_info: dict[str, Any] | None = None, second_family: dict[str, Path] | None = None,
) -> dict[str, Any]:
    """Run every step (resuming from the caches), write results.json, the figures and RESULTS.md.

    `second_family`: the built Gemma 3 family's folders (issue 16 §6, `second_family.py`), run after the rest."""
    from souplm import __version__
    from souplm.evaluate.cache import ResultCache, model_hash

    began = time.perf_counter()
    work.mkdir(parents=True, exist_ok=True)
    (out / "results").mkdir(parents=True, exist_ok=True)
    store = ResultCache(work / "eval")
    timings: dict[str, Any] = {}
    family = {k: Path(v) for k, v in family.items()}
    ctx = Context(family=family, work=work, out=out, settings=settings, data=None, store=store,  # type: ignore[arg-type]
                  progress=progress)
    with timed(ctx, timings, "data"):
        ctx.data = prepare_data(work, settings)
        ctx.hashes = [model_hash(p) for p in ctx.pair_paths]
    results: dict[str, Any] = {}
    with timed(ctx, timings, "vanilla"):
        results["vanilla"] = step_vanilla(ctx)
    with timed(ctx, timings, "learnable"):
        results["learnable"] = step_learnable(ctx)
    with timed(ctx, timings, "regularized"):
        results["regularized"] = step_regularized(ctx, results["learnable"])
    with timed(ctx, timings, "greedy"):
        results["greedy"] = step_greedy(ctx)
    with timed(ctx, timings, "robustness"):
        results["robustness"] = step_robustness(ctx, results["learnable"])
    with timed(ctx, timings, "bases"):
        results["bases"] = step_bases(ctx, results["greedy"])
    if "cogvlm" in family:
        with timed(ctx, timings, "adamms"):
            results["adamms"] = step_adamms(ctx, results["vanilla"]["per_task"]["easy-vqa"]["llava"])
    with timed(ctx, timings, "rounds"):
        results["rounds"] = step_rounds(ctx)
    with timed(ctx, timings, "general"):
        results["general"] = step_general(ctx, results["rounds"])
    if second_family:
        from souplm.experiment.second_family import run_second_family

        with timed(ctx, timings, "second_family"):
            results["second_family"] = run_second_family(second_family, work / "gemma3", out, settings, progress=progress)
    with timed(ctx, timings, "statistics"):
        results["statistics"] = step_statistics(ctx, results)
    results["claims"] = step_claims(ctx, results)
    total = time.perf_counter() - began
    steps = merge_timings(work / ("timings.json" if settings.mode in ("full", "quick", "test") else f"timings-{settings.mode}.json"),
                          timings)
    doc = {
        "format": "souplm.experiment/1",
        "souplm_version": __version__,
        "settings": settings.to_json(),
        "models": {ROLES[k]: {"stage": k, "path": str(v)} for k, v in family.items() if k in ROLES},
        "family": family_info or {},
        **ctx.data.info,
        **results,
        "timings": {"steps": steps, "total_s": total, "total_min": total / 60,
                    "computed_total_min": sum(v["computed"]["wall_min"] for v in steps.values()),
                    "torch_threads": _torch_threads()},
    }
    doc = rounded(doc)
    write_documents(out, doc, render_markdown(doc))
    log(f"wrote {out / 'RESULTS.md'} in {total:.0f} s")
    return doc


def write_documents(out: Path, doc: dict[str, Any], markdown: str) -> list[Path]:
    """The run's documents: `out/results/results.json` and `out/RESULTS.md` (the figures are written by the
    steps, also under `out/results`). Nothing is written outside `out`."""
    paths = [out / "results" / "results.json", out / "RESULTS.md"]
    paths[0].parent.mkdir(parents=True, exist_ok=True)
    paths[0].write_text(json.dumps(doc, indent=1) + "\n")
    paths[1].write_text(markdown)
    return paths


def _torch_threads() -> int:
    """Threads torch computes on (recorded beside the wall times)."""
    import torch

    return int(torch.get_num_threads())

