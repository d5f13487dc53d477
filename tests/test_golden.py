"""souplm against mergekit 0.1.5's own outputs (tests/golden/, built by scripts/golden/build.py; docs/GOLDEN.md).

For every case of the manifest, souplm runs mergekit's recipe unchanged on the same inputs (rebuilt from
their seeds, sha256-checked) and its output is compared with mergekit's:
- deterministic methods: every element within one rounding step (1 ulp) of the output dtype at its
  magnitude, same tensor names, shapes and dtypes;
- random methods (DARE, DELLA): kept fraction and the first two moments of the delta per tensor, within
  6 sigma of the mask's Bernoulli variance (computed from the inputs, below), and DARE's survivor scale;
- the output config on the keys that matter, the tokenizer and chat template when mergekit wrote them;
- where mergekit itself refuses the recipe, souplm must refuse it too (a SoupError).
Every architecture's souplm output then loads with AutoModelForCausalLM (no missing or unexpected key) and
generates. souplm's output is never compared with souplm's.
"""

from __future__ import annotations

import hashlib
import importlib.util
import itertools
import json
import math
import os
import re
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open

from souplm import merge
from souplm.errors import SoupError

GOLDEN = Path(__file__).parent / "golden"

# -- what souplm does not do yet -----------------------------------------------------------------------
# case (or "load_<case>") -> why it fails today. strict: the day souplm gets it right the test XPASSes and
# fails; whoever fixed it removes the entry.
XFAIL: dict[str, str] = {}  # none left: every case agrees with mergekit or with its float64 statement

# Cases where mergekit is no reference: it fails (its error is in the manifest) where souplm should merge, its
# output is wrong, or (MoE TIES) its per-tensor statistics span another grouping than the inputs' tensors, an
# intentional difference (docs/MERGING.md). souplm is compared with an independent float64 statement of the
# formula instead (`independent` below), to a few rounding steps.
_VLM = ("mergekit's LLaVA output drops the language model (27 of 48 tensors, renamed to model.*; transformers "
        "loads it with the 21 LM tensors missing): the float64 statement keeps every input tensor, as named")
_MOE_STATS = ("mergekit 0.1.5 under transformers 5 merges a layer's experts as transformers 5 fuses them (every "
              "expert's gate and up projections in one [E, 2I, H] tensor), so TIES's k-th largest |delta| is taken "
              "over all experts at once; souplm merges each expert's projections as its inputs store them "
              "(docs/MERGING.md): the float64 statement trims each stored tensor")
NOT_REFERENCE: dict[str, str] = {
    "arch_mixtral_ties": _MOE_STATS,
    "arch_qwen3_moe_ties": _MOE_STATS,
    "fr_gemma3_stack": "mergekit stacks the layers but keeps the sources' layer_types: its config does not validate",
    "fr_qwen2_stack": "mergekit stacks the layers but keeps the sources' layer_types: its config does not validate",
    "arch_gpt_neox_linear": "mergekit's gpt-neox.json requires attention.bias buffers transformers 5 does not save",
    "arch_gpt_neox_slerp": "mergekit's gpt-neox.json requires attention.bias buffers transformers 5 does not save",
    "arch_gpt_neox_ties": "mergekit's gpt-neox.json requires attention.bias buffers transformers 5 does not save",
    "arch_cohere_linear": "mergekit's cohere.json requires q_norm/k_norm, absent when use_qk_norm is false",
    "arch_granitemoehybrid_linear": "mergekit's granite4moehybrid.json requires MoE experts, absent when "
                                    "num_local_experts is 0 (a dense hybrid)",
    "vlm_linear": _VLM,
    "vlm_slerp": _VLM,
    "vlm_task_arithmetic": _VLM,
    "vlm_ties": _VLM,
}
INDEPENDENT_ULPS = 4  # souplm's fp32 arithmetic against an exact float64 statement, rounded once
# Geometric methods in fp32: mergekit computes their angles and coefficients in fp32 arithmetic (chunked norms,
# acos and sin in float32), souplm in float64 from float64 dot products, so two correct results can be a few
# fp32 steps apart. Where they are more than one step apart, an exact float64 statement of the formula decides
# (assert_as_accurate): souplm within ACCURATE_ULPS of mergekit and at least as close as mergekit to it.
ACCURACY_JUDGED = {"slerp", "nuslerp", "multislerp", "karcher", "model_stock"}
ACCURATE_ULPS = 4
FP32_EVAL_STEPS = 2

# -----------------------------------------------------------------------------------------------------
_spec = importlib.util.spec_from_file_location("souplm_golden_inputs", GOLDEN / "inputs.py")
golden_inputs = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(golden_inputs)

