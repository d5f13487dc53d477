"""Task definitions: a small YAML/JSON file that points at local jsonl data.

A task file holds one task::

    name: my-mc                 # defaults to the file name
    kind: multiple_choice       # perplexity | multiple_choice | generation | vqa
    version: 1                  # bump when the task changes meaning; part of the cache key
    data: my-mc.jsonl           # jsonl, relative to the task file
    prompt: "{question}\\nAnswer:"
    choices_field: choices
    gold_field: label

See docs/EVALUATION.md for every kind's keys. Loading validates the whole spec and the data up
front, so a typo fails in a second with a message naming the file (and line), not after an hour.
"""

from __future__ import annotations

import hashlib
import json
import string
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from ..errors import SoupError, short_repr

KINDS = ("perplexity", "multiple_choice", "generation", "vqa")

# Primary metric per kind (what sweeps plot and greedy soup optimises) and its direction.
PRIMARY = {
    "perplexity": ("bpb", False),
    "multiple_choice": ("acc", True),
    "generation": ("exact_match", True),
    "vqa": ("exact_match", True),
}
METRICS = {
    "perplexity": ("bpb", "ppl", "nll_per_token", "word_perplexity", "byte_perplexity"),
    "multiple_choice": ("acc", "acc_norm"),
    "generation": ("exact_match",),
    "vqa": ("exact_match",),
}

# Keys each kind accepts, with defaults. Unknown keys are errors: a misspelt `max_new_token` must
# not silently fall back to the default.
_COMMON = {"name": None, "kind": None, "version": 1, "data": None, "description": "", "metric": None}
_KIND_KEYS: dict[str, dict[str, Any]] = {
    "perplexity": {"text_field": "text", "context_field": None, "chat_template": False, "context_length": 1024},
    "multiple_choice": {
        "prompt": "{query}",
        "choices_field": "choices",
        "gold_field": "gold",
        "target_delimiter": " ",
        "lm_eval_compat": False,  # lm-eval's request whitespace and acc_norm by characters (docs/EVALUATION.md)
    },
    "generation": {
        "prompt": "{question}",
        "answer_field": "answer",
        "max_new_tokens": 256,
        "stop": [],
        "chat_template": False,
        "extract": "number",
    },
    "vqa": {
        "prompt": "<image>\n{question}",
        "image_field": "image",
        "answer_field": "answer",
        "max_new_tokens": 8,
        "stop": ["\n"],
        "chat_template": False,
    },
}
_EXTRACT = ("number", "math", "first_line", "text")

# The type of every task-file key: a real YAML boolean / integer / string, never coerced
# (`chat_template: "false"` and `context_length: "abc"` are refused, not read).
_STR_KEYS = {"name", "kind", "data", "description", "prompt", "text_field", "choices_field", "gold_field",
             "target_delimiter", "answer_field", "image_field", "extract"}
_OPTIONAL_STR_KEYS = {"metric", "context_field"}
_BOOL_KEYS = {"chat_template"}
_POSITIVE_INT_KEYS = {"context_length": 2, "max_new_tokens": 1}  # key -> least value


def _check_types(spec: dict[str, Any], source: str) -> None:
    from ..errors import short_repr

    for key, value in spec.items():
        bad = None
        optional = key in _OPTIONAL_STR_KEYS and value is None
        if (key in _STR_KEYS or key in _OPTIONAL_STR_KEYS) and not optional and not isinstance(value, str):
            bad = "a string"
        elif key in _BOOL_KEYS and not isinstance(value, bool):
            bad = "true or false (a YAML boolean)"
        elif key in _POSITIVE_INT_KEYS and (isinstance(value, bool) or not isinstance(value, int)
                                             or value < _POSITIVE_INT_KEYS[key]):
            bad = f"an integer >= {_POSITIVE_INT_KEYS[key]}"
        elif key == "version" and (isinstance(value, bool) or not isinstance(value, (int, str))):
            bad = "an integer or a string"
        elif key == "stop" and not (isinstance(value, str) or (
                isinstance(value, list) and all(isinstance(v, str) for v in value))):
            bad = "a string or a list of strings"
        if bad:
            raise SoupError(f"{source}: {key} must be {bad}, got {short_repr(value)}")


