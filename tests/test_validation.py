"""Issue 12 §2/§4/§5/§6: every flag takes effect or is refused, every parameter is typed and in range,
coefficient tables are matched by identity, recipe paths resolve against the recipe, the card's recipe
rebuilds the same bytes from any directory, caches key on everything that changes a score, learn
validates up front. Tiny safetensors models written here (no transformers), so the file runs in seconds.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from safetensors.numpy import load_file, save_file

from souplm.cli import main
from souplm.engine.coefficients import CoefficientTable
from souplm.engine.recipe import Recipe
from souplm.errors import SoupError

H, V = 4, 8


def tiny(path: Path, seed: int, extra: dict[str, np.ndarray] | None = None, scale: float = 1.0) -> Path:
    rng = np.random.default_rng(seed)
    tensors = {
        "model.embed_tokens.weight": rng.standard_normal((V, H)).astype(np.float32) * scale,
        "model.layers.0.self_attn.q_proj.weight": rng.standard_normal((H, H)).astype(np.float32) * scale,
        "model.layers.0.mlp.up_proj.weight": rng.standard_normal((H, H)).astype(np.float32) * scale,
        "model.norm.weight": rng.standard_normal(H).astype(np.float32) * scale,
        "lm_head.weight": rng.standard_normal((V, H)).astype(np.float32) * scale,
        **(extra or {}),
    }
    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"],
                                                  "hidden_size": H, "vocab_size": V}))
    return path


@pytest.fixture
def fam(tmp_path):
    root = tmp_path / "fam"
    return {"root": root, "base": tiny(root / "base", 0), "A": tiny(root / "A", 1), "B": tiny(root / "B", 2)}


def cli(capsys, *argv) -> tuple[int, str]:
    rc = main([str(a) for a in argv])
    cap = capsys.readouterr()
    return rc, cap.err.strip()


def refused(capsys, out: Path, *argv, contains: tuple[str, ...] = ()) -> str:
    rc, err = cli(capsys, *argv)
    assert rc == 2, err
    assert err.startswith("souplm: error: ") and "\n" not in err, err
    for c in contains:
        assert c in err, err
    assert not out.exists(), "a refused merge must write nothing"
    return err


def weights(out: Path) -> dict[str, np.ndarray]:
    return load_file(str(out / "model.safetensors"))


# -- flags: each takes effect or is refused ---------------------------------------------------------------
def test_alpha_with_ties_is_refused_not_merged_linearly(fam, tmp_path, capsys):
    out = tmp_path / "out"
    refused(capsys, out, "merge", "--model", fam["A"], "--model", fam["B"], "--alpha", "0.3", "--method", "ties",
            "--base-model", fam["base"], "-o", out, "--quiet", contains=("--alpha", "ties"))


@pytest.mark.parametrize("flags,named", [
    (["--base-model", "BASE"], "--base-model"),  # linear ignores a base
    (["--seed", "3"], "--seed"),  # linear draws nothing
    (["--alpha", "nan", "--method", "slerp"], "--alpha"),
    (["--alpha", "1.5"], "--alpha"),
    (["--alpha", "inf"], "--alpha"),
])
def test_quick_form_flags_refused_by_name(fam, tmp_path, capsys, flags, named):
    out = tmp_path / "out"
    flags = [str(fam["base"]) if f == "BASE" else f for f in flags]
    refused(capsys, out, "merge", "--model", fam["A"], "--model", fam["B"], *flags, "-o", out, "--quiet",
            contains=(named,))


def test_recipe_plus_quick_flag_refused(fam, tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"merge_method": "linear", "models": [{"model": str(fam["A"])},
                                                                           {"model": str(fam["B"])}]}))
    out = tmp_path / "out"
    refused(capsys, out, "merge", recipe, "--base-model", fam["base"], "-o", out, contains=("--base-model",))


def test_alpha_with_slerp_takes_effect(fam, tmp_path, capsys):
    out = tmp_path / "out"
    rc, err = cli(capsys, "merge", "--model", fam["A"], "--model", fam["B"], "--alpha", "0.3", "--method", "slerp",
                  "-o", out, "--quiet", "--no-hash")
    assert rc == 0, err
    saved = yaml.safe_load((out / "souplm_recipe.yaml").read_text())
    assert saved["merge_method"] == "slerp" and saved["parameters"]["t"] == pytest.approx(0.7)
    # independent slerp of the up_proj tensor: t = 0.7 is B's share
    a = load_file(str(fam["A"] / "model.safetensors"))["model.layers.0.mlp.up_proj.weight"].astype(np.float64)
    b = load_file(str(fam["B"] / "model.safetensors"))["model.layers.0.mlp.up_proj.weight"].astype(np.float64)
    om = np.arccos(np.clip((a / np.linalg.norm(a) * b / np.linalg.norm(b)).sum(), -1, 1))
    want = (np.sin(0.3 * om) * a + np.sin(0.7 * om) * b) / np.sin(om)
    np.testing.assert_allclose(weights(out)["model.layers.0.mlp.up_proj.weight"], want, rtol=1e-4, atol=1e-5)


def test_recipe_overrides_are_validated(fam, tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"merge_method": "dare_ties", "base_model": str(fam["base"]),
                                      "parameters": {"weight": 1.0},  # required, as in mergekit
                                      "models": [{"model": str(fam["A"])}, {"model": str(fam["B"])}]}))
    out = tmp_path / "out"
    rc, err = cli(capsys, "merge", recipe, "--seed", "7", "-o", out, "--quiet", "--no-hash")
    assert rc == 0, err
    assert yaml.safe_load((out / "souplm_recipe.yaml").read_text())["seed"] == 7


# -- numeric parameters: finite, in range, typed --------------------------------------------------------------
def _recipe(fam, tmp_path, method="ties", params=None, per_model=None, **top) -> Path:
    models = [{"model": str(fam["A"]), "parameters": dict(per_model or {})}, {"model": str(fam["B"])}]
    data = {"merge_method": method, "models": models, "parameters": params or {}, **top}
    if method in ("ties", "dare_ties", "dare_linear", "task_arithmetic", "wise_ft"):
        data["base_model"] = str(fam["base"])
    if method == "wise_ft":
        data["models"] = models[:1]
    p = tmp_path / "recipe.yaml"
    p.write_text(yaml.safe_dump(data))
    return p


@pytest.mark.parametrize("method,params,per_model,named", [
    ("ties", {}, {"density": 1.5}, "density"),
    ("ties", {}, {"density": -0.5}, "density"),
    ("ties", {}, {"density": 0.0}, "density"),
    ("ties", {}, {"density": float("nan")}, "density"),
    ("dare_ties", {"density": [0.5, 2.0]}, {}, "density"),  # a gradient's entries are checked
    ("ties", {"lambda": float("inf")}, {}, "lambda"),
    ("ties", {"normalize": "false"}, {}, "normalize"),  # a string is not a boolean
    ("slerp", {"t": 1.5}, {}, "parameters.t"),
    ("slerp", {"t": float("nan")}, {}, "parameters.t"),
    ("slerp", {"epsilon": 0.0}, {}, "epsilon"),
    ("linear", {}, {"weight": -0.5}, "weight"),  # extrapolation, not asked for
    ("linear", {}, {"weight": "0.5"}, "weight"),
    ("linear", {}, {"weight": True}, "weight"),
    ("wise_ft", {}, {"weight": 1.2}, "weight"),
    ("task_arithmetic", {}, {"weight": [{"filter": "mlp", "value": float("-inf")}, {"value": 1.0}]}, "weight"),
    # a zero tolerance or epsilon divides by zero where the method's step or tangent vanishes (NaN in mergekit)
    ("karcher", {"tol": 0.0}, {}, "tol"),
    ("multislerp", {"weight": 0.5, "eps": 0.0}, {}, "eps"),
])
def test_bad_parameter_refused_with_name_model_value(fam, tmp_path, capsys, method, params, per_model, named):
    out = tmp_path / "out"
    err = refused(capsys, out, "merge", _recipe(fam, tmp_path, method, params, per_model), "-o", out, "--quiet",
                  contains=(named,))
    if per_model:
        assert str(fam["A"]) in err  # names the model
    assert len(err) < 400


def test_extrapolation_only_when_asked(fam, tmp_path, capsys):
    out = tmp_path / "out"
    rc, err = cli(capsys, "merge", _recipe(fam, tmp_path, "slerp", {"t": 1.25}, allow_extrapolation=True),
                  "-o", out, "--quiet", "--no-hash")
    assert rc == 0, err
    rc, err = cli(capsys, "merge", _recipe(fam, tmp_path, "linear", {"normalize": False}, {"weight": 1.5},
                                           allow_extrapolation=True), "-o", tmp_path / "out2", "--quiet", "--no-hash")
    assert rc == 0, err


@pytest.mark.parametrize("key,value", [("allow_pickle", "false"), ("seed", "3"), ("seed", True),
                                       ("allow_extrapolation", "yes")])
def test_recipe_top_level_types_strict(fam, tmp_path, capsys, key, value):
    out = tmp_path / "out"
    refused(capsys, out, "merge", _recipe(fam, tmp_path, "linear", **{key: value}), "-o", out, contains=(key,))


def test_normalize_real_boolean_false_takes_effect(fam, tmp_path, capsys):
    out = tmp_path / "out"
    p = _recipe(fam, tmp_path, "linear", {"normalize": False}, {"weight": 1.0})
    assert main(["merge", str(p), "-o", str(out), "--quiet", "--no-hash"]) == 0
    a, b = (load_file(str(fam[k] / "model.safetensors")) for k in "AB")
    name = "model.norm.weight"
    np.testing.assert_allclose(weights(out)[name], a[name] + b[name], rtol=1e-6)


# -- relative paths resolve against the recipe; saved recipes are absolute -----------------------------------------
def test_relative_paths_resolve_against_recipe_not_cwd(fam, tmp_path, capsys, monkeypatch):
    decoy = tmp_path / "cwd"
    tiny(decoy / "A", 99, scale=100.0)  # same relative name, other weights
    tiny(decoy / "B", 98, scale=100.0)
    recipe = fam["root"] / "r.yaml"
    recipe.write_text(yaml.safe_dump({"merge_method": "linear", "models": [{"model": "A"}, {"model": "B"}]}))
    monkeypatch.chdir(decoy)
    out = tmp_path / "out"
    rc, err = cli(capsys, "merge", recipe, "-o", out, "--quiet", "--no-hash")
    assert rc == 0, err
    a, b = (load_file(str(fam[k] / "model.safetensors")) for k in "AB")
    name = "lm_head.weight"
    np.testing.assert_allclose(weights(out)[name], (a[name] + b[name]) / 2, rtol=1e-6)
    saved = yaml.safe_load((out / "souplm_recipe.yaml").read_text())
    assert [m["model"] for m in saved["models"]] == [str(fam["A"]), str(fam["B"])]


def test_missing_relative_path_names_recipe_folder(fam, tmp_path, capsys, monkeypatch):
    tiny(tmp_path / "cwd" / "C", 5)
    recipe = fam["root"] / "r.yaml"
    recipe.write_text(yaml.safe_dump({"merge_method": "linear", "models": [{"model": "A"}, {"model": "C"}]}))
    monkeypatch.chdir(tmp_path / "cwd")  # C exists here, but not beside the recipe: never the cwd's
    out = tmp_path / "out"
    refused(capsys, out, "merge", recipe, "-o", out, "--quiet", contains=(str(fam["root"] / "C"),))


# -- coefficient tables: matched by identity --------------------------------------------------------------------
def _table(models, w_first: float) -> dict:
    return {"default": [w_first, 1.0 - w_first]}


def test_table_for_swapped_models_is_reordered(fam, tmp_path, capsys):
    # learned for (B, A): B gets 0.8. Applied to a recipe of (A, B), B must still get 0.8.
    t = CoefficientTable.identified([str(fam["B"]), str(fam["A"])], _table(None, 0.8))
    t.save(tmp_path / "t.json")
    out = tmp_path / "out"
    rc, err = cli(capsys, "merge", "--model", fam["A"], "--model", fam["B"], "--method", "linear",
                  "--coefficients", tmp_path / "t.json", "-o", out, "--quiet", "--no-hash")
    assert rc == 0, err
    a, b = (load_file(str(fam[k] / "model.safetensors")) for k in "AB")
    name = "model.layers.0.self_attn.q_proj.weight"
    np.testing.assert_allclose(weights(out)[name], 0.2 * a[name] + 0.8 * b[name], rtol=1e-5, atol=1e-6)


def test_table_for_other_models_is_refused(fam, tmp_path, capsys):
    other = tiny(tmp_path / "other", 7)
    CoefficientTable.identified([str(fam["A"]), str(other)], _table(None, 0.5)).save(tmp_path / "t.json")
    out = tmp_path / "out"
    refused(capsys, out, "merge", "--model", fam["A"], "--model", fam["B"], "--method", "linear",
            "--coefficients", tmp_path / "t.json", "-o", out, "--quiet", contains=("coefficient table", str(fam["B"])))


def test_old_table_without_hashes_is_read_with_a_note(fam, tmp_path, capsys):
    (tmp_path / "t.json").write_text(json.dumps({"format": "souplm.coefficients/1", "models": ["x", "y"],
                                                 "coefficients": {"default": [0.25, 0.75]}}))
    out = tmp_path / "out"
    rc = main(["merge", "--model", str(fam["A"]), "--model", str(fam["B"]), "--method", "linear", "--coefficients",
               str(tmp_path / "t.json"), "-o", str(out), "--quiet", "--no-hash"])
    cap = capsys.readouterr()
    assert rc == 0, cap.err
    assert "no model content hashes" in cap.out and "by position" in cap.out


# -- the card's recipe rebuilds the same bytes from any directory ------------------------------------------------
def _souplm(*argv, cwd) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "souplm", *map(str, argv)], cwd=cwd, capture_output=True, text=True,
                          timeout=120, check=False)


def test_card_recipe_reproduces_bytes_from_another_cwd(fam, tmp_path):
    t = CoefficientTable.identified([str(fam["A"]), str(fam["B"])], {"default": [0.3, 0.7], "layers.0.up": [0.9, 0.1]})
    t.save(tmp_path / "t.json")
    here = tmp_path / "work"
    here.mkdir()
    # relative inputs, from a working directory the reproduce step will not share
    r = _souplm("merge", "--model", os.path.relpath(fam["A"], here), "--model", os.path.relpath(fam["B"], here),
                "--method", "linear", "--coefficients", "../t.json", "-o", "out1", "--quiet", cwd=here)
    assert r.returncode == 0, r.stderr
    card = (here / "out1" / "README.md").read_text()
    assert "souplm_recipe.yaml" in card and "souplm_coefficients.json" in card
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    r = _souplm("merge", here / "out1" / "souplm_recipe.yaml", "-o", "out2", "--quiet", cwd=elsewhere)
    assert r.returncode == 0, r.stderr
    assert (here / "out1" / "model.safetensors").read_bytes() == (elsewhere / "out2" / "model.safetensors").read_bytes()


# -- caches: the key changes with everything that changes a score -----------------------------------------------------
def test_model_hash_covers_config_tokenizer_and_restored_mtime(fam, tmp_path):
    from souplm.evaluate.cache import model_hash

    os.environ["SOUPLM_CACHE"] = str(tmp_path / "cache")
    try:
        d = fam["A"]
        h0 = model_hash(d)
        (d / "tokenizer_config.json").write_text("{}")
        h1 = model_hash(d)
        (d / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": H, "rope_theta": 1.0}))
        h2 = model_hash(d)
        # new weights, same size, mtime restored: the memo must not answer
        f = d / "model.safetensors"
        st = f.stat()
        data = bytearray(f.read_bytes())
        data[-1] ^= 0xFF
        f.write_bytes(bytes(data))
        os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
        assert f.stat().st_size == st.st_size and f.stat().st_mtime_ns == st.st_mtime_ns
        h3 = model_hash(d)
        assert len({h0, h1, h2, h3}) == 4
        assert model_hash(d) == h3  # and it is stable
    finally:
        del os.environ["SOUPLM_CACHE"]


def test_cache_key_includes_souplm_version(monkeypatch):
    import souplm
    from souplm.evaluate import cache

    k1 = cache.cache_key("m", "t", "1", None)
    monkeypatch.setattr(souplm, "__version__", "999.0")
    assert cache.cache_key("m", "t", "1", None) != k1


def test_eval_cache_key_includes_dtype(fam, tmp_path, monkeypatch):
    from souplm.evaluate import runner

    seen = []

    class Store:
        def get(self, key, *a):
            seen.append(key)
            return {"kind": "perplexity", "n": 1, "metrics": {"bpb": 1.0}, "primary": "bpb", "items": {}}  # a hit

    monkeypatch.setattr(runner, "as_cache", lambda c: Store())
    monkeypatch.setattr(runner, "checked_tasks", lambda *a: [type("T", (), {"name": "t", "cache_version": "1"})()])
    monkeypatch.setattr(runner, "model_getter", lambda *a: None)
    monkeypatch.setenv("SOUPLM_CACHE", str(tmp_path / "c"))
    runner.evaluate(str(fam["A"]), ["t"], cache=True, dtype="float32")
    runner.evaluate(str(fam["A"]), ["t"], cache=True, dtype="bfloat16")
    assert len(seen) == 2 and seen[0] != seen[1]


# -- task files: typed fields ---------------------------------------------------------------------------------
@pytest.mark.parametrize("key,value", [("context_length", "abc"), ("context_length", True), ("chat_template", "false"),
                                       ("text_field", 3), ("version", 1.5)])
def test_perplexity_task_field_types(tmp_path, key, value):
    from souplm.evaluate.tasks import load_task_file

    (tmp_path / "d.jsonl").write_text('{"text": "hi"}\n')
    (tmp_path / "t.yaml").write_text(yaml.safe_dump({"kind": "perplexity", "data": "d.jsonl", key: value}))
    with pytest.raises(SoupError, match=f"{key} must be"):
        load_task_file(tmp_path / "t.yaml")


def test_task_file_with_a_non_string_key(tmp_path):
    from souplm.evaluate.tasks import load_task_file

    (tmp_path / "d.jsonl").write_text('{"text": "hi"}\n')
    (tmp_path / "t.yaml").write_text("kind: perplexity\ndata: d.jsonl\n1: a\n")
    with pytest.raises(SoupError, match="task file keys must be strings, not 1"):
        load_task_file(tmp_path / "t.yaml")


@pytest.mark.parametrize("value", [-5, 0, "8", 2.5])
def test_generation_max_new_tokens(tmp_path, value):
    from souplm.evaluate.tasks import load_task_file

    (tmp_path / "d.jsonl").write_text('{"question": "q", "answer": "1"}\n')
    (tmp_path / "t.yaml").write_text(yaml.safe_dump({"kind": "generation", "data": "d.jsonl", "max_new_tokens": value}))
    with pytest.raises(SoupError, match="max_new_tokens must be an integer >= 1"):
        load_task_file(tmp_path / "t.yaml")


def test_eval_of_refused_pickle_is_one_line(tmp_path, capsys):
    import pickle

    d = tmp_path / "m"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_layer": 1, "n_head": 1, "n_embd": 4,
                                               "vocab_size": 8, "n_positions": 8}))

    class Evil:
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "pwned"),))

    with open(d / "pytorch_model.bin", "wb") as f:
        pickle.dump({"x": Evil()}, f)
    (tmp_path / "d.jsonl").write_text('{"text": "hi"}\n')
    (tmp_path / "t.yaml").write_text(yaml.safe_dump({"kind": "perplexity", "data": "d.jsonl"}))
    rc, err = cli(capsys, "eval", d, "--task", tmp_path / "t.yaml", "--no-cache", "--device", "cpu")
    assert rc == 2 and err.startswith("souplm: error: ") and "\n" not in err, err
    assert not (tmp_path / "pwned").exists()


# -- learn config: typed, finite ---------------------------------------------------------------------------------
def _learn_cfg(tmp_path, **over) -> dict:
    (tmp_path / "d.jsonl").write_text('{"text": "hi"}\n')
    return {"models": ["a", "b"], "meta_sets": [{"path": str(tmp_path / "d.jsonl")}], **over}


@pytest.mark.parametrize("over,named", [
    ({"fixed": {"embed": [float("nan"), 0.5]}}, "fixed.embed"),
    ({"merge": "false"}, "merge"),
    ({"optimizer": {"lr": float("nan")}}, "optimizer.lr"),
    ({"optimizer": {"lr": "0.1"}}, "optimizer.lr"),
    ({"training": {"epochs": "3"}}, "training.epochs"),
    ({"training": {"evaluate": "no"}}, "training.evaluate"),
])
def test_learn_config_strict(tmp_path, over, named):
    from souplm.learn.config import load_config

    with pytest.raises(SoupError, match=named.replace(".", r"\.")):
        load_config(_learn_cfg(tmp_path, **over))


def test_learn_config_betas_list_still_reads(tmp_path):
    from souplm.learn.config import load_config

    cfg = load_config(_learn_cfg(tmp_path, optimizer={"name": "adam", "betas": [0.8, 0.99]}))
    assert list(cfg.optimizer.betas) == [0.8, 0.99]


def test_learn_nan_base_named_before_training(fam, tmp_path):
    from souplm.io.checkpoint import open_checkpoint
    from souplm.learn import check_finite_models

    bad = np.full((H, H), np.nan, np.float32)
    nan_model = tiny(tmp_path / "nan", 3, extra={})
    t = load_file(str(nan_model / "model.safetensors"))
    t["model.layers.0.mlp.up_proj.weight"] = bad
    save_file(t, str(nan_model / "model.safetensors"))
    cks = [open_checkpoint(p) for p in (fam["A"], nan_model)]
    with pytest.raises(SoupError, match=r"model\.layers\.0\.mlp\.up_proj\.weight of model .*nan"):
        check_finite_models([str(fam["A"]), str(nan_model)], cks)


def test_torn_log_line_does_not_break_resume(tmp_path):
    from souplm.learn.trainer import _logged_step

    assert _logged_step('{"event": "step", "step": 3}') == 3
    assert _logged_step('{"event": "step", "st') == float("inf")  # torn by a kill mid-write
    assert _logged_step("[1, 2]") == float("inf")


def test_recipe_api_refuses_like_the_cli(fam):
    with pytest.raises(SoupError, match="density"):
        Recipe.from_models([fam["A"], fam["B"]], "ties", base_model=fam["base"], density=1.5)
    with pytest.raises(SoupError, match="normalize"):
        Recipe.from_models([fam["A"], fam["B"]], "linear", normalize="false")


# -- every written tensor is finite: overflow, the final cast, and tensors copied unchanged ----------------------
@pytest.mark.parametrize("executor", [[], ["--device", "cpu"]])
@pytest.mark.parametrize("scale,dtype", [(3e38, "float32"), (6e4, "float16")])
def test_overflowing_output_is_refused(tmp_path, capsys, executor, scale, dtype):
    a, b = tiny(tmp_path / "A", 1), tiny(tmp_path / "B", 1)  # same weights: the sum doubles every entry
    for d in (a, b):
        t = load_file(str(d / "model.safetensors"))
        t["model.norm.weight"] = np.full(H, scale, np.float32)
        save_file(t, str(d / "model.safetensors"))
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"merge_method": "linear", "parameters": {"normalize": False}, "dtype": dtype,
                                      "models": [{"model": str(a)}, {"model": str(b)}]}))
    out = tmp_path / "out"
    refused(capsys, out, "merge", recipe, "-o", out, "--quiet", *executor, contains=("model.norm.weight", "Inf"))


@pytest.mark.parametrize("executor", [[], ["--device", "cpu"]])
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_nan_in_a_copied_tensor_is_refused(tmp_path, capsys, executor, dtype):
    bad = np.ones((2, 2), dtype)
    bad[1, 1] = np.nan
    a = tiny(tmp_path / "A", 1, extra={"vision_tower.proj.weight": bad})
    b = tiny(tmp_path / "B", 2)
    out = tmp_path / "out"
    refused(capsys, out, "merge", "--model", a, "--model", b, "--alpha", "0.5", "--output-model", a, "-o", out,
            "--quiet", *executor, contains=("vision_tower.proj.weight", "NaN"))


@pytest.mark.filterwarnings("error")  # a NumPy warning on the way would be a second line (and a traceback here)
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])  # stored so, read by that dtype's kernels
@pytest.mark.parametrize("executor", [[], ["--device", "cpu"]])
@pytest.mark.parametrize("method,params,with_base,culprit", [
    ("slerp", {"t": 0.5}, False, "A"), ("nuslerp", {"weight": 0.5}, False, "A"), ("nuslerp", {"weight": 0.5}, True, "A"),
    ("nuslerp", {"weight": 0.5}, True, "base"), ("multislerp", {"weight": 0.5}, False, "A"),
    ("multislerp", {"weight": 0.5}, True, "base"), ("karcher", {}, False, "A")])
def test_inf_input_to_an_angle_method_is_one_line(fam, tmp_path, capsys, dtype, executor, method, params, with_base,
                                                  culprit):
    """The angle-based methods weigh by the Gram matrix of their inputs; an Inf there must not reach their
    scalar arithmetic: the one message names the tensor and the model holding it."""
    import torch
    from safetensors.torch import load_file as load_torch, save_file as save_torch

    bad = np.ones(H, np.float32)
    bad[2] = np.inf
    tiny(fam[culprit], 0 if culprit == "base" else 1, extra={"model.norm.weight": bad})
    for name in ("A", "B", "base"):  # every input stored in the recipe's dtype
        f = str(fam[name] / "model.safetensors")
        save_torch({k: v.to(getattr(torch, dtype)) for k, v in load_torch(f).items()}, f)
    models = [{"model": str(fam["A"])}, {"model": str(fam["B"])}]
    data = {"merge_method": method, "models": models, "parameters": params, "dtype": dtype}
    if with_base or method == "slerp":  # slerp's base is one of its two models
        data["base_model"] = str(fam["A"] if method == "slerp" else fam["base"])
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(data))
    out = tmp_path / "out"
    err = refused(capsys, out, "merge", recipe, "-o", out, "--quiet", *executor, contains=("model.norm.weight", "Inf"))
    assert str(fam[culprit]) in err


# -- the other commands' flags: refused when they would change nothing ------------------------------------------------
@pytest.mark.parametrize("argv,named", [
    (["eval", "M", "--task", "t.yaml", "--no-cache", "--cache-dir", "C"], "--cache-dir"),
    (["eval", "M", "--task", "t.yaml", "--limit", "0"], "--limit"),
    (["eval", "M", "--task", "t.yaml", "--batch-size", "-1"], "--batch-size"),
    (["greedy", "--model", "M", "--task", "t.yaml", "--force"], "--force"),
    (["greedy", "--model", "M", "--task", "t.yaml", "-o", "O", "--allow-leakage"], "--allow-leakage"),
    (["search", "--target", "M", "--source", "M", "--inputs", "i.jsonl", "-o", "O", "--limit", "5"], "--limit"),
    (["search", "--target", "M", "--source", "M", "--inputs", "i.jsonl", "-o", "O", "--no-model", "--force"],
     "--force"),
    (["search", "--target", "M", "--source", "M", "--inputs", "i.jsonl", "-o", "O", "--base-model", "M"],
     "--base-model"),
    (["search", "--target", "M", "--source", "M", "--inputs", "i.jsonl", "-o", "O", "--sample", "0"], "--sample"),
    (["learn", "c.yaml", "--resume", "--force"], "--resume"),
])
def test_other_commands_refuse_unused_flags(fam, tmp_path, capsys, monkeypatch, argv, named):
    monkeypatch.chdir(tmp_path)
    argv = [str(fam["A"]) if a == "M" else a for a in argv]
    rc, err = cli(capsys, *argv)
    assert rc == 2 and err.startswith("souplm: error: ") and named in err, err
    assert not (tmp_path / "O").exists()


def test_mapping_spec_optional_must_be_a_boolean():
    from souplm.arch.mapping import load_mapping

    spec = {"name": "m", "map": [{"target": "model.norm.weight", "source": "model.norm.weight", "optional": "false"}]}
    with pytest.raises(SoupError, match=r"map\[0\]: optional must be true or false"):
        load_mapping(spec)


def test_a_coefficient_table_is_never_silently_ignored(fam, tmp_path, capsys):
    """Without --method, a table means a linear soup; a method without per-model weights refuses a table."""
    import json

    from souplm.engine.coefficients import CoefficientTable

    table = tmp_path / "t.json"
    CoefficientTable([str(fam["A"]), str(fam["B"])], {"default": [0.9, 0.1]}).save(table)
    out = tmp_path / "o"
    assert main(["merge", "--model", str(fam["A"]), "--model", str(fam["B"]), "--coefficients", str(table),
                 "-o", str(out), "--quiet"]) == 0
    saved = (out / "souplm_recipe.yaml").read_text()
    assert "merge_method: linear" in saved and json.loads((out / "souplm_coefficients.json").read_text())
    refused(capsys, tmp_path / "u", "merge", "--model", fam["A"], "--model", fam["B"], "--method", "uniform",
            "--coefficients", table, "-o", tmp_path / "u", "--quiet", contains=("coefficient table", "uniform"))
