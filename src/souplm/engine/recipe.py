"""Recipes: what to merge, how, and with which coefficients.

souplm's recipe format is a superset of mergekit's YAML, so a mergekit user's recipe runs unchanged:

    merge_method: ties            # or `method:`
    base_model: path/to/base
    models:
      - model: path/to/A
        parameters: {weight: 0.5, density: 0.5}
      - model: path/to/B
        parameters: {weight: 0.5, density: 0.5}
    parameters: {normalize: true}  # global defaults; a model's own parameters override them
    dtype: bfloat16

souplm adds: `coefficients` (a coefficient table path), `vocab_policy` (error | extend | truncate),
`output_model` (whose config, tokenizer and layout the output takes), `allow_pickle`, `seed`,
`shard_size`, `vision_policy` (merge | copy: the vision tower and projector merged like the LM when
every model has them with one shape, or copied from `output_model`), and `mapping` (a spec file or
built-in name, `souplm.arch.mapping`): a merge of two models of different architectures, `models[0]` the target (its layout, vision tower and projector are
kept) and `models[1]` the source, read through the spec under the target's names. A parameter value
may be a number, a list of numbers (interpolated across layers, as in mergekit), or a list of
`{filter: substring, value: ...}` entries (the first whose filter occurs in the tensor name wins; an
entry without `filter` is the fallback).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from ..errors import SoupError, short_repr
from ..io.sizes import DEFAULT_SHARD_SIZE, parse_size
from ..methods import get_method
from ..yamlfile import read_mapping
from .tokenizer import TokenizerSpec, absolute_fields, check_recipe, resolve_paths

# mergekit keys we read but that change nothing for souplm (documented, not silently ignored).
MERGEKIT_NOOP_KEYS = {"int8_mask"}
# Methods whose base_model mergekit also accepts among `models` (it is then not a model of its own).
BASE_LISTED_ONCE = {"nuslerp", "multislerp", "nearswap", "arcee_fusion", "ram", "ramplus_tl"}
BASE_LISTED_ONCE |= {"breadcrumbs", "breadcrumbs_ties", "della", "della_linear", "sce", "model_stock"}
MERGEKIT_UNSUPPORTED = {
    "modules": "modular recipes are not supported",
}


class ModelSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    model: str
    parameters: dict[str, Any] = Field(default_factory=dict)


class SourceSpec(BaseModel):
    """One input of a slice (mergekit's `sources:` entry): layers [start, end) of `model`, end exclusive."""

    model_config = ConfigDict(extra="forbid", strict=True)
    model: str
    layer_range: list[int]
    parameters: dict[str, Any] = Field(default_factory=dict)

    @field_validator("layer_range")
    @classmethod
    def _range(cls, v):
        if len(v) != 2 or v[0] < 0 or v[1] <= v[0]:
            raise ValueError("layer_range is [start, end): two whole numbers, 0 <= start < end")
        return v


class SliceSpec(BaseModel):
    """One output slice (mergekit's `slices:` entry): the same number of layers from each source, merged."""

    model_config = ConfigDict(extra="forbid", strict=True)
    sources: list[SourceSpec]
    base_model: str | None = None
    parameters: dict[str, Any] = Field(default_factory=dict)
    residual_weight: float | None = None  # declared by mergekit 0.1.5, applied nowhere there: a plan note

    @field_validator("sources")
    @classmethod
    def _some_sources(cls, v):
        if not v:
            raise ValueError("a slice needs at least one source")
        return v


class Recipe(BaseModel):
    # strict: a YAML string is never read as a boolean or a number (`allow_pickle: "false"` is refused)
    model_config = ConfigDict(extra="forbid", populate_by_name=True, strict=True)

    merge_method: str = Field("linear", alias="method")
    models: list[ModelSpec]  # with `slices`: each model the slices read, once, in order (no parameters)
    slices: list[SliceSpec] | None = None  # layer ranges stacked in order (mergekit's slices; engine/plan.py)
    base_model: str | None = None
    parameters: dict[str, Any] = Field(default_factory=dict)
    dtype: Literal["float32", "float16", "bfloat16"] | None = None  # inputs read as, computed in, written as
    out_dtype: Literal["float32", "float16", "bfloat16"] | None = None  # written as (mergekit's key)
    # souplm: what the task-vector methods compute in; unset, mergekit's rule (dtype, else the inputs' dtype)
    compute_dtype: Literal["float32", "float16", "bfloat16"] | None = None
    coefficients: str | None = None
    vocab_policy: Literal["error", "extend", "truncate"] = "error"
    output_model: str | None = None
    allow_pickle: bool = False
    seed: int = 0
    shard_size: int = Field(DEFAULT_SHARD_SIZE, gt=0)  # bytes; "5GB", "2GiB", mergekit's "5B" (io/sizes.py)
    mapping: str | dict[str, Any] | None = None  # spec file, built-in name, or the spec inline
    # Non-LM tensors (vision tower, projector): merged like the LM where all models have them with one
    # shape, or all copied from output_model (souplm/arch/extras.py).
    vision_policy: Literal["merge", "copy"] = "merge"
    allow_extrapolation: bool = False  # let t and interpolation weights leave their documented range
    tokenizer_source: str | None = None  # mergekit's: base | union | a model path (engine/tokenizer.py)
    tokenizer: TokenizerSpec | None = None  # mergekit's block: source, tokens, pad_to_multiple_of
    chat_template: str | None = None  # a template name (chatml, llama3, ...), a Jinja template, or auto

    @field_validator("shard_size", mode="before")
    @classmethod
    def _human_size(cls, v):
        if isinstance(v, str):
            try:
                return parse_size(v, "shard_size")
            except SoupError as e:
                raise ValueError(str(e).removeprefix("shard_size: ")) from None
        return v

    @field_validator("models")
    @classmethod
    def _some_models(cls, v):
        if not v:
            raise ValueError("a recipe needs at least one model")
        return v

    # -- construction ------------------------------------------------------------------------
    @classmethod
    def load(cls, source: str | os.PathLike | dict) -> Recipe:
        if isinstance(source, dict):
            data, where = dict(source), "recipe"
        else:
            path = Path(source)
            data, where = read_mapping(path, "recipe"), str(path)
            data = _resolve_relative_paths(data, path.parent)
        data = _from_mergekit(data, where)
        return cls.validated(data, where)

    @classmethod
    def from_models(
        cls,
        paths: list[str | os.PathLike],
        method: str = "linear",
        weights: list[float] | None = None,
        base_model: str | os.PathLike | None = None,
        **fields: Any,
    ) -> Recipe:
        """Build a recipe in code; `fields` are global parameters or other recipe keys.

        This is souplm's quick form (the CLI's `--model ... --method` uses it too): a `weight` the method
        requires (mergekit requires it of every task-vector method, and of a recipe in its format) is 1.0
        per model unless `weights` or `weight` is given, and slerp's `t` (mergekit requires it) is the second
        model's share of `weights`, 0.5 without them."""
        recipe_keys = set(cls.model_fields) - {"models", "merge_method", "base_model", "parameters"}
        top = {k: v for k, v in fields.items() if k in recipe_keys}
        params = {k: v for k, v in fields.items() if k not in recipe_keys}
        if weights is None and "weight" not in params and "weight" in get_method(method).required:
            params["weight"] = 1.0
        if method == "slerp" and "t" not in params:  # the quick form's t: the second model's share of the weights
            total = None if weights is None else float(sum(weights))
            if total == 0.0:
                raise SoupError(f"slerp weights {list(weights)} sum to 0: no share of the second model to take t from")
            params["t"] = 0.5 if total is None else float(weights[1]) / total
        specs = [
            {"model": str(p), "parameters": {} if weights is None else {"weight": float(w)}}
            for p, w in zip(paths, weights or [None] * len(paths))
        ]
        data = {"merge_method": method, "models": specs, "base_model": None if base_model is None else str(base_model),
                "parameters": params, **top}
        return cls.validated(data, "recipe")

    @classmethod
    def validated(cls, data: dict, where: str = "recipe") -> Recipe:
        """model_validate + check, pydantic's complaint as one `where: field: message` SoupError."""
        try:
            recipe = cls.model_validate(data)
        except ValidationError as e:
            err = e.errors()[0]
            loc = ".".join(str(x) for x in err["loc"]) or "recipe"
            raise SoupError(f"{where}: {loc}: {err['msg']} (got {short_repr(err.get('input'))})") from None
        recipe.check()
        return recipe

    @classmethod
    def vanilla(cls, model_a, model_b, alpha: float, **fields: Any) -> Recipe:
        """The SoupLM paper's vanilla soup: alpha * A + (1 - alpha) * B."""
        return cls.from_models([model_a, model_b], "linear", [alpha, 1.0 - alpha], **fields)

    # -- validation --------------------------------------------------------------------------
    @property
    def method(self):
        return get_method(self.merge_method)

    def check(self) -> None:
        """The method's contract and parameter names, before any tensor is touched."""
        m = self.method
        if self.slices:
            self._check_slices()
        else:
            m.check(len(self.models), self.base_model is not None)
        known = set(m.model_params) | set(m.global_params)
        for key in self.parameters:
            if key not in known and key not in MERGEKIT_NOOP_KEYS:
                raise SoupError(f"parameters.{key}: unknown parameter for method {m.name} (known: {', '.join(sorted(known)) or 'none'})")
        for i, spec in enumerate(self.models):
            for key in spec.parameters:
                if key not in m.model_params:
                    raise SoupError(
                        f"models[{i}].parameters.{key}: not a per-model parameter of {m.name} "
                        f"(per-model: {', '.join(sorted(m.model_params)) or 'none'})"
                    )
        self.check_values()  # a value written wrong is named before a value left out
        # no default: set globally, or for every model (mergekit's rule); what a coefficient table may state
        # instead is checked per tensor by the plan, which knows the table
        for key in () if self.slices else (k for k in m.required if k not in m.table_states):
            per_model = key in m.model_params and all(key in s.parameters for s in self.models)
            if key not in self.parameters and not per_model:
                where = "parameters or every model's parameters" if key in m.model_params else "parameters"
                raise SoupError(f"method {m.name} needs parameter {key} (set it in {where})")
        if self.output_model is not None and self.output_model not in self.all_paths():
            raise SoupError(f"output_model {self.output_model} is not one of the recipe's models")
        if self.mapping is not None:
            self._check_mapping()
        check_recipe(self)

    def check_values(self) -> None:
        """Every parameter value, as written (a number, a layer gradient's numbers, each filter entry's
        value), against its method's declared type and range (`souplm.methods.registry.PARAM_SPECS`)."""
        m = self.method
        for key in m.global_params:
            if key in self.parameters:
                _walk(self.parameters[key], m.spec(key), f"parameters.{key}", self.allow_extrapolation)
        for i, spec in enumerate(self.models):
            for key in m.model_params:
                if key in spec.parameters:
                    where = f"models[{i}].parameters.{key} (model {spec.model})"
                    _walk(spec.parameters[key], m.spec(key), where, self.allow_extrapolation)
                elif key in self.parameters:
                    _walk(self.parameters[key], m.spec(key), f"parameters.{key}", self.allow_extrapolation)
        for j, sl in enumerate(self.slices or []):
            for key, value in sl.parameters.items():
                _walk(value, m.spec(key), f"slices[{j}].parameters.{key}", self.allow_extrapolation)
            for i, src in enumerate(sl.sources):
                for key, value in src.parameters.items():
                    where = f"slices[{j}].sources[{i}].parameters.{key} (model {src.model})"
                    _walk(value, m.spec(key), where, self.allow_extrapolation)

    def _check_slices(self) -> None:
        """Each slice against the method's contract, as mergekit checks it: a method that reads a base finds
        it among the slice's sources (with its layer range), the sources of a slice are different models
        spanning the same number of layers, and each parameter is one the method takes (and, without a
        default, is set for every source that needs it). Layer ranges against each model's layer count are
        checked on the plan, from the checkpoints' headers."""
        m = self.method
        if self.mapping is not None:
            raise SoupError("a mapping merges a models: recipe, not slices")
        reads_base = m.needs_base or getattr(m, "optional_base", False) or self.merge_method == "slerp"
        known = set(m.model_params) | set(m.global_params)
        for j, sl in enumerate(self.slices or []):
            where = f"slices[{j}]"
            models = [s.model for s in sl.sources]
            dup = next((p for p in models if models.count(p) > 1), None)
            if dup is not None:
                raise SoupError(f"{where}: model {dup} is a source twice (the sources of one slice are different "
                                "models; stack one model's ranges in separate slices)")
            if len({s.layer_range[1] - s.layer_range[0] for s in sl.sources}) > 1:
                ranges = ", ".join(f"{s.model} {s.layer_range}" for s in sl.sources)
                raise SoupError(f"{where}: every source of a slice spans the same number of layers (got {ranges})")
            base = sl.base_model or self.base_model
            has_base = reads_base and base is not None and base in models
            if reads_base and base is not None and not has_base and (m.needs_base or self.merge_method == "slerp"):
                raise SoupError(f"{where}: base_model {base} is not one of the slice's sources (a slice reads its base's "
                                "layers too: list it among the sources with its layer_range, as mergekit requires)")
            if self.merge_method == "slerp" and not has_base:
                raise SoupError(f"{where}: slerp needs a base_model among the slice's sources (t = 0 is the base)")
            try:
                if self.merge_method == "slerp":
                    m.check(len(models), False)
                else:
                    m.check(len(models) - int(has_base), has_base)
            except SoupError as e:
                raise SoupError(f"{where}: {e}") from None
            for key in sl.parameters:
                if key not in known and key not in MERGEKIT_NOOP_KEYS:
                    raise SoupError(f"{where}.parameters.{key}: unknown parameter for method {m.name} "
                                    f"(known: {', '.join(sorted(known)) or 'none'})")
            for i, src in enumerate(sl.sources):
                for key in src.parameters:
                    if key not in m.model_params:
                        raise SoupError(f"{where}.sources[{i}].parameters.{key}: not a per-model parameter of "
                                        f"{m.name} (per-model: {', '.join(sorted(m.model_params)) or 'none'})")
            for key in getattr(m, "required", ()):
                scopes = (sl.parameters, self.parameters)
                if key in m.model_params:
                    for i, src in enumerate(sl.sources):
                        if (not has_base or src.model != base) and not any(key in p for p in (src.parameters, *scopes)):
                            raise SoupError(f"{where}.sources[{i}] (model {src.model}): method {m.name} needs parameter "
                                            f"{key} (set it for the source, the slice or the recipe)")
                elif not any(key in p for p in scopes):
                    raise SoupError(f"{where}: method {m.name} needs parameter {key} (set it in the slice's or the "
                                    "recipe's parameters)")

    def _check_mapping(self) -> None:
        from ..arch.mapping import load_mapping

        if len(self.models) != 2:
            raise SoupError(f"mapping {self.mapping}: a mapped merge takes two models (models[0] the target, "
                            f"models[1] the source), got {len(self.models)}")
        if self.output_model is not None and self.output_model != self.models[0].model:
            raise SoupError("with a mapping the output is the target, models[0]; drop output_model")
        if self.base_model is not None and self.base_model in (s.model for s in self.models):
            raise SoupError("with a mapping the base model must be a third model (read through the mapping)")
        load_mapping(self.mapping)  # a malformed spec fails here, before any tensor is read

    def all_paths(self) -> list[str]:
        paths = [s.model for s in self.models]
        return paths + ([self.base_model] if self.base_model and self.base_model not in paths else [])

    def for_output(self, coefficients: str | None = None, mapping: str | None = None) -> Recipe:
        """The recipe as saved beside a merged model: every local path absolute (so it runs from any
        directory), and the coefficient table and mapping spec that were actually applied named by the
        copies saved beside it (paths relative to the saved recipe's folder, resolved against it on load)."""
        def absolute(p: str | None) -> str | None:
            if p is None or os.path.isabs(p):
                return p
            if "+" in p and not Path(p).exists():  # BASE+ADAPTER
                return "+".join(absolute(part) or part for part in p.split("+"))
            return os.path.abspath(p) if Path(p).exists() else p  # a Hub id stays an id

        update: dict[str, Any] = {
            "models": [s.model_copy(update={"model": absolute(s.model)}) for s in self.models],
            "slices": None if self.slices is None else [
                sl.model_copy(update={"base_model": absolute(sl.base_model),
                                      "sources": [s.model_copy(update={"model": absolute(s.model)}) for s in sl.sources]})
                for sl in self.slices],
            "base_model": absolute(self.base_model),
            "output_model": absolute(self.output_model),
            "coefficients": coefficients,
        }
        if mapping is not None:
            update["mapping"] = mapping
        update.update(absolute_fields(self, absolute))
        return self.model_copy(update=update)

    def to_yaml(self) -> str:
        data = self.model_dump(by_alias=False, exclude_defaults=True)
        if self.slices:
            data.pop("models", None)  # each model the slices read: derived again on load
        data["merge_method"] = self.merge_method
        return yaml.safe_dump(data, sort_keys=False)


def _walk(value: Any, spec, where: str, extrapolate: bool) -> None:
    """Check one raw parameter value: a scalar, a gradient (a list of scalars: numbers interpolate, booleans
    step), or filter entries (`{filter: substring, value: ...}`, one alone or a list; no filter, or `"*"`,
    matches every tensor)."""
    if isinstance(value, dict):
        value = [value]
    if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
        for j, entry in enumerate(value):
            unknown = sorted(set(entry) - {"filter", "value"})
            if unknown:
                raise SoupError(f"{where}[{j}]: a filter entry takes filter and value, not {', '.join(map(str, unknown))}")
            if "value" not in entry:
                raise SoupError(f"{where}[{j}]: a filter entry has no 'value'")
            if entry.get("filter") is not None and not isinstance(entry["filter"], str):
                raise SoupError(f"{where}[{j}].filter must be a string (a substring of tensor names, or \"*\")")
            _walk(entry["value"], spec, f"{where}[{j}].value", extrapolate)
        return
    if isinstance(value, list):
        if not value:
            raise SoupError(f"{where}: a gradient must be a non-empty list of numbers")
        if any(isinstance(v, (dict, list)) for v in value):
            raise SoupError(f"{where}: a list is either a gradient (numbers) or filter entries, not both")
        for j, v in enumerate(value):
            spec.check(v, f"{where}[{j}]", extrapolate)
        return
    spec.check(value, where, extrapolate)


def _resolve_relative_paths(data: dict, root: Path) -> dict:
    """Model paths in a recipe file are relative to the file, when such a path exists."""

    from ..io.hub import _HUB_ID

    root = Path(os.path.abspath(root))

    def fix(p, builtin_names: bool = False):
        # Never the working directory: a relative path is the recipe folder's, whatever the cwd holds.
        if isinstance(p, dict) and "base" in p:  # {base, adapters}: each path relative to the file
            return dict(p, base=fix(p["base"]), adapters=[fix(a) for a in p.get("adapters") or []])
        if not isinstance(p, str) or os.path.isabs(p) or p.startswith("~"):
            return p
        if (root / p).exists():
            return str(root / p)
        if "+" in p:
            return "+".join(fix(part) for part in p.split("+"))  # BASE+ADAPTER (souplm.lora)
        if _HUB_ID.match(p) and ".." not in p and not Path(p).exists():
            return p  # a Hub id (org/name): no such local path in either place
        if builtin_names and not p.endswith((".yaml", ".yml", ".json")) and "/" not in p:
            return p  # a built-in mapping name
        return str(root / p)  # missing: the error names the path under the recipe's folder

    data = dict(data)
    for key in ("base_model", "coefficients", "output_model"):
        if key in data:
            data[key] = fix(data[key])
    resolve_paths(data, fix)
    if "mapping" in data:
        data["mapping"] = fix(data["mapping"], builtin_names=True)
    if isinstance(data.get("models"), list):
        data["models"] = [dict(m, model=fix(m.get("model"))) if isinstance(m, dict) else m for m in data["models"]]
    if isinstance(data.get("slices"), list):
        data["slices"] = [dict(sl, **({"base_model": fix(sl["base_model"])} if "base_model" in sl else {}),
                               sources=[dict(s, model=fix(s.get("model"))) if isinstance(s, dict) else s
                                        for s in sl.get("sources") or []] if isinstance(sl.get("sources"), list)
                               else sl.get("sources"))
                          if isinstance(sl, dict) else sl for sl in data["slices"]]
    return data


def _from_mergekit(data: dict, where: str) -> dict:
    """Translate the mergekit-only shapes of a recipe; refuse, by name, what souplm cannot do."""
    data = dict(data)
    for key, why in MERGEKIT_UNSUPPORTED.items():
        if key in data:
            raise SoupError(f"{where}: mergekit key {key!r} is not supported by souplm ({why})")
    params = data.get("parameters") or {}
    if isinstance(params, dict):
        data["parameters"] = {k: v for k, v in params.items() if k not in MERGEKIT_NOOP_KEYS}
    if "slices" in data:
        return _from_slices(data, where)
    method = data.get("merge_method", data.get("method"))
    models = data.get("models") or []
    # mergekit lists the base among `models` for some methods; souplm keeps it as base only.
    base = data.get("base_model")
    if method == "slerp" and base:
        # mergekit's slerp: t=0 is base_model, t=1 the other model
        others = [m for m in models if _model_path(m) != base]
        data["models"] = [{"model": base}] + others
        data.pop("base_model")
    elif base and method == "karcher":  # mergekit's karcher: the base is one more input (and gives the config)
        if not any(_model_path(m) == base for m in models):
            data["models"] = [*models, {"model": base}]
        data.setdefault("output_model", base)
        data.pop("base_model")
    elif base and method == "passthrough" and any(_model_path(m) == base for m in models):
        data.pop("base_model")  # mergekit's one input is then the base itself
    elif base and method in {"task_arithmetic", "ties", "dare_linear", "dare_ties", "wise_ft", *BASE_LISTED_ONCE}:
        data["models"] = [m for m in models if _model_path(m) != base]
    data["models"] = [{"model": m} if isinstance(m, str) else m for m in data.get("models") or []]
    data["models"] = [dict(m, model=_adapted(m["model"], where)) if isinstance(m, dict) and isinstance(m.get("model"), dict)
                      else m for m in data["models"]]
    return data


def _adapted(spec: dict, where: str) -> str:
    """souplm's `model: {base: B, adapters: [A1, ...]}` as mergekit's `B+A1+...` (souplm.lora)."""
    from ..lora.checkpoint import join_spec

    adapters = spec.get("adapters") or []
    if set(spec) - {"base", "adapters"} or not isinstance(spec.get("base"), str) or not isinstance(adapters, list):
        raise SoupError(f"{where}: a model given as a mapping takes base: PATH and adapters: [PATH, ...]")
    return join_spec(spec["base"], adapters)


def _model_path(m) -> str | None:
    return m if isinstance(m, str) else (m.get("model") if isinstance(m, dict) else None)


def _from_slices(data: dict, where: str) -> dict:
    """mergekit's `slices:` kept as slices (the plan stacks them); `models` becomes each model they read, once."""
    if data.get("models"):
        raise SoupError(f"{where}: give either models or slices, not both (mergekit takes exactly one)")
    slices = data["slices"]
    if not isinstance(slices, list) or not slices or not all(isinstance(s, dict) for s in slices):
        raise SoupError(f"{where}: slices must be a non-empty list of slices, each with sources")
    data["slices"], distinct = [], []
    for j, sl in enumerate(slices):
        sources = sl.get("sources")
        if not isinstance(sources, list) or not all(isinstance(s, dict) for s in sources):
            raise SoupError(f"{where}: slices[{j}].sources must be a list of sources (model, layer_range)")
        sources = [dict(s, model=_adapted(s["model"], where)) if isinstance(s.get("model"), dict) else s
                   for s in sources]
        data["slices"].append(dict(sl, sources=sources))
        for s in sources:
            if isinstance(s.get("model"), str) and s["model"] not in distinct:
                distinct.append(s["model"])
    data["models"] = [{"model": p} for p in distinct]
    return data
