"""The study's data: every test task, dev task and meta set materialised as task folders and jsonl files."""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from souplm.errors import SoupError
from souplm.experiment.common import write_if_changed, write_jsonl
from souplm.experiment.settings import (
    GENERAL_MODULES,
    GENERAL_SPECS,
    META_SETS,
    MIN_MARGIN,
    TASK_SPECS,
    TASK_VERSION,
    TASKS,
    Settings,
)


@dataclass
class Data:
    """The materialised tasks and meta sets of one run."""

    tasks: dict[str, Any]  # test task name -> Task
    dev_tasks: dict[str, Any]  # "<name>-dev" -> Task
    meta_sets: dict[str, Path]  # meta set name -> jsonl
    meta_rows: dict[str, int]
    info: dict[str, Any] = field(default_factory=dict)
    general_tasks: dict[str, Any] = field(default_factory=dict)  # generalization test: name -> Task


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


def _first_sentence(doc: str) -> str:
    """The first sentence of a docstring's first paragraph, on one line."""
    para = " ".join(doc.strip().split("\n\n")[0].split())
    cut = para.find(". ")
    return para[: cut + 1] if cut != -1 else para


def general_rows(s: Settings) -> dict[str, list[dict]]:
    """Rows of the generalization tasks (issue 16 §7), from data no meta set, task or variant uses.

    stdlib-ppl / stdlib-mc: docstrings of `GENERAL_MODULES` (standard-library modules outside the instruction
    modules the instruct meta set and task come from), at least 200 characters, one half for perplexity, the
    other for "which first sentence documents this name" with 3 other entries' first sentences as distractors.
    compare-mc: "which of two decimal numbers is larger", generated with a named seed.
    """
    from souplm.data import sources

    entries = []
    for module in GENERAL_MODULES:
        for qualname, _kind, doc in sources._doc_entries(module):
            first = _first_sentence(doc)
            if len(doc) >= 200 and 20 <= len(first) <= 200:
                entries.append((qualname, doc, first))
    entries = sorted(set(entries))
    random.Random("souplm/experiment/stdlib").shuffle(entries)
    half = len(entries) // 2
    n = s.general_rows
    out: dict[str, list[dict]] = {}
    out["stdlib-ppl"] = [{"text": f"{q}\n\n{sources._trim_doc(d)}"} for q, d, _ in entries[:half][: n["stdlib-ppl"]]]
    rng = random.Random("souplm/experiment/stdlib-mc")
    pool = entries[half:]
    firsts = sorted({f for _, _, f in pool})
    mc = []
    for q, _d, f in pool[: n["stdlib-mc"]]:
        others = [x for x in firsts if x != f]
        if len(others) < 3:
            break
        choices = rng.sample(others, 3)
        gold = rng.randrange(4)
        choices.insert(gold, f)
        mc.append({"query": f"Python documentation of `{q}`:", "choices": choices, "gold": gold})
    out["stdlib-mc"] = mc
    rng = random.Random("souplm/experiment/compare")
    rows = []
    while len(rows) < n["compare-mc"]:
        a, b = round(rng.uniform(0, 20), rng.choice([1, 2])), round(rng.uniform(0, 20), rng.choice([1, 2]))
        if a == b:
            continue
        choices = [f"{a:g}", f"{b:g}"]
        rows.append({"query": f"Question: Which number is larger, {a:g} or {b:g}?\nAnswer:", "choices": choices,
                     "gold": 0 if a > b else 1})
    out["compare-mc"] = rows
    empty = sorted(k for k, v in out.items() if not v)
    if empty:
        raise SoupError(f"no rows for {', '.join(empty)}: the standard library gave too little text")
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
    general = {}
    for name, grows in general_rows(s).items():
        folder = work / "tasks" / name
        write_jsonl(folder / "data.jsonl", grows)
        spec = {"name": name, "version": TASK_VERSION, "data": "data.jsonl", **GENERAL_SPECS[name]}
        write_if_changed(folder / "task.json", json.dumps(spec, indent=1, sort_keys=True) + "\n")
        general[name] = (task_from_dict(spec, folder, source=f"experiment task {name}"), len(grows))
    info = {
        "general_tasks": [{"name": n, "kind": tk.kind, "metric": tk.primary, "higher_is_better": tk.higher_is_better,
                           "min_margin": MIN_MARGIN[tk.primary], "rows": rows_n, "split": "generalization",
                           "description": GENERAL_SPECS[n]["description"]}
                          for n, (tk, rows_n) in general.items()],
        "tasks": [{"name": n, "kind": tk.kind, "metric": tk.primary, "higher_is_better": tk.higher_is_better,
                   "min_margin": MIN_MARGIN[tk.primary], "rows": len(rows[n]), "split": "test",
                   "description": TASK_SPECS[n]["description"]}
                  for n, tk in tasks.items()],
        "dev_tasks": [{"name": n, "rows": len(rows[n]), "split": "dev"} for n in dev_tasks],
        "meta_sets": [{"name": n, "rows": meta_rows[n], "format": META_SETS[n][1], "split": "dev"} for n in META_SETS],
    }
    return Data(tasks, dev_tasks, meta_sets, meta_rows, info, {n: tk for n, (tk, _) in general.items()})

