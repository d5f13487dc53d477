"""The CogVLM-style model (souplm.models.cogvlm), checked against transformers' Llama and LLaVA.

With its two experts equal (and the visual qkv bias zero) the model must compute exactly what a LLaVA with
the same decoder, vision tower and projector computes, so transformers is the independent reference.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers_eval import make_tokenizer
from PIL import Image
from transformers import LlamaConfig, LlamaForCausalLM

from souplm.errors import SoupError
from souplm.experiment import multimodal
from souplm.models import cogvlm

VISION = {"image_size": 16, "patch_size": 8, "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 2,
          "num_attention_heads": 2}


def _tiny_llava(seed: int = 0, tied: bool = True):
    tok = make_tokenizer()
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      tie_word_embeddings=tied, rope_theta=500.0, bos_token_id=tok.bos_token_id,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    lm = LlamaForCausalLM(cfg).eval()
    llava, processor = multimodal.build_llava(lm, tok, VISION, seed=seed)
    return lm, llava.eval(), processor


def _images(n: int) -> list[Image.Image]:
    colours = [(255, 0, 0), (0, 128, 255), (20, 200, 20), (250, 250, 0)]
    return [Image.new("RGB", (16, 16), colours[i % len(colours)]) for i in range(n)]


def _image_batch(processor):
    processor.tokenizer.padding_side = "left"
    texts = ["<image>\nthe quick brown fox", "<image>\nwhat is 2 plus 3? answer:"]
    return processor(text=texts, images=_images(2), return_tensors="pt", padding=True)


@pytest.fixture(scope="module")
def tiny():
    return _tiny_llava()


def _perturb_visual_expert(model: cogvlm.CogVLMForCausalLM, scale: float = 0.05, bias: bool = True) -> None:
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "vision_expert" in name or "vision_mlp" in name:
                if name.endswith("bias") and not bias:
                    continue
                p.add_(scale * torch.randn(p.shape, generator=g))


@pytest.mark.parametrize("tied", [True, False])
def test_equal_experts_compute_the_llava(tied: bool) -> None:
    _, llava, processor = _tiny_llava(tied=tied)
    cog = cogvlm.from_llava(llava)
    assert ("lm_head.weight" in cog.state_dict()) is not tied
    batch = _image_batch(processor)
    mask = batch["attention_mask"].bool()
    with torch.no_grad():
        ref = llava(**batch).logits
        got = cog(**batch).logits
    assert got.shape == ref.shape
    torch.testing.assert_close(got[mask], ref[mask], atol=2e-5, rtol=1e-4)


def test_text_only_prompts_match_the_language_model(tiny) -> None:
    lm, llava, processor = tiny
    cog = cogvlm.from_llava(llava, lm)
    _perturb_visual_expert(cog)  # the visual expert must not touch text-only prompts
    tok = processor.tokenizer
    tok.padding_side = "left"
    batch = tok(["to be or not", "the lazy dog jumps over"], return_tensors="pt", padding=True)
    mask = batch["attention_mask"].bool()
    with torch.no_grad():
        ref = lm(**batch).logits
        got = cog(**batch).logits[..., : ref.shape[-1]]
    torch.testing.assert_close(got[mask], ref[mask], atol=2e-5, rtol=1e-4)


def test_greedy_generation_matches_transformers(tiny) -> None:
    _, llava, processor = tiny
    cog = cogvlm.from_llava(llava)
    batch = _image_batch(processor)
    pad = processor.tokenizer.pad_token_id
    ref = llava.generate(**batch, max_new_tokens=6, do_sample=False, pad_token_id=pad, eos_token_id=-1)
    got = cog.generate(**batch, max_new_tokens=6, pad_token_id=pad, eos_token_id=-1)
    assert torch.equal(got, ref)
    # Stopping: a row that produced EOS is padded afterwards, as transformers does.
    first = int(got[0, batch["input_ids"].shape[1]])
    stopped = cog.generate(**batch, max_new_tokens=6, pad_token_id=pad, eos_token_id=first)
    assert stopped[0, batch["input_ids"].shape[1] + 1:].eq(pad).all()


def test_visual_expert_changes_image_prompts_only(tiny) -> None:
    _, llava, processor = tiny
    cog = cogvlm.from_llava(llava)
    batch = _image_batch(processor)
    with torch.no_grad():
        before = cog(**batch).logits
        _perturb_visual_expert(cog)
        after = cog(**batch).logits
    assert not torch.allclose(before, after, atol=1e-4)


def test_save_load_and_evaluate_through_load_model(tiny, tmp_path: Path) -> None:
    from souplm.evaluate.lm import HFModel, load_model

    _, llava, processor = tiny
    cog = cogvlm.from_llava(llava)
    _perturb_visual_expert(cog)
    cog.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == cogvlm.MODEL_TYPE
    model, tok, proc = load_model(tmp_path)
    assert isinstance(model, cogvlm.CogVLMForCausalLM)
    for name, tensor in cog.state_dict().items():
        assert torch.equal(model.state_dict()[name], tensor), name
    assert "lm_head.weight" not in model.state_dict()  # tied: stored once, as the embedding
    lm = HFModel(model, tok, proc, batch_size=2, progress=False)
    answers = lm.generate_vqa(["<image>\nwhat colour?"] * 3, _images(3), 4, ["\n"])
    direct = cog.generate(**processor(text=["<image>\nwhat colour?"] * 3, images=_images(3), return_tensors="pt",
                                      padding=True), max_new_tokens=4, pad_token_id=tok.pad_token_id)
    n = direct.shape[1] - 4
    assert answers == [s.split("\n")[0] for s in tok.batch_decode(direct[:, n:], skip_special_tokens=True)]


def test_mapped_merge_at_alpha_one_carries_the_llava_language_model(tiny, tmp_path: Path) -> None:
    """llama-to-cogvlm at alpha 1 puts the LLaVA's decoder into both experts of the CogVLM: the merged
    model then computes what the LLaVA computes (same tower and projector, the visual qkv bias kept at 0)."""
    from souplm.engine import merge
    from souplm.search.adamms import adamms_recipe

    _, llava, processor = tiny
    llava_dir, cog_dir = tmp_path / "llava", tmp_path / "cog"
    llava.save_pretrained(llava_dir)
    processor.save_pretrained(llava_dir)
    cog = cogvlm.from_llava(llava)
    _perturb_visual_expert(cog, bias=False)
    with torch.no_grad():  # and a language expert that differs from the LLaVA's too
        for name, p in cog.named_parameters():
            if "language_" in name:
                p.mul_(1.1)
    cog.save_pretrained(cog_dir)
    processor.save_pretrained(cog_dir)
    batch = _image_batch(processor)
    mask = batch["attention_mask"].bool()
    with torch.no_grad():
        ref = llava(**batch).logits
    for alpha, expect_llava in ((1.0, True), (0.0, False)):
        out = tmp_path / f"merged-{alpha}"
        merge(adamms_recipe(cog_dir, llava_dir, alpha, "llama-to-cogvlm"), out, progress=False)
        merged, _ = cogvlm.load_pretrained(out)
        with torch.no_grad():
            got = merged(**batch).logits
        if expect_llava:
            torch.testing.assert_close(got[mask], ref[mask], atol=2e-5, rtol=1e-4)
        else:
            for name, tensor in cog.state_dict().items():
                assert torch.equal(merged.state_dict()[name], tensor), name


def test_bad_inputs_are_named(tiny, tmp_path: Path) -> None:
    _, llava, processor = tiny
    cog = cogvlm.from_llava(llava)
    batch = _image_batch(processor)
    with pytest.raises(SoupError, match="no pixel_values"):
        cog(batch["input_ids"], batch["attention_mask"])
    with pytest.raises(SoupError, match="image tokens in the prompt"):
        cog(batch["input_ids"], batch["attention_mask"], batch["pixel_values"][:1])
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(SoupError, match="not a souplm_cogvlm config"):
        cogvlm.CogVLMForCausalLM.from_pretrained(tmp_path)
    cog.save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(SoupError, match="no model.safetensors"):
        cogvlm.CogVLMForCausalLM.from_pretrained(tmp_path)
