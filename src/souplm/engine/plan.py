"""Planning a merge: recipe -> one `Item` per output tensor, with every check done up front.

The plan knows, for every output tensor, which input tensors feed it, with which method and
resolved parameters, its shape, dtype and shard. Building it reads only headers, so a bad input
(missing tensor, shape mismatch, vocabulary mismatch, unknown parameter) is reported before a single
byte is written.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np

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
    inputs: list[str] = field(default_factory=list)  # stored names, one per model (recipe order)
    base: str | None = None  # stored name in the base checkpoint
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
    def base_index(self) -> int | None:
        return len(self.recipe.models) if self.recipe.base_model else None

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


def resolve_param(value, canonical: str, n_layers: int, where: str):
    """A parameter value for one tensor: number, layer gradient (list), or filter list."""
    if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
        for entry in value:
            f = entry.get("filter")
            if f is None or f in canonical:
                if "value" not in entry:
                    raise SoupError(f"{where}: a filter entry has no 'value'")
                return resolve_param(entry["value"], canonical, n_layers, where)
        raise SoupError(f"{where}: no filter entry matches tensor {canonical} (add one without 'filter')")
    if isinstance(value, list):
        if not value or not all(isinstance(v, (int, float)) for v in value):
            raise SoupError(f"{where}: a gradient must be a non-empty list of numbers")
        if len(value) == 1:
            return float(value[0])
        unit = unit_of(canonical)
        if unit.layer is not None:
            pos = unit.layer / max(n_layers - 1, 1)
        else:
            pos = 0.0 if unit.mapping == "embed" else 1.0
        return float(np.interp(pos, np.linspace(0, 1, len(value)), value))
    return value


def build_plan(recipe: Recipe, checkpoints: list[Checkpoint], coefficients: CoefficientTable | None = None) -> Plan:
    method = recipe.method
    n = len(recipe.models)
    base_index = n if recipe.base_model else None
    notes: list[str] = []
    if coefficients is not None:  # matched to the recipe's models by identity, columns in recipe order
        local = [str(checkpoints[i].path) if "+" not in s.model else s.model for i, s in enumerate(recipe.models)]
        coefficients, note = coefficients.aligned_to(local)
        if note:
            notes.append(note)

    # Which model the output is: named, else the first multimodal one, else the base, else model 0.
    paths = [s.model for s in recipe.models] + ([recipe.base_model] if base_index is not None else [])
    if recipe.mapping is not None:
        output_index = 0  # the mapping's target: its layout, config, vision tower and projector
    elif recipe.output_model is not None:
        output_index = paths.index(recipe.output_model)
    else:
        mm = [k for k, c in enumerate(checkpoints) if c.layout.multimodal]
        output_index = mm[0] if mm else (base_index if base_index is not None else 0)
    out = checkpoints[output_index]
    feeding = list(range(n)) + ([base_index] if base_index is not None else [])

    canon = [set(checkpoints[k].canonical_names()) for k in feeding]
    names = sorted(set().union(*canon), key=_tensor_order)
    if out.tied and LM_HEAD in names:
        names.remove(LM_HEAD)
        untied = [str(checkpoints[k].path) for k in feeding if not checkpoints[k].tied]
        if untied:
            notes.append(f"output ties lm_head to the embedding; the separate lm_head of {', '.join(untied)} is not used")
    n_layers = layer_count(names)
    dtype = DTYPES[recipe.dtype] if recipe.dtype else None

    items: list[Item] = []
    for c in names:
        for k, have in zip(feeding, canon):
            if c not in have:
                raise SoupError(f"tensor {c} is missing from model {checkpoints[k].path}")
        stored = {k: checkpoints[k].stored_name(c) for k in feeding}
        shapes = {k: checkpoints[k].shape(stored[k]) for k in feeding}
        ref = output_index if output_index in shapes else feeding[0]  # shape and dtype follow the output
        item = Item(
            out_name=out.layout.from_canonical(c),
            shape=shapes[ref],
            dtype=dtype or checkpoints[ref].dtype(stored[ref]),
            canonical=c,
            inputs=[stored[k] for k in range(n)],
            base=stored[base_index] if base_index is not None and method.needs_base else None,
        )
        _check_shapes(item, c, shapes, checkpoints, recipe.vocab_policy, output_index, notes)
        item.model_params = _model_params(recipe, method, c, n_layers, coefficients, item)
        item.global_params = {
            k: resolve_param(recipe.parameters.get(k, d), c, n_layers, f"parameters.{k}")
            for k, d in method.global_params.items()
        }
        for k, v in item.global_params.items():  # the value this tensor gets, against the declared spec
            method.spec(k).check(v, f"parameters.{k} (tensor {c})", recipe.allow_extrapolation)
        # A base the method does not use (linear, uniform, slerp) shapes the checks above but is not read.
        used = [k for k in feeding if k != base_index or item.base is not None]
        item.read_bytes = sum(checkpoints[k].nbytes(stored[k]) for k in used)
        items.append(item)

    # Tensors outside the language model (vision tower, projector): copied from the output model.
    for name in out.extra_names():
        items.append(Item(out_name=name, shape=out.shape(name), dtype=out.dtype(name), copy_from=(output_index, name),
                          read_bytes=out.nbytes(name)))
    for k, c in enumerate(checkpoints):
        if k != output_index and c.extra_names():
            notes.append(f"{len(c.extra_names())} non-LM tensors of {c.path} (e.g. {c.extra_names()[0]}) are not in the output; "
                         "name it as output_model to keep them")

    n_shards = _assign_shards(items, recipe.shard_size)
    return Plan(recipe, method, checkpoints, output_index, items, n_shards, notes, coefficients)


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


def _model_params(recipe, method, c, n_layers, coefficients, item) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    for key, default in method.model_params.items():
        vals = []
        for i, spec in enumerate(recipe.models):
            raw = spec.parameters.get(key, recipe.parameters.get(key, default))
            v = resolve_param(raw, c, n_layers, f"models[{i}].parameters.{key}")
            method.spec(key).check(v, f"models[{i}].parameters.{key} (model {spec.model}, tensor {c})",
                                   recipe.allow_extrapolation)
            vals.append(float(v))
        out[key] = np.asarray(vals, dtype=np.float32)
    if coefficients is not None and "weight" in out:
        w = coefficients.lookup(c)
        if w is not None:
            if w.ndim == 2:
                rows = item.common_rows or item.shape[0]
                if not method.row_weights:
                    raise SoupError(f"coefficient table: method {method.name} does not take per-row weights ({c})")
                if w.shape[1] < rows:
                    raise SoupError(f"coefficient table: {c} has {w.shape[1]} row weights, tensor has {rows} rows")
                w = w[:, :rows]
            out["weight"] = w
    return out


def _assign_shards(items: list[Item], shard_size: int) -> int:
    shard, used = 0, 0
    for it in items:
        size = it.nbytes
        if used and used + size > shard_size:
            shard, used = shard + 1, 0
        it.shard = shard
        used += size
    return shard + 1
