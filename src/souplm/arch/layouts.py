"""Where a checkpoint keeps its language model: naming schemes as data, and inference for the rest.

A *layout* rewrites a checkpoint's tensor names to souplm's *canonical* names, the names of a plain
Llama-family causal LM (`model.layers.3.self_attn.q_proj.weight`, `model.embed_tokens.weight`,
`lm_head.weight`). Merging works on canonical names, so a plain LM and the LM inside a LLaVA line up
tensor by tensor, and the canonical module name decides the soup unit (`souplm.arch.units`): GPT-2's
`attn.c_attn` is renamed `self_attn.qkv_proj` and so gets the unit `qkv`.

The knowledge is data, one YAML file per naming scheme in `arch/schemes/` (docs/ARCHITECTURES.md):

    name: gpt2
    model_types: [gpt2]                 # config.json model_type values this scheme is meant for
    layers: transformer.h.{layer}.      # one decoder block  -> model.layers.{layer}.
    embed: transformer.wte.             # token embedding    -> model.embed_tokens.
    final_norm: transformer.ln_f.       # final norm         -> model.norm.
    lm_head: lm_head.                   # output projection  -> lm_head. (absent: tied to the embedding)
    root: {transformer.: model.}        # anything else of the LM under this prefix keeps its name
    other: {transformer.wpe.: model.embed_positions.}
    per_layer: {attn.c_attn.: self_attn.qkv_proj., ln_1.: input_layernorm., ...}
    transposed: [attn.c_attn.weight]    # Conv1D weights, stored [in, out] (a fact for readers of orientation)
    buffers: [attn.bias]                # stored non-persistent buffers (causal masks): dropped, reported

A role may list aliases (`lm_head: [lm_head., embed_out.]`); the one the checkpoint has is used. A
`kind: wrapper` file (LLaVA, Gemma 3, Qwen2-VL) says under which prefixes a multimodal checkpoint keeps
its language model and its vision parts; the LM inside is then detected like a plain one.

A checkpoint no scheme describes is *inferred* (`infer_layout`): the repeated block (`...layers.{i}.`,
`h.{i}.`, `blocks.{i}.`) whose count is the config's number of layers, the embedding and output head
by their shape [vocab, hidden], the final norm by name and shape, per-layer module names renamed by the
known scheme that covers most of them. Every stored tensor ends up in exactly one place: the language
model (merged), `extra` (outside the LM: vision tower, projector), or `dropped` (declared buffers).
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import yaml

from ..errors import SoupError

SCHEMES_DIR = Path(__file__).with_name("schemes")
CANONICAL_LAYER = "model.layers.{layer}."
CANONICAL_ROLES = {"embed": "model.embed_tokens.", "final_norm": "model.norm.", "lm_head": "lm_head."}
_LAYER_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")
_HIDDEN_KEYS = ("hidden_size", "n_embd", "d_model", "dim")


# -- name templates -------------------------------------------------------------------------------
def _template_re(template: str) -> re.Pattern[str]:
    """A name template (`{layer}` = a number) as a regex that matches a name's beginning."""
    return re.compile("^" + re.escape(template).replace(r"\{layer\}", r"(?P<layer>\d+)"))


@dataclass(frozen=True)
class Rule:
    """A prefix rewrite: a stored name beginning with `stored` begins with `canonical` instead."""

    stored: str
    canonical: str
    role: str = "other"  # embed, final_norm, lm_head, layer (a named per-layer module), block, root, other

    def __post_init__(self) -> None:
        object.__setattr__(self, "_s", _template_re(self.stored))
        object.__setattr__(self, "_c", _template_re(self.canonical))

    @staticmethod
    def _apply(pattern: re.Pattern[str], other: str, name: str) -> str | None:
        m = pattern.match(name)
        if m is None:
            return None
        head = other.replace("{layer}", m.group("layer")) if "{layer}" in other else other
        return head + name[m.end():]

    def forward(self, name: str) -> str | None:
        return self._apply(self._s, self.canonical, name)  # type: ignore[attr-defined]

    def backward(self, canonical: str) -> str | None:
        return self._apply(self._c, self.stored, canonical)  # type: ignore[attr-defined]


def _longest(rules: Iterable[Rule], key: Callable[[Rule], str], fn: Callable[[Rule], str | None]) -> str | None:
    """The rewrite by the matching rule with the longest template (so specific rules beat catch-alls)."""
    best: tuple[int, str] | None = None
    for r in rules:
        out = fn(r)
        if out is not None and (best is None or len(key(r)) > best[0]):
            best = (len(key(r)), out)
    return None if best is None else best[1]


