"""Run tasks on a model: `evaluate(model_or_dir, tasks, limit=..., batch_size=..., cache=...)`.

The work is split into pure pieces so it can be spread over processes later (issue 7):
`score_rows(lm, task, rows)` turns examples into per-example records, `aggregate(task, records)`
turns records (from any number of shards, in any order) into metrics, and `evaluate` adds the cache
around them. Rank k of K can score `rows[k::K]`, and rank 0 aggregates the gathered records.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ..errors import SoupError
from . import metrics as M
from .cache import ResultCache, as_cache, model_hash
from .lm import HFModel, LanguageModel, load_model
from .tasks import Task, gold_index, load_task

N_SAMPLES = 3  # example outputs kept in a result, for a quick look at what the model said


def score_rows(lm: LanguageModel, task: Task, rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per-example records for `rows` (batched inside the model's methods)."""
    if task.kind == "perplexity":
        texts = [str(r[task.opt("text_field")]) for r in rows]
        if task.opt("context_field"):
            # Score only the text given its context (e.g. a chat answer given the question).
            contexts = [str(r[task.opt("context_field")]) for r in rows]
            if task.opt("chat_template"):
                contexts = [_chat(lm, c) for c in contexts]
            out = _conditional_nll(lm, list(zip(contexts, texts, strict=True)))
        else:
            out = lm.rolling_nll(texts, task.opt("context_length"))
        return [
            {"nll": nll, "tokens": n, "bytes": len(t.encode("utf-8")), "words": M.count_words(t)}
            for (nll, n), t in zip(out, texts, strict=True)
        ]

    if task.kind == "multiple_choice":
        delim, compat = task.opt("target_delimiter"), bool(task.opt("lm_eval_compat"))
        requests: list[tuple[str, str]] = []
        spans: list[tuple[int, int]] = []
        for r in rows:
            ctx = task.prompt(r)
            choices = [str(c) for c in r[task.opt("choices_field")]]
            spans.append((len(requests), len(choices)))
            requests += [M.lm_eval_request(ctx, delim + c) if compat else (ctx, delim + c) for c in choices]
        lls = lm.loglikelihood(requests)  # one flat list: the model batches across examples
        records = []
        for r, (start, n) in zip(rows, spans, strict=True):
            choices = [str(c) for c in r[task.opt("choices_field")]]
            ll = lls[start : start + n]
            lengths = [len((delim + c).encode("utf-8")) for c in choices]
            gold = gold_index(r[task.opt("gold_field")], choices)
            norm = M.choice_correct_norm_chars(ll, choices, gold) if compat else M.choice_correct_norm(ll, lengths, gold)
            records.append({
                "logliks": ll, "gold": gold, "pred": M.argmax(ll),
                "acc": M.choice_correct(ll, gold), "acc_norm": norm,
            })
        return records

    stop = task.opt("stop")
    if task.kind == "generation":
        outs = lm.generate([task.prompt(r) for r in rows], task.opt("max_new_tokens"), stop,
                           chat_template=bool(task.opt("chat_template")))
        extract = task.opt("extract")
        records = []
        for r, out in zip(rows, outs, strict=True):
            gold_raw = str(r[task.opt("answer_field")])
            if extract in ("number", "math"):
                # Numbers compare as extracted: text normalisation would drop their signs and points.
                fn = M.extract_number if extract == "number" else M.extract_math
                pred, gold = fn(out), fn(gold_raw)
                em = M.same_number(pred, gold)
            else:
                pred, gold = (M.first_line(out), M.first_line(gold_raw)) if extract == "first_line" else (out, gold_raw)
                em = M.exact_match(pred, gold)
            records.append({"output": out, "pred": pred, "gold": gold, "exact_match": em})
        return records

    if task.kind == "vqa":
        from PIL import Image

        images = []
        for r in rows:
            path = task.image_path(r)
            try:
                with Image.open(path) as im:
                    images.append(im.convert("RGB"))
            except OSError:
                raise SoupError(f"task {task.name}: cannot read image {path}") from None
        outs = lm.generate_vqa([task.prompt(r) for r in rows], images, task.opt("max_new_tokens"), stop,
                               chat_template=bool(task.opt("chat_template")))
        records = []
        for r, out in zip(rows, outs, strict=True):
            pred, gold = M.first_line(out), str(r[task.opt("answer_field")])
            records.append({"output": out, "pred": pred, "gold": gold, "exact_match": M.exact_match(pred, gold)})
        return records

    raise SoupError(f"task {task.name}: unknown kind {task.kind}")


