"""The merge engine on tiny real checkpoints: formulas end to end, LLaVA wrappers, and bad inputs."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, LlavaForConditionalGeneration

import souplm
from souplm import CoefficientTable, Recipe, SoupError
from souplm.cli import main as cli


def weights(path: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(Path(path).glob("*.safetensors")):
        out.update(load_file(f))
    return out


def assert_nothing_left(parent: Path, name: str) -> None:
    assert not (parent / name).exists()
    assert not [p for p in parent.iterdir() if p.name.startswith(f".{name}.")], "temporary directory left behind"


# -- formulas, end to end -------------------------------------------------------------------------
def test_vanilla_soup_is_alpha_a_plus_one_minus_alpha_b_and_generates(family, tmp_path):
    out = tmp_path / "soup"
    souplm.merge(Recipe.vanilla(family["a"], family["other"], 0.3), out, progress=False)
    wa, wb, ws = weights(family["a"]), weights(family["other"]), weights(out)
    assert set(ws) == set(wa)
    for k in ws:
        torch.testing.assert_close(ws[k], 0.3 * wa[k] + 0.7 * wb[k], rtol=0, atol=1e-6)
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=4, do_sample=False).shape == (1, 7)
    card = (out / "README.md").read_text()
    assert "linear" in card and str(family["a"]) in card and "sha256" in card


def test_cli_quick_form_and_recipe_form_agree(family, tmp_path):
    assert cli(["merge", "--model", str(family["a"]), "--model", str(family["b"]), "--alpha", "0.3",
                "-o", str(tmp_path / "q"), "--quiet"]) == 0
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"merge_method": "linear", "models": [
        {"model": str(family["a"]), "parameters": {"weight": 0.3}},
        {"model": str(family["b"]), "parameters": {"weight": 0.7}}]}))
    assert cli(["merge", str(recipe), "-o", str(tmp_path / "r"), "--quiet"]) == 0
    q, r = weights(tmp_path / "q"), weights(tmp_path / "r")
    assert all(torch.equal(q[k], r[k]) for k in q)


def test_sharded_input_and_sharded_output(family, tmp_path):
    out = tmp_path / "soup"
    recipe = Recipe.vanilla(family["sharded"], family["other"], 0.5, shard_size=30_000)
    souplm.merge(recipe, out, progress=False)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    ws, wa, wb = weights(out), weights(family["sharded"]), weights(family["other"])
    for k in ws:
        torch.testing.assert_close(ws[k], 0.5 * wa[k] + 0.5 * wb[k], rtol=0, atol=1e-6)
    AutoModelForCausalLM.from_pretrained(out)


def test_output_dtype_and_config(family, tmp_path):
    out = tmp_path / "bf16"
    souplm.merge(Recipe.vanilla(family["a"], family["b"], 0.5, dtype="bfloat16"), out, progress=False)
    assert all(t.dtype == torch.bfloat16 for t in weights(out).values())
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"


def test_ties_recipe_in_mergekit_format(family, tmp_path):
    """A mergekit recipe (base listed among models, as mergekit users write it) runs unchanged."""
    recipe = {
        "models": [{"model": str(family["base"])},
                   {"model": str(family["a"]), "parameters": {"weight": 1.0, "density": 0.5}},
                   {"model": str(family["b"]), "parameters": {"weight": 1.0, "density": 0.5}}],
        "merge_method": "ties", "base_model": str(family["base"]),
        "parameters": {"normalize": True, "int8_mask": True}, "dtype": "float32",
    }
    out = tmp_path / "ties"
    report = souplm.merge(recipe, out, progress=False)
    assert len(report.plan.recipe.models) == 2
    ws, base = weights(out), weights(family["base"])
    k = "model.layers.0.mlp.up_proj.weight"
    delta = ws[k] - base[k]
    # with density 0.5 per model, at most all entries changed and at least ~half (union of two top halves)
    frac = (delta != 0).float().mean().item()
    assert 0.5 <= frac <= 1.0


def test_mergekit_unsupported_keys_are_named(family, tmp_path):
    with pytest.raises(SoupError, match="modules"):
        Recipe.load({"merge_method": "linear", "modules": {}, "models": [{"model": str(family["a"])}]})


def test_slerp_recipe_with_layer_gradient(family, tmp_path):
    recipe = {
        "slices": [{"sources": [{"model": str(family["a"]), "layer_range": [0, 2]},
                                {"model": str(family["other"]), "layer_range": [0, 2]}]}],
        "merge_method": "slerp", "base_model": str(family["a"]),
        "parameters": {"t": [{"filter": "self_attn", "value": [0.0, 1.0]}, {"value": 0.0}]},
    }
    out = tmp_path / "slerp"
    souplm.merge(recipe, out, progress=False)
    ws, wa, wo = weights(out), weights(family["a"]), weights(family["other"])
    q0, q1 = "model.layers.0.self_attn.q_proj.weight", "model.layers.1.self_attn.q_proj.weight"
    torch.testing.assert_close(ws[q0], wa[q0], rtol=0, atol=1e-5)  # t = 0 at the first layer
    torch.testing.assert_close(ws[q1], wo[q1], rtol=0, atol=1e-5)  # t = 1 at the last layer
    up = "model.layers.1.mlp.up_proj.weight"
    torch.testing.assert_close(ws[up], wa[up], rtol=0, atol=1e-5)  # fallback value 0


def test_coefficient_table_overrides_per_unit(family, tmp_path):
    table = CoefficientTable([str(family["a"]), str(family["other"])],
                             {"layers.1.q": [1.0, 0.0], "embed": [0.0, 1.0],
                              "model.layers.0.mlp.down_proj.weight": [0.25, 0.75]})
    path = table.save(tmp_path / "t.json")
    out = tmp_path / "soup"
    assert cli(["merge", "--model", str(family["a"]), "--model", str(family["other"]), "--alpha", "0.5",
                "--coefficients", str(path), "-o", str(out), "--quiet"]) == 0
    ws, wa, wo = weights(out), weights(family["a"]), weights(family["other"])
    assert torch.equal(ws["model.layers.1.self_attn.q_proj.weight"], wa["model.layers.1.self_attn.q_proj.weight"])
    assert torch.equal(ws["model.embed_tokens.weight"], wo["model.embed_tokens.weight"])
    d = "model.layers.0.mlp.down_proj.weight"
    torch.testing.assert_close(ws[d], 0.25 * wa[d] + 0.75 * wo[d], rtol=0, atol=1e-6)
    v = "model.layers.1.self_attn.v_proj.weight"  # not in the table: the recipe's 0.5
    torch.testing.assert_close(ws[v], 0.5 * wa[v] + 0.5 * wo[v], rtol=0, atol=1e-6)
    assert (out / "souplm_coefficients.json").is_file()


def test_row_granularity_table(family, tmp_path):
    rows = weights(family["a"])["model.layers.0.self_attn.o_proj.weight"].shape[0]
    w1 = [i / (rows - 1) for i in range(rows)]
    table = CoefficientTable(["a", "o"], {"layers.0.o": [w1, [1 - x for x in w1]]})
    out = tmp_path / "rows"
    souplm.merge(Recipe.vanilla(family["a"], family["other"], 0.5), out, coefficients=table, progress=False)
    k = "model.layers.0.self_attn.o_proj.weight"
    wa, wo, ws = weights(family["a"])[k], weights(family["other"])[k], weights(out)[k]
    expect = torch.stack([w1[r] * wa[r] + (1 - w1[r]) * wo[r] for r in range(rows)])
    torch.testing.assert_close(ws, expect, rtol=0, atol=1e-6)


def test_tied_models(family, tmp_path):
    out = tmp_path / "tied"
    souplm.merge(Recipe.vanilla(family["tied_a"], family["tied_b"], 0.4), out, progress=False)
    ws = weights(out)
    assert "lm_head.weight" not in ws
    m = AutoModelForCausalLM.from_pretrained(out)
    assert m.lm_head.weight.data_ptr() == m.model.embed_tokens.weight.data_ptr()


# -- LLaVA: the SoupLM paper's case ---------------------------------------------------------------
def test_layouts_map_llava_names_both_ways(family):
    from souplm.io.checkpoint import open_checkpoint

    ck = open_checkpoint(family["llava"])
    names = set(ck.canonical_names())
    plain = set(open_checkpoint(family["b"]).canonical_names())
    assert names == plain
    for c in names:
        assert ck.layout.to_canonical(ck.layout.from_canonical(c)) == c
    assert any("vision_tower" in n for n in ck.extra_names())


def test_llava_with_plain_lm_extend_policy(family, tmp_path):
    with pytest.raises(SoupError, match="vocabulary size differs.*vocab_policy"):
        souplm.merge(Recipe.vanilla(family["a"], family["llava"], 0.5), tmp_path / "x", progress=False)
    assert_nothing_left(tmp_path, "x")

    out = tmp_path / "soup"
    souplm.merge(Recipe.vanilla(family["a"], family["llava"], 0.5, vocab_policy="extend"), out, progress=False)
    model = LlavaForConditionalGeneration.from_pretrained(out)
    llava = LlavaForConditionalGeneration.from_pretrained(family["llava"])
    plain = AutoModelForCausalLM.from_pretrained(family["a"])
    emb = model.get_input_embeddings().weight
    torch.testing.assert_close(emb[:-1], 0.5 * plain.model.embed_tokens.weight + 0.5 * llava.get_input_embeddings().weight[:-1])
    torch.testing.assert_close(emb[-1], llava.get_input_embeddings().weight[-1])  # the image token row
    q = "layers.1.self_attn.q_proj.weight"
    torch.testing.assert_close(model.model.language_model.get_parameter(q),
                               0.5 * plain.model.get_parameter(q) + 0.5 * llava.model.language_model.get_parameter(q))
    for (n, p), (_, p0) in zip(model.model.vision_tower.named_parameters(), llava.model.vision_tower.named_parameters()):
        assert torch.equal(p, p0), n  # vision tower copied unchanged
    for p, p0 in zip(model.model.multi_modal_projector.parameters(), llava.model.multi_modal_projector.parameters()):
        assert torch.equal(p, p0)


def test_llava_truncate_policy_patches_vocab(family, tmp_path):
    out = tmp_path / "trunc"
    souplm.merge(Recipe.vanilla(family["a"], family["llava"], 0.5, vocab_policy="truncate"), out, progress=False)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["text_config"]["vocab_size"] == 64
    assert weights(out)["language_model.model.embed_tokens.weight"].shape[0] == 64


def test_soup_into_matches_the_written_merge(family, tmp_path, monkeypatch):
    monkeypatch.setenv("SOUPLM_EXECUTOR", "torch")  # the same executor, so the same bits (test_fused: the other)
    recipe = Recipe.vanilla(family["a"], family["llava_same_vocab"], 0.3)
    out = tmp_path / "disk"
    souplm.merge(recipe, out, progress=False)
    disk = LlavaForConditionalGeneration.from_pretrained(out)
    mem = LlavaForConditionalGeneration.from_pretrained(family["llava_same_vocab"])
    sources = souplm.open_sources(recipe, in_memory=True)
    souplm.soup_into(mem, recipe, sources=sources)
    for (n, p), (_, q) in zip(disk.named_parameters(), mem.named_parameters()):
        assert torch.equal(p, q), n


# -- bad input: one-line error, non-zero exit, nothing written ------------------------------------
def _corrupt_header(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(struct.pack("<Q", 10**6) + data[8:])


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 100])


def _nan(path: Path) -> None:
    sd = load_file(path)
    sd["model.layers.1.mlp.up_proj.weight"][3, 4] = float("nan")
    save_file(sd, path, metadata={"format": "pt"})


def _reshape(path: Path) -> None:
    sd = load_file(path)
    sd["model.layers.0.mlp.up_proj.weight"] = torch.zeros(3, 3)
    save_file(sd, path, metadata={"format": "pt"})


def _drop(path: Path) -> None:
    sd = load_file(path)
    del sd["model.layers.1.self_attn.k_proj.weight"]
    save_file(sd, path, metadata={"format": "pt"})


@pytest.mark.parametrize("damage,message", [
    (_corrupt_header, "corrupted or truncated"),
    (_truncate, "truncated: tensor"),
    (_nan, "model.layers.1.mlp.up_proj.weight of model .* NaN or Inf"),
    (_reshape, "shape mismatch for tensor model.layers.0.mlp.up_proj.weight"),
    (_drop, "tensor model.layers.1.self_attn.k_proj.weight is missing from model"),
])
def test_damaged_input_is_named_and_nothing_is_written(family, tmp_path, capsys, damage, message):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(family["b"], broken)
    damage(broken / "model.safetensors")
    code = cli(["merge", "--model", str(family["a"]), "--model", str(broken), "--alpha", "0.5",
                "-o", str(tmp_path / "out"), "--quiet", "--no-hash"])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and err.startswith("souplm: error:")
    import re

    assert re.search(message, err), err
    assert_nothing_left(tmp_path, "out")


@pytest.mark.parametrize("argv,message", [
    (["--model", "/nonexistent/model", "--model", "{a}", "--alpha", "0.5"], "model not found: /nonexistent/model"),
    (["--model", "{a}", "--model", "{b}", "--method", "ties"], "method ties needs a base_model"),
    (["--model", "{a}", "--model", "{b}", "--method", "nonsense"], "unknown merge method 'nonsense'"),
    (["--model", "{a}", "--model", "{b}", "--alpha", "1.5"], "outside"),
    (["--model", "{a}", "--model", "{b}", "--model", "{other}", "--alpha", "0.5"], "exactly two"),
])
def test_bad_arguments(family, tmp_path, capsys, argv, message):
    argv = [a.format(**{k: str(v) for k, v in family.items()}) for a in argv]
    assert cli(["merge", *argv, "-o", str(tmp_path / "out"), "--quiet"]) == 2
    assert message in capsys.readouterr().err
    assert_nothing_left(tmp_path, "out")


@pytest.mark.parametrize("recipe,message", [
    ("merge_method: linear\nmodels: [{model: A, parameters: {wieght: 1}}]\n", "models[0].parameters.wieght"),
    ("merge_method: ties\nbase_model: B\nmodels: [{model: A}]\nparameters: {densty: 0.5}\n", "parameters.densty"),
    ("merge_method: linear\nmodels: []\n", "models"),
    ("merge_method: linear\nmodels: [{model: A}]\nvocab_policy: sometimes\n", "vocab_policy"),
    ("merge_method: [linear\n", "not valid YAML"),
])
def test_bad_recipes_point_at_the_key(tmp_path, recipe, message):
    p = tmp_path / "r.yaml"
    p.write_text(recipe)
    with pytest.raises(SoupError, match=message.replace("[", r"\[").replace("]", r"\]")):
        Recipe.load(p)


def test_existing_output_needs_force(family, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    with pytest.raises(SoupError, match="exists and is not empty"):
        souplm.merge(Recipe.vanilla(family["a"], family["b"], 0.5), out, progress=False)
    assert (out / "keep.txt").read_text() == "precious"
    souplm.merge(Recipe.vanilla(family["a"], family["b"], 0.5), out, force=True, progress=False)
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").is_file()


@pytest.mark.parametrize("executor", ["fused", "torch"])
def test_interrupt_mid_merge_cleans_up(family, tmp_path, monkeypatch, executor):
    from souplm.io.safetensors_file import SafetensorsWriter

    monkeypatch.setenv("SOUPLM_EXECUTOR", executor)
    calls = {"n": 0}
    real = SafetensorsWriter.write_bytes

    def flaky(*args, **kwargs):  # both executors write through here
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(SafetensorsWriter, "write_bytes", flaky)
    with pytest.raises(KeyboardInterrupt):
        souplm.merge(Recipe.vanilla(family["a"], family["b"], 0.5), tmp_path / "out", progress=False)
    assert_nothing_left(tmp_path, "out")


def test_pickle_needs_explicit_permission(family, tmp_path):
    d = tmp_path / "binmodel"
    d.mkdir()
    torch.save(load_file(family["b"] / "model.safetensors"), d / "pytorch_model.bin")
    (d / "config.json").write_text((family["b"] / "config.json").read_text())
    with pytest.raises(SoupError, match="allow-pickle"):
        souplm.merge(Recipe.vanilla(family["a"], d, 0.5), tmp_path / "o1", progress=False)
    souplm.merge(Recipe.vanilla(family["a"], d, 0.5, allow_pickle=True), tmp_path / "o2", progress=False)
    ws, wa, wb = weights(tmp_path / "o2"), weights(family["a"]), weights(family["b"])
    k = "lm_head.weight"
    torch.testing.assert_close(ws[k], 0.5 * wa[k] + 0.5 * wb[k], rtol=0, atol=1e-6)


def test_dry_run_prints_the_plan_and_writes_nothing(family, tmp_path, capsys):
    assert cli(["merge", "--model", str(family["a"]), "--model", str(family["b"]), "--alpha", "0.5",
                "-o", str(tmp_path / "out"), "--dry-run"]) == 0
    text = capsys.readouterr().out
    assert "soup units" in text and "GB" in text
    assert_nothing_left(tmp_path, "out")


def test_dare_is_reproducible_by_seed(family, tmp_path):
    def run(seed, name):
        r = Recipe.from_models([family["a"], family["b"]], "dare_ties", base_model=family["base"], density=0.5,
                               seed=seed)
        souplm.merge(r, tmp_path / name, progress=False, hash_inputs=False)
        return weights(tmp_path / name)

    one, two, other = run(1, "x"), run(1, "y"), run(2, "z")
    assert all(torch.equal(one[k], two[k]) for k in one)
    assert any(not torch.equal(one[k], other[k]) for k in one)


def test_buffer_pool_lends_best_fit_and_spares_an_output_in_flight():
    from souplm.io import pool as P

    p = P.BufferPool()
    a, b = p.empty((10,), torch.float32), p.empty((100,), torch.float32)
    p.give(a)
    p.give(b)
    c = p.empty((5,), torch.float32)  # the smallest free buffer that fits: a's 40 bytes, not b's 400
    assert c.data_ptr() == a.data_ptr() and c.shape == (5,)
    d = p.empty((10, 10), torch.float32)
    assert d.data_ptr() == b.data_ptr() and p.allocated_bytes == 440  # nothing new was allocated
    p.give(d, keep_alive=d.view(-1))  # an output still to be written is forgotten, never lent again
    e = p.empty((100,), torch.float32)
    assert e.data_ptr() != d.data_ptr() and p.allocated_bytes == 840
    p.give(torch.zeros(3))  # not lent by the pool: ignored
    # Outside the engine, methods' temporaries are plain tensors; inside a scope they come from the pool.
    t = torch.ones(4)
    assert P.empty_like(t).shape == (4,)
    with p.scope() as taken:
        x = P.empty_like(t)
        P.release(x)
        y = P.empty_like(t)
    assert y.data_ptr() == x.data_ptr() and taken == [y]


def test_slerp_t_comes_from_a_coefficient_table_where_it_has_entries(family, tmp_path):
    """mergekit requires slerp's t; a table states it instead for the tensors it lists (the second model's share
    of its weights, overriding t as tables override weights), and t holds for the rest."""
    a, o = str(family["a"]), str(family["other"])
    recipe = {"merge_method": "slerp", "base_model": a, "models": [{"model": a}, {"model": o}]}
    with pytest.raises(SoupError, match="slerp needs parameter t for tensor"):
        souplm.merge(recipe, tmp_path / "none", progress=False)
    assert not (tmp_path / "none").exists()
    table = CoefficientTable([a, o], {"model.layers.0.mlp.down_proj.weight": [0.0, 1.0]})
    out = tmp_path / "soup"
    souplm.merge({**recipe, "parameters": {"t": 0.0}}, out, coefficients=table, progress=False)
    ws, wa, wo = weights(out), weights(family["a"]), weights(family["other"])
    d, v = "model.layers.0.mlp.down_proj.weight", "model.layers.1.self_attn.v_proj.weight"
    torch.testing.assert_close(ws[d], wo[d], rtol=0, atol=1e-6)  # the table's share 1: the second model
    torch.testing.assert_close(ws[v], wa[v], rtol=0, atol=1e-6)  # the recipe's t = 0: the base


def test_quick_form_slerp_takes_t_from_the_weights_or_refuses_a_zero_sum():
    r = Recipe.from_models(["a", "b"], "slerp", weights=[1.0, 3.0])
    assert r.parameters["t"] == 0.75  # the second model's share
    assert Recipe.from_models(["a", "b"], "slerp").parameters["t"] == 0.5
    with pytest.raises(SoupError, match="sum to 0"):
        Recipe.from_models(["a", "b"], "slerp", weights=[1.0, -1.0])
