"""The torch-executor methods (sce, model_stock, nearswap, arcee_fusion, ram, ramplus_tl) compute in the
recipe's dtype, as mergekit 0.1.5 does: each checked against an independent NumPy float64 statement of
the formula in which every step's result is rounded to that dtype (torch computes a bf16/fp16 op in
float32 and rounds its result once: the statement rounds the exact value to float32, then to the dtype),
in bf16, fp16 and fp32; and `compute_dtype: float32` keeps the float32 arithmetic (rounded once, at the end).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import souplm
from souplm.methods import get_method

TORCH = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DTYPES = ["bfloat16", "float16", "float32"]
STEP = {"float32": 2.0**-23, "bfloat16": 2.0**-7, "float16": 2.0**-10}  # one ulp at 1.0
RNG = np.random.default_rng(11)


def rnd(x, dtype):
    """The exact value rounded to float32, then to `dtype` (round to nearest even), as float64."""
    x32 = torch.from_numpy(np.asarray(x, np.float64).astype(np.float32))
    return x32.to(TORCH[dtype]).to(torch.float64).numpy()


def stored(shape, dtype, scale=1.0, base=None, sparse=None):
    """Random values as stored in `dtype` (float64 copies)."""
    x = RNG.standard_normal(shape) * scale
    if sparse is not None:
        x = x * (RNG.random(shape) < sparse)
    return rnd(x if base is None else base + x, dtype)


def run(name, xs, base, dtype, **params):
    """The method's tensor function on inputs in `dtype` (what the torch executor hands it), as float64."""
    m = get_method(name)
    kwargs = {k: torch.tensor([v] * len(xs), dtype=torch.float32) for k, v in m.model_params.items()}
    kwargs.update(params)
    ts = [torch.tensor(x).to(TORCH[dtype]) for x in xs]
    out = m.fn(ts, torch.tensor(base).to(TORCH[dtype]), **kwargs)
    return out.to(torch.float64).numpy(), out.dtype


def within(got, ref, dtype, steps=1.0, mask=None, operands=()):
    """|got - ref| <= `steps` rounding steps of `dtype` at each entry's magnitude: the larger of the results
    and the `operands` (a sum that cancels rounds at its terms' magnitude). The statements round each step
    as torch does; a float32 reduction (torch) and an exact one (here) may round one step apart."""
    mag = np.maximum(np.abs(ref), np.abs(got))
    for x in operands:
        mag = np.maximum(mag, np.abs(x))
    tol = steps * STEP[dtype] * mag + 1e-30
    bad = np.abs(got - ref) > tol
    if mask is not None:
        bad &= mask
    assert not bad.any(), f"{int(bad.sum())}/{bad.size} entries off, worst {float(np.max(np.abs(got - ref)))}"


# -- the float64 statements, each step rounded to the dtype -------------------------------------------
def nearswap_ref(a, b, t, dtype):
    r = lambda x: rnd(x, dtype)
    x = r(np.maximum(r(np.abs(a - b)), 1e-6))
    w = np.clip(r(r(1.0 / x) * np.float32(t)), 0.0, 1.0)  # t / x: torch's reciprocal times t (float32)
    return r(r(w * b) + r(r(1.0 - w) * a))


def model_stock_ref(w0, ws, filter_wise, dtype):
    r = lambda x: rnd(x, dtype)
    shape = w0.shape
    view = (lambda x: x.reshape(-1, shape[-1])) if filter_wise else (lambda x: x.reshape(1, -1))
    b, vs = view(w0), [view(w) for w in ws]
    off = [r(v - b) for v in vs]
    norms = [r(np.sqrt((o * o).sum(axis=1))) for o in off]
    cos = []
    for i in range(len(off)):
        for j in range(i + 1, len(off)):
            dot = r(r(off[i] * off[j]).sum(axis=1))
            den = r(np.maximum(r(norms[i] * norms[j]), 1e-6))
            cos.append(np.clip(r(dot / den), -1.0, 1.0))
    n = len(vs)
    c = r(np.mean(cos, axis=0))[:, None]
    den = r(1.0 + r((n - 1) * c))
    singular = np.abs(den) < r(1e-6)
    t = np.where(singular, 0.0, r(r(n * c) / np.where(singular, 1.0, den)))
    acc = vs[0]
    for v in vs[1:]:
        acc = r(acc + v)  # Python's sum over tensors: one rounding per model
    avg = r(acc / n)
    return r(r(t * avg) + r(r(1.0 - t) * b)).reshape(shape)


