"""Assemble a LLaVA-style model from a causal language model plus a small, freshly initialised CLIP encoder.

This mirrors LLaVA-1.5 built on Vicuna: the language model's tensors are copied in unchanged, the
vocabulary gains one `<image>` row (SmolLM2 49152 -> 49153, like Vicuna 32000 -> LLaVA 32064), and a
vision tower plus projector are added. No pretrained CLIP weights install offline, so the tower is
trained here (stage 1 of the LLaVA recipe).
"""

from __future__ import annotations

import copy

import torch
from transformers import CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

try:  # transformers 5 without torchvision: name the PIL processor directly (the plain name warns, then uses it)
    from transformers import CLIPImageProcessorPil as CLIPImageProcessor
except ImportError:  # transformers 4
    from transformers import CLIPImageProcessor

from souplm.errors import SoupError

IMAGE_TOKEN = "<image>"

# The small CLIP-style tower from the shared assets note: 64x64 images, 8x8 patches -> 64 image tokens.
DEFAULT_VISION: dict = {
    "image_size": 64,
    "patch_size": 8,
    "hidden_size": 192,
    "intermediate_size": 768,
    "num_hidden_layers": 4,
    "num_attention_heads": 3,
}


def add_image_token(tokenizer: object) -> tuple[object, int]:
    """A copy of `tokenizer` with the `<image>` special token appended; returns it and the token's id."""
    tok = copy.deepcopy(tokenizer)
    if IMAGE_TOKEN not in tok.get_vocab():
        tok.add_tokens([IMAGE_TOKEN], special_tokens=True)
    return tok, int(tok.convert_tokens_to_ids(IMAGE_TOKEN))


def image_seq_length(vision: dict) -> int:
    """Image tokens per image: one per patch (the CLS token is dropped by the "default" strategy)."""
    return (vision["image_size"] // vision["patch_size"]) ** 2


def build_processor(tokenizer: object, vision: dict | None = None) -> LlavaProcessor:
    """The LlavaProcessor for a tokenizer that already has `<image>`."""
    vision = {**DEFAULT_VISION, **(vision or {})}
    size = vision["image_size"]
    image_processor = CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=vision["patch_size"],
        vision_feature_select_strategy="default",
        image_token=IMAGE_TOKEN,
        num_additional_image_tokens=1,  # CLIP's CLS token, dropped again by the "default" strategy
        chat_template=getattr(tokenizer, "chat_template", None),
    )


def build_llava(
    lm: torch.nn.Module, tokenizer: object, vision: dict | None = None, seed: int = 0
) -> tuple[LlavaForConditionalGeneration, LlavaProcessor]:
    """A LlavaForConditionalGeneration whose language model is an exact copy of `lm`.

    `lm` is a LlamaForCausalLM-like model (`.model` the decoder, `.lm_head` the head). The new
    `<image>` embedding row is the mean of the existing rows: the row itself is never read as an input
    (image features replace it), but a tied head scores it, and the mean keeps that score unremarkable.
    """
    vision = {**DEFAULT_VISION, **(vision or {})}
    tok, image_id = add_image_token(tokenizer)
    old_vocab = lm.get_input_embeddings().weight.shape[0]
    if image_id < old_vocab:
        raise SoupError(f"{IMAGE_TOKEN} got id {image_id}, inside the language model's vocabulary of {old_vocab}")
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(**vision),
        text_config=copy.deepcopy(lm.config),
        image_token_index=image_id,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        image_seq_length=image_seq_length(vision),
    )
    torch.manual_seed(seed)  # the vision tower and projector start from this seed's random init
    model = LlavaForConditionalGeneration(config).to(torch.float32)
    missing, unexpected = model.model.language_model.load_state_dict(lm.model.state_dict(), strict=False)
    if missing or unexpected:
        raise SoupError(f"language model tensors do not fit LLaVA: missing {missing[:3]}, unexpected {unexpected[:3]}")
    tied = bool(getattr(lm.config, "tie_word_embeddings", False))
    if not tied:
        model.lm_head.weight.data.copy_(lm.lm_head.weight.data)
    model.resize_token_embeddings(image_id + 1, mean_resizing=False)
    with torch.no_grad():
        emb = model.get_input_embeddings().weight
        emb[old_vocab:] = emb[:old_vocab].mean(dim=0, keepdim=True)
        if not tied:
            head = model.get_output_embeddings().weight
            head[old_vocab:] = head[:old_vocab].mean(dim=0, keepdim=True)
    gen = getattr(lm, "generation_config", None)
    if gen is not None:
        model.generation_config = copy.deepcopy(gen)
    return model, build_processor(tok, vision)
