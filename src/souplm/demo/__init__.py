"""`souplm demo`'s toy world: two skills, a shared base, two specialists, and the soups of them.

Everything is tiny and seeded, so the demo runs in about a minute on two cores and prints the same
table every time:

- a character-level tokenizer over 8 letters, 8 digits and the marks `>` (answer follows) and `.` (end);
- the *base* is a 2-layer Llama trained to copy a 4-character string: `3107>3107.` and `cafe>cafe.`;
- specialist *A* is the base fine-tuned on skill A, counting each digit up by one (mod 8): `3107>4210.`,
  while it keeps copying letters; specialist *B* on skill B, mirroring each letter (a<->h, b<->g, ...):
  `cafe>fhcb.`, while it keeps copying digits. Each specialist therefore fails the other's skill;
- the soups are made by souplm's engine and learner (`souplm.merge`, `souplm.learn`) and scored by
  exact match of greedy answers on held-out strings.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

LETTERS, DIGITS = "abcdefgh", "01234567"
VOCAB = ["<pad>", "<s>", *LETTERS, *DIGITS, ">", "."]
IDS = {c: i for i, c in enumerate(VOCAB)}
WIDTH = 4  # characters per question


@dataclass(frozen=True)
class Skill:
    name: str
    description: str
    alphabet: str
    transform: str  # "count" | "mirror" | "copy"

    def answer(self, s: str) -> str:
        if self.transform == "count":
            return "".join(DIGITS[(DIGITS.index(c) + 1) % len(DIGITS)] for c in s)
        if self.transform == "mirror":
            return "".join(LETTERS[len(LETTERS) - 1 - LETTERS.index(c)] for c in s)
        return s

    def example(self, rng: random.Random) -> tuple[str, str]:
        s = "".join(rng.choice(self.alphabet) for _ in range(WIDTH))
        return s + ">", self.answer(s) + "."


SKILL_A = Skill("A: count digits up", "each digit + 1 (mod 8)", DIGITS, "count")
SKILL_B = Skill("B: mirror letters", "a<->h, b<->g, ...", LETTERS, "mirror")
COPY_DIGITS = Skill("copy digits", "", DIGITS, "copy")
COPY_LETTERS = Skill("copy letters", "", LETTERS, "copy")


@dataclass(frozen=True)
class Steps:
    base: int = 150
    specialist: int = 100
    learn_samples: int = 64
    learn_epochs: int = 3
    test_rows: int = 100


QUICK = Steps(base=150, specialist=100, learn_samples=32, learn_epochs=2, test_rows=40)


def encode(text: str) -> list[int]:
    return [IDS["<s>"], *(IDS[c] for c in text)]


def decode(ids: list[int]) -> str:
    return "".join(VOCAB[i] for i in ids if VOCAB[i] not in ("<pad>", "<s>"))


def save_tokenizer(path: Path) -> None:
    """A character-level fast tokenizer (one token per character, <s> first) that transformers loads."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({c: i for i, c in enumerate(VOCAB)}, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", IDS["<s>"])])
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token=".", pad_token="<pad>")
    fast.save_pretrained(path)


def new_model(seed: int = 0):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=4, vocab_size=len(VOCAB), max_position_embeddings=32,
                      bos_token_id=IDS["<s>"], eos_token_id=IDS["."], pad_token_id=IDS["<pad>"])
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg)


def train(model, skills: list[Skill], steps: int, lr: float, seed: int, batch: int = 32) -> float:
    """Next-token loss on the answers of `skills` (mixed evenly); returns the last loss."""
    import torch

    rng = random.Random(seed)
    torch.manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    model.train()
    loss = torch.tensor(0.0)
    for _ in range(steps):
        rows = [rng.choice(skills).example(rng) for _ in range(batch)]
        ids = torch.tensor([encode(q + a) for q, a in rows])
        labels = ids.clone()
        labels[:, : 1 + WIDTH + 1] = -100  # loss on the answer only
        loss = model(input_ids=ids, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    return float(loss.detach())


def test_rows(skill: Skill, n: int, seed: int = 1234) -> list[tuple[str, str]]:
    rng = random.Random(seed)
    return [skill.example(rng) for _ in range(n)]


def answers(model, questions: list[str]) -> list[str]:
    """Greedy answers (WIDTH + 1 new tokens) to same-length questions."""
    import torch

    ids = torch.tensor([encode(q) for q in questions])
    with torch.no_grad():
        for _ in range(WIDTH + 1):
            nxt = model(input_ids=ids).logits[:, -1].argmax(-1, keepdim=True)
            ids = torch.cat([ids, nxt], dim=1)
    return [decode(row) for row in ids[:, -(WIDTH + 1):].tolist()]


def accuracy(model, rows: list[tuple[str, str]]) -> float:
    got = answers(model, [q for q, _ in rows])
    return sum(g == a for g, (_, a) in zip(got, rows)) / len(rows)


def write_dev_set(path: Path, n: int, seed: int = 99) -> Path:
    """The learnable soup's dev set: `n` rows of each skill, as souplm's `text` meta-set rows."""
    rng = random.Random(seed)
    with open(path, "w") as f:
        for skill in (SKILL_A, SKILL_B):
            for _ in range(n):
                q, a = skill.example(rng)
                f.write(json.dumps({"text": q + a}) + "\n")
    return path
