"""Vanilla soup sweep: score alpha * A + (1 - alpha) * B for every alpha, without writing checkpoints.

One model is built once (from A's directory) and the two bases are read into memory once; for each
alpha the engine writes the merged weights into that model's parameters in place (`soup_into`), and
the tasks run on it. alpha = 1 is model A and alpha = 0 is model B, so the endpoints are the base
models' own scores (the horizontal lines of the paper's Figure 1).

Every (alpha, task) result goes through the on-disk cache under the soup's key (hash of the inputs'
content hashes + method + alpha): an interrupted sweep resumes where it stopped. Under torchrun the
alphas are dealt out over ranks (`souplm.distributed.parallel_map`) and every rank gets every result;
rank 0 writes the tables.
"""

from __future__ import annotations

import csv
import json
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import distributed as D
from ..errors import SoupError
from ..evaluate.cache import ResultCache, as_cache, cache_key, model_hash, soup_key
from ..evaluate.tasks import Task, load_task

METHOD = "linear"


def parse_alphas(spec: str) -> list[float]:
    """`start:stop:step` (stop included) or a comma list, e.g. `0:1:0.1` or `0,0.25,0.5`."""
    text = str(spec).strip()
    try:
        if ":" in text:
            parts = [float(p) for p in text.split(":")]
            if len(parts) != 3:
                raise ValueError
            start, stop, step = parts
            if step <= 0 or stop < start:
                raise SoupError(f"--alphas {spec}: need start <= stop and a positive step")
            n = math.floor((stop - start) / step + 1e-9)
            # Round to the step's precision so 0.30000000000000004 prints and caches as 0.3.
            digits = max(0, -math.floor(math.log10(step))) + 3
            values = [round(start + i * step, digits) for i in range(n + 1)]
        else:
            values = [float(p) for p in text.split(",") if p.strip()]
    except ValueError:
        raise SoupError(f"--alphas {spec!r}: expected start:stop:step (like 0:1:0.1) or a comma list") from None
    if not values:
        raise SoupError(f"--alphas {spec!r}: no values")
    return sorted(set(values))


def candidates_for_rank(alphas: Sequence[float], rank: int, world_size: int) -> list[float]:
    """The alphas one of `world_size` processes evaluates (round robin keeps the load even)."""
    return list(alphas)[rank::world_size]


@dataclass
class SweepResult:
    """Scores of every alpha on every task, plus what is needed to print and plot them."""

    models: list[str]
    alphas: list[float]
    tasks: list[dict[str, Any]]  # name, primary, higher_is_better
    results: dict[float, dict[str, dict[str, Any]]]  # alpha -> task -> evaluate() task result
    timings: dict[str, float] = field(default_factory=dict)

    def score(self, alpha: float, task: str) -> float:
        return float(self.results[alpha][task]["score"])

    def base_score(self, which: int, task: str) -> float:
        """Score of model A (which=0, alpha=1) or model B (which=1, alpha=0)."""
        return self.score(1.0 if which == 0 else 0.0, task)

    def best_alpha(self, task: str) -> float:
        info = next(t for t in self.tasks if t["name"] == task)
        sign = 1.0 if info["higher_is_better"] else -1.0
        # Ties go to the smallest alpha (max() keeps the first); NaN scores never win.
        return max(self.alphas, key=lambda a: -math.inf if math.isnan(self.score(a, task)) else sign * self.score(a, task))

    def rows(self) -> list[dict[str, Any]]:
        """Table rows: each alpha, then each base model."""
        names = [t["name"] for t in self.tasks]
        out = [{"row": "soup", "alpha": a, **{n: self.score(a, n) for n in names}} for a in self.alphas]
        for which, label in ((0, "A"), (1, "B")):
            out.append({"row": f"base {label}: {self.models[which]}", "alpha": 1.0 - which,
                        **{n: self.base_score(which, n) for n in names}})
        return out

    def to_csv(self, path: str | Path) -> Path:
        path = Path(path)
        names = [t["name"] for t in self.tasks]
        with open(path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=["row", "alpha", *names])
            w.writeheader()
            for r in self.rows():
                w.writerow(r)
        return path

    def to_markdown(self) -> str:
        names = [t["name"] for t in self.tasks]
        best = {n: self.best_alpha(n) for n in names}
        head = [f"{t['name']} ({t['primary']} {'↑' if t['higher_is_better'] else '↓'})" for t in self.tasks]
        lines = ["| alpha (weight of A) | " + " | ".join(head) + " |", "|---:|" + "---:|" * len(names)]
        for a in self.alphas:
            cells = [f"**{self.score(a, n):.4f}**" if a == best[n] else f"{self.score(a, n):.4f}" for n in names]
            lines.append(f"| {a:g} | " + " | ".join(cells) + " |")
        for which, label in ((0, "A"), (1, "B")):
            cells = [f"{self.base_score(which, n):.4f}" for n in names]
            lines.append(f"| base {label} (`{Path(self.models[which]).name}`) | " + " | ".join(cells) + " |")
        lines.append("")
        lines.append(f"A = `{self.models[0]}`, B = `{self.models[1]}`; soup = alpha * A + (1 - alpha) * B. "
                     "Bold: best alpha per task.")
        return "\n".join(lines) + "\n"

    def to_json(self) -> dict[str, Any]:
        return {"models": self.models, "alphas": self.alphas, "tasks": self.tasks,
                "results": {str(a): r for a, r in self.results.items()},
                "best_alpha": {t["name"]: self.best_alpha(t["name"]) for t in self.tasks},
                "timings": self.timings}