MANIFEST = golden_inputs.load_manifest() if golden_inputs.MANIFEST.exists() else {"cases": {}, "models": {}}
CASES = MANIFEST["cases"]
MANTISSA = {torch.float32: 23, torch.bfloat16: 7, torch.float16: 10}
CONFIG_KEYS = ("architectures", "model_type", "num_hidden_layers", "n_layer", "vocab_size", "layer_types",
               "hidden_size", "n_embd", "num_local_experts", "num_experts", "tie_word_embeddings", "intermediate_size")
Z = 6.0  # sigmas of the random methods' statistics
MIN_N = 64  # per-tensor statistics on tensors this large (a norm's 8 entries are no sample); the whole model on all
LOAD_CASES = [n for n, c in CASES.items() if (c["group"] == "arch" and n.endswith("_linear"))
              or c["group"] == "slices" or n in ("ex_orcamini_platy", "mk_gpt2_stack", "vlm_linear")]
AUTO_CLASS = {"llava": "AutoModelForImageTextToText"}  # the rest: AutoModelForCausalLM


def _param(name: str, **kw):
    # SOUPLM_GOLDEN_NO_XFAIL=1: every case runs unmarked, to see today's failures (docs/GOLDEN.md)
    use = name in XFAIL and not os.environ.get("SOUPLM_GOLDEN_NO_XFAIL")
    marks = [pytest.mark.xfail(strict=True, reason=XFAIL[name])] if use else []
    return pytest.param(name, marks=marks, id=name, **kw)


# -- fixtures: the inputs, rebuilt once per session; souplm's outputs, merged once per session ----------------
@pytest.fixture(scope="session")
def inputs_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("golden-inputs")
    built: set[str] = set()

    def need(names: list[str]) -> Path:
        for name in names:
            if name in built:
                continue
            spec = MANIFEST["models"][name]
            out = golden_inputs.materialize(name, spec, root)
            got = golden_inputs.file_sha256(out / "model.safetensors")
            assert got == spec["sha256"], f"input {name}: the seeded rebuild is not the file mergekit merged"
            built.add(name)
        return root

    return need


@pytest.fixture(scope="session")
def souplm_outputs(inputs_dir, tmp_path_factory):
    outs = tmp_path_factory.mktemp("golden-souplm")
    done: dict[str, Path | BaseException] = {}

    def run(name: str) -> Path:
        if name not in done:
            case = CASES[name]
            root = inputs_dir(case["models"])
            recipe = root / f"{name}.yml"
            recipe.write_text(case["recipe"])  # model paths relative to the recipe's folder, as mergekit's to its cwd
            try:
                merge(recipe, outs / name, progress=False, hash_inputs=False)
                done[name] = outs / name
            except BaseException as e:  # noqa: BLE001 - re-raised for every test that needs it
                done[name] = e
        if isinstance(done[name], BaseException):
            raise done[name]
        return done[name]

    return run


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(str(f), "pt") as h:
            out.update({n: h.get_tensor(n) for n in list(h.keys())})
    return out


def _golden(case: dict) -> dict[str, torch.Tensor]:
    with safe_open(str(GOLDEN / case["file"]), "pt") as h:
        return {n: h.get_tensor(n) for n in list(h.keys())}


