"""Every architecture transformers 5 builds tiny models for merges, loads and generates.

For each one: three seeded random models (base, A, B) saved with save_pretrained, merged by souplm with
linear (A, B) and TIES (base; A, B); every output tensor is checked against a NumPy float64 statement
of the formula written here; the output loads with the right Auto class with no missing or unexpected
keys and generates. Then: multimodal pairs (the vision tower and projector merged too, or copied), a
decoder whose names no scheme knows (its layout inferred), and the report of dropped buffers and of
weights without a soup unit of their own. The architecture knowledge is src/souplm/arch/schemes/*.yaml.
"""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file as load_np
from safetensors.torch import load_file, save_file

import souplm
from souplm.arch.layouts import infer_layout
from souplm.arch.units import unit_of
from souplm.engine import prepare
from souplm.engine.recipe import Recipe
from souplm.errors import SoupError
from souplm.io.checkpoint import open_checkpoint

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()
warnings.filterwarnings("ignore", module="transformers")

V, H = 64, 16
COMMON = {"vocab_size": V, "hidden_size": H, "intermediate_size": 24, "num_hidden_layers": 2, "num_attention_heads": 2,
              "num_key_value_heads": 1, "max_position_embeddings": 32, "head_dim": 8}
TOKENS = {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}
# arch -> (config kwargs, the scheme souplm must pick)
CAUSAL: dict[str, tuple[dict, str]] = {
    "llama": (COMMON, "llama"), "mistral": (COMMON, "llama"), "qwen2": (COMMON, "llama"),
    "qwen3": (COMMON, "llama"), "gemma": (COMMON, "llama"), "gemma2": ({**COMMON, "sliding_window": 8}, "llama"),
    "gemma3_text": ({**COMMON, "sliding_window": 8}, "llama"), "olmo": (COMMON, "llama"),
    "olmo2": (COMMON, "llama"), "cohere": (COMMON, "llama"), "granite": (COMMON, "llama"),
    "stablelm": (COMMON, "llama"), "phi3": (COMMON, "llama"),
    "mixtral": ({**COMMON, "num_local_experts": 3, "num_experts_per_tok": 2}, "llama"),
    "qwen3_moe": ({**COMMON, "num_experts": 3, "num_experts_per_tok": 2, "moe_intermediate_size": 8}, "llama"),
    "starcoder2": (COMMON, "starcoder2"), "phi": (COMMON, "phi"),
    "persimmon": ({**COMMON, "num_key_value_heads": 2}, "persimmon"),
    "gpt2": ({"vocab_size": V, "n_embd": H, "n_layer": 2, "n_head": 2, "n_positions": 32, "n_inner": 24}, "gpt2"),
    "gpt_bigcode": ({"vocab_size": V, "n_embd": H, "n_layer": 2, "n_head": 2, "n_positions": 32, "n_inner": 24}, "gpt_bigcode"),
    "gpt_neox": ({"vocab_size": V, "hidden_size": H, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 24,
                      "max_position_embeddings": 32}, "gpt_neox"),
    "falcon": ({"vocab_size": V, "hidden_size": H, "num_hidden_layers": 2, "num_attention_heads": 2}, "falcon"),
    "bloom": ({"vocab_size": V, "hidden_size": H, "n_layer": 2, "n_head": 2}, "bloom"),
    "gptj": ({"vocab_size": V, "n_embd": H, "n_layer": 2, "n_head": 2, "n_positions": 32, "rotary_dim": 4, "n_inner": 24}, "gptj"),
    "codegen": ({"vocab_size": V, "n_embd": H, "n_layer": 2, "n_head": 2, "n_positions": 32, "n_ctx": 32, "rotary_dim": 4,
                     "n_inner": 24}, "codegen"),
    "opt": ({"vocab_size": V, "hidden_size": H, "num_hidden_layers": 2, "num_attention_heads": 2, "ffn_dim": 24,
                 "word_embed_proj_dim": H, "max_position_embeddings": 32}, "opt"),
    "mpt": ({"vocab_size": V, "d_model": H, "n_heads": 2, "n_layers": 2, "expansion_ratio": 2, "max_seq_len": 32}, "mpt"),
    "gpt_neo": ({"vocab_size": V, "hidden_size": H, "num_layers": 2, "num_heads": 2, "intermediate_size": 24,
                 "attention_types": [[["global", "local"], 1]], "window_size": 8, "max_position_embeddings": 32},
                "gpt_neo"),
}
W = (0.3, 0.7)
DENSITY = 0.6


