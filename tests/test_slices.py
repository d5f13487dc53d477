"""mergekit's `slices:` (issue 13 §1-2): sub-ranges, stacked frankenmerges, per-slice parameters and base, gradient
positions, filters, required parameters, and the output config following the stacked layers.

Every expected value is an independent statement: which input layer each output layer is (written here as a
table), and the merged values as a NumPy float64 formula of the inputs. Models are tiny (4 layers) and made here.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, Qwen3Config, Qwen3ForCausalLM

import souplm
from souplm import Recipe, SoupError
from souplm.cli import main as cli
from souplm.engine import prepare

L = 4


def _save(model, path: Path) -> Path:
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    root = tmp_path_factory.mktemp("zoo")
    cfg = LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=L, num_attention_heads=2,
                      num_key_value_heads=1, vocab_size=48, max_position_embeddings=64)
    out = {}
    for i, name in enumerate(["base", "a", "b", "c"]):
        torch.manual_seed(i)
        out[name] = _save(LlamaForCausalLM(cfg), root / name)
    small = LlamaConfig(**{**cfg.to_dict(), "num_hidden_layers": 2})
    torch.manual_seed(9)
    out["two"] = _save(LlamaForCausalLM(small), root / "two")
    for i, types in enumerate([["sliding_attention", "full_attention"] * 2,
                               ["full_attention", "full_attention", "sliding_attention", "sliding_attention"]]):
        q = Qwen3Config(hidden_size=16, intermediate_size=32, num_hidden_layers=L, num_attention_heads=2,
                        num_key_value_heads=1, head_dim=8, vocab_size=48, max_position_embeddings=64,
                        use_sliding_window=True, sliding_window=8, max_window_layers=L, layer_types=types)
        torch.manual_seed(20 + i)
        out[f"q{i}"] = _save(Qwen3ForCausalLM(q), root / f"q{i}")
    return out


def w(path: Path) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    for f in sorted(Path(path).glob("*.safetensors")):
        out.update({k: v.double().numpy() for k, v in load_file(f).items()})
    return out


def layer(name: str, i: int) -> str:
    return f"model.layers.{i}.{name}"


Q, UP, NORM = "self_attn.q_proj.weight", "mlp.up_proj.weight", "input_layernorm.weight"
SUFFIXES = (Q, "self_attn.k_proj.weight", "self_attn.v_proj.weight", "self_attn.o_proj.weight", UP,
            "mlp.gate_proj.weight", "mlp.down_proj.weight", NORM, "post_attention_layernorm.weight")


def merge(recipe: dict, out: Path) -> dict[str, np.ndarray]:
    souplm.merge(recipe, out, progress=False, hash_inputs=False)
    return w(out)


def generates(path: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(path)
    ids = model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=3, do_sample=False)
    assert ids.shape == (1, 6)


# -- one slice ----------------------------------------------------------------------------------------
def test_one_slice_sub_range_writes_only_those_layers_renumbered(zoo, tmp_path):
    recipe = {"merge_method": "linear", "slices": [{"sources": [
        {"model": str(zoo["a"]), "layer_range": [1, 3], "parameters": {"weight": 0.25}},
        {"model": str(zoo["b"]), "layer_range": [1, 3], "parameters": {"weight": 0.75}}]}]}
    got = merge(recipe, tmp_path / "o")
    wa, wb = w(zoo["a"]), w(zoo["b"])
    layers = {int(k.split(".")[2]) for k in got if k.startswith("model.layers.")}
    assert layers == {0, 1}  # layers 1 and 2 of the inputs, renumbered from 0
    for out_i, in_i in [(0, 1), (1, 2)]:
        for s in SUFFIXES:
            np.testing.assert_allclose(got[layer(s, out_i)], 0.25 * wa[layer(s, in_i)] + 0.75 * wb[layer(s, in_i)],
                                       rtol=0, atol=1e-6)
    np.testing.assert_allclose(got["model.embed_tokens.weight"],
                               0.25 * wa["model.embed_tokens.weight"] + 0.75 * wb["model.embed_tokens.weight"], atol=1e-6)
    cfg = json.loads((tmp_path / "o" / "config.json").read_text())
    assert cfg["num_hidden_layers"] == 2
    generates(tmp_path / "o")


def test_slice_parameters_apply_and_source_parameters_win(zoo, tmp_path):
    # task arithmetic: base + sum_i w_i (theta_i - base); the slice's weight 0.5 for A, B's own 0.2, recipe's ignored
    recipe = {"merge_method": "task_arithmetic", "base_model": str(zoo["base"]),
              "parameters": {"weight": 9.0},
              "slices": [{"parameters": {"weight": 0.5}, "sources": [
                  {"model": str(zoo["base"]), "layer_range": [0, L]},
                  {"model": str(zoo["a"]), "layer_range": [0, L]},
                  {"model": str(zoo["b"]), "layer_range": [0, L], "parameters": {"weight": 0.2}}]}]}
    got = merge(recipe, tmp_path / "o")
    w0, wa, wb = w(zoo["base"]), w(zoo["a"]), w(zoo["b"])
    for k in got:
        np.testing.assert_allclose(got[k], w0[k] + 0.5 * (wa[k] - w0[k]) + 0.2 * (wb[k] - w0[k]), rtol=0, atol=1e-5)


def test_slice_base_model_is_the_base_not_an_extra_model(zoo, tmp_path):
    recipe = {"merge_method": "task_arithmetic", "base_model": str(zoo["c"]),  # the slice's own base wins
              "slices": [{"base_model": str(zoo["base"]), "sources": [
                  {"model": str(zoo["base"]), "layer_range": [0, 2]},
                  {"model": str(zoo["a"]), "layer_range": [2, 4], "parameters": {"weight": 0.5}}]}]}
    got = merge(recipe, tmp_path / "o")
    w0, wa = w(zoo["base"]), w(zoo["a"])
    for out_i, (ib, ia) in enumerate([(0, 2), (1, 3)]):
        for s in SUFFIXES:
            np.testing.assert_allclose(got[layer(s, out_i)], w0[layer(s, ib)] + 0.5 * (wa[layer(s, ia)] - w0[layer(s, ib)]),
                                       rtol=0, atol=1e-5)
    plan, _ = prepare(recipe)
    name = [c.path.name for c in plan.checkpoints]
    assert [[(name[k], j) for k, j in ls.inputs] for ls in plan.layers] == [[("a", 2)], [("a", 3)]]
    assert [(name[ls.base[0]], ls.base[1]) for ls in plan.layers] == [("base", 0), ("base", 1)]


def test_slerp_slice_t_and_base_first(zoo, tmp_path):
    # t = 0 is the base whatever the order of the sources; the slice's t wins over the recipe's
    recipe = {"merge_method": "slerp", "base_model": str(zoo["a"]), "parameters": {"t": 1.0},
              "slices": [{"parameters": {"t": 0.0}, "sources": [
                  {"model": str(zoo["b"]), "layer_range": [0, L]}, {"model": str(zoo["a"]), "layer_range": [0, L]}]}]}
    got, wa = merge(recipe, tmp_path / "o"), w(zoo["a"])
    for k in got:
        np.testing.assert_allclose(got[k], wa[k], rtol=0, atol=1e-6)


# -- gradients ----------------------------------------------------------------------------------------
def mk_value(values: list[float], t: float) -> float:
    """mergekit's gradient, restated: position s = t (n - 1), linear between the neighbouring values."""
    s = t * (len(values) - 1)
    i0 = int(np.floor(s))
    i1 = min(len(values) - 1, i0 + 1)
    return (1 - (s - i0)) * values[i0] + (s - i0) * values[i1]


