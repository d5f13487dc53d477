"""The output tokenizer of a merge, and embedding rows aligned to it (mergekit's `tokenizer_source`,
`tokenizer:` and `chat_template` keys).

With a tokenizer key in the recipe, the output vocabulary is built from the inputs' tokenizers
(`base`: the base model's; `union`: the base's plus every token any input has; a model path: that
model's), with the `tokenizer.tokens` entries added. Every input checkpoint is then presented to the
plan through `VocabAligned`, whose embedding and lm_head have one row per output token, in output
order. Every method and executor then sees aligned rows and needs no knowledge of tokenizers.

Which row a model gives for output token `t` (mergekit 0.1.5's rules):

- the model's own row for `t`, when its tokenizer has `t` (at an id below its vocabulary size) and the
  token is not `force`d;
- otherwise one default row, the same for every model that lacks `t`:
  an entry in `tokenizer.tokens` (its `source`: a model's row for `t`, `{kind: model_token, model,
  token | token_id}` a model's row for another token, `{kind: zero}`); else, with no entry: the row of
  the one model that has `t`; the base model's row, when the base has it; the mean of the rows of the
  models that have it; zeros when no model has it;
- rows past the last token (`pad_to_multiple_of`) hold the mean of the model's aligned token rows.

So a token only one model knows comes out as that model's row whatever the weights (every model feeds
the same row), and a method's weights and normalisation apply unchanged.
"""

from __future__ import annotations

import json
import threading
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ..errors import SoupError, short_repr
from ..io.checkpoint import EMBED, LM_HEAD
from ..io.dtypes import FLOAT32, torch_dtype

if TYPE_CHECKING:
    import torch

    from .recipe import Recipe

# The stored name a tied model's lm_head goes by once aligned: its values are the embedding's rows, but
# the default rows of tokens it lacks come from the other models' lm_heads (as in mergekit).
TIED_HEAD = "souplm:tied-lm_head"
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json", "added_tokens.json",
    "vocab.json", "merges.txt", "chat_template.jinja", "chat_template.json",
)


# -- the recipe's keys --------------------------------------------------------------------------------
class TokenSource(BaseModel):
    """`{kind: zero}` or `{kind: model_token, model: PATH, token: STR | token_id: INT}`."""

    model_config = ConfigDict(extra="forbid", strict=True)
    kind: Literal["zero", "model_token"]
    model: str | None = None
    token_id: int | None = None
    token: str | None = None

    @model_validator(mode="after")
    def _shape(self) -> TokenSource:
        if self.kind == "zero" and (self.model, self.token_id, self.token) != (None, None, None):
            raise ValueError("a zero source takes no model, token or token_id")
        if self.kind == "model_token":
            if self.model is None:
                raise ValueError("a model_token source needs a model")
            if (self.token_id is None) == (self.token is None):
                raise ValueError("a model_token source takes exactly one of token and token_id")
        return self


class TokenSpec(BaseModel):
    """One `tokenizer.tokens` entry: where the token's embedding row comes from, and whether it replaces
    the rows of models that have the token (`force`)."""

    model_config = ConfigDict(extra="forbid", strict=True)
    source: str | TokenSource | None = None
    force: bool = False

    @field_validator("source", mode="before")
    @classmethod
    def _mapping(cls, v: Any) -> Any:
        if isinstance(v, dict):  # validated here, so its own complaint is the one reported
            try:
                return TokenSource.model_validate(v)
            except ValidationError as e:
                err = e.errors()[0]
                where = ".".join(str(x) for x in err["loc"])
                raise ValueError(f"{where + ': ' if where else ''}{err['msg'].removeprefix('Value error, ')}") from None
        return v


class TokenizerSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    source: str = "union"  # "union", "base", or a model path
    tokens: dict[str, TokenSpec] | None = None
    pad_to_multiple_of: int | None = Field(None, gt=0)


def wants_tokenizer(recipe: Recipe) -> bool:
    return recipe.tokenizer_source is not None or recipe.tokenizer is not None


