"""The C kernels (souplm._kernels) against an independent NumPy statement of their formulas.

Every reference below computes in float32, one operation at a time in the documented order (NumPy rounds
each operation; nothing is fused), so the kernels must match it bit for bit. Where the CPU has the
AVX2 + F16C copy of the kernels, every check runs on it and on the portable copy.
"""

from __future__ import annotations

import itertools
import random
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

K = pytest.importorskip("souplm._kernels")

F32, F16, BF16 = 0, 1, 2
CODES = (F32, F16, BF16)
SUM, ELECT = 0, 1
U64 = (1 << 64) - 1
GAMMA, MIX1, MIX2 = 0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB
# every copy of the kernels this CPU runs (generic, then avx2, then avx512 where it has them)
ISAS = ["generic", "avx2", "avx512"][: ["generic", "avx2", "avx512"].index(K._set_isa("auto")) + 1]


@pytest.fixture(autouse=True)
def _restore_isa():
    yield
    K._set_isa("auto")


def each_isa(fn):
    """fn() under every copy of the kernels; all results must be equal, the first is returned."""
    results = []
    for isa in ISAS:
        K._set_isa(isa)
        results.append(fn())
    K._set_isa("auto")
    for r in results[1:]:
        np.testing.assert_array_equal(np.asarray(r), np.asarray(results[0]))
    return results[0]


