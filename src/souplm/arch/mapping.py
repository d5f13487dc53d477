"""Mappings between architectures: how each tensor of a TARGET model is formed from a SOURCE model's tensors.

Multimodal LLMs built on the same language model often change its layout (CogVLM fuses q/k/v and adds
a visual-expert copy of every attention and MLP weight; Qwen2-VL and LLaVA-OneVision rename everything).
A mapping spec says, as data, how the two line up, so that one engine merges any such pair:

    name: llama-to-cogvlm
    map:
      - target: model.embed_tokens.weight                 # rename (here: the same name)
        source: model.embed_tokens.weight
      - target: [model.layers.${layer}.self_attn.language_expert_query_key_value.weight,
                 model.layers.${layer}.self_attn.vision_expert_query_key_value.weight]
        concat: [model.layers.${layer}.self_attn.q_proj.weight,     # fused: joined along `axis`;
                 model.layers.${layer}.self_attn.k_proj.weight,     # several targets each get a copy
                 model.layers.${layer}.self_attn.v_proj.weight]
        axis: 0
      - split: model.layers.${layer}.self_attn.query_key_value.weight   # the inverse: consecutive pieces
        into: [q_proj..., k_proj..., v_proj...]                        # sized by the targets' shapes
      - target: lm_head.weight
        source: lm_head.weight
        optional: true                                    # no error when the target has no such tensor
    keep: [model.vision.*]          # target tensors with no counterpart: they keep their own values
    ignore_source: [vision_tower.*] # source tensors deliberately left out

Names are templates: `${layer}` matches a number, any other `${var}` one name segment (no dots), and
`${var*}` any text (`model.${rest*}` renames a whole subtree). Each
rule is expanded over the target tensors its first target name matches, and the variables it binds
fill in the other names. Target names are the target's stored names; a source name is the source's
stored name or its canonical language-model name (`model.layers.3.self_attn.q_proj.weight`, whatever
LLaVA wrapper holds it), so one spec serves a plain LM and the LM inside a LLaVA alike.

Nothing is dropped silently: a rule that matches nothing, a source tensor that does not exist, a shape
that does not fit, a target tensor neither mapped nor kept and a source tensor neither used nor ignored
are all SoupErrors naming the tensor.

The engine opens the target and the source as usual and wraps them (`apply_mapping`): the source is
presented under the target's names, joined or cut on read, so a mapped merge still streams one tensor
at a time and every merge method applies unchanged.
"""

from __future__ import annotations

import fnmatch
import os
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from ..errors import SoupError, short_repr
from ..io.dtypes import FLOAT32, DType
from ..yamlfile import parse_mapping as yaml_mapping

if TYPE_CHECKING:
    import torch

BUILTIN_DIR = Path(__file__).with_name("mappings")
RULE_KEYS = {"target", "source", "concat", "split", "into", "axis", "optional"}
SPEC_KEYS = {"name", "description", "map", "keep", "ignore_source"}
VOCAB_CANONICAL = ("model.embed_tokens.weight", "lm_head.weight")  # rows may differ: vocab_policy decides
_VAR = re.compile(r"\$\{(\w+)(\*?)\}")  # ${name} or ${name*}


# -- the spec ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Rule:
    """One entry of `map:`. `targets` holds groups of target names; every name in a group receives the
    same tensor. copy/concat have one group; split has one group per piece, in order."""

    index: int
    op: str  # "copy" | "concat" | "split"
    targets: tuple[tuple[str, ...], ...]
    sources: tuple[str, ...]
    axis: int = 0
    optional: bool = False

    @property
    def primary(self) -> str:
        """The target template the rule is expanded over."""
        return self.targets[0][0]

    def describe(self) -> str:
        return f"rule {self.index} ({self.op} -> {self.primary})"