# -- comparisons ---------------------------------------------------------------------------------------
def ulp(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """One rounding step of `dtype` at magnitude |x| (float64; subnormals: the smallest normal's step)."""
    tiny = torch.finfo(dtype).tiny
    e = torch.floor(torch.log2(x.abs().double().clamp_min(tiny)))
    return torch.pow(2.0, e - MANTISSA[dtype])


def assert_within_one_ulp(name: str, got: torch.Tensor, want: torch.Tensor, ulps: int = 1,
                          operands: list[torch.Tensor] = ()) -> None:
    """Per tensor: max |souplm - mergekit| <= `ulps` rounding steps of the output dtype at the tensor's
    magnitude (the largest |value| of either result or of the inputs, `operands`: what the arithmetic rounds at)."""
    g, w = got.double(), want.double()
    assert torch.equal(torch.isnan(g), torch.isnan(w)), f"{name}: NaN in one output only"
    diff = (g - w).abs().nan_to_num(0.0)
    mag = torch.maximum(g.abs(), w.abs()).nan_to_num(0.0).max() if g.numel() else torch.tensor(0.0)
    for x in operands:
        if x.numel():
            mag = torch.maximum(mag, x.double().abs().max())
    step = ulps * float(ulp(mag, want.dtype))
    if g.numel() and diff.max() > step:
        i = int(torch.argmax(diff.flatten()))
        raise AssertionError(
            f"{name}: max |diff| {diff.max().item():.3g} > {ulps} ulp of {want.dtype} at the tensor's magnitude "
            f"{float(mag):.3g} ({step:.3g}); {int((diff > step).sum())}/{diff.numel()} elements over (worst at flat "
            f"index {i}: souplm {g.flatten()[i].item():.9g}, mergekit {w.flatten()[i].item():.9g})")


def tied_at_the_cut(case: dict, root: Path, name: str) -> torch.Tensor | None:
    """TIES: the entries whose |delta| (in the recipe's compute dtype, as mergekit computes it) equals its
    model's k-th largest, k = int(density * n): where mergekit's non-stable argsort and souplm's index order
    may keep different ones (docs/MERGING.md). None when the tensor is not trimmed."""
    r = yaml.safe_load(case["recipe"])
    if r["merge_method"] != "ties" or "slices" in r:
        return None
    g = r.get("parameters") or {}
    base = r["base_model"]
    models = [m["model"] for m in r["models"] if m["model"] != base]
    densities = [(m.get("parameters") or {}).get("density", g.get("density", 1.0)) for m in r["models"]
                 if m["model"] != base]
    if not all(isinstance(v, (int, float)) for v in densities) or name not in _tensors(root / base):
        return None  # (a gradient or filter list: the plain rule below)
    dtype = golden_inputs.DTYPES.get(r.get("dtype") or "", None)
    b = _tensors(root / base)[name]
    b = b.to(dtype) if dtype is not None else b
    tied = torch.zeros(b.shape, dtype=torch.bool)
    for m, density in zip(models, densities):
        x = _tensors(root / m)[name]
        d = ((x.to(dtype) if dtype is not None else x) - b).abs().float()
        if density >= 1:
            continue
        k = max(1, int(density * d.numel()))
        kth = torch.topk(d.reshape(-1), k).values[-1]
        tied |= d == kth
    return tied


def _recipe_params(case: dict) -> tuple[list[str], list[float], str, dict]:
    r = yaml.safe_load(case["recipe"])
    g = r.get("parameters") or {}
    models = [m for m in r["models"] if m["model"] != r["base_model"]]
    weights = [float((m.get("parameters") or {}).get("weight", g.get("weight", 1.0))) for m in models]
    dens = [float((m.get("parameters") or {}).get("density", g.get("density", 1.0))) for m in models]
    return [m["model"] for m in models], weights, r["base_model"], dict(g, densities=dens)


def _fp32(case: dict, root: Path, model: str) -> dict[str, torch.Tensor]:
    return {n: t.float() for n, t in _tensors(root / model).items()}


def assert_same_statistics(case: dict, got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], root: Path) -> None:
    """DARE / DELLA: per tensor, the kept fraction and the delta's mean and mean square agree within Z sigma
    of the variance their Bernoulli masks give (each model's entry kept with probability p, scaled by 1/p
    unless `rescale: false`, independent masks; every mask pattern enumerated), and DARE's survivor scale
    with one model (mergekit's L1 rescale: 1/p within its spread; 1 without rescale)."""
    models, weights, base_name, g = _recipe_params(case)
    lam = float(g.get("lambda", 1.0))
    p = g["densities"]
    rescale = bool(g.get("rescale", True))  # mergekit's default for every random method
    scale = [1 / pk if rescale else 1.0 for pk in p]
    base = _fp32(case, root, base_name)
    deltas = [{n: t - base[n] for n, t in _fp32(case, root, m).items()} for m in models]
    failures = []
    totals: dict[str, list] = {}
    for name, w_t in want.items():
        if name not in base:
            continue
        b = base[name].double()
        y_g, y_w = got[name].double() - b, w_t.double() - b
        d = torch.stack([dl[name].double().flatten() for dl in deltas])  # [K, n]
        n = d.shape[1]
        # every mask pattern's y_i and its probability
        ey, ey2, ey4 = (torch.zeros(n, dtype=torch.float64) for _ in range(3))
        q_any = torch.zeros(n, dtype=torch.float64)
        for pattern in itertools.product((0, 1), repeat=len(models)):
            prob = math.prod(pk if m else 1 - pk for m, pk in zip(pattern, p))
            y = lam * sum(m * w * dk * sk for m, w, dk, sk in zip(pattern, weights, d, scale))
            y = y if torch.is_tensor(y) else torch.zeros(n, dtype=torch.float64)
            ey, ey2, ey4 = ey + prob * y, ey2 + prob * y**2, ey4 + prob * y**4
            if any(pattern):
                q_any = q_any + prob * (y != 0).double()
        var = {"kept fraction": (q_any * (1 - q_any)).sum(), "mean delta": (ey2 - ey**2).clamp_min(0).sum(),
               "mean square delta": (ey4 - ey2**2).clamp_min(0).sum()}  # variances of the sums over entries
        sums = {"kept fraction": lambda y: (y != 0).double().sum(), "mean delta": lambda y: y.sum(),
                "mean square delta": lambda y: (y**2).sum()}
        for what, f in sums.items():
            a, e = float(f(y_g.flatten())), float(f(y_w.flatten()))
            tol = Z * math.sqrt(2 * float(var[what])) + (1.0 if what == "kept fraction" else 0.0) + 1e-12
            if abs(a - e) > tol and n >= MIN_N:
                failures.append(f"{name}: {what}: souplm {a / n:.6g}, mergekit {e / n:.6g} (tolerance {tol / n:.3g})")
            tot = totals.setdefault(what, [0.0, 0.0, 0.0, 0])
            tot[0] += a
            tot[1] += e
            tot[2] += float(var[what])
            tot[3] += n
        if len(models) == 1 and case["method"].startswith("dare") and n >= MIN_N:
            dk = d[0]
            kept_g, kept_w = (y_g.flatten() != 0) & (dk != 0), (y_w.flatten() != 0) & (dk != 0)
            if kept_g.sum() > 0 and kept_w.sum() > 0:
                s_g = float((y_g.flatten()[kept_g] / (weights[0] * lam * dk[kept_g])).median())
                s_w = float((y_w.flatten()[kept_w] / (weights[0] * lam * dk[kept_w])).median())
                cv = float(dk.pow(2).mean().sqrt() / dk.abs().mean().clamp_min(1e-30))
                tol = Z * (1 / p[0]) * math.sqrt(2 * (1 - p[0]) / (p[0] * n)) * cv if rescale else 0.0
                tol += 1e-6
                if abs(s_g - s_w) > tol:
                    failures.append(f"{name}: survivor scale: souplm {s_g:.6g}, mergekit {s_w:.6g} (tolerance {tol:.3g})")
    for what, (a, e, v, n) in totals.items():  # the whole model: the same statistics, far tighter
        tol = Z * math.sqrt(2 * v) + (1.0 if what == "kept fraction" else 0.0) + 1e-12
        if abs(a - e) > tol:
            failures.insert(0, f"whole model: {what}: souplm {a / n:.6g}, mergekit {e / n:.6g} (tolerance {tol / n:.3g})")
    assert not failures, f"{len(failures)} statistics differ:\n" + "\n".join(failures[:20])


