"""breadcrumbs, breadcrumbs_ties, della and della_linear as Forms (issue 14 §3): each new step against an
independent NumPy statement written here from mergekit 0.1.5's documented behaviour, in float32, bfloat16
and float16; the fused executor (C kernels) against the torch executor, byte for byte; whole merges against
the step-by-step statement in the compute dtype; bad parameters refused in one line."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

import souplm
from souplm.cli import main as cli
from souplm.engine import execute_fused as fused
from souplm.methods import steps

needs_kernels = pytest.mark.skipif(fused._kernels is None, reason="souplm._kernels is not built")
DTYPES = ["float32", "bfloat16", "float16"]
TORCH = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
CODE = {"float32": 0, "float16": 1, "bfloat16": 2}


# -- rounding, from the formats' definitions ----------------------------------------------------------
def bf16(x) -> np.ndarray:
    """float64 values -> nearest bfloat16 (ties to even; via float32, as torch computes a bf16 op), as float64."""
    bits = np.asarray(x, np.float32).view(np.uint32).astype(np.uint64)
    bits = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) << 16
    return bits.astype(np.uint32).view(np.float32).astype(np.float64)


ROUND = {
    "float32": lambda x: np.asarray(x, np.float32).astype(np.float64),
    "bfloat16": bf16,
    "float16": lambda x: np.asarray(np.asarray(x, np.float32), np.float16).astype(np.float64),
}


def splitmix_draws(key: int, n: int) -> np.ndarray:
    """souplm's counter stream from its definition: entry j takes bits 16*(j%4).. of SplitMix64's output for
    state key + (j//4 + 1) * golden gamma (Steele et al. 2014)."""
    m64 = (1 << 64) - 1
    words = []
    for q in range((n + 3) // 4):
        z = (key + (q + 1) * 0x9E3779B97F4A7C15) & m64
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & m64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & m64
        words.append(z ^ (z >> 31))
    return np.array([(words[j // 4] >> (16 * (j % 4))) & 0xFFFF for j in range(n)], np.int64)


# -- the steps' statements -------------------------------------------------------------------------------
def window_ref(n: int, density: float, gamma: float | None) -> tuple[int, int]:
    """mergekit's counts: TIES keeps max(1, int(d n)) largest; magnitude_outliers keeps int(d n) below the
    int(g n) largest, fewer outliers cut when both do not fit; density >= 1: everything."""
    if density >= 1:
        return 0, n
    if gamma is None:
        k = max(1, int(density * n))
        return n - k, n
    keep, top = int(density * n), int(gamma * n)
    bot = max(0, n - keep - top)
    return bot, bot + keep


def window_keep_ref(mag: np.ndarray, lo: int, hi: int) -> np.ndarray:
    """Entries of ascending-|d| rank [lo, hi); of equal magnitudes the higher index ranks lower (so a lower
    index counts as the larger: the top k keep the first ties)."""
    flat = mag.reshape(-1)
    order = np.lexsort((-np.arange(flat.size), flat))
    keep = np.zeros(flat.size, bool)
    keep[order[lo:hi]] = True
    return keep


def ramp_ref(m: int, density: float, eps: float, work: str) -> np.ndarray:
    """DELLA's keep levels as mergekit computes the probabilities: ranks + 1, (r - min) / (max - min),
    * 2, * epsilon, + (density - epsilon), each step an op of the work dtype (bf16 for bf16, else float32);
    level = round(p * 2**16)."""
    if m == 1:
        return np.array([round(density * 65536)])
    rnd = ROUND[work]
    f32 = np.float32
    ranks = rnd(rnd(np.arange(m, dtype=np.float64)) + 1)
    lo, hi = ranks.min(), ranks.max()
    norm = np.clip(rnd(f32(rnd(ranks - lo)) / f32(rnd(hi - lo))), 0, 1)
    p = rnd(f32(rnd(norm * 2)) * f32(eps))
    p = rnd(f32(density - eps) + f32(p))
    return np.rint(p * 65536).astype(np.int64)


def row_ranks_ref(mag: np.ndarray) -> np.ndarray:
    """Ascending rank of each entry within its row along dim 1 (a 1-D tensor is one row), ties by index."""
    rows = mag.reshape(1, -1, 1) if mag.ndim < 2 else mag.reshape(mag.shape[0], mag.shape[1], -1)
    ranks = np.argsort(np.argsort(rows, axis=1, kind="stable"), axis=1, kind="stable")
    return ranks.reshape(mag.shape)


def magprune_keep_ref(delta: np.ndarray, density: float, eps: float, key: int, work: str) -> np.ndarray:
    levels = ramp_ref(delta.shape[1] if delta.ndim >= 2 else delta.size, density, eps, work)
    return splitmix_draws(key, delta.size).reshape(delta.shape) < levels[row_ranks_ref(np.abs(delta))]


RNG = np.random.default_rng(11)


def tied_values(shape, dtype: str) -> np.ndarray:
    """Small task-vector-like values rounded to `dtype`, with many exact ties (few distinct magnitudes)."""
    x = RNG.standard_normal(shape) * 0.01
    ties = RNG.random(shape) < 0.3
    x[ties] = RNG.choice([-0.0078125, 0.0078125, 0.00390625, -0.001953125], size=int(ties.sum()))
    return ROUND[dtype](x).astype(np.float32)


# -- the trim ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n", [1, 7, 100, 1000, 4099])
def test_trim_window_counts_as_mergekit(n):
    for density in (0.001, 0.05, 0.3, 0.5, 0.99, 1.0):
        assert steps.trim_window(n, density) == window_ref(n, density, None)
        for gamma in (0.0, 0.01, 0.2, 0.6):
            assert steps.trim_window(n, density, gamma) == window_ref(n, density, gamma)


@pytest.mark.parametrize("dtype", DTYPES)
def test_window_mask_keeps_exactly_the_window(dtype):
    d = tied_values((3000,), dtype)
    mag = np.abs(d)
    for density, gamma in [(0.5, 0.01), (0.3, 0.3), (0.9, 0.2), (0.05, 0.0), (0.2, None), (0.7, 0.4)]:
        lo, hi = window_ref(d.size, density, gamma)
        got = steps.window_mask(torch.tensor(mag), lo, hi).numpy()
        np.testing.assert_array_equal(got, window_keep_ref(mag, lo, hi))


@needs_kernels
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("threads", [1, 3])
def test_fused_trim_keeps_exactly_the_window_across_ranges(dtype, threads, monkeypatch):
    """The kernels' two-cut radix select and tie quotas, on stored bytes of each dtype, split into ranges."""
    monkeypatch.setattr(fused, "MIN_SPLIT", 64)
    n = 5000
    base = ROUND[dtype](RNG.standard_normal(n) * 0.1).astype(np.float32)
    x = ROUND[dtype](base.astype(np.float64) + tied_values((n,), dtype)).astype(np.float32)
    xb, bb = (torch.tensor(v).to(TORCH[dtype]).view(torch.uint8).numpy() for v in (x, base))
    delta = ROUND[dtype](x.astype(np.float64) - base)  # the compute dtype's task vector
    ex = fused.Executor(None, threads=threads)
    try:
        for density, gamma in [(0.5, 0.01), (0.3, 0.3), (0.2, None), (0.7, 0.4), (0.05, 0.0), (1.0, 0.1)]:
            lo, hi = window_ref(n, density, gamma)
            cut = ex._window(xb, CODE[dtype], bb, CODE[dtype], n, lo, hi, CODE[dtype])
            out = np.empty(n, np.float32)
            for r, (a, z) in enumerate(fused._ranges(n, threads)):
                quota = None if cut.quota is None else np.array([cut.quota[r]], np.int64)
                assert fused._kernels.combine(out, 0, [xb], [CODE[dtype]], bb, CODE[dtype], np.ones(1, np.float32),
                                              1, a, z, 0, 1.0, False, np.array([cut.lower], np.float32), None, None,
                                              None, quota, CODE[dtype], upper=np.array([cut.upper], np.float32)) == -1
            keep = window_keep_ref(np.abs(delta), lo, hi)
            np.testing.assert_array_equal(out, ROUND[dtype](np.where(keep, delta, 0.0) + base))
    finally:
        ex.close()


# -- DELLA's ramp and drop ---------------------------------------------------------------------------------
@pytest.mark.parametrize("work", ["F32", "BF16"])
@pytest.mark.parametrize("m", [1, 2, 3, 100, 1000, 1024, 2816])
def test_ramp_levels_as_mergekit_computes_them(work, m):
    name = {"F32": "float32", "BF16": "bfloat16"}[work]
    for density, eps in [(0.5, 0.15), (0.66, 0.05), (0.2, 0.19), (0.9, 0.0)]:
        got = steps.ramp_levels(m, density, eps, work)
        np.testing.assert_array_equal(got, ramp_ref(m, density, eps, name))
        if m > 1 and work == "F32":  # the ramp runs from density - eps to density + eps, mean density
            exact = (density - eps) + 2 * eps * np.arange(m) / (m - 1)
            assert np.abs(got - exact * 65536).max() <= 1


def test_work_dtype_is_mergekits():
    """mergekit runs DELLA in bf16 for bf16 tensors, in float32 for float16 and float32 ones (on the CPU)."""
    assert [steps.random_dtype(c) for c in ("F32", "BF16", "F16")] == ["F32", "BF16", "F32"]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(777,), (40, 33), (6, 20, 5)])
def test_magprune_mask_by_row_rank(dtype, shape):
    """The torch step and the kernel: entry j kept iff draw_j < level[rank of |d_j| in its row (dim 1)];
    survivors L1-rescaled in the work dtype, rounded to the compute dtype."""
    d = tied_values(shape, dtype)
    key, density, eps = 2**63 + 12345, 0.45, 0.2
    compute = {"float32": "F32", "bfloat16": "BF16", "float16": "F16"}[dtype]
    work = steps.random_dtype(compute)
    keep = magprune_keep_ref(d, density, eps, key, {"F32": "float32", "BF16": "bfloat16"}[work])
    got = steps.magprune(torch.tensor(d), density, eps, key, rescale=False, rnd=steps.rounder(compute),
                         compute=compute).numpy()
    np.testing.assert_array_equal(got, np.where(keep, d, 0))
    got = steps.magprune(torch.tensor(d), density, eps, key, rescale=True, rnd=steps.rounder(compute),
                         compute=compute).numpy()
    rw = ROUND[{"F32": "float32", "BF16": "bfloat16"}[work]]
    d64 = d.astype(np.float64)
    scale = rw(rw(np.abs(d64).sum()) / rw(np.abs(d64[keep]).sum()))
    np.testing.assert_array_equal(got, ROUND[dtype](np.where(keep, d.astype(np.float64) * scale, 0)))
    if fused._kernels is None:
        return
    outer, m, inner = steps.row_view(shape)
    xb = torch.tensor(d).to(TORCH[dtype]).view(torch.uint8).numpy()
    mask = np.full(d.size, 7, np.uint8)
    levels = steps.ramp_levels(m, density, eps, work)
    sums = [fused._kernels.magprune_mask(xb, CODE[dtype], None, 0, m, inner, a, b, levels, key, mask, CODE[dtype])
            for a, b in [(0, 1), (1, outer * inner)]]  # two row ranges
    np.testing.assert_array_equal(mask.reshape(shape), keep)
    np.testing.assert_allclose(sum(s[0] for s in sums), np.abs(d.astype(np.float64)).sum(), rtol=1e-12)
    np.testing.assert_allclose(sum(s[1] for s in sums), np.abs(d[keep].astype(np.float64)).sum(), rtol=1e-12)


def test_magprune_keep_rate_follows_the_ramp():
    d = RNG.standard_normal((400, 300)).astype(np.float32)
    kept = steps.magprune(torch.tensor(d), 0.5, 0.3, 99, rescale=False).numpy() != 0
    ranks = row_ranks_ref(np.abs(d))
    assert abs(kept.mean() - 0.5) < 0.01
    # ranks 0..29 of 300: p from 0.2 to 0.258; ranks 270..299: from 0.742 to 0.8
    assert abs(kept[ranks < 30].mean() - 0.229) < 0.02 and abs(kept[ranks >= 270].mean() - 0.771) < 0.02


# -- whole merges ------------------------------------------------------------------------------------------
SHAPES = {
    "model.embed_tokens.weight": (48, 16),
    "model.layers.0.self_attn.q_proj.weight": (16, 16),
    "model.layers.0.mlp.down_proj.weight": (16, 24),
    "model.layers.0.input_layernorm.weight": (16,),
    "model.norm.weight": (16,),
    "lm_head.weight": (48, 16),
}
CONFIG = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 16, "intermediate_size": 24,
          "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 2, "vocab_size": 48,
          "tie_word_embeddings": False}


def checkpoints(tmp_path, dtype, ties=False):
    """A base and three fine-tunes stored in `dtype` (`ties`: deltas of a few values, heavy ties at the cuts)."""
    gen = torch.Generator().manual_seed(5)
    base = {k: torch.randn(s, generator=gen) * 0.5 for k, s in SHAPES.items()}
    steps_ = torch.tensor([-0.25, -0.125, 0.125, 0.25, 0.5])
    out, values = {}, {}
    for name in ("base", "a", "b", "c"):
        if name == "base":
            ts = base
        elif ties:
            ts = {k: v + steps_[torch.randint(0, 5, v.shape, generator=gen)] for k, v in base.items()}
        else:
            ts = {k: v + 0.05 * torch.randn(v.shape, generator=gen) for k, v in base.items()}
        d = tmp_path / f"{dtype}-{name}{'-t' if ties else ''}"
        d.mkdir()
        stored = {k: v.to(TORCH[dtype]).contiguous() for k, v in ts.items()}
        save_file(stored, str(d / "model.safetensors"), metadata={"format": "pt"})
        (d / "config.json").write_text(json.dumps({**CONFIG, "torch_dtype": dtype}))
        out[name] = d
        values[name] = {k: v.to(torch.float64).numpy() for k, v in stored.items()}
    return out, values


CASES = {
    "breadcrumbs": ({"weight": [0.6, 0.5, -0.2], "density": [0.6, 0.5, 0.7], "gamma": [0.05, 0.1, 0.0]},
                    {"rescale": True}),
    "breadcrumbs_ties": ({"weight": [1.0, 0.7, 0.4], "density": [0.4, 0.3, 0.5], "gamma": [0.02, 0.1, 0.3]},
                         {"normalize": True}),
    "della": ({"weight": [1.0, 0.5, 0.8], "density": [0.4, 0.6, 0.5], "epsilon": [0.1, 0.3, 0.0]},
              {"lambda": 0.9}),
    "della_linear": ({"weight": [0.6, 0.4, -0.3], "density": [0.5, 0.3, 0.7], "epsilon": [0.2, 0.1, 0.25]},
                     {"rescale": False, "normalize": True}),
}


def recipe_for(paths, method, dtype, per_model, glob, seed=3):
    models = [{"model": str(paths[x]), "parameters": {k: v[i] for k, v in per_model.items()}}
              for i, x in enumerate("abc")]
    return {"merge_method": method, "base_model": str(paths["base"]), "models": models, "parameters": glob,
            "dtype": dtype, "seed": seed}


def merge_with(executor, recipe, out, monkeypatch):
    monkeypatch.setenv("SOUPLM_EXECUTOR", executor)
    report = souplm.merge(recipe, out, progress=False, hash_inputs=False)
    assert report.executor == executor
    return load_file(str(out / "model.safetensors"))


@needs_kernels
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("method", sorted(CASES))
@pytest.mark.parametrize("ties", [False, True])
def test_fused_equals_torch_byte_for_byte(tmp_path, monkeypatch, method, dtype, ties):
    monkeypatch.setattr(fused, "MIN_SPLIT", 64)  # tensors split across the kernels' threads
    paths, _ = checkpoints(tmp_path, dtype, ties)
    per_model, glob = CASES[method]
    for variant in (glob, {**glob, "rescale": not glob.get("rescale", method.startswith("della"))},
                    {**glob, "compute_dtype": "float32"}):
        recipe = recipe_for(paths, method, dtype, per_model, {k: v for k, v in variant.items() if k != "compute_dtype"})
        if "compute_dtype" in variant:
            recipe["compute_dtype"] = "float32"
        a = merge_with("fused", recipe, tmp_path / "f", monkeypatch)
        b = merge_with("torch", recipe, tmp_path / "t", monkeypatch)
        assert a.keys() == b.keys()
        for k in a:
            assert a[k].dtype == TORCH[dtype]
            assert torch.equal(a[k].view(torch.uint8), b[k].view(torch.uint8)), (k, variant)
        for p in (tmp_path / "f", tmp_path / "t"):
            for f in p.iterdir():
                f.unlink()
            p.rmdir()


def merged_ref(values, method, dtype, per_model, glob, seed, names):
    """The merge as mergekit computes it in the recipe's dtype, each step rounded (R): d = R(x - b);
    sparsify (breadcrumbs' window; DELLA's ramp with souplm's stream); R(w d); sum (or elect + disjoint
    sum), R; normalize R; R(R(lam m) + b)."""
    from souplm.methods.steps import draw_keys

    rnd = ROUND[dtype]
    work = "bfloat16" if dtype == "bfloat16" else "float32"
    ws = [rnd(w) for w in per_model["weight"]]
    lam = glob.get("lambda", 1.0)
    della = method.startswith("della")
    rescale = glob.get("rescale", della)
    normalize = glob.get("normalize", method == "della")
    elect = method in ("della", "breadcrumbs_ties")
    out = {}
    for name in names:
        b = rnd(values["base"][name])
        keys = draw_keys(seed, name, 3)
        prods = []
        for i, x in enumerate("abc"):
            d = rnd(rnd(values[x][name]) - b)
            if della:
                keep = magprune_keep_ref(d, per_model["density"][i], per_model["epsilon"][i], keys[i], work)
                rs = ROUND[work]
            else:
                lo, hi = window_ref(d.size, per_model["density"][i], per_model["gamma"][i])
                keep = window_keep_ref(np.abs(d), lo, hi).reshape(d.shape)
                rs = rnd
            kept = np.where(keep, d, 0.0)
            if rescale:
                before, after = rs(np.abs(d).sum()), rs(np.abs(kept).sum())
                if before >= 1e-7 and after >= 1e-7:
                    kept = rnd(kept * rs(before / after))
            prods.append(rnd(kept * ws[i]))
        p = np.stack(prods)
        w = np.array(ws).reshape(-1, *([1] * b.ndim))
        if elect:
            sign = np.where(p.sum(0) >= 0, 1.0, -1.0)
            agree = (np.sign(p) == sign) & (p != 0)
            m = rnd((p * agree).sum(0))
            mass = rnd((w * agree).sum(0))
            if normalize:
                m = np.where(mass != 0, rnd(m / np.where(mass != 0, mass, 1.0)), 0.0)
        else:
            m = rnd(p.sum(0))
            if normalize:
                total = rnd(sum(ws))
                m = rnd(m / (1.0 if abs(total) < 1e-8 else total))
        out[name] = rnd(rnd(m * lam) + b) if lam != 1.0 else rnd(m + b)
    return out


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("method", sorted(CASES))
def test_merge_matches_the_step_by_step_statement(tmp_path, method, dtype):
    """A recipe in each dtype computes as mergekit does, in that dtype: within one rounding step of the
    statement above at the tensor's magnitude (float32: souplm's sums over models round in float32, the
    statement's in float64); in bf16 and fp16, where every step rounds, element by element too (measured:
    exact)."""
    paths, values = checkpoints(tmp_path, dtype)
    per_model, glob = CASES[method]
    souplm.merge(recipe_for(paths, method, dtype, per_model, glob), tmp_path / "o", progress=False,
                 hash_inputs=False)
    got = load_file(str(tmp_path / "o" / "model.safetensors"))
    want = merged_ref(values, method, dtype, per_model, glob, 3, list(SHAPES))
    eps = {"float32": 2.0**-23, "bfloat16": 2.0**-7, "float16": 2.0**-10}[dtype]
    for k in SHAPES:
        g = got[k].to(torch.float64).numpy()
        assert np.abs(g - want[k]).max() <= eps * np.abs(want[k]).max(), k
        if dtype != "float32":
            off = np.abs(g - want[k]) > eps * np.abs(want[k])
            assert off.mean() <= 0.01, (k, off.mean())  # all but rare double roundings


# -- validation -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method,per_model,glob,needle", [
    ("della", {"weight": [1.0, 1.0], "density": [0.5, 0.9]}, {"epsilon": 0.1}, "models[1]: density 0.9 +/- epsilon"),
    ("della_linear", {"weight": [1.0, 1.0], "epsilon": [0.1, 0.3]}, {"density": 0.3}, "models[1]"),
    ("della", {"weight": [1.0, 1.0]}, {"density": 0.6, "epsilon": 0.5}, "epsilon"),
    ("breadcrumbs_ties", {"weight": [1.0, 1.0], "gamma": [0.1, 1.2]}, {}, "gamma"),
    ("breadcrumbs", {"weight": [1.0, 1.0], "density": [0.5, 0.0]}, {}, "density"),
])
def test_bad_parameters_refused_in_one_line(tmp_path, capsys, method, per_model, glob, needle):
    paths, _ = checkpoints(tmp_path, "float32")
    models = [{"model": str(paths[x]), "parameters": {k: v[i] for k, v in per_model.items()}}
              for i, x in enumerate("ab")]
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({"merge_method": method, "base_model": str(paths["base"]), "models": models,
                                    "parameters": glob}))
    code = cli(["merge", str(path), "-o", str(tmp_path / "out"), "--quiet", "--no-hash"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and err.startswith("souplm: error:"), err
    assert needle in err, err
    assert not (tmp_path / "out").exists()