def sce_ref(base, xs, topk, dtype):
    r = lambda x: rnd(x, dtype)
    n = len(xs)
    tv = np.stack([r(x - base) for x in xs])
    if topk < 1:
        var = r(tv.var(axis=0))
        k = int(np.count_nonzero(var) * topk)
        keep = np.zeros(var.size, bool)
        keep[np.argsort(-var.reshape(-1), kind="stable")[:k]] = True
        tv = tv * keep.reshape(var.shape)
    ms = np.array([r(r(t * t).mean()) for t in tv])
    total = float(r(ms.sum()))
    w = r(np.full(n, 1.0) / n) if abs(total) < 1e-6 else r(ms / total)
    w = w.reshape(-1, *([1] * base.ndim))
    agree = np.sign(tv) == np.where(tv.sum(axis=0) >= 0, 1.0, -1.0)
    e = w * agree
    merged = r((r(tv * e)).sum(axis=0))
    mass = r(np.maximum(r(e.sum(axis=0)), 1e-6))
    return r(base + r(merged / mass))


def untied_at_cut(base, xs, topk, dtype):
    """No two entries share the variance at the selection's cut (which of tied entries torch's top-k keeps
    is its own choice; they change every entry through the weights, means over the tensor)."""
    if topk >= 1 or len(xs) < 2:
        return True
    var = rnd(np.stack([rnd(x - base, dtype) for x in xs]).var(axis=0), dtype).reshape(-1)
    k = int(np.count_nonzero(var) * topk)
    srt = np.sort(var)[::-1]
    return k == 0 or k == var.size or srt[k - 1] != srt[k]


def softmax(x):
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def arcee_fusion_ref(a, b, dtype):
    """The result and how far each importance is from the threshold, in rounding steps."""
    r = lambda x: rnd(x, dtype)
    rows = lambda x: x.reshape(-1, x.shape[-1])
    p, q = r(r(softmax(rows(b))) + 1e-8), r(r(softmax(rows(a))) + 1e-8)
    kl = r(r(p * r(np.log(r(p / q)))).sum(axis=-1, keepdims=True))
    d = r(b - a)
    s = r(rows(np.abs(d)) * kl).reshape(a.shape)
    srt = np.sort(s.reshape(-1))
    q1, q2, q3 = (srt[int(f * (srt.size - 1))] for f in (0.25, 0.5, 0.75))
    thr = r(q2 + r(1.5 * r(q3 - q1)))
    dist = np.abs(s - thr) / (STEP[dtype] * max(abs(float(thr)), 1e-30))
    return r(a + d * (s >= thr)), dist


def ram_ref(base, xs, eps, dtype, r_=None, alpha=None):
    """RAM (r_ None) in the dtype; RAM+ with mergekit's float32 lambda: float32 terms and sum."""
    r = lambda x: rnd(x, dtype)
    tv = [r(x - base) for x in xs]
    counted = [np.abs(d) > float(r(eps)) for d in tv]
    c = sum(m.astype(np.int64) for m in counted)
    unique = c == 1
    if r_ is None:
        return r(base + r(sum(r(np.where(m, d, 0.0) / np.maximum(c, 1)) for d, m in zip(tv, counted))))
    f32 = lambda x: np.float64(np.float32(x))
    acc = 0.0
    for d, m in zip(tv, counted):
        shared, uniq = np.sum(m & (c > 1)), np.sum(m & unique)
        rho = f32(f32(shared) / f32(max(float(uniq), eps)))
        lam = f32(1.0 + f32(r_ * min(max(rho, 0.0), alpha)))
        term = np.where(m & unique, f32(d * lam), np.where(m, r(d / np.maximum(c, 1)), 0.0))
        acc = f32(acc + term)
    return f32(base + acc)