class SoupModel:
    """One in-memory model whose weights are rewritten per candidate, over bases held in memory.

    Built lazily: a sweep whose results are all cached never loads a tensor.
    """

    def __init__(
        self, models: Sequence[str], *, batch_size: int = 8, device: str | None = None, dtype: str = "float32",
        progress: bool = True, in_memory: bool = True,
    ):
        self.models = [str(m) for m in models]
        self.in_memory = in_memory
        self.opts = {"batch_size": batch_size, "device": device, "dtype": dtype, "progress": progress}
        self.lm: Any = None
        self.sources: Any = None
        self.soup_seconds = 0.0

    def load(self, recipe: Any) -> Any:
        from ..engine import open_sources
        from ..evaluate.lm import HFModel, load_model

        if self.lm is None:
            model, tok, proc = load_model(self.models[0], device=self.opts["device"], dtype=self.opts["dtype"])
            self.lm = HFModel(model, tok, proc, batch_size=self.opts["batch_size"], progress=self.opts["progress"])
            # In memory: every base tensor is read once for the whole search (N models' worth of RAM);
            # otherwise each candidate re-reads them from disk, in bounded memory.
            self.sources = open_sources(recipe, in_memory=self.in_memory)
        return self.lm

    def set(self, recipe: Any) -> Any:
        """Write the recipe's soup into the model; returns the LanguageModel to evaluate."""
        from ..engine import soup_into

        lm = self.load(recipe)
        t0 = time.perf_counter()
        soup_into(lm.model, recipe, sources=self.sources)
        self.soup_seconds += time.perf_counter() - t0
        return lm


def evaluate_candidate(
    soup: SoupModel, recipe: Any, key: str, tasks: Sequence[Task], *, limit: int | None,
    cache: ResultCache | None, sharded: bool = False,
) -> dict[str, dict[str, Any]]:
    """Scores of one soup on every task: cache first, else soup into the model and run what is missing.

    A pure function of (recipe, tasks, limit) up to caching, so candidates can run on any process.
    `sharded`: every rank takes part in this one candidate, each scoring a shard of the examples
    (a collective: all ranks must call it together); otherwise this rank scores it alone.
    """
    from ..evaluate.parallel import evaluate_parallel
    from ..evaluate.runner import evaluate

    run = evaluate_parallel if sharded else evaluate
    # The factory runs only on a cache miss, so a fully cached candidate costs no merge at all.
    report = run(lambda: soup.set(recipe), list(tasks), limit=limit, cache=cache, model_key=key, progress=False)
    return report["results"]


def is_cached(cache: ResultCache | None, key: str, tasks: Sequence[Task], limit: int | None) -> bool:
    """Every task of a candidate has a cache entry (a file check: no read, no hit counted)."""
    return cache is not None and all(
        cache.path(cache_key(key, t.name, t.cache_version, limit)).is_file() for t in tasks)


