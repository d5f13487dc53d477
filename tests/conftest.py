"""Tiny random models made in the tests (no network): a Llama family and a LLaVA built from it."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

VOCAB = 64


def llama_config(tied: bool = False, layers: int = 2) -> LlamaConfig:
    return LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=VOCAB, tie_word_embeddings=tied, max_position_embeddings=128)


def make_llama(path, seed: int, tied: bool = False, like=None, noise: float = 0.0, **save_kwargs):
    """A tiny Llama; with `like`, a fine-tune of it: like's weights + `noise` * N(0, 1)."""
    torch.manual_seed(seed)
    model = LlamaForCausalLM(llama_config(tied))
    if like is not None:
        src = LlamaForCausalLM.from_pretrained(like)
        with torch.no_grad():
            for (n, p), q in zip(model.named_parameters(), src.parameters()):
                p.copy_(q + noise * torch.randn_like(q))
    model.save_pretrained(path, **save_kwargs)
    return path


def make_llava(path, lm_dir, seed: int = 5, extra_rows: int = 1):
    """A LLaVA whose language model is `lm_dir`'s, with `extra_rows` added embedding rows (image token)."""
    from transformers import CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration

    torch.manual_seed(seed)
    lm = LlamaForCausalLM.from_pretrained(lm_dir)
    cfg = LlavaConfig(
        vision_config=CLIPVisionConfig(image_size=16, patch_size=8, hidden_size=16, intermediate_size=32,
                                       num_hidden_layers=1, num_attention_heads=2),
        text_config=lm.config, image_token_index=VOCAB, vision_feature_layer=-1,
    )
    llava = LlavaForConditionalGeneration(cfg)
    llava.model.language_model.load_state_dict(lm.model.state_dict())
    if not lm.config.tie_word_embeddings:
        llava.lm_head.load_state_dict(lm.lm_head.state_dict())
    llava.resize_token_embeddings(VOCAB + extra_rows)
    llava.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def family(tmp_path_factory):
    """base, two fine-tunes of it, a tied pair, and a LLaVA built from fine-tune `a`."""
    root = tmp_path_factory.mktemp("family")
    base = make_llama(root / "base", 0)
    paths = {
        "base": base,
        "a": make_llama(root / "a", 1, like=base, noise=0.05),
        "b": make_llama(root / "b", 2, like=base, noise=0.05),
        "other": make_llama(root / "other", 3),
        "sharded": make_llama(root / "sharded", 4, max_shard_size="20KB"),
        "tied_a": make_llama(root / "tied_a", 6, tied=True),
        "tied_b": make_llama(root / "tied_b", 7, tied=True),
    }
    paths["llava"] = make_llava(root / "llava", paths["b"])
    paths["llava_same_vocab"] = make_llava(root / "llava_same_vocab", paths["b"], extra_rows=0)
    return paths