@dataclass(frozen=True)
class Layout:
    """A naming scheme bound to one checkpoint's names: stored <-> canonical, and what is not the LM."""

    name: str
    rules: tuple[Rule, ...]  # language-model tensors
    multimodal: bool = False
    extras: tuple[Rule, ...] = ()  # non-LM parts: stored prefix -> the key they line up by across models
    buffers: tuple[Rule, ...] = ()  # stored buffers (canonical side unused): dropped
    transposed: tuple[Rule, ...] = ()  # canonical names of weights stored [in, out]
    description: str = ""  # how this layout was found (a scheme file, a wrapper, or inference)

    def to_canonical(self, name: str) -> str | None:
        """Canonical LM name of a checkpoint tensor, or None when it is not part of the LM."""
        if self.is_buffer(name):
            return None
        return _longest(self.rules, lambda r: r.stored, lambda r: r.forward(name))

    def from_canonical(self, canonical: str) -> str:
        """Checkpoint name this layout uses for a canonical LM tensor."""
        out = _longest(self.rules, lambda r: r.canonical, lambda r: r.backward(canonical))
        if out is None:
            raise SoupError(f"layout {self.name} has no name for tensor {canonical}")
        return out

    def is_buffer(self, name: str) -> bool:
        return any(r._s.fullmatch(name) for r in self.buffers)  # type: ignore[attr-defined]

    def extra_key(self, name: str) -> str:
        """The key a non-LM tensor lines up by across models (`vision_tower.x` for every LLaVA naming)."""
        return _longest(self.extras, lambda r: r.stored, lambda r: r.forward(name)) or name

    def is_transposed(self, canonical: str) -> bool:
        """True for a weight stored [in, out] (GPT-2's Conv1D), not [out, in] as torch.nn.Linear."""
        return any(r._s.fullmatch(canonical) for r in self.transposed)  # type: ignore[attr-defined]


# Canonical name = stored name. Never detected by itself: a checkpoint of a custom architecture gets it
# when a mapping spec says how its tensors line up (a mapped merge, LoRA extraction).
GENERIC = Layout(name="generic", rules=(Rule("", "", "root"),), description="stored names as canonical")


# -- scheme files ---------------------------------------------------------------------------------
_DECODER_KEYS = {"name", "kind", "description", "model_types", "signature", "layers", "embed", "final_norm",
                 "lm_head", "root", "other", "per_layer", "transposed", "buffers"}
_WRAPPER_KEYS = {"name", "kind", "description", "model_types", "signature", "language_model", "parts"}


@dataclass(frozen=True)
class Scheme:
    """One scheme file, unbound (aliases unresolved)."""

    name: str
    kind: str
    data: dict[str, Any]
    where: str

    def strs(self, key: str) -> list[str]:
        v = self.data.get(key, [])
        return [v] if isinstance(v, str) else list(v)

    def pairs(self, key: str) -> list[tuple[str, str]]:
        return list(self.data.get(key, {}).items())


def _check_scheme(data: Any, where: str) -> Scheme:
    if not isinstance(data, dict) or not isinstance(data.get("name"), str):
        raise SoupError(f"{where}: a scheme is a mapping with a `name`")
    kind = data.get("kind", "decoder")
    allowed = _WRAPPER_KEYS if kind == "wrapper" else _DECODER_KEYS if kind == "decoder" else None
    if allowed is None:
        raise SoupError(f"{where}: kind must be decoder or wrapper, got {kind!r}")
    unknown = set(data) - allowed
    if unknown:
        raise SoupError(f"{where}: unknown key(s) {', '.join(sorted(unknown))}")
    for key, v in data.items():
        if key in ("root", "other", "per_layer", "language_model", "parts"):
            if not isinstance(v, dict) or not all(isinstance(a, str) and isinstance(b, str) for a, b in v.items()):
                raise SoupError(f"{where}: {key} must map stored prefixes to canonical prefixes (strings)")
        elif key not in ("name", "kind", "description") and not (
                isinstance(v, str) or isinstance(v, list) and all(isinstance(s, str) for s in v)):
                raise SoupError(f"{where}: {key} must be a string or a list of strings")
    if kind == "decoder" and "layers" not in data:
        raise SoupError(f"{where}: a decoder scheme needs `layers` (the block prefix, with {{layer}})")
    return Scheme(data["name"], kind, data, where)