def build_causal(arch: str, seed: int, folder: Path) -> Path:
    cfg = transformers.AutoConfig.for_model(arch, **CAUSAL[arch][0], **TOKENS)
    torch.manual_seed(seed)
    transformers.AutoModelForCausalLM.from_config(cfg).save_pretrained(folder)
    return folder


def tensors(folder: Path) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update({k: v.astype(np.float64) for k, v in load_np(f).items()})
    return out


# -- the formulas, in NumPy float64 ----------------------------------------------------------------
def linear_np(xs: list[np.ndarray], w=W) -> np.ndarray:
    return sum(wi * x for wi, x in zip(w, xs)) / sum(w)


def ties_np(base: np.ndarray, xs: list[np.ndarray], w=W, density=DENSITY) -> np.ndarray:
    """TIES (Yadav et al. 2023, as mergekit states it): keep each task vector's int(density * n) largest
    entries, elect the sign of the weighted sum, average (by weight) the entries that agree with it."""
    trimmed = []
    for x in xs:
        d = (x - base).ravel()
        k = int(density * d.size)
        keep = np.zeros(d.size, bool)
        keep[np.argsort(-np.abs(d), kind="stable")[:k]] = True
        trimmed.append(np.where(keep, d, 0.0).reshape(base.shape))
    weighted = [wi * t for wi, t in zip(w, trimmed)]
    sign = np.where(sum(weighted) >= 0, 1.0, -1.0)
    agree = [np.sign(t) == sign for t in trimmed]
    num = sum(wt * a for wt, a in zip(weighted, agree))
    den = sum(wi * a for wi, a in zip(w, agree))
    den = np.where(np.abs(den) < 1e-8, 1.0, den)
    return base + num / den


def assert_every_tensor(out: Path, expected: dict[str, np.ndarray]) -> None:
    got = tensors(out)
    assert set(got) == set(expected)
    for name, want in expected.items():
        np.testing.assert_allclose(got[name], want, rtol=2e-6, atol=2e-7, err_msg=name)


def assert_loads_and_generates(out: Path, auto=None) -> None:
    auto = auto or transformers.AutoModelForCausalLM
    model, info = auto.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    ids = model.generate(torch.tensor([[1, 5, 7]]), max_new_tokens=3, do_sample=False, min_new_tokens=3)
    assert ids.shape == (1, 6)
    # what loaded is what souplm wrote: the loaded model saved again gives back every tensor exactly
    # (transformers 5 renames some in memory, fuses MoE experts, and undoes both on save)
    again = out.with_name(out.name + "_resaved")
    model.save_pretrained(again)
    written, resaved = tensors(out), tensors(again)
    assert set(resaved) == set(written)
    for name, t in written.items():
        np.testing.assert_array_equal(resaved[name], t, err_msg=name)


def merge(tmp: Path, name: str, recipe: dict) -> Path:
    out = tmp / name
    souplm.merge(recipe, out, progress=False)
    return out


# -- every causal LM --------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", sorted(CAUSAL))
def test_causal_lm_merges_loads_and_generates(arch, tmp_path):
    base, a, b = (build_causal(arch, s, tmp_path / n) for s, n in ((0, "base"), (1, "a"), (2, "b")))
    ck = open_checkpoint(a)
    assert ck.layout.name == CAUSAL[arch][1]
    assert ck.dropped == {} and ck.extra_names() == []  # every stored tensor is part of the LM
    tb, ta, tB = tensors(base), tensors(a), tensors(b)

    lin = merge(tmp_path, "linear", {"merge_method": "linear", "models": [
        {"model": str(a), "parameters": {"weight": W[0]}}, {"model": str(b), "parameters": {"weight": W[1]}}]})
    assert_every_tensor(lin, {k: linear_np([ta[k], tB[k]]) for k in ta})

    ties = merge(tmp_path, "ties", {"merge_method": "ties", "base_model": str(base), "models": [
        {"model": str(a), "parameters": {"weight": W[0], "density": DENSITY}},
        {"model": str(b), "parameters": {"weight": W[1], "density": DENSITY}}]})
    assert_every_tensor(ties, {k: ties_np(tb[k], [ta[k], tB[k]]) for k in ta})
    assert_loads_and_generates(ties)


