"""nuslerp, multislerp, karcher, nearswap, arcee_fusion, ram, ramplus_tl and passthrough against independent
NumPy float64 statements of mergekit 0.1.5's formulas (written here, vector by vector: no Gram matrices),
directly and through `souplm.merge` on tiny checkpoints in fp32, bf16 and fp16; and their validation."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

import souplm
from souplm import SoupError
from souplm.cli import main as cli
from souplm.methods import get_method

RNG = np.random.default_rng(11)
TORCH = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# -- the formulas, in float64 ----------------------------------------------------------------------
def _vectors(v, flatten, row_wise):
    """The vectors a (nu)slerp acts on, as rows of a 2-D array, and how to put them back."""
    if flatten or v.ndim <= 1:
        return v.reshape(1, -1), lambda r: r.reshape(v.shape)
    axis = 0 if row_wise else v.ndim - 1
    moved = np.moveaxis(v, axis, -1)
    return moved.reshape(-1, moved.shape[-1]), lambda r: np.moveaxis(r.reshape(moved.shape), -1, axis)


def nuslerp_ref(x0, x1, w0, w1, base=None, flatten=True, row_wise=False):
    x0, x1 = np.float64(x0), np.float64(x1)
    total = w0 + w1
    t = 0.5 if abs(total) < 1e-6 else w1 / total
    if base is not None:
        x0, x1 = x0 - base, x1 - base
    a, back = _vectors(x0, flatten, row_wise)
    b, _ = _vectors(x1, flatten, row_wise)
    out = np.empty_like(a)
    for r in range(a.shape[0]):
        ua = a[r] / max(np.linalg.norm(a[r]), 1e-7)
        ub = b[r] / max(np.linalg.norm(b[r]), 1e-7)
        cos = float(np.clip(ua @ ub, -1, 1))
        if 1 - cos**2 <= 1e-16:
            out[r] = (1 - t) * a[r] + t * b[r]
        else:
            th = np.arccos(cos)
            out[r] = (np.sin((1 - t) * th) * a[r] + np.sin(t * th) * b[r]) / np.sin(th)
    res = back(out)
    return res + base if base is not None else res


def multislerp_ref(xs, w, base=None, normalize=True, eps=1e-8):
    if len(xs) == 1:
        return np.float64(xs[0])
    w = np.asarray(w, np.float64)
    if normalize:
        w = w / w.sum()
    vs = [np.float64(x).reshape(-1) - (0 if base is None else base.reshape(-1)) for x in xs]
    norms = [np.linalg.norm(v) for v in vs]
    units = [v / (n + eps) for v, n in zip(vs, norms)]
    mean = sum(wi * u for wi, u in zip(w, units))
    if np.linalg.norm(mean) < eps:
        assert len(xs) == 2
        res = w[0] * vs[0] + w[1] * vs[1]
    else:
        mean = mean / np.linalg.norm(mean)
        tangent = sum(wi * (u - (u @ mean) * mean) for wi, u in zip(w, units))
        tn = np.linalg.norm(tangent) + eps
        res = (mean * np.cos(tn) + tangent * np.sin(tn) / tn) * sum(n * wi for n, wi in zip(norms, w))
    res = res.reshape(np.shape(xs[0]))
    return res + base if base is not None else res


def karcher_ref(xs, max_iter=10, tol=1e-5):
    if len(xs) == 1:
        return np.float64(xs[0])
    shape = np.shape(xs[0])
    vs = [np.float64(x).reshape(-1) for x in xs]
    alpha = 1.0 / len(vs)
    norms = [np.linalg.norm(v) for v in vs]
    keep = [i for i, n in enumerate(norms) if n > tol]
    if not keep:
        return np.zeros(shape)
    units = [vs[i] / norms[i] for i in keep]
    a = 1.0 / len(keep)
    mean = sum(a * u for u in units)
    mean = units[0].copy() if np.linalg.norm(mean) < tol else mean / np.linalg.norm(mean)
    for _ in range(max_iter):
        tangent = np.zeros_like(mean)
        for u in units:
            d = float(np.clip(mean @ u, -1, 1))
            th = np.arccos(d)
            if th >= tol:
                tangent += a * th / np.sin(th) * (u - d * mean)
        tn = np.linalg.norm(tangent)
        if tn < tol:
            break
        mean = np.cos(tn) * mean + np.sin(tn) * tangent / tn
        if np.linalg.norm(mean) > tol:
            mean = mean / np.linalg.norm(mean)
    return (alpha * sum(norms) * mean).reshape(shape)


def nearswap_ref(base, x, t):
    a, b = np.float64(base), np.float64(x)
    w = np.clip(t / np.maximum(np.abs(a - b), 1e-6), 0, 1)
    return w * b + (1 - w) * a


def softmax(x):
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def arcee_fusion_ref(base, x):
    """The result and the importance's distance to the threshold (entries near it may fall either way)."""
    a, b = np.float64(base), np.float64(x)
    p, q = softmax(b) + 1e-8, softmax(a) + 1e-8
    kl = np.sum(p * np.log(p / q), axis=-1, keepdims=True)
    s = np.abs(b - a) * kl
    srt = np.sort(s.reshape(-1))
    q1, q2, q3 = (srt[int(f * (srt.size - 1))] for f in (0.25, 0.5, 0.75))
    thr = q2 + 1.5 * (q3 - q1)
    return a + (b - a) * (s >= thr), np.abs(s - thr) / max(abs(thr), 1e-30)


