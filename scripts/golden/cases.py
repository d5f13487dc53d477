"""Every golden case: its input models (seeded) and its mergekit recipe (model paths relative to the models folder).

Groups: `example` (mergekit's examples/, model names translated to tiny models), `mktest` (the recipes
mergekit's tests/ build), `s1` (issue 13 section 1's measured differences), `method` (one recipe per
mergekit method, fp32), `slices` (frankenmerges), `tokenizer` (tokenizer_source, tokenizer:, chat_template),
`arch` (every architecture).
"""

from __future__ import annotations

from archs import ARCHS

RANDOM_METHODS = {"dare_ties", "dare_linear", "della", "della_linear"}

CORE_ARCHS = ["llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3", "gpt2", "gpt_neox",
              "mixtral", "qwen3_moe"]
EXTRA_ARCHS = [a for a, kw in ARCHS.items() if kw is not None and a not in CORE_ARCHS and a != "llava"]

# -- input models -------------------------------------------------------------------------------------
MODELS: dict[str, dict] = {}
for i, arch in enumerate(a for a, kw in ARCHS.items() if kw is not None):
    seed = 100 * (i + 1)
    MODELS[f"{arch}-base"] = {"arch": arch, "base_seed": seed}
    for j, role in enumerate("abc", start=1):
        MODELS[f"{arch}-{role}"] = {"arch": arch, "base_seed": seed, "deltas": [[seed + j, 0.02]]}
for role in ("base", "a", "b", "c"):
    MODELS[f"llama-{role}-bf16"] = dict(MODELS[f"llama-{role}"], dtype="bfloat16")
_L = MODELS["llama-base"]["base_seed"]
# a's near-parallel twin (|cos| > 0.9995, sin > 1e-6): SLERP's lerp threshold
MODELS["llama-near"] = {"arch": "llama", "base_seed": _L, "deltas": [[_L + 1, 0.02], [_L + 9, 0.0005]]}
# on a 2^-8 grid, so that deltas are exact: a and its mirror sum to exactly 0 (TIES' election), ties in |delta|
for name, deltas, sign in (("llama-grid-base", [], 1), ("llama-grid-a", [[_L + 1, 0.02]], 1),
                           ("llama-grid-mirror", [[_L + 1, 0.02]], -1), ("llama-grid-b", [[_L + 2, 0.02]], 1)):
    MODELS[name] = {"arch": "llama", "base_seed": _L, "deltas": deltas, "sign": sign, "grid": 2.0 ** -8}
# mergekit's tokenizer tests: a 2-layer Llama per tokenizer (vocab rows, tokenizer size, added tokens)
_TOK = {"num_hidden_layers": 2}
MODELS["tok-base"] = {"arch": "llama", "base_seed": 901, "config": dict(_TOK, vocab_size=64), "tokenizer": (64, [])}
MODELS["tok-chatml"] = {"arch": "llama", "base_seed": 902, "config": dict(_TOK, vocab_size=66),
                        "tokenizer": (64, ["<|im_start|>", "<|im_end|>"])}
MODELS["tok-padded"] = {"arch": "llama", "base_seed": 903, "config": dict(_TOK, vocab_size=64),
                        "tokenizer": (64, [f"<UNUSED_{i}>" for i in range(4)])}
MODELS["tok-b"] = {"arch": "llama", "base_seed": 904, "config": dict(_TOK, vocab_size=64)}


# -- cases ----------------------------------------------------------------------------------------------
CASES: list[dict] = []


def _models_of(recipe: dict) -> list[str]:
    names = set()
    if recipe.get("base_model"):
        names.add(recipe["base_model"])
    for m in recipe.get("models", []):
        names.add(m["model"])
    for s in recipe.get("slices", []):
        if s.get("base_model"):
            names.add(s["base_model"])
        for src in s["sources"]:
            names.add(src["model"])
    tok = recipe.get("tokenizer") or {}
    for t in (tok.get("tokens") or {}).values():
        src = t.get("source")
        if isinstance(src, str) and src in MODELS:
            names.add(src)
        elif isinstance(src, dict) and src.get("model"):
            names.add(src["model"])
    if recipe.get("tokenizer_source") in MODELS:
        names.add(recipe["tokenizer_source"])
    return sorted(names)


