"""Statistics of the study: summaries, bootstrap intervals over test items, paired tests, multiplicity.

Every score of the study is a ratio of sums over test items, sum(num) / sum(den): an accuracy is the
mean of 0/1 items (den = 1 per item), bits per byte is sum(nll / ln 2) / sum(bytes) over documents or
chunks. So one percentile bootstrap over items (`bootstrap_ratio`) gives every score's interval, and one
paired bootstrap over the same items (`paired_bootstrap`) every difference's interval and p-value.
Accuracies are also compared with McNemar's exact test on the discordant items (`mcnemar`), and a family
of p-values is corrected with Holm's step-down method (`holm`) or Benjamini-Hochberg (`benjamini_hochberg`).

Resampling is seeded (`seed`), so results.json is the same bytes on a rerun.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

RESAMPLES = 2000  # bootstrap resamples of every interval and paired test in RESULTS.md
LEVEL = 0.95  # two-sided interval level
MIN_ITEMS = 10  # a paired bootstrap over fewer items gives no p-value (p = 1): 2 items moving alike is no evidence
ALPHA = 0.05  # family-wise error rate of the claims' verdicts (Holm over every test the document makes)


# ------------------------------------------------------------------------------------ plain summaries


def better(a: float, b: float, higher_is_better: bool, margin: float = 0.0) -> bool:
    """a is better than b by more than `margin` (NaN is never better)."""
    if math.isnan(a):
        return False
    if math.isnan(b):
        return True
    return a - b > margin if higher_is_better else b - a > margin


def best_of(values: Sequence[float], higher_is_better: bool) -> float:
    """The best value in the task's direction (NaN when there is none)."""
    vals = [v for v in values if not math.isnan(v)]
    if not vals:
        return float("nan")
    return max(vals) if higher_is_better else min(vals)


def mean(values: Sequence[float]) -> float:
    """Mean of the non-NaN values (NaN when there is none)."""
    vals = [v for v in values if not math.isnan(v)]
    return float(statistics.fmean(vals)) if vals else float("nan")


def stdev(values: Sequence[float]) -> float:
    """Sample standard deviation of the non-NaN values (0 for fewer than two)."""
    vals = [v for v in values if not math.isnan(v)]
    return float(statistics.stdev(vals)) if len(vals) > 1 else 0.0


def run_spread(values: Sequence[float]) -> dict[str, float]:
    """{mean, std, min, max} of one score over several runs (e.g. a configuration's seeds)."""
    return {"mean": mean(values), "std": stdev(values), "min": min(values), "max": max(values)}


def pearson(xs: Sequence[float], ys: Sequence[float]) -> float:
    """Pearson correlation (NaN when either side is constant or too short)."""
    if len(xs) < 2:
        return float("nan")
    mx, my = mean(xs), mean(ys)
    sx = math.sqrt(sum((x - mx) ** 2 for x in xs))
    sy = math.sqrt(sum((y - my) ** 2 for y in ys))
    if sx == 0 or sy == 0:
        return float("nan")
    return float(sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / (sx * sy))


# ---------------------------------------------------------------------------------------- bootstrap


def item_columns(result: dict) -> tuple[list[float], list[float]]:
    """(num, den) per test item of one evaluation result (its `items`), so that the score is
    sum(num) / sum(den): bits per byte is nll / ln 2 over bytes, any other metric its 0/1 values over 1."""
    items, primary = result["items"], result["primary"]
    if primary == "bpb":
        return [float(x) / math.log(2) for x in items["nll"]], [float(b) for b in items["bytes"]]
    vals = [float(v) for v in items[primary]]
    return vals, [1.0] * len(vals)


@dataclass(frozen=True)
class Interval:
    """A point estimate with its two-sided percentile bootstrap interval."""

    estimate: float
    low: float
    high: float

    def to_json(self) -> list[float]:
        """[estimate, low, high], as results.json stores it."""
        return [self.estimate, self.low, self.high]


def resample_indices(n: int, resamples: int = RESAMPLES, seed: int = 0) -> np.ndarray:
    """A (resamples, n) array of item indices drawn with replacement (seeded)."""
    if n < 1:
        raise ValueError("cannot resample an empty set of items")
    return np.random.default_rng(seed).integers(0, n, size=(resamples, n))