def ram_ref(base, xs, eps=1e-5, r=None, alpha=None, dtype=None):
    """`dtype` (RAM): mergekit's arithmetic in that dtype, each step's result rounded to it (the sum over models
    accumulated in float32 and rounded once, as a torch reduction)."""
    if dtype is not None and dtype != "float32":
        low = TORCH[dtype]

        def rnd(x):
            return torch.tensor(np.asarray(x, np.float32)).to(low).double().numpy()

        b = rnd(base)
        ds = [rnd(rnd(x) - b) for x in xs]
        count = sum((np.abs(d) > eps).astype(np.int64) for d in ds)
        merged = rnd(sum(rnd(np.where(np.abs(d) > eps, d, 0) / np.maximum(count, 1)) for d in ds))
        return rnd(b + merged)
    b = np.float64(base)
    ds = [np.float64(x) - b for x in xs]
    nz = [np.abs(d) > eps for d in ds]
    count = sum(m.astype(np.int64) for m in nz)
    out = b.copy()
    for d, m in zip(ds, nz):
        if r is None:
            out += np.where(m, d, 0) / np.maximum(count, 1)
        else:
            shared, unique = np.sum(m & (count > 1)), np.sum(m & (count == 1))
            lam = 1 + r * min(max(shared / max(unique, eps), 0), alpha)
            out += np.where(m & (count == 1), d * lam, 0) + np.where(m & (count > 1), d / np.maximum(count, 1), 0)
    return out


# -- calling a method directly -------------------------------------------------------------------
def call(name, models, base=None, **params):
    m = get_method(name)
    n = len(models)
    kwargs = {}
    for key, default in m.model_params.items():
        v = params.pop(key, default)
        kwargs[key] = torch.tensor(v if isinstance(v, list) else [v] * n, dtype=torch.float32)
    kwargs.update(params)
    tt = [torch.tensor(t, dtype=torch.float32) for t in models]
    b = None if base is None else torch.tensor(base, dtype=torch.float32)
    return m.fn(tt, b, **kwargs).numpy()


def rounded(x, dtype):
    """x stored in `dtype`, as the fp32 values a method sees."""
    return torch.tensor(x).to(TORCH[dtype]).to(torch.float32).numpy()


