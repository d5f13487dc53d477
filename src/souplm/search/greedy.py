"""Greedy soup and uniform soup (Wortsman et al. 2022, "Model soups", Recipe 1).

Greedy soup ranks the ingredients by their held-out score, starts from the best one, and walks down
the ranking: each next ingredient joins the running uniform average only if the held-out score does
not drop. Uniform soup is the plain mean of all ingredients, for comparison.

Validation leakage: the held-out task chooses the ingredients, so its score of the greedy soup is
optimistically biased. Report a *different* task (another split) with `test_tasks`; using the
held-out task as a test task is refused unless `allow_leakage=True`.

Every candidate is an in-memory soup (weights over all ingredients, zero for those left out) scored
through the evaluation cache, so a rerun is instant and an interrupted search resumes.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import distributed as D
from ..errors import SoupError
from ..evaluate.cache import ResultCache, as_cache, model_hash, soup_key
from ..evaluate.tasks import Task, load_task
from .sweep import METHOD, SoupModel, evaluate_candidate, is_cached


@dataclass
class GreedyResult:
    models: list[str]
    heldout: dict[str, Any]  # name, primary, higher_is_better
    ranking: list[tuple[str, float]]  # (model, held-out score), best first
    steps: list[dict[str, Any]]  # step, ingredient, score (of the soup with it), kept, best so far
    chosen: list[str]
    greedy_score: float
    uniform_score: float
    test: dict[str, dict[str, float]] = field(default_factory=dict)  # soup label -> test task -> score
    out_dir: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "models": self.models, "heldout": self.heldout,
            "ranking": [{"model": m, "score": s} for m, s in self.ranking], "steps": self.steps,
            "chosen": self.chosen, "greedy_score": self.greedy_score, "uniform_score": self.uniform_score,
            "test": self.test, "out_dir": self.out_dir,
        }

    def to_markdown(self) -> str:
        h = self.heldout
        metric = f"{h['name']} {h['primary']} {'↑' if h['higher_is_better'] else '↓'}"
        lines = [f"### Ingredients ranked by held-out score ({metric})", "", "| rank | model | score |",
                 "|---:|---|---:|"]
        lines += [f"| {i + 1} | `{m}` | {s:.4f} |" for i, (m, s) in enumerate(self.ranking)]
        lines += ["", "### Greedy steps", "", "| step | ingredient tried | soup score with it | kept | soup size |",
                  "|---:|---|---:|:---:|---:|"]
        lines += [f"| {s['step']} | `{s['ingredient']}` | {s['score']:.4f} | {'yes' if s['kept'] else 'no'} | "
                  f"{s['size']} |" for s in self.steps]
        lines += ["", "### Soups", "", "| soup | ingredients | held-out " + h["primary"] + " |"
                  + "".join(f" {t} |" for t in self._test_names()), "|---|---:|---:|" + "---:|" * len(self._test_names())]
        best_single = self.ranking[0]
        rows = [("best single", 1, best_single[1]), ("uniform", len(self.models), self.uniform_score),
                ("greedy", len(self.chosen), self.greedy_score)]
        for label, n, score in rows:
            tests = "".join(f" {self.test.get(label, {}).get(t, float('nan')):.4f} |" for t in self._test_names())
            lines.append(f"| {label} | {n} | {score:.4f} |{tests}")
        lines += ["", "Greedy soup = uniform average of: " + ", ".join(f"`{m}`" for m in self.chosen) + "."]
        if not self._test_names():
            lines.append("No test task was given: the held-out score chose the soup, so it overstates how "
                         "well the soup generalises (see docs/EVALUATION.md, validation leakage).")
        return "\n".join(lines) + "\n"

    def _test_names(self) -> list[str]:
        names: list[str] = []
        for scores in self.test.values():
            names += [n for n in scores if n not in names]
        return names


def check_leakage(heldout: Task, test_tasks: Sequence[Task], allow_leakage: bool) -> None:
    """Refuse to report the task that chose the soup (same name or same data file) as its test score."""
    for t in test_tasks:
        if t.name == heldout.name or t.data == heldout.data:
            if allow_leakage:
                print(f"souplm: warning: test task {t.name} is the held-out task; its score is biased upward")
                continue
            raise SoupError(
                f"test task {t.name} is the held-out task {heldout.name} that chooses the soup: its score would "
                "be biased upward (validation leakage); use another split, or --allow-leakage"
            )


def _signed(score: float, higher_is_better: bool) -> float:
    if math.isnan(score):
        return -math.inf
    return score if higher_is_better else -score


def greedy_soup(
    models: Sequence[str | Path],
    heldout: str | Path | Task,
    *,
    test_tasks: Sequence[str | Path | Task] = (),
    out_dir: str | Path | None = None,
    limit: int | None = None,
    batch_size: int = 8,
    cache: ResultCache | str | Path | bool | None = True,
    device: str | None = None,
    dtype: str = "float32",
    progress: bool = True,
    in_memory: bool = True,
    allow_leakage: bool = False,
    force: bool = False,
    vocab_policy: str | None = None,
    task_cache_dir: str | Path | None = None,
) -> GreedyResult:
    """Greedy soup of `models` chosen on `heldout`; writes the soup to `out_dir` through the engine."""
    from tqdm.auto import tqdm

    from ..engine.recipe import Recipe

    paths = [str(Path(m)) for m in models]
    if len(paths) < 2:
        raise SoupError(f"a greedy soup needs at least 2 models, got {len(paths)}")
    if len(set(paths)) != len(paths):
        raise SoupError("a model is given twice: " + ", ".join(sorted({p for p in paths if paths.count(p) > 1})))
    for p in paths:
        if not (Path(p) / "config.json").is_file():
            raise SoupError(f"{p}: not a model directory (no config.json)")
    if out_dir is not None:  # fail before an hour of evaluation, not after it
        from ..io.output import AtomicDir, check_output

        check_output(out_dir, inputs=paths, what="output directory")
        AtomicDir(out_dir, force=force).check()
    task = load_task(heldout, cache_dir=task_cache_dir)
    tests = [load_task(t, cache_dir=task_cache_dir) for t in test_tasks]
    check_leakage(task, tests, allow_leakage)
    store = as_cache(cache)
    hashes = D.on_main(lambda: [model_hash(p) for p in paths])  # rank 0 reads, the others are told
    soup = SoupModel(paths, batch_size=batch_size, device=device, dtype=dtype, progress=progress and D.is_main(),
                     in_memory=in_memory)
    # The in-memory model is built from the first model, so every candidate takes its architecture.
    policy = {"vocab_policy": vocab_policy} if vocab_policy else {}
    fields = {"output_model": paths[0], **policy}
    info = {"name": task.name, "primary": task.primary, "higher_is_better": task.higher_is_better}

    def weights_key(members: Sequence[str]) -> tuple[list[float], str]:
        weights = [1.0 / len(members) if p in members else 0.0 for p in paths]
        return weights, soup_key(hashes, METHOD, {"weights": weights, **policy, "dtype": dtype})

    def score(members: Sequence[str], tasks: Sequence[Task], sharded: bool = False) -> dict[str, float]:
        """Scores of the uniform soup of `members`, as one recipe over all ingredients."""
        weights, key = weights_key(members)
        recipe = Recipe.from_models(paths, METHOD, weights, **fields)
        res = evaluate_candidate(soup, recipe, key, tasks, limit=limit, cache=store, sharded=sharded)
        return {n: float(r["score"]) for n, r in res.items()}

    def cached(job: tuple[Sequence[str], Sequence[Task]]) -> bool:
        return is_cached(store, weights_key(job[0])[1], job[1], limit)

    # Under torchrun, independent candidates are dealt out over ranks (parallel_map); the greedy
    # walk is sequential, so there every rank scores a shard of the held-out examples instead.
    show = progress and D.is_main()

    # 1. Rank the ingredients by their own held-out score (a one-hot soup is the model itself).
    bar = tqdm(total=len(paths), desc="ingredients", disable=not show)
    single_scores = D.parallel_map(lambda job: score(*job)[task.name], [([p], [task]) for p in paths], done=cached,
                                   on_result=lambda *_: bar.update(1))
    bar.close()
    singles = list(zip(paths, single_scores, strict=True))
    ranking = sorted(singles, key=lambda ms: -_signed(ms[1], task.higher_is_better))  # stable: ties keep order

    # 2. Walk down the ranking, keeping an ingredient only if the held-out score does not drop.
    chosen = [ranking[0][0]]
    current = ranking[0][1]
    steps = [{"step": 0, "ingredient": chosen[0], "score": current, "kept": True, "size": 1}]
    for i, (cand, _) in enumerate(tqdm(ranking[1:], desc="greedy", disable=not show), 1):
        s = score(chosen + [cand], [task], sharded=True)[task.name]
        kept = _signed(s, task.higher_is_better) >= _signed(current, task.higher_is_better)
        if kept:
            chosen.append(cand)
            current = s
        steps.append({"step": i, "ingredient": cand, "score": s, "kept": kept, "size": len(chosen)})

    # 3. Uniform soup of everything, for comparison; test tasks for the three soups.
    jobs = [(paths, [task])]
    if tests:
        jobs += [([ranking[0][0]], tests), (paths, tests), (chosen, tests)]
    finals = D.parallel_map(lambda job: score(*job), jobs, done=cached)
    uniform = finals[0][task.name]
    test: dict[str, dict[str, float]] = {}
    if tests:
        test = dict(zip(("best single", "uniform", "greedy"), finals[1:], strict=True))

    result = GreedyResult(models=paths, heldout=info, ranking=ranking, steps=steps, chosen=chosen,
                          greedy_score=current, uniform_score=uniform, test=test)
    if out_dir is not None:
        # One writer; the others wait, then know where it went.
        result.out_dir = str(D.on_main(lambda: write_soup(result, out_dir, force=force, progress=progress,
                                                          vocab_policy=vocab_policy)))
    return result


def write_soup(
    result: GreedyResult, out_dir: str | Path, *, force: bool = False, progress: bool = True,
    vocab_policy: str | None = None,
) -> Path:
    """Write the greedy soup (uniform mean of the chosen) through the engine, plus the search report."""
    from ..engine import merge
    from ..engine.recipe import Recipe

    # output_model is the best ingredient: the soup takes its config, tokenizer and layout.
    extra = {"vocab_policy": vocab_policy} if vocab_policy else {}
    recipe = Recipe.from_models(result.chosen, "uniform", output_model=result.chosen[0], **extra)
    merge(recipe, out_dir, force=force, progress=progress)
    out = Path(out_dir)
    result.out_dir = str(out)
    (out / "greedy_soup.json").write_text(json.dumps(result.to_json(), indent=1))
    (out / "greedy_soup.md").write_text(result.to_markdown())
    return out