@pytest.mark.parametrize("form", ["models", "slices"])
def test_gradient_positions_match_mergekit(zoo, tmp_path, form):
    grad = [0.0, 0.5, 1.0]
    if form == "models":
        recipe = {"merge_method": "task_arithmetic", "base_model": str(zoo["base"]),
                  "models": [{"model": str(zoo["a"]), "parameters": {"weight": grad}}]}
        positions = {i: i / (L - 1) for i in range(L)}
    else:  # two slices: each slice's gradient runs from its first to its last layer (a lone layer sits at 1)
        recipe = {"merge_method": "task_arithmetic", "base_model": str(zoo["base"]), "slices": [
            {"sources": [{"model": str(zoo["base"]), "layer_range": [0, 3]},
                         {"model": str(zoo["a"]), "layer_range": [0, 3], "parameters": {"weight": grad}}]},
            {"sources": [{"model": str(zoo["base"]), "layer_range": [3, 4]},
                         {"model": str(zoo["a"]), "layer_range": [3, 4], "parameters": {"weight": grad}}]}]}
        positions = {0: 0.0, 1: 0.5, 2: 1.0, 3: 1.0}
    got, w0, wa = merge(recipe, tmp_path / "o"), w(zoo["base"]), w(zoo["a"])
    for i, t in positions.items():
        lam = mk_value(grad, t)
        np.testing.assert_allclose(got[layer(UP, i)], w0[layer(UP, i)] + lam * (wa[layer(UP, i)] - w0[layer(UP, i)]),
                                   rtol=0, atol=1e-6)
    # outside the layers (embedding, final norm, lm_head) mergekit takes position 0: the first value
    for k in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"):
        np.testing.assert_allclose(got[k], w0[k], rtol=0, atol=0)


