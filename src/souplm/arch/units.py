"""Soup units: which coefficient a canonical tensor answers to.

A soup unit is (layer, mapping): the unit of the SoupLM paper's per-mapping soup. Its key is a short
string, the common currency of coefficient tables, recipes and learned soups:

    layers.7.q        layers.7.gate       layers.7.input_norm     embed
    layers.7.k        layers.7.up         layers.7.post_attn_norm final_norm
    layers.7.v        layers.7.down       layers.7.other          lm_head
    layers.7.o        layers.7.qkv        layers.7.experts        other
                      layers.7.gate_up    layers.7.router

                                          embed_positions     embed_norm
                                          vision              projector

The table below is data: one regex per mapping kind, on canonical names. Which stored tensor gets
which canonical name is the layout's data (souplm/arch/schemes/*.yaml): a scheme renames GPT-2's
`attn.c_attn` to `self_attn.qkv_proj`, and so decides its unit here. A tensor no rule names lands in
the unit `other` (of its layer when it has one), so nothing is ever dropped; `unnamed_weights` lists
the 2-D ones, which a plan reports (they share one coefficient with every other leftover).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# (mapping kind, regex on the canonical name after `model.layers.N.`)
LAYER_MAPPINGS: tuple[tuple[str, str], ...] = (
    ("q", r"self_attn\.q_proj\."),
    ("k", r"self_attn\.k_proj\."),
    ("v", r"self_attn\.v_proj\."),
    ("o", r"self_attn\.o_proj\."),
    ("gate", r"mlp\.gate_proj\."),
    ("up", r"mlp\.up_proj\."),
    ("down", r"mlp\.down_proj\."),
    ("input_norm", r"input_layernorm\."),
    ("post_attn_norm", r"post_attention_layernorm\."),
    # Gemma 3 has two more norms around the MLP and q/k norms inside attention.
    ("pre_ffn_norm", r"pre_feedforward_layernorm\."),
    ("post_ffn_norm", r"post_feedforward_layernorm\."),
    ("q_norm", r"self_attn\.q_norm\."),
    ("k_norm", r"self_attn\.k_norm\."),
    # Fused projections (Phi-3): one tensor holds q, k and v (or gate and up); a unit of its own.
    ("qkv", r"self_attn\.qkv_proj\."),
    ("gate_up", r"mlp\.gate_up_proj\."),
    # Mixture of experts: every expert of a layer (Mixtral `block_sparse_moe.experts.N.w1`, Qwen-MoE
    # `mlp.experts.N.gate_proj`, or fused `mlp.experts.gate_up_proj`), the router, a shared expert.
    ("experts", r"(mlp|block_sparse_moe)\.experts\."),
    ("router", r"(mlp|block_sparse_moe)\.(gate|router)\."),
    ("shared_expert", r"mlp\.shared_experts?\."),
    ("shared_expert_gate", r"mlp\.shared_expert_gate\."),
)

GLOBAL_MAPPINGS: tuple[tuple[str, str], ...] = (
    ("embed", r"model\.embed_tokens\."),
    ("final_norm", r"model\.norm\."),
    ("lm_head", r"lm_head\."),
    # Learned positions (GPT-2, OPT) and BLOOM's norm after the embedding (layouts rename them so).
    ("embed_positions", r"model\.embed_positions\."),
    ("embed_norm", r"model\.embed_norm\."),
    # Outside the LM, by the key a multimodal layout lines them up by (souplm.arch.layouts): merged with
    # the LM's method when every model has them with one shape, each part under a unit of its own.
    ("projector", r"(multi_modal_projector|visual\.merger|mm_projector)\."),
    ("vision", r"(vision_tower|visual|vision_model)\."),
)

MAPPING_KINDS: tuple[str, ...] = tuple(k for k, _ in LAYER_MAPPINGS) + ("other",)
GLOBAL_UNITS: tuple[str, ...] = tuple(k for k, _ in GLOBAL_MAPPINGS) + ("other",)

_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.(.*)$")
_LAYER_RULES = [(kind, re.compile(pat)) for kind, pat in LAYER_MAPPINGS]
_GLOBAL_RULES = [(kind, re.compile(pat)) for kind, pat in GLOBAL_MAPPINGS]


@dataclass(frozen=True)
class Unit:
    layer: int | None  # None for embed / final_norm / lm_head / global other
    mapping: str

    @property
    def key(self) -> str:
        return self.mapping if self.layer is None else f"layers.{self.layer}.{self.mapping}"


def unit_of(canonical: str) -> Unit:
    """The soup unit of a canonical tensor name."""
    m = _LAYER_RE.match(canonical)
    if m:
        layer, rest = int(m.group(1)), m.group(2)
        for kind, rule in _LAYER_RULES:
            if rule.match(rest):
                return Unit(layer, kind)
        return Unit(layer, "other")
    for kind, rule in _GLOBAL_RULES:
        if rule.match(canonical):
            return Unit(None, kind)
    return Unit(None, "other")


def parse_unit_key(key: str) -> Unit:
    """Inverse of `Unit.key`; raises ValueError on a malformed key."""
    m = re.fullmatch(r"layers\.(\d+)\.(\w+)", key)
    if m:
        if m.group(2) not in MAPPING_KINDS:
            raise ValueError(f"unknown mapping {m.group(2)!r} in unit {key!r}")
        return Unit(int(m.group(1)), m.group(2))
    if key in GLOBAL_UNITS:
        return Unit(None, key)
    raise ValueError(f"unknown unit {key!r}")


def layer_count(canonical_names) -> int:
    """Number of decoder layers, from the highest `model.layers.N` index."""
    idx = [int(m.group(1)) for n in canonical_names if (m := _LAYER_RE.match(n))]
    return max(idx) + 1 if idx else 0


def unnamed_weights(canonical_shapes: dict[str, tuple[int, ...]]) -> list[str]:
    """The 2-D (or larger) tensors whose unit is `other`: weights no rule gives a unit of their own."""
    return [c for c, shape in canonical_shapes.items() if len(shape) >= 2 and unit_of(c).mapping == "other"]


def unnamed_note(canonical_shapes: dict[str, tuple[int, ...]]) -> str | None:
    """One line for a plan or a soup report about `unnamed_weights`, or None when there are none."""
    names = unnamed_weights(canonical_shapes)
    if not names:
        return None
    return (f"{len(names)} weight matri{'x' if len(names) == 1 else 'ces'} have no soup unit of their own and "
            f"share the `other` unit's coefficient (e.g. {', '.join(names[:3])}); a layout rename "
            "(docs/ARCHITECTURES.md) gives them one")