def test_units_follow_the_scheme_renames(tmp_path):
    """Fused and expert weights get units of their own; GPT-2's Conv1D names get Llama's units."""
    want = {
        "phi3": {"qkv", "gate_up", "o", "down"},
        "gpt2": {"qkv", "o", "up", "down", "input_norm", "post_attn_norm"},
        "gpt_neox": {"qkv", "o", "up", "down", "input_norm", "post_attn_norm"},
        "mixtral": {"experts", "router", "q", "k", "v", "o"},
        "qwen3_moe": {"experts", "router", "q_norm", "k_norm"},
    }
    for arch, units in want.items():
        ck = open_checkpoint(build_causal(arch, 0, tmp_path / arch))
        layer = {unit_of(c).mapping for c in ck.canonical_names() if unit_of(c).layer is not None}
        assert units <= layer and "other" not in layer, (arch, layer)
    gpt2 = open_checkpoint(tmp_path / "gpt2")
    assert gpt2.stored_name("model.layers.1.self_attn.qkv_proj.weight") == "transformer.h.1.attn.c_attn.weight"
    assert gpt2.layout.is_transposed("model.layers.1.self_attn.qkv_proj.weight")  # Conv1D: [in, out]
    assert gpt2.shape("transformer.h.1.attn.c_attn.weight") == (H, 3 * H)
    assert gpt2.tied and unit_of("model.embed_positions.weight").mapping == "embed_positions"


def test_learn_uses_the_same_units(tmp_path):
    """A learned soup of two GPT-2s has one alpha per (layer, mapping) under the same unit keys as a recipe."""
    from souplm.learn.soup_module import build_soup

    a, b = build_causal("gpt2", 1, tmp_path / "a"), build_causal("gpt2", 2, tmp_path / "b")
    model = transformers.AutoModelForCausalLM.from_pretrained(a)
    soup = build_soup(model, [open_checkpoint(b)])
    groups = {t.group for t in soup.tensors}
    assert {"layers.0.qkv", "layers.1.down", "embed", "final_norm", "embed_positions"} <= groups
    assert not any(g.endswith("other") for g in groups)


# -- multimodal + multimodal ------------------------------------------------------------------------
TEXT = {"vocab_size": V, "hidden_size": H, "intermediate_size": 24, "num_hidden_layers": 2, "num_attention_heads": 2,
            "num_key_value_heads": 1, "max_position_embeddings": 64, "head_dim": 8}


def build_llava(seed: int, folder: Path) -> Path:
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    vis = CLIPVisionConfig(hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2,
                           image_size=28, patch_size=14, projection_dim=8)
    cfg = LlavaConfig(text_config=LlamaConfig(**TEXT, **TOKENS).to_dict(), vision_config=vis.to_dict(),
                      image_token_index=V - 1)
    torch.manual_seed(seed)
    LlavaForConditionalGeneration(cfg).save_pretrained(folder)
    return folder


def build_qwen2_vl(seed: int, folder: Path) -> Path:
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    cfg = Qwen2VLConfig(text_config=dict(TEXT, **TOKENS, rope_scaling={"type": "mrope", "mrope_section": [1, 1, 2]}),
                        vision_config={"depth": 1, "embed_dim": 8, "hidden_size": H, "num_heads": 2, "mlp_ratio": 2,
                                           "patch_size": 14, "spatial_merge_size": 2, "in_channels": 3, "temporal_patch_size": 2},
                        image_token_id=V - 3, video_token_id=V - 2, vision_start_token_id=V - 4)
    torch.manual_seed(seed)
    Qwen2VLForConditionalGeneration(cfg).save_pretrained(folder)
    return folder


def build_gemma3(seed: int, folder: Path) -> Path:
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration

    cfg = Gemma3Config(text_config=dict(TEXT, **TOKENS, sliding_window=8),
                       vision_config={"hidden_size": 8, "intermediate_size": 16, "num_hidden_layers": 1,
                                          "num_attention_heads": 2, "image_size": 28, "patch_size": 14},
                       mm_tokens_per_image=4, image_token_index=V - 1, boi_token_index=V - 3, eoi_token_index=V - 2)
    torch.manual_seed(seed)
    Gemma3ForConditionalGeneration(cfg).save_pretrained(folder)
    return folder


MULTIMODAL = {"llava": (build_llava, "llava_legacy(llama)"), "qwen2_vl": (build_qwen2_vl, "qwen2_vl(llama)"),
              "gemma3": (build_gemma3, "llava_legacy(llama)")}


