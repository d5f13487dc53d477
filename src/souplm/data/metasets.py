"""Meta sets: the tiny development sets a learnable soup is fitted on, read from local jsonl.

One row per line (a `.json` file holding one array of rows works too). The format is detected per
set from its first row, or named with `format:`; every row of a set must have that format:

    text        {"text": "..."}                                          loss on every token
    chat        {"messages": [{"role": "user", "content": "..."},        loss on assistant tokens
                              {"role": "assistant", "content": "..."}]}  (the tokenizer's chat template)
    choice      {"question": "...", "choices": ["..", ".."],              loss on the correct answer
                 "answer": 1 | "B" | "the choice text"}
    image_chat  {"image": "img/1.jpg", "messages": [...]}                image + chat, LLaVA-style models

`conversations` with `from`/`value` (human/gpt, the LLaVA-665K layout) is read as `messages`. An
image path is relative to the file's folder (or `image_root`); `<image>` in a message marks where the
image goes (default: before the first user message). The vision tower only encodes it: nothing
outside the language model is souped.

Rows are sampled (seeded) before they are parsed, so a 665K-row file costs one scan of its lines.
"""

from __future__ import annotations

import itertools
import json
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import SoupError

FORMATS: tuple[str, ...] = ("auto", "text", "chat", "choice", "image_chat")
IGNORE = -100  # label of a token that carries no loss (the transformers convention)
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


@dataclass
class MetaSet:
    """Where a meta set lives and how many of its rows to use (None: all)."""

    path: str | Path
    format: str = "auto"
    samples: int | None = 50
    image_root: str | Path | None = None
    choice_style: str = "letter"  # letter: choices listed as A., B., target " B"; text: target " <choice>"

    @property
    def name(self) -> str:
        return Path(self.path).name


@dataclass
class Example:
    """One tokenized row: labels are aligned with input_ids (IGNORE where no loss is taken)."""

    input_ids: list[int]
    labels: list[int]
    source: str  # "file:line", for error messages and logs
    extras: dict[str, torch.Tensor] = field(default_factory=dict)  # pixel_values etc., batch dim 1

    @property
    def loss_tokens(self) -> int:
        """Tokens the loss is taken on (the first position predicts nothing)."""
        return sum(1 for x in self.labels[1:] if x != IGNORE)


# ----------------------------------------------------------------------------------------------
# reading rows


def _line_offsets(path: Path) -> list[tuple[int, int]]:
    """(line number, byte offset) of every non-blank line."""
    out, offset = [], 0
    with path.open("rb") as f:
        for lineno, line in enumerate(f, 1):
            if line.strip():
                out.append((lineno, offset))
            offset += len(line)
    return out


def read_rows(path: str | Path, samples: int | None = None, seed: int = 0) -> list[tuple[str, dict]]:
    """`samples` rows (all when None) as (`file:line`, row), a seeded random choice in file order."""
    path = Path(path)
    if not path.is_file():
        raise SoupError(f"meta set not found: {path}")
    if path.suffix == ".json":
        try:
            data = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise SoupError(f"{path} is not valid JSON: {e}") from None
        if not isinstance(data, list):
            raise SoupError(f"{path}: a .json meta set holds one array of rows")
        rows = [(f"{path}:[{i}]", r) for i, r in enumerate(data)]
        if not rows:
            raise SoupError(f"meta set {path} is empty")
        return [rows[i] for i in _choose(len(rows), samples, seed, path)]
    offsets = _line_offsets(path)
    if not offsets:
        raise SoupError(f"meta set {path} is empty")
    out = []
    with path.open("rb") as f:
        for i in _choose(len(offsets), samples, seed, path):
            lineno, offset = offsets[i]
            f.seek(offset)
            where = f"{path}:{lineno}"
            try:
                row = json.loads(f.readline())
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise SoupError(f"{where}: not valid JSON ({e.msg if hasattr(e, 'msg') else e})") from None
            out.append((where, row))
    return out


def _choose(n: int, samples: int | None, seed: int, path: Path) -> list[int]:
    if samples is None:
        return list(range(n))
    if samples > n:
        raise SoupError(f"meta set {path} has {n} rows, fewer than the {samples} samples asked for")
    return sorted(random.Random(seed).sample(range(n), samples))


def detect_format(row: dict, where: str) -> str:
    if not isinstance(row, dict):
        raise SoupError(f"{where}: a row must be a JSON object, got {type(row).__name__}")
    if "image" in row:
        return "image_chat"
    if "messages" in row or "conversations" in row:
        return "chat"
    if "question" in row:
        return "choice"
    if "text" in row:
        return "text"
    raise SoupError(
        f"{where}: cannot tell the row's format (keys: {', '.join(sorted(row)) or 'none'}); expected "
        "`text`, `messages`, `question`+`choices`+`answer`, or `image`+`messages`"
    )


