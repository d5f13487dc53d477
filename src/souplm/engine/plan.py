"""Planning a merge: recipe -> one `Item` per output tensor, with every check done up front.

The plan knows, for every output tensor, which input tensors feed it, with which method and
resolved parameters, its shape, dtype and shard. Building it reads only headers, so a bad input
(missing tensor, shape mismatch, vocabulary mismatch, unknown parameter) is reported before a single
byte is written.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field

import numpy as np

from ..arch.extras import accounting_notes, plan_extras
from ..arch.units import layer_count, unit_of
from ..errors import SoupError
from ..io.checkpoint import EMBED, LM_HEAD, Checkpoint
from ..io.dtypes import BY_NAME, DType
from ..methods import Method
from .coefficients import CoefficientTable
from .recipe import Recipe

VOCAB_TENSORS = (EMBED, LM_HEAD)
DTYPES = {name: BY_NAME[name] for name in ("float32", "float16", "bfloat16")}


@dataclass
class Item:
    out_name: str
    shape: tuple[int, ...]
    dtype: DType
    canonical: str | None = None  # None: copied unchanged (`copy_from` holds the source)
    copy_from: tuple[int, str] | None = None  # (checkpoint index, stored name)
    inputs: list[str] = field(default_factory=list)  # stored names, one per input (the method's order)
    base: str | None = None  # stored name in the base checkpoint
    sources: list[int] = field(default_factory=list)  # checkpoint index of each entry of `inputs`
    base_from: int | None = None  # checkpoint index of `base`
    model_params: dict[str, np.ndarray] = field(default_factory=dict)  # name -> float32 [N] (or [N, rows])
    global_params: dict[str, object] = field(default_factory=dict)
    common_rows: int | None = None  # vocab mismatch: rows merged; the rest come from `extra_from`
    extra_from: tuple[int, str] | None = None
    shard: int = 0
    read_bytes: int = 0

    @property
    def nbytes(self) -> int:
        """Bytes of the output tensor."""
        return _nbytes(self.shape, self.dtype)


@dataclass
class Plan:
    recipe: Recipe
    method: Method
    checkpoints: list[Checkpoint]  # recipe models in order, then the base (if any)
    output_index: int  # which checkpoint gives config, tokenizer, layout and extras
    items: list[Item]
    n_shards: int
    notes: list[str]
    coefficients: CoefficientTable | None
    base_index: int | None = None  # the recipe's base checkpoint, when the method reads a base
    layers: list[LayerSource] = field(default_factory=list)  # each output layer's input layers
    config_updates: dict = field(default_factory=dict)  # text-config keys that follow the stacked layers

    @property
    def saved_recipe(self) -> Recipe:
        """The recipe written beside the output (`souplm_recipe.yaml`): `souplm merge` of it, from any
        directory, rebuilds the same bytes (absolute model paths; the applied table and mapping by the copies
        saved beside it)."""
        from ..arch.mapping import builtin_mappings

        m = self.recipe.mapping
        builtin = isinstance(m, str) and m in builtin_mappings() and not os.path.exists(m)
        return self.recipe.for_output(
            coefficients="souplm_coefficients.json" if self.coefficients is not None else None,
            # a spec file or inline spec: the copy saved beside (a file may change or move); a built-in: its name
            mapping="souplm_mapping.yaml" if m is not None and not builtin else None,
        )

    @property
    def output(self) -> Checkpoint:
        return self.checkpoints[self.output_index]

    @property
    def read_bytes(self) -> int:
        return sum(i.read_bytes for i in self.items)

    @property
    def write_bytes(self) -> int:
        return sum(i.nbytes for i in self.items)

    def summary(self, executor: str | None = None) -> str:
        """What the merge will do, one line per fact (`executor`: which executor runs it, and why)."""
        merged = sum(1 for i in self.items if i.canonical)
        copied = len(self.items) - merged
        units = {unit_of(i.canonical).key for i in self.items if i.canonical}
        lines = [
            f"method      {self.method.name}  ({self.method.summary})",
            *[f"model {k}     {c.path}  [{c.layout.name}, {len(c.names)} tensors]" for k, c in enumerate(self.checkpoints)],
            f"output      config, tokenizer and layout of {self.output.path}",
            f"tensors     {merged} merged ({len(units)} soup units), {copied} copied unchanged",
            f"read        {self.read_bytes / 1e9:.3f} GB",
            f"write       {self.write_bytes / 1e9:.3f} GB in {self.n_shards} shard(s)",
        ]
        if self.coefficients:
            lines.append(f"coefficients {len(self.coefficients.coefficients)} table entries override per-model weights")
        if executor is not None:
            lines.append(f"executor    {executor}")
        lines += [f"note        {n}" for n in self.notes]
        return "\n".join(lines)


def _nbytes(shape, dtype) -> int:
    n = 1
    for d in shape:
        n *= d
    return n * dtype.itemsize


# -- parameters: mergekit's precedence, filters and gradients ----------------------------------------
def evaluate_setting(value, name: str, t: float, where: str):
    """One scope's setting of a parameter for tensor `name` at gradient position `t` (0..1), or None when
    the setting says nothing for this tensor (a filter list none of whose entries matches, an empty list):
    the next scope is asked then (mergekit's rule).

    A filter entry matches when it has no `filter`, when its filter is `"*"`, or when the filter occurs in
    the tensor name. A gradient [v0, ..., vm] puts the tensor at s = t*m and takes
    (1 - (s - floor s)) * v[floor s] + (s - floor s) * v[min(floor s + 1, m)]; a list of non-numbers
    (booleans) takes v[floor s]."""
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, list):
        return value
    if not value:
        return None
    if all(isinstance(v, dict) for v in value):
        for entry in value:
            f = entry.get("filter")
            if f is None or f == "*" or (name and isinstance(f, str) and f in name):
                if "value" not in entry:
                    raise SoupError(f"{where}: a filter entry has no 'value'")
                return evaluate_setting(entry["value"], name, t, where)
        return None
    if any(isinstance(v, (dict, list)) for v in value):
        raise SoupError(f"{where}: a list is either a gradient (numbers) or filter entries, not both")
    scaled = t * (len(value) - 1)
    i0 = int(scaled)
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
        return value[i0]
    i1 = min(len(value) - 1, i0 + 1)
    frac = scaled - i0
    return (1 - frac) * value[i0] + frac * value[i1]


def resolve_param(value, canonical: str, n_layers: int, where: str):
    """A parameter value for one tensor of an n_layers-layer model (number, layer gradient or filter list),
    positioned as mergekit positions it: layer i at i / (n_layers - 1) (the only layer at 1), every tensor
    outside the layers at 0. None: no filter entry matches."""
    layer = unit_of(canonical).layer
    return evaluate_setting(value, canonical, _position(layer, n_layers) if layer is not None else 0.0, where)


def _position(idx: int, length: int) -> float:
    """Where layer `idx` of a slice of `length` layers sits on a gradient: mergekit's idx / (length - 1), 1 alone."""
    return idx / (length - 1) if length > 1 else 1.0


_UNSET = object()


def _lookup(key: str, scopes, name: str, t: float):
    """The first scope (highest precedence first) whose setting for `key` says something for `name`."""
    for where, scope in scopes:
        if scope and key in scope:
            v = evaluate_setting(scope[key], name, t, f"{where}.{key}")
            if v is not None:
                return v, f"{where}.{key}"
    return _UNSET, None


# -- slices: which input layers feed each output layer --------------------------------------------------
@dataclass(frozen=True)
class Source:
    """One input of a slice: checkpoint `k`, read from its layer `start` on, with its own parameters."""

    k: int
    start: int
    params: dict
    label: str  # "models[1] (model B)", "slices[0].sources[1] (model B)", "base_model"


@dataclass
class Slice:
    """`length` consecutive output layers from `first_out` on; output layer first_out + i merges layer
    start + i of every input (in the method's order: slerp's base first) onto `base` (methods that read one)."""

    inputs: list[Source]
    base: Source | None
    params: dict
    length: int
    first_out: int
    label: str
    checked: list[Source] = field(default_factory=list)  # a base the method does not read: shapes checked only


@dataclass(frozen=True)
class LayerSource:
    """Output layer `out`: slice `slice`, from (checkpoint, layer) of each input in method order, and of the base."""

    out: int
    slice: int
    inputs: tuple[tuple[int, int], ...]
    base: tuple[int, int] | None = None


def _slices(recipe: Recipe, checkpoints: list[Checkpoint], uses_base: bool, base_index: int | None,
            layer_counts: list[int]) -> list[Slice]:
    """The recipe as slices: a `models:` recipe is one slice over every layer (as mergekit normalizes it);
    `slices:` are checked against each model's layer count (the rest was checked on the recipe)."""
    paths = recipe.all_paths()
    if not recipe.slices:
        base_path = recipe.base_model
        inputs = [Source(i, 0, s.parameters, f"models[{i}] (model {s.model})") for i, s in enumerate(recipe.models)
                  if not (uses_base and base_path is not None and s.model == base_path)]
        base = Source(base_index, 0, {}, f"base_model ({base_path})") if uses_base and base_index is not None else None
        # A base the method does not read (linear, slerp's models) still shapes the checks: its config may be the output's.
        checked = [Source(base_index, 0, {}, f"base_model ({base_path})")] if (
            base_index is not None and base is None and base_path not in (s.model for s in recipe.models)) else []
        feeding = [s.k for s in inputs] + ([base.k] if base else []) + [s.k for s in checked]
        return [Slice(inputs, base, {}, max(layer_counts[k] for k in feeding), 0, "models", checked)]
    out: list[Slice] = []
    first = 0
    for j, spec in enumerate(recipe.slices):
        base_path = spec.base_model or recipe.base_model
        srcs = []
        for i, src in enumerate(spec.sources):
            k = paths.index(src.model)
            a, b = src.layer_range
            label = f"slices[{j}].sources[{i}] (model {src.model})"
            if b > layer_counts[k]:
                raise SoupError(f"{label}: layer_range [{a}, {b}] is out of range: the model has "
                                f"{layer_counts[k]} layers (0..{layer_counts[k] - 1}; the range's end is exclusive)")
            srcs.append(Source(k, a, src.parameters, label))
        base = None
        if uses_base or recipe.merge_method == "slerp":
            base = next((s for s, src in zip(srcs, spec.sources) if src.model == base_path), None)
        if recipe.merge_method == "slerp":  # t = 0 is the base
            inputs = [base, *[s for s in srcs if s is not base]] if base is not None else srcs
            base = None
        else:
            inputs = [s for s in srcs if s is not base]
        length = spec.sources[0].layer_range[1] - spec.sources[0].layer_range[0]
        out.append(Slice(inputs, base if uses_base else None, spec.parameters, length, first, f"slices[{j}]"))
        first += length
    return out


def build_plan(recipe: Recipe, checkpoints: list[Checkpoint], coefficients: CoefficientTable | None = None) -> Plan:
    method = recipe.method
    uses_base = method.needs_base or getattr(method, "optional_base", False)
    paths = recipe.all_paths()
    base_index = paths.index(recipe.base_model) if recipe.base_model else None
    notes: list[str] = []
    if coefficients is not None:  # matched to the recipe's models by identity, columns in recipe order
        if recipe.slices:
            raise SoupError("a coefficient table applies to a models: recipe (one weight column per model), "
                            "not to slices")
        local = [str(checkpoints[i].path) if "+" not in s.model else s.model for i, s in enumerate(recipe.models)]
        coefficients, note = coefficients.aligned_to(local)
        if note:
            notes.append(note)

    # Which model the output is: named, else the first multimodal one, else the base, else model 0.
    if recipe.mapping is not None:
        output_index = 0  # the mapping's target: its layout, config, vision tower and projector
    elif recipe.output_model is not None:
        output_index = paths.index(recipe.output_model)
    else:
        mm = [k for k, c in enumerate(checkpoints) if c.layout.multimodal]
        output_index = mm[0] if mm else (base_index if base_index is not None else 0)
    out = checkpoints[output_index]

    canon = [set(c.canonical_names()) for c in checkpoints]
    layer_counts = [layer_count(names) for names in canon]
    slices = _slices(recipe, checkpoints, uses_base, base_index, layer_counts)
    dtype = DTYPES[recipe.out_dtype or recipe.dtype] if (recipe.out_dtype or recipe.dtype) else None
    ctx = _Context(recipe, method, checkpoints, canon, output_index, dtype, coefficients, notes)

    # Tensors outside the layers: those before them from the first slice's inputs, those after from the
    # last slice's (mergekit's pre and post weights), all at gradient position 0.
    first, last = slices[0], slices[-1]
    pre = sorted({c for s in _feeding(first) for c in canon[s.k] if unit_of(c).layer is None and _tensor_order(c)[0] < 2},
                 key=_tensor_order)
    post = sorted({c for s in _feeding(last) for c in canon[s.k] if unit_of(c).layer is None and _tensor_order(c)[0] >= 2},
                  key=_tensor_order)
    if out.tied and LM_HEAD in post:
        post.remove(LM_HEAD)
        untied = [str(checkpoints[s.k].path) for s in _feeding(last) if not checkpoints[s.k].tied]
        if untied:
            notes.append(f"output ties lm_head to the embedding; the separate lm_head of {', '.join(untied)} is not used")

    items: list[Item] = [ctx.item(c, first, None, 0.0) for c in pre]
    layers: list[LayerSource] = []
    layer_suffixes: dict[tuple[int, int], set[str]] = {}  # (model, layer) -> its tensors' names after the layer
    for k in {s.k for sl in slices for s in _feeding(sl)}:
        for c in canon[k]:
            if m := _LAYER_NAME.match(c):
                layer_suffixes.setdefault((k, int(m.group(1))), set()).add(m.group(2))
    for j, sl in enumerate(slices):
        for i in range(sl.length):
            o = sl.first_out + i
            suffixes = sorted(set().union(*(layer_suffixes.get((s.k, s.start + i), ()) for s in _feeding(sl))))
            if not suffixes:
                raise SoupError(f"{sl.label}: layer {sl.inputs[0].start + i} of model "
                                f"{checkpoints[sl.inputs[0].k].path} has no tensors")
            items += [ctx.item(f"model.layers.{o}.{x}", sl, i, _position(i, sl.length)) for x in suffixes]
            layers.append(LayerSource(o, j, tuple((s.k, s.start + i) for s in sl.inputs),
                                      (sl.base.k, sl.base.start + i) if sl.base else None))
    items += [ctx.item(c, last, None, 0.0) for c in post]

    # Tensors outside the language model (vision tower, projector): merged like the LM where every model has
    # them with one shape, else copied from the output model; arch/extras.py decides and writes the notes.
    merged, extra_notes = plan_extras(recipe, checkpoints, [s.k for s in _feeding(last) + last.checked],
                                      output_index, set().union(*canon))
    for s in _feeding(last) + last.checked:
        canon[s.k].update(merged)
    ctx.extra_names = merged
    items += [ctx.item(key, last, None, 0.0) for key in merged]
    kept = set(merged.values())
    for name in out.extra_names():
        if name not in kept:
            items.append(Item(out_name=name, shape=out.shape(name), dtype=out.dtype(name),
                              copy_from=(output_index, name), read_bytes=out.nbytes(name)))
    notes += extra_notes + accounting_notes(checkpoints, items)

    config_updates: dict = {}
    if recipe.slices:
        notes += [_slice_note(sl, recipe, checkpoints) for sl in slices]
        for j, spec in enumerate(recipe.slices):
            if spec.residual_weight is not None:
                notes.append(f"slices[{j}].residual_weight is not applied (mergekit 0.1.5 reads it and applies it nowhere)")
        config_updates = _layer_config(out, layers, checkpoints)
        text = _text_config(out.config)
        kept = [f"{k} = {text[k]}" for k in LAYER_POSITION_KEYS if k in text]
        if kept:
            notes.append(f"config {', '.join(kept)} kept from {out.path}: it now counts the stacked output's layers")
    n_shards = _assign_shards(items, recipe.shard_size)
    return Plan(recipe, method, checkpoints, output_index, items, n_shards, notes, coefficients,
                base_index=base_index if uses_base else None, layers=layers, config_updates=config_updates)


_LAYER_NAME = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


def _feeding(sl: Slice) -> list[Source]:
    return sl.inputs + ([sl.base] if sl.base else [])


def _canonical_at(c_out: str, layer: int | None) -> str:
    """The input's name for an output tensor: the same name outside the layers, else at the input's layer."""
    if layer is None:
        return c_out
    m = _LAYER_NAME.match(c_out)
    return f"model.layers.{layer}.{m.group(2)}"


@dataclass
class _Context:
    recipe: Recipe
    method: Method
    checkpoints: list[Checkpoint]
    canon: list[set[str]]
    output_index: int
    dtype: DType | None
    coefficients: CoefficientTable | None
    notes: list[str]
    extra_names: dict[str, str] = field(default_factory=dict)  # merged non-LM tensors: key -> output's name

    def item(self, c_out: str, sl: Slice, offset: int | None, t: float) -> Item:
        """The plan item of output tensor `c_out` (canonical): layer `offset` of slice `sl` (None: outside the layers)."""
        ck, method, recipe = self.checkpoints, self.method, self.recipe
        names = {}
        for s in _feeding(sl) + sl.checked:
            c_in = _canonical_at(c_out, None if offset is None else s.start + offset)
            if c_in not in self.canon[s.k]:
                raise SoupError(f"tensor {c_in} is missing from model {ck[s.k].path}"
                                + (f" ({sl.label}, output tensor {c_out})" if recipe.slices else ""))
            names[s.k] = c_in
        stored = {k: ck[k].stored_name(c) for k, c in names.items()}
        shapes = {k: ck[k].shape(stored[k]) for k in stored}
        ref = self.output_index if self.output_index in shapes else sl.inputs[0].k  # shape and dtype follow the output
        item = Item(
            out_name=self.extra_names.get(c_out) or ck[self.output_index].layout.from_canonical(c_out),
            shape=shapes[ref],
            dtype=self.dtype or ck[ref].dtype(stored[ref]),
            canonical=c_out,
            inputs=[stored[s.k] for s in sl.inputs],
            base=stored[sl.base.k] if sl.base else None,
            sources=[s.k for s in sl.inputs],
            base_from=sl.base.k if sl.base else None,
        )
        _check_shapes(item, c_out, shapes, ck, recipe.vocab_policy, self.output_index, self.notes)
        item.model_params = self._model_params(sl, names, c_out, t, item)
        item.global_params = {}
        scopes = [(f"{sl.label}.parameters", sl.params), ("parameters", recipe.parameters)]
        tabled = self.coefficients is not None and self.coefficients.lookup(c_out) is not None
        for key, default in method.global_params.items():
            v, where = _lookup(key, scopes, c_out, t)
            if key in method.table_states and tabled:  # the table overrides it, as it overrides weights
                v, where = default, "the coefficient table"
            if v is _UNSET:
                if key in getattr(method, "required", ()):
                    table = " or apply a coefficient table" if key in method.table_states else ""
                    raise SoupError(f"method {method.name} needs parameter {key} for tensor {c_out} (set it in "
                                    f"parameters{table}; it has no default, mergekit refuses it too)")
                v, where = default, f"parameters.{key}"
            method.spec(key).check(v, f"{where} (tensor {c_out})", recipe.allow_extrapolation)
            item.global_params[key] = v
        item.read_bytes = sum(ck[s.k].nbytes(stored[s.k]) for s in _feeding(sl))
        return item

    def _model_params(self, sl: Slice, names: dict[int, str], c_out: str, t: float, item: Item) -> dict[str, np.ndarray]:
        method, recipe = self.method, self.recipe
        out: dict[str, np.ndarray] = {}
        for key, default in method.model_params.items():
            vals = []
            for s in sl.inputs:
                scopes = [(s.label.split(" ")[0] + ".parameters", s.params), (f"{sl.label}.parameters", sl.params),
                          ("parameters", recipe.parameters)]
                v, where = _lookup(key, scopes, names[s.k], t)  # a per-model filter matches the input's own name
                if v is _UNSET:
                    if key in getattr(method, "required", ()):
                        raise SoupError(f"{s.label}: missing required parameter {key} of method {method.name} for "
                                        f"tensor {names[s.k]} (no default; mergekit refuses it too)")
                    v, where = default, f"parameters.{key}"
                method.spec(key).check(v, f"{where} ({s.label.split(' ', 1)[-1].strip('()')}, tensor {names[s.k]})",
                                       recipe.allow_extrapolation)
                vals.append(float(v))
            out[key] = np.asarray(vals, dtype=np.float32)
        check = getattr(method, "check_params", None)
        why = check(out, f" (tensor {c_out})") if check is not None else None
        if why is not None:
            raise SoupError(f"method {method.name}: {why}")
        coefficients = self.coefficients
        if coefficients is not None and "weight" in out:
            w = coefficients.lookup(c_out)
            if w is not None:
                if w.ndim == 2:
                    rows = item.common_rows or item.shape[0]
                    if not method.row_weights:
                        raise SoupError(f"coefficient table: method {method.name} does not take per-row weights ({c_out})")
                    if w.shape[1] < rows:
                        raise SoupError(f"coefficient table: {c_out} has {w.shape[1]} row weights, tensor has {rows} rows")
                    w = w[:, :rows]
                out["weight"] = w
        return out


def _slice_note(sl: Slice, recipe: Recipe, checkpoints: list[Checkpoint]) -> str:
    span = f"layer {sl.first_out}" if sl.length == 1 else f"layers {sl.first_out}-{sl.first_out + sl.length - 1}"
    src = "; ".join(f"{checkpoints[s.k].path.name} {s.start}-{s.start + sl.length - 1}" for s in sl.inputs)
    base = f" onto base {checkpoints[sl.base.k].path.name} {sl.base.start}-{sl.base.start + sl.length - 1}" if sl.base else ""
    return f"output {span} ({sl.label}): {recipe.merge_method} of {src}{base}"


# Config keys that count the decoder layers, and per-layer keys that hold layer indices rather than one entry per layer.
LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "num_layers")
LAYER_INDEX_KEYS = ("mlp_only_layers",)
# Config keys that place something by layer position (a threshold or a period), kept as they are, with a note.
LAYER_POSITION_KEYS = ("max_window_layers", "first_k_dense_replace", "decoder_sparse_step", "moe_layer_freq",
                       "interleave_moe_layer_step", "sliding_window_pattern")
