"""The study's statistics against known answers: textbook McNemar, hand-adjusted p-value lists, the normal
approximation and the coverage of a bootstrap interval on a known distribution."""

from __future__ import annotations

import math

import numpy as np
import pytest

from souplm.experiment import stats as S


def test_bootstrap_interval_of_a_bernoulli_mean_matches_the_normal_approximation() -> None:
    # 400 items, 120 right: p-hat = 0.3; the Wald interval is p +- 1.96 sqrt(p (1 - p) / n).
    items = np.zeros(400)
    items[:120] = 1.0
    iv = S.bootstrap_mean(items, resamples=4000, seed=1)
    half = 1.959964 * math.sqrt(0.3 * 0.7 / 400)
    assert iv.estimate == pytest.approx(0.3)
    assert iv.low == pytest.approx(0.3 - half, abs=0.006)
    assert iv.high == pytest.approx(0.3 + half, abs=0.006)
    assert (iv.high - iv.low) == pytest.approx(2 * half, rel=0.08)


def test_bootstrap_interval_covers_the_true_mean_about_95_percent_of_the_time() -> None:
    rng = np.random.default_rng(0)
    p, n, trials = 0.3, 150, 300
    hits = 0
    for t in range(trials):
        iv = S.bootstrap_mean(rng.random(n) < p, resamples=1000, seed=t)
        hits += iv.low <= p <= iv.high
    # Binomial(300, 0.95) has sd 3.8 hits; the percentile bootstrap runs slightly under nominal at n = 150.
    assert 0.90 <= hits / trials <= 0.985


def test_bootstrap_ratio_is_bits_per_byte_of_the_pooled_items() -> None:
    nll_bits, nbytes = [10.0, 30.0, 20.0], [10, 20, 30]
    iv = S.bootstrap_ratio(nll_bits, nbytes, resamples=500)
    assert iv.estimate == pytest.approx(60 / 60)
    assert min(10 / 10, 30 / 20, 20 / 30) <= iv.low <= iv.estimate <= iv.high <= max(1.0, 1.5, 2 / 3)


def test_mcnemar_exact_on_a_hand_made_table() -> None:
    # Discordant pairs b = 1, c = 9: p = 2 * P(X <= 1), X ~ Bin(10, 1/2) = 2 * (1 + 10) / 1024.
    assert S.mcnemar_exact(1, 9) == pytest.approx(22 / 1024)
    assert S.mcnemar_exact(9, 1) == pytest.approx(22 / 1024)
    assert S.mcnemar_exact(5, 5) == 1.0 and S.mcnemar_exact(0, 0) == 1.0
    # Items: a right / b wrong on 1, a wrong / b right on 9, both right on 20, both wrong on 10.
    a = [1] * 1 + [0] * 9 + [1] * 20 + [0] * 10
    b = [0] * 1 + [1] * 9 + [1] * 20 + [0] * 10
    t = S.mcnemar(a, b, resamples=500)
    assert t.discordant == (1, 9) and t.p == pytest.approx(22 / 1024) and t.n == 40
    assert t.diff.estimate == pytest.approx((21 - 29) / 40)
    assert t.diff.low <= t.diff.estimate <= t.diff.high < 0


def test_mcnemar_chi_square_textbook_value() -> None:
    # The textbook 2x2 table (a, b, c, d) = (101, 121, 59, 33): chi2 = (121 - 59)^2 / 180 = 21.36 without
    # the continuity correction, p = 3.8e-6; with it (|b - c| - 1)^2 / (b + c) = 20.67, p = 5.4e-6.
    x, p = S.mcnemar_chi2(121, 59, correction=False)
    assert x == pytest.approx(62**2 / 180) and x == pytest.approx(21.36, abs=0.01)
    assert p == pytest.approx(3.8e-6, rel=0.05)
    x, p = S.mcnemar_chi2(121, 59)
    assert x == pytest.approx(61**2 / 180) and p == pytest.approx(5.4e-6, rel=0.05)
    scipy_stats = pytest.importorskip("scipy.stats")
    assert p == pytest.approx(float(scipy_stats.chi2.sf(61**2 / 180, 1)), rel=1e-9)
    assert S.mcnemar_exact(7, 19) == pytest.approx(float(scipy_stats.binomtest(7, 26, 0.5).pvalue), rel=1e-9)


def test_paired_bootstrap_over_items() -> None:
    rng = np.random.default_rng(3)
    base = rng.random(300)
    # b = a + 0.05 on every item: the paired difference has no spread at all; unpaired it would be wide.
    t = S.paired_bootstrap(base, base + 0.05, resamples=1000)
    assert t.diff.estimate == pytest.approx(-0.05)
    assert t.diff.low == pytest.approx(-0.05) and t.diff.high == pytest.approx(-0.05)
    assert t.p == pytest.approx(2 / 1001)
    # Same scores: no difference, p = 1.
    assert S.paired_bootstrap(base, base).p == 1.0
    # A noisy, null difference: the interval holds 0 and p is large.
    noise = rng.normal(0, 1, 300)
    t = S.paired_bootstrap(noise, -noise[::-1].copy(), resamples=1000)
    assert (t.diff.low < 0 < t.diff.high) == (t.p > 0.05)
    # A ratio metric (bits per byte, den = bytes per document) on the same documents.
    nll_a, nll_b, nb = np.array([10.0, 12, 8, 9]), np.array([11.0, 13, 9, 10]), np.array([10.0, 10, 10, 10])
    t = S.paired_bootstrap(nll_a, nll_b, nb, resamples=500, min_items=0)
    assert t.diff.estimate == pytest.approx(39 / 40 - 43 / 40) and t.diff.high < 0 and t.p < 0.01
    # Four documents that all moved alike are no evidence: below MIN_ITEMS the test gives p = 1.
    t = S.paired_bootstrap(nll_a, nll_b, nb, resamples=500)
    assert t.p == 1.0 and t.test == "paired-bootstrap (too few items)" and t.diff.high < 0


def test_holm_and_benjamini_hochberg_on_a_hand_made_list() -> None:
    p = [0.01, 0.04, 0.03, 0.005]
    # Holm: sorted 0.005*4, 0.01*3, 0.03*2, 0.04*1 = 0.02, 0.03, 0.06, 0.04 -> running max 0.02, 0.03, 0.06, 0.06.
    assert S.holm(p) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    # BH: p * m / rank = 0.02, 0.02, 0.04, 0.04 (ranks 1..4) -> running min from the top.
    assert S.benjamini_hochberg(p) == pytest.approx([0.02, 0.04, 0.04, 0.02])
    assert S.holm([0.5, 0.9]) == pytest.approx([1.0, 1.0])
    assert S.holm([]) == [] and S.benjamini_hochberg([]) == []


def test_verdicts() -> None:
    assert S.verdict(0.1, 0.01) == "holds"
    assert S.verdict(-0.1, 0.01) == "does not hold"
    assert S.verdict(0.1, 0.2) == "inconclusive"
    assert S.verdict(float("nan"), 0.0) == "inconclusive"


def test_item_columns_give_the_headline_score() -> None:
    bpb = {"primary": "bpb", "items": {"nll": [2.0, 4.0], "bytes": [3, 5], "tokens": [1, 2], "words": [1, 1]}}
    num, den = S.item_columns(bpb)
    assert sum(num) / sum(den) == pytest.approx(6.0 / (math.log(2) * 8))
    acc = {"primary": "acc", "items": {"acc": [1.0, 0.0, 1.0], "acc_norm": [0.0, 0.0, 1.0]}}
    assert S.item_columns(acc) == ([1.0, 0.0, 1.0], [1.0, 1.0, 1.0])