# -- the tensor functions on inputs in the dtype --------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("t", [0.0, 0.003, 0.05, 10.0])
def test_nearswap_rounds_as_mergekit(dtype, t):
    if dtype == "float16" and t == 0.0:
        pytest.skip("fp16: 1 / |a - b| overflows where |a - b| < 2^-16, and inf * 0 is NaN (in mergekit too)")
    a = stored((40, 37), dtype)
    b = stored((40, 37), dtype, 0.05, base=a)
    got, out_dtype = run("nearswap", [b], a, dtype, t=t)
    assert out_dtype == TORCH[dtype]
    np.testing.assert_array_equal(got, nearswap_ref(a, b, t, dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [2, 3])
@pytest.mark.parametrize("filter_wise,shape", [(False, (24, 19)), (True, (24, 19)), (True, (33,)), (False, (5, 4, 6))])
def test_model_stock_rounds_as_mergekit(dtype, n, filter_wise, shape):
    w0 = stored(shape, dtype)
    ws = [stored(shape, dtype, 0.1, base=w0) for _ in range(n)]
    got, _ = run("model_stock", ws, w0, dtype, filter_wise=filter_wise)
    # the norms and dot products sum in float32 (torch) or exactly (here) before their rounding: one step apart at most
    ref = model_stock_ref(w0, ws, filter_wise and len(shape) >= 1, dtype)
    within(got, ref, dtype, steps=4 if dtype == "float32" else 1, operands=[w0, *ws])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [1, 2, 3])
@pytest.mark.parametrize("topk", [1.0, 0.5, 0.1])
def test_sce_rounds_as_mergekit(dtype, n, topk):
    while True:
        base = stored((30, 17), dtype)
        xs = [stored((30, 17), dtype, 0.05, base=base) for _ in range(n)]
        if untied_at_cut(base, xs, topk, dtype):
            break
    got, _ = run("sce", xs, base, dtype, select_topk=topk)
    # fp32: torch sums the means in its own order (a step apart at most)
    within(got, sce_ref(base, xs, topk, dtype), dtype, steps=2 if dtype == "float32" else 1, operands=[base, *xs])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(50,), (40, 30), (3, 8, 20)])
def test_arcee_fusion_rounds_as_mergekit(dtype, shape):
    a = stored(shape, dtype)
    b = stored(shape, dtype, 0.3, base=a)
    got, _ = run("arcee_fusion", [b], a, dtype)
    ref, dist = arcee_fusion_ref(a, b, dtype)
    clear = dist > 2  # an importance within 2 steps of the threshold may land on either side of it
    assert clear.mean() > 0.9
    within(got, ref, dtype, mask=clear)
    assert 0 < np.mean(got != a) < 0.5  # an outlier threshold: a minority of entries from the model


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [1, 2, 3])
def test_ram_rounds_as_mergekit(dtype, n):
    base = stored((20, 13), dtype)
    xs = [stored((20, 13), dtype, 0.05, base=base, sparse=0.5) for _ in range(n)]
    got, out_dtype = run("ram", xs, base, dtype, epsilon=1e-5)
    assert out_dtype == TORCH[dtype]
    within(got, ram_ref(base, xs, 1e-5, dtype), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [1, 2, 3])
@pytest.mark.parametrize("r,alpha", [(0.1, 0.2), (0.5, 5.0)])
def test_ramplus_tl_keeps_mergekits_float32_lambda(dtype, n, r, alpha):
    base = stored((20, 13), dtype)
    xs = [stored((20, 13), dtype, 0.05, base=base, sparse=0.5) for _ in range(n)]
    got, out_dtype = run("ramplus_tl", xs, base, dtype, r=r, alpha=alpha, epsilon=1e-5)
    assert out_dtype == torch.float32  # float32 lambda promotes the result, as in mergekit
    within(got, ram_ref(base, xs, 1e-5, dtype, r, alpha), "float32", steps=2)


# -- through a merge: the recipe's dtype by default, float32 with compute_dtype -------------------------
SHAPES = {"model.embed_tokens.weight": (64, 16), "model.layers.0.mlp.up_proj.weight": (24, 16),
          "model.norm.weight": (16,)}
