"""One model's evaluation spread over torchrun ranks: each rank scores a shard of every task's examples.

    torchrun --nproc_per_node 8 -m souplm eval MODEL --task T1 --task T2

Rank r scores `rows[r::K]` with the runner's `score_rows`, the per-example records are gathered
and put back in example order, and the runner's `aggregate` turns them into the same metrics a
single process computes (up to float rounding: examples are batched with different neighbours).
Rank 0 alone looks the result up in, and writes it to, the on-disk cache, so a rerun with any
number of processes reuses it. Every rank loads the whole model: this is data parallelism for
speed, not sharding for size.

In a single process `evaluate_parallel` is `souplm.evaluate.runner.evaluate`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from .. import distributed as D
from .cache import ResultCache, as_cache, model_hash
from .lm import LanguageModel
from .runner import (
    N_SAMPLES,
    aggregate,
    checked_tasks,
    evaluate,
    item_scores,
    model_getter,
    score_rows,
    task_result,
)
from .tasks import Task


def score_task_sharded(get_lm: Callable[[], LanguageModel], task: Task, limit: int | None) -> dict[str, Any]:
    """`runner.run_task` with the examples dealt out over ranks; every rank returns the result."""
    t0 = time.perf_counter()
    rows = task.rows(limit)
    mine = D.split(rows)
    # A rank with no rows (fewer examples than ranks) never loads or soups its model.
    records = D.unsplit(D.gather_results(lambda: score_rows(get_lm(), task, mine) if mine else []))
    result = task_result(task, aggregate(task, records), n=len(records), limit=limit)
    result["items"] = item_scores(task, records)
    result["seconds"] = round(time.perf_counter() - t0, 3)
    samples = [{k: v for k, v in r.items() if k in ("output", "pred", "gold")} for r in records[:N_SAMPLES]]
    if samples and samples[0]:
        result["samples"] = samples
    return result


def evaluate_parallel(
    model_or_dir: str | Path | LanguageModel | Callable[[], LanguageModel],
    tasks: Sequence[str | Path | Task],
    *,
    limit: int | None = None,
    batch_size: int = 8,
    cache: ResultCache | str | Path | bool | None = None,
    model_key: str | None = None,
    device: str | None = None,
    dtype: str = "float32",
    progress: bool = True,
    task_cache_dir: str | Path | None = None,
) -> dict[str, Any]:
    """`evaluate` (same arguments, same report) with each task's examples sharded over ranks."""
    if not D.is_distributed():
        return evaluate(model_or_dir, tasks, limit=limit, batch_size=batch_size, cache=cache, model_key=model_key,
                        device=device, dtype=dtype, progress=progress, task_cache_dir=task_cache_dir)
    task_objs = checked_tasks(model_or_dir, tasks, limit, task_cache_dir)
    store = as_cache(cache)
    if isinstance(model_or_dir, (str, Path)):
        # Hashing a large model is minutes of reading: rank 0 does it, the others are told.
        key = model_key or D.on_main(lambda: f"{model_hash(model_or_dir)}|{dtype}" if store else str(model_or_dir))
        label = str(model_or_dir)
    else:
        key = model_key or ""
        label = model_key or type(model_or_dir).__name__
    get_lm = model_getter(model_or_dir, batch_size, device, dtype, progress and D.is_main())

    results: dict[str, Any] = {}
    for task in task_objs:
        # Rank 0 decides hit or miss for everyone, so all ranks take the same collectives.
        hit = D.on_main(lambda t=task: store.get(key, t.name, t.cache_version, limit)) if (store and key) else None
        if hit is not None and "items" not in hit:
            hit = None  # as in runner.evaluate: an entry without per-example values is scored again
        if hit is not None:
            results[task.name] = {**hit, "cached": True}
            continue
        result = score_task_sharded(get_lm, task, limit)
        if store and key:
            D.on_main(lambda t=task, r=result: store.put(key, t.name, t.cache_version, limit, r))
        results[task.name] = {**result, "cached": False}
    return {"model": label, "model_key": key, "results": results}
