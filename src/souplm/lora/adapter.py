"""Reading PEFT LoRA adapters (`adapter_config.json` + `adapter_model.safetensors`) and their deltas.

An adapter is read lazily: opening one reads its config and the safetensors header. `delta(name)`
computes one module's weight change in float32 when asked, so a merge over `base + adapter` never
holds more than one module's factors at a time.

What PEFT's `merge_and_unload` does, per module (and what `LoraAdapter` reproduces):

- Linear: W += s * B @ A (transposed when `fan_in_fan_out`, GPT-2's Conv1D layout);
- Embedding: W += s * (B @ A)^T (PEFT stores `lora_embedding_A` as r x vocab);
- s = alpha / r, or alpha / sqrt(r) with `use_rslora`; r from the factor's shape, alpha from
  `alpha_pattern` when a pattern matches the module, else `lora_alpha`;
- `lora_bias`: the bias gains s * lora_B.bias;
- DoRA (`use_dora`, Linear only): W' = m / ||W + s B A||_row * (W + s B A);
- `modules_to_save` (and a saved `base_layer.weight`): the adapter's tensor replaces the base's.

Modules whose name `target_modules` does not match are ignored, as PEFT ignores them on load.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import SoupError
from ..io.safetensors_file import SafetensorsFile

if TYPE_CHECKING:
    import torch

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
PREFIX = "base_model.model."
# Config keys whose non-default value changes the merged weights in ways souplm does not reproduce.
UNSUPPORTED = {
    "layer_replication": None, "trainable_token_indices": None, "target_parameters": None,
    "alora_invocation_tokens": None, "use_qalora": False, "use_bdlora": None,
}


def is_adapter_dir(path: str | os.PathLike) -> bool:
    p = Path(path)
    return p.is_dir() and (p / CONFIG).is_file()


@dataclass
class LoraModule:
    module: str  # the module's name in the model, e.g. model.layers.0.self_attn.q_proj
    kind: str  # "linear" or "embedding"
    a_key: str
    b_key: str
    rank: int
    alpha: float
    scale: float
    magnitude_key: str | None = None  # DoRA
    bias_key: str | None = None  # lora_bias

    @property
    def weight_name(self) -> str:
        return f"{self.module}.weight"


def pattern_key(patterns: dict, module: str) -> str | None:
    """The rank/alpha pattern that applies to `module`: PEFT matches a key against the name's end."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", module):
            return key
    return None


def targets(target_modules: Any, module: str) -> bool:
    """Whether `target_modules` (a regex string, a list of names/suffixes, or all-linear) names `module`."""
    if target_modules is None or target_modules == "all-linear":
        return True  # the saved factors are the record of what was targeted
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, module) is not None
    return any(module == t or module.endswith("." + t) for t in target_modules)


