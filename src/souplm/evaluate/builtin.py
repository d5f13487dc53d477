"""Built-in tasks made from real data that installs offline (see shared/ASSETS.md).

Each builder turns rows from `souplm.data.sources` into a jsonl file under
`<cache root>/tasks/<name>/v<version>/` once, then returns an ordinary `Task` pointing at it, so a
built-in task and a hand-written task file behave the same (and hash the same way for the cache).

| name             | kind            | data                                                        |
|------------------|-----------------|-------------------------------------------------------------|
| easy-vqa         | vqa             | easy-vqa test split: 64x64 shape image + question -> one word |
| shakespeare-ppl  | perplexity      | held-out Shakespeare plays, cut into ~1,500-character passages |
| shakespeare-mc   | multiple_choice | held-out plays: 3 lines of context, which of 4 lines comes next |
| math             | generation      | generated school-math problems, 3-shot, exact match          |
| instruct-ppl     | perplexity      | held-out chat answers given the question (chat template)      |

Each name reads the *test* split; `<name>-dev` is the same task on the dev split. Choose a soup
(greedy soup's held-out task, a sweep's best alpha) on `-dev` and report the test name, so the
reported score was not used to choose (see docs/EVALUATION.md, validation leakage).
"""

from __future__ import annotations

import json
import os
import random
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..errors import SoupError
from .cache import default_cache_root
from .tasks import Task, task_from_dict

# Bump a task's version when its construction changes: the version is part of the cache key and of
# the folder its data is materialised in.
# math 3: the generator's modules changed (sources.MATH_CONFIG: place value and rounding in place of products
# and quotients), so a folder materialised from the old problems is not reused.
VERSIONS = {"easy-vqa": 1, "shakespeare-ppl": 1, "shakespeare-mc": 1, "math": 3, "instruct-ppl": 1}
# Each task on the test split under its own name, and on the dev split as `<name>-dev`: choose soups
# (greedy, best alpha) on `-dev`, report on the test name.
BUILTIN_TASKS = tuple(VERSIONS) + tuple(f"{n}-dev" for n in VERSIONS)

PASSAGE_CHARS = 1500
MC_EXAMPLES = 500
MC_CONTEXT_LINES = 3
MATH_SHOTS = 3


def _sources() -> Any:
    try:
        from ..data import sources
    except ImportError as e:
        raise SoupError(f"built-in tasks need souplm.data.sources ({e})") from None
    return sources


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    """Write atomically so two processes materialising the same task never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for r in rows:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def passages(text: str, size: int = PASSAGE_CHARS) -> list[str]:
    """Cut a long text at line ends into passages of about `size` characters."""
    out: list[str] = []
    cur: list[str] = []
    n = 0
    for line in text.splitlines():
        cur.append(line)
        n += len(line) + 1
        if n >= size:
            out.append("\n".join(cur).strip())
            cur, n = [], 0
    if "".join(cur).strip():
        out.append("\n".join(cur).strip())
    return [p for p in out if p]


def next_line_examples(texts: list[str], n: int = MC_EXAMPLES, seed: int = 0) -> list[dict[str, Any]]:
    """'Which line comes next' questions: k lines of context, the true next line and 3 distractors.

    Distractors are other lines of the same split with a similar length, so length alone does not
    give the answer away (acc_norm then measures the text, not the length).
    """
    rng = random.Random(seed)
    lines = [[ln.strip() for ln in t.splitlines() if len(ln.strip()) >= 20] for t in texts]
    pool = [ln for ls in lines for ln in ls]
    starts = [(i, j) for i, ls in enumerate(lines) for j in range(len(ls) - MC_CONTEXT_LINES)]
    if len(pool) < 10 or not starts:
        raise SoupError("not enough Shakespeare lines to build the multiple-choice task")
    rows = []
    for i, j in rng.sample(starts, min(n, len(starts))):
        context = lines[i][j : j + MC_CONTEXT_LINES]
        answer = lines[i][j + MC_CONTEXT_LINES]
        distractors: list[str] = []
        while len(distractors) < 3:
            cand = rng.choice(pool)
            if cand != answer and cand not in distractors and abs(len(cand) - len(answer)) <= 15:
                distractors.append(cand)
            elif rng.random() < 0.05 and cand != answer and cand not in distractors:
                distractors.append(cand)  # a rare odd-length line keeps the loop finite
        gold = rng.randrange(4)
        choices = distractors[:gold] + [answer] + distractors[gold:]
        rows.append({"query": "\n".join(context) + "\n", "choices": choices, "gold": gold})
    return rows


def _text_of(item: Any) -> str:
    """instruction_texts may give strings or records; join a record's text-like fields."""
    if isinstance(item, str):
        return item
    if isinstance(item, dict):
        if "text" in item:
            return str(item["text"])
        parts = [str(item[k]) for k in ("instruction", "prompt", "input", "response", "output") if item.get(k)]
        if parts:
            return "\n".join(parts)
    raise SoupError(f"instruction_texts gave an item without text: {str(item)[:60]}")