@cache
def load_schemes(directory: str | None = None) -> tuple[Scheme, ...]:
    """Every scheme file (`arch/schemes/*.yaml`), sorted by name; wrappers and decoders alike."""
    d = Path(directory) if directory else SCHEMES_DIR
    out = []
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # the same safe subset, parsed by libyaml where built
    for f in sorted(d.glob("*.yaml")):  # (in a CLI run, a tenth of a second in the pure-Python parser)
        out.append(_check_scheme(yaml.load(f.read_text(), Loader=loader), str(f)))
    names = Counter(s.name for s in out)
    dup = [n for n, c in names.items() if c > 1]
    if dup:
        raise SoupError(f"{d}: scheme name(s) used twice: {', '.join(dup)}")
    return tuple(out)


def _present(template: str, names: list[str]) -> bool:
    r = _template_re(template)
    return any(r.match(n) for n in names)


def _bind_decoder(s: Scheme, names: list[str]) -> tuple[Layout, int] | None:
    """The scheme bound to `names` (aliases resolved to the ones present) and how many names its
    specific rules cover; None when a required prefix (signature, layers, embed) is absent."""
    pick: dict[str, str | None] = {}
    for role in ("layers", "embed", "final_norm", "lm_head"):
        options = s.strs(role)
        pick[role] = next((o for o in options if _present(o, names)), None)
    if pick["layers"] is None:
        return None
    if not all(_present(t, names) for t in s.strs("signature")):
        return None
    block = pick["layers"]
    rules = [Rule(block, CANONICAL_LAYER, "block")]
    for role in ("embed", "final_norm", "lm_head"):
        if pick[role] is not None:
            rules.append(Rule(pick[role], CANONICAL_ROLES[role], role))  # type: ignore[arg-type]
    rules += [Rule(a, b, "root") for a, b in s.pairs("root")]
    rules += [Rule(a, b, "other") for a, b in s.pairs("other")]
    rules += [Rule(block + a, CANONICAL_LAYER + b, "layer") for a, b in _present_aliases(s.pairs("per_layer"), block, names)]
    buffers = tuple(Rule(block + b, "", "buffer") for b in s.strs("buffers"))
    transposed = tuple(Rule(CANONICAL_LAYER + _canonical_suffix(s, t), "", "transposed") for t in s.strs("transposed"))
    layout = Layout(s.name, tuple(rules), buffers=buffers, transposed=transposed,
                    description=f"scheme {s.name} ({Path(s.where).name})")
    specific = [r for r in rules if r.role not in ("block", "root")]
    covered = sum(1 for n in names if any(r._s.match(n) for r in specific))  # type: ignore[attr-defined]
    return layout, covered


def _present_aliases(pairs: list[tuple[str, str]], block: str, names: list[str]) -> list[tuple[str, str]]:
    """Per-layer renames with one canonical name for several stored ones (Falcon's `input_layernorm` and
    `ln_attn`) are aliases: only the one this checkpoint has is kept, so the rename runs both ways."""
    by_canonical: dict[str, list[str]] = {}
    for a, b in pairs:
        by_canonical.setdefault(b, []).append(a)
    out = []
    for b, stored in by_canonical.items():
        present = [a for a in stored if _present(block + a, names)] if len(stored) > 1 else stored
        out += [(a, b) for a in (present or stored[:1])]
    return out


def _canonical_suffix(s: Scheme, stored_suffix: str) -> str:
    """A per-layer stored suffix (`attn.c_attn.weight`) under its canonical module name."""
    best = ""
    for a, b in s.pairs("per_layer"):
        if stored_suffix.startswith(a) and len(a) > len(best):
            best = a
            out = b + stored_suffix[len(a):]
    return out if best else stored_suffix


def _model_types(config: Mapping[str, Any] | None) -> set[str]:
    if not config:
        return set()
    out = {config.get("model_type")}
    text = config.get("text_config")
    if isinstance(text, dict):
        out.add(text.get("model_type"))
    return {t for t in out if isinstance(t, str)}


def _detect_decoder(names: list[str], config: Mapping[str, Any] | None) -> tuple[Layout, int] | None:
    types = _model_types(config)
    best: tuple[tuple[int, int], Layout, int] | None = None
    for s in load_schemes():
        if s.kind != "decoder":
            continue
        bound = _bind_decoder(s, names)
        if bound is None:
            continue
        layout, covered = bound
        score = (1 if types & set(s.strs("model_types")) else 0, covered)
        if best is None or score > best[0]:
            best = (score, layout, covered)
    return None if best is None else (best[1], best[2])