CONFIG = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 16, "num_hidden_layers": 1,
          "intermediate_size": 24, "vocab_size": 64, "num_attention_heads": 2}


def _models(tmp_path, dtype):
    values = {}
    base = {k: stored(s, dtype) for k, s in SHAPES.items()}
    for name in ("base", "a", "b"):
        ts = base if name == "base" else {k: stored(v.shape, dtype, 0.05, base=v, sparse=0.6) for k, v in base.items()}
        d = tmp_path / f"{dtype}-{name}"
        d.mkdir()
        save_file({k: torch.tensor(v).to(TORCH[dtype]) for k, v in ts.items()}, str(d / "model.safetensors"),
                  metadata={"format": "pt"})
        (d / "config.json").write_text(json.dumps({**CONFIG, "torch_dtype": dtype}))
        values[name] = ts
    return values


def _exact(method, base, a, b):
    """The float64 statement with no intermediate rounding (compute_dtype: float32 rounds once)."""
    if method == "nearswap":
        w = np.clip(0.01 / np.maximum(np.abs(base - a), 1e-6), 0, 1)
        return w * a + (1 - w) * base
    ds = [a - base, b - base]
    counted = [np.abs(d) > 1e-5 for d in ds]
    c = sum(m.astype(np.int64) for m in counted)
    return base + sum(np.where(m, d, 0.0) / np.maximum(c, 1) for d, m in zip(ds, counted))


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("method", ["nearswap", "ram"])
def test_recipe_dtype_by_default_float32_on_request(tmp_path, dtype, method):
    v = _models(tmp_path, dtype)
    models = [{"model": str(tmp_path / f"{dtype}-a")}]
    if method == "ram":
        models.append({"model": str(tmp_path / f"{dtype}-b")})
    recipe = {"merge_method": method, "base_model": str(tmp_path / f"{dtype}-base"), "models": models,
              "dtype": dtype, **({"parameters": {"t": 0.01}} if method == "nearswap" else {})}
    souplm.merge(recipe, tmp_path / "native", progress=False, hash_inputs=False)
    souplm.merge({**recipe, "compute_dtype": "float32"}, tmp_path / "f32", progress=False, hash_inputs=False)
    native = load_file(str(tmp_path / "native" / "model.safetensors"))
    f32 = load_file(str(tmp_path / "f32" / "model.safetensors"))
    differs = 0
    for k in SHAPES:
        base, a, b = v["base"][k], v["a"][k], v["b"][k]
        stepwise = nearswap_ref(base, a, 0.01, dtype) if method == "nearswap" else ram_ref(base, [a, b], 1e-5, dtype)
        got = native[k].to(torch.float64).numpy()
        assert native[k].dtype == f32[k].dtype == TORCH[dtype]
        within(got, stepwise, dtype)
        exact = _exact(method, base, a, b)
        # float32 arithmetic, then one rounding to the dtype: within half a step (plus float32's own)
        got32 = f32[k].to(torch.float64).numpy()
        assert np.all(np.abs(got32 - exact) <= (0.5 * STEP[dtype] + 2e-7) * np.abs(exact) + 1e-30)
        differs += int(np.sum(got != got32))
    assert differs > 0  # the two precisions are not the same arithmetic


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [1, 2, 3, 5])
@pytest.mark.parametrize("shape", [(13,), (40, 30), (3, 4, 5), (1 << 18 | 77,)])  # the last: more than one block
def test_sce_variance_is_torchs_bit_for_bit(dtype, n, shape):
    """sce's selection ranks torch.var(tau, dim=0, unbiased=False) in the dtype, as mergekit's: the same values
    (their ties decide which entries the top-k keeps), computed blockwise."""
    from souplm.methods.sce import model_variance

    gen = torch.Generator().manual_seed(n)
    tv = (torch.randn((n, *shape), generator=gen) * 0.01 + 0.003 * torch.randn(shape, generator=gen)).to(TORCH[dtype])
    assert torch.equal(model_variance(tv), torch.var(tv, dim=0, unbiased=False))