# ----------------------------------------------------------------------------------------------
# tokenizing with loss spans


def _tokenize_spans(tokenizer, text: str, spans: Sequence[tuple[int, int]],
                    add_special_tokens: bool) -> tuple[list[int], list[int]]:
    """Tokenize `text` once; a token carries loss when its characters overlap one of `spans`."""
    if getattr(tokenizer, "is_fast", False):
        enc = tokenizer(text, add_special_tokens=add_special_tokens, return_offsets_mapping=True)
        ids = list(enc["input_ids"])
        labels = [
            tok if e > s and any(s < b and e > a for a, b in spans) else IGNORE
            for tok, (s, e) in zip(ids, enc["offset_mapping"])
        ]
        return ids, labels
    # Slow tokenizers have no offsets: tokenize piece by piece (may differ at piece boundaries).
    cuts = sorted({0, len(text), *(p for span in spans for p in span)})
    ids, labels = [], []
    if add_special_tokens and tokenizer.bos_token_id is not None:
        ids.append(tokenizer.bos_token_id)
        labels.append(IGNORE)
    for a, b in itertools.pairwise(cuts):
        piece = tokenizer(text[a:b], add_special_tokens=False)["input_ids"]
        inside = any(s <= a and b <= e for s, e in spans)
        ids += piece
        labels += piece if inside else [IGNORE] * len(piece)
    return ids, labels


def _normalize_messages(row: dict, where: str) -> list[dict]:
    msgs = row.get("messages", row.get("conversations"))
    if not isinstance(msgs, list) or not msgs:
        raise SoupError(f"{where}: `messages` must be a non-empty list")
    roles = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
             "system": "system"}
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict):
            raise SoupError(f"{where}: messages[{i}] must be an object with role and content")
        role = m.get("role", m.get("from"))
        content = m.get("content", m.get("value"))
        if role not in roles:
            raise SoupError(f"{where}: messages[{i}] has role {role!r}; expected user, assistant or system")
        if not isinstance(content, (str, list)):
            raise SoupError(f"{where}: messages[{i}] has no text content")
        out.append({"role": roles[role], "content": content})
    if not any(m["role"] == "assistant" for m in out):
        raise SoupError(f"{where}: no assistant message, so nothing to take the loss on")
    return out


def _assistant_spans(render: Callable[..., str], messages: list[dict], where: str) -> tuple[str, list]:
    """Render the chat and find each assistant turn's character span (end-of-turn marker included)."""
    full = render(messages, add_generation_prompt=False)
    spans = []
    for k, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        start_text = render(messages[:k], add_generation_prompt=True) if k else ""
        end_text = render(messages[: k + 1], add_generation_prompt=False)
        if not (full.startswith(start_text) and full.startswith(end_text) and end_text.startswith(start_text)):
            raise SoupError(
                f"{where}: the chat template renders earlier turns differently once later turns follow, "
                "so assistant tokens cannot be located; use a template without such rewriting"
            )
        spans.append((len(start_text), len(end_text)))
    return full, spans


def _chat_renderer(template_owner, where: str) -> Callable[..., str]:
    if not getattr(template_owner, "chat_template", None):
        raise SoupError(
            f"{where}: chat rows need a chat template, and the tokenizer has none; "
            "add one to the tokenizer or use a text meta set"
        )

    def render(messages, add_generation_prompt):
        return template_owner.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)

    return render


def _answer_index(row: dict, where: str) -> int:
    choices, answer = row["choices"], row["answer"]
    if isinstance(answer, bool):
        pass
    elif isinstance(answer, int) and 0 <= answer < len(choices):
        return answer
    elif isinstance(answer, str):
        a = answer.strip()
        if len(a) == 1 and a.upper() in LETTERS[: len(choices)]:
            return LETTERS.index(a.upper())
        if answer in choices:
            return choices.index(answer)
        if a.isdigit() and int(a) < len(choices):
            return int(a)
    raise SoupError(f"{where}: answer {answer!r} is neither an index, a letter nor one of the {len(choices)} choices")