def family(shape, dtype="float32", n=3, scale=0.1, sparse=None):
    base = RNG.standard_normal(shape).astype(np.float32)
    ms = []
    for _ in range(n):
        d = RNG.standard_normal(shape).astype(np.float32) * scale
        if sparse is not None:
            d *= RNG.random(shape) < sparse
        ms.append(base + d)
    return rounded(base, dtype), [rounded(m, dtype) for m in ms]


def close(got, ref, rtol=2e-6):
    """fp32 arithmetic against float64: within a few fp32 rounding steps of the tensor's scale."""
    np.testing.assert_allclose(got, ref, rtol=0, atol=rtol * max(float(np.abs(ref).max()), 1e-30))


DTYPES = ["float32", "bfloat16", "float16"]
SHAPES = [(7,), (12, 9), (6, 5, 7)]  # vectors of 6+ entries: random pairs are rarely near-antiparallel (ill-conditioned)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("flatten,row_wise", [(True, False), (True, True), (False, False), (False, True)])
@pytest.mark.parametrize("with_base", [False, True])
def test_nuslerp_matches_formula(dtype, shape, flatten, row_wise, with_base):
    base, (a, b, _) = family(shape, dtype)
    got = call("nuslerp", [a, b], base if with_base else None, weight=[0.3, 0.9],
               nuslerp_flatten=flatten, nuslerp_row_wise=row_wise)
    close(got, nuslerp_ref(a, b, 0.3, 0.9, base if with_base else None, flatten, row_wise))


def test_nuslerp_parallel_and_zero_weight_cases():
    a = RNG.standard_normal((4, 6)).astype(np.float32)
    close(call("nuslerp", [a, 2 * a], weight=[1.0, 3.0]), 0.25 * a + 0.75 * 2 * a)  # parallel: lerp
    close(call("nuslerp", [a, -a], weight=[1.0, 1.0]), np.zeros_like(a))  # antiparallel: lerp
    b = RNG.standard_normal((4, 6)).astype(np.float32)
    close(call("nuslerp", [a, b], weight=[1.0, -1.0]), nuslerp_ref(a, b, 0.5, 0.5))  # weights sum to 0: t = 0.5
    z = np.zeros_like(a)  # a zero vector is "normalized" to 0: cos 0, a quarter turn
    close(call("nuslerp", [z, b], weight=[1.0, 1.0]), np.sin(np.pi / 4) * b)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [1, 2, 3, 5])
@pytest.mark.parametrize("with_base", [False, True])
@pytest.mark.parametrize("normalize", [True, False])
def test_multislerp_matches_formula(dtype, n, with_base, normalize):
    base, ms = family((10, 6), dtype, n=n)
    w = list(RNG.uniform(0.2, 1.0, n))
    got = call("multislerp", ms, base if with_base else None, weight=w, normalize_weights=normalize)
    close(got, multislerp_ref(ms, w, base if with_base else None, normalize))


def test_multislerp_cancelling_points():
    a = RNG.standard_normal((5, 4)).astype(np.float32)
    close(call("multislerp", [a, -a], weight=[1.0, 1.0]), np.zeros_like(a))  # two: linear fallback
    with pytest.raises(SoupError, match="sum to zero"):
        call("multislerp", [a, -a, a, -a], weight=[1.0, 1.0, 1.0, 1.0])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [1, 2, 3, 4])
@pytest.mark.parametrize("max_iter,tol", [(10, 1e-5), (0, 1e-5), (1, 1e-5), (50, 1e-9)])
def test_karcher_matches_formula(dtype, n, max_iter, tol):
    _, ms = family((9, 8), dtype, n=n, scale=0.8)
    close(call("karcher", ms, max_iter=max_iter, tol=tol), karcher_ref(ms, max_iter, tol))


