"""LoRA adapters as merge inputs: souplm's `base+adapter` against PEFT's own merge_and_unload."""

from __future__ import annotations

import json
import warnings

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from safetensors.torch import load_file

from souplm.cli import main
from souplm.engine import merge
from souplm.engine.recipe import Recipe
from souplm.errors import SoupError


def tiny_llama(dtype=torch.float32, tie=False, seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tie,
                      attention_bias=True)
    return LlamaForCausalLM(cfg).to(dtype)


def make_adapter(base_dir, out_dir, dtype=torch.float32, seed=1, **lora_kwargs):
    """Save a PEFT adapter with random (non-zero) B factors; return PEFT's merged state dict."""
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = get_peft_model(model, LoraConfig(**lora_kwargs))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if p.requires_grad:  # every LoRA factor, magnitude vector and saved module: perturb
                p.add_(torch.randn(p.shape, generator=g).to(p.dtype) * 0.1)
    pm.save_pretrained(out_dir)
    fresh = AutoModelForCausalLM.from_pretrained(base_dir, dtype=dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        merged = PeftModel.from_pretrained(fresh, out_dir).merge_and_unload()
    return {k: v.detach().clone() for k, v in merged.state_dict().items()}


@pytest.fixture(scope="module")
def base32(tmp_path_factory):
    d = tmp_path_factory.mktemp("base32")
    tiny_llama().save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def base16(tmp_path_factory):
    d = tmp_path_factory.mktemp("base16")
    tiny_llama(torch.bfloat16).save_pretrained(d)
    return d


def souplm_merged(base, adapters, tmp_path, dtype=None):
    spec = "+".join([str(base), *map(str, adapters)])
    out = tmp_path / "out"
    merge(Recipe.from_models([spec], "linear", [1.0], **({"dtype": dtype} if dtype else {})), out, progress=False)
    return load_file(out / "model.safetensors")


CASES = {
    "plain": {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]},
    "rslora": {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "down_proj"], "use_rslora": True},
    "regex": {"r": 2, "lora_alpha": 3, "target_modules": r".*\.layers\.1\.mlp\.(up|gate)_proj"},
    "modules_to_save": {"r": 4, "lora_alpha": 4, "target_modules": ["k_proj"], "modules_to_save": ["lm_head"]},
    "patterns": {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "o_proj"],
                     "rank_pattern": {"layers.0.self_attn.q_proj": 2, "o_proj": 6}, "alpha_pattern": {"o_proj": 3}},
    "embedding": {"r": 4, "lora_alpha": 8, "target_modules": ["embed_tokens", "q_proj"]},
    "lora_bias": {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj"], "lora_bias": True},
    "dora": {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "up_proj"], "use_dora": True},
}


def assert_state_equal(ours, theirs, atol, rtol):
    theirs = {k: v for k, v in theirs.items() if k in ours or k != "lm_head.weight"}
    assert set(ours) == set(theirs)
    changed = 0
    for k, v in theirs.items():
        torch.testing.assert_close(ours[k].float(), v.float(), atol=atol, rtol=rtol, msg=k)
        changed += 1
    assert changed