def _wrap(w: Scheme, inner: Layout) -> Layout | None:
    """The inner LM's layout under a wrapper's prefixes (None if some inner rule falls outside them)."""
    pairs = w.pairs("language_model")

    def outer(template: str) -> str | None:
        for stored, inner_prefix in sorted(pairs, key=lambda p: -len(p[1])):
            if template.startswith(inner_prefix):
                return stored + template[len(inner_prefix):]
        return None

    rules, buffers = [], []
    for r in inner.rules:
        o = outer(r.stored)
        if o is None:
            return None
        rules.append(Rule(o, r.canonical, r.role))
    for r in inner.buffers:
        o = outer(r.stored)
        if o is not None:
            buffers.append(Rule(o, r.canonical, r.role))
    extras = tuple(Rule(a, b, "extra") for a, b in w.pairs("parts"))
    return Layout(f"{w.name}({inner.name})", tuple(rules), multimodal=True, extras=extras, buffers=tuple(buffers),
                  transposed=inner.transposed, description=f"wrapper {w.name} around {inner.description}")


def _strip(w: Scheme, names: list[str]) -> list[str]:
    out = []
    for n in names:
        for stored, inner in sorted(w.pairs("language_model"), key=lambda p: -len(p[0])):
            if n.startswith(stored):
                out.append(inner + n[len(stored):])
                break
    return out


def _text_config(config: Mapping[str, Any] | None) -> Mapping[str, Any] | None:
    if config and isinstance(config.get("text_config"), dict):
        return config["text_config"]
    return config


_INDEX = re.compile(r"(?<=\.)\d+(?=\.|$)")


def detect_layout(
    names: Iterable[str],
    where: str = "checkpoint",
    fallback: Layout | None = None,
    shape: Callable[[str], tuple[int, ...]] | None = None,
    config: Mapping[str, Any] | None = None,
) -> Layout:
    """The layout of a checkpoint with these tensor names.

    Order: a multimodal wrapper whose prefixes occur, around the decoder scheme that fits its LM; else
    the decoder scheme that fits best (the config's model_type first, then the most names covered);
    else `fallback` (when given); else a layout inferred from names, shapes (`shape`) and `config`.
    """
    names = list(names)
    # Detection looks at name shapes only: every index read as 0 (a 256-expert MoE has a few dozen shapes).
    shapes_of_names = sorted({_INDEX.sub("0", n) for n in names})
    for w in load_schemes():
        if w.kind != "wrapper" or not all(_present(t, shapes_of_names) for t in w.strs("signature")):
            continue
        inner_names = _strip(w, shapes_of_names)
        found = _detect_decoder(inner_names, _text_config(config))
        if found is not None:
            wrapped = _wrap(w, found[0])
            if wrapped is not None:
                return wrapped
    found = _detect_decoder(shapes_of_names, config)
    if found is not None and found[1] > 0:
        return found[0]
    if fallback is not None:
        return fallback
    try:
        return infer_layout(names, shape, config)
    except SoupError as e:
        # The canonical naming's prefixes occur but none of its specific names (a hand-made test model):
        # its names are read as canonical, as a scheme that renames nothing reads them.
        if found is not None and all(r.stored == r.canonical for r in found[0].rules):
            return found[0]
        sample = ", ".join(sorted(names)[:3])
        raise SoupError(f"{where}: unknown tensor layout (first tensors: {sample}); {e} "
                        "(docs/ARCHITECTURES.md: add a scheme file)") from None


# -- inference ------------------------------------------------------------------------------------
_BLOCK_RE = re.compile(r"^(?P<prefix>(?:[A-Za-z_][^.]*\.)*?[A-Za-z_][^.]*)\.(?P<i>\d+)\.(?P<rest>.+)$")
_EMBED_WORDS = re.compile(r"emb|wte|tok|word", re.IGNORECASE)
_HEAD_WORDS = re.compile(r"head|out|unemb|logit|lm", re.IGNORECASE)
_NORM_WORDS = re.compile(r"norm|ln", re.IGNORECASE)


def _config_int(config: Mapping[str, Any] | None, keys: tuple[str, ...]) -> int | None:
    for c in (_text_config(config), config):
        for k in keys:
            v = (c or {}).get(k)
            if isinstance(v, int) and not isinstance(v, bool) and v > 0:
                return v
    return None