@dataclass(frozen=True)
class MappingSpec:
    name: str
    rules: tuple[Rule, ...]
    keep: tuple[str, ...] = ()
    ignore_source: tuple[str, ...] = ()
    description: str = ""
    origin: str = "spec"  # file path or `built-in NAME`, for messages
    text: str = ""  # the spec as written, saved beside a merged model

    def kept(self, name: str) -> bool:
        return _matches_any(name, self.keep)

    def ignored(self, *names: str | None) -> bool:
        return any(n is not None and _matches_any(n, self.ignore_source) for n in names)


def _matches_any(name: str, patterns: tuple[str, ...]) -> bool:
    # Patterns are globs; `${var}` in them reads as `*` so keep/ignore lists may reuse the rules' templates.
    return any(fnmatch.fnmatchcase(name, _VAR.sub("*", p)) for p in patterns)


def builtin_mappings() -> dict[str, Path]:
    """Spec files shipped with souplm, by name (the file's stem)."""
    return {p.stem: p for p in sorted(BUILTIN_DIR.glob("*.yaml"))}


def load_mapping(ref: str | os.PathLike | dict | MappingSpec) -> MappingSpec:
    """A spec from a YAML/JSON file, a built-in name (`llama-to-cogvlm`), or a dict."""
    if isinstance(ref, MappingSpec):
        return ref
    if isinstance(ref, dict):
        return parse_mapping(ref, origin="mapping", text=yaml.safe_dump(ref, sort_keys=False))
    path = Path(ref)
    if not path.is_file():
        builtin = builtin_mappings()
        if str(ref) not in builtin:
            raise SoupError(f"mapping {ref}: no such file, and no built-in mapping of that name "
                            f"(built-in: {', '.join(builtin) or 'none'})")
        path, origin = builtin[str(ref)], f"built-in {ref}"
    else:
        origin = str(path)
    text = path.read_text()
    data = yaml_mapping(text, f"mapping {path}", "mapping spec (keys: name, map, keep, ignore_source)")
    data.setdefault("name", path.stem)
    return parse_mapping(data, origin=origin, text=text)


def _names(value: Any, where: str) -> tuple[str, ...]:
    if isinstance(value, str):
        return (value,)
    if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        return tuple(value)
    raise SoupError(f"{where}: expected a tensor name or a list of names, got {short_repr(value)}")


def parse_mapping(data: dict, origin: str = "mapping", text: str = "") -> MappingSpec:
    """Validate a spec's structure (no checkpoint needed): keys, rule kinds, template variables."""
    unknown = set(data) - SPEC_KEYS
    if unknown:
        raise SoupError(f"{origin}: unknown key {min(unknown)!r} (known: {', '.join(sorted(SPEC_KEYS))})")
    entries = data.get("map")
    if not isinstance(entries, list) or not entries:
        raise SoupError(f"{origin}: 'map' must be a non-empty list of rules")
    rules = [_parse_rule(i, e, origin) for i, e in enumerate(entries)]
    keep = _names(data["keep"], f"{origin}: keep") if data.get("keep") else ()
    ignore = _names(data["ignore_source"], f"{origin}: ignore_source") if data.get("ignore_source") else ()
    return MappingSpec(name=str(data.get("name") or "mapping"), rules=tuple(rules), keep=keep, ignore_source=ignore,
                       description=str(data.get("description") or "").strip(), origin=origin, text=text)