def case(name: str, group: str, recipe: dict, arch: str = "llama", note: str | None = None,
         args: list[str] | None = None) -> None:
    method = recipe["merge_method"]
    if args is None:  # only the tokenizer cases' models have tokenizers
        args = [] if group == "tokenizer" else ["--no-copy-tokenizer"]
    CASES.append({"name": name, "group": group, "arch": arch, "method": method, "random": method in RANDOM_METHODS,
                  "recipe": recipe, "models": _models_of(recipe), "note": note, "args": args or []})


def two(a: str, b: str, method: str, base: str | None = None, params: dict | None = None,
        dtype: str = "bfloat16") -> dict:
    """mergekit's tests' two_model_config: weights 0.6 and 0.4, bfloat16."""
    r: dict = {"merge_method": method}
    if base:
        r["base_model"] = base
    r["models"] = [{"model": a, "parameters": {"weight": 0.6}}, {"model": b, "parameters": {"weight": 0.4}}]
    r["dtype"] = dtype
    if params:
        r["parameters"] = params
    return r


# (a) mergekit's examples/, model names translated (13B Llamas -> tiny Llamas of 3 layers; 40 layers -> 3)
case("ex_linear", "example", {"models": [{"model": "llama-a", "parameters": {"weight": 1.0}},
                                         {"model": "llama-b", "parameters": {"weight": 0.3}},
                                         {"model": "llama-c", "parameters": {"weight": 0.5}}],
                              "merge_method": "linear", "dtype": "float16"})
case("ex_ties", "example", {
    "models": [{"model": "llama-a", "parameters": {"density": [1, 0.7, 0.1], "weight": 1.0}},
               {"model": "llama-b", "parameters": {"density": 0.5, "weight": [0, 0.3, 0.7, 1]}},
               {"model": "llama-c", "parameters": {"density": 0.33, "weight": [{"filter": "mlp", "value": 0.5},
                                                                             {"value": 0}]}}],
    "merge_method": "ties", "base_model": "llama-base", "parameters": {"normalize": True, "int8_mask": True},
    "dtype": "float16"})
case("ex_bio_merge", "example", {
    "models": [{"model": "mistral-a", "parameters": {"density": 0.5, "weight": 0.5}},
               {"model": "mistral-b", "parameters": {"density": 0.5, "weight": 0.5}}],
    "merge_method": "ties", "base_model": "mistral-base", "parameters": {"normalize": False, "int8_mask": True},
    "dtype": "float16"}, arch="mistral")
case("ex_gradient_slerp", "example", {
    "slices": [{"sources": [{"model": "llama-a", "layer_range": [0, 3]}, {"model": "llama-b", "layer_range": [0, 3]}]}],
    "merge_method": "slerp", "base_model": "llama-a",
    "parameters": {"t": [{"filter": "self_attn", "value": [0, 0.5, 0.3, 0.7, 1]},
                         {"filter": "mlp", "value": [1, 0.5, 0.7, 0.3, 0]}, {"value": 0.5}]},
    "dtype": "float16"})
case("ex_orcamini_platy", "example", {
    "slices": [{"sources": [{"model": "llama-a", "layer_range": [0, 2]}]},
               {"sources": [{"model": "llama-b", "layer_range": [1, 3]}]}],
    "merge_method": "passthrough", "dtype": "float16"}, note="4 layers stacked from 2 + 2 (24 + 20 of 40)")