def tokenizer_spec(recipe: Recipe) -> TokenizerSpec | None:
    if recipe.tokenizer is not None:
        return recipe.tokenizer
    if recipe.tokenizer_source is not None:
        return TokenizerSpec(source=recipe.tokenizer_source)
    return None


def tokenizer_base(recipe: Recipe) -> str | None:
    """The model that counts as base for the tokenizer: base_model, or slerp's base (models[0], t=0: souplm
    reads mergekit's slerp base_model that way)."""
    if recipe.base_model:
        return recipe.base_model
    if recipe.merge_method == "slerp":
        return recipe.models[0].model
    return None


def check_recipe(recipe: Recipe) -> None:
    """The tokenizer keys' consistency, before anything is read (called from Recipe.check)."""
    spec = tokenizer_spec(recipe)
    if recipe.chat_template is not None:
        check_chat_template(recipe.chat_template)
    if spec is None:
        return
    if recipe.tokenizer_source is not None and recipe.tokenizer is not None:
        raise SoupError("give tokenizer_source or a tokenizer block, not both (tokenizer.source is the same key)")
    if recipe.vocab_policy != "error":
        raise SoupError(f"vocab_policy: {recipe.vocab_policy} and a tokenizer key both say how vocabularies are "
                        "aligned; keep one (the tokenizer key aligns rows by token)")
    if recipe.mapping is not None:
        raise SoupError("a tokenizer key is not supported with a mapping (the target's tokenizer is kept)")
    paths = recipe.all_paths()
    for tok, entry in (spec.tokens or {}).items():
        src = entry.source
        model = src.model if isinstance(src, TokenSource) else src
        if model is not None and model not in paths:
            raise SoupError(f"tokenizer.tokens.{tok}: source model {model} is not one of the recipe's models")


def resolve_paths(data: dict, fix) -> None:
    """Model paths in the tokenizer keys, through `fix` (relative to a recipe file, or made absolute)."""
    def model_ref(v):
        return v if v in (None, "base", "union") or not isinstance(v, str) else fix(v)

    if "tokenizer_source" in data:
        data["tokenizer_source"] = model_ref(data["tokenizer_source"])
    block = data.get("tokenizer")
    if isinstance(block, dict):
        block = dict(block)
        if "source" in block:
            block["source"] = model_ref(block["source"])
        if isinstance(block.get("tokens"), dict):
            tokens = {}
            for tok, entry in block["tokens"].items():
                if isinstance(entry, dict):
                    entry = dict(entry)
                    src = entry.get("source")
                    if isinstance(src, str):
                        entry["source"] = fix(src)
                    elif isinstance(src, dict) and isinstance(src.get("model"), str):
                        entry["source"] = dict(src, model=fix(src["model"]))
                tokens[tok] = entry
            block["tokens"] = tokens
        data["tokenizer"] = block


def absolute_fields(recipe: Recipe, absolute) -> dict[str, Any]:
    """The tokenizer keys with every model path made absolute (for the recipe saved beside the output)."""
    data: dict[str, Any] = {"tokenizer_source": recipe.tokenizer_source,
                            "tokenizer": recipe.tokenizer.model_dump() if recipe.tokenizer else None}
    resolve_paths(data, lambda p: absolute(p) or p)
    block = data["tokenizer"]
    return {"tokenizer_source": data["tokenizer_source"],
            "tokenizer": TokenizerSpec.model_validate(block) if block is not None else None}