def test_gradient_between_points(zoo, tmp_path):
    grad = [0.1, 0.9, 0.3, 0.7]  # 4 points on 4 layers: layer 1 at s = 1, layer 2 at 2
    recipe = {"merge_method": "task_arithmetic", "base_model": str(zoo["base"]),
              "models": [{"model": str(zoo["a"]), "parameters": {"weight": [0.0, 1.0, 0.25]}}]}
    got, w0, wa = merge(recipe, tmp_path / "o"), w(zoo["base"]), w(zoo["a"])
    lam = mk_value([0.0, 1.0, 0.25], 2 / 3)  # layer 2 of 4: s = 4/3, between 1.0 and 0.25
    np.testing.assert_allclose(lam, 1.0 - (1 / 3) * 0.75)
    np.testing.assert_allclose(got[layer(Q, 2)], w0[layer(Q, 2)] + lam * (wa[layer(Q, 2)] - w0[layer(Q, 2)]), atol=1e-6)
    assert grad  # (the 4-point list is stated for the reader: positions are t (n - 1), not layer indices)


# -- filters ------------------------------------------------------------------------------------------
def test_filters_star_substring_and_fall_through(zoo, tmp_path):
    recipe = {"merge_method": "task_arithmetic", "base_model": str(zoo["base"]),
              "parameters": {"weight": 0.25},  # below the model's own setting: asked when no entry matches
              "models": [{"model": str(zoo["a"]), "parameters": {"weight": [{"filter": "mlp", "value": 1.0},
                                                                            {"filter": "self_attn", "value": 0.5}]}},
                         {"model": str(zoo["b"]), "parameters": {"weight": [{"filter": "*", "value": 0.1}]}}]}
    got, w0, wa, wb = merge(recipe, tmp_path / "o"), w(zoo["base"]), w(zoo["a"]), w(zoo["b"])
    for k, wt_a in [(layer(UP, 1), 1.0), (layer(Q, 1), 0.5), (layer(NORM, 1), 0.25), ("lm_head.weight", 0.25)]:
        np.testing.assert_allclose(got[k], w0[k] + wt_a * (wa[k] - w0[k]) + 0.1 * (wb[k] - w0[k]), rtol=0, atol=1e-6)


def test_star_is_not_a_glob(zoo):
    # "*" alone matches everything; "*mlp" is a literal substring (as in mergekit): it matches nothing here
    recipe = {"merge_method": "task_arithmetic", "base_model": str(zoo["base"]), "parameters": {"weight": 0.3},
              "models": [{"model": str(zoo["a"]), "parameters": {"weight": [{"filter": "*mlp", "value": 1.0}]}}]}
    plan, _ = prepare(recipe)
    assert {float(i.model_params["weight"][0]) for i in plan.items if i.canonical} == {np.float32(0.3)}