def _module(name: str) -> str:
    """`a.b.weight` -> `a.b.` (the module prefix a role rule rewrites, so its bias follows)."""
    return name.rsplit(".", 1)[0] + "." if "." in name else name


def infer_layout(
    names: Iterable[str],
    shape: Callable[[str], tuple[int, ...]] | None,
    config: Mapping[str, Any] | None = None,
) -> Layout:
    """A decoder's layout from its names, shapes and config; SoupError saying why when it cannot."""
    names = list(names)
    if shape is None:
        raise SoupError("cannot infer the layout without tensor shapes")
    want = _config_int(config, _LAYER_KEYS)
    blocks: dict[str, set[int]] = {}
    for n in names:
        m = _BLOCK_RE.match(n)
        if m:
            blocks.setdefault(m.group("prefix"), set()).add(int(m.group("i")))
    full = {p: ix for p, ix in blocks.items() if ix == set(range(len(ix)))}
    if want is not None:
        cands = [p for p, ix in full.items() if len(ix) == want]
        if not cands:
            raise SoupError(f"no repeated block of {want} layers (the config's layer count) in the names")
    else:
        cands = [p for p, ix in full.items() if len(ix) > 1] or list(full)
        if not cands:
            raise SoupError("no repeated block structure (`...layers.N.`, `h.N.`, `blocks.N.`) in the names")
    # several (a vision tower's blocks too): the one holding the most tensors
    prefix = max(cands, key=lambda p: (sum(n.startswith(p + ".") for n in names), -len(p)))
    block = prefix + ".{layer}."
    n_layers = len(full[prefix])
    block_re = _template_re(block)
    inside = [n for n in names if block_re.match(n)]
    outside = [n for n in names if not block_re.match(n)]
    buffers = [n for n in names if _looks_like_buffer(n, shape)]

    hidden = _config_int(config, _HIDDEN_KEYS)
    vocab = _config_int(config, ("vocab_size", "n_vocab", "padded_vocab_size"))
    two_d = [n for n in outside if n not in buffers and len(shape(n)) == 2]
    if hidden is None and two_d:
        hidden = Counter(shape(n)[1] for n in two_d).most_common(1)[0][0]
    if vocab is not None and hidden is not None:
        vocab_like = [n for n in two_d if shape(n) == (vocab, hidden)]
    else:
        rows = max((shape(n)[0] for n in two_d if shape(n)[1] == hidden), default=None)
        vocab_like = [n for n in two_d if shape(n)[1] == hidden and shape(n)[0] == rows]
    if not vocab_like:
        raise SoupError(f"cannot infer the layout: no tensor outside the blocks has the embedding's shape "
                        f"[vocab, hidden] ({vocab if vocab else '?'}, {hidden if hidden else '?'})")
    embed, head = _embed_and_head(vocab_like)

    rules = [Rule(block, CANONICAL_LAYER, "block"), Rule(_module(embed), CANONICAL_ROLES["embed"], "embed")]
    if head is not None:
        rules.append(Rule(_module(head), CANONICAL_ROLES["lm_head"], "lm_head"))
    norms = {_module(n) for n in outside if n not in buffers and len(shape(n)) == 1 and shape(n)[0] == hidden
             and _NORM_WORDS.search(n.rsplit(".", 1)[0].rsplit(".", 1)[-1]) and not _EMBED_WORDS.search(n)}
    final = min(norms) if len(norms) == 1 else None
    if final is not None:
        rules.append(Rule(final, CANONICAL_ROLES["final_norm"], "final_norm"))
    rules.append(Rule("", "", "root"))  # anything else outside the blocks keeps its name (unit `other`)
    rests = [block_re.sub("", n) for n in inside]
    like, per_layer = _best_per_layer(rests)
    rules += [Rule(block + a, CANONICAL_LAYER + b, "layer") for a, b in per_layer]
    parts = [f"blocks `{block}` ({n_layers} layers)", f"embedding `{embed}`",
             f"lm_head `{head}`" if head else "lm_head tied to the embedding",
             f"final norm `{final}`" if final else "no final norm recognised",
             f"per-layer names as {like}" if like else "per-layer names kept"]
    return Layout("inferred", tuple(rules), buffers=tuple(Rule(b, "", "buffer") for b in buffers),
                  description="inferred from names and config: " + ", ".join(parts))