def test_karcher_counts_the_base_as_one_more_input(tmp_path):
    """mergekit's karcher averages the base with the models: a recipe's base_model is read as one more model
    (whose config the output takes); souplm's own API refuses a base for karcher rather than drop it."""
    paths, t = checkpoints(tmp_path, "float32")
    recipe = merge_recipe("karcher", paths)  # base_model + models a, b
    souplm.merge(recipe, tmp_path / "o", progress=False, hash_inputs=False)
    out = load_file(str(tmp_path / "o" / "model.safetensors"))
    for k in CKPT_SHAPES:
        close(out[k].double().numpy(), karcher_ref([t["a"][k], t["b"][k], t["base"][k]]))
    with pytest.raises(SoupError, match="base_model"):
        souplm.Recipe.from_models([paths["a"], paths["b"]], "karcher", base_model=paths["base"])


def test_karcher_zero_inputs():
    z = np.zeros((3, 3), np.float32)
    assert not call("karcher", [z, z]).any()
    a = RNG.standard_normal((3, 3)).astype(np.float32)
    close(call("karcher", [z, a]), karcher_ref([z, a]))  # the zero tensor leaves the mean; its norm halves the scale
    close(call("karcher", [z, a]), 0.5 * a)


def test_karcher_converges_to_the_geodesic_midpoint():
    a, b = RNG.standard_normal(50), RNG.standard_normal(50)
    a, b = (a / np.linalg.norm(a)).astype(np.float32), (b / np.linalg.norm(b)).astype(np.float32)
    mid = (np.float64(a) + b) / np.linalg.norm(np.float64(a) + b)  # two unit points: their mean direction
    close(call("karcher", [a, b], max_iter=100, tol=1e-12), mid, rtol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("t", [0.0, 0.01, 0.05, 0.3, 10.0])
def test_nearswap_matches_formula(dtype, t):
    base, (a, _, _) = family((8, 7), dtype)
    close(call("nearswap", [a], base, t=t), nearswap_ref(base, a, t))


@pytest.mark.parametrize("dtype,shape", [(d, s) for d in DTYPES for s in [(40,), (30, 20), (4, 5, 6)]]
                         + [("bfloat16", (300, 260))])  # > 65536 entries: the bracketed selection
def test_arcee_fusion_matches_formula(dtype, shape):
    base, (a, _, _) = family(shape, dtype, scale=0.3)
    ref, dist = arcee_fusion_ref(base, a)
    got = call("arcee_fusion", [a], base)
    clear = dist > 1e-4  # an importance within 1e-4 of the threshold may be on either side in fp32
    assert clear.mean() > 0.99
    close(got[clear], ref[clear])
    kept = np.abs(got - base) > 0
    assert kept.mean() < 0.5 and (kept.any() or got.size < 100)  # an outlier threshold keeps a minority


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("n", [100, 5000, 70001, 2_500_003])  # the torch fallback, then the radix select (threaded)
def test_order_statistics_are_numpys_sorted_values(dtype, n):
    from souplm.methods.steps import order_statistics

    g = torch.Generator().manual_seed(n)
    x = (torch.randn(n, generator=g, dtype=torch.float64) * 0.01).to(TORCH[dtype])
    x[: n // 10] = 0.0  # ties, both zeros and negatives: the keys must order signed values
    x[n // 10: n // 5] = -0.0
    x[n // 5: n // 4] = x[n // 4]
    ranks = [0, n // 4, n // 2, (3 * n) // 4, n - 1, n // 10 - 1, n // 5]
    srt = np.sort(x.double().numpy())
    got = order_statistics(x.reshape(-1, 1) if n % 2 else x, ranks)
    assert [g.dtype for g in got] == [x.dtype] * len(ranks)
    assert [float(v) for v in got] == [srt[r] for r in ranks]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [1, 2, 3, 4])
@pytest.mark.parametrize("eps", [1e-5, 0.0, 0.04])
def test_ram_matches_formula(dtype, n, eps):
    base, ms = family((16, 11), dtype, n=n, sparse=0.5)
    close(call("ram", ms, base, epsilon=eps), ram_ref(base, ms, eps))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [1, 2, 3])
@pytest.mark.parametrize("r,alpha,eps", [(0.1, 0.2, 1e-5), (0.5, 0.9, 1e-5), (1.0, 5.0, 0.03), (0.0, 0.2, 1e-5)])
def test_ramplus_tl_matches_formula(dtype, n, r, alpha, eps):
    base, ms = family((16, 11), dtype, n=n, sparse=0.4)
    close(call("ramplus_tl", ms, base, r=r, alpha=alpha, epsilon=eps), ram_ref(base, ms, eps, r, alpha))


def test_ram_unique_shared_and_untouched_entries():
    base = np.zeros(4, np.float32)
    a = np.array([1.0, 2.0, 0.0, 0.0], np.float32)
    b = np.array([0.0, 4.0, 0.0, 3.0], np.float32)
    np.testing.assert_array_equal(call("ram", [a, b], base), [1.0, 3.0, 0.0, 3.0])
    # each model: 1 shared entry, 1 unique -> rho 1, lambda = 1 + 0.1 * min(1, 0.2) = 1.02 on the unique ones
    np.testing.assert_allclose(call("ramplus_tl", [a, b], base), [1.02, 3.0, 0.0, 3.06], rtol=1e-6)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("scale", [1.0, 0.0, 0.5, -2.0])
def test_passthrough_scales_or_copies(dtype, scale):
    _, (a, _, _) = family((5, 4), dtype)
    got = call("passthrough", [a], scale=scale)
    np.testing.assert_array_equal(got, np.float32(np.float64(a) * scale))


# -- through souplm.merge on tiny checkpoints ---------------------------------------------------
CKPT_SHAPES = {
    "model.embed_tokens.weight": (40, 16),
    "model.layers.0.self_attn.q_proj.weight": (16, 16),
    "model.layers.0.self_attn.o_proj.weight": (16, 16),
    "model.layers.0.mlp.down_proj.weight": (16, 24),
    "model.layers.0.input_layernorm.weight": (16,),
    "model.norm.weight": (16,),
    "lm_head.weight": (40, 16),
}
CONFIG = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 16, "intermediate_size": 24,
          "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 2, "vocab_size": 40,
          "tie_word_embeddings": False}


def checkpoints(tmp_path, dtype, sparse=False):
    """A base and three fine-tunes stored in `dtype` (`sparse`: each changes about half the entries);
    returns paths and the stored values in float64."""
    gen = torch.Generator().manual_seed(5)
    base = {k: torch.randn(s, generator=gen) * 0.5 for k, s in CKPT_SHAPES.items()}
    tensors = {"base": base}
    for name in "abc":
        tensors[name] = {}
        for k, v in base.items():
            d = 0.1 * torch.randn(v.shape, generator=gen)
            if sparse:
                d = d * (torch.rand(v.shape, generator=gen) < 0.5)
            tensors[name][k] = v + d
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


def one_step_close(got, ref, dtype, mask=None):
    """Within one rounding step of the output dtype (plus fp32 arithmetic) of the float64 statement."""
    ref = np.asarray(ref, np.float64)
    eps = {"float32": 2.0**-23, "bfloat16": 2.0**-8, "float16": 2.0**-11}[dtype]
    tol = eps * np.abs(ref) + 2e-6 * float(np.abs(ref).max())
    bad = np.abs(got - ref) > tol
    if mask is not None:
        bad &= mask
    assert not bad.any(), float(np.max(np.abs(got - ref) - tol))


def references(method, t, k, dtype):
    """The float64 statement of each recipe in MERGE_CASES for tensor k (and where it may differ)."""
    base, (a, b, c) = t["base"][k], [t[n][k] for n in "abc"]
    if method == "nuslerp":
        return nuslerp_ref(a, b, 0.4, 0.6), None
    if method == "nuslerp_rows":
        return nuslerp_ref(a, b, 0.4, 0.6, base, flatten=False), None
    if method == "multislerp":
        return multislerp_ref([a, b, c], [0.2, 0.3, 0.5], base), None
    if method == "karcher":
        return karcher_ref([a, b, base]), None
    if method == "nearswap":
        return nearswap_ref(base, a, 0.05), None
    if method == "arcee_fusion":
        ref, dist = arcee_fusion_ref(base, a)
        return ref, dist > 1e-4
    if method == "ram":  # computed in the recipe's dtype, as mergekit does
        return ram_ref(base, [a, b, c], dtype=dtype), None
    if method == "ramplus_tl":
        return ram_ref(base, [a, b, c], 1e-5, 0.3, 0.5), None
    if method == "passthrough":
        return (0.0 if "o_proj" in k else 1.0) * b, None
    raise AssertionError(method)


def merge_recipe(method, paths):
    """mergekit-shaped recipes (the base listed among the models where mergekit's examples do)."""
    p = {n: str(paths[n]) for n in ("base", "a", "b", "c")}
    models = {
        "nuslerp": [{"model": p["a"], "parameters": {"weight": 0.4}}, {"model": p["b"], "parameters": {"weight": 0.6}}],
        "multislerp": [{"model": p[n], "parameters": {"weight": w}} for n, w in zip("abc", (0.2, 0.3, 0.5))],
        "karcher": [{"model": p["a"]}, {"model": p["b"]}],
        "nearswap": [{"model": p["base"]}, {"model": p["a"]}],
        "arcee_fusion": [{"model": p["base"]}, {"model": p["a"]}],
        "ram": [{"model": p[n]} for n in "abc"],
        "passthrough": [{"model": p["b"], "parameters": {"scale": [{"filter": "o_proj", "value": 0.0},
                                                                    {"value": 1.0}]}}],
    }
    models["nuslerp_rows"] = [{"model": p["base"]}, *models["nuslerp"]]
    models["ramplus_tl"] = models["ram"]
    params = {"nuslerp_rows": {"nuslerp_flatten": False}, "nearswap": {"t": 0.05},
              "ramplus_tl": {"r": 0.3, "alpha": 0.5}}.get(method, {})
    recipe = {"merge_method": method.replace("_rows", ""), "models": models[method], "parameters": params}
    if method not in ("nuslerp", "passthrough"):
        recipe["base_model"] = p["base"]
    return recipe


MERGE_CASES = ["nuslerp", "nuslerp_rows", "multislerp", "karcher", "nearswap", "arcee_fusion", "ram", "ramplus_tl",
               "passthrough"]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("method", MERGE_CASES)
def test_merge_matches_formula(tmp_path, dtype, method):
    paths, t = checkpoints(tmp_path, dtype, sparse=method.startswith("ram"))
    recipe = {**merge_recipe(method, paths), "dtype": dtype}
    native = get_method(method.replace("_rows", "")).native_dtype
    if native:  # rounded once; the step-by-step bf16/fp16 arithmetic: test_torch_methods_dtype.py
        recipe["compute_dtype"] = "float32"
    souplm.merge(recipe, tmp_path / "out", progress=False, hash_inputs=False)
    out = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert set(out) == set(CKPT_SHAPES)
    for k in CKPT_SHAPES:
        assert out[k].dtype == TORCH[dtype]
        ref, mask = references(method, t, k, "float32" if native else dtype)
        one_step_close(out[k].to(torch.float64).numpy(), ref, dtype, mask)


def test_base_listed_among_models_is_the_same_merge(tmp_path):
    paths, _ = checkpoints(tmp_path, "float32")
    listed = merge_recipe("nuslerp_rows", paths)
    listed["base_model"] = str(paths["base"])
    unlisted = dict(listed, models=listed["models"][1:])
    souplm.merge(listed, tmp_path / "o1", progress=False, hash_inputs=False)
    souplm.merge(unlisted, tmp_path / "o2", progress=False, hash_inputs=False)
    o1, o2 = load_file(str(tmp_path / "o1" / "model.safetensors")), load_file(str(tmp_path / "o2" / "model.safetensors"))
    for k in CKPT_SHAPES:
        assert torch.equal(o1[k], o2[k])


@pytest.mark.parametrize("method", ["karcher", "ram"])
def test_a_weight_is_accepted_and_ignored_as_in_mergekit(tmp_path, method):
    paths, _ = checkpoints(tmp_path, "float32", sparse=True)
    plain = merge_recipe(method, paths)
    weighted = dict(plain, models=[dict(m, parameters={"weight": 0.1 * (k + 1)}) for k, m in enumerate(plain["models"])])
    souplm.merge(plain, tmp_path / "o1", progress=False, hash_inputs=False)
    souplm.merge(weighted, tmp_path / "o2", progress=False, hash_inputs=False)
    o1, o2 = load_file(str(tmp_path / "o1" / "model.safetensors")), load_file(str(tmp_path / "o2" / "model.safetensors"))
    assert all(torch.equal(o1[k], o2[k]) for k in CKPT_SHAPES)


# -- validation -----------------------------------------------------------------------------------
@pytest.mark.parametrize("method,per_model,glob,n,base,needle", [
    ("nuslerp", {}, {}, 2, False, "weight"),  # mergekit: weight has no default
    ("nuslerp", {"weight": 1.0}, {"nuslerp_flatten": "no"}, 2, False, "nuslerp_flatten"),
    ("nuslerp", {"weight": 1.0}, {"nuslerp_row_wise": 1}, 2, False, "nuslerp_row_wise"),
    ("nuslerp", {"weight": 1.0}, {}, 3, False, "models"),
    ("multislerp", {}, {}, 2, False, "weight"),
    ("multislerp", {"weight": 1.0}, {"eps": -1e-8}, 2, False, "eps"),
    ("multislerp", {"weight": 1.0}, {"normalize_weights": "yes"}, 2, False, "normalize_weights"),
    ("karcher", {}, {"max_iter": 2.5}, 2, False, "max_iter"),
    ("karcher", {}, {"max_iter": -1}, 2, False, "max_iter"),
    ("karcher", {}, {"tol": -1e-3}, 2, False, "tol"),
    ("nearswap", {}, {}, 1, True, "parameter t"),  # t is required
    ("nearswap", {}, {"t": -0.1}, 1, True, "t"),
    ("nearswap", {}, {"t": 0.1}, 1, False, "base_model"),
    ("nearswap", {}, {"t": 0.1}, 2, True, "takes 1 model "),
    ("arcee_fusion", {}, {}, 1, False, "base_model"),
    ("arcee_fusion", {}, {}, 2, True, "takes 1 model "),
    ("ram", {}, {"epsilon": -1.0}, 2, True, "epsilon"),
    ("ram", {}, {}, 2, False, "base_model"),
    ("ramplus_tl", {}, {"epsilon": 0.0}, 2, True, "epsilon"),
    ("ramplus_tl", {}, {"r": -0.1}, 2, True, "r"),
    ("ramplus_tl", {}, {"alpha": "big"}, 2, True, "alpha"),
    ("passthrough", {"scale": "half"}, {}, 1, False, "scale"),
    ("passthrough", {}, {}, 2, False, "takes 1 model "),
    ("passthrough", {}, {}, 1, True, "base_model"),
])
def test_bad_parameters_are_one_line_errors(tmp_path, capsys, method, per_model, glob, n, base, needle):
    paths, _ = checkpoints(tmp_path, "float32")
    recipe = {"merge_method": method, "parameters": glob,
              "models": [{"model": str(paths[x]), "parameters": dict(per_model)} for x in "abc"[:n]]}
    if base:
        recipe["base_model"] = str(paths["base"])
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    code = cli(["merge", str(path), "-o", str(tmp_path / "out"), "--quiet", "--no-hash"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and err.startswith("souplm: error:"), err
    assert needle in err, err
    assert not (tmp_path / "out").exists()