def _chat(lm: LanguageModel, prompt: str) -> str:
    fn = getattr(lm, "chat_prompt", None)
    if fn is None:
        raise SoupError(f"{type(lm).__name__} cannot apply a chat template")
    return fn(prompt)


def _conditional_nll(lm: LanguageModel, requests: list[tuple[str, str]]) -> list[tuple[float, int]]:
    fn = getattr(lm, "conditional_nll", None)
    if fn is None:
        raise SoupError(f"{type(lm).__name__} cannot score a text given a context (no conditional_nll)")
    return fn(requests)


def aggregate(task: Task, records: Sequence[dict[str, Any]]) -> dict[str, float]:
    """Metrics from per-example records. Order-free, so shards can be gathered in any order."""
    if not records:
        raise SoupError(f"task {task.name}: no examples to score")
    if task.kind == "perplexity":
        nll = sum(r["nll"] for r in records)
        tokens = sum(r["tokens"] for r in records)
        nbytes = sum(r["bytes"] for r in records)
        return {
            "bpb": M.bits_per_byte(nll, nbytes),
            "ppl": M.perplexity(nll, tokens),
            "nll_per_token": nll / tokens if tokens else float("nan"),
            # lm-eval's definitions (records cached before they existed have no word counts)
            "word_perplexity": M.word_perplexity(nll, sum(r["words"] for r in records))
            if all("words" in r for r in records) else float("nan"),
            "byte_perplexity": M.byte_perplexity(nll, nbytes),
        }
    if task.kind == "multiple_choice":
        return {"acc": M.mean([r["acc"] for r in records]), "acc_norm": M.mean([r["acc_norm"] for r in records])}
    return {"exact_match": M.mean([r["exact_match"] for r in records])}


# The per-example values a result keeps (`items`), by task kind: enough to recompute every metric and to
# bootstrap or pair it over examples (souplm.experiment.stats), without the outputs and log-likelihoods.
ITEM_FIELDS: dict[str, tuple[str, ...]] = {
    "perplexity": ("nll", "tokens", "bytes", "words"),
    "multiple_choice": ("acc", "acc_norm"),
    "generation": ("exact_match",),
    "vqa": ("exact_match",),
}


def item_scores(task: Task, records: Sequence[dict[str, Any]]) -> dict[str, list[float]]:
    """Per-example values of `records`, one list per field of `ITEM_FIELDS`, in example order."""
    fields = [f for f in ITEM_FIELDS.get(task.kind, ()) if all(f in r for r in records)]
    return {f: [r[f] for r in records] for f in fields}


def run_task(lm: LanguageModel, task: Task, limit: int | None = None) -> dict[str, Any]:
    """Score one task on a loaded model; the result is what the cache stores."""
    t0 = time.perf_counter()
    rows = task.rows(limit)
    records = score_rows(lm, task, rows)
    result = task_result(task, aggregate(task, records), n=len(records), limit=limit)
    result["items"] = item_scores(task, records)
    result["seconds"] = round(time.perf_counter() - t0, 3)
    samples = [
        {k: v for k, v in r.items() if k in ("output", "pred", "gold")} for r in records[:N_SAMPLES]
    ]
    if samples and samples[0]:
        result["samples"] = samples
    return result


def task_result(task: Task, metrics: dict[str, float], n: int, limit: int | None) -> dict[str, Any]:
    return {
        "task": task.name,
        "kind": task.kind,
        "version": task.cache_version,
        "limit": limit,
        "n": n,
        "metrics": metrics,
        "primary": task.primary,
        "higher_is_better": task.higher_is_better,
        "score": metrics[task.primary],
    }