# -- base listed among models -------------------------------------------------------------------------
@pytest.mark.parametrize(("method", "params"), [
    ("linear", {"weight": 0.5}), ("uniform", {}), ("slerp", {}), ("task_arithmetic", {"weight": 0.5}),
    ("ties", {"weight": 0.5, "density": 0.5}), ("dare_linear", {"weight": 0.5, "density": 0.5}),
    ("dare_ties", {"weight": 0.5, "density": 0.5}), ("wise_ft", {"weight": 0.5})])
def test_base_listed_among_models_plans_for_every_method(zoo, method, params):
    models = [{"model": str(zoo["base"])}, {"model": str(zoo["a"]), "parameters": params}]
    if method not in ("slerp", "wise_ft"):
        models.append({"model": str(zoo["b"]), "parameters": params})
    if method == "linear":
        models[0]["parameters"] = params
    top = {"t": 0.5} if method == "slerp" else {}
    plan, _ = prepare({"merge_method": method, "base_model": str(zoo["base"]), "models": models, "parameters": top})
    item = next(i for i in plan.items if i.canonical == layer(Q, 0))
    base_k = [str(c.path) for c in plan.checkpoints].index(str(zoo["base"]))
    if method in ("linear", "uniform"):  # the base is one of the averaged models (mergekit: the same)
        assert base_k in item.sources and item.base is None
    elif method == "slerp":  # t = 0 is the base
        assert item.sources[0] == base_k and item.base is None
    else:  # the base of the task vectors, not a model of its own
        assert base_k not in item.sources and item.base_from == base_k


def test_linear_with_base_among_models_merges_it_once(zoo, tmp_path):
    recipe = {"merge_method": "linear", "base_model": str(zoo["base"]), "models": [
        {"model": str(zoo["base"]), "parameters": {"weight": 1.0}}, {"model": str(zoo["a"]), "parameters": {"weight": 3.0}}]}
    got, w0, wa = merge(recipe, tmp_path / "o"), w(zoo["base"]), w(zoo["a"])
    for k in got:
        np.testing.assert_allclose(got[k], 0.25 * w0[k] + 0.75 * wa[k], rtol=0, atol=1e-6)


# -- frankenmerges ------------------------------------------------------------------------------------
def test_passthrough_stack_of_two_models(zoo, tmp_path):
    # the shape of mergekit's orcamini-platy-44layer example: [0, 3) of A, then [1, 4) of B -> 6 layers
    recipe = {"merge_method": "passthrough", "dtype": "float32", "slices": [
        {"sources": [{"model": str(zoo["a"]), "layer_range": [0, 3]}]},
        {"sources": [{"model": str(zoo["b"]), "layer_range": [1, 4]}]}]}
    got, wa, wb = merge(recipe, tmp_path / "o"), w(zoo["a"]), w(zoo["b"])
    table = [("a", 0), ("a", 1), ("a", 2), ("b", 1), ("b", 2), ("b", 3)]  # output layer i = table[i]
    src = {"a": wa, "b": wb}
    assert {k for k in got if k.startswith("model.layers.")} == {layer(s, i) for i in range(6) for s in SUFFIXES}
    for i, (m, j) in enumerate(table):
        for s in SUFFIXES:
            np.testing.assert_array_equal(got[layer(s, i)], src[m][layer(s, j)])
    np.testing.assert_array_equal(got["model.embed_tokens.weight"], wa["model.embed_tokens.weight"])  # first slice's
    np.testing.assert_array_equal(got["model.norm.weight"], wb["model.norm.weight"])  # last slice's
    np.testing.assert_array_equal(got["lm_head.weight"], wb["lm_head.weight"])
    cfg = json.loads((tmp_path / "o" / "config.json").read_text())
    assert cfg["num_hidden_layers"] == 6
    generates(tmp_path / "o")
    # the saved recipe rebuilds the same bytes
    assert cli(["merge", str(tmp_path / "o" / "souplm_recipe.yaml"), "-o", str(tmp_path / "again"), "--quiet",
                "--no-hash"]) == 0
    again = w(tmp_path / "again")
    assert all(np.array_equal(again[k], got[k]) for k in got)