def _parse_rule(i: int, entry: Any, origin: str) -> Rule:
    where = f"{origin}: map[{i}]"
    if not isinstance(entry, dict):
        raise SoupError(f"{where}: a rule is a mapping (target + source | concat, or split + into)")
    unknown = set(entry) - RULE_KEYS
    if unknown:
        raise SoupError(f"{where}: unknown key {min(unknown)!r} (known: {', '.join(sorted(RULE_KEYS))})")
    kinds = [k for k in ("source", "concat", "split") if k in entry]
    if len(kinds) != 1:
        raise SoupError(f"{where}: give exactly one of source, concat, split (got {', '.join(kinds) or 'none'})")
    op = {"source": "copy", "concat": "concat", "split": "split"}[kinds[0]]
    if op == "split":
        if "target" in entry or "into" not in entry:
            raise SoupError(f"{where}: a split rule names its pieces with 'into' (not 'target')")
        into = entry["into"]
        if not isinstance(into, list) or len(into) < 2:
            raise SoupError(f"{where}: 'into' must list at least two pieces")
        targets = tuple(_names(g, f"{where}.into") for g in into)
        sources = _names(entry["split"], f"{where}.split")
    else:
        if "target" not in entry or "into" in entry:
            raise SoupError(f"{where}: a {kinds[0]} rule needs 'target' (and no 'into')")
        targets = (_names(entry["target"], f"{where}.target"),)
        sources = _names(entry[kinds[0]], f"{where}.{kinds[0]}")
    if op != "concat" and len(sources) != 1:
        raise SoupError(f"{where}: '{kinds[0]}' takes one source tensor; use concat to join several")
    axis = entry.get("axis", 0)
    if not isinstance(axis, int) or isinstance(axis, bool):
        raise SoupError(f"{where}: axis must be an integer")
    optional = entry.get("optional", False)
    if not isinstance(optional, bool):  # `optional: "false"` must not read as true
        raise SoupError(f"{where}: optional must be true or false (a YAML boolean), got {short_repr(optional)}")
    rule = Rule(index=i, op=op, targets=targets, sources=sources, axis=axis, optional=optional)
    bound = {v for v, _ in _VAR.findall(rule.primary)}
    for name in (*sources, *(n for g in targets for n in g)):
        free = {v for v, _ in _VAR.findall(name)} - bound
        if free:
            raise SoupError(f"{where}: {name} uses ${{{min(free)}}}, which {rule.primary} does not bind")
    return rule


def _template_regex(template: str) -> re.Pattern:
    parts, seen, pos = [], set(), 0
    for m in _VAR.finditer(template):
        parts.append(re.escape(template[pos : m.start()]))
        var, spans_dots = m.group(1), bool(m.group(2))
        if var in seen:
            parts.append(f"(?P={var})")
        else:
            # One name segment unless starred: `model.${x}.weight` must not swallow `model.layers.3.q.weight`.
            pattern = r"\d+" if var == "layer" else (".+" if spans_dots else r"[^.]+")
            parts.append(f"(?P<{var}>{pattern})")
            seen.add(var)
        pos = m.end()
    parts.append(re.escape(template[pos:]))
    return re.compile("".join(parts))


def _fill(template: str, values: dict[str, str]) -> str:
    return _VAR.sub(lambda m: values[m.group(1)], template)


# -- resolving a spec against checkpoints ----------------------------------------------------------------
@dataclass(frozen=True)
class Piece:
    """How one target tensor is read from a source checkpoint (stored names there)."""

    op: str
    sources: tuple[str, ...]
    axis: int = 0
    start: int = 0  # split: the slice [start, start + length) along axis
    length: int = 0

    def read(self, ckpt: Any, dtype) -> torch.Tensor:
        if self.op == "concat":
            import torch

            return torch.cat([ckpt.get(s, dtype) for s in self.sources], dim=self.axis)
        t = ckpt.get(self.sources[0], dtype)
        if self.op == "split":
            # clone: a view would keep the whole fused matrix alive while the piece is merged
            return t.narrow(self.axis, self.start, self.length).clone()
        return t


@dataclass(frozen=True)
class Entry:
    """A rule expanded for one target group: the target names, their rule and the filled source names."""

    rule: Rule
    targets: tuple[str, ...]
    sources: tuple[str, ...]
    piece: int = 0  # split: which piece of the source