@dataclass(frozen=True)
class Task:
    """One evaluation task: what to feed the model and how to score it."""

    name: str
    kind: str
    data: Path
    version: str = "1"
    description: str = ""
    metric: str = ""
    options: dict[str, Any] = field(default_factory=dict)
    source: str = ""  # where the spec came from, for messages

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise SoupError(f"{self.source or self.name}: unknown task kind {short_repr(self.kind)} (one of {', '.join(KINDS)})")

    def opt(self, key: str) -> Any:
        return self.options.get(key, _KIND_KEYS[self.kind][key])

    @property
    def primary(self) -> str:
        return self.metric or PRIMARY[self.kind][0]

    @property
    def higher_is_better(self) -> bool:
        return self.primary not in ("bpb", "ppl", "nll_per_token")

    @cached_property
    def fingerprint(self) -> str:
        """Hash of the spec and the data bytes: editing either invalidates cached results.

        Computed once per Task object (a sweep asks for it per alpha); load the task again after
        editing its data in the same process.
        """
        h = hashlib.sha256()
        spec = {"kind": self.kind, "metric": self.primary, "options": self.options}
        h.update(json.dumps(spec, sort_keys=True, default=str).encode())
        with open(self.data, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        return h.hexdigest()

    @property
    def cache_version(self) -> str:
        """The version part of the cache key: declared version plus a content fingerprint."""
        return f"{self.version}+{self.fingerprint[:16]}"

    def rows(self, limit: int | None = None) -> list[dict[str, Any]]:
        """The first `limit` examples (all when None), validated for this kind."""
        return read_jsonl(self.data, limit=limit, check=self._check_row)

    def _check_row(self, row: dict[str, Any], where: str) -> None:
        need: list[str] = []
        if self.kind == "perplexity":
            need = [self.opt("text_field")] + ([self.opt("context_field")] if self.opt("context_field") else [])
        elif self.kind == "multiple_choice":
            need = [self.opt("choices_field"), self.opt("gold_field")]
        else:
            need = [self.opt("answer_field")]
            if self.kind == "vqa":
                need.append(self.opt("image_field"))
        if "prompt" in _KIND_KEYS[self.kind]:
            need += template_fields(self.opt("prompt"))
        missing = [k for k in need if k not in row]
        if missing:
            raise SoupError(f"{where}: task {self.name} needs field(s) {', '.join(missing)}")
        if self.kind == "multiple_choice":
            choices = row[self.opt("choices_field")]
            if not isinstance(choices, list) or len(choices) < 2:
                raise SoupError(f"{where}: {self.opt('choices_field')} must be a list of at least 2 choices")
            gold_index(row[self.opt("gold_field")], choices, where)

    def prompt(self, row: dict[str, Any]) -> str:
        return self.opt("prompt").format(**row)

    def image_path(self, row: dict[str, Any]) -> Path:
        p = Path(row[self.opt("image_field")])
        return p if p.is_absolute() else self.data.parent / p


def gold_index(gold: Any, choices: list[str], where: str = "") -> int:
    """The gold choice as an index: rows may give the index, a letter 'B', or the choice text."""
    if isinstance(gold, bool):
        raise SoupError(f"{where}: gold must be an index or a choice, not a boolean")
    if isinstance(gold, int):
        idx = gold
    elif isinstance(gold, str) and gold in choices:
        idx = choices.index(gold)
    elif isinstance(gold, str) and len(gold) == 1 and gold.upper() in string.ascii_uppercase:
        idx = string.ascii_uppercase.index(gold.upper())
    elif isinstance(gold, str) and gold.strip().isdigit():
        idx = int(gold)
    else:
        raise SoupError(f"{where}: gold {short_repr(gold)} is neither an index, a letter nor one of the choices")
    if not 0 <= idx < len(choices):
        raise SoupError(f"{where}: gold index {idx} is out of range for {len(choices)} choices")
    return idx


def template_fields(template: str) -> list[str]:
    """Row fields a `str.format` prompt template uses."""
    try:
        return [f for _, f, _, _ in string.Formatter().parse(template) if f]
    except ValueError as e:
        raise SoupError(f"bad prompt template {short_repr(template)}: {e}") from None


def read_jsonl(path: Path, limit: int | None = None, check=None) -> list[dict[str, Any]]:
    """Rows of a jsonl file; a bad line is an error naming the file and line number."""
    path = Path(path)
    if not path.is_file():
        raise SoupError(f"task data file not found: {path}")
    rows: list[dict[str, Any]] = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if limit is not None and len(rows) >= limit:
                break
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise SoupError(f"{where}: not valid JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise SoupError(f"{where}: each line must be a JSON object")
            if check:
                check(row, where)
            rows.append(row)
    if not rows:
        raise SoupError(f"{path}: no examples")
    return rows


def task_from_dict(spec: dict[str, Any], base_dir: Path, source: str = "") -> Task:
    """Build a Task from a parsed spec; `data` is resolved relative to `base_dir`."""
    source = source or str(spec.get("name", "task") if isinstance(spec, dict) else "task")
    if not isinstance(spec, dict):
        raise SoupError(f"{source}: a task file must hold a mapping")
    odd = next((k for k in spec if not isinstance(k, str)), None)
    if odd is not None:
        raise SoupError(f"{source}: task file keys must be strings, not {short_repr(odd)}")
    kind = spec.get("kind")
    if kind not in KINDS:
        raise SoupError(f"{source}: unknown task kind {short_repr(kind)} (one of {', '.join(KINDS)})")
    allowed = {**_COMMON, **_KIND_KEYS[kind]}
    unknown = sorted(set(spec) - set(allowed))
    if unknown:
        raise SoupError(f"{source}: unknown key(s) {', '.join(unknown)} for a {kind} task")
    _check_types(spec, source)
    if not spec.get("data"):
        raise SoupError(f"{source}: missing key 'data' (path to a jsonl file)")
    data = Path(spec["data"])
    data = data if data.is_absolute() else base_dir / data
    if not data.is_file():
        raise SoupError(f"{source}: data file not found: {data}")
    metric = spec.get("metric") or ""
    if metric and metric not in METRICS[kind]:
        raise SoupError(f"{source}: metric {short_repr(metric)} is not one of {', '.join(METRICS[kind])}")
    options = {k: v for k, v in spec.items() if k in _KIND_KEYS[kind]}
    if kind == "generation" and options.get("extract", "number") not in _EXTRACT:
        raise SoupError(f"{source}: extract must be one of {', '.join(_EXTRACT)}")
    if "stop" in options:
        stop = options["stop"]
        options["stop"] = [stop] if isinstance(stop, str) else list(stop)
    return Task(
        name=str(spec.get("name") or Path(source).stem),
        kind=kind,
        data=data.resolve(),
        version=str(spec.get("version", 1)),
        description=str(spec.get("description", "")),
        metric=metric,
        options=options,
        source=source,
    )


def load_task_file(path: str | Path) -> Task:
    """Read a task YAML or JSON file."""
    from ..yamlfile import read_mapping

    path = Path(path)
    spec = read_mapping(path, "task file")
    spec.setdefault("name", path.stem)
    return task_from_dict(spec, path.parent, source=str(path))


def load_task(name_or_path: str | Path | Task, cache_dir: str | Path | None = None) -> Task:
    """A task from a built-in name or a path to a task file."""
    if isinstance(name_or_path, Task):
        return name_or_path
    text = str(name_or_path)
    from . import builtin

    if text in builtin.BUILTIN_TASKS:
        return builtin.build(text, cache_dir=cache_dir)
    path = Path(text)
    if path.suffix.lower() in (".yaml", ".yml", ".json") or path.exists():
        return load_task_file(path)
    raise SoupError(
        f"unknown task {text!r}: not a built-in task ({', '.join(builtin.BUILTIN_TASKS)}) "
        "nor a task file (.yaml/.json)"
    )
