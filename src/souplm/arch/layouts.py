"""Where a checkpoint keeps its language model: the naming layouts souplm knows.

A *layout* is a prefix rewrite between a checkpoint's tensor names and souplm's *canonical* names,
which are the names of a plain Llama-family causal LM (`model.layers.3.self_attn.q_proj.weight`,
`model.embed_tokens.weight`, `lm_head.weight`). Merging works on canonical names, so a plain LM
(Vicuna-like) and the LM inside a LLaVA wrapper line up tensor by tensor.

To teach souplm a new wrapper, add a `Layout` to `LAYOUTS`: it is data, not code.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from ..errors import SoupError


@dataclass(frozen=True)
class Layout:
    name: str
    # (checkpoint prefix, canonical prefix) pairs; the first match wins, so list longer prefixes first.
    rewrites: tuple[tuple[str, str], ...]
    # Tensor-name prefixes that identify this layout (all must have at least one tensor).
    signature: tuple[str, ...]
    multimodal: bool = False

    def to_canonical(self, name: str) -> str | None:
        """Canonical LM name of a checkpoint tensor, or None when it is not part of the LM."""
        for src, dst in self.rewrites:
            if name.startswith(src):
                return dst + name[len(src) :]
        return None

    def from_canonical(self, canonical: str) -> str:
        """Checkpoint name this layout uses for a canonical LM tensor."""
        for src, dst in self.rewrites:
            if canonical.startswith(dst):
                return src + canonical[len(dst) :]
        raise SoupError(f"layout {self.name} has no name for tensor {canonical}")


LAYOUTS: tuple[Layout, ...] = (
    # transformers >= 4.52 in memory, and what some newer checkpoints store.
    Layout(
        name="llava",
        rewrites=(("model.language_model.", "model."), ("lm_head.", "lm_head.")),
        signature=("model.language_model.",),
        multimodal=True,
    ),
    # The older LLaVA naming (llava-hf checkpoints; transformers 5 still writes it on save).
    Layout(
        name="llava_legacy",
        rewrites=(("language_model.model.", "model."), ("language_model.lm_head.", "lm_head.")),
        signature=("language_model.model.",),
        multimodal=True,
    ),
    # Plain decoder: Llama, Mistral, Qwen2, Gemma 3 text.
    Layout(
        name="causal_lm",
        rewrites=(("model.", "model."), ("lm_head.", "lm_head.")),
        signature=("model.",),
    ),
)


# Canonical name = stored name. Never detected by itself: a checkpoint of a custom architecture
# (CogVLM-style experts, ...) gets it only when a mapping spec says how its tensors line up, because
# without one an unknown layout would merge tensors that merely share a name.
GENERIC = Layout(name="generic", rewrites=(("", ""),), signature=())


def detect_layout(names: Iterable[str], where: str = "checkpoint", fallback: Layout | None = None) -> Layout:
    """Pick the layout whose signature prefixes occur in `names` (else `fallback`, when given)."""
    names = list(names)
    for layout in LAYOUTS:
        if all(any(n.startswith(p) for n in names) for p in layout.signature):
            return layout
    if fallback is not None:
        return fallback
    sample = ", ".join(sorted(names)[:3])
    raise SoupError(
        f"{where}: unknown tensor layout (first tensors: {sample}); "
        "souplm knows Llama-family decoders and LLaVA wrappers (see souplm/arch/layouts.py)"
    )
