# ruff: noqa: C408 (keyword configs, as transformers spells them)
"""Tiny configurations of every architecture the golden fixtures cover (transformers model_type -> kwargs)."""

from __future__ import annotations

AUTO_CLASS = {"llava": "AutoModelForImageTextToText"}  # the rest: AutoModelForCausalLM

_COMMON = dict(vocab_size=64, hidden_size=8, intermediate_size=16, num_attention_heads=2, num_key_value_heads=1,
               num_hidden_layers=2, max_position_embeddings=64, tie_word_embeddings=False,
               bos_token_id=1, eos_token_id=2, pad_token_id=0)

ARCHS: dict[str, dict] = {
    "llama": dict(_COMMON, num_hidden_layers=3),
    "mistral": dict(_COMMON, sliding_window=None),
    "qwen2": dict(_COMMON),
    "qwen3": dict(_COMMON, head_dim=4),
    "gemma": dict(_COMMON, head_dim=4, tie_word_embeddings=True),
    "gemma2": dict(_COMMON, head_dim=4, sliding_window=16, query_pre_attn_scalar=4, tie_word_embeddings=True),
    "gemma3_text": dict(_COMMON, head_dim=4, sliding_window=16, query_pre_attn_scalar=4, num_hidden_layers=3,
                        sliding_window_pattern=2, tie_word_embeddings=True),
    "phi3": dict(_COMMON),
    "gpt2": dict(vocab_size=64, n_embd=8, n_layer=2, n_head=2, n_positions=64, bos_token_id=1, eos_token_id=2),
    "gpt_neox": dict(_COMMON, rotary_pct=0.5, num_key_value_heads=None, tie_word_embeddings=False),
    "mixtral": dict(_COMMON, num_local_experts=4, num_experts_per_tok=2),
    "qwen3_moe": dict(_COMMON, head_dim=4, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=8,
                      decoder_sparse_step=1, mlp_only_layers=[]),
    "granite": dict(_COMMON),
    "olmo2": dict(_COMMON),
    "starcoder2": dict(_COMMON, sliding_window=None),
    "stablelm": dict(_COMMON),
    "cohere": dict(_COMMON, tie_word_embeddings=True),
    "phi": dict(_COMMON, num_key_value_heads=None),
    "falcon": dict(vocab_size=64, hidden_size=8, num_hidden_layers=2, num_attention_heads=2, bos_token_id=1,
                   eos_token_id=2, new_decoder_architecture=True, num_kv_heads=1, tie_word_embeddings=False),
    "gpt_bigcode": dict(vocab_size=64, n_embd=8, n_layer=2, n_head=2, n_positions=64, bos_token_id=1,
                        eos_token_id=2, multi_query=True),
    "arcee": dict(_COMMON),
    "glm4": dict(_COMMON, head_dim=4),
    "exaone4": dict(_COMMON, head_dim=4),
    "apertus": dict(_COMMON),
    "cohere2": dict(_COMMON, head_dim=4, sliding_window=16, tie_word_embeddings=True),
    "lfm2": dict(_COMMON, full_attn_idxs=[1], block_ff_dim=16),
    "glm4_moe": dict(_COMMON, head_dim=4, n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=8,
                     first_k_dense_replace=1, n_shared_experts=1, n_group=1, topk_group=1),
    "granitemoehybrid": dict(_COMMON, num_local_experts=0, layer_types=["mamba", "attention"], mamba_n_heads=2,
                             mamba_d_head=8, mamba_d_state=4, mamba_n_groups=1, mamba_expand=2,
                             shared_intermediate_size=16),
    "llama4_text": dict(_COMMON, head_dim=4, num_local_experts=2, interleave_moe_layer_step=1, intermediate_size_mlp=16),
    "afmoe": dict(_COMMON, head_dim=4, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=8, num_dense_layers=1),
    # no architecture JSON in mergekit 0.1.5: its automatic inference
    "olmo3": dict(_COMMON),
    "smollm3": dict(_COMMON),
    "seed_oss": dict(_COMMON, head_dim=4),
    # a LLaVA (mergekit's tests merge one): CLIP tower + projector + the Llama above
    "llava": dict(vision_config=dict(model_type="clip_vision_model", image_size=16, patch_size=8, hidden_size=8,
                                     intermediate_size=16, num_hidden_layers=1, num_attention_heads=2),
                  text_config=dict(_COMMON, model_type="llama"), image_token_index=63, vision_feature_layer=-1),
    "internlm2": None,  # remote code only
    "mamba": dict(vocab_size=64, hidden_size=8, num_hidden_layers=2, state_size=4, expand=2, conv_kernel=2,
                  bos_token_id=1, eos_token_id=2, pad_token_id=0),
}
