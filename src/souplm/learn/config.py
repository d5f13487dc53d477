"""The `souplm learn` config: one YAML file, validated up front with messages that name the bad key.

    models: [path/to/vicuna, path/to/llava]      # 2+ models of one architecture
    granularity: layer_mapping                   # model | layer | mapping | layer_mapping | tensor | row
    activation: softmax                          # sigmoid | linear | clamp (2 models) | softmax
    regularization: {kind: l1, lambda: 0.0001}   # none | l1 | l2: lambda * ||raw - raw_init||
    optimizer: {name: adam, lr: 0.1}             # adam | adamw | sgd (momentum, weight_decay, betas)
    training: {epochs: 3, batch_size: 4, grad_accum: 1, max_length: 1024}
    meta_sets:
      - {path: data/llava665k.jsonl, samples: 50}
      - {path: data/mmlu.jsonl, samples: 50, format: choice}
    mix: {total: 100, ratio: [5, 95]}           # optional: overrides each set's `samples`
    fixed: {embed: [0.5, 0.5]}                   # optional: units held at given weights, not learned
    output: runs/soup                            # coefficients.json, merged/, log.jsonl, checkpoint.pt
    seed: 0

Defaults are the SoupLM paper's best setting (3 epochs, 50 samples per meta set, lr 0.1, softmax).
Relative paths are relative to the config file's folder.
"""

from __future__ import annotations

import difflib
import math
import os
import typing
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ..errors import SoupError, short_repr
from ..yamlfile import read_mapping
from .activations import ACTIVATIONS
from .granularity import GRANULARITIES


class _Strict(BaseModel):
    # strict: `merge: "false"` or `lr: "0.1"` is refused, never coerced; no NaN or Inf anywhere
    model_config = ConfigDict(extra="forbid", populate_by_name=True, strict=True, allow_inf_nan=False)


class RegularizationConfig(_Strict):
    kind: Literal["none", "l1", "l2"] = "none"
    lambda_: float = Field(0.0, alias="lambda", ge=0.0)


class OptimizerConfig(_Strict):
    name: Literal["adam", "adamw", "sgd"] = "adam"
    lr: float = Field(0.1, gt=0.0)
    weight_decay: float = Field(0.0, ge=0.0)
    momentum: float = Field(0.0, ge=0.0, lt=1.0)  # sgd only
    betas: list[float] = Field(default_factory=lambda: [0.9, 0.999], min_length=2, max_length=2)  # adam / adamw


class TrainingConfig(_Strict):
    epochs: int = Field(3, ge=1)
    batch_size: int = Field(4, ge=1)
    grad_accum: int = Field(1, ge=1)
    max_length: int = Field(1024, ge=2)
    log_every: int = Field(1, ge=1)
    evaluate: bool = True  # dev loss of the initial and the final alphas (one extra pass each)


class MetaSetConfig(_Strict):
    path: str
    format: Literal["auto", "text", "chat", "choice", "image_chat"] = "auto"
    samples: int | Literal["all"] = 50
    image_root: str | None = None
    choice_style: Literal["letter", "text"] = "letter"

    @field_validator("samples")
    @classmethod
    def _positive(cls, v):
        if isinstance(v, int) and v < 1:
            raise ValueError("must be at least 1 (or `all`)")
        return v


class MixConfig(_Strict):
    total: int = Field(ge=1)
    ratio: list[float] = Field(min_length=1)

    @field_validator("ratio")
    @classmethod
    def _non_negative(cls, v):
        if any(r < 0 for r in v) or sum(v) <= 0:
            raise ValueError("ratios must be >= 0 with a positive sum")
        return v