CHATS = [([{"role": "user", "content": "hi"}], False),
         ([{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
           {"role": "assistant", "content": "hello"}], True)]


def _render(template: str, sample) -> str:
    import jinja2

    messages, prompt = sample
    env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True)
    return env.from_string(template).render(messages=messages, add_generation_prompt=prompt)


def assert_same_side(case: dict, out: Path) -> None:
    cfg = json.loads((out / "config.json").read_text())
    want = case.get("config") or {}
    diffs = {k: (cfg.get(k), want[k]) for k in CONFIG_KEYS if k in want and cfg.get(k) != want[k]}
    assert not diffs, f"config differs from mergekit's (souplm, mergekit): {diffs}"
    if case.get("tokenizer"):
        assert (out / "tokenizer.json").exists(), "mergekit wrote a tokenizer, souplm did not"
        tok = json.loads((out / "tokenizer.json").read_text())
        vocab = dict(tok["model"]["vocab"])
        vocab.update({a["content"]: a["id"] for a in tok.get("added_tokens", [])})
        assert vocab == case["tokenizer"]["vocab"], "output tokenizer's vocabulary differs from mergekit's"
    if case.get("chat_template"):
        template = None
        if (out / "chat_template.jinja").exists():
            template = (out / "chat_template.jinja").read_text()
        elif (out / "tokenizer_config.json").exists():
            template = json.loads((out / "tokenizer_config.json").read_text()).get("chat_template")
        assert template is not None, "mergekit wrote a chat template, souplm did not"
        for sample in CHATS:  # the same text rendered (as transformers renders templates), not the same spelling
            assert _render(template, sample) == _render(case["chat_template"], sample), \
                f"chat template renders differently from mergekit's: {_render(template, sample)!r}"