def expand(spec: MappingSpec, target_names: list[str], target_path: Any = "target") -> list[Entry]:
    """Expand every rule over the target's tensors; check each target tensor is mapped once or kept."""
    names = [n for n in target_names if not spec.kept(n)]
    present = set(names)
    owner: dict[str, int] = {}
    entries: list[Entry] = []
    for rule in spec.rules:
        regex = _template_regex(rule.primary)
        matches = [m for n in names if (m := regex.fullmatch(n))]
        if not matches:
            if rule.optional:
                continue
            kept = any(regex.fullmatch(n) for n in target_names)
            raise SoupError(f"mapping {spec.name}, {rule.describe()}: {rule.primary} names no tensor of {target_path}"
                            + (" (its tensors are listed under keep)" if kept else ""))
        for m in matches:
            values = m.groupdict()
            sources = tuple(_fill(s, values) for s in rule.sources)
            for p, group in enumerate(rule.targets):
                filled = tuple(_fill(t, values) for t in group)
                for t in filled:
                    if t not in present:
                        why = " (it is listed under keep)" if spec.kept(t) else ""
                        raise SoupError(f"mapping {spec.name}, {rule.describe()}: target {target_path} has no tensor "
                                        f"{t}{why}")
                    if t in owner:
                        raise SoupError(f"mapping {spec.name}: target tensor {t} is mapped twice "
                                        f"(rules {owner[t]} and {rule.index})")
                    owner[t] = rule.index
                entries.append(Entry(rule, filled, sources, p))
    unmapped = [n for n in names if n not in owner]
    if unmapped:
        raise SoupError(f"mapping {spec.name}: {len(unmapped)} tensor(s) of {target_path} have no rule and are not "
                        f"under keep: {_sample(unmapped)}")
    return entries


def _sample(names: list[str], n: int = 3) -> str:
    more = f" (+{len(names) - n} more)" if len(names) > n else ""
    return ", ".join(names[:n]) + more


def bind(spec: MappingSpec, entries: list[Entry], target: Any, src: Any, check_unused: bool = True) -> dict[str, Piece]:
    """Resolve the expanded rules against a source checkpoint: target name -> Piece, shapes checked."""
    stored, canonical = set(src.names), set(src.canonical_names())

    def source_name(e: Entry, name: str) -> str:
        # The stored name itself, or the stored name of a canonical LM name (whatever wrapper holds it).
        if name in stored:
            return name
        if name in canonical:
            return src.stored_name(name)
        raise SoupError(f"mapping {spec.name}, {e.rule.describe()}: source {src.path} has no tensor {name} "
                        f"(needed for {e.targets[0]})")

    # A split's piece sizes come from the target tensors they fill, so one spec serves every model size
    # (and grouped-query attention, where k and v are smaller than q).
    split_sizes: dict[tuple, list[tuple[int, ...]]] = {}
    for e in entries:
        if e.rule.op == "split":
            split_sizes.setdefault((e.rule.index, e.sources), []).append(target.shape(e.targets[0]))

    pieces: dict[str, Piece] = {}
    used: set[str] = set()
    for e in entries:
        rule = e.rule
        names = [source_name(e, s) for s in e.sources]
        used.update(names)
        shapes = [src.shape(n) for n in names]
        rank = len(shapes[0])
        axis = rule.axis + rank if rule.axis < 0 else rule.axis
        if not 0 <= axis < max(rank, 1) or any(len(s) != rank for s in shapes):
            raise SoupError(f"mapping {spec.name}, {rule.describe()}: axis {rule.axis} does not fit the shapes "
                            f"{_shapes_text(names, shapes)}")
        if rule.op == "copy":
            piece, shape = Piece("copy", tuple(names)), shapes[0]
        elif rule.op == "concat":
            if len({s[:axis] + s[axis + 1 :] for s in shapes}) != 1:
                raise SoupError(f"mapping {spec.name}, {rule.describe()}: cannot concatenate along axis {axis}: "
                                f"{_shapes_text(names, shapes)}")
            shape = shapes[0][:axis] + (sum(s[axis] for s in shapes),) + shapes[0][axis + 1 :]
            piece = Piece("concat", tuple(names), axis)
        else:
            parts = split_sizes[(rule.index, e.sources)]
            sizes = [p[axis] if len(p) == rank else -1 for p in parts]
            if sum(sizes) != shapes[0][axis] or -1 in sizes:
                raise SoupError(f"mapping {spec.name}, {rule.describe()}: cannot split {names[0]} {list(shapes[0])} "
                                f"along axis {axis} into pieces of {sizes} rows (the sizes of its targets)")
            start = sum(sizes[: e.piece])
            shape = shapes[0][:axis] + (sizes[e.piece],) + shapes[0][axis + 1 :]
            piece = Piece("split", (names[0],), axis, start, sizes[e.piece])
        for t in e.targets:
            want = target.shape(t)
            if want != shape and not _vocab_rows_differ(target, t, want, shape):
                raise SoupError(f"mapping {spec.name}, {rule.describe()}: shape mismatch for target {t}: the mapping "
                                f"gives {list(shape)} from {_shapes_text(names, shapes)}, the target has {list(want)}")
            pieces[t] = piece
    if check_unused:
        unused = [n for n in src.names if n not in used and not spec.ignored(n, src.layout.to_canonical(n))]
        if unused:
            raise SoupError(f"mapping {spec.name} leaves {len(unused)} tensor(s) of source {src.path} unused: "
                            f"{_sample(unused)} (map them, or list them under ignore_source)")
    return pieces