case("ex_arcee_fusion", "example", {"models": [{"model": "llama-a"}, {"model": "llama-b"}],
                                    "merge_method": "arcee_fusion", "base_model": "llama-a", "dtype": "bfloat16"})

# (b) the recipes mergekit's tests build (tests/test_basic_merges.py, test_tokenizer.py, test_chat_template.py)
A, B, C = "llama-a", "llama-b", "llama-c"
case("mk_passthrough_scale", "mktest", {"merge_method": "passthrough", "models": [
    {"model": A, "parameters": {"scale": [{"filter": "o_proj", "value": 0}, {"value": 1}]}}]})
case("mk_linear", "mktest", two(A, B, "linear"))
case("mk_slerp", "mktest", dict(two(A, B, "slerp", base=A), parameters={"t": 0.35}))
for base in (None, C):
    for row_wise in (False, True):
        for flatten in (False, True):
            case(f"mk_nuslerp_{'base' if base else 'nobase'}_row{int(row_wise)}_flat{int(flatten)}", "mktest",
                 two(A, B, "nuslerp", base=base, params={"nuslerp_row_wise": row_wise, "nuslerp_flatten": flatten}))
_r = two(A, B, "nuslerp", base=C, params={"nuslerp_row_wise": False, "nuslerp_flatten": False})
_r["models"][0]["parameters"]["weight"] = -0.5
_r["models"][1]["parameters"]["weight"] = 0.5
case("mk_nuslerp_zero_sum_weights", "mktest", _r)
case("mk_task_arithmetic", "mktest", two(A, B, "task_arithmetic", base=C))
case("mk_breadcrumbs", "mktest", two(A, B, "breadcrumbs", base=C))
case("mk_ties", "mktest", two(A, B, "ties", base=C, params={"density": 0.3}))
case("mk_sce", "mktest", two(A, B, "sce", base=C, params={"select_topk": 0.5}))
case("mk_ram", "mktest", two(A, B, "ram", base=C))
case("mk_ramplus_tl", "mktest", two(A, B, "ramplus_tl", base=C, params={"r": 0.05, "alpha": 1.0}))
case("mk_multislerp", "mktest", two(A, B, "multislerp", base=C))
case("mk_dare_ties", "mktest", two(A, B, "dare_ties", base=C, params={"density": 0.66}))
case("mk_model_stock", "mktest", two(B, C, "model_stock", base=A))
case("mk_model_stock_filterwise", "mktest", two(B, C, "model_stock", base=A, params={"filter_wise": True}))
case("mk_arcee_fusion", "mktest", two(A, B, "arcee_fusion", base=A))
case("mk_nearswap", "mktest", two(A, B, "nearswap", base=A, params={"t": 0.0001}))
case("mk_della", "mktest", two(A, B, "della", base=C, params={"density": 0.66, "epsilon": 0.05, "lambda": 0.5}))
case("mk_della_invalid_epsilon", "mktest", two(A, B, "della", base=C,
                                               params={"density": 0.66, "epsilon": 1.35, "lambda": 0.5}),
     note="mergekit's test expects a ValueError")
case("mk_karcher", "mktest", two(A, B, "karcher", base=C, params={"max_iter": 5, "tol": 1e-5}))
case("mk_granite_copy", "mktest", {"merge_method": "passthrough", "models": [{"model": "granite-a"}],
                                   "dtype": "bfloat16"}, arch="granite")
case("mk_granite_linear", "mktest", {"merge_method": "linear", "models": [
    {"model": "granite-a", "parameters": {"weight": 0.6}}, {"model": "granite-b", "parameters": {"weight": 0.4}}],
    "dtype": "bfloat16"}, arch="granite")
case("mk_granite_slerp", "mktest", {"merge_method": "slerp", "base_model": "granite-a", "models": [
    {"model": "granite-a"}, {"model": "granite-b"}], "parameters": {"t": 0.5}, "dtype": "bfloat16"}, arch="granite")