NOT_PER_LAYER = {"architectures", "eos_token_id", "bos_token_id", "pad_token_id", "bad_words_ids", "suppress_tokens",
                 "begin_suppress_tokens", "forced_decoder_ids", "image_grid_pinpoints", "vision_feature_layer"}


def _text_config(config: dict) -> dict:
    return config["text_config"] if isinstance(config.get("text_config"), dict) else config


def _n_layers(cfg: dict) -> int | None:
    return next((cfg[k] for k in LAYER_COUNT_KEYS if isinstance(cfg.get(k), int) and not isinstance(cfg.get(k), bool)),
                None)


def _layer_config(out: Checkpoint, layers: list[LayerSource], checkpoints: list[Checkpoint]) -> dict:
    """The output text config's keys that follow the stacked layers: the layer count, and every per-layer list
    (`layer_types`, ...) rebuilt entry by entry from the config of the model each output layer comes from
    (its first input: slerp's base, passthrough's one model)."""
    cfg = _text_config(out.config)
    n_out = _n_layers(cfg)
    if not cfg or n_out is None:
        return {}
    updates: dict = {k: len(layers) for k in LAYER_COUNT_KEYS if k in cfg}
    for key, value in cfg.items():
        if not isinstance(value, list) or key in NOT_PER_LAYER:
            continue
        if key in LAYER_INDEX_KEYS:
            updates[key] = [ls.out for ls in layers
                            if ls.inputs[0][1] in (_text_config(checkpoints[ls.inputs[0][0]].config).get(key) or [])]
            continue
        if len(value) != n_out:
            continue
        rebuilt = []
        for ls in layers:
            k, j = ls.inputs[0]
            src = _text_config(checkpoints[k].config)
            own = src.get(key)
            if not isinstance(own, list) or len(own) != _n_layers(src):
                raise SoupError(f"config key {key} lists one entry per layer in {out.path} but not in "
                                f"{checkpoints[k].path}, whose layer {j} is output layer {ls.out}: cannot say "
                                "what the output's entry is")
            rebuilt.append(own[j])
        updates[key] = rebuilt
    return updates


