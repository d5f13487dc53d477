"""Tokenizer merges (mergekit's tokenizer_source, tokenizer block, chat_template; issue 13 §3).

Tiny Llamas with tiny word-level tokenizers that differ in plain and added tokens. Every output row is
checked against a statement written here by hand of which model's row (or which default) feeds it, per
mergekit 0.1.5's rules, merged with the method's formula in float64. (These recipes were also run through
mergekit 0.1.5 while the tests were written: same vocabulary, every row per token equal; see
docs/MERGING.md.)
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

from souplm import merge
from souplm.engine import Recipe
from souplm.errors import SoupError

WORDS = ["<unk>", "<s>", "</s>", "hello", "world", "cat", "dog", "a", "b"]
CHATML = "<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\nworld<|im_end|>\n<|im_start|>assistant\n"


def make(path: Path, seed: int, plain=(), added=(), tied: bool = False, chat: str | None = None,
         vocab_size: int | None = None, bpe: bool = False) -> Path:
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(WORDS + list(plain))}
    model = models.BPE(vocab, [], unk_token="<unk>") if bpe else models.WordLevel(vocab, unk_token="<unk>")
    tk = Tokenizer(model)
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    for t, special in added:
        tok.add_tokens([AddedToken(t, special=special, normalized=not special)])
    if chat:
        tok.chat_template = chat
    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=1, vocab_size=vocab_size or len(tok), tie_word_embeddings=tied,
                      max_position_embeddings=64, bos_token_id=1, eos_token_id=2)
    m = LlamaForCausalLM(cfg)
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.5)
    m.save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tk(tmp_path_factory):
    root = tmp_path_factory.mktemp("tok")
    return {
        # base: 9 words, <|im_start|> 9, <|im_end|> 10
        "base": make(root / "base", 0, added=[("<|im_start|>", True), ("<|im_end|>", True)], chat="{{ 'base' }}"),
        # A: + fish 9 (plain), <|im_start|> 10, <tool> 11 (added)
        "A": make(root / "A", 1, plain=["fish"], added=[("<|im_start|>", True), ("<tool>", True)], chat="{{ 'A' }}"),
        # B: + bird 9, fish 10 (plain), <|im_end|> 11
        "B": make(root / "B", 2, plain=["bird", "fish"], added=[("<|im_end|>", True)], chat="{{ 'A' }}"),
        # T: tied, + fish 9
        "T": make(root / "T", 3, plain=["fish"], tied=True),
        # C, D: base's vocabulary, another chat template
        "C": make(root / "C", 5, added=[("<|im_start|>", True), ("<|im_end|>", True)], chat="{{ 'C' }}"),
        "D": make(root / "D", 6, added=[("<|im_start|>", True), ("<|im_end|>", True)], chat="{{ 'C' }}"),
    }


def _rows(path: Path) -> dict[str, np.ndarray]:
    t = load_file(str(path / "model.safetensors"))
    out = {"embed": t["model.embed_tokens.weight"].double().numpy()}
    out["head"] = t["lm_head.weight"].double().numpy() if "lm_head.weight" in t else out["embed"]
    return out


def _vocab(path: Path) -> dict[str, int]:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path)).get_vocab()


def _row(rows, vocabs, model: str, token: str, kind: str) -> np.ndarray:
    return rows[model][kind][vocabs[model][token]]


def _expected(spec: dict, weights: dict[str, float], rows, vocabs, token: str, kind: str) -> np.ndarray:
    """sum_m w_m P_m(token) / sum w, P_m by the hand-written rule `spec` for this token."""
    total = np.zeros_like(next(iter(rows.values()))[kind][0])
    for m, w in weights.items():
        src = spec.get(m, m)  # a model's own row unless the statement names another source
        if src == "zero":
            p = np.zeros_like(total)
        elif isinstance(src, tuple) and src[0] == "mean":
            p = np.mean([_row(rows, vocabs, s, token, kind) for s in src[1:]], axis=0)
        elif isinstance(src, tuple):  # (model, other token)
            p = _row(rows, vocabs, src[0], src[1], kind)
        else:
            p = _row(rows, vocabs, src, token, kind)
        total += w * p
    return total / sum(weights.values())


def _recipe(tmp: Path, body: dict, name: str = "r.yaml") -> Path:
    p = tmp / name
    p.write_text(yaml.safe_dump(body, sort_keys=False))
    return p


def test_union_rows_follow_mergekit_rules(tk, tmp_path):
    weights = {"base": 0.2, "A": 0.3, "B": 0.5}
    body = {
        "merge_method": "linear", "base_model": str(tk["base"]), "dtype": "float32",
        "models": [{"model": str(tk[m]), "parameters": {"weight": w}} for m, w in weights.items()],
        "tokenizer": {"source": "union", "pad_to_multiple_of": 7, "tokens": {
            "<new>": {"source": {"kind": "zero"}},
            "<think>": {"source": {"kind": "model_token", "model": str(tk["A"]), "token": "dog"}},
            "hello": {"source": str(tk["B"]), "force": True},
        }},
        "chat_template": "chatml",
    }
    out = tmp_path / "out"
    merge(_recipe(tmp_path, body), out, progress=False)
    vocabs = {m: _vocab(tk[m]) for m in tk}
    rows = {m: _rows(tk[m]) for m in tk}
    got_vocab = _vocab(out)
    # base's 11 tokens keep their ids; then plain new tokens (A's, then B's), added ones, the tokens block's
    want_vocab = {**vocabs["base"], "fish": 11, "bird": 12, "<tool>": 13, "<new>": 14, "<think>": 15}
    assert got_vocab == want_vocab
    # Which row each model gives, token by token (absent: the model's own row):
    statement = {
        "<|im_start|>": {"B": "base"},  # B lacks it; the base has it
        "<|im_end|>": {"A": "base"},  # A lacks it; the base has it
        "fish": {"base": ("mean", "A", "B")},  # two models have it, not the base: their mean
        "bird": {"base": "B", "A": "B"},  # only B has it
        "<tool>": {"base": "A", "B": "A"},  # only A has it
        "<new>": {m: "zero" for m in weights},  # in no model, tokens block: zero
        "<think>": {m: ("A", "dog") for m in weights},  # tokens block: A's row of "dog"
        "hello": {m: "B" for m in weights},  # forced: B's row in every model
    }
    got = _rows(out)
    assert got["embed"].shape == (21, 16) and got["head"].shape == (21, 16)  # 16 tokens padded to 21
    for kind in ("embed", "head"):
        want = np.stack([_expected(statement.get(t, {}), weights, rows, vocabs, t, kind)
                         for t, _ in sorted(want_vocab.items(), key=lambda kv: kv[1])])
        np.testing.assert_allclose(got[kind][:16], want, rtol=1e-6, atol=1e-6)
        # padding rows: each model's mean over its aligned rows, so (linear) the mean of the merged rows
        np.testing.assert_allclose(got[kind][16:], np.broadcast_to(want.mean(0), (5, 16)), rtol=1e-5, atol=1e-6)
    assert json.loads((out / "config.json").read_text())["vocab_size"] == 21
    card = (out / "README.md").read_text()
    assert "tokenizer keys built it" in card and "tokenizer: union of 3 tokenizers, 16 tokens" in card

    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(out))
    msgs = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "world"}]
    assert tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) == CHATML
    model = AutoModelForCausalLM.from_pretrained(str(out))
    ids = tok("hello <tool> bird", return_tensors="pt").input_ids
    assert ids[0].tolist() == [3, 13, 12]
    gen = model.generate(ids, max_new_tokens=3, do_sample=False)
    assert gen.shape == (1, 6)

    # The saved recipe reproduces the same bytes from another directory (its tokenizer paths are absolute).
    again = tmp_path / "again"
    cwd = os.getcwd()
    os.chdir(tmp_path.parent)
    try:
        merge(out / "souplm_recipe.yaml", again, progress=False)
    finally:
        os.chdir(cwd)
    assert (again / "model.safetensors").read_bytes() == (out / "model.safetensors").read_bytes()


def test_no_base_averages_and_base_source_keeps_base_vocab(tk, tmp_path):
    weights = {"A": 1.0, "B": 3.0}
    models = [{"model": str(tk[m]), "parameters": {"weight": w}} for m, w in weights.items()]
    out = tmp_path / "u"
    merge({"merge_method": "linear", "models": models, "tokenizer_source": "union", "dtype": "float32"}, out,
          progress=False, hash_inputs=False)
    vocabs = {m: _vocab(tk[m]) for m in tk}
    rows = {m: _rows(tk[m]) for m in tk}
    got_vocab, got = _vocab(out), _rows(out)
    # no base: the tokenizer is built on models[0] (A), and no model's row takes precedence
    assert set(got_vocab) == set(vocabs["A"]) | set(vocabs["B"])
    assert {t: got_vocab[t] for t in vocabs["A"]} == vocabs["A"]
    statement = {"bird": {"A": "B"}, "<tool>": {"B": "A"}, "<|im_start|>": {"B": "A"}, "<|im_end|>": {"A": "B"}}
    for t, i in got_vocab.items():
        np.testing.assert_allclose(got["head"][i], _expected(statement.get(t, {}), weights, rows, vocabs, t, "head"),
                                   rtol=1e-6, atol=1e-6)

    out = tmp_path / "b"
    recipe = {"merge_method": "task_arithmetic", "base_model": str(tk["base"]), "dtype": "float32",
              "models": models, "tokenizer_source": "base"}
    merge(recipe, out, progress=False, hash_inputs=False)
    assert _vocab(out) == vocabs["base"]
    got = _rows(out)
    for t, i in vocabs["base"].items():
        # task arithmetic: base + sum_m w_m (P_m - P_base); a model lacking t gives the base's row (delta 0)
        p_base = rows["base"]["embed"][i]
        want = p_base + sum(w * ((_row(rows, vocabs, m, t, "embed") if t in vocabs[m] else p_base) - p_base)
                            for m, w in weights.items())
        np.testing.assert_allclose(got["embed"][i], want, rtol=1e-5, atol=1e-5)


def test_model_source_and_tied_input(tk, tmp_path):
    """tokenizer_source: a model; a tied input's lm_head is its embedding, its missing rows come from the
    other models' lm_heads."""
    weights = {"A": 0.6, "T": 0.4, "B": 0.4}
    models = [{"model": str(tk[m]), "parameters": {"weight": w}} for m, w in weights.items()]
    out = tmp_path / "o"
    merge({"merge_method": "linear", "models": models, "tokenizer_source": str(tk["B"]), "dtype": "float32"}, out,
          progress=False, hash_inputs=False)
    vocabs = {m: _vocab(tk[m]) for m in tk}
    rows = {m: _rows(tk[m]) for m in tk}
    assert _vocab(out) == vocabs["B"]
    got = _rows(out)
    statement = {"bird": {"A": "B", "T": "B"}, "<|im_end|>": {"A": "B", "T": "B"}}
    for kind in ("embed", "head"):
        for t, i in vocabs["B"].items():
            np.testing.assert_allclose(got[kind][i], _expected(statement.get(t, {}), weights, rows, vocabs, t, kind),
                                       rtol=1e-6, atol=1e-6)
    assert "lm_head.weight" not in load_file(str(tk["T"] / "model.safetensors"))  # T's head is its embedding


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_rows(tk, tmp_path, dtype):
    """bf16/fp16 inputs and output: the same statement, from the stored half-precision values, rounded once."""
    import shutil

    from transformers import LlamaForCausalLM

    half = {}
    for m in ("base", "A", "B"):
        half[m] = tmp_path / m
        LlamaForCausalLM.from_pretrained(str(tk[m])).to(getattr(torch, dtype)).save_pretrained(half[m])
        for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
            if (tk[m] / f).exists():
                shutil.copy(tk[m] / f, half[m] / f)
    weights = {"base": 0.25, "A": 0.25, "B": 0.5}
    out = tmp_path / "o"
    merge({"merge_method": "linear", "base_model": str(half["base"]), "dtype": dtype, "tokenizer_source": "union",
           "models": [{"model": str(half[m]), "parameters": {"weight": w}} for m, w in weights.items()]}, out,
          progress=False, hash_inputs=False)
    raw = load_file(str(out / "model.safetensors"))
    assert raw["model.embed_tokens.weight"].dtype == getattr(torch, dtype)
    vocabs = {m: _vocab(tk[m]) for m in weights}
    rows = {m: _rows(half[m]) for m in weights}
    got_vocab, got = _vocab(out), _rows(out)
    statement = {"<|im_start|>": {"B": "base"}, "<|im_end|>": {"A": "base"}, "fish": {"base": ("mean", "A", "B")},
                 "bird": {"base": "B", "A": "B"}, "<tool>": {"base": "A", "B": "A"}}
    for t, i in got_vocab.items():
        want = _expected(statement.get(t, {}), weights, rows, vocabs, t, "embed")
        want = torch.from_numpy(want).to(getattr(torch, dtype)).double().numpy()  # rounded once
        np.testing.assert_allclose(got["embed"][i], want, rtol=2 ** -7 if dtype == "bfloat16" else 2 ** -10,
                                   atol=1e-6, err_msg=t)