@pytest.mark.parametrize("kind", sorted(MULTIMODAL))
def test_multimodal_pair_merges_vision_parts_too(kind, tmp_path):
    """mergekit's own LLaVA output drops the language model and does not load; the reference here is the
    NumPy statement: every tensor, LM and vision alike, is the weighted average (and TIES over a base)."""
    build, layout = MULTIMODAL[kind]
    base, a, b = (build(s, tmp_path / n) for s, n in ((0, "base"), (1, "a"), (2, "b")))
    ck = open_checkpoint(a)
    assert ck.layout.name == layout and ck.layout.multimodal and ck.extra_names()
    tb, ta, tB = tensors(base), tensors(a), tensors(b)
    recipe = {"merge_method": "ties", "base_model": str(base), "models": [
        {"model": str(a), "parameters": {"weight": W[0], "density": DENSITY}},
        {"model": str(b), "parameters": {"weight": W[1], "density": DENSITY}}]}
    plan, _ = prepare(Recipe.load(recipe))
    assert all(i.copy_from is None for i in plan.items)  # nothing copied: every tensor merged
    note = next(n for n in plan.notes if "non-LM tensors" in n)
    assert f"{len(ck.extra_names())} non-LM tensors" in note and "merged with ties" in note
    out = merge(tmp_path, "ties", recipe)
    assert_every_tensor(out, {k: ties_np(tb[k], [ta[k], tB[k]]) for k in ta})
    assert_loads_and_generates(out, transformers.AutoModelForImageTextToText)
    assert note in (out / "README.md").read_text()  # the model card says what was done


def test_multimodal_copy_policy_takes_the_named_model(tmp_path):
    a, b = build_llava(1, tmp_path / "a"), build_llava(2, tmp_path / "b")
    ta, tB = tensors(a), tensors(b)
    recipe = {"merge_method": "linear", "vision_policy": "copy", "output_model": str(b), "models": [
        {"model": str(a), "parameters": {"weight": W[0]}}, {"model": str(b), "parameters": {"weight": W[1]}}]}
    out = merge(tmp_path, "copy", recipe)
    lm = {k for k in ta if k.startswith("language_model.")}
    assert_every_tensor(out, {k: linear_np([ta[k], tB[k]]) if k in lm else tB[k] for k in ta})
    card = (out / "README.md").read_text()
    assert f"copied unchanged from {b} (vision_policy: copy); those of {a} are not used" in card


def test_vision_policy_is_merge_or_copy():
    with pytest.raises(SoupError, match=r"vision_policy: Input should be 'merge' or 'copy' \(got 'mix'\)"):
        Recipe.load({"models": [{"model": "a"}], "vision_policy": "mix"})


def test_multimodal_parts_of_another_shape_are_copied_and_said(tmp_path):
    a = build_llava(1, tmp_path / "a")
    b = tmp_path / "b"
    shutil.copytree(a, b)
    sd = load_file(b / "model.safetensors")
    sd["multi_modal_projector.linear_1.weight"] = torch.zeros(H, 4)  # a projector of another width
    save_file(sd, b / "model.safetensors", metadata={"format": "pt"})
    plan, _ = prepare(Recipe.from_models([a, b], "linear"))
    copied = [i for i in plan.items if i.copy_from is not None]
    assert [i.out_name for i in copied] == ["multi_modal_projector.linear_1.weight"]
    assert any("shapes differ: [16, 8] here, [16, 4]" in n and "copied unchanged" in n for n in plan.notes)


# -- an unknown naming: inferred ----------------------------------------------------------------------
RENAMES = [("gpt_neox.layers.", "backbone.blocks."), ("gpt_neox.embed_in.", "backbone.tok_embeddings."),
           ("gpt_neox.final_layer_norm.", "backbone.out_norm."), ("embed_out.", "head.")]


def renamed_neox(seed: int, folder: Path) -> Path:
    src = build_causal("gpt_neox", seed, folder.with_name(folder.name + "_src"))
    folder.mkdir()
    sd = load_file(src / "model.safetensors")
    for a, b in RENAMES:
        sd = {k.replace(a, b): v for k, v in sd.items()}
    save_file(sd, folder / "model.safetensors")
    cfg = json.loads((src / "config.json").read_text())
    cfg.update(model_type="mystery", architectures=["MysteryForCausalLM"])
    (folder / "config.json").write_text(json.dumps(cfg))
    return folder