def test_self_stack_like_mergekit_gpt2_stack_test(zoo, tmp_path):
    recipe = {"merge_method": "passthrough", "slices": [{"sources": [{"model": str(zoo["a"]), "layer_range": [0, L]}]}] * 2}
    got, wa = merge(recipe, tmp_path / "o"), w(zoo["a"])
    for i in range(2 * L):
        np.testing.assert_array_equal(got[layer(Q, i)], wa[layer(Q, i % L)])
    assert json.loads((tmp_path / "o" / "config.json").read_text())["num_hidden_layers"] == 2 * L
    generates(tmp_path / "o")


def test_stack_of_merged_slices_with_their_own_methods_inputs(zoo, tmp_path):
    # slice 0: linear of A [0, 2) and B [2, 4); slice 1: linear of C [1, 3) alone (weights per slice)
    recipe = {"merge_method": "linear", "slices": [
        {"parameters": {"weight": 1.0}, "sources": [{"model": str(zoo["a"]), "layer_range": [0, 2]},
                                                   {"model": str(zoo["b"]), "layer_range": [2, 4],
                                                    "parameters": {"weight": 3.0}}]},
        {"sources": [{"model": str(zoo["c"]), "layer_range": [1, 3], "parameters": {"weight": 2.0}}]}]}
    got, wa, wb, wc = merge(recipe, tmp_path / "o"), w(zoo["a"]), w(zoo["b"]), w(zoo["c"])
    for s in SUFFIXES:
        for i in range(2):
            np.testing.assert_allclose(got[layer(s, i)], 0.25 * wa[layer(s, i)] + 0.75 * wb[layer(s, i + 2)], atol=1e-6)
            np.testing.assert_allclose(got[layer(s, 2 + i)], wc[layer(s, 1 + i)], atol=1e-6)
    np.testing.assert_allclose(got["lm_head.weight"], wc["lm_head.weight"], atol=1e-6)  # the last slice's inputs
    generates(tmp_path / "o")


def test_per_layer_config_lists_follow_the_stacked_layers(zoo, tmp_path):
    recipe = {"merge_method": "passthrough", "slices": [
        {"sources": [{"model": str(zoo["q0"]), "layer_range": [0, 3]}]},
        {"sources": [{"model": str(zoo["q1"]), "layer_range": [1, 4]}]}]}
    merge(recipe, tmp_path / "o")
    plan, _ = prepare(recipe)
    assert any(n.startswith(f"config max_window_layers = {L} kept from") for n in plan.notes), plan.notes
    cfg = json.loads((tmp_path / "o" / "config.json").read_text())
    q0 = ["sliding_attention", "full_attention", "sliding_attention", "full_attention"]
    q1 = ["full_attention", "full_attention", "sliding_attention", "sliding_attention"]
    assert cfg["num_hidden_layers"] == 6
    assert cfg["layer_types"] == q0[0:3] + q1[1:4]
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "o")
    assert model.config.layer_types == q0[0:3] + q1[1:4]
    assert model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=2, do_sample=False).shape == (1, 5)