def test_tied_output(tk, tmp_path):
    """A tied output (base T) writes one aligned embedding, which transformers uses as lm_head too."""
    from transformers import AutoModelForCausalLM

    weights = {"T": 0.5, "A": 0.5}
    out = tmp_path / "o"
    merge({"merge_method": "linear", "base_model": str(tk["T"]), "dtype": "float32", "tokenizer_source": "union",
           "models": [{"model": str(tk[m]), "parameters": {"weight": w}} for m, w in weights.items()]}, out,
          progress=False, hash_inputs=False)
    assert "lm_head.weight" not in load_file(str(out / "model.safetensors"))
    vocabs = {m: _vocab(tk[m]) for m in weights}
    rows = {m: _rows(tk[m]) for m in weights}
    got_vocab, got = _vocab(out), _rows(out)
    assert got_vocab == {**vocabs["T"], "<|im_start|>": 10, "<tool>": 11}
    statement = {"<|im_start|>": {"T": "A"}, "<tool>": {"T": "A"}}
    for t, i in got_vocab.items():
        np.testing.assert_allclose(got["embed"][i], _expected(statement.get(t, {}), weights, rows, vocabs, t, "embed"),
                                   rtol=1e-6, atol=1e-6)
    model = AutoModelForCausalLM.from_pretrained(str(out))
    assert model.config.vocab_size == 12 and model.get_output_embeddings().weight.shape[0] == 12
    assert model.generate(torch.tensor([[3, 11]]), max_new_tokens=2, do_sample=False).shape == (1, 4)