class RowEncoder:
    """Turns rows into `Example`s with one tokenizer (and, for image rows, one processor)."""

    def __init__(self, tokenizer, processor=None, multimodal: bool = False, max_length: int = 1024):
        self.tokenizer = tokenizer
        self.processor = processor
        self.multimodal = multimodal
        self.max_length = max_length

    def encode(self, row: Any, fmt: str, where: str, meta: MetaSet) -> Example:
        found = detect_format(row, where)
        # chat and image_chat mix freely: LLaVA-665K has text-only conversations among image ones
        if fmt != "auto" and found != fmt and {found, fmt} != {"chat", "image_chat"}:
            raise SoupError(f"{where}: row looks like `{found}`, but the meta set's format is `{fmt}`")
        if found == "text":
            text = row["text"]
            if not isinstance(text, str) or not text:
                raise SoupError(f"{where}: `text` must be a non-empty string")
            ids, labels = _tokenize_spans(self.tokenizer, text, [(0, len(text))], add_special_tokens=True)
            ex = Example(ids, labels, where)
        elif found == "chat":
            messages = _normalize_messages(row, where)
            for i, m in enumerate(messages):
                if not isinstance(m["content"], str):
                    raise SoupError(f"{where}: messages[{i}].content must be a string in a text chat row")
            full, spans = _assistant_spans(_chat_renderer(self.tokenizer, where), messages, where)
            ids, labels = _tokenize_spans(self.tokenizer, full, spans, add_special_tokens=False)
            ex = Example(ids, labels, where)
        elif found == "choice":
            ex = self._choice(row, where, meta)
        else:
            ex = self._image_chat(row, where, meta)
        return self._truncate(ex)

    def _choice(self, row: dict, where: str, meta: MetaSet) -> Example:
        q, choices = row.get("question"), row.get("choices")
        if not isinstance(q, str) or not isinstance(choices, list) or len(choices) < 2 or "answer" not in row:
            raise SoupError(f"{where}: a choice row needs a `question` string, a `choices` list (2+) and an `answer`")
        if len(choices) > len(LETTERS) or not all(isinstance(c, str) for c in choices):
            raise SoupError(f"{where}: `choices` must be 2 to 26 strings")
        k = _answer_index(row, where)
        if meta.choice_style == "letter":
            prompt = q + "\n" + "\n".join(f"{LETTERS[i]}. {c}" for i, c in enumerate(choices)) + "\nAnswer:"
            target = f" {LETTERS[k]}"
        else:  # cloze: the answer's own words, as lm-eval scores hellaswag/piqa
            prompt, target = f"Question: {q}\nAnswer:", f" {choices[k]}"
        text = prompt + target
        ids, labels = _tokenize_spans(self.tokenizer, text, [(len(prompt), len(text))], add_special_tokens=True)
        return Example(ids, labels, where)

    def _image_chat(self, row: dict, where: str, meta: MetaSet) -> Example:
        if not self.multimodal:
            raise SoupError(
                f"{where}: row has an image, but no model in `models` is multimodal (LLaVA-style); "
                "add the multimodal model or drop the image meta set"
            )
        if self.processor is None or getattr(self.processor, "image_processor", None) is None:
            raise SoupError(f"{where}: image rows need the multimodal model's processor (preprocessor_config.json)")
        from PIL import Image, UnidentifiedImageError

        image_path = row["image"]
        if not isinstance(image_path, str):
            raise SoupError(f"{where}: `image` must be a file path")
        root = Path(meta.image_root) if meta.image_root else Path(meta.path).parent
        full_path = Path(image_path) if Path(image_path).is_absolute() else root / image_path
        try:
            image = Image.open(full_path).convert("RGB")
        except FileNotFoundError:
            raise SoupError(f"{where}: image not found: {full_path}") from None
        except (UnidentifiedImageError, OSError) as e:
            raise SoupError(f"{where}: cannot read image {full_path}: {e}") from None

        image_token = getattr(self.processor, "image_token", "<image>")
        messages = _image_messages(_normalize_messages(row, where), image_token, where)
        owner = self.processor if getattr(self.processor, "chat_template", None) else self.tokenizer
        render = _chat_renderer(owner, where)
        try:
            full, spans = _assistant_spans(render, messages, where)
        except TypeError:
            # A text-only template (SmolLM2's, Vicuna's; a processor may inherit one) concatenates
            # string content: give it strings, with the image token where the image part was.
            flat = [{"role": m["role"], "content": _flatten_parts(m["content"], image_token)} for m in messages]
            full, spans = _assistant_spans(render, flat, where)
        if full.count(image_token) != 1:
            raise SoupError(f"{where}: the rendered chat holds {full.count(image_token)} image tokens; one image per row is supported")
        ids, labels = _tokenize_spans(self.tokenizer, full, spans, add_special_tokens=False)
        # The processor knows how many positions the image fills; ask it once on the image alone.
        enc = self.processor(text=image_token, images=[image], return_tensors="pt", add_special_tokens=False)
        token_id = self.tokenizer.convert_tokens_to_ids(image_token)
        n_image = int((enc["input_ids"][0] == token_id).sum())
        pos = ids.index(token_id)
        ids = ids[:pos] + [token_id] * n_image + ids[pos + 1 :]
        labels = labels[:pos] + [IGNORE] * n_image + labels[pos + 1 :]
        extras = {k: v for k, v in enc.items() if k not in ("input_ids", "attention_mask") and torch.is_tensor(v)}
        if len(ids) > self.max_length:
            raise SoupError(f"{where}: row is {len(ids)} tokens with its image, more than max_length {self.max_length}")
        return Example(ids, labels, where, extras)

    def _truncate(self, ex: Example) -> Example:
        ex.input_ids, ex.labels = ex.input_ids[: self.max_length], ex.labels[: self.max_length]
        if ex.loss_tokens == 0:
            raise SoupError(f"{ex.source}: no tokens to take the loss on (after truncation to max_length {self.max_length})")
        return ex


