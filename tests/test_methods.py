"""Every merge method against an independent statement of its formula (NumPy, written from the papers)."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from souplm.methods import get_method

RNG = np.random.default_rng(0)


def run(name, tensors, base=None, **params):
    m = get_method(name)
    n = len(tensors)
    kwargs = {}
    for key, default in m.model_params.items():
        v = params.pop(key, default)
        kwargs[key] = torch.tensor(v if isinstance(v, list) else [v] * n, dtype=torch.float32)
    kwargs.update(params)
    if m.random:
        kwargs["keys"] = [100 + i for i in range(n)]
    tt = [torch.tensor(t, dtype=torch.float32) for t in tensors]
    b = None if base is None else torch.tensor(base, dtype=torch.float32)
    return m.fn(tt, b, **kwargs).numpy()


def rand(*shape):
    return RNG.standard_normal(shape).astype(np.float32)


@settings(max_examples=30, deadline=None)
@given(alpha=st.floats(0, 1), rows=st.integers(1, 6), cols=st.integers(1, 6))
def test_linear_is_the_vanilla_soup(alpha, rows, cols):
    a, b = rand(rows, cols), rand(rows, cols)
    got = run("linear", [a, b], weight=[alpha, 1 - alpha])
    np.testing.assert_allclose(got, alpha * a + (1 - alpha) * b, atol=1e-5)


def test_linear_normalizes_weights_unless_told_not_to():
    a, b, c = rand(4, 3), rand(4, 3), rand(4, 3)
    got = run("linear", [a, b, c], weight=[1.0, 2.0, 1.0])
    np.testing.assert_allclose(got, (a + 2 * b + c) / 4, atol=1e-6)
    raw = run("linear", [a, b, c], weight=[1.0, 2.0, 1.0], normalize=False)
    np.testing.assert_allclose(raw, a + 2 * b + c, atol=1e-6)


def test_linear_per_row_weights():
    a, b = rand(3, 5), rand(3, 5)
    w = torch.tensor([[0.0, 0.5, 1.0], [1.0, 0.5, 0.0]])
    got = get_method("linear").fn([torch.tensor(a), torch.tensor(b)], None, weight=w).numpy()
    expect = np.stack([b[0], 0.5 * a[1] + 0.5 * b[1], a[2]])
    np.testing.assert_allclose(got, expect, atol=1e-6)


def test_uniform_is_the_mean():
    ts = [rand(2, 7) for _ in range(5)]
    np.testing.assert_allclose(run("uniform", ts), np.mean(ts, axis=0), atol=1e-6)


def test_wise_ft_interpolates_base_to_finetuned():
    base, ft = rand(6), rand(6)
    np.testing.assert_allclose(run("wise_ft", [ft], base, weight=0.25), 0.75 * base + 0.25 * ft, atol=1e-6)


def test_task_arithmetic():
    base, a, b = rand(5, 4), rand(5, 4), rand(5, 4)
    got = run("task_arithmetic", [a, b], base, weight=[0.7, 0.2], **{"lambda": 0.5})
    np.testing.assert_allclose(got, base + 0.5 * (0.7 * (a - base) + 0.2 * (b - base)), atol=1e-5)


def ties_reference(base, models, weights, densities, lam=1.0, normalize=True):
    """TIES (Yadav et al. 2023), entry by entry: trim to top-k |delta|, elect sign of the weighted
    sum, average (weighted) the entries that agree with it."""
    deltas = []
    for m, d in zip(models, densities):
        delta = (m - base).ravel()
        k = delta.size if d >= 1 else max(1, int(d * delta.size))  # mergekit's count: int(density * n), >= 1
        keep = np.zeros(delta.size, bool)
        keep[np.argsort(-np.abs(delta), kind="stable")[:k]] = True  # ties: the first in index order
        deltas.append(np.where(keep, delta, 0.0))
    out = np.zeros(base.size)
    for j in range(base.size):
        vals = [w * dl[j] for w, dl in zip(weights, deltas)]
        sign = 1.0 if sum(vals) >= 0 else -1.0  # mergekit's election: + where the weighted sum is >= 0
        num = den = 0.0
        for w, dl, v in zip(weights, deltas, vals):
            if dl[j] != 0 and np.sign(v) == sign:
                num += v
                den += w
        out[j] = (num / den if den else 0.0) if normalize else num
    return base + lam * out.reshape(base.shape)


@pytest.mark.parametrize("density", [1.0, 0.5, 0.2])
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("w", [[1.0, 0.5, 2.0], [1.0, -0.5, 0.5]])  # positive weights; one negative
def test_ties_matches_reference(density, normalize, w):
    base = rand(8, 9)
    models = [base + rand(8, 9) for _ in range(3)]
    got = run("ties", models, base, weight=w, density=[density] * 3, normalize=normalize, **{"lambda": 0.8})
    expect = ties_reference(base, models, w, [density] * 3, 0.8, normalize)
    np.testing.assert_allclose(got, expect, atol=1e-5)


@pytest.mark.parametrize("density", [0.3, 0.55])
def test_ties_keeps_exactly_k_entries_when_magnitudes_tie(density):
    """Heavy ties (deltas of a few values, as bf16 fine-tunes give): exactly k = int(density * n) entries
    survive the trim, the first in index order among those tied with the k-th."""
    base = rand(20, 30)
    g = np.random.default_rng(5)
    models = [base + g.choice(np.array([-1.0, -0.5, 0.5, 1.0], np.float32), (20, 30)) for _ in range(2)]
    got = run("ties", models, base, weight=[1.0, 0.7], density=[density] * 2)
    np.testing.assert_allclose(got, ties_reference(base, models, [1.0, 0.7], [density] * 2), atol=1e-6)
    one = run("ties", models[:1], base, weight=[1.0], density=[density])
    assert np.count_nonzero(one != base) == int(density * base.size)


@pytest.mark.parametrize("density", [0.01, 0.07, 0.29])
def test_ties_counts_on_the_recipes_decimal(density):
    """k = int(density * n) on the decimal the recipe wrote, as mergekit computes it in float64: 0.01 of 1000
    entries keeps 10 (its float32 copy, 0.0099999998, would keep 9)."""
    base = rand(40, 25)
    model = base + rand(40, 25)
    one = run("ties", [model], base, weight=[1.0], density=[density])  # held as float32, as the plan holds it
    assert np.count_nonzero(one != base) == int(density * base.size)


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 300_000), frac=st.floats(0.0, 1.0), distinct=st.integers(1, 1000), seed=st.integers(0, 99))
def test_kth_largest_is_exact(n, frac, distinct, seed):
    """The banded selection against a full sort, with heavy ties (few distinct values) and zeros."""
    from souplm.methods.ties import kth_largest

    g = np.random.default_rng(seed)
    mag = np.abs(g.standard_normal(n)).astype(np.float32)
    if distinct < 1000:
        mag = np.round(mag * distinct) / distinct
    k = min(max(int(frac * n), 1), n)
    expect = np.sort(mag)[::-1][k - 1]
    assert float(kth_largest(torch.from_numpy(mag), k)) == expect


def test_dare_linear_drops_and_rescales():
    base = rand(200, 50)
    ft = base + rand(200, 50)
    density = 0.3
    got = run("dare_linear", [ft], base, weight=[1.0], density=[density], exact_rescale=True)
    delta = ft - base
    changed = ~np.isclose(got, base)
    # every entry is either dropped (equals base) or its delta rescaled by 1/q, q the keep probability:
    # density on the 16-bit grid of the random draws
    q = round(density * 2**16) / 2**16
    np.testing.assert_allclose(got[changed], (base + delta / q)[changed], rtol=1e-6, atol=1e-6)
    assert abs(changed.mean() - density) < 0.02  # drop rate p = 1 - density
    # reproducible: same keys, same output
    np.testing.assert_array_equal(got, run("dare_linear", [ft], base, weight=[1.0], density=[density],
                                           exact_rescale=True))


@pytest.mark.parametrize("rescale", [True, False])
def test_dare_linear_keeps_the_l1_norm_by_default_as_mergekit(rescale):
    """mergekit's DARE: the dropped task vector scaled back to its own L1 norm (rescale: true, the default);
    rescale: false leaves the survivors unscaled."""
    base = rand(60, 40)
    ft = base + rand(60, 40)
    got = run("dare_linear", [ft], base, weight=[1.0], density=[0.3], rescale=rescale) - base
    delta = (ft - base).astype(np.float64)
    kept = got != 0
    scale = np.abs(delta).sum() / np.abs(delta[kept]).sum() if rescale else 1.0
    np.testing.assert_allclose(got[kept], delta[kept] * scale, rtol=1e-5, atol=1e-5)  # (base + d) - base: fp32 rounding
    if rescale:
        assert abs(np.abs(got).sum() - np.abs(delta).sum()) < 1e-3 * np.abs(delta).sum()


def splitmix64_draws(key, n):
    """The DARE draw stream from its definition, in Python integers: entry j takes bits 16*(j%4).. of
    SplitMix64's output for state key + (j//4 + 1) * gamma (Steele et al. 2014)."""
    mask = (1 << 64) - 1
    out = []
    for j in range(n):
        z = (key + (j // 4 + 1) * 0x9E3779B97F4A7C15) & mask
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
        z ^= z >> 31
        out.append((z >> (16 * (j % 4))) & 0xFFFF)
    return np.array(out)


@pytest.mark.parametrize("key", [0, 7, 2**63 + 5, 2**64 - 1])
def test_dare_keeps_exactly_the_entries_whose_draw_is_below_the_level(key):
    from souplm.methods.dare import drop_and_rescale

    delta = rand(13, 7) + 3.0  # no zero entries, so every zero in the result was dropped
    density = 0.4
    level = round(density * 2**16)
    got = drop_and_rescale(torch.tensor(delta), density, key).numpy()
    keep = (splitmix64_draws(key, delta.size) < level).reshape(delta.shape)
    np.testing.assert_array_equal(got != 0, keep)
    np.testing.assert_allclose(got[keep], delta[keep] * np.float32(2**16 / level), rtol=1e-7)


def test_dare_is_unbiased_in_expectation():
    base = np.zeros((400, 400), np.float32)
    ft = np.ones((400, 400), np.float32)
    got = run("dare_linear", [ft], base, weight=[1.0], density=[0.5])
    assert abs(got.mean() - 1.0) < 0.02


def test_dare_ties_elects_signs_on_sparsified_deltas():
    base = rand(30, 30)
    a, b = base + rand(30, 30), base + rand(30, 30)
    got = run("dare_ties", [a, b], base, weight=[1.0, 1.0], density=[1.0, 1.0])  # no drop: plain TIES at d=1
    # (mergekit's default for dare_ties: normalize false, unlike ties)
    np.testing.assert_allclose(got, ties_reference(base, [a, b], [1, 1], [1, 1], normalize=False), atol=1e-5)


def slerp_reference(a, b, t):
    ua, ub = a.ravel() / np.linalg.norm(a), b.ravel() / np.linalg.norm(b)
    omega = math.acos(np.clip(ua @ ub, -1, 1))
    s = math.sin(omega)
    return math.sin((1 - t) * omega) / s * a + math.sin(t * omega) / s * b


@pytest.mark.parametrize("t", [0.0, 0.3, 0.5, 1.0])
def test_slerp_matches_formula(t):
    a, b = rand(10, 3), rand(10, 3)
    got = run("slerp", [a, b], t=t)
    np.testing.assert_allclose(got, slerp_reference(a, b, t), atol=1e-5)


def test_slerp_parallel_vectors_fall_back_to_lerp():
    a = rand(4, 4)
    np.testing.assert_allclose(run("slerp", [a, 2 * a], t=0.5), 1.5 * a, atol=1e-5)


def test_slerp_lerps_when_nearly_parallel_as_mergekit():
    """|cos| > 0.9995 is parallel in mergekit 0.1.5 (the sin(O) < 1e-6 rule would still slerp here)."""
    a = rand(40, 5)
    b = a + 0.02 * rand(40, 5)  # cos about 0.9998
    cos = float((a.ravel() @ b.ravel()) / np.linalg.norm(a) / np.linalg.norm(b))
    assert 0.9995 < cos < 1 - 1e-9
    np.testing.assert_allclose(run("slerp", [a, b], t=0.3), 0.7 * a + 0.3 * b, atol=1e-6)


def test_slerp_of_a_zero_tensor_treats_it_as_orthogonal_as_mergekit():
    """A norm below epsilon counts as 1, so the zero tensor's cosine with the other is 0: O = pi/2."""
    a, b = np.zeros((6, 4), np.float32), rand(6, 4)
    t = 0.3
    np.testing.assert_allclose(run("slerp", [a, b], t=t), math.sin(t * math.pi / 2) * b, atol=1e-6)


def test_method_contracts_are_checked():
    from souplm.errors import SoupError

    with pytest.raises(SoupError, match="needs a base_model"):
        get_method("ties").check(2, has_base=False)
    with pytest.raises(SoupError, match="takes 2 models"):
        get_method("slerp").check(3, has_base=False)
    with pytest.raises(SoupError, match="unknown merge method"):
        get_method("frankenmerge")