def test_slices_read_the_vocabulary_of_their_own_slice(tk, tmp_path):
    """mergekit aligns a stacked model's embedding over the first slice's models and its lm_head over the last
    slice's: a token the slice's model lacks gets zeros there, whatever the other slice has."""
    recipe = {"merge_method": "passthrough", "dtype": "float32", "tokenizer_source": "union",
              "slices": [{"sources": [{"model": str(tk["A"]), "layer_range": [0, 1]}]},
                         {"sources": [{"model": str(tk["B"]), "layer_range": [0, 1]}]}]}
    out = tmp_path / "o"
    merge(recipe, out, progress=False, hash_inputs=False)
    vocabs = {m: _vocab(tk[m]) for m in ("A", "B")}
    rows = {m: _rows(tk[m]) for m in ("A", "B")}
    got_vocab, got = _vocab(out), _rows(out)
    assert set(got_vocab) == set(vocabs["A"]) | set(vocabs["B"])
    for kind, model in (("embed", "A"), ("head", "B")):
        for t, i in got_vocab.items():
            want = rows[model][kind][vocabs[model][t]] if t in vocabs[model] else np.zeros(16)
            np.testing.assert_array_equal(got[kind][i], want)


def test_chat_template_without_tokenizer_key(tk, tmp_path):
    from transformers import AutoTokenizer

    models = [{"model": str(tk[m]), "parameters": {"weight": 1.0}} for m in ("base", "C", "D")]
    base_vocab = _vocab(tk["base"])
    for template, render in [("auto", "C"),  # the template most inputs carry ("{{ 'literal template: ' + messages[0]['content'] }}", "literal template: x"),
                             ("chatml", "<|im_start|>user\nx<|im_end|>\n")]:
        out = tmp_path / f"c{len(render)}"
        merge({"merge_method": "linear", "models": models, "chat_template": template}, out, progress=False,
              hash_inputs=False)
        tok = AutoTokenizer.from_pretrained(str(out))
        assert tok.get_vocab() == base_vocab  # the output model's tokenizer, only the template set
        assert tok.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False) == render