def test_unknown_layout_is_inferred_from_names_shapes_and_config(tmp_path):
    a, b = renamed_neox(1, tmp_path / "a"), renamed_neox(2, tmp_path / "b")
    ck = open_checkpoint(a)
    assert ck.layout.name == "inferred"
    assert ck.stored_name("model.embed_tokens.weight") == "backbone.tok_embeddings.weight"
    assert ck.stored_name("lm_head.weight") == "head.weight" and not ck.tied
    assert ck.stored_name("model.norm.bias") == "backbone.out_norm.bias"
    assert ck.stored_name("model.layers.1.self_attn.qkv_proj.weight") == "backbone.blocks.1.attention.query_key_value.weight"
    assert {unit_of(c).mapping for c in ck.canonical_names()} >= {"qkv", "o", "up", "down", "embed", "lm_head"}
    recipe = Recipe.from_models([a, b], "linear", weights=list(W))
    plan, _ = prepare(recipe)
    assert any("inferred from names and config: blocks `backbone.blocks.{layer}.` (2 layers)" in n for n in plan.notes)
    out = merge(tmp_path, "out", recipe)
    ta, tB = tensors(a), tensors(b)
    assert_every_tensor(out, {k: linear_np([ta[k], tB[k]]) for k in ta})  # the input's own names
    # renamed back, the merge is a GPT-NeoX that loads and generates
    sd = load_file(out / "model.safetensors")
    for a_, b_ in RENAMES:
        sd = {k.replace(b_, a_): v for k, v in sd.items()}
    save_file(sd, out / "model.safetensors")
    cfg = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**cfg, "model_type": "gpt_neox", "architectures": ["GPTNeoXForCausalLM"]}))
    assert_loads_and_generates(out)


def test_inference_says_why_it_cannot():
    shapes = {"blocks.0.w": (4, 4), "blocks.1.w": (4, 4)}
    with pytest.raises(SoupError, match=r"no tensor outside the blocks has the embedding's shape"):
        infer_layout(shapes, shapes.__getitem__, {"num_hidden_layers": 2})
    with pytest.raises(SoupError, match=r"no repeated block of 3 layers"):
        infer_layout(shapes, shapes.__getitem__, {"num_hidden_layers": 3})
    two = {**shapes, "a.weight": (10, 4), "b.weight": (10, 4)}
    with pytest.raises(SoupError, match=r"cannot tell the embedding from the output head among a.weight, b.weight"):
        infer_layout(two, two.__getitem__, {"num_hidden_layers": 2, "vocab_size": 10, "hidden_size": 4})


# -- everything accounted for: dropped buffers, weights without a unit -------------------------------------
def test_stored_buffers_are_dropped_and_reported(tmp_path):
    """Old GPT-2 checkpoints store attn.bias / attn.masked_bias (causal masks); transformers rebuilds them."""
    a, b = build_causal("gpt2", 1, tmp_path / "a"), build_causal("gpt2", 2, tmp_path / "b")
    for folder in (a, b):
        sd = load_file(folder / "model.safetensors")
        for i in range(2):
            sd[f"transformer.h.{i}.attn.bias"] = torch.tril(torch.ones(1, 1, 32, 32))
            sd[f"transformer.h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
        save_file(sd, folder / "model.safetensors", metadata={"format": "pt"})
    ck = open_checkpoint(a)
    assert sorted(ck.dropped) == sorted(f"transformer.h.{i}.attn.{n}" for i in range(2) for n in ("bias", "masked_bias"))
    recipe = Recipe.from_models([a, b], "linear", weights=list(W))
    plan, _ = prepare(recipe)
    assert sum("4 stored tensors of" in n and "are not written" in n for n in plan.notes) == 2
    out = merge(tmp_path, "out", recipe)
    written = tensors(out)
    assert not set(ck.dropped) & set(written)
    ta, tB = tensors(a), tensors(b)
    assert_every_tensor(out, {k: linear_np([ta[k], tB[k]]) for k in written})
    assert_loads_and_generates(out)


def test_weights_without_a_unit_are_reported(tmp_path):
    a, b = build_causal("llama", 1, tmp_path / "a"), build_causal("llama", 2, tmp_path / "b")
    for folder in (a, b):
        sd = load_file(folder / "model.safetensors")
        sd["model.layers.0.mlp.adapter.weight"] = torch.ones(4, H)
        save_file(sd, folder / "model.safetensors", metadata={"format": "pt"})
    plan, _ = prepare(Recipe.from_models([a, b], "linear"))
    note = next(n for n in plan.notes if "no soup unit of their own" in n)
    assert note.startswith("1 weight matrix") and "model.layers.0.mlp.adapter.weight" in note
    clean, _ = prepare(Recipe.from_models([build_causal("llama", 3, tmp_path / "c")] * 2, "linear"))
    assert not any("no soup unit" in n for n in clean.notes)