class LearnConfig(_Strict):
    models: list[str] = Field(min_length=2)
    granularity: Literal[GRANULARITIES] = "layer_mapping"  # type: ignore[valid-type]
    activation: Literal[tuple(ACTIVATIONS)] = "softmax"  # type: ignore[valid-type]
    regularization: RegularizationConfig = Field(default_factory=RegularizationConfig)
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig)
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    meta_sets: list[MetaSetConfig] = Field(min_length=1)
    mix: MixConfig | None = None
    fixed: dict[str, list[float]] = Field(default_factory=dict)
    output: str = "souplm-learn"
    output_model: str | None = None  # whose architecture the soup has; default: the multimodal one, else models[0]
    tokenizer: str | None = None  # default: the output model's
    vocab_policy: Literal["error", "extend"] = "error"
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    device: str = "auto"
    seed: int = 0
    merge: bool = True  # also write the merged model (output/merged) through the engine
    allow_pickle: bool = False
    # models given as BASE+ADAPTER: keep the adapters' factors (low_rank) or soup the merged weights (dense);
    # both give the same alphas (learn/lora_soup.py), so it is not part of `settings()`
    adapter_soup: Literal["low_rank", "dense"] = "low_rank"
    base: str | None = None  # with `adapters`: the soup of BASE+ADAPTER_i (instead of `models`)
    adapters: list[str] | None = None

    @model_validator(mode="before")
    @classmethod
    def _adapters_form(cls, data):
        if isinstance(data, dict) and (data.get("adapters") is not None or data.get("base") is not None):
            if "models" in data:
                raise ValueError("give either `models` or `base` with `adapters`, not both")
            base, adapters = data.get("base"), data.get("adapters")
            if not isinstance(base, str) or not isinstance(adapters, list) or len(adapters) < 2 \
                    or not all(isinstance(a, str) for a in adapters):
                raise ValueError("`base` (a model folder) and `adapters` (a list of 2+ adapter folders) go together")
            data = {k: v for k, v in data.items() if k not in ("base", "adapters")}
            data["models"] = [f"{base}+{a}" for a in adapters]
        return data

    @model_validator(mode="after")
    def _consistent(self):
        if self.activation != "softmax" and len(self.models) != 2:
            raise ValueError(
                f"activation: {self.activation!r} mixes exactly 2 models (it learns alpha_1 and sets "
                f"alpha_2 = 1 - alpha_1), but {len(self.models)} models are given; use softmax"
            )
        if self.mix is not None and len(self.mix.ratio) != len(self.meta_sets):
            raise ValueError(
                f"mix.ratio: has {len(self.mix.ratio)} entries for {len(self.meta_sets)} meta sets"
            )
        if self.output_model is not None and self.output_model not in self.models:
            raise ValueError(f"output_model: {self.output_model!r} is not one of `models`")
        if self.regularization.kind != "none" and self.regularization.lambda_ == 0.0:
            raise ValueError("regularization.lambda: must be > 0 when a regularization kind is set")
        for key, value in self.fixed.items():
            if len(value) != len(self.models):
                raise ValueError(f"fixed.{key}: needs one weight per model ({len(self.models)})")
            bad = [v for v in value if not math.isfinite(v)]
            if bad:
                raise ValueError(f"fixed.{key}: weights must be finite numbers, got {short_repr(value)}")
        return self

    def settings(self) -> dict[str, Any]:
        """What the result depends on, as plain data (table meta, checkpoint fingerprint)."""
        return self.model_dump(mode="json", by_alias=True,
                               exclude={"output", "merge", "device", "adapter_soup", "base", "adapters"})


_PATH_KEYS = ("models", "output", "output_model", "tokenizer", "base", "adapters")


def _resolve_paths(data: dict, root: Path) -> dict:
    """Relative paths in a config file are relative to the file's folder (each part of BASE+ADAPTER too)."""
    def fix(p):
        if isinstance(p, str) and "+" in p and not (root / p).exists():
            return "+".join(fix(part) for part in p.split("+"))
        return str(root / p) if isinstance(p, str) and not os.path.isabs(p) else p

    data = dict(data)
    for key in _PATH_KEYS:
        if isinstance(data.get(key), list):
            data[key] = [fix(p) for p in data[key]]
        elif key in data:
            data[key] = fix(data[key])
    if isinstance(data.get("meta_sets"), list):
        data["meta_sets"] = [
            {**m, **{k: fix(m[k]) for k in ("path", "image_root") if k in m}} if isinstance(m, dict) else m
            for m in data["meta_sets"]
        ]
    return data


def load_config(source: str | os.PathLike | dict | LearnConfig, **overrides: Any) -> LearnConfig:
    """A validated config from a YAML path, a dict or a config; `overrides` replace top-level keys."""
    if isinstance(source, LearnConfig):
        data, where = source.model_dump(by_alias=True), "config"
    elif isinstance(source, dict):
        data, where = dict(source), "config"
    else:
        path = Path(source)
        data = read_mapping(path, "learn config")
        data, where = _resolve_paths(data, path.parent), str(path)
    data.update({k: v for k, v in overrides.items() if v is not None})
    try:
        return LearnConfig.model_validate(data)
    except ValidationError as e:
        raise SoupError(f"{where}: " + "; ".join(_describe(err) for err in e.errors()[:3])) from None


def _describe(err: dict) -> str:
    """One pydantic error as `key.path: message`, with a did-you-mean for unknown keys."""
    loc = "".join(f"[{x}]" if isinstance(x, int) else f".{x}" for x in err["loc"]).lstrip(".")
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] == "extra_forbidden":
        known = _known_keys(err["loc"][:-1])
        close = difflib.get_close_matches(str(err["loc"][-1]), known, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else f" (known: {', '.join(known)})"
        return f"{loc}: unknown key{hint}"
    if not loc or msg.startswith(loc.split(".")[0].split("[")[0] + ":"):
        return msg
    if "input" in err and err["type"] not in ("missing",) and not isinstance(err["input"], (dict, list)):
        msg = f"{msg} (got {short_repr(err['input'])})"
    return f"{loc}: {msg}"


def _known_keys(loc: tuple) -> list[str]:
    """Field names (aliases where set) of the config section at `loc`."""
    cls: Any = LearnConfig
    for part in loc:
        if isinstance(part, int) or cls is None:
            continue
        field = cls.model_fields.get(part)
        cls = _model_in(field.annotation) if field else None
    if cls is None:
        return []
    return [f.alias or name for name, f in cls.model_fields.items()]


def _model_in(annotation) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        found = _model_in(arg)
        if found is not None:
            return found
    return None