@pytest.mark.parametrize("case", sorted(CASES))
def test_matches_peft_merge_and_unload_fp32(case, base32, tmp_path):
    theirs = make_adapter(base32, tmp_path / "ad", **CASES[case])
    ours = souplm_merged(base32, [tmp_path / "ad"], tmp_path)
    base = load_file(base32 / "model.safetensors")
    assert any(not torch.equal(base[k], ours[k]) for k in base)  # the adapter did change something
    assert_state_equal(ours, theirs, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("case", ["plain", "rslora", "modules_to_save", "dora", "embedding"])
def test_matches_peft_merge_and_unload_bf16(case, base16, tmp_path):
    theirs = make_adapter(base16, tmp_path / "ad", dtype=torch.bfloat16, **CASES[case])
    ours = souplm_merged(base16, [tmp_path / "ad"], tmp_path)
    assert all(v.dtype == torch.bfloat16 for v in ours.values())
    # PEFT adds a bf16-rounded delta to the bf16 weight; souplm adds in fp32 and rounds once: 1-2 ulp apart.
    assert_state_equal(ours, theirs, atol=2e-2, rtol=2e-2)


def test_fan_in_fan_out_gpt2_conv1d(tmp_path):
    """GPT-2's Conv1D stores W as (in, out): PEFT's fan_in_fan_out transposes the delta."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from souplm.lora import LoraAdapter

    torch.manual_seed(0)
    base = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(vocab_size=50, n_positions=16, n_embd=24, n_layer=1, n_head=2)).save_pretrained(base)
    theirs = make_adapter(base, tmp_path / "ad", r=4, lora_alpha=8, target_modules=["c_attn"], fan_in_fan_out=True)
    ad = LoraAdapter(tmp_path / "ad")
    assert ad.fan_in_fan_out
    sd = load_file(base / "model.safetensors")
    name = "transformer.h.0.attn.c_attn.weight"
    key = next(k for k in sd if k.endswith(name))
    ours = ad.apply(name, sd[key].clone())  # apply works in place on its argument
    torch.testing.assert_close(ours, theirs[name], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(ours, sd[key])


def test_two_adapters_stack_and_untargeted_ignored(base32, tmp_path):
    a = make_adapter(base32, tmp_path / "a", seed=1, **CASES["plain"])
    make_adapter(base32, tmp_path / "b", seed=2, **CASES["rslora"])
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(base32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = PeftModel.from_pretrained(m, tmp_path / "a").merge_and_unload()
        m = PeftModel.from_pretrained(m, tmp_path / "b").merge_and_unload()
    theirs = m.state_dict()
    ours = souplm_merged(base32, [tmp_path / "a", tmp_path / "b"], tmp_path)
    assert_state_equal(ours, theirs, atol=1e-5, rtol=1e-5)
    q = "model.layers.0.self_attn.q_proj.weight"  # b changed q_proj after a did
    assert not torch.allclose(a[q], ours[q], atol=1e-4)


def test_recipe_forms_and_merge_of_adapted_models(base32, tmp_path):
    """mergekit's model+lora and souplm's {base, adapters} give the same recipe; a linear mix of two
    adapted models equals the same mix of PEFT's merged weights."""
    a = make_adapter(base32, tmp_path / "a", seed=1, **CASES["plain"])
    b = make_adapter(base32, tmp_path / "b", seed=2, **CASES["regex"])
    r1 = Recipe.load({"merge_method": "linear", "models": [
        {"model": f"{base32}+{tmp_path / 'a'}", "parameters": {"weight": 0.3}},
        {"model": {"base": str(base32), "adapters": [str(tmp_path / "b")]}, "parameters": {"weight": 0.7}}]})
    assert r1.models[1].model == f"{base32}+{tmp_path / 'b'}"
    merge(r1, tmp_path / "out", progress=False)
    ours = load_file(tmp_path / "out" / "model.safetensors")
    for k in ours:
        torch.testing.assert_close(ours[k], 0.3 * a[k] + 0.7 * b[k], atol=1e-5, rtol=1e-5)


def test_cli_model_plus_adapter(base32, tmp_path, capsys):
    theirs = make_adapter(base32, tmp_path / "a", **CASES["plain"])
    rc = main(["merge", "--model", f"{base32}+{tmp_path / 'a'}", "--method", "linear", "-o", str(tmp_path / "o"),
               "--quiet", "--no-hash"])
    assert rc == 0
    ours = load_file(tmp_path / "o" / "model.safetensors")
    assert_state_equal(ours, theirs, atol=1e-5, rtol=1e-5)


def test_refusals(base32, tmp_path, capsys):
    make_adapter(base32, tmp_path / "a", **CASES["plain"])
    cfg = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "adapter_model.safetensors").write_bytes((tmp_path / "a" / "adapter_model.safetensors").read_bytes())
    (bad / "adapter_config.json").write_text(json.dumps(dict(cfg, r=8)))  # factors are rank 4
    with pytest.raises(SoupError, match="rank 4"):
        merge(Recipe.from_models([f"{base32}+{bad}"], "linear", [1.0]), tmp_path / "o1", progress=False)
    (bad / "adapter_config.json").write_text(json.dumps(dict(cfg, peft_type="IA3")))
    with pytest.raises(SoupError, match="IA3"):
        merge(Recipe.from_models([f"{base32}+{bad}"], "linear", [1.0]), tmp_path / "o2", progress=False)
    # an adapter for another base: shapes differ, refused before anything is written
    other = tmp_path / "other"
    from transformers import LlamaConfig, LlamaForCausalLM

    LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2)).save_pretrained(other)
    rc = main(["merge", "--model", f"{other}+{tmp_path / 'a'}", "--method", "linear", "-o", str(tmp_path / "o3"),
               "--quiet"])
    assert rc == 2 and "souplm: error:" in capsys.readouterr().err
    assert not (tmp_path / "o3").exists() and not (tmp_path / "o1").exists()
    rc = main(["merge", "--model", f"{base32}+{tmp_path / 'missing'}", "-o", str(tmp_path / "o4"), "--quiet"])
    assert rc == 2 and "adapter not found" in capsys.readouterr().err


@pytest.mark.parametrize("method", ["ties", "dare_ties", "task_arithmetic"])
def test_any_method_over_adapted_models_equals_it_over_peft_merged_models(method, base32, tmp_path):
    """The adapted inputs (read through souplm.lora, torch executor) give the same merge as PEFT's merged
    models saved to disk (plain safetensors, the fused executor where it applies)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    dirs = []
    for i, case in enumerate(["plain", "patterns"]):
        make_adapter(base32, tmp_path / f"a{i}", seed=i + 3, **CASES[case])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            m = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base32), tmp_path / f"a{i}")
            m.merge_and_unload().save_pretrained(tmp_path / f"m{i}")
        dirs.append(tmp_path / f"m{i}")
    kw = {"weights": [0.6, 0.5], "base_model": str(base32), "density": 0.5} if method != "task_arithmetic" else \
        {"weights": [0.6, 0.5], "base_model": str(base32)}
    merge(Recipe.from_models([f"{base32}+{tmp_path / 'a0'}", f"{base32}+{tmp_path / 'a1'}"], method, **kw),
          tmp_path / "ours", progress=False)
    merge(Recipe.from_models([str(d) for d in dirs], method, **kw), tmp_path / "ref", progress=False)
    ours, ref = load_file(tmp_path / "ours" / "model.safetensors"), load_file(tmp_path / "ref" / "model.safetensors")
    assert set(ours) == set(ref)
    for k in ref:
        torch.testing.assert_close(ours[k], ref[k], atol=1e-5, rtol=1e-5, msg=k)