# -- the tests -----------------------------------------------------------------------------------------
def test_manifest_is_complete():
    assert CASES, "tests/golden/manifest.json is missing: run scripts/golden/build.py"
    stale = sorted(set(XFAIL) - set(CASES) - {f"load_{c}" for c in CASES})
    assert not stale, f"XFAIL names cases the manifest does not have: {stale}"
    for name, case in CASES.items():
        if case["mergekit_ok"]:
            want = _golden(case)
            assert sorted(want) == sorted(case["tensors"]), name
            for n, t in want.items():
                h = hashlib.sha256(t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()).hexdigest()
                assert h[:16] == case["tensors"][n], f"{name}: fixture tensor {n} changed"


def _layer_of(name: str) -> tuple[str, int, str] | None:
    m = re.match(r"^(.*?\.(?:layers|h))\.(\d+)\.(.*)$", name)
    return (m.group(1), int(m.group(2)), m.group(3)) if m else None


def independent(case: dict, root: Path) -> dict[str, torch.Tensor]:
    """The expected output, stated in float64 from the inputs and rounded once to the recipe's dtype."""
    r = yaml.safe_load(case["recipe"])
    dtype = golden_inputs.DTYPES[r.get("out_dtype") or r["dtype"]]
    return {n: t.to(dtype) for n, t in statement(case, root).items()}


def _gradient(value, layer: int | None, n_layers: int) -> float:
    """A parameter's value at one tensor, as mergekit's docs state gradients: a list spread evenly over the
    layers (layer i of L at i/(L-1), interpolated linearly between entries); tensors outside the layers at 0."""
    if not isinstance(value, list):
        return float(value)
    pos = 0.0 if layer is None else (layer / (n_layers - 1) if n_layers > 1 else 1.0)
    x = pos * (len(value) - 1)
    i = min(int(x), len(value) - 1)
    j = min(i + 1, len(value) - 1)
    return (1 - (x - i)) * float(value[i]) + (x - i) * float(value[j])


def _slerp64(v0: torch.Tensor, v1: torch.Tensor, t: float) -> torch.Tensor:
    """SLERP of two float64 tensors, flattened; lerp where |cos| > 0.9995 (mergekit's threshold)."""
    a, b = v0 / v0.norm().clamp_min(1e-300), v1 / v1.norm().clamp_min(1e-300)
    dot = float((a * b).sum())
    if abs(dot) > 0.9995:
        return (1 - t) * v0 + t * v1
    th = math.acos(dot)
    return (math.sin((1 - t) * th) * v0 + math.sin(t * th) * v1) / math.sin(th)