# -- bad slices: one line, nothing written -----------------------------------------------------------
@pytest.mark.parametrize(("slices", "method", "message"), [
    ([{"sources": [{"model": "A", "layer_range": [0, 9]}]}], "passthrough", "out of range: the model has 4 layers"),
    ([{"sources": [{"model": "A", "layer_range": [0, 2]}, {"model": "B", "layer_range": [0, 3]}]}], "linear",
     "same number of layers"),
    ([{"sources": [{"model": "A", "layer_range": [2, 2]}]}], "passthrough", "0 <= start < end"),
    ([{"sources": [{"model": "A", "layer_range": [0, 2]}, {"model": "A", "layer_range": [2, 4]}]}], "linear",
     "is a source twice"),
    ([{"sources": [{"model": "A", "layer_range": [0, 2]}, {"model": "B", "layer_range": [0, 2]}]}], "passthrough",
     "slices[0]: method passthrough takes 1 model "),
    ([{"sources": [{"model": "A", "layer_range": [0, 2]}], "base_model": "B"}], "task_arithmetic",
     "is not one of the slice's sources"),
    ([{"sources": [{"model": "A", "layer_range": [0, 2]}, {"model": "B", "layer_range": [0, 2]}]}], "slerp",
     "slerp needs a base_model among the slice's sources"),
    ([{"sources": [{"model": "A", "layer_range": [0, 2], "parameters": {"t": 0.5}}]}], "passthrough",
     "not a per-model parameter"),
    ([{"sources": [{"model": "A", "layer_range": [0, 2]}], "parameters": {"densty": 0.5}}], "passthrough",
     "slices[0].parameters.densty: unknown parameter"),
    ([{"sources": [{"model": "A", "layer_range": [0, 2]}]}], "passthrough+models", "either models or slices"),
    ([{"sources": [{"model": "C", "layer_range": [0, 2]}]}], "passthrough", "model not found"),
])
def test_bad_slices_are_one_line_errors_and_nothing_is_written(zoo, tmp_path, capsys, slices, method, message):
    import yaml

    names = {"A": str(zoo["a"]), "B": str(zoo["b"]), "C": str(tmp_path / "no-such-model")}
    for sl in slices:
        for s in sl["sources"]:
            s["model"] = names[s["model"]]
        if "base_model" in sl:
            sl["base_model"] = names[sl["base_model"]]
    data = {"merge_method": method.split("+")[0], "slices": slices}
    if method.endswith("+models"):
        data["models"] = [{"model": names["A"]}]
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(data))
    out = tmp_path / "out"
    assert cli(["merge", str(path), "-o", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("souplm: error: ") and "\n" not in err and message in err, err
    assert not out.exists()


def test_required_parameters_are_refused_when_missing(zoo):
    from souplm.methods import get_method

    for method in ("ties", "task_arithmetic", "dare_ties", "dare_linear"):  # mergekit: weight has no default
        assert "weight" in get_method(method).required
        with pytest.raises(SoupError, match="needs parameter weight"):
            prepare({"merge_method": method, "base_model": str(zoo["base"]), "models": [{"model": str(zoo["a"])}]})
    # a filter list that leaves some tensor without a value: refused at plan time, before a byte is written
    with pytest.raises(SoupError, match="missing required parameter weight"):
        prepare({"merge_method": "ties", "base_model": str(zoo["base"]),
                 "models": [{"model": str(zoo["a"]), "parameters": {"weight": [{"filter": "mlp", "value": 1.0}]}}]})
    with pytest.raises(SoupError, match=r"slices\[0\]\.sources\[1\].*needs parameter weight"):
        prepare({"merge_method": "ties", "base_model": str(zoo["base"]), "slices": [{"sources": [
            {"model": str(zoo["base"]), "layer_range": [0, 2]}, {"model": str(zoo["a"]), "layer_range": [0, 2]}]}]})


def test_slerp_without_t_is_refused_like_mergekit(zoo):
    with pytest.raises(SoupError, match="needs parameter t"):
        prepare({"merge_method": "slerp", "base_model": str(zoo["a"]), "models": [{"model": str(zoo["b"])}]})


def test_filter_entry_shapes_and_boolean_gradients(zoo):
    base, a = str(zoo["base"]), str(zoo["a"])
    # one entry without the list (mergekit takes it), below it the recipe's value for what it does not match
    plan, _ = prepare({"merge_method": "ties", "base_model": base, "parameters": {"weight": 0.3, "normalize": [True, False]},
                       "models": [{"model": a, "parameters": {"weight": {"filter": "mlp", "value": 1.0}}}]})
    by = {i.canonical: i for i in plan.items if i.canonical}
    assert float(by[layer(UP, 2)].model_params["weight"][0]) == 1.0
    assert float(by[layer(Q, 2)].model_params["weight"][0]) == np.float32(0.3)
    # a boolean gradient steps: position t takes entry floor(t * (n - 1)): True below the last layer, False there
    assert [by[layer(Q, i)].global_params["normalize"] for i in range(L)] == [True, True, True, False]
    assert by["model.embed_tokens.weight"].global_params["normalize"] is True
    with pytest.raises(SoupError, match="a filter entry takes filter and value, not fitler"):
        Recipe.load({"merge_method": "ties", "base_model": base,
                     "models": [{"model": a, "parameters": {"weight": [{"fitler": "mlp", "value": 1.0}]}}]})


def test_both_executors_agree_on_stacked_slices(zoo, tmp_path, monkeypatch):
    recipe = {"merge_method": "task_arithmetic", "base_model": str(zoo["base"]), "dtype": "bfloat16", "slices": [
        {"sources": [{"model": str(zoo["base"]), "layer_range": [0, 2]},
                     {"model": str(zoo["a"]), "layer_range": [2, 4], "parameters": {"weight": 0.7}}]},
        {"sources": [{"model": str(zoo["base"]), "layer_range": [1, 4]},
                     {"model": str(zoo["b"]), "layer_range": [0, 3], "parameters": {"weight": [0.2, 1.0]}}]}]}
    fused = merge(recipe, tmp_path / "fused")
    monkeypatch.setenv("SOUPLM_EXECUTOR", "torch")
    torch_out = merge(recipe, tmp_path / "torch")
    assert set(fused) == set(torch_out) and all(np.array_equal(fused[k], torch_out[k]) for k in fused)
    w0, wb = w(zoo["base"]), w(zoo["b"])
    lam = 0.2 + 0.5 * 0.8  # slice 1's middle layer (output layer 3) sits at t = 1/2
    want = w0[layer(UP, 2)] + lam * (wb[layer(UP, 1)] - w0[layer(UP, 2)])
    np.testing.assert_allclose(torch_out[layer(UP, 3)], want, rtol=2 ** -7, atol=2 ** -9)  # one bf16 step
    cfg = json.loads((tmp_path / "fused" / "config.json").read_text())
    assert cfg["num_hidden_layers"] == 5


def test_slices_refuse_a_coefficient_table_and_note_residual_weight(zoo, tmp_path):
    from souplm import CoefficientTable

    recipe = {"merge_method": "linear", "slices": [{"residual_weight": 0.5, "sources": [
        {"model": str(zoo["a"]), "layer_range": [0, 2], "parameters": {"weight": 1.0}}]}]}
    plan, _ = prepare(recipe)
    assert any("residual_weight is not applied" in n for n in plan.notes)
    assert any("output layers 0-1 (slices[0]): linear of a 0-1" in n for n in plan.notes)
    table = CoefficientTable([str(zoo["a"])], {"default": [1.0]})
    with pytest.raises(SoupError, match="not to slices"):
        prepare(recipe, coefficients=table)


def test_every_method_plans_or_refuses_with_the_base_among_models(zoo):
    from souplm.methods.registry import METHODS, get_method

    get_method("linear")  # registers the built-in methods
    for name, m in sorted(METHODS.items()):
        params = {k: 0.5 for k in m.model_params if k in ("weight", "density", "t")}
        models = [{"model": str(zoo["base"]), "parameters": params}, {"model": str(zoo["a"]), "parameters": params},
                  {"model": str(zoo["b"]), "parameters": params}]
        top = {k: 0.5 for k in m.global_params if k in ("t", "lambda")}
        try:
            prepare({"merge_method": name, "base_model": str(zoo["base"]), "models": models, "parameters": top})
        except SoupError:
            pass  # a one-line refusal (too many models, ...) is fine; any other exception is the bug