# -- chat templates --------------------------------------------------------------------------------
# Written for souplm from the formats' published descriptions (ChatML, Llama 3's header tokens, Mistral's
# [INST] blocks, Stanford Alpaca's prompt, EXAONE's [|role|] turns); the names are mergekit's.
CHAT_TEMPLATES = {
    "chatml": (
        "{% for message in messages %}"
        "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    ),
    "llama3": (
        "{{ bos_token }}"
        "{% for message in messages %}"
        "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim"
        " + '<|eot_id|>' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
    ),
    "mistral": (
        "{{ bos_token }}"
        "{% set system = namespace(text='') %}"
        "{% for message in messages %}"
        "{% if message['role'] == 'system' %}{% set system.text = message['content'] + '\\n\\n' %}"
        "{% elif message['role'] == 'user' %}{{ '[INST] ' + system.text + message['content'] + ' [/INST]' }}"
        "{% set system.text = '' %}"
        "{% else %}{{ message['content'] + eos_token }}{% endif %}"
        "{% endfor %}"
    ),
    "alpaca": (
        "{% for message in messages %}"
        "{% if message['role'] == 'system' %}{{ message['content'] + '\\n\\n' }}"
        "{% elif message['role'] == 'user' %}{{ '### Instruction:\\n' + message['content'] + '\\n\\n' }}"
        "{% else %}{{ '### Response:\\n' + message['content'] + eos_token + '\\n\\n' }}{% endif %}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '### Response:\\n' }}{% endif %}"
    ),
    "exaone": (
        "{% for message in messages %}"
        "{% if message['role'] == 'system' %}{{ '[|system|]' + message['content'] + '[|endofturn|]\\n' }}"
        "{% elif message['role'] == 'user' %}{{ '[|user|]' + message['content'] + '\\n' }}"
        "{% else %}{{ '[|assistant|]' + message['content'] + '[|endofturn|]\\n' }}{% endif %}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '[|assistant|]' }}{% endif %}"
    ),
}


def check_chat_template(value: str) -> None:
    """mergekit's reading of `chat_template`: "auto", a known name, or a literal Jinja template."""
    if value == "auto" or _named(value) is not None:
        return
    if len(value) < 20 or "{" not in value:
        raise SoupError(f"chat_template: {short_repr(value)} is neither a template name ({', '.join(CHAT_TEMPLATES)}, "
                        "auto) nor a Jinja template")


def _named(value: str) -> str | None:
    if len(value) < 256 and "\n" not in value and "{" not in value:
        return CHAT_TEMPLATES.get(value)
    return None


def resolve_chat_template(value: str, model_dirs: list[Path]) -> str | None:
    """The template text; for "auto" the one most input tokenizers carry (None when none has one)."""
    if value != "auto":
        return _named(value) or value
    found = []
    for d in model_dirs:
        try:
            template = _load_tokenizer(d).chat_template
        except Exception:  # noqa: BLE001, S112  (a model without a loadable tokenizer has no vote)
            continue
        if isinstance(template, dict):
            template = template.get("default")
        if template:
            found.append(template.strip())
    return Counter(found).most_common(1)[0][0] if found else None


# -- the output vocabulary --------------------------------------------------------------------------
def _model_dir(ck) -> Path:
    p = Path(ck.path)
    return p if p.is_dir() else p.parent


def _load_tokenizer(d: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(d), use_fast=True, trust_remote_code=False)


def _vocab_limit(ck) -> int | None:
    """How many token ids the model has rows for: its config's vocab_size, capped by its embedding's rows."""
    cfg = ck.config or {}
    text = cfg.get("text_config") if isinstance(cfg.get("text_config"), dict) else cfg
    size = text.get("vocab_size") if isinstance(text.get("vocab_size"), int) else None
    rows = ck.shape(ck.stored_name(EMBED))[0] if EMBED in ck.canonical_names() else None
    if size is None:
        return rows
    return size if rows is None else min(size, rows)


def _stripped(tok, limit: int | None, where: str):
    """The tokenizer without the tokens at ids >= limit (they have no embedding row): BPE tokenizers only,
    as in mergekit."""
    if limit is None or all(i < limit for i in tok.get_vocab().values()):
        return tok
    from tokenizers import Tokenizer

    unused = {t for t, i in tok.get_vocab().items() if i >= limit}
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is None:
        raise SoupError(f"{where}: its tokenizer has {len(unused)} tokens past vocab_size {limit} and is not a fast "
                        "tokenizer; it cannot be the base of a tokenizer merge")
    data = json.loads(backend.to_str())
    kind = data.get("model", {}).get("type")
    if kind != "BPE":
        raise SoupError(f"{where}: its tokenizer ({kind}) has {len(unused)} tokens past vocab_size {limit}; only a "
                        "BPE tokenizer can be cut to its vocabulary for a tokenizer merge")
    data["added_tokens"] = [e for e in data.get("added_tokens", []) if e["id"] < limit]
    for t in unused:
        data["model"]["vocab"].pop(t, None)

    def keep(m) -> bool:
        parts = m.split(" ") if isinstance(m, str) else list(m)
        return not any(p in unused for p in parts)

    data["model"]["merges"] = [m for m in data["model"].get("merges", []) if keep(m)]
    tok._tokenizer = Tokenizer.from_str(json.dumps(data))
    return tok


def _reloaded(tok):
    """A copy of a tokenizer (saved and loaded again), so adding tokens leaves the original alone."""
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        tok.save_pretrained(d)
        return _load_tokenizer(Path(d))


def _union(base_k: int, toks: dict[int, Any], limits: dict[int, int | None]):
    """The base tokenizer plus every other token of the inputs: plain tokens first (each model's in its own
    id order, models in recipe order), then added tokens (the first model's settings win)."""
    order = [base_k] + [k for k in toks if k != base_k]
    base_vocab = toks[base_k].get_vocab()
    added: dict[str, Any] = {}
    plain: dict[str, None] = {}
    for k in order:
        tok, limit = toks[k], limits[k]
        decoder = tok.added_tokens_decoder
        for t, i in sorted(tok.get_vocab().items(), key=lambda kv: kv[1]):
            if (limit is None or i < limit) and i not in decoder:
                plain.setdefault(t, None)
        for i, info in sorted(decoder.items()):
            if limit is None or i < limit:
                added.setdefault(info.content, info)
    out = _reloaded(toks[base_k])
    out.add_tokens([t for t in plain if t not in added and t not in base_vocab])  # in order, one id each
    out.add_tokens(list(added.values()))  # those already in the vocabulary keep their ids
    return out


@dataclass
class VocabPlan:
    """The output tokenizer and, for each checkpoint, which of its rows feeds each output row."""

    tokenizer: Any
    n_tokens: int  # output rows that are token ids (the rest, if any, are padding)
    size: int  # output rows
    own: list[np.ndarray]  # per checkpoint: int64 [size]; >= 0 the model's row, -1 the default row, -2 padding
    present: list[np.ndarray]  # `own` before forced tokens were cleared: where each model has each token
    checkpoints: list[Any]  # the unaligned checkpoints
    rules: _Rules  # what the default rows are computed from
    notes: list[str] = field(default_factory=list)
    # per vocabulary tensor: output row -> (checkpoint, row) pairs averaged ([] zeros), over the models feeding it
    defaults: dict[str, dict[int, list[tuple[int, int]]]] = field(default_factory=dict)
    _cache: dict[str, dict[int, torch.Tensor]] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def aligned(self, k: int, canonical: str) -> torch.Tensor:
        """Checkpoint k's `canonical` (embedding or lm_head), one row per output row, fp32."""
        with self._lock:
            cache = self._cache.get(canonical)
            if cache is None or k not in cache:
                self._cache.clear()  # rows a method never read (an unused base's) go once another tensor is asked for
                cache = self._cache[canonical] = dict(enumerate(self._align(canonical)))
            t = cache.pop(k)
            if not cache:
                del self._cache[canonical]
            return t

    def _align(self, canonical: str) -> list[torch.Tensor]:
        import torch

        src = [ck.get(ck.stored_name(canonical), FLOAT32) for ck in self.checkpoints]
        shapes = {tuple(t.shape[1:]) for t in src}
        if len(shapes) != 1:
            desc = ", ".join(f"{Path(ck.path).name}{list(t.shape)}" for ck, t in zip(self.checkpoints, src))
            raise SoupError(f"{canonical}: the models' rows differ in width ({desc}); they cannot be merged")
        width = src[0].shape[1:]
        if canonical not in self.defaults:  # a plan not bound (`bind`): every checkpoint feeds it
            self.defaults[canonical] = self.rules.defaults(self, canonical, list(range(len(self.checkpoints))))[0]
        table = self.defaults[canonical]
        slot = np.full(self.size, -1, dtype=np.int64)  # output row -> row of `rows_default`
        slot[list(table)] = np.arange(len(table))
        rows_default = torch.zeros((len(table), *width), dtype=torch.float32)
        single: dict[int, tuple[list[int], list[int]]] = {}
        for n, pairs in enumerate(table.values()):
            if len(pairs) == 1:  # one source row: gathered per model below, in one indexing each
                single.setdefault(pairs[0][0], ([], []))[0].append(n)
                single[pairs[0][0]][1].append(pairs[0][1])
            elif pairs:
                row = torch.zeros(width, dtype=torch.float32)
                for k, j in pairs:  # summed in order, then divided (mergekit's order of operations)
                    row = row + src[k][j]
                rows_default[n] = row / len(pairs)
        for k, (at, js) in single.items():
            rows_default[torch.tensor(at)] = src[k][torch.tensor(js)]
        out = []
        for k, t in enumerate(src):
            rows = self.own[k]
            new = torch.zeros((self.size, *width), dtype=torch.float32)
            have = np.nonzero(rows >= 0)[0]
            new[torch.from_numpy(have)] = t[torch.from_numpy(rows[have])]
            missing = np.nonzero((rows == -1) & (slot >= 0))[0]
            if len(missing):
                new[torch.from_numpy(missing)] = rows_default[torch.from_numpy(slot[missing])]
            if self.size > self.n_tokens:
                new[self.n_tokens:] = torch.mean(new[: self.n_tokens], dim=0)
            out.append(new)
        return out


def build_vocab(recipe: Recipe, checkpoints: list[Any]) -> VocabPlan:
    """The output tokenizer of `recipe` and the row maps of its checkpoints (models in order, then the base)."""
    spec = tokenizer_spec(recipe)
    assert spec is not None
    paths = recipe.all_paths()
    index = {p: k for k, p in enumerate(paths)}
    base_path = tokenizer_base(recipe)
    base_k = index.get(base_path) if base_path is not None else None
    build_k = base_k if base_k is not None else 0
    notes: list[str] = []

    limits = {k: _vocab_limit(ck) for k, ck in enumerate(checkpoints)}
    toks: dict[int, Any] = {}
    for k, ck in enumerate(checkpoints):
        try:
            toks[k] = _load_tokenizer(_model_dir(ck))
        except Exception as e:  # noqa: BLE001  (transformers raises many types for a missing tokenizer)
            if k == build_k:
                raise SoupError(f"{ck.path}: its tokenizer could not be loaded ({type(e).__name__}); a tokenizer "
                                "merge needs the base model's tokenizer") from None
            notes.append(f"tokenizer of {ck.path} could not be loaded; its rows are read as the base's tokens")
    toks[build_k] = _stripped(toks[build_k], limits[build_k], str(checkpoints[build_k].path))

    if spec.source == "base":
        out, what = toks[build_k], f"tokenizer of {checkpoints[build_k].path}"
    elif spec.source == "union":
        out, what = _union(build_k, toks, limits), f"union of {len(toks)} tokenizers"
    else:
        d = Path(spec.source)
        k = index.get(spec.source)
        try:
            out = _reloaded(toks[k]) if k is not None and k in toks and k != build_k else _load_tokenizer(
                d if d.is_dir() else d.parent)
        except Exception as e:  # noqa: BLE001
            raise SoupError(f"tokenizer source {spec.source}: its tokenizer could not be loaded "
                            f"({type(e).__name__})") from None
        what = f"tokenizer of {spec.source}"
    if out is toks[build_k]:
        out = _reloaded(out)
    existing = set(out.get_vocab())
    for tok in spec.tokens or {}:
        if tok not in existing:
            out.add_tokens(tok)
            existing.add(tok)

    vocab = out.get_vocab()
    n_tokens = max(len(vocab), max(vocab.values(), default=-1) + 1)
    size = n_tokens
    if spec.pad_to_multiple_of and size % spec.pad_to_multiple_of:
        size += spec.pad_to_multiple_of - size % spec.pad_to_multiple_of

    own = []
    for k, ck in enumerate(checkpoints):
        mv = (toks.get(k) or toks[build_k]).get_vocab()
        limit = limits[k] if limits[k] is not None else len(mv)
        rows = np.full(size, -1, dtype=np.int64)
        rows[n_tokens:] = -2
        for t, i in vocab.items():
            j = mv.get(t)
            if j is not None and j < limit:
                rows[i] = j
        own.append(rows)

    n_new = int((own[build_k][:n_tokens] < 0).sum())
    present = [r.copy() for r in own]
    for t in spec.tokens or {}:
        if spec.tokens[t].force:  # every model takes the entry's row, its own too
            for r in own:
                r[vocab[t]] = -1
    notes.insert(0, f"tokenizer: {what}, {len(vocab)} tokens ({n_new} not in {checkpoints[build_k].path.name})"
                    + (f", {size} rows (pad_to_multiple_of {spec.pad_to_multiple_of})" if size > n_tokens else ""))
    rules = _Rules(vocab, spec.tokens or {}, base_k, toks, index, getattr(recipe, "slices", None) is not None)
    vp = VocabPlan(out, n_tokens, size, own, present, list(checkpoints), rules, notes)
    rules.defaults(vp, EMBED, list(range(len(checkpoints))))  # the tokens block's sources checked now
    return vp


@dataclass
class _Rules:
    vocab: dict[str, int]
    configs: dict[str, TokenSpec]
    base_k: int | None  # the recipe's base (mergekit adds it to every models: recipe's inputs)
    toks: dict[int, Any]
    index: dict[str, int]
    slices: bool

    def feeding(self, item) -> tuple[list[int], int | None]:
        """The checkpoints mergekit reads for this vocabulary tensor, and the one that counts as base."""
        if item.copy_from is not None:
            return [item.copy_from[0]], None
        ks = list(getattr(item, "sources", None) or range(len(item.inputs)))
        base = getattr(item, "base_from", None)
        if base is not None:
            ks.append(base)
        if self.base_k is not None and not self.slices:
            ks.append(self.base_k)
        ks = list(dict.fromkeys(ks))
        return ks, base if base is not None else (self.base_k if self.base_k in ks else None)

    def defaults(self, vp: VocabPlan, canonical: str, feeding: list[int], base_k: int | None = -1):
        """mergekit's default row for each output token some feeding model lacks (or that is forced)."""
        if base_k == -1:
            base_k = self.base_k if self.base_k in feeding else None
        defaults: dict[int, list[tuple[int, int]]] = {}
        counts: Counter[str] = Counter()
        have = np.stack([vp.present[k][: vp.n_tokens] >= 0 for k in feeding])  # [F, tokens]
        n_have = have.sum(0)
        need = set(np.nonzero(n_have < len(feeding))[0].tolist())
        by_id = {i: t for t, i in self.vocab.items()}
        need |= {self.vocab[t] for t in self.configs}
        for i in sorted(need):
            t = by_id.get(i)
            if t is None:
                continue  # an id the output tokenizer skips: zeros
            cfg = self.configs.get(t)
            present = [k for k, h in zip(feeding, have[:, i]) if h]
            if cfg is not None:
                if not cfg.force and len(present) == len(feeding):
                    continue
                defaults[i] = _configured(t, i, cfg, vp, feeding, canonical, self)
                counts["from the tokens block"] += 1
            elif len(present) == 1:
                defaults[i] = [(present[0], int(vp.present[present[0]][i]))]
                counts["from the one model that has them"] += 1
            elif not present:
                defaults[i] = []
                counts["zeros (in no input)"] += 1
            elif base_k is not None and base_k in present:
                defaults[i] = [(base_k, int(vp.present[base_k][i]))]
                counts["from the base"] += 1
            else:
                defaults[i] = [(k, int(vp.present[k][i])) for k in present]
                counts["averaged"] += 1
        return defaults, counts


def bind(plan) -> None:
    """Compute each vocabulary tensor's default rows over the checkpoints its plan item reads (mergekit: a
    slices recipe's embedding reads the first slice's models, its lm_head the last slice's), with notes."""
    vp = next((c.vocab for c in plan.checkpoints if isinstance(c, VocabAligned)), None)
    if vp is None:
        return
    said: dict[str, list[str]] = {}
    for item in plan.items:
        if item.canonical not in (EMBED, LM_HEAD) and not (item.copy_from and item.copy_from[1] in
                                                             plan.checkpoints[item.copy_from[0]]._aligned):
            continue
        canonical = item.canonical or plan.checkpoints[item.copy_from[0]]._aligned[item.copy_from[1]]
        feeding, base_k = vp.rules.feeding(item)
        vp.defaults[canonical], counts = vp.rules.defaults(vp, canonical, feeding, base_k)
        summary = ", ".join(f"{n} {what}" for what, n in counts.items() if n)
        if summary:
            said.setdefault(summary, []).append("embedding" if canonical == EMBED else "lm_head")
    for summary, which in said.items():
        plan.notes.append(f"tokenizer: {' and '.join(which)} rows of tokens an input lacks: {summary}")


def _configured(t, i, cfg: TokenSpec, vp: VocabPlan, feeding, canonical, rules: _Rules) -> list[tuple[int, int]]:
    src = cfg.source
    where = f"tokenizer.tokens.{t}"
    toks, checkpoints = rules.toks, vp.checkpoints
    if src is None:
        raise SoupError(f"{where}: some model lacks this token (or it is forced): give it a source (a model, "
                        "{kind: zero} or {kind: model_token, ...})")
    if isinstance(src, TokenSource) and src.kind == "zero":
        return []
    model = src.model if isinstance(src, TokenSource) else src
    k = rules.index[model]
    if k not in feeding:
        raise SoupError(f"{where}: source model {model} is not an input of {canonical} (in a slices recipe the "
                        "embedding reads the first slice's models, lm_head the last slice's)")
    if isinstance(src, TokenSource):
        if src.token_id is not None:
            j = src.token_id
        else:
            mv = toks[k].get_vocab() if k in toks else {}
            if src.token not in mv:
                raise SoupError(f"{where}: token {src.token!r} is not in the tokenizer of {model}")
            j = mv[src.token]
        rows = checkpoints[k].shape(checkpoints[k].stored_name(EMBED))[0]
        if not 0 <= j < rows:
            raise SoupError(f"{where}: token id {j} is out of range for {model} ({rows} rows)")
        return [(k, j)]
    j = vp.present[k][i]
    if j < 0:
        raise SoupError(f"{where}: token {t!r} is not in model {model}, its source")
    return [(k, int(j))]


# -- presenting the checkpoints aligned ---------------------------------------------------------------
class VocabAligned:
    """A checkpoint whose embedding and lm_head have the output vocabulary's rows (every other tensor
    as stored). Not a plain Checkpoint, so the fused executor leaves such plans to torch."""

    def __init__(self, ckpt: Any, k: int, vocab: VocabPlan):
        self._ckpt = ckpt
        self._k = k
        self.vocab = vocab
        self.path = ckpt.path
        self.layout = ckpt.layout
        self.tied = ckpt.tied
        have = set(ckpt.canonical_names())
        self._aligned: dict[str, str] = {}  # stored name -> canonical
        if EMBED in have:
            self._aligned[ckpt.stored_name(EMBED)] = EMBED
        if LM_HEAD in have:
            self._aligned[TIED_HEAD if ckpt.tied else ckpt.stored_name(LM_HEAD)] = LM_HEAD

    def __getattr__(self, name: str) -> Any:  # config, names, canonical_names, extra_names, close, ...
        return getattr(self._ckpt, name)

    @property
    def names(self) -> list[str]:
        return [*self._ckpt.names, *([TIED_HEAD] if TIED_HEAD in self._aligned else [])]

    def stored_name(self, canonical: str) -> str:
        if canonical == LM_HEAD and self.tied:
            return TIED_HEAD
        return self._ckpt.stored_name(canonical)

    def _stored(self, name: str) -> str:
        return self._ckpt.stored_name(LM_HEAD) if name == TIED_HEAD else name

    def shape(self, name: str) -> tuple[int, ...]:
        shape = tuple(self._ckpt.shape(self._stored(name)))
        return (self.vocab.size, *shape[1:]) if name in self._aligned else shape

    def dtype(self, name: str):
        return self._ckpt.dtype(self._stored(name))

    def nbytes(self, name: str) -> int:
        return int(np.prod(self.shape(name))) * self.dtype(name).itemsize

    def get(self, name: str, dtype=FLOAT32) -> torch.Tensor:
        if name not in self._aligned:
            return self._ckpt.get(name, dtype)
        t = self.vocab.aligned(self._k, self._aligned[name])
        want = torch_dtype(dtype) or torch_dtype(self.dtype(name))
        return t if t.dtype == want else t.to(want)

    def get_canonical(self, canonical: str, dtype=FLOAT32) -> torch.Tensor:
        return self.get(self.stored_name(canonical), dtype)

    def get_rows(self, name: str, start: int, stop: int, dtype=FLOAT32) -> torch.Tensor:
        if name not in self._aligned:
            return self._ckpt.get_rows(name, start, stop, dtype)
        return self.get(name, dtype)[start:stop].clone()

    def read_into(self, name: str, out: torch.Tensor) -> torch.Tensor:
        return out.copy_(self.get(name))

    @property
    def is_safetensors(self) -> bool:
        return False


def align_vocabularies(recipe: Recipe, checkpoints: list[Any]) -> tuple[list[Any], list[str]]:
    """The checkpoints as the plan should read them (embedding and lm_head in output-token order), and notes."""
    vocab = build_vocab(recipe, checkpoints)
    return [VocabAligned(ck, k, vocab) for k, ck in enumerate(checkpoints)], vocab.notes


# -- writing -------------------------------------------------------------------------------------------
def write_tokenizer(plan, out_dir: Path) -> None:
    """Save the merge's tokenizer into `out_dir` (after the output model's side files were copied there):
    the built tokenizer, or with only `chat_template` the output model's tokenizer with that template."""
    recipe = plan.recipe
    vocab = next((c.vocab for c in plan.checkpoints if isinstance(c, VocabAligned)), None)
    if vocab is None and recipe.chat_template is None:
        return
    template = None
    if recipe.chat_template is not None:
        template = resolve_chat_template(recipe.chat_template, [_model_dir(c) for c in plan.checkpoints])
    if vocab is not None:
        tok = vocab.tokenizer
    else:
        if template is None:  # "auto" and no input has a template: the output model's files stay as copied
            return
        try:
            tok = _load_tokenizer(_model_dir(plan.output))
        except Exception as e:  # noqa: BLE001
            raise SoupError(f"chat_template: the output model {plan.output.path} has no tokenizer to carry it "
                            f"({type(e).__name__})") from None
    if template is not None:
        tok.chat_template = template
    for name in TOKENIZER_FILES:  # the output model's copies give way to the tokenizer as built
        (out_dir / name).unlink(missing_ok=True)
    tok.save_pretrained(str(out_dir))