def _shapes_text(names, shapes) -> str:
    return ", ".join(f"{n}{list(s)}" for n, s in zip(names, shapes))


def _vocab_rows_differ(target: Any, name: str, want: tuple, got: tuple) -> bool:
    """Embedding rows may differ (an added image token): the merge's vocab_policy decides those."""
    return (target.layout.to_canonical(name) in VOCAB_CANONICAL and len(want) == len(got) == 2
            and want[1:] == got[1:])


# -- checkpoint views the plan reads -------------------------------------------------------------------
class MappedLayout:
    """Names of the mapped tensors: canonical (soup units, in-memory models) <-> target stored name.

    The canonical name is the target layout's own (so units and layer gradients work for a LLaVA-like
    target), else the stored name (a custom architecture: the generic layout).
    """

    def __init__(self, name: str, stored_to_canonical: dict[str, str], multimodal: bool):
        self.name = name
        self.multimodal = multimodal
        self._canon = stored_to_canonical
        self._stored = {c: s for s, c in stored_to_canonical.items()}
        if len(self._stored) != len(self._canon):
            dup = [c for c, n in Counter(stored_to_canonical.values()).items() if n > 1]
            raise SoupError(f"mapping: two target tensors share the canonical name {dup[0]}")

    def to_canonical(self, name: str) -> str | None:
        return self._canon.get(name)

    def from_canonical(self, canonical: str) -> str:
        try:
            return self._stored[canonical]
        except KeyError:
            raise SoupError(f"layout {self.name} has no name for tensor {canonical}") from None


class MappedTarget:
    """The target as the plan sees it: the mapped tensors are its 'language model', merged; every other
    tensor (vision encoder, projector, kept expert tensors) is an extra, copied unchanged."""

    def __init__(self, ckpt: Any, layout: MappedLayout):
        self._ckpt = ckpt
        self.layout = layout
        self.tied = False  # lm_head is whatever the spec maps; nothing is implied

    def __getattr__(self, name: str) -> Any:  # path, config, names, shape, dtype, get, close, ...
        return getattr(self._ckpt, name)

    def canonical_names(self) -> list[str]:
        return list(self.layout._stored)

    def extra_names(self) -> list[str]:
        return [n for n in self._ckpt.names if n not in self.layout._canon]

    def stored_name(self, canonical: str) -> str:
        return self.layout.from_canonical(canonical)