class LoraAdapter:
    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        cfg_file = self.path / CONFIG
        if not cfg_file.is_file():
            raise SoupError(f"{self.path}: not a PEFT adapter (no {CONFIG})")
        try:
            self.config: dict = json.loads(cfg_file.read_text())
        except json.JSONDecodeError as e:
            raise SoupError(f"{cfg_file} is not valid JSON: {e}") from None
        if not isinstance(self.config, dict):
            raise SoupError(f"{cfg_file}: expected a JSON object")
        kind = self.config.get("peft_type", "LORA")
        if str(kind).upper() != "LORA":
            raise SoupError(f"{self.path}: peft_type {kind} is not supported (only LORA adapters)")
        for key, default in UNSUPPORTED.items():
            if self.config.get(key, default) not in (default, {}, [], False):
                raise SoupError(f"{self.path}: adapter option {key}={self.config[key]!r} is not supported")
        weights = self.path / WEIGHTS
        if not weights.is_file():
            if (self.path / "adapter_model.bin").is_file():
                raise SoupError(f"{self.path}: only adapter_model.safetensors is read (found a pickled adapter_model.bin)")
            raise SoupError(f"{self.path}: no {WEIGHTS}")
        self.file = SafetensorsFile(weights)
        self.modules: dict[str, LoraModule] = {}  # by base weight name
        self.replaced: dict[str, str] = {}  # base tensor name -> adapter key holding its replacement
        self.ignored: list[str] = []
        self.base_layer_keys: set[str] = set()  # replacements PEFT saved as <module>.base_layer.weight (embeddings)
        self._index()
        if not self.modules and not self.replaced:
            raise SoupError(f"{self.path}: the adapter holds no LoRA factors and no saved modules")

    # -- config ------------------------------------------------------------------------------
    @property
    def use_rslora(self) -> bool:
        return bool(self.config.get("use_rslora", False))

    @property
    def fan_in_fan_out(self) -> bool:
        return bool(self.config.get("fan_in_fan_out", False))

    @property
    def use_dora(self) -> bool:
        return bool(self.config.get("use_dora", False))

    def alpha_for(self, module: str) -> float:
        patterns = self.config.get("alpha_pattern") or {}
        key = pattern_key(patterns, module)
        return float(patterns[key] if key is not None else self.config.get("lora_alpha", 8))

    def rank_for(self, module: str) -> int:
        patterns = self.config.get("rank_pattern") or {}
        key = pattern_key(patterns, module)
        return int(patterns[key] if key is not None else self.config.get("r", 8))

    def scale(self, alpha: float, rank: int) -> float:
        return alpha / math.sqrt(rank) if self.use_rslora else alpha / rank

    # -- index -------------------------------------------------------------------------------
    def _index(self) -> None:
        keys = set(self.file.tensors)
        strip = {k: k.removeprefix(PREFIX) for k in keys}
        found: dict[str, dict[str, str]] = {}
        for key, name in strip.items():
            m = re.fullmatch(r"(.+)\.(lora_A|lora_B|lora_embedding_A|lora_embedding_B|lora_magnitude_vector)(\.weight|\.bias)?", name)
            if m:
                part = m.group(2) + (".bias" if m.group(3) == ".bias" else "")
                found.setdefault(m.group(1), {})[part] = key
                continue
            if ".lora_" in name:
                raise SoupError(f"{self.path}: tensor {key} is a LoRA tensor souplm does not know")
            if name.endswith(".base_layer.weight"):  # a saved (e.g. resized) embedding under a LoRA layer
                self.replaced[name[: -len(".base_layer.weight")] + ".weight"] = key
                self.base_layer_keys.add(key)
            else:  # modules_to_save: stored under the module's own name
                self.replaced[name] = key
        for module, parts in sorted(found.items()):
            if not targets(self.config.get("target_modules"), module):
                self.ignored.append(module)
                continue
            if "lora_A" in parts and "lora_B" in parts:
                kind, a, b = "linear", parts["lora_A"], parts["lora_B"]
            elif "lora_embedding_A" in parts and "lora_embedding_B" in parts:
                kind, a, b = "embedding", parts["lora_embedding_A"], parts["lora_embedding_B"]
            else:
                raise SoupError(f"{self.path}: module {module} has an incomplete LoRA pair ({', '.join(sorted(parts))})")
            sa, sb = self.file.tensors[a].shape, self.file.tensors[b].shape
            if len(sa) != 2 or len(sb) != 2:
                raise SoupError(f"{self.path}: module {module}: only 2-D LoRA factors (Linear, Embedding) are "
                                f"supported, got {list(sa)} and {list(sb)}")
            rank = sa[0]
            if sb[1] != rank:
                raise SoupError(f"{self.path}: module {module}: lora_A has rank {rank} but lora_B has {sb[1]}")
            if rank != self.rank_for(module):
                raise SoupError(f"{self.path}: module {module}: the factors have rank {rank}, the config says "
                                f"{self.rank_for(module)} (r / rank_pattern)")
            mag = parts.get("lora_magnitude_vector")
            if self.use_dora != (mag is not None):
                raise SoupError(f"{self.path}: module {module}: use_dora={self.use_dora} but the magnitude "
                                f"vector is {'missing' if self.use_dora else 'present'}")
            if mag is not None and kind != "linear":
                raise SoupError(f"{self.path}: module {module}: DoRA on an embedding is not supported")
            alpha = self.alpha_for(module)
            self.modules[f"{module}.weight"] = LoraModule(
                module, kind, a, b, rank, alpha, self.scale(alpha, rank), mag, parts.get("lora_B.bias"))

    # -- tensors -----------------------------------------------------------------------------
    def factors(self, name: str, dtype: str = "float32") -> tuple[torch.Tensor, torch.Tensor, float]:
        """(B, A, scale) of the module whose weight is `name`, float32 (or `dtype`), so that delta = scale * B @ A
        in the base's own weight layout (the embedding and fan_in_fan_out transposes already applied)."""
        mod = self.modules[name]
        a = self.file.get(mod.a_key, dtype)
        b = self.file.get(mod.b_key, dtype)
        if mod.kind == "embedding":  # delta = (B A)^T = A^T B^T
            return a.T.contiguous(), b.T.contiguous(), mod.scale
        if self.fan_in_fan_out:
            return a.T.contiguous(), b.T.contiguous(), mod.scale
        return b, a, mod.scale

    def delta(self, name: str, dtype: str = "float32") -> torch.Tensor:
        b, a, s = self.factors(name, dtype)
        return (b @ a).mul_(s)

    def bias_delta(self, bias_name: str, dtype: str = "float32") -> torch.Tensor | None:
        mod = self.modules.get(bias_name[: -len(".bias")] + ".weight") if bias_name.endswith(".bias") else None
        if mod is None or mod.bias_key is None:
            return None
        return self.file.get(mod.bias_key, dtype).mul_(mod.scale)

    def apply(self, name: str, w: torch.Tensor) -> torch.Tensor:
        """`w` (float32 or float64, the base's tensor `name`) with this adapter merged in, as merge_and_unload
        does; computed in `w`'s dtype."""
        import torch

        dt = "float64" if w.dtype == torch.float64 else "float32"
        if name in self.replaced:
            key = self.replaced[name]
            if tuple(self.file.tensors[key].shape) != tuple(w.shape):
                raise SoupError(f"{self.path}: saved tensor {key} has shape {list(self.file.tensors[key].shape)}, "
                                f"the base's {name} has {list(w.shape)}")
            w = self.file.get(key, dt)
        mod = self.modules.get(name)
        if mod is not None:
            d = self.delta(name, dt)
            if tuple(d.shape) != tuple(w.shape):
                raise SoupError(f"{self.path}: module {mod.module}: the LoRA delta has shape {list(d.shape)}, "
                                f"the base weight has {list(w.shape)}")
            w = w.add_(d)
            if mod.magnitude_key is not None:
                m = self.file.get(mod.magnitude_key, dt)
                wt = w.T if self.fan_in_fan_out else w
                norm = torch.linalg.vector_norm(wt, dim=1)
                wt.mul_((m / norm).unsqueeze(1))
        bd = self.bias_delta(name, dt)
        if bd is not None:
            w = w.add_(bd)
        return w

    def touches(self) -> set[str]:
        """The base tensor names this adapter changes."""
        out = set(self.modules) | set(self.replaced)
        out |= {m.module + ".bias" for m in self.modules.values() if m.bias_key is not None}
        return out

    def close(self) -> None:
        self.file.close()