def _flatten_parts(parts: list[dict], image_token: str) -> str:
    return "".join(image_token if p.get("type") == "image" else p.get("text", "") for p in parts)


def _image_messages(messages: list[dict], image_token: str, where: str) -> list[dict]:
    """Content as typed parts ({"type": "image"} / {"type": "text"}), as multimodal templates expect."""
    has_marker = any(isinstance(m["content"], str) and "<image>" in m["content"] for m in messages)
    has_part = any(isinstance(m["content"], list) and any(p.get("type") == "image" for p in m["content"])
                   for m in messages)
    out, placed = [], has_marker or has_part
    for m in messages:
        content = m["content"]
        if isinstance(content, list):
            parts = content
        else:
            parts = []
            pieces = content.split("<image>")
            for j, piece in enumerate(pieces):
                if j:
                    parts.append({"type": "image"})
                if piece:  # kept verbatim: "<image>\n..." is LLaVA's own prompt format
                    parts.append({"type": "text", "text": piece})
        if not placed and m["role"] == "user":
            parts = [{"type": "image"}, *parts]
            placed = True
        out.append({"role": m["role"], "content": parts})
    if not placed:
        raise SoupError(f"{where}: image row without a user message to attach the image to")
    return out


# ----------------------------------------------------------------------------------------------
# several sets, mixed


def split_by_ratio(total: int, ratio: Sequence[float]) -> list[int]:
    """Integer counts proportional to `ratio` summing to `total` (largest remainders get the rest)."""
    s = float(sum(ratio))
    if s <= 0:
        raise SoupError("mix.ratio must have a positive entry")
    exact = [total * r / s for r in ratio]
    counts = [int(x) for x in exact]
    order = sorted(range(len(ratio)), key=lambda i: exact[i] - counts[i], reverse=True)
    for i in order[: total - sum(counts)]:
        counts[i] += 1
    return counts


def load_meta_sets(
    sets: Sequence[MetaSet],
    encoder: RowEncoder,
    *,
    seed: int = 0,
    counts: Sequence[int | None] | None = None,
) -> list[Example]:
    """Read, sample and tokenize every set; `counts` overrides each set's `samples` (a mix)."""
    if not sets:
        raise SoupError("no meta sets given")
    examples: list[Example] = []
    for k, meta in enumerate(sets):
        n = meta.samples if counts is None else counts[k]
        if n == 0:
            continue
        if meta.format not in FORMATS:
            raise SoupError(f"meta set {meta.path}: unknown format {meta.format!r}; choose one of {', '.join(FORMATS)}")
        rows = read_rows(meta.path, n, seed=seed + k)
        fmt = meta.format
        if fmt == "auto":
            fmt = detect_format(rows[0][1], rows[0][0])
        examples += [encoder.encode(row, fmt, where, meta) for where, row in rows]
    if not examples:
        raise SoupError("the meta sets yield no examples")
    return examples


def collate(examples: Sequence[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded batch: input_ids, attention_mask, labels (+ extras concatenated, e.g. pixel_values)."""
    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e.input_ids)
        ids[i, :n] = torch.tensor(e.input_ids)
        labels[i, :n] = torch.tensor(e.labels)
        mask[i, :n] = 1
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    keys = sorted({k for e in examples for k in e.extras})
    for key in keys:
        batch[key] = torch.cat([e.extras[key] for e in examples if key in e.extras])
    return batch