def _ratio(num: np.ndarray, den: np.ndarray, idx: np.ndarray | None = None) -> np.ndarray | float:
    if idx is None:
        d = den.sum()
        return float(num.sum() / d) if d else float("nan")
    d = den[idx].sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return num[idx].sum(axis=1) / d


def percentile_interval(samples: np.ndarray, level: float = LEVEL) -> tuple[float, float]:
    """The (1 - level) / 2 and (1 + level) / 2 quantiles of bootstrap replicates (NaNs dropped)."""
    s = np.asarray(samples, dtype=np.float64)
    s = s[~np.isnan(s)]
    if not s.size:
        return float("nan"), float("nan")
    lo, hi = np.quantile(s, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


def bootstrap_ratio(num: Sequence[float], den: Sequence[float] | None = None, *, resamples: int = RESAMPLES,
                    level: float = LEVEL, seed: int = 0) -> Interval:
    """sum(num) / sum(den) over items with its percentile bootstrap interval (den = 1 per item: a mean)."""
    n_ = np.asarray(num, dtype=np.float64)
    d_ = np.ones_like(n_) if den is None else np.asarray(den, dtype=np.float64)
    if n_.shape != d_.shape:
        raise ValueError("num and den need one value per item each")
    lo, hi = percentile_interval(_ratio(n_, d_, resample_indices(len(n_), resamples, seed)), level)
    return Interval(_ratio(n_, d_), lo, hi)


def bootstrap_mean(values: Sequence[float], **kw: float) -> Interval:
    """The mean over items with its percentile bootstrap interval."""
    return bootstrap_ratio(values, None, **kw)  # type: ignore[arg-type]


@dataclass(frozen=True)
class PairedTest:
    """A difference a - b of two scores on the same items: its interval and a two-sided p-value."""

    diff: Interval
    p: float
    test: str  # "mcnemar-exact" or "paired-bootstrap"
    n: int  # items
    discordant: tuple[int, int] | None = None  # (a right b wrong, a wrong b right), McNemar only

    def to_json(self) -> dict[str, object]:
        out: dict[str, object] = {"diff": self.diff.to_json(), "p": self.p, "test": self.test, "n": self.n}
        if self.discordant is not None:
            out["discordant"] = list(self.discordant)
        return out


def paired_bootstrap(num_a: Sequence[float], num_b: Sequence[float], den: Sequence[float] | None = None, *,
                     den_b: Sequence[float] | None = None, resamples: int = RESAMPLES, level: float = LEVEL,
                     seed: int = 0, min_items: int = MIN_ITEMS) -> PairedTest:
    """ratio(a) - ratio(b), resampling the same items for both; p is twice the smaller tail mass of the
    replicates on either side of 0 (with the +1 correction, so it is never 0). Below `min_items` items the
    resamples cannot show anything (two documents that both moved the same way give p = 0.001): p = 1 and
    the test is named `paired-bootstrap (too few items)`."""
    a, b = np.asarray(num_a, dtype=np.float64), np.asarray(num_b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError("a paired comparison needs both scores on the same items")
    da = np.ones_like(a) if den is None else np.asarray(den, dtype=np.float64)
    db = da if den_b is None else np.asarray(den_b, dtype=np.float64)
    idx = resample_indices(len(a), resamples, seed)
    reps = _ratio(a, da, idx) - _ratio(b, db, idx)
    lo, hi = percentile_interval(reps, level)
    est = _ratio(a, da) - _ratio(b, db)
    reps = reps[~np.isnan(reps)]
    if len(a) < min_items:
        return PairedTest(Interval(est, lo, hi), 1.0, "paired-bootstrap (too few items)", len(a))
    if not reps.size or np.all(reps == 0):
        p = 1.0
    else:
        tail = min(int((reps <= 0).sum()), int((reps >= 0).sum()))
        p = min(1.0, 2 * (tail + 1) / (reps.size + 1))
    return PairedTest(Interval(est, lo, hi), p, "paired-bootstrap", len(a))


# ----------------------------------------------------------------------------------------- McNemar


def binom_cdf(k: int, n: int, p: float = 0.5) -> float:
    """P(X <= k) for X ~ Binomial(n, p), summed exactly."""
    return float(sum(math.comb(n, i) * p**i * (1 - p) ** (n - i) for i in range(k + 1)))


def mcnemar_exact(b: int, c: int) -> float:
    """McNemar's exact two-sided p-value from the discordant counts b and c: 2 * P(X <= min(b, c)),
    X ~ Binomial(b + c, 1/2), capped at 1 (1 when there is no discordant pair)."""
    n = b + c
    if n == 0:
        return 1.0
    return min(1.0, 2 * binom_cdf(min(b, c), n))


def mcnemar_chi2(b: int, c: int, correction: bool = True) -> tuple[float, float]:
    """McNemar's chi-square statistic (Edwards' continuity correction by default) and its p-value
    (chi-square with 1 degree of freedom: erfc(sqrt(x / 2)))."""
    n = b + c
    if n == 0:
        return 0.0, 1.0
    x = (max(abs(b - c) - 1, 0) if correction else abs(b - c)) ** 2 / n
    return float(x), float(math.erfc(math.sqrt(x / 2)))


def mcnemar(a_correct: Sequence[float], b_correct: Sequence[float], *, resamples: int = RESAMPLES,
            level: float = LEVEL, seed: int = 0) -> PairedTest:
    """Accuracy a - b on the same items: McNemar's exact p-value, the difference's paired bootstrap interval."""
    a = np.asarray(a_correct, dtype=np.float64) > 0.5
    b_ = np.asarray(b_correct, dtype=np.float64) > 0.5
    if a.shape != b_.shape:
        raise ValueError("a paired comparison needs both scores on the same items")
    only_a, only_b = int((a & ~b_).sum()), int((~a & b_).sum())
    boot = paired_bootstrap(a.astype(float), b_.astype(float), resamples=resamples, level=level, seed=seed,
                            min_items=0)
    return PairedTest(boot.diff, mcnemar_exact(only_a, only_b), "mcnemar-exact", len(a), (only_a, only_b))


# ------------------------------------------------------------------------------------- multiplicity


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p-values (family-wise error), in the input order."""
    m = len(pvalues)
    order = sorted(range(m), key=lambda i: pvalues[i])
    out = [0.0] * m
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * pvalues[i]))
        out[i] = running
    return out


def benjamini_hochberg(pvalues: Sequence[float]) -> list[float]:
    """Benjamini-Hochberg adjusted p-values (false discovery rate), in the input order."""
    m = len(pvalues)
    order = sorted(range(m), key=lambda i: pvalues[i], reverse=True)
    out = [0.0] * m
    running = 1.0
    for k, i in enumerate(order):
        rank = m - k
        running = min(running, pvalues[i] * m / rank)
        out[i] = min(1.0, running)
    return out


def verdict(effect: float, p_adjusted: float, alpha: float = ALPHA) -> str:
    """"holds" (significant in the claimed direction: effect > 0), "does not hold" (significant the other
    way), else "inconclusive"."""
    if math.isnan(effect) or math.isnan(p_adjusted) or p_adjusted >= alpha:
        return "inconclusive"
    return "holds" if effect > 0 else "does not hold"


# ------------------------------------------------------------------------------ choosing a grid point


def ranks(values: Sequence[float], higher_is_better: bool) -> list[float]:
    """Rank of each value among `values` (1 = best), ties sharing the mean of their ranks; NaN ranks last
    (all NaNs tied)."""
    n = len(values)
    sign = 1.0 if higher_is_better else -1.0
    key = [(math.inf if math.isnan(v) else -sign * v) for v in values]
    order = sorted(range(n), key=lambda i: key[i])
    out = [0.0] * n
    i = 0
    while i < n:
        j = i
        while j + 1 < n and key[order[j + 1]] == key[order[i]]:
            j += 1
        for k in range(i, j + 1):
            out[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return out


def mean_ranks(scores: Sequence[dict[str, float]], higher_is_better: dict[str, bool]) -> list[float]:
    """Per grid point, the mean over tasks of its rank among all points on that task (`ranks`): the rounds'
    selection rule, free of the tasks' different metrics and scales."""
    if not scores:
        return []
    per_task = [ranks([s[t] for s in scores], hib) for t, hib in higher_is_better.items()]
    return [mean([r[i] for r in per_task]) for i in range(len(scores))]


def choose(scores: Sequence[dict[str, float]], higher_is_better: dict[str, bool]) -> int:
    """Index of the grid point with the lowest mean rank (the first one in grid order on a tie)."""
    mr = mean_ranks(scores, higher_is_better)
    return min(range(len(mr)), key=lambda i: (mr[i], i))