case("mk_gpt2_copy", "mktest", {"merge_method": "passthrough", "models": [{"model": "gpt2-a"}], "dtype": "bfloat16"},
     arch="gpt2")
case("mk_gpt2_stack", "mktest", {"merge_method": "passthrough", "slices": [
    {"sources": [{"model": "gpt2-a", "layer_range": [0, 2]}]}] * 2, "dtype": "bfloat16"}, arch="gpt2")


def tok_recipe(models: list[str], base: str | None, method: str = "linear", tokenizer_source=None, t=None,
               tokenizer=None) -> dict:
    """mergekit's tests' make_config: weight 1.0 each, float32."""
    r: dict = {"merge_method": method}
    if base:
        r["base_model"] = base
    r["models"] = [{"model": m, "parameters": {"weight": 1.0}} for m in models]
    r["dtype"] = "float32"
    if tokenizer_source is not None:
        r["tokenizer_source"] = tokenizer_source
    if t is not None:
        r["parameters"] = {"t": t}
    if tokenizer is not None:
        r["tokenizer"] = tokenizer
    return r


TB, TC, TP = "tok-base", "tok-chatml", "tok-padded"
case("tok_legacy", "tokenizer", tok_recipe([TB, TP, TC], TB))
case("tok_source_base", "tokenizer", tok_recipe([TB, TP, TC], TB, tokenizer_source="base"))
case("tok_source_union", "tokenizer", tok_recipe([TB, TP, TC], TB, tokenizer_source="union"))
case("tok_source_model", "tokenizer", tok_recipe([TB, TP, TC], TB, tokenizer_source=TC))
case("tok_slerp_union", "tokenizer", tok_recipe([TB, TC], TB, method="slerp", tokenizer_source="union", t=0.5))
case("tok_force_token", "tokenizer", tok_recipe([TB, TC], TB, tokenizer={
    "source": "union", "tokens": {"_tok_10": {"source": TC, "force": True}, "_tok_11": {"source": TB, "force": True}}}))
case("tok_model_token_id", "tokenizer", tok_recipe([TB, TC], TB, tokenizer={
    "source": "base", "tokens": {
        "_tok_20": {"source": {"kind": "model_token", "model": TC, "token_id": 64}, "force": True},
        "_tok_21": {"source": {"kind": "model_token", "model": TB, "token": "<s>"}, "force": True}}}))
case("tok_pad_to_multiple_of", "tokenizer", tok_recipe([TC], TC, tokenizer={"source": "base", "pad_to_multiple_of": 16}))
for name, template in (("chat_template_chatml", "chatml"), ("chat_template_literal", "{{messages[0]['content']}}"),
                       ("chat_template_auto", "auto")):
    case(name, "tokenizer", {"merge_method": "linear", "models": [
        {"model": TB, "parameters": {"weight": 0.5}}, {"model": "tok-b", "parameters": {"weight": 0.5}}],
        "base_model": TB, "dtype": "bfloat16", "chat_template": template})

# (c) issue 13 section 1's measured differences
BASE = "llama-base"
case("s1_slice_subrange", "s1", {"merge_method": "linear", "slices": [{"sources": [
    {"model": A, "layer_range": [0, 2], "parameters": {"weight": 0.6}},
    {"model": B, "layer_range": [0, 2], "parameters": {"weight": 0.4}}]}], "dtype": "float32"},
    note="one slice, layers [0, 2] of 3")
case("s1_slice_parameters", "s1", {"merge_method": "slerp", "base_model": A, "slices": [{"sources": [
    {"model": A, "layer_range": [0, 3]}, {"model": B, "layer_range": [0, 3]}], "parameters": {"t": 0.3}}],
    "parameters": {"t": 0.7}, "dtype": "float32"}, note="slice-level t = 0.3 overrides the global 0.7")