def statement(case: dict, root: Path) -> dict[str, torch.Tensor]:
    """The expected output in float64, stated from the inputs (linear, task arithmetic, slerp with gradients and
    one slice, ties, nuslerp, multislerp, karcher, model_stock, passthrough stacking), for the tensors it can state: with a
    tokenizer key, the vocabulary tensors are left out."""
    r = yaml.safe_load(case["recipe"])
    method = r["merge_method"]
    if "slices" in r and method == "slerp":
        (sl,) = r["slices"]  # one slice: its parameters over the recipe's, its layers renumbered from 0
        ranges = {tuple(src["layer_range"]) for src in sl["sources"]}
        assert len(ranges) == 1, "independent statement: one slice of equal layer ranges"
        ((lo, hi),) = ranges
        t_setting = (sl.get("parameters") or {}).get("t", (r.get("parameters") or {}).get("t"))
        other = next(src["model"] for src in sl["sources"] if src["model"] != r["base_model"])
        v0s, v1s = _tensors(root / r["base_model"]), _tensors(root / other)
        out = {}
        for n, v0 in v0s.items():
            parts = _layer_of(n)
            if parts and not lo <= parts[1] < hi:
                continue
            name = f"{parts[0]}.{parts[1] - lo}.{parts[2]}" if parts else n
            out[name] = _slerp64(v0.double(), v1s[n].double(),
                                 _gradient(t_setting, parts[1] - lo if parts else None, hi - lo))
        return out
    if "slices" in r:
        assert method == "passthrough", "independent statement: slices only for passthrough stacking"
        out: dict[str, torch.Tensor] = {}
        first = _tensors(root / r["slices"][0]["sources"][0]["model"])
        k = 0
        for sl in r["slices"]:
            (src,) = sl["sources"]
            lo, hi = src["layer_range"]
            ts = _tensors(root / src["model"])
            for layer in range(lo, hi):
                for n, t in ts.items():
                    parts = _layer_of(n)
                    if parts and parts[1] == layer:
                        out[f"{parts[0]}.{k + layer - lo}.{parts[2]}"] = t
            k += hi - lo
        # mergekit's stacking: embeddings from the first slice's model, the rest (final norm, lm_head) from the last's
        last = _tensors(root / r["slices"][-1]["sources"][0]["model"])
        out.update({n: (t if re.search(r"embed|wte|wpe", n) else last[n]) for n, t in first.items() if not _layer_of(n)})
        return {n: t.double() for n, t in out.items()}
    g = r.get("parameters") or {}
    x = {m["model"]: {n: t.double() for n, t in _tensors(root / m["model"]).items()} for m in r["models"]}
    if method == "linear":
        ws = [float((m.get("parameters") or {}).get("weight", 1.0)) for m in r["models"]]
        names = x[r["models"][0]["model"]]
        return {n: sum(w * x[m["model"]][n] for w, m in zip(ws, r["models"])) / sum(ws) for n in names}
    if method == "task_arithmetic":
        base = {n: t.double() for n, t in _tensors(root / r["base_model"]).items()}
        models = [m for m in r["models"] if m["model"] != r["base_model"]]
        ws = [float(m["parameters"]["weight"]) for m in models]
        return {n: b + sum(w * (x[m["model"]][n] - b) for w, m in zip(ws, models)) for n, b in base.items()}
    vocab = re.compile(r"embed_tokens|lm_head|wte|embed_in|embed_out") if ("tokenizer" in r or "tokenizer_source" in r) \
        else None
    if method == "slerp":
        t_setting = g["t"]
        other = next(m["model"] for m in r["models"] if m["model"] != r["base_model"])
        v0s, v1s = x[r["base_model"]], x[other]
        n_layers = 1 + max((p[1] for p in map(_layer_of, v0s) if p), default=0)
        return {n: _slerp64(v0, v1s[n], _gradient(t_setting, (_layer_of(n) or (0, None))[1], n_layers))
                for n, v0 in v0s.items() if not (vocab and vocab.search(n))}
    if method in ("nuslerp", "multislerp", "karcher"):
        from test_methods_geometric import (  # their float64 statements
            karcher_ref,
            multislerp_ref,
            nuslerp_ref,
        )

        assert "base_model" not in r, "independent statement: nuslerp, multislerp and karcher without a base only"
        names = [m["model"] for m in r["models"]]
        ws = [float(m["parameters"]["weight"]) for m in r["models"]]
        ref = {"nuslerp": lambda v: nuslerp_ref(v[0], v[1], ws[0], ws[1]),
               "multislerp": lambda v: multislerp_ref(v, ws), "karcher": lambda v: karcher_ref(v)}[method]
        return {n: torch.from_numpy(ref([x[m][n].numpy() for m in names])) for n in x[names[0]]
                if not (vocab and vocab.search(n))}
    if method == "model_stock":  # Jang et al. 2024, eq. 2 with mergekit's guards: t from the mean pairwise cosine
        base = {n: t.double() for n, t in _tensors(root / r["base_model"]).items()}
        models = [m["model"] for m in r["models"] if m["model"] != r["base_model"]]
        out = {}
        for n, b in base.items():
            cols = b.shape[-1] if g.get("filter_wise") and b.dim() >= 1 else b.numel()
            taus = [(x[m][n] - b).reshape(-1, cols) for m in models]
            cos = torch.stack([(taus[i] * taus[j]).sum(-1) / (taus[i].norm(dim=-1) * taus[j].norm(dim=-1)).clamp(min=1e-6)
                               for i in range(len(taus)) for j in range(i + 1, len(taus))]).clamp(-1, 1).mean(0)
            k = len(taus)
            denom = 1 + (k - 1) * cos
            t = torch.where(denom.abs() < 1e-6, 0.0, k * cos / denom)[:, None]
            mean = sum(x[m][n].reshape(-1, cols) for m in models) / k
            out[n] = (t * mean + (1 - t) * b.reshape(-1, cols)).reshape(b.shape)
        return out
    if method == "ties":
        base = {n: t.double() for n, t in _tensors(root / r["base_model"]).items()}
        models = [m for m in r["models"] if m["model"] != r["base_model"]]
        ws = [float(m["parameters"]["weight"]) for m in models]
        dens = [float((m.get("parameters") or {}).get("density", g.get("density", 1.0))) for m in models]
        out = {}
        for n, b in base.items():
            ds = []
            for m, p in zip(models, dens):
                d = (x[m["model"]][n] - b).flatten()
                k = int(p * d.numel())
                keep = torch.zeros_like(d, dtype=torch.bool)
                keep[torch.argsort(d.abs(), descending=True, stable=True)[:k]] = True
                ds.append(torch.where(keep, d, 0.0))
            wd = torch.stack([w * d for w, d in zip(ws, ds)])
            sign = torch.where(wd.sum(0) >= 0, 1.0, -1.0)
            agree = (torch.sign(wd) == sign) & (wd != 0)
            wsum = (torch.tensor(ws, dtype=torch.float64)[:, None] * agree).sum(0)
            merged = torch.where(wsum != 0, (wd * agree).sum(0) / torch.where(wsum != 0, wsum, 1.0), 0.0)
            out[n] = b + merged.reshape(b.shape)
        return out
    raise AssertionError(f"no independent statement of {method} in this test")


