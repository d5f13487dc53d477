"""Small built-in checks that each variant specialised: cheap numbers recorded in the build manifest.

These are sanity checks on dev data (a few hundred examples), not the study's evaluation, which uses the
test splits elsewhere. They run greedy decoding or teacher-forced loss on the CPU in seconds.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from souplm.experiment.prompts import IGNORE


@torch.no_grad()
def greedy_generate(
    model: torch.nn.Module,
    prompts: Sequence[list[int]],
    pad_id: int,
    eos_id: int,
    max_new_tokens: int = 8,
    batch_size: int = 16,
    pixel_values: torch.Tensor | None = None,
) -> list[list[int]]:
    """Greedy continuations of token-id prompts (left-padded in batches); stops at `eos_id`."""
    model.eval()
    outputs: list[list[int]] = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        width = max(len(p) for p in chunk)
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, p in enumerate(chunk):
            ids[row, width - len(p):] = torch.tensor(p)
            mask[row, width - len(p):] = 1
        extra = {}
        if pixel_values is not None:
            extra["pixel_values"] = pixel_values[start : start + batch_size]
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=pad_id, eos_token_id=eos_id, **extra)
        for row in out[:, width:].tolist():
            outputs.append(row[: row.index(eos_id)] if eos_id in row else row)
    return outputs


@torch.no_grad()
def mean_label_loss(model: torch.nn.Module, batches: Sequence[dict]) -> float:
    """Token-weighted mean cross-entropy over the labelled tokens of `batches`."""
    model.eval()
    total, count = 0.0, 0
    for batch in batches:
        n = int((batch["labels"][:, 1:] != IGNORE).sum())
        total += float(model(**batch).loss) * n
        count += n
    return total / max(count, 1)


def perplexity(loss: float) -> float:
    return math.exp(min(loss, 50.0))


def answer_kind(answer: str, shapes: Sequence[str] = ("circle", "rectangle", "triangle")) -> str:
    """easy-vqa answer type: yes/no (chance 1/2), shape (1/3) or colour (1/8)."""
    if answer in ("yes", "no"):
        return "yes/no"
    return "shape" if answer in shapes else "color"


def normalize_answer(text: str) -> str:
    """Lower-cased, stripped, without a trailing full stop: how short answers are compared."""
    return text.strip().lower().rstrip(".").strip()