def sweep(
    models: Sequence[str | Path],
    alphas: Sequence[float] | str,
    tasks: Sequence[str | Path | Task],
    *,
    out_dir: str | Path | None = None,
    limit: int | None = None,
    batch_size: int = 8,
    cache: ResultCache | str | Path | bool | None = True,
    device: str | None = None,
    dtype: str = "float32",
    progress: bool = True,
    in_memory: bool = True,
    vocab_policy: str | None = None,
    task_cache_dir: str | Path | None = None,
) -> SweepResult:
    """Evaluate the vanilla soup of two models at every alpha; write tables and the plot to `out_dir`.

    The soup takes A's architecture (A is the model that is built); with a LLaVA and a plain LM whose
    vocabularies differ, pass `vocab_policy="extend"` or `"truncate"` (see docs/MERGING.md).
    """
    from tqdm.auto import tqdm

    from ..engine.recipe import Recipe

    if len(models) != 2:
        raise SoupError(f"a vanilla sweep takes exactly 2 models (--model A --model B), got {len(models)}")
    for m in models:
        if not (Path(m) / "config.json").is_file():
            raise SoupError(f"{m}: not a model directory (no config.json)")
    a_path, b_path = (str(Path(m)) for m in models)
    grid = parse_alphas(alphas) if isinstance(alphas, str) else sorted({float(a) for a in alphas})
    if any(not 0.0 <= a <= 1.0 for a in grid) and D.is_main():
        # Extrapolation (alpha outside [0, 1]) is legal for linear merges, but say it loudly.
        print(f"souplm: note: alphas outside [0, 1] extrapolate beyond the base models: {grid}")
    task_objs = [load_task(t, cache_dir=task_cache_dir) for t in tasks]
    if not task_objs:
        raise SoupError("give at least one --task")
    store = as_cache(cache)
    # The endpoints are always evaluated: they are the base models' lines in the table and plot.
    todo = sorted(set(grid) | {0.0, 1.0})
    # Under torchrun rank 0 hashes (minutes for a large model) and tells the others.
    hashes = D.on_main(lambda: [model_hash(a_path), model_hash(b_path)])
    soup = SoupModel([a_path, b_path], batch_size=batch_size, device=device, dtype=dtype,
                     progress=progress and D.is_main(), in_memory=in_memory)
    policy = {"vocab_policy": vocab_policy} if vocab_policy else {}
    fields = {"output_model": a_path, **policy}
    if any(not 0.0 <= a <= 1.0 for a in grid):  # asked for explicitly by the grid (and noted above)
        fields["allow_extrapolation"] = True

    def key_of(alpha: float) -> str:
        # Keyed by content, not paths (A is always the built model): moving the dirs keeps the cache.
        return soup_key(hashes, METHOD, {"weights": [alpha, 1.0 - alpha], **policy, "dtype": dtype})

    def run(alpha: float) -> dict[str, dict[str, Any]]:
        recipe = Recipe.vanilla(a_path, b_path, alpha, **fields)
        return evaluate_candidate(soup, recipe, key_of(alpha), task_objs, limit=limit, cache=store)

    t0 = time.perf_counter()
    # Under torchrun the alphas are dealt out over ranks (uncached ones spread evenly) and every
    # rank gets every result; in one process this is a plain loop.
    bar = tqdm(total=len(todo), desc="sweep", disable=not progress or not D.is_main(), unit="alpha")
    scores = D.parallel_map(run, todo, done=lambda a: is_cached(store, key_of(a), task_objs, limit),
                            on_result=lambda a, _: (bar.set_postfix(alpha=a), bar.update(1)))
    bar.close()
    results: dict[float, dict[str, dict[str, Any]]] = dict(zip(todo, scores, strict=True))
    total = time.perf_counter() - t0
    soup_seconds = sum(D.all_gather_objects(soup.soup_seconds))

    result = SweepResult(
        models=[a_path, b_path],
        alphas=todo,
        tasks=[{"name": t.name, "primary": t.primary, "higher_is_better": t.higher_is_better} for t in task_objs],
        results=results,
        timings={"total_s": round(total, 3), "soup_s": round(soup_seconds, 3),
                 "eval_s": round(sum(r.get("seconds", 0.0) for rs in results.values() for r in rs.values()
                                     if not r.get("cached")), 3)},
    )
    if out_dir is not None:
        D.on_main(lambda: write_outputs(result, out_dir))  # one writer; the others wait for it
    return result


def write_outputs(result: SweepResult, out_dir: str | Path) -> list[Path]:
    """sweep.csv, sweep.md, sweep.json and the Figure 1 plot (sweep.png, sweep.svg), written beside `out_dir` and
    moved in at the end (souplm/io/output.py: each file is the old one or the new one, never half-written)."""
    from ..io.output import staged_dir

    with staged_dir(out_dir) as staged:
        paths = _write_outputs_into(result, staged)
    return [Path(out_dir) / p.relative_to(staged) for p in paths]


def _write_outputs_into(result: SweepResult, out_dir: str | Path) -> list[Path]:
    from ..plots.sweep import plot_sweep

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = [result.to_csv(out / "sweep.csv")]
    (out / "sweep.md").write_text(result.to_markdown())
    (out / "sweep.json").write_text(json.dumps(result.to_json(), indent=1))
    paths += [out / "sweep.md", out / "sweep.json"]
    paths += plot_sweep(result, out / "sweep")
    return paths
