"""breadcrumbs, breadcrumbs_ties, della, della_linear, sce and model_stock against independent NumPy float64
statements of mergekit 0.1.5's formulas (written here from its documented behaviour), directly and
through `souplm.merge` on tiny checkpoints in fp32, bf16 and fp16; and their parameter validation."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import souplm
from souplm import SoupError
from souplm.cli import main as cli
from souplm.methods import get_method

RNG = np.random.default_rng(7)


# -- calling a method directly -------------------------------------------------------------------
def call(name, models, base, keys=None, **params):
    m = get_method(name)
    n = len(models)
    kwargs = {}
    for key, default in m.model_params.items():
        v = params.pop(key, default)
        kwargs[key] = torch.tensor(v if isinstance(v, list) else [v] * n, dtype=torch.float32)
    kwargs.update(params)
    if m.random:
        kwargs["keys"] = keys if keys is not None else [1000 + i for i in range(n)]
    tt = [torch.tensor(t, dtype=torch.float32) for t in models]
    return m.fn(tt, torch.tensor(base, dtype=torch.float32), **kwargs).numpy()


def rand(*shape, scale=1.0):
    return (RNG.standard_normal(shape) * scale).astype(np.float32)


def trio(*shape, scale=0.1):
    base = rand(*shape)
    return base, [base + rand(*shape, scale=scale) for _ in range(3)]


# -- the formulas, in float64 ----------------------------------------------------------------------
def combine_ref(base, deltas, weights, consensus, normalize, lam):
    """mergekit's generalized task arithmetic after sparsification: weight, (elect), sum, normalize, lambda."""
    w = np.asarray(weights, np.float64).reshape(-1, *([1] * base.ndim))
    wd = np.stack(deltas) * w
    if consensus:
        elected = np.where(wd.sum(0) >= 0, 1.0, -1.0)  # + where the weighted sum is exactly 0
        agree = np.sign(wd) == elected
        mixed = (wd * agree).sum(0)
        div = (w * agree).sum(0)
        div[div == 0] = 1.0
    else:
        mixed = wd.sum(0)
        div = np.full(base.shape, w.sum())
        div[np.abs(div) < 1e-8] = 1.0
    if normalize:
        mixed = mixed / div
    return base.astype(np.float64) + lam * mixed


def l1_ref(d, keep, rescale):
    out = d * keep
    if rescale:
        before, after = np.abs(d).sum(), np.abs(out).sum()
        if before >= 1e-7 and after >= 1e-7:
            out = out * (before / after)
    return out


def breadcrumb_ref(d, density, gamma, rescale):
    if density >= 1:
        return d
    n = d.size
    keep_n, top = int(density * n), int(gamma * n)
    lo = max(0, n - keep_n - top)
    order = np.lexsort((-np.arange(n), np.abs(d).reshape(-1)))  # ascending |d|; of equals, the higher index first
    keep = np.zeros(n)
    keep[order[lo:lo + keep_n]] = 1
    return l1_ref(d, keep.reshape(d.shape), rescale)