def _tensor_order(name: str):
    u = unit_of(name)
    rank = {"embed": 0, "final_norm": 2, "lm_head": 3}.get(u.mapping, 1) if u.layer is None else 1
    return (rank, u.layer if u.layer is not None else -1, name)


def _check_shapes(item, c, shapes, checkpoints, policy, output_index, notes) -> None:
    if len(set(shapes.values())) == 1:
        return
    desc = ", ".join(f"{checkpoints[k].path.name}{list(s)}" for k, s in shapes.items())
    rows = {k: s[0] for k, s in shapes.items()}
    same_rest = len({s[1:] for s in shapes.values()}) == 1
    if c not in VOCAB_TENSORS or not same_rest:
        raise SoupError(f"shape mismatch for tensor {c}: {desc}")
    if policy == "error":
        raise SoupError(
            f"vocabulary size differs for {c}: {desc}; set vocab_policy: extend (merge shared rows, copy the "
            "extra rows from the model that has them) or truncate (--vocab-policy)"
        )
    lo, hi = min(rows.values()), max(rows.values())
    item.common_rows = lo
    if policy == "extend":
        src = output_index if rows.get(output_index) == hi else next(k for k, r in rows.items() if r == hi)
        item.extra_from = (src, checkpoints[src].stored_name(c))
        item.shape = (hi, *item.shape[1:])
        notes.append(f"{c}: rows 0..{lo - 1} merged, rows {lo}..{hi - 1} copied from {checkpoints[src].path}")
    else:
        item.shape = (lo, *item.shape[1:])
        notes.append(f"{c}: truncated to the {lo} rows all models share")


def _assign_shards(items: list[Item], shard_size: int) -> int:
    shard, used = 0, 0
    for it in items:
        size = it.nbytes
        if used and used + size > shard_size:
            shard, used = shard + 1, 0
        it.shard = shard
        used += size
    return shard + 1