case("s1_slice_base_model", "s1", {"merge_method": "task_arithmetic", "slices": [{"sources": [
    {"model": BASE, "layer_range": [0, 3]},
    {"model": A, "layer_range": [0, 3], "parameters": {"weight": 0.6}},
    {"model": B, "layer_range": [0, 3], "parameters": {"weight": 0.4}}], "base_model": BASE}], "dtype": "float32"})
case("s1_dare_ties_default_normalize", "s1", {"merge_method": "dare_ties", "base_model": BASE, "models": [
    {"model": A, "parameters": {"weight": 0.6}}, {"model": B, "parameters": {"weight": 0.5}}],
    "parameters": {"density": 0.9}, "dtype": "float32"}, note="normalize unset: mergekit's default is false")
case("s1_dare_linear_rescale", "s1", {"merge_method": "dare_linear", "base_model": BASE, "models": [
    {"model": A, "parameters": {"weight": 1.0}}], "parameters": {"density": 0.5}, "dtype": "float32"})
case("s1_dare_linear_no_rescale", "s1", {"merge_method": "dare_linear", "base_model": BASE, "models": [
    {"model": A, "parameters": {"weight": 1.0}}], "parameters": {"density": 0.5, "rescale": False},
    "dtype": "float32"})
case("s1_dare_ties_one_model", "s1", {"merge_method": "dare_ties", "base_model": BASE, "models": [
    {"model": A, "parameters": {"weight": 1.0}}], "parameters": {"density": 0.3}, "dtype": "float32"})
GB = "llama-grid-base"
case("s1_ties_zero_sum", "s1", {"merge_method": "ties", "base_model": GB, "models": [
    {"model": "llama-grid-a", "parameters": {"weight": 1.0}}, {"model": "llama-grid-mirror", "parameters": {"weight": 1.0}}],
    "parameters": {"density": 1.0}, "dtype": "float32"}, note="deltas exactly opposite: the weighted sum is 0")
case("s1_ties_exact_k", "s1", {"merge_method": "ties", "base_model": GB, "models": [
    {"model": "llama-grid-a", "parameters": {"weight": 0.6}}, {"model": "llama-grid-b", "parameters": {"weight": 0.4}}],
    "parameters": {"density": 0.3}, "dtype": "float32"}, note="deltas on a 2^-8 grid: many ties at the k-th magnitude")
case("s1_ties_bf16_recipe", "s1", dict(two(A, B, "ties", base=BASE, params={"density": 0.5}), dtype="bfloat16"),
     note="fp32 inputs, dtype bfloat16: mergekit computes in bf16")
case("s1_ties_bf16_inputs", "s1", dict(two("llama-a-bf16", "llama-b-bf16", "ties", base="llama-base-bf16",
                                           params={"density": 0.5}), dtype="bfloat16"))
case("s1_ties_out_dtype", "s1", dict(two(A, B, "ties", base=BASE, params={"density": 0.5}), dtype="float32",
                                     out_dtype="bfloat16"))
case("s1_gradient_linear", "s1", {"merge_method": "linear", "models": [
    {"model": A, "parameters": {"weight": [0, 0.5, 1]}}, {"model": B, "parameters": {"weight": [1, 0.5, 0]}}],
    "dtype": "float32"}, note="gradient at the final norm and lm_head")
case("s1_gradient_slerp", "s1", {"merge_method": "slerp", "base_model": A, "models": [{"model": A}, {"model": B}],
                                 "parameters": {"t": [0, 0.5, 1]}, "dtype": "float32"})
case("s1_gradient_task_arithmetic", "s1", {"merge_method": "task_arithmetic", "base_model": BASE, "models": [
    {"model": A, "parameters": {"weight": [0.2, 0.5, 1]}}, {"model": B, "parameters": {"weight": 0.5}}],
    "dtype": "float32"})
case("s1_filter_star", "s1", {"merge_method": "linear", "models": [
    {"model": A, "parameters": {"weight": [{"filter": "*", "value": 0.7}, {"value": 0.1}]}},
    {"model": B, "parameters": {"weight": 0.3}}], "dtype": "float32"})