def splitmix_draws(key, n):
    """souplm's counter-based stream from its definition: entry j takes bits 16*(j%4).. of SplitMix64's
    output for state key + (j//4 + 1) * gamma (Steele et al. 2014)."""
    m64 = (1 << 64) - 1
    out = np.empty(n, np.int64)
    for j in range(n):
        z = (key + (j // 4 + 1) * 0x9E3779B97F4A7C15) & m64
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & m64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & m64
        z ^= z >> 31
        out[j] = (z >> (16 * (j % 4))) & 0xFFFF
    return out


def della_probs_ref(d, density, eps):
    """Keep probability: rank r (0 = smallest |d| of its row, dim 1; 1-D: one row) of m -> d - e + 2 e r / (m - 1)."""
    rows = d.reshape(1, -1) if d.ndim < 2 else d
    m = rows.shape[1]
    ranks = np.argsort(np.argsort(np.abs(rows), axis=1, kind="stable"), axis=1, kind="stable")
    p = (density - eps) + 2 * eps * ranks / (m - 1)
    return p.reshape(d.shape)


def della_ref(d, density, eps, key, rescale):
    if density >= 1:
        return d
    p = della_probs_ref(d, density, eps)
    keep = splitmix_draws(key, d.size).reshape(d.shape) < np.round(p.astype(np.float32) * 65536)
    return l1_ref(d, keep, rescale)


def sce_ref(base, models, topk):
    tv = np.stack([m.astype(np.float64) - base for m in models])
    if topk < 1:
        var = tv.var(0)
        k = int(np.count_nonzero(var) * topk) if topk > 0 else 0
        mask = np.zeros(var.size)
        mask[np.argsort(-var.reshape(-1), kind="stable")[:k]] = 1
        tv = tv * mask.reshape(var.shape)
    ms = (tv**2).reshape(len(models), -1).mean(1)
    w = np.full(len(models), 1 / len(models)) if abs(ms.sum()) < 1e-6 else ms / ms.sum()
    w = w.reshape(-1, *([1] * base.ndim))
    agree = np.sign(tv) == np.where(tv.sum(0) >= 0, 1.0, -1.0)
    return base + (tv * w * agree).sum(0) / np.maximum((w * agree).sum(0), 1e-6)


def model_stock_ref(base, models, filter_wise):
    b = base.astype(np.float64)
    ws = [m.astype(np.float64) for m in models]
    if filter_wise and b.ndim >= 2:
        flat = lambda x: x.reshape(-1, x.shape[-1])
    else:
        flat = lambda x: x.reshape(1, -1)
    off = [flat(w) - flat(b) for w in ws]
    cos = []
    for i in range(len(off)):
        for j in range(i + 1, len(off)):
            den = np.maximum(np.linalg.norm(off[i], axis=1) * np.linalg.norm(off[j], axis=1), 1e-6)
            cos.append(np.clip((off[i] * off[j]).sum(1) / den, -1, 1))
    c = np.mean(cos, axis=0)[:, None]
    n = len(ws)
    den = 1 + (n - 1) * c
    t = np.where(np.abs(den) < 1e-6, 0.0, n * c / np.where(np.abs(den) < 1e-6, 1.0, den))
    avg = sum(flat(w) for w in ws) / n
    return (t * avg + (1 - t) * flat(b)).reshape(b.shape)


def close(got, ref, rtol=2e-5):
    ref = np.asarray(ref, np.float64)
    np.testing.assert_allclose(got, ref, rtol=rtol, atol=rtol * float(np.abs(ref).max()))


# -- breadcrumbs ----------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(40, 25), (997,), (3, 4, 5)])
@pytest.mark.parametrize("density,gamma", [(0.5, 0.01), (0.3, 0.1), (0.9, 0.2), (0.05, 0.0), (1.0, 0.3)])
@pytest.mark.parametrize("ties_", [False, True])
def test_breadcrumbs_match_formula(shape, density, gamma, ties_):
    base, models = trio(*shape)
    w, dens, gam = [0.7, -0.4, 1.2], [density, density * 0.8, density], [gamma, gamma, gamma / 2]
    name = "breadcrumbs_ties" if ties_ else "breadcrumbs"
    for rescale, normalize, lam in [(False, False, 1.0), (True, True, 0.6)]:
        got = call(name, models, base, weight=w, density=dens, gamma=gam, rescale=rescale, normalize=normalize,
                   **{"lambda": lam})
        deltas = [breadcrumb_ref(m.astype(np.float64) - base, p, g, rescale) for m, p, g in zip(models, dens, gam)]
        close(got, combine_ref(base, deltas, w, ties_, normalize, lam))


def test_breadcrumbs_gamma_drops_the_largest_and_density_is_exact():
    base = np.zeros(1000, np.float32)
    ft = np.arange(1, 1001, dtype=np.float32) * RNG.choice([-1, 1], 1000).astype(np.float32)
    got = call("breadcrumbs", [ft], base, weight=1.0, density=0.3, gamma=0.05)
    kept = np.flatnonzero(got)
    assert kept.size == 300  # exactly int(0.3 * 1000)
    np.testing.assert_array_equal(np.sort(np.abs(ft[kept])), np.arange(651, 951))  # below the top 50 (gamma)
    # ties in magnitude: still exactly k entries, never all tied ones
    flat = np.ones(1000, np.float32)
    got = call("breadcrumbs", [flat], base, weight=1.0, density=0.37, gamma=0.01)
    np.testing.assert_array_equal(np.flatnonzero(got), np.arange(10, 380))  # lower index = larger: 0..9 are the top
    # keep + top > n: the outlier cut shrinks so that the density holds
    got = call("breadcrumbs", [ft], base, weight=1.0, density=0.99, gamma=0.05)
    np.testing.assert_array_equal(np.sort(np.abs(ft[np.flatnonzero(got)])), np.arange(1, 991))


def test_breadcrumbs_at_full_density_is_task_arithmetic():
    base, models = trio(30, 20)
    got = call("breadcrumbs", models, base, weight=[0.5, 0.3, 0.2], gamma=0.2)  # density 1: gamma unused
    close(got, base + sum(w * (m.astype(np.float64) - base) for w, m in zip([0.5, 0.3, 0.2], models)))


def test_consensus_elects_plus_where_the_weighted_sum_is_zero():
    base = np.zeros(6, np.float32)
    a = np.array([1, -1, 2, 0, 3, -3], np.float32)
    b = -a
    got = call("breadcrumbs_ties", [a, b], base, weight=[1.0, 1.0], normalize=True)
    np.testing.assert_array_equal(got, np.abs(a))  # + elected: the positive entry survives


# -- della ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(24, 33), (101,)])
@pytest.mark.parametrize("linear", [False, True])
def test_della_matches_formula_with_the_stream(shape, linear):
    base, models = trio(*shape)
    keys = [11, 2**63 + 3, 99]
    w, dens, eps = [1.0, 0.5, -0.3], [0.4, 0.6, 0.5], [0.1, 0.3, 0.0]
    name = "della_linear" if linear else "della"
    for rescale, normalize, lam in [(True, not linear, 1.0), (False, linear, 1.5)]:
        got = call(name, models, base, keys=keys, weight=w, density=dens, epsilon=eps, rescale=rescale,
                   normalize=normalize, **{"lambda": lam})
        deltas = [della_ref(m.astype(np.float64) - base, p, e, k, rescale)
                  for m, p, e, k in zip(models, dens, eps, keys)]
        close(got, combine_ref(base, deltas, w, not linear, normalize, lam))


def test_della_keep_probability_ramps_with_magnitude_rank():
    base = np.zeros((400, 200), np.float32)
    ft = rand(400, 200) + np.float32(0)  # no zeros
    density, eps = 0.5, 0.3
    got = call("della_linear", [ft], base, weight=1.0, density=density, epsilon=eps, rescale=False)
    kept = got != 0
    assert abs(kept.mean() - density) < 0.01  # the ramp's mean is the density
    ranks = np.argsort(np.argsort(np.abs(ft), axis=1), axis=1)
    low, high = kept[ranks < 20].mean(), kept[ranks >= 180].mean()
    # ranks 0..19 of 200: p from 0.2 to 0.257 (mean 0.229); ranks 180..199: mean 0.771
    assert abs(low - 0.2286) < 0.02 and abs(high - 0.7714) < 0.02
    np.testing.assert_array_equal(got[kept], ft[kept])  # no rescale: survivors unchanged
    # with rescale the L1 norm of the task vector is kept
    got = call("della_linear", [ft], base, weight=1.0, density=density, epsilon=eps)
    np.testing.assert_allclose(np.abs(got).sum(), np.abs(ft).sum(), rtol=1e-5)


def test_della_full_density_keeps_everything():
    base, models = trio(10, 10)
    got = call("della", models, base, weight=[1, 1, 1], density=1.0, epsilon=0.15)
    deltas = [m.astype(np.float64) - base for m in models]
    close(got, combine_ref(base, deltas, [1, 1, 1], True, True, 1.0))


# -- sce ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n", [1, 2, 3])
@pytest.mark.parametrize("topk", [1.0, 0.5, 0.1, 0.0])
@pytest.mark.parametrize("shape", [(30, 17), (64,)])
def test_sce_matches_formula(n, topk, shape):
    base, models = trio(*shape)
    got = call("sce", models[:n], base, select_topk=topk)
    close(got, sce_ref(base, models[:n], topk))


def test_sce_small_task_vectors_get_uniform_weights():
    base = rand(20, 20)
    models = [base + rand(20, 20, scale=1e-4), base + rand(20, 20, scale=3e-4)]  # mean squares << 1e-6
    got = call("sce", models, base)
    close(got, sce_ref(base, models, 1.0))
    tv = [m.astype(np.float64) - base for m in models]
    agree = [np.sign(t) == np.where(tv[0] + tv[1] >= 0, 1, -1) for t in tv]
    both = agree[0] & agree[1]
    close(got[both], (base + (tv[0] + tv[1]) / 2)[both])  # weights 1/2, 1/2


# -- model_stock ----------------------------------------------------------------------------------
@pytest.mark.parametrize("n", [2, 3])
@pytest.mark.parametrize("filter_wise", [False, True])
@pytest.mark.parametrize("shape", [(16, 24), (50,), (2, 3, 8)])
def test_model_stock_matches_formula(n, filter_wise, shape):
    base, models = trio(*shape)
    models = [models[0] + 0.05 * models[1]] + models[1:n]  # correlated task vectors: t away from 0 and 1
    got = call("model_stock", models, base, filter_wise=filter_wise)
    close(got, model_stock_ref(base, models, filter_wise))


def test_model_stock_singular_and_zero_offsets_keep_the_base():
    base = rand(8, 8)
    d = rand(8, 8)
    got = call("model_stock", [base + d, base - d], base)  # cos = -1, 1 + (N - 1) cos = 0: base
    np.testing.assert_array_equal(got, base)
    got = call("model_stock", [base.copy(), base + d], base, filter_wise=True)  # a zero offset: cos 0, t 0
    np.testing.assert_array_equal(got, base)
    got = call("model_stock", [base + d, base + 2 * d], base)  # parallel: cos 1, t 1, the average
    close(got, base + 1.5 * d.astype(np.float64))


# -- through souplm.merge on tiny checkpoints ---------------------------------------------------
SHAPES = {
    "model.embed_tokens.weight": (40, 16),
    "model.layers.0.self_attn.q_proj.weight": (16, 16),
    "model.layers.0.mlp.down_proj.weight": (16, 24),
    "model.layers.0.input_layernorm.weight": (16,),
    "model.norm.weight": (16,),
    "lm_head.weight": (40, 16),
}
CONFIG = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 16, "intermediate_size": 24,
          "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 2, "vocab_size": 40,
          "tie_word_embeddings": False}
TORCH = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def checkpoints(tmp_path, dtype):
    """A base and three fine-tunes (base + small deltas), stored in `dtype`; returns paths and fp64 tensors."""
    gen = torch.Generator().manual_seed(3)
    base = {k: torch.randn(s, generator=gen) * 0.5 for k, s in SHAPES.items()}
    tensors = {"base": base}
    for name in ("a", "b", "c"):
        tensors[name] = {k: v + 0.05 * torch.randn(v.shape, generator=gen) for k, v in base.items()}
    paths = {}
    for name, ts in tensors.items():
        d = tmp_path / f"{dtype}-{name}"
        d.mkdir()
        stored = {k: v.to(TORCH[dtype]).contiguous() for k, v in ts.items()}
        save_file(stored, str(d / "model.safetensors"), metadata={"format": "pt"})
        (d / "config.json").write_text(json.dumps({**CONFIG, "torch_dtype": dtype}))
        paths[name] = d
        tensors[name] = {k: v.to(torch.float64).numpy() for k, v in stored.items()}
    return paths, tensors


def ulp_close(got, ref, dtype):
    """Within one rounding step of the output dtype (plus fp32 arithmetic) of the float64 statement."""
    ref = np.asarray(ref, np.float64)
    eps = {"float32": 2.0**-23, "bfloat16": 2.0**-8, "float16": 2.0**-11}[dtype]
    tol = eps * np.abs(ref) + 1e-6 * float(np.abs(ref).max())
    assert np.all(np.abs(got - ref) <= tol), float(np.max(np.abs(got - ref) - tol))


CASES = {
    "breadcrumbs": ({"density": 0.6, "gamma": 0.05, "weight": [0.6, 0.5, -0.2]}, {}),
    "breadcrumbs_ties": ({"density": 0.4, "gamma": 0.02, "weight": [1.0, 0.7, 0.4]}, {"normalize": True}),
    "sce": ({}, {"select_topk": 0.5}),
    "model_stock": ({}, {"filter_wise": False}),
}


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
@pytest.mark.parametrize("method", sorted(CASES))
def test_merge_matches_formula(tmp_path, dtype, method):
    paths, t = checkpoints(tmp_path, dtype)
    per_model, glob = CASES[method]
    models = []
    for i, name in enumerate("abc"):
        p = {k: (v[i] if isinstance(v, list) else v) for k, v in per_model.items()}
        models.append({"model": str(paths[name]), "parameters": p})
    recipe = {"merge_method": method, "base_model": str(paths["base"]), "models": models, "parameters": glob,
              "dtype": dtype}
    if get_method(method).native_dtype:  # rounded once (the step-by-step bf16/fp16 rule: test_sparse_forms.py)
        recipe["compute_dtype"] = "float32"
    souplm.merge(recipe, tmp_path / "out", progress=False, hash_inputs=False)
    out = load_file(str(tmp_path / "out" / "model.safetensors"))
    for k in SHAPES:
        assert out[k].dtype == TORCH[dtype]
        got = out[k].to(torch.float64).numpy()
        base, ms = t["base"][k], [t[n][k] for n in "abc"]
        if method == "sce":
            ref = sce_ref(base, ms, 0.5)
            var = np.var([m - base for m in ms], axis=0)
            cut = np.sort(var.reshape(-1))[::-1][int(np.count_nonzero(var) * 0.5) - 1]
            near = np.abs(var - cut) <= 1e-5 * cut  # a near-tie at the cut: fp32 and fp64 may choose apart
            got, ref = got[~near], ref[~near]
        elif method == "model_stock":
            ref = model_stock_ref(base, ms, False)
        else:
            pm = [{kk: (v[i] if isinstance(v, list) else v) for kk, v in per_model.items()} for i in range(3)]
            deltas = [breadcrumb_ref(m - base, p["density"], p["gamma"], False) for m, p in zip(ms, pm)]
            ref = combine_ref(base, deltas, [p["weight"] for p in pm], method.endswith("ties"),
                              glob.get("normalize", False), 1.0)
        ulp_close(got, ref, dtype)


@pytest.mark.parametrize("method", ["della", "della_linear"])
def test_della_merge_is_reproducible_and_keeps_the_density(tmp_path, method):
    paths, t = checkpoints(tmp_path, "float32")
    recipe = {"merge_method": method, "base_model": str(paths["base"]), "seed": 5,
              "models": [{"model": str(paths["a"]), "parameters": {"weight": 1.0}}],
              "parameters": {"density": 0.4, "epsilon": 0.2, "rescale": False}}
    souplm.merge(recipe, tmp_path / "o1", progress=False, hash_inputs=False)
    souplm.merge(recipe, tmp_path / "o2", progress=False, hash_inputs=False)
    o1 = load_file(str(tmp_path / "o1" / "model.safetensors"))
    o2 = load_file(str(tmp_path / "o2" / "model.safetensors"))
    kept = total = 0
    for k in SHAPES:
        torch.testing.assert_close(o1[k], o2[k], rtol=0, atol=0)
        delta = t["a"][k] - t["base"][k]
        got = o1[k].to(torch.float64).numpy() - t["base"][k]
        survived = np.abs(got) > 1e-7
        np.testing.assert_allclose(got[survived], delta[survived], rtol=1e-5, atol=1e-6)  # unscaled
        kept, total = kept + survived.sum(), total + survived.size
    assert abs(kept / total - 0.4) < 0.04
    recipe["seed"] = 6
    souplm.merge(recipe, tmp_path / "o3", progress=False, hash_inputs=False)
    o3 = load_file(str(tmp_path / "o3" / "model.safetensors"))
    assert any(not torch.equal(o1[k], o3[k]) for k in SHAPES)


# -- validation -----------------------------------------------------------------------------------
def recipe_for(tmp_path, method, per_model=None, glob=None, n=2):
    paths, _ = checkpoints(tmp_path, "float32")
    models = [{"model": str(paths[x]), "parameters": dict(per_model or {})} for x in "abc"[:n]]
    return {"merge_method": method, "base_model": str(paths["base"]), "models": models, "parameters": glob or {}}


@pytest.mark.parametrize("method,per_model,glob,needle", [
    ("della", {"weight": 1.0}, {"density": 0.9, "epsilon": 0.15}, "epsilon"),  # 0.9 + 0.15 >= 1
    ("della_linear", {"weight": 1.0, "density": 0.1}, {"epsilon": 0.1}, "epsilon"),  # 0.1 - 0.1 <= 0
    ("della", {"weight": 1.0}, {"epsilon": 0.5}, "epsilon"),
    ("della", {"weight": 1.0}, {"epsilon": -0.1}, "epsilon"),
    ("della", {}, {"density": 0.5}, "weight"),  # mergekit: weight has no default
    ("breadcrumbs", {}, {"density": 0.5}, "weight"),
    ("breadcrumbs", {"weight": 1.0}, {"gamma": 1.5}, "gamma"),
    ("breadcrumbs_ties", {"weight": 1.0, "gamma": -0.1}, {}, "gamma"),
    ("breadcrumbs", {"weight": 1.0}, {"rescale": "yes"}, "rescale"),
    ("sce", {}, {"select_topk": 1.2}, "select_topk"),
    ("sce", {"density": 0.5}, {}, "density"),
    ("model_stock", {}, {"filter_wise": 1}, "filter_wise"),
])
def test_bad_parameters_are_one_line_errors(tmp_path, capsys, method, per_model, glob, needle):
    recipe = recipe_for(tmp_path, method, per_model, glob)
    path = tmp_path / "r.yaml"
    import yaml

    path.write_text(yaml.safe_dump(recipe))
    code = cli(["merge", str(path), "-o", str(tmp_path / "out"), "--quiet", "--no-hash"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and err.startswith("souplm: error:"), err
    assert needle in err
    assert not (tmp_path / "out").exists()


def test_della_window_accepts_what_mergekit_accepts(tmp_path):
    # density 1 does not prune, so epsilon is not checked against it (mergekit returns the task vector)
    souplm.merge(recipe_for(tmp_path, "della", {"weight": 1.0}, {"density": 1.0, "epsilon": 0.4}), tmp_path / "o",
                 progress=False, hash_inputs=False)


def test_weight_is_accepted_and_ignored_by_sce_and_model_stock(tmp_path):
    """mergekit's sce and model_stock take no weight; its recipes often set one anyway, and it ignores it."""
    paths, t = checkpoints(tmp_path, "float32")
    k = "model.layers.0.mlp.down_proj.weight"
    for method, ref in (("sce", sce_ref), ("model_stock", model_stock_ref)):
        recipe = {"merge_method": method, "base_model": str(paths["base"]),
                  "models": [{"model": str(paths[x]), "parameters": {"weight": w}} for x, w in (("a", 0.9), ("b", 0.1))]}
        souplm.merge(recipe, tmp_path / method, progress=False, hash_inputs=False)
        got = load_file(str(tmp_path / method / "model.safetensors"))[k].numpy().astype(np.float64)
        ulp_close(got, ref(t["base"][k], [t["a"][k], t["b"][k]], *((1.0,) if method == "sce" else (False,))), "float32")


def test_model_stock_needs_two_models(tmp_path):
    with pytest.raises(SoupError, match="at least 2 models"):
        souplm.merge(recipe_for(tmp_path, "model_stock", n=1), tmp_path / "o", progress=False, hash_inputs=False)


@pytest.mark.parametrize("method", ["breadcrumbs", "model_stock"])
def test_embeddings_of_different_sizes_merge_the_shared_rows(tmp_path, method):
    """vocab_policy: extend: the statistics (ranks, cosines) cover the rows every model has; the extra
    rows come from the model that has them."""
    paths, t = checkpoints(tmp_path, "float32")
    big = tmp_path / "big"
    big.mkdir()
    gen = torch.Generator().manual_seed(9)
    extra = {k: torch.randn(4, 16, generator=gen) for k in ("model.embed_tokens.weight", "lm_head.weight")}
    stored = {k: torch.cat([torch.tensor(v, dtype=torch.float32), extra[k]]) if k in extra else
              torch.tensor(v, dtype=torch.float32) for k, v in t["b"].items()}
    save_file(stored, str(big / "model.safetensors"), metadata={"format": "pt"})
    (big / "config.json").write_text(json.dumps({**CONFIG, "vocab_size": 44, "torch_dtype": "float32"}))
    params = {"weight": 1.0, "density": 0.5} if method == "breadcrumbs" else {}
    recipe = {"merge_method": method, "base_model": str(paths["base"]), "vocab_policy": "extend",
              "models": [{"model": str(paths["a"]), "parameters": params}, {"model": str(big), "parameters": params}]}
    souplm.merge(recipe, tmp_path / "out", progress=False, hash_inputs=False)
    out = load_file(str(tmp_path / "out" / "model.safetensors"))
    for k, rows in extra.items():
        got = out[k].to(torch.float64).numpy()
        assert got.shape == (44, 16)
        base, ms = t["base"][k], [t["a"][k], t["b"][k]]
        if method == "breadcrumbs":
            ref = combine_ref(base, [breadcrumb_ref(m - base, 0.5, 0.01, False) for m in ms], [1, 1], False, False, 1.0)
        else:
            ref = model_stock_ref(base, ms, False)
        ulp_close(got[:40], ref, "float32")
        np.testing.assert_array_equal(got[40:], rows.numpy())


def test_mergekit_recipe_listing_the_base_among_models(tmp_path):
    """mergekit's model_stock recipes list base_model among `models`; it is the base, not a third model."""
    import yaml

    paths, t = checkpoints(tmp_path, "float32")
    text = yaml.safe_dump({"merge_method": "model_stock", "base_model": str(paths["base"]), "dtype": "float32",
                           "models": [{"model": str(paths[x])} for x in ("base", "a", "b")]})
    (tmp_path / "mk.yaml").write_text(text)
    souplm.merge(tmp_path / "mk.yaml", tmp_path / "out", progress=False, hash_inputs=False)
    out = load_file(str(tmp_path / "out" / "model.safetensors"))
    k = "model.layers.0.mlp.down_proj.weight"
    ulp_close(out[k].numpy().astype(np.float64), model_stock_ref(t["base"][k], [t["a"][k], t["b"][k]], False), "float32")


@pytest.mark.parametrize("name", ["breadcrumbs", "breadcrumbs_ties", "della_linear", "della"])
def test_row_weights_from_a_coefficient_table(name):
    """A coefficient table's per-row weights [N, rows] weigh each output row (the sparsification is unchanged)."""
    base, models = trio(12, 9)
    models = models[:2]
    w = np.abs(rand(2, 12)) + 0.1
    m = get_method(name)
    kwargs = {"weight": torch.tensor(w), "density": torch.tensor([0.5, 0.5])}
    kwargs["gamma" if "breadcrumbs" in name else "epsilon"] = torch.tensor([0.1, 0.1])
    if m.random:
        kwargs["keys"] = [5, 6]
    got = m.fn([torch.tensor(x) for x in models], torch.tensor(base), normalize=True, **kwargs).numpy()
    if "breadcrumbs" in name:
        deltas = [breadcrumb_ref(x.astype(np.float64) - base, 0.5, 0.1, False) for x in models]
    else:
        deltas = [della_ref(x.astype(np.float64) - base, 0.5, 0.1, k, True) for x, k in zip(models, [5, 6])]
    for r in range(12):  # each row: the formula with that row's weights
        ref = combine_ref(base[r], [d[r] for d in deltas], w[:, r], name in ("breadcrumbs_ties", "della"), True, 1.0)
        close(got[r], ref)
