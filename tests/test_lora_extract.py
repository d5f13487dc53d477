"""LoRA extraction: the adapter, loaded by PEFT, reproduces the fine-tune to the SVD's error."""

from __future__ import annotations

import warnings

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("peft")

from safetensors.torch import load_file, save_file
from test_lora import tiny_llama

from souplm.cli import main
from souplm.errors import SoupError
from souplm.lora.extract import extract_lora

LOW_RANK = ("model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.down_proj.weight", "lm_head.weight")


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """A base, and a 'fine-tune' whose changes are rank-3 on three weights, plus a norm and the embedding."""
    d = tmp_path_factory.mktemp("pair")
    tiny_llama().save_pretrained(d / "base")
    sd = load_file(d / "base" / "model.safetensors")
    g = torch.Generator().manual_seed(0)
    for n in LOW_RANK:
        o, i = sd[n].shape
        sd[n] = sd[n] + 0.1 * torch.randn(o, 3, generator=g) @ torch.randn(3, i, generator=g)
    sd["model.layers.0.input_layernorm.weight"] = sd["model.layers.0.input_layernorm.weight"] + 0.5
    sd["model.embed_tokens.weight"] = sd["model.embed_tokens.weight"] * 1.1
    (d / "ft").mkdir()
    save_file(sd, d / "ft" / "model.safetensors", metadata={"format": "pt"})
    (d / "ft" / "config.json").write_text((d / "base" / "config.json").read_text())
    return d


def peft_merged(base, adapter):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter).merge_and_unload()
    return m.state_dict()


def test_exact_at_the_true_rank_and_report(pair, tmp_path):
    rep = extract_lora(pair / "base", pair / "ft", tmp_path / "ad", rank=3, dtype="float32")
    ex = {r.name: r for r in rep.by("extracted")}
    assert set(ex) == set(LOW_RANK) and all(r.rank == 3 and r.error < 1e-5 for r in ex.values())
    assert {r.name for r in rep.by("saved")} == {"model.layers.0.input_layernorm.weight", "model.embed_tokens.weight"}
    ft = load_file(pair / "ft" / "model.safetensors")
    merged = peft_merged(pair / "base", tmp_path / "ad")
    for k, v in ft.items():
        torch.testing.assert_close(merged[k], v, atol=1e-5, rtol=1e-5, msg=k)


def test_lower_rank_error_is_the_svd_tail(pair, tmp_path):
    rep = extract_lora(pair / "base", pair / "ft", tmp_path / "ad", rank=1, dtype="float32")
    b, m = load_file(pair / "base" / "model.safetensors"), load_file(pair / "ft" / "model.safetensors")
    for r in rep.by("extracted"):
        s = torch.linalg.svdvals(m[r.name] - b[r.name])
        assert r.error == pytest.approx(float(s[1:].norm() / s.norm()), rel=1e-3)
    merged = peft_merged(pair / "base", tmp_path / "ad")
    n = LOW_RANK[0]
    got = float(torch.linalg.matrix_norm(merged[n] - m[n]) / torch.linalg.matrix_norm(m[n] - b[n]))
    assert got == pytest.approx(next(r.error for r in rep.results if r.name == n), rel=1e-3)


def test_energy_picks_ranks_per_module(pair, tmp_path):
    rep = extract_lora(pair / "base", pair / "ft", tmp_path / "ad", energy=0.999999, dtype="float32")
    assert {r.rank for r in rep.by("extracted")} == {3}
    rep = extract_lora(pair / "base", pair / "ft", tmp_path / "ad2", energy=0.5, max_rank=2)
    assert all(1 <= r.rank <= 2 for r in rep.by("extracted"))
    peft_merged(pair / "base", tmp_path / "ad2")  # loads in PEFT (rank_pattern/alpha_pattern where ranks differ)


def test_validation_before_any_svd(pair, tmp_path, capsys):
    from transformers import LlamaConfig, LlamaForCausalLM

    other = tmp_path / "other"
    LlamaForCausalLM(LlamaConfig(vocab_size=80, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, attention_bias=True)).save_pretrained(other)
    rc = main(["extract-lora", "--base", str(pair / "base"), "--model", str(other), "--rank", "2", "-o", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 2 and "vocabulary mismatch" in err and not (tmp_path / "o").exists()
    with pytest.raises(SoupError, match="nothing to extract"):
        extract_lora(pair / "base", pair / "base", tmp_path / "o2", rank=2)
    assert not (tmp_path / "o2").exists()
    rc = main(["extract-lora", "--base", str(pair / "base"), "--model", str(pair / "ft"), "--rank", "3",
               "-o", str(tmp_path / "o3")])
    assert rc == 0 and "extracted 3 modules" in capsys.readouterr().out