def checked_tasks(model_or_dir, tasks, limit: int | None, task_cache_dir) -> list[Task]:
    """The checks every evaluation entry point makes before loading anything; returns the tasks."""
    if limit is not None and limit < 1:
        raise SoupError(f"--limit must be at least 1, not {limit}")
    if isinstance(model_or_dir, (str, Path)) and not (Path(model_or_dir) / "config.json").is_file():
        raise SoupError(f"{model_or_dir}: not a model directory (no config.json)")
    task_objs = [load_task(t, cache_dir=task_cache_dir) for t in tasks]
    names = [t.name for t in task_objs]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise SoupError(f"task(s) given twice: {', '.join(dup)}")
    return task_objs


def model_getter(model_or_dir: Any, batch_size: int, device: str | None, dtype: str,
                 progress: bool) -> Callable[[], LanguageModel]:
    """A function that returns the model, loading (or building, for a factory) it on first use only:
    a fully cached evaluation never loads the model."""
    made: list[LanguageModel] = []

    def get() -> LanguageModel:
        if not made:
            if isinstance(model_or_dir, (str, Path)):
                model, tok, proc = load_model(model_or_dir, device=device, dtype=dtype)
                made.append(HFModel(model, tok, proc, batch_size=batch_size, progress=progress))
            elif isinstance(model_or_dir, LanguageModel):
                made.append(model_or_dir)
            else:
                made.append(model_or_dir())
        return made[0]

    return get


def evaluate(
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
    """Evaluate a model dir, a loaded `LanguageModel` or a factory of one on tasks.

    Returns {"model", "model_key", "results": {task name: result}}.

    `tasks` are built-in names, task-file paths or `Task` objects. With a cache, results are keyed by
    (model content hash, task, task version, limit); an in-memory model is cached only when the caller
    names it with `model_key` (a sweep passes the soup's key).
    """
    task_objs = checked_tasks(model_or_dir, tasks, limit, task_cache_dir)
    store = as_cache(cache)

    if isinstance(model_or_dir, (str, Path)):
        key = model_key or (f"{model_hash(model_or_dir)}|{dtype}" if store else str(model_or_dir))  # dtype changes scores
        label = str(model_or_dir)
    elif isinstance(model_or_dir, LanguageModel) or callable(model_or_dir):
        key = model_key or ""
        label = model_key or (type(model_or_dir).__name__ if isinstance(model_or_dir, LanguageModel) else "model")
    else:
        raise SoupError(f"cannot evaluate a {type(model_or_dir).__name__}: give a model dir or a LanguageModel")
    get_lm = model_getter(model_or_dir, batch_size, device, dtype, progress)

    results: dict[str, Any] = {}
    for task in task_objs:
        version = task.cache_version
        hit = store.get(key, task.name, version, limit) if (store and key) else None
        if hit is not None and "items" not in hit:
            hit = None  # cached before results kept their per-example values: scored again, once
        if hit is not None:
            results[task.name] = {**hit, "cached": True}
            continue
        result = run_task(get_lm(), task, limit)
        if store and key:
            store.put(key, task.name, version, limit, result)
        results[task.name] = {**result, "cached": False}
    return {"model": label, "model_key": key, "results": results}


def format_table(report: dict[str, Any]) -> str:
    """A plain-text table of one `evaluate` report: task, kind, n, every metric, cached."""
    lines = [f"model: {report['model']}", f"{'task':<28} {'kind':<16} {'n':>6}  metrics"]
    for name, r in report["results"].items():
        ms = "  ".join(
            f"{k}={v:.4f}" + ("*" if k == r["primary"] else "") for k, v in r["metrics"].items()
        )
        lines.append(f"{name:<28} {r['kind']:<16} {r['n']:>6}  {ms}" + ("  (cached)" if r.get("cached") else ""))
    lines.append("* primary metric")
    return "\n".join(lines)