for method, params in (("linear", {}), ("task_arithmetic", {}), ("ties", {"density": 0.5})):
    r = {"merge_method": method, "base_model": BASE,
         "models": [{"model": m, "parameters": {"weight": 1.0}} for m in (BASE, A, B)], "dtype": "float32"}
    if params:
        r["parameters"] = params
    case(f"s1_base_in_models_{method}", "s1", r)
case("s1_slerp_near_parallel", "s1", {"merge_method": "slerp", "base_model": A, "models": [
    {"model": A}, {"model": "llama-near"}], "parameters": {"t": 0.5}, "dtype": "float32"},
    note="|cos| > 0.9995 while sin > 1e-6")
case("s1_ties_no_weight", "s1", {"merge_method": "ties", "base_model": BASE, "models": [{"model": A}, {"model": B}],
                                 "parameters": {"density": 0.5}, "dtype": "float32"},
     note="mergekit requires weight for ties")
case("s1_slerp_no_t", "s1", {"merge_method": "slerp", "base_model": A, "models": [{"model": A}, {"model": B}],
                             "dtype": "float32"}, note="mergekit requires t")

# (d) one recipe per mergekit method, fp32 in and out (one rounding step of fp32)
W = [{"model": A, "parameters": {"weight": 0.6}}, {"model": B, "parameters": {"weight": 0.4}}]
W3 = W + [{"model": C, "parameters": {"weight": 0.5}}]


def method_case(method: str, base: str | None = None, models=None, params: dict | None = None, suffix: str = "") -> None:
    r: dict = {"merge_method": method}
    if base:
        r["base_model"] = base
    r["models"] = models if models is not None else W
    if params:
        r["parameters"] = params
    r["dtype"] = "float32"
    case(f"m_{method}{suffix}", "method", r)


method_case("linear")
method_case("linear", models=W, params={"normalize": False}, suffix="_unnormalized")
method_case("slerp", base=A, models=[{"model": A}, {"model": B}], params={"t": 0.35})
method_case("nuslerp")
method_case("nuslerp", base=BASE, suffix="_base")
method_case("multislerp", models=W3)
method_case("multislerp", base=BASE, suffix="_base")
method_case("karcher", models=W3)
method_case("task_arithmetic", base=BASE)
method_case("ties", base=BASE, params={"density": 0.5})
method_case("dare_ties", base=BASE, params={"density": 0.5})
method_case("dare_linear", base=BASE, params={"density": 0.5})
method_case("breadcrumbs", base=BASE, params={"density": 0.8, "gamma": 0.05})
method_case("breadcrumbs_ties", base=BASE, params={"density": 0.8, "gamma": 0.05})
method_case("della", base=BASE, params={"density": 0.6, "epsilon": 0.1, "lambda": 1.0})
method_case("della_linear", base=BASE, params={"density": 0.6, "epsilon": 0.1, "lambda": 1.0})
method_case("sce", base=BASE, params={"select_topk": 0.5})
method_case("model_stock", base=BASE, models=[{"model": A}, {"model": B}, {"model": C}])
method_case("model_stock", base=BASE, models=[{"model": A}, {"model": B}, {"model": C}],
            params={"filter_wise": True}, suffix="_filter_wise")
method_case("nearswap", base=A, models=[{"model": A}, {"model": B}], params={"t": 0.02})
method_case("arcee_fusion", base=A, models=[{"model": A}, {"model": B}])
method_case("ram", base=BASE)
method_case("ramplus_tl", base=BASE)
method_case("passthrough", models=[{"model": A}])