def test_stripped_base_and_rows_past_vocab_size(tk, tmp_path):
    """A tokenizer with more ids than the model has rows: those tokens have no row (mergekit strips them
    from a BPE base; a non-BPE base is refused)."""
    base = make(tmp_path / "bpe", 4, plain=["fish"], added=[("<extra>", True)], vocab_size=10, bpe=True)
    models = [{"model": str(base), "parameters": {"weight": 1.0}}, {"model": str(tk["A"]), "parameters": {"weight": 1.0}}]
    out = tmp_path / "o"
    merge({"merge_method": "linear", "base_model": str(base), "models": models, "tokenizer_source": "base"}, out,
          progress=False, hash_inputs=False)
    v = _vocab(out)
    assert "<extra>" not in v and len(v) == 10 and _rows(out)["embed"].shape[0] == 10
    wl = make(tmp_path / "wl", 5, added=[("<extra>", True)], vocab_size=9)
    with pytest.raises(SoupError, match="only a BPE tokenizer"):
        merge({"merge_method": "linear", "base_model": str(wl), "tokenizer_source": "union",
               "models": [{"model": str(wl), "parameters": {"weight": 1.0}}, {"model": str(tk["A"]), "parameters": {"weight": 1.0}}]},
              tmp_path / "x", progress=False, hash_inputs=False)
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("extra, message", [
    ({"tokenizer_source": "union", "tokenizer": {"source": "base"}}, "not both"),
    ({"tokenizer_source": "union", "vocab_policy": "extend"}, "keep one"),
    ({"tokenizer": {"tokens": {"x": {"source": "/no/such/model"}}}}, "not one of the recipe's models"),
    ({"tokenizer": {"tokens": {"x": {"source": {"kind": "zero", "model": "m"}}}}}, "takes no model"),
    ({"tokenizer": {"tokens": {"x": {"source": {"kind": "model_token", "token": "a"}}}}}, "needs a model"),
    ({"tokenizer": {"pad_to_multiple_of": 0}}, "pad_to_multiple_of"),
    ({"chat_template": "nonsense"}, "neither a template name"),
])
def test_bad_tokenizer_keys_are_one_line_errors(tk, extra, message):
    body = {"merge_method": "linear", "models": [{"model": str(tk["A"])}, {"model": str(tk["B"])}], **extra}
    with pytest.raises(SoupError, match=message) as e:
        Recipe.load(body)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("tokens, message", [
    ({"<zz>": {}}, "give it a source"),
    ({"<zz>": {"source": "A"}}, "is not in model"),
    ({"<zz>": {"source": {"kind": "model_token", "model": "A", "token_id": 99}}}, "out of range"),
    ({"<zz>": {"source": {"kind": "model_token", "model": "A", "token": "nope"}}}, "is not in the tokenizer"),
])
def test_bad_token_sources_are_refused_before_writing(tk, tmp_path, tokens, message):
    tokens = {t: {**e, "source": ({**e["source"], "model": str(tk["A"])} if isinstance(e.get("source"), dict)
                                  else str(tk["A"]))} if "source" in e else e for t, e in tokens.items()}
    body = {"merge_method": "linear", "models": [{"model": str(tk["A"])}, {"model": str(tk["B"])}],
            "tokenizer": {"source": "union", "tokens": tokens}}
    with pytest.raises(SoupError, match=message):
        merge(body, tmp_path / "o", progress=False, hash_inputs=False)
    assert not (tmp_path / "o").exists()


def test_vocab_mismatch_without_tokenizer_key_is_a_message(tk, tmp_path):
    body = {"merge_method": "linear", "models": [{"model": str(tk["base"])}, {"model": str(tk["A"])}]}
    with pytest.raises(SoupError, match="vocabulary size differs"):
        merge(body, tmp_path / "o", progress=False, hash_inputs=False)