def _looks_like_buffer(name: str, shape: Callable[[str], tuple[int, ...]]) -> bool:
    """Stored buffers transformers rebuilds: rotary frequencies, causal masks (never a real bias: 4-D)."""
    last = name.rsplit(".", 1)[-1]
    return last in ("inv_freq", "masked_bias") or last == "bias" and len(shape(name)) == 4


def _embed_and_head(cands: list[str]) -> tuple[str, str | None]:
    if len(cands) == 1:
        return cands[0], None
    emb = [n for n in cands if _EMBED_WORDS.search(n) and not _HEAD_WORDS.search(n)]
    head = [n for n in cands if _HEAD_WORDS.search(n) and n not in emb]
    if len(cands) == 2 and len(emb) == 1:
        return emb[0], next(n for n in cands if n != emb[0])
    if len(cands) == 2 and len(head) == 1:
        return next(n for n in cands if n != head[0]), head[0]
    raise SoupError(f"cannot infer the layout: cannot tell the embedding from the output head among "
                    f"{', '.join(cands)}")


def _best_per_layer(rests: list[str]) -> tuple[str | None, list[tuple[str, str]]]:
    """The known scheme whose per-layer renames cover most of these block-relative names."""
    best: tuple[int, str | None, list[tuple[str, str]]] = (0, None, [])
    for s in load_schemes():
        pairs = s.pairs("per_layer")
        if s.kind != "decoder" or not pairs:
            continue
        covered = sum(1 for r in rests if any(r.startswith(a) for a, _ in pairs))
        if covered > best[0]:
            best = (covered, s.name, pairs)
    return best[1], best[2]


@dataclass
class Accounting:
    """Where each stored tensor of a checkpoint goes: LM (canonical name), extra (key), or dropped."""

    lm: dict[str, str] = field(default_factory=dict)  # canonical -> stored
    extra: dict[str, str] = field(default_factory=dict)  # key -> stored
    dropped: dict[str, str] = field(default_factory=dict)  # stored -> why


def _best_rule(rules: Iterable[Rule], name: str, forward: bool) -> Rule | None:
    best: Rule | None = None
    for r in rules:
        if (r.forward(name) if forward else r.backward(name)) is not None and (
                best is None or len(r.stored if forward else r.canonical) > len(best.stored if forward else best.canonical)):
            best = r
    return best


def _literal_index(layout: Layout) -> bool:
    """True when some template has a literal numeric segment (`mlp.0.`): then name shapes do not decide rules."""
    rules = (*layout.rules, *layout.buffers, *layout.extras)
    return any(_INDEX.search(t.replace("{layer}", "x")) for r in rules for t in (r.stored, r.canonical))


def account(layout: Layout, names: Iterable[str], where: str) -> Accounting:
    """Sort every stored tensor into exactly one place, checking the layout is one-to-one on them.

    Which rule applies depends only on a name's shape (its indices read as 0) when no template holds a
    literal index, so the rules are searched once per shape: a 256-expert MoE's 47,000 names in well under
    a second."""
    acc = Accounting()
    by_shape: dict[str, tuple[bool, Rule | None, Rule | None]] = {}
    exact = _literal_index(layout)
    for n in names:
        shape_key = n if exact else _INDEX.sub("0", n)
        if shape_key not in by_shape:
            fwd = None if layout.is_buffer(n) else _best_rule(layout.rules, n, True)
            back = None if fwd is None else _best_rule(layout.rules, fwd.forward(n) or "", False)
            by_shape[shape_key] = (layout.is_buffer(n), fwd, back)
        buffer, fwd, back = by_shape[shape_key]
        if buffer:
            acc.dropped[n] = "a stored buffer (attention mask, rotary frequencies) that transformers rebuilds"
            continue
        c = fwd.forward(n) if fwd is not None else None
        if c is None:
            key = layout.extra_key(n)
            if key in acc.extra:
                raise SoupError(f"{where}: tensors {acc.extra[key]} and {n} line up under one name {key}")
            acc.extra[key] = n
            continue
        if c in acc.lm:
            raise SoupError(f"{where}: tensors {acc.lm[c]} and {n} map to one canonical name {c} "
                            f"(layout {layout.name})")
        if back is None or back.backward(c) != n:
            raise SoupError(f"{where}: layout {layout.name} maps {n} to {c}, which maps back to "
                            f"{layout.from_canonical(c)}")
        acc.lm[c] = n
    return acc