# -- the reference: dtype conversions ----------------------------------------------------------------
def bf16_bits(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bits, round to nearest even (finite inputs)."""
    u = np.asarray(x, np.float32).view(np.uint32)
    return ((u + np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)).astype(np.uint16)


def encode(x: np.ndarray, code: int) -> np.ndarray:
    """float32 values stored as dtype `code` (bfloat16 as uint16 bits)."""
    x = np.asarray(x, np.float32)
    if code == F32:
        return x.copy()
    if code == F16:
        return x.astype(np.float16)
    return bf16_bits(x)


def decode(a: np.ndarray, code: int) -> np.ndarray:
    if code == F32:
        return a.view(np.float32)
    if code == F16:
        return a.view(np.float16).astype(np.float32)
    return (a.view(np.uint16).astype(np.uint32) << np.uint32(16)).view(np.float32)


def empty(n: int, code: int) -> np.ndarray:
    return np.full(n, 0x5A5A, np.uint16) if code != F32 else np.full(n, 1234.5, np.float32)


# -- the reference: the DARE stream ----------------------------------------------------------------------
def splitmix_word(key: int, w: int) -> int:
    z = (key + (w + 1) * GAMMA) & U64
    z = ((z ^ (z >> 30)) * MIX1) & U64
    z = ((z ^ (z >> 27)) * MIX2) & U64
    return z ^ (z >> 31)


def py_draws(key: int, start: int, stop: int) -> list[int]:
    return [(splitmix_word(key, j >> 2) >> (16 * (j & 3))) & 0xFFFF for j in range(start, stop)]


def np_draws(key: int, start: int, stop: int) -> np.ndarray:
    """The same stream in NumPy uint64 arithmetic (wraps modulo 2**64), for the larger references."""
    j = np.arange(start, stop, dtype=np.uint64)
    with np.errstate(over="ignore"):
        z = np.uint64(key) + ((j >> np.uint64(2)) + np.uint64(1)) * np.uint64(GAMMA)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(MIX1)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(MIX2)
    z = z ^ (z >> np.uint64(31))
    return ((z >> (np.uint64(16) * (j & np.uint64(3)))) & np.uint64(0xFFFF)).astype(np.uint32)


# -- the reference: combine --------------------------------------------------------------------------------
def ref_combine(xs, codes, base, base_code, weights, row_len, start, stop, mode, lam, normalize, thr=None,
                dare=None, out_code=F32, quota=None, compute=F32):
    """The kernel's formula in NumPy float32, step by step; `compute` bf16/f16: each step's result rounded to
    that dtype, as torch rounds an op in it (the sums over models accumulate in float32, then round)."""
    f = np.float32

    def r(v):
        v = np.asarray(v, f)
        return v if compute == F32 else decode(encode(v, compute), compute).astype(f)

    n = len(xs)
    j = np.arange(start, stop)
    b = r(decode(base, base_code)[start:stop]) if base is not None else None
    w2 = np.asarray(weights, np.float32).reshape(n, -1)
    ws = [np.full(len(j), w2[i, 0], f) if w2.shape[1] == 1 else w2[i, j // row_len] for i in range(n)]
    ds = []
    for i in range(n):
        d = r(decode(xs[i], codes[i])[start:stop])
        if b is not None:
            d = r(d - b)
        if thr is not None:
            keep = np.abs(d) >= f(thr[i])
            if quota is not None and quota[i] >= 0:  # of the ties, only the range's first quota[i]
                ties = np.flatnonzero(np.abs(d) == f(thr[i]))
                keep[ties[quota[i]:]] = False
            d = np.where(keep, d, f(0))
        if dare is not None:
            keys, levels, scales = dare
            d = np.where(np_draws(int(keys[i]), start, stop) < int(levels[i]), r(d * f(scales[i])), f(0))
        ds.append(d.astype(f))
    with np.errstate(all="ignore"):
        if mode == SUM:
            acc = r(ds[0] * ws[0])
            for d, w in zip(ds[1:], ws[1:]):
                acc = acc + r(d * w)
            acc = r(acc)
            if normalize:  # divided by the weights' sum (by 1 where it is below 1e-8)
                total = ws[0]
                for w in ws[1:]:
                    total = total + w
                total = r(total)
                acc = r(acc / np.where(np.abs(total) < f(1e-8), f(1), total))
        else:
            ps = [r(d * w) for d, w in zip(ds, ws)]
            t = ps[0]
            for p in ps[1:]:
                t = t + p
            s = np.where(t >= 0, f(1), f(-1)).astype(f)  # mergekit's election: + where the sum is >= 0
            vs = [np.where(p * s > 0, p * s, f(0)).astype(f) for p in ps]
            acc = vs[0] * s
            mass = np.where(vs[0] > 0, ws[0], f(0)).astype(f)
            for v, w in zip(vs[1:], ws[1:]):
                acc = acc + v * s
                mass = mass + np.where(v > 0, w, f(0)).astype(f)
            acc, mass = r(acc), r(mass)
            if normalize:
                acc = np.where(mass != 0, r(acc / np.where(mass != 0, mass, f(1))), f(0)).astype(f)
        if b is not None:
            acc = r(r(acc * f(lam)) + b)
    assert acc.dtype == np.float32
    return encode(acc, out_code)


def kernel_combine(xs, codes, base, base_code, weights, row_len, start, stop, mode, lam, normalize, thr=None,
                   dare=None, out_code=F32, size=None, compute=F32):
    """Runs combine into a fresh output; returns (return value, out[start:stop]) and checks the rest is untouched."""
    size = len(xs[0]) if size is None else size
    out = empty(size, out_code)
    before = out.copy()
    keys = levels = scales = None
    if dare is not None:
        keys, levels, scales = (np.asarray(dare[0], np.uint64), np.asarray(dare[1], np.uint32),
                                np.asarray(dare[2], np.float32))
    r = K.combine(out, out_code, xs, codes, base, base_code, np.asarray(weights, np.float32), row_len, start, stop,
                  mode, lam, normalize, None if thr is None else np.asarray(thr, np.float32), keys, levels, scales,
                  None, compute)
    np.testing.assert_array_equal(out[:start], before[:start])
    np.testing.assert_array_equal(out[stop:], before[stop:])
    return r, out[start:stop]


def make_models(rng, n_models, size, codes, base_code, scale=0.05):
    """A base and fine-tunes of it, stored in their dtypes, with exact zeros, cancelling deltas and tiny values."""
    base32 = rng.standard_normal(size).astype(np.float32)
    base32[::17] = 0.0
    base32[5::23] *= 1e-5  # float16 subnormals
    xs32 = []
    for i in range(n_models):
        d = (scale * rng.standard_normal(size)).astype(np.float32)
        d[i::7] = 0.0  # no change
        d[3::11] = 0.25 if i % 2 == 0 else -0.25  # opposite signs: the election ties
        xs32.append(base32 + d)
    base = encode(base32, base_code) if base_code is not None else None
    return [encode(x, c) for x, c in zip(xs32, codes)], base


def check(xs, codes, base, base_code, weights, row_len, start, stop, mode, lam, normalize, thr=None, dare=None,
          out_code=F32, compute=F32):
    expect = ref_combine(xs, codes, base, base_code, weights, row_len, start, stop, mode, lam, normalize, thr, dare,
                         out_code, compute=compute)

    def run():
        r, got = kernel_combine(xs, codes, base, base_code, weights, row_len, start, stop, mode, lam, normalize,
                                thr, dare, out_code, compute=compute)
        assert r == -1
        return got

    got = each_isa(run)
    np.testing.assert_array_equal(got.view(np.uint32 if out_code == F32 else np.uint16),
                                  expect.view(np.uint32 if out_code == F32 else np.uint16))


# -- combine ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("out_code", CODES)
@pytest.mark.parametrize("base_code", [None, *CODES])
@pytest.mark.parametrize("in_code", CODES)
def test_combine_dtypes(in_code, base_code, out_code):
    rng = np.random.default_rng(100 + 16 * in_code + 4 * (base_code or 3) + out_code)
    codes = [in_code, (in_code + 1) % 3, (in_code + 2) % 3]  # mixed input dtypes
    size = 1500
    xs, base = make_models(rng, 3, size, codes, base_code)
    w = np.array([0.5, 0.3, 0.2], np.float32)
    thr = [0.01, 0.02, 0.0]
    bc = base_code if base_code is not None else 0
    for mode in (SUM, ELECT):
        check(xs, codes, base, bc, w, 1, 13, size - 5, mode, 0.75, True, thr if mode == ELECT else None,
              out_code=out_code)


OPTIONS = list(itertools.product([1, 2, 3], [SUM, ELECT], [False, True], [False, True], [False, True], [1, 7, 300],
                                 [False, True]))


@pytest.mark.parametrize("n_models,mode,normalize,use_thr,use_dare,row_len,use_base", OPTIONS)
def test_combine_options(n_models, mode, normalize, use_thr, use_dare, row_len, use_base):
    seed = hash((n_models, mode, normalize, use_thr, use_dare, row_len, use_base)) & 0xFFFF
    rng = np.random.default_rng(seed)
    size = 2100
    codes = [BF16, F16, F32][:n_models]
    xs, base = make_models(rng, n_models, size, codes, BF16 if use_base else None)
    if row_len == 1:
        weights = rng.uniform(0.1, 1.0, n_models).astype(np.float32)
        if n_models == 2 and normalize:
            weights = np.array([0.5, -0.5], np.float32)  # agreeing mass cancels: those entries become 0
    else:
        rows = -(-size // row_len) + 2  # more rows than the range covers is fine
        weights = rng.uniform(-0.5, 1.0, (n_models, rows)).astype(np.float32)
    thr = None
    if use_thr:
        d = decode(xs[0], codes[0])[:50] - (decode(base, BF16)[:50] if use_base else 0)
        thr = [float(np.abs(d[7]))] * n_models  # an actual |delta|: equality keeps it
        thr[-1] = 0.02
    dare = None
    if use_dare:
        dare = (rng.integers(0, 2**63, n_models, dtype=np.uint64) * 2 + 1, [32768, 65536, 9000][:n_models],
                [2.0, 1.0, 65536 / 9000][:n_models])
    start, stop = (3, size - 2) if row_len != 300 else (301, size)
    check(xs, codes, base, BF16, weights, row_len, start, stop, mode, 1.25, normalize, thr, dare, out_code=BF16)
    check(xs, codes, base, BF16, weights, row_len, start, stop, mode, 1.25, normalize, thr, dare, out_code=F32)


@pytest.mark.parametrize("compute", [BF16, F16])
@pytest.mark.parametrize("mode", [SUM, ELECT])
@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("use_dare", [False, True])
def test_combine_in_a_low_precision_compute_dtype(compute, mode, normalize, use_dare):
    """compute_dtype: every step rounded to bfloat16 / float16, as mergekit's torch ops in that dtype round."""
    rng = np.random.default_rng(compute * 8 + mode * 4 + normalize * 2 + use_dare)
    size = 1700
    codes = [BF16, F32, F16]
    xs, base = make_models(rng, 3, size, codes, BF16)
    w = np.array([0.7, 0.3, 0.45], np.float32)
    thr = [0.01, 0.0, 0.02] if mode == ELECT else None
    dare = ([11, 12, 13], [30000, 65536, 50000], [1.3, 1.0, 1.1]) if use_dare else None
    for out_code in CODES:
        check(xs, codes, base, BF16, w, 1, 5, size - 7, mode, 0.6, normalize, thr, dare, out_code=out_code,
              compute=compute)


@pytest.mark.parametrize("quota", [0, 1, 5, 40])
def test_tie_quota_keeps_the_first_ties_in_index_order(quota):
    """Of the entries whose |delta| equals the threshold, the range keeps only the first `quota`; the
    others tied with it are zeroed, the larger ones kept (TIES's exact-k trim)."""
    rng = np.random.default_rng(quota)
    size = 900
    base = np.zeros(size, np.float32)
    x = rng.choice(np.array([-0.5, -0.25, 0.25, 0.5, 1.0], np.float32), size)  # heavy ties
    thr, q = np.array([0.5], np.float32), np.array([quota], np.int64)
    expect = ref_combine([x], [F32], base, F32, np.ones(1, np.float32), 1, 11, size - 3, SUM, 1.0, False, thr,
                         quota=q)

    def run():
        out = empty(size, F32)
        assert K.combine(out, F32, [x], [F32], base, F32, np.ones(1, np.float32), 1, 11, size - 3, SUM, 1.0,
                         False, thr, None, None, None, q) == -1
        return out[11:size - 3]

    got = each_isa(run)
    np.testing.assert_array_equal(got, expect)
    assert np.count_nonzero(np.abs(got) == 0.5) == min(quota, np.count_nonzero(np.abs(x[11:size - 3]) == 0.5))


@pytest.mark.parametrize("code", CODES)
def test_dare_abs_sums_against_numpy(code):
    """sum |x - base| and the same over the entries the DARE stream keeps, against the stream's own statement."""
    rng = np.random.default_rng(code)
    size = 5000
    xs, base = make_models(rng, 1, size, [code], BF16)
    d = np.abs(decode(xs[0], code)[7:size] - decode(base, BF16)[7:size]).astype(np.float64)
    keep = np_draws(12345, 7, size) < 20000
    got = each_isa(lambda: K.dare_abs_sums(xs[0], code, base, BF16, 7, size, 12345, 20000))
    np.testing.assert_allclose(got, (d.sum(), d[keep].sum()), rtol=1e-12)


def test_combine_buffer_kinds():
    """bytes, bytearray, memoryviews and unaligned slices are all plain buffers."""
    rng = np.random.default_rng(7)
    size = 999
    xs, base = make_models(rng, 2, size, [BF16, F32], F16)
    w = np.array([0.6, 0.4], np.float32)
    expect = ref_combine(xs, [BF16, F32], base, F16, w, 1, 0, size, ELECT, 1.0, True, out_code=F32)
    raw = bytearray(1 + 4 * size)
    unaligned = memoryview(raw)[1:]  # float32 output at an odd address
    padded = bytearray(3) + xs[1].tobytes()
    args = ([xs[0].tobytes(), memoryview(padded)[3:]], [BF16, F32], memoryview(bytearray(base.tobytes())), F16,
            w.tobytes(), 1, 0, size, ELECT, 1.0, True, None, None, None, None)
    assert K.combine(unaligned, F32, *args) == -1
    np.testing.assert_array_equal(np.frombuffer(unaligned, np.float32), expect)
    assert K.combine(out=unaligned, out_dtype=F32, inputs=args[0], in_dtypes=args[1], base=args[2], base_dtype=F16,
                     weights=args[4], row_len=1, start=0, stop=size, mode=ELECT, lam=1.0, normalize=True,
                     thresholds=None, dare_keys=None, keep_levels=None, scales=None) == -1


def test_combine_ranges_any_order_and_threads():
    """DARE draws depend on the element only: any split of the range, in any order, in parallel, gives the same bits."""
    rng = np.random.default_rng(11)
    size = 50_003
    codes = [BF16, BF16, F16]
    xs, base = make_models(rng, 3, size, codes, BF16)
    w = np.array([1.0, 0.7, 0.4], np.float32)
    dare = (np.array([12345, 2**64 - 1, 77], np.uint64), np.array([20000, 40000, 65536], np.uint32),
            np.array([65536 / 20000, 65536 / 40000, 1.0], np.float32))
    full = np.empty(size, np.uint16)
    args = (xs, codes, base, BF16, w, 1)
    tail = (ELECT, 0.9, True, None, *dare)
    assert K.combine(full, BF16, *args, 0, size, *tail) == -1
    expect = ref_combine(xs, codes, base, BF16, w, 1, 0, size, ELECT, 0.9, True, dare=dare, out_code=BF16)
    np.testing.assert_array_equal(full, expect)
    edges = sorted({0, size, *random.Random(3).sample(range(1, size), 9), 4097, 4098})
    ranges = list(itertools.pairwise(edges))
    random.Random(4).shuffle(ranges)
    split = np.zeros(size, np.uint16)
    for a, b in ranges:
        assert K.combine(split, BF16, *args, a, b, *tail) == -1
    np.testing.assert_array_equal(split, full)
    threaded = np.zeros(size, np.uint16)
    with ThreadPoolExecutor(4) as pool:
        assert list(pool.map(lambda r: K.combine(threaded, BF16, *args, r[0], r[1], *tail), ranges)) == [-1] * len(ranges)
    np.testing.assert_array_equal(threaded, full)


def test_combine_keep_fraction():
    size = 200_000
    x = np.ones(size, np.float32)
    for level in (6554, 32768, 58982):
        out = np.empty(size, np.float32)
        scale = 65536 / level
        K.combine(out, F32, [x], [F32], None, 0, np.ones(1, np.float32), 1, 0, size, SUM, 1.0, False, None,
                  np.array([99 + level], np.uint64), np.array([level], np.uint32), np.array([scale], np.float32))
        kept = out != 0
        p = level / 65536
        assert abs(kept.mean() - p) < 5 * np.sqrt(p * (1 - p) / size)
        assert np.all(out[kept] == np.float32(scale))
    for level, expect in ((0, 0.0), (65536, 1.0)):
        out = np.empty(size, np.float32)
        K.combine(out, F32, [x], [F32], None, 0, np.ones(1, np.float32), 1, 0, size, SUM, 1.0, False, None,
                  np.array([5], np.uint64), np.array([level], np.uint32), np.array([1.0], np.float32))
        assert np.all(out == expect)


# -- conversions --------------------------------------------------------------------------------------------------
def convert(values: np.ndarray, in_code: int, out_code: int) -> np.ndarray:
    """combine with one input, no base, weight 1: a pure dtype conversion (x * 1 is exact)."""
    def run():
        out = empty(len(values), out_code)
        r = K.combine(out, out_code, [values], [in_code], None, 0, np.ones(1, np.float32), 1, 0, len(values),
                      SUM, 1.0, False, None, None, None, None)
        # finite inputs: -1, or 2 (N + 1) exactly when a written value is Inf (a cast past the format's range)
        assert r == (-1 if np.all(np.isfinite(decode(out, out_code))) else 2)
        return out
    return each_isa(run)


def interesting_f32(rng, n):
    """Finite float32 bit patterns: every exponent, halfway points of float16/bfloat16, the overflow edges."""
    u = rng.integers(0, 0x7F800000, n, dtype=np.uint32)
    u[: n // 4] = (u[: n // 4] & np.uint32(0xFFFFE000)) | np.uint32(0x1000)  # float16 ties (normal range)
    u[n // 4: n // 2] = (u[n // 4: n // 2] & np.uint32(0xFFFF0000)) | np.uint32(0x8000)  # bfloat16 ties
    lo = rng.uniform(0, 2**-14, n // 8).astype(np.float32)  # float16 subnormal range, with exact ties:
    lo[::2] = (np.floor(lo[::2] * 2**24) + 0.5) * np.float32(2**-24)
    u[n // 2: n // 2 + n // 8] = lo.view(np.uint32)
    edges = np.array([65504, 65519.996, 65520, 65536, 3.4028235e38, 2**-24, 2**-25, 3 * 2**-26, 2**-14, 0],
                     np.float32).view(np.uint32)
    u[-len(edges):] = edges
    u[::3] |= np.uint32(0x80000000)  # signs
    return u.view(np.float32)


def test_f32_to_f16_and_bf16_match_numpy_and_torch():
    torch = pytest.importorskip("torch")
    x = interesting_f32(np.random.default_rng(5), 40_000)
    with np.errstate(over="ignore"):
        np.testing.assert_array_equal(convert(x, F32, F16).view(np.uint16), x.astype(np.float16).view(np.uint16))
    got = convert(x, F32, BF16)
    np.testing.assert_array_equal(got, bf16_bits(x))
    np.testing.assert_array_equal(got, torch.from_numpy(x).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16))


def test_f16_and_bf16_to_f32_every_pattern():
    bits = np.arange(65536, dtype=np.uint32).astype(np.uint16)
    finite16 = bits[(bits & 0x7C00) != 0x7C00]
    np.testing.assert_array_equal(convert(finite16.view(np.float16), F16, F32),
                                  finite16.view(np.float16).astype(np.float32))
    finite_bf = bits[(bits & 0x7F80) != 0x7F80]
    np.testing.assert_array_equal(convert(finite_bf, BF16, F32).view(np.uint32),
                                  finite_bf.astype(np.uint32) << np.uint32(16))
    # and between the two 16-bit formats
    with np.errstate(over="ignore"):
        np.testing.assert_array_equal(convert(finite_bf, BF16, F16).view(np.uint16),
                                      decode(finite_bf, BF16).astype(np.float16).view(np.uint16))


# -- non-finite inputs -----------------------------------------------------------------------------------------------
def test_nonfinite_detection():
    rng = np.random.default_rng(9)
    size = 3000
    codes = [F32, F16, BF16]
    xs, base = make_models(rng, 3, size, codes, BF16)
    w = np.full(3, 1 / 3, np.float32)

    def ret(xs, base, start=0, stop=size):
        return each_isa(lambda: K.combine(np.empty(size, np.float32), F32, xs, codes, base, BF16, w, 1, start, stop,
                                          ELECT, 1.0, True, None, None, None, None))

    assert ret(xs, base) == -1
    for bad in (np.inf, -np.inf, np.nan):
        for i in range(3):
            ys = [x.copy() for x in xs]
            ys[i][2500] = encode(np.array([bad], np.float32), codes[i])[0]
            assert ret(ys, base) == i
            assert ret(ys, base, 0, 2500) == -1  # outside the range: not read
            assert ret(ys, base, 2500, 2501) == i
        b2 = base.copy()
        b2[17] = encode(np.array([bad], np.float32), BF16)[0]
        assert ret(xs, b2) == 3
        ys = [x.copy() for x in xs]
        ys[2][100] = encode(np.array([bad], np.float32), BF16)[0]
        ys[1][2900] = encode(np.array([bad], np.float32), F16)[0]
        assert ret(ys, b2) == 1  # the lowest input index holding one
    x = np.array([1.0, np.inf], np.float32)
    assert K.combine(np.empty(2, np.float32), F32, [x], [F32], None, 0, np.ones(1, np.float32), 1, 0, 2, SUM, 1.0,
                     False, None, None, None, None) == 0


# -- the DARE stream ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("key", [0, 1, 0x0123456789ABCDEF, 2**64 - 1])
def test_dare_draws_match_splitmix64(key):
    for start, stop in [(0, 37), (1, 2), (3, 70), (6, 6), (4097, 5000), (2**40 + 2, 2**40 + 67)]:
        def run(start=start, stop=stop):
            out = np.full(stop - start + 3, 0xFFFF, np.uint16)
            K.dare_draws(key, start, stop, out)
            assert np.all(out[stop - start:] == 0xFFFF)
            return out[: stop - start]
        got = each_isa(run)
        assert got.tolist() == py_draws(key, start, stop)
        np.testing.assert_array_equal(got, np_draws(key, start, stop))


def test_dare_draws_uniform():
    out = np.empty(100_000, np.uint16)
    K.dare_draws(42, 3, 100_003, out)
    counts = np.bincount(out >> 12, minlength=16)
    assert counts.min() > 5500 and counts.max() < 7000


# -- abs_delta_histogram: radix select -----------------------------------------------------------------------------------
def _select(hist: np.ndarray, k: int) -> tuple[int, int]:
    """The bin of the k-th largest key, and how many keys are in higher bins."""
    above = 0
    for b in range(len(hist) - 1, -1, -1):
        if above + int(hist[b]) >= k:
            return b, above
        above += int(hist[b])
    raise AssertionError("k exceeds the count")


def kth_largest(x, x_code, base, base_code, n, k, parts=1):
    edges = np.linspace(0, n, parts + 1).astype(int)

    def histogram(prefix):
        hist = np.zeros(65536, np.uint32)
        for a, b in itertools.pairwise(edges):
            K.abs_delta_histogram(x, x_code, base, base_code, int(a), int(b), hist, prefix)  # accumulates
        return hist

    hi, above = _select(histogram(-1), k)
    lo, _ = _select(histogram(hi), k - above)
    return np.array([(hi << 16) | lo], np.uint32).view(np.float32)[0]


@pytest.mark.parametrize("x_code,base_code", [(BF16, BF16), (F32, F16), (F16, None), (F32, None)])
def test_histogram_radix_select(x_code, base_code):
    rng = np.random.default_rng(21)
    n = 20_000
    base32 = rng.standard_normal(n).astype(np.float32)
    x32 = base32 + (0.01 * rng.standard_normal(n)).astype(np.float32)
    x32[::5] = base32[::5] + np.float32(0.0078125)  # many exact ties
    x32[1::9] = base32[1::9]  # zeros
    x = encode(x32, x_code)
    base = encode(base32, base_code) if base_code is not None else None
    d = decode(x, x_code) - (decode(base, base_code) if base is not None else 0)
    mags = np.sort(np.abs(d))[::-1]
    for k in (1, 2, 100, 3000, 4000, 4001, 12345, n - 1, n):
        for isa in ISAS:
            K._set_isa(isa)
            got = kth_largest(x, x_code, base, base_code or 0, n, k, parts=1 if k % 2 else 3)
            assert got.view(np.uint32) == mags[k - 1].view(np.uint32), (k, got, mags[k - 1])


def test_histogram_counts():
    x = np.array([1.0, -1.0, 2.0, 0.0, 1.5, 1.0], np.float32)
    hist = np.zeros(65536, np.uint32)
    hist[0x3F80] = 10
    K.abs_delta_histogram(x, F32, None, 0, 0, 6, hist, -1)
    assert hist[0x3F80] == 13 and hist[0x4000] == 1 and hist[0] == 1 and hist[0x3FC0] == 1 and hist.sum() == 16
    low = np.zeros(65536, np.uint32)
    K.abs_delta_histogram(x, F32, None, 0, 1, 5, low, 0x3FC0)
    assert low[0] == 1 and low.sum() == 1


# -- bad arguments ---------------------------------------------------------------------------------------------------
def test_bad_arguments_raise():
    n = 100
    x = np.zeros(n, np.uint16)
    f = np.zeros(n, np.float32)
    out = np.zeros(n, np.uint16)
    w1 = np.ones(1, np.float32)

    def comb(**kw):
        args = {"out": out, "out_dtype": BF16, "inputs": [x], "in_dtypes": [BF16], "base": None, "base_dtype": 0, "weights": w1,
                    "row_len": 1, "start": 0, "stop": n, "mode": SUM, "lam": 1.0, "normalize": False, "thresholds": None, "dare_keys": None,
                    "keep_levels": None, "scales": None}
        args.update(kw)
        return K.combine(**args)

    assert comb() == -1
    bad_calls = [
        {"out": bytes(2 * n)},  # not writable
        {"out": np.zeros(n - 1, np.uint16)},  # too short
        {"out": np.zeros((n, 2), np.uint16)[:, 0]},  # not contiguous
        {"out": 5},  # not a buffer
        {"out_dtype": 3},
        {"in_dtypes": [-1]},
        {"in_dtypes": [BF16, BF16]},  # N mismatch
        {"in_dtypes": ["x"]},
        {"inputs": []},
        {"in_dtypes": [F32]},  # 100 float32 elements need 400 bytes
        {"inputs": [x[:50]]},
        {"inputs": 5},
        {"base": x[:10], "base_dtype": BF16},
        {"base": x, "base_dtype": 7},
        {"weights": np.ones(2, np.float32), "inputs": [x, x, x], "in_dtypes": [BF16] * 3},  # not a multiple of N
        {"weights": b"\x00\x00\x80"},
        {"weights": np.ones(5, np.float32), "row_len": 10},  # rows 0..9 needed, 5 given
        {"row_len": 0},
        {"start": -1},
        {"start": 10, "stop": 5},
        {"mode": 2},
        {"thresholds": np.ones(2, np.float32)},
        {"dare_keys": np.ones(1, np.uint64)},  # the DARE triple is all or nothing
        {"dare_keys": np.ones(1, np.uint64), "keep_levels": np.array([70000], np.uint32), "scales": w1},
        {"dare_keys": np.ones(1, np.uint32), "keep_levels": np.ones(1, np.uint32), "scales": w1},
    ]
    for kw in bad_calls:
        with pytest.raises((TypeError, ValueError)):
            comb(**kw)
    np.testing.assert_array_equal(out, 0)  # failed calls wrote nothing
    assert comb(in_dtypes=[F32], inputs=[f]) == -1

    hist = np.zeros(65536, np.uint32)
    K.abs_delta_histogram(x, BF16, None, 0, 0, n, hist, -1)
    for args in [
        (x, 3, None, 0, 0, n, hist, -1),
        (x, BF16, None, 0, 0, n + 1, hist, -1),
        (x, BF16, x[:5], BF16, 0, n, hist, -1),
        (x, BF16, None, 0, 0, n, np.zeros(100, np.uint32), -1),
        (x, BF16, None, 0, 0, n, bytes(4 * 65536), -1),
        (x, BF16, None, 0, 0, n, hist, 65536),
        (x, BF16, None, 0, 5, 4, hist, -1),
        (x, BF16, None, 0, 0, 2**32, hist, -1),
    ]:
        with pytest.raises((TypeError, ValueError)):
            K.abs_delta_histogram(*args)

    d = np.zeros(10, np.uint16)
    for args in [(-1, 0, 5, d), (2**64, 0, 5, d), (1.5, 0, 5, d), (1, 0, 11, d), (1, 5, 3, d), (1, 0, 5, bytes(20))]:
        with pytest.raises((TypeError, ValueError)):
            K.dare_draws(*args)


@pytest.mark.parametrize("use_base", [False, True])
def test_gram_against_numpy_float64(use_base):
    """G[i][j] = <x_i - base, x_j - base> over the range, the differences in float32, the rest in float64."""
    rng = np.random.default_rng(3 + use_base)
    size = 3000
    codes = [BF16, F16, F32]
    xs, base = make_models(rng, 3, size, codes, BF16 if use_base else None)
    d = [decode(x, c)[9:size - 4] - (decode(base, BF16)[9:size - 4] if use_base else np.float32(0))
         for x, c in zip(xs, codes)]
    d = [v.astype(np.float32).astype(np.float64) for v in d]
    expect = np.array([[a @ b for b in d] for a in d])
    got = each_isa(lambda: K.gram(xs, codes, base, BF16 if use_base else 0, 9, size - 4))
    np.testing.assert_allclose(np.asarray(got).reshape(3, 3), expect, rtol=1e-13)


def test_each_copy_of_the_kernels_can_be_chosen_and_an_unknown_one_is_refused():
    for isa in ISAS:
        assert K._set_isa(isa) == isa
    with pytest.raises(ValueError, match="_set_isa: expected 'auto' or one of this CPU's: generic"):
        K._set_isa("sse9")
    assert K._set_isa("auto") == ISAS[-1]


# -- SCE's selection: the variance across models and torch's top-k, against torch -----------------------
TORCH_OF = {F32: "float32", F16: "float16", BF16: "bfloat16"}


@pytest.mark.parametrize("code", CODES)
@pytest.mark.parametrize("n_models", [1, 2, 3, 5])
def test_variance_is_torch_var(code, n_models):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(7 + n_models)
    size = 5003  # not a multiple of the kernel's block
    scale = np.logspace(-6, 2, size).astype(np.float32)  # magnitudes across the dtype's range
    xs = [encode(rng.standard_normal(size).astype(np.float32) * scale, code) for _ in range(n_models)]
    dtype = getattr(torch, TORCH_OF[code])
    stacked = torch.stack([torch.from_numpy(decode(x, code).copy()).to(dtype) for x in xs])
    want = torch.var(stacked, dim=0, unbiased=False)

    def run():
        out = empty(size, code)
        K.variance(out, code, xs, [code] * n_models, 0, size)
        return out

    got = each_isa(run)
    np.testing.assert_array_equal(decode(got, code), want.float().numpy())


def topk_reference(values, k):
    torch = pytest.importorskip("torch")
    keep = np.zeros(values.numel(), np.uint8)
    keep[torch.topk(values.abs().reshape(-1), k).indices.numpy()] = 1
    return keep


@pytest.mark.parametrize("kind", ["variance", "few_values", "all_equal", "ascending", "descending", "organ_pipe"])
@pytest.mark.parametrize("n", [1, 3, 4, 5, 65, 1000, 40000])
def test_topk_mask_keeps_what_torch_topk_keeps(kind, n):
    """The entries kept, ties at the cut included (torch's choice among them, as mergekit's SCE keeps)."""
    torch = pytest.importorskip("torch")
    g = torch.Generator().manual_seed(n)
    values = {
        "variance": lambda: torch.var(torch.randn(2, n, generator=g).mul(0.01).bfloat16(), dim=0, unbiased=False),
        "few_values": lambda: torch.randint(0, 5, (n,), generator=g).float(),
        "all_equal": lambda: torch.ones(n),
        "ascending": lambda: torch.arange(n).float(),
        "descending": lambda: torch.arange(n, 0, -1).float(),
        "organ_pipe": lambda: torch.cat([torch.arange(n // 2), torch.arange(n - n // 2, 0, -1)]).float(),
    }[kind]()
    keys = values.float().abs().numpy().view(np.uint32)
    ks = sorted({k for k in (1, 2, n // 64, n // 64 + 1, n // 3 + 1, n // 2, n - 1, n) if 1 <= k <= n})  # both of torch's cases
    for k in ks:
        mask = np.full(n, 7, np.uint8)
        K.topk_mask(mask, keys, k)
        np.testing.assert_array_equal(mask, topk_reference(values, k), err_msg=f"k={k}")
        assert int(mask.sum()) == k


def test_topk_mask_refuses_bad_sizes():
    keys = np.zeros(10, np.uint32)
    for mask, k in [(np.zeros(9, np.uint8), 3), (np.zeros(10, np.uint8), 0), (np.zeros(10, np.uint8), 11)]:
        with pytest.raises(ValueError, match="topk_mask"):
            K.topk_mask(mask, keys, k)