@pytest.mark.parametrize("name", [_param(n) for n in CASES])
def test_same_result_as_mergekit(name, souplm_outputs, inputs_dir):
    case = CASES[name]
    if not case["mergekit_ok"] and name not in NOT_REFERENCE:
        with pytest.raises(SoupError):  # mergekit refuses this recipe (its error is in the manifest): so must souplm
            souplm_outputs(name)
        return
    if name in NOT_REFERENCE:
        out = souplm_outputs(name)
        root = inputs_dir(case["models"])
        got, want = _tensors(out), independent(case, root)
        ins = [_tensors(root / m) for m in case["models"]]
        assert sorted(got) == sorted(want), f"tensor names: {sorted(set(got) ^ set(want))[:8]}"
        for n in sorted(want):
            assert got[n].shape == want[n].shape and got[n].dtype == want[n].dtype, n
            assert_within_one_ulp(n, got[n], want[n], ulps=INDEPENDENT_ULPS, operands=[t[n] for t in ins if n in t])
        return
    out = souplm_outputs(name)
    got, want = _tensors(out), _golden(case)
    got = experts_fused_as(want, got)
    missing, extra = sorted(set(want) - set(got)), sorted(set(got) - set(want))
    assert not missing and not extra, f"tensor names differ: missing {missing[:8]}, not in mergekit's {extra[:8]}"
    declared = yaml.safe_load(case["recipe"])
    declared = golden_inputs.DTYPES.get(declared.get("out_dtype") or declared.get("dtype") or "", None)
    for n in want:
        assert got[n].shape == want[n].shape, f"{n}: shape {tuple(got[n].shape)}, mergekit {tuple(want[n].shape)}"
        if declared is not None and want[n].dtype != declared:
            # mergekit wrote this tensor in another dtype than the recipe's (a mergekit quirk, docs/GOLDEN.md):
            # souplm must write the recipe's, compared with mergekit's value rounded to it
            want[n] = want[n].to(declared)
        assert got[n].dtype == want[n].dtype, f"{n}: dtype {got[n].dtype}, mergekit {want[n].dtype}"
    root = inputs_dir(case["models"])
    if case["random"]:
        assert_same_statistics(case, got, want, root)
    else:
        ins = [_tensors(root / m) for m in case["models"]]
        exact = None  # the float64 statement, built when a geometric method's tensor is more than a step away
        for n in sorted(want):
            tied = tied_at_the_cut(case, root, n)
            if tied is not None and tied.any():
                # the one intentional difference: which tied entries survive the trim (the count is the same);
                # everywhere else the same rounding-step rule
                off = (got[n].double() - want[n].double()).abs() > 0
                assert not (off & ~tied).any() or _within(n, got[n], want[n], ins, ~tied), (
                    f"{n}: differs from mergekit away from the entries tied at TIES's cut")
                continue
            try:
                assert_within_one_ulp(n, got[n], want[n], operands=[t[n] for t in ins if n in t])
            except AssertionError:
                if case["method"] not in ACCURACY_JUDGED or got[n].dtype != torch.float32:
                    raise
                exact = exact if exact is not None else statement(case, root)
                if n not in exact:
                    raise
                assert_as_accurate(n, got[n], want[n], exact[n], operands=[t[n] for t in ins if n in t])
    assert_same_side(case, out)


def assert_as_accurate(name: str, got: torch.Tensor, want: torch.Tensor, exact: torch.Tensor,
                       operands: list[torch.Tensor]) -> None:
    """Two fp32 statements of one formula more than one step apart: souplm within FP32_EVAL_STEPS of the exact
    float64 value (what fp32 evaluation of c_1 x_1 + c_2 x_2 with exact coefficients may be off: coefficients,
    products and the sum each rounded); or, where it is farther, within ACCURATE_ULPS of mergekit and no
    farther than mergekit from the exact value."""
    mag = max([float(got.double().abs().max()), float(want.double().abs().max())]
              + [float(x.double().abs().max()) for x in operands if x.numel()])
    step = float(ulp(torch.tensor(mag), got.dtype))
    err_s = float((got.double() - exact).abs().max())
    err_m = float((want.double() - exact).abs().max())
    if err_s <= FP32_EVAL_STEPS * step:
        return
    assert_within_one_ulp(name, got, want, ulps=ACCURATE_ULPS, operands=operands)
    assert err_s <= err_m, (
        f"{name}: souplm is {err_s / step:.2f} steps from the exact float64 value, mergekit {err_m / step:.2f}: "
        f"souplm is more than {FP32_EVAL_STEPS} steps off and less accurate than mergekit")