def _build_easy_vqa(folder: Path, split: str) -> dict[str, Any]:
    rows = []
    img_dir = folder / "images"
    for k, r in enumerate(_sources().easy_vqa_rows(split)):
        image = r["image"]
        if hasattr(image, "save"):  # a PIL image: store it beside the jsonl
            img_dir.mkdir(parents=True, exist_ok=True)
            path = img_dir / f"{k}.png"
            image.save(path)
            image = str(path)
        rows.append({"image": str(image), "question": r["question"], "answer": r["answer"]})
    _write_jsonl(folder / "data.jsonl", rows)
    return {"kind": "vqa", "prompt": "<image>\n{question}", "max_new_tokens": 6,
            "description": "easy-vqa test split: shape/colour questions, normalised exact match"}


def _build_shakespeare_ppl(folder: Path, split: str) -> dict[str, Any]:
    rows = [{"title": t["title"], "text": p} for t in _sources().shakespeare_texts(split) for p in passages(t["text"])]
    _write_jsonl(folder / "data.jsonl", rows)
    return {"kind": "perplexity", "context_length": 1024,
            "description": "held-out Shakespeare passages: token perplexity and bits per byte"}


def _build_shakespeare_mc(folder: Path, split: str) -> dict[str, Any]:
    texts = [t["text"] for t in _sources().shakespeare_texts(split)]
    _write_jsonl(folder / "data.jsonl", next_line_examples(texts))
    return {"kind": "multiple_choice", "prompt": "{query}", "target_delimiter": "",
            "description": "held-out Shakespeare: which of 4 lines comes next (acc, acc_norm)"}


def _build_math(folder: Path, split: str) -> dict[str, Any]:
    src = _sources()
    shots = src.math_problems("train", limit=MATH_SHOTS)
    rows = [{"question": r["question"], "answer": str(r["answer"])} for r in src.math_problems(split)]
    prefix = "".join(f"Question: {s['question']}\nAnswer: {s['answer']}\n\n" for s in shots)
    # Braces in the generated questions would break str.format; escape the fixed prefix.
    prefix = prefix.replace("{", "{{").replace("}", "}}")
    _write_jsonl(folder / "data.jsonl", rows)
    # "math" extraction: answers are integers, decimals or fractions such as -3/4.
    return {"kind": "generation", "prompt": prefix + "Question: {question}\nAnswer:", "max_new_tokens": 24,
            "stop": ["\n"], "extract": "math",
            "description": f"generated math problems, {MATH_SHOTS}-shot, exact match"}


def _build_instruct_ppl(folder: Path, split: str) -> dict[str, Any]:
    rows = []
    for t in _sources().instruction_texts(split):
        if isinstance(t, dict) and "prompt" in t and "response" in t:
            rows.append({"prompt": str(t["prompt"]), "response": str(t["response"])})
        else:
            rows.append({"prompt": "", "response": _text_of(t)})
    _write_jsonl(folder / "data.jsonl", rows)
    # Only the answer is scored, given the question in the model's chat template: this measures the
    # chat model answering, not how well it predicts questions.
    return {"kind": "perplexity", "text_field": "response", "context_field": "prompt", "chat_template": True,
            "description": "held-out chat answers (stdlib docs) given the question: perplexity, bits per byte"}


BUILDERS: dict[str, Callable[[Path, str], dict[str, Any]]] = {
    "easy-vqa": _build_easy_vqa,
    "shakespeare-ppl": _build_shakespeare_ppl,
    "shakespeare-mc": _build_shakespeare_mc,
    "math": _build_math,
    "instruct-ppl": _build_instruct_ppl,
}


def build(name: str, cache_dir: str | Path | None = None) -> Task:
    """The built-in task `name` (or `<name>-dev`), materialising its data on first use."""
    if name not in BUILTIN_TASKS:
        raise SoupError(f"unknown built-in task {name!r} (one of {', '.join(BUILTIN_TASKS)})")
    base, split = (name[: -len("-dev")], "dev") if name.endswith("-dev") else (name, "test")
    root = Path(cache_dir) if cache_dir is not None else default_cache_root() / "tasks"
    folder = root / name / f"v{VERSIONS[base]}"
    spec_path = folder / "task.json"
    if not spec_path.is_file():
        spec = BUILDERS[base](folder, split)
        spec = {"name": name, "version": VERSIONS[base], "data": "data.jsonl", **spec}
        spec["description"] = f"{spec.get('description', '')} [{split} split]"
        tmp = folder / f".task.{os.getpid()}.json"
        tmp.write_text(json.dumps(spec, indent=1))
        os.replace(tmp, spec_path)  # written last: its presence means the data is complete
    spec = json.loads(spec_path.read_text())
    return task_from_dict(spec, folder, source=f"built-in task {name}")