class MappedSource:
    """A source (or base) checkpoint presented under the target's names, joined or cut on read."""

    def __init__(self, ckpt: Any, pieces: dict[str, Piece], layout: MappedLayout):
        self._ckpt = ckpt
        self.pieces = pieces
        self.layout = layout
        self.path = ckpt.path
        self.tied = False

    @property
    def config(self) -> dict:
        return self._ckpt.config

    @property
    def names(self) -> list[str]:
        return list(self.pieces)

    def canonical_names(self) -> list[str]:
        return [self.layout.to_canonical(n) for n in self.pieces]

    def extra_names(self) -> list[str]:
        return []  # every source tensor is mapped or deliberately ignored (checked in `bind`)

    def stored_name(self, canonical: str) -> str:
        return self.layout.from_canonical(canonical)

    def _piece(self, name: str) -> Piece:
        try:
            return self.pieces[name]
        except KeyError:
            raise SoupError(f"{self.path} (mapped): has no tensor {name}") from None

    def shape(self, name: str) -> tuple[int, ...]:
        p = self._piece(name)
        shapes = [self._ckpt.shape(s) for s in p.sources]
        if p.op == "concat":
            return shapes[0][: p.axis] + (sum(s[p.axis] for s in shapes),) + shapes[0][p.axis + 1 :]
        if p.op == "split":
            return shapes[0][: p.axis] + (p.length,) + shapes[0][p.axis + 1 :]
        return shapes[0]

    def dtype(self, name: str) -> DType:
        return self._ckpt.dtype(self._piece(name).sources[0])

    def nbytes(self, name: str) -> int:
        n = 1
        for d in self.shape(name):
            n *= d
        return n * self.dtype(name).itemsize

    def get(self, name: str, dtype=FLOAT32) -> torch.Tensor:
        return self._piece(name).read(self._ckpt, dtype)

    def get_canonical(self, canonical: str, dtype=FLOAT32) -> torch.Tensor:
        return self.get(self.stored_name(canonical), dtype)

    def weight_files(self) -> list[Path]:
        return self._ckpt.weight_files()

    def close(self) -> None:
        self._ckpt.close()


def apply_mapping(ref: str | os.PathLike | dict | MappingSpec, checkpoints: list[Any]) -> tuple[list[Any], list[str]]:
    """[target, source(, base)] -> the same checkpoints as the plan should read them, and notes.

    The source must use every tensor it has (or ignore it by name); a base (for task arithmetic, TIES,
    DARE) only has to supply what the mapping reads.
    """
    spec = load_mapping(ref)
    if len(checkpoints) < 2:
        raise SoupError(f"mapping {spec.name} needs a target and a source model")
    target, others = checkpoints[0], checkpoints[1:]
    entries = expand(spec, target.names, target.path)
    canon = {}
    for e in entries:
        for t in e.targets:
            c = target.layout.to_canonical(t)
            canon[t] = c if c is not None else t
    layout = MappedLayout(f"{target.layout.name} mapped by {spec.name}", canon, target.layout.multimodal)
    views: list[Any] = [MappedTarget(target, layout)]
    for k, ck in enumerate(others):
        views.append(MappedSource(ck, bind(spec, entries, target, ck, check_unused=(k == 0)), layout))
    ops = Counter(e.rule.op for e in entries for _ in e.targets)
    kept = len(target.names) - len(canon)
    src = views[1]
    used = {s for p in src.pieces.values() for s in p.sources}
    ignored = len(src._ckpt.names) - len(used)
    note = (f"mapping {spec.name} ({spec.origin}): {len(canon)} target tensors from {len(used)} tensors of {src.path} "
            f"({', '.join(f'{n} {op}' for op, n in sorted(ops.items()))}); {kept} target tensors keep their own "
            f"values; {ignored} source tensors ignored")
    return views, [note]