# (e) frankenmerges: several slices (passthrough stacking, merged slices)
case("fr_linear_two_slices", "slices", {"merge_method": "linear", "slices": [
    {"sources": [{"model": A, "layer_range": [0, 2], "parameters": {"weight": 0.5}},
                 {"model": B, "layer_range": [0, 2], "parameters": {"weight": 0.5}}]},
    {"sources": [{"model": A, "layer_range": [1, 3], "parameters": {"weight": 0.3}},
                 {"model": B, "layer_range": [1, 3], "parameters": {"weight": 0.7}}]}], "dtype": "float32"})
case("fr_offset_sources", "slices", {"merge_method": "linear", "slices": [{"sources": [
    {"model": A, "layer_range": [0, 2], "parameters": {"weight": 0.5}},
    {"model": B, "layer_range": [1, 3], "parameters": {"weight": 0.5}}]}], "dtype": "float32"},
    note="one slice whose sources span different layers: a's 0-1 with b's 1-2")
case("fr_slerp_gradient_slices", "slices", {"merge_method": "slerp", "base_model": A, "slices": [
    {"sources": [{"model": A, "layer_range": [0, 2]}, {"model": B, "layer_range": [0, 2]}]},
    {"sources": [{"model": A, "layer_range": [1, 3]}, {"model": B, "layer_range": [1, 3]}],
     "parameters": {"t": 0.8}}], "parameters": {"t": [0, 1]}, "dtype": "bfloat16"},
    note="a t gradient over the stacked output, one slice overriding it")
case("fr_gemma3_stack", "slices", {"merge_method": "passthrough", "slices": [
    {"sources": [{"model": "gemma3_text-a", "layer_range": [0, 2]}]},
    {"sources": [{"model": "gemma3_text-b", "layer_range": [1, 3]}]}], "dtype": "float32"}, arch="gemma3_text",
    note="layer_types of the 4 stacked layers")
case("fr_qwen2_stack", "slices", {"merge_method": "passthrough", "slices": [
    {"sources": [{"model": "qwen2-a", "layer_range": [0, 2]}]},
    {"sources": [{"model": "qwen2-b", "layer_range": [0, 1]}]}], "dtype": "bfloat16"}, arch="qwen2")

# mergekit's tests' LLaVA recipes (two_model_config on picoLlaVa): mergekit's output drops the language model
V = ("llava-a", "llava-b", "llava-c")
case("vlm_linear", "vlm", two(V[0], V[1], "linear"), arch="llava")
case("vlm_slerp", "vlm", dict(two(V[0], V[1], "slerp", base=V[0]), parameters={"t": 0.35}), arch="llava")
case("vlm_task_arithmetic", "vlm", two(V[0], V[1], "task_arithmetic", base=V[2]), arch="llava")
case("vlm_ties", "vlm", two(V[0], V[1], "ties", base=V[2], params={"density": 0.3}, dtype="float32"), arch="llava",
     note="fp32 (mergekit's test: bf16) so that a float64 statement of TIES is the reference")

# every architecture: linear in fp32; the core ones also slerp (bf16) and ties (fp32)
for arch in CORE_ARCHS + EXTRA_ARCHS:
    a, b, base = f"{arch}-a", f"{arch}-b", f"{arch}-base"
    case(f"arch_{arch}_linear", "arch", {"merge_method": "linear", "models": [
        {"model": a, "parameters": {"weight": 0.6}}, {"model": b, "parameters": {"weight": 0.4}}], "dtype": "float32"},
        arch=arch)
    if arch in CORE_ARCHS:
        case(f"arch_{arch}_slerp", "arch", {"merge_method": "slerp", "base_model": a, "models": [
            {"model": a}, {"model": b}], "parameters": {"t": 0.4}, "dtype": "bfloat16"}, arch=arch)
        case(f"arch_{arch}_ties", "arch", {"merge_method": "ties", "base_model": base, "models": [
            {"model": a, "parameters": {"weight": 0.6}}, {"model": b, "parameters": {"weight": 0.4}}],
            "parameters": {"density": 0.5}, "dtype": "float32"}, arch=arch)