def experts_fused_as(want: dict[str, torch.Tensor], got: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """souplm writes MoE experts per expert, as its inputs store them; mergekit 0.1.5 under transformers 5 writes
    them fused (`mlp.experts.gate_up_proj` [E, 2I, H], `mlp.experts.down_proj` [E, H, I]). This restates souplm's
    output in the fused layout by transformers 5's own rule (conversion_mapping.py: each expert's gate and up
    projections, w1 and w3 in Mixtral, stacked over experts and concatenated on dim 1; down, w2, stacked; Mixtral's
    block_sparse_moe renamed mlp), so the values can be compared; where mergekit has no fused tensor, unchanged."""
    got = dict(got)
    for fused in [n for n in want if n.endswith(".mlp.experts.gate_up_proj") and n not in got]:
        prefix = fused.removesuffix("experts.gate_up_proj")
        for style, (gate, up, down) in {prefix: ("gate_proj", "up_proj", "down_proj"),
                                        prefix.replace(".mlp.", ".block_sparse_moe."): ("w1", "w3", "w2")}.items():
            experts = sorted({int(m.group(1)) for n in got if (m := re.match(re.escape(style) + r"experts\.(\d+)\.", n))})
            if not experts:
                continue
            take = [[got.pop(f"{style}experts.{e}.{proj}.weight") for e in experts] for proj in (gate, up, down)]
            got[fused] = torch.cat([torch.stack(take[0]), torch.stack(take[1])], dim=1)
            got[prefix + "experts.down_proj"] = torch.stack(take[2])
            for n in [n for n in got if n.startswith(style) and style != prefix]:
                got[prefix + n.removeprefix(style)] = got.pop(n)
    return got


def _within(n: str, got: torch.Tensor, want: torch.Tensor, ins: list, where: torch.Tensor) -> bool:
    assert_within_one_ulp(n, got[where], want[where], operands=[t[n] for t in ins if n in t])
    return True


@pytest.mark.parametrize("name", [_param(f"load_{n}") for n in LOAD_CASES])
def test_output_loads_and_generates(name, souplm_outputs):
    import transformers

    case = name.removeprefix("load_")
    out = souplm_outputs(case)
    auto = getattr(transformers, AUTO_CLASS.get(CASES[case]["arch"], "AutoModelForCausalLM"))
    model, info = auto.from_pretrained(out, output_loading_info=True)
    bad = {k: v for k, v in info.items() if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v}
    assert not bad, f"transformers loading souplm's output: {bad}"
    cfg = json.loads((out / "config.json").read_text())
    layers = cfg.get("num_hidden_layers", cfg.get("n_layer"))
    if isinstance(cfg.get("layer_types"), list):
        assert len(cfg["layer_types"]) == layers, "layer_types does not match num_hidden_layers"
    ids = model.generate(torch.tensor([[1, 5, 7]]), max_new_tokens=3, min_new_tokens=3, do_sample=False,
                         pad_token_id=0)
    assert ids.shape == (1, 6)


def test_the_accuracy_judge_can_fail():
    """assert_as_accurate passes souplm only when it is no farther than mergekit from the exact value (or
    within FP32_EVAL_STEPS of it): a result further off than both fails it."""
    exact = torch.linspace(-0.3, 0.3, 64, dtype=torch.float32).double()  # fp32 values: whole steps stay exact
    step = float(ulp(torch.tensor(0.3), torch.float32))
    mergekit = (exact + step).float()
    assert_as_accurate("t", exact.float(), (exact + 3 * step).float(), exact, [])  # closer than mergekit: passes
    assert_as_accurate("t", (exact + step).float(), (exact - 7 * step).float(), exact, [])  # near exact: passes
    with pytest.raises(AssertionError, match="less accurate than mergekit"):
        assert_as_accurate("t", (exact - 3 * step).float(), mergekit, exact, [])  # 4 steps apart, 3 off
    with pytest.raises(AssertionError, match="ulp of"):
        assert_as_accurate("t", (exact - 4 * step).float(), (exact + 2 * step).float(), exact, [])  # 6 apart
