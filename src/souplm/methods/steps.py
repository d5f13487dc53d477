"""The steps a `Form` is made of (methods/form.py), stated in torch: what the C kernels do in one pass.

Each step works in place on the fresh fp32 copies the engine hands a method, on pooled buffers
(io/pool.py): fresh pages for every tensor cost about as much as the arithmetic. The DARE draw stream is
counter-based: entry j of a tensor gets 16 bits of the SplitMix64 output for counter j // 4 (four entries
per 64-bit word), under a key hashed from (seed, tensor name, model index). Any entry's draw can be
computed on its own, so a merge is reproducible, independent of the order in which tensors are processed,
and identical between this statement and the kernels, which split a tensor across threads. The keep
probability is density rounded to a multiple of 2**-16, and survivors are rescaled by the inverse of that
exact probability, so the merge stays unbiased.
"""

from __future__ import annotations

import hashlib
import os
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

import numpy as np

from ..io import pool
from .registry import broadcast

if TYPE_CHECKING:
    import torch


def round_to(values: np.ndarray, code: str) -> np.ndarray:
    """float32 values rounded to the compute dtype `code` ("F32", "BF16", "F16") and back, to nearest even."""
    v = np.ascontiguousarray(values, dtype=np.float32)
    if code == "F16":
        return v.astype(np.float16).astype(np.float32)
    if code == "BF16":
        bits = v.view(np.uint32)
        rounded = (bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))) & np.uint32(0xFFFF0000)
        return np.where(np.isfinite(v), rounded.view(np.float32), v).astype(np.float32)
    return v


def rounder(code: str):
    """In-place rounding of an fp32 torch tensor to the compute dtype and back (None for float32): what a
    torch op in bfloat16 or float16 does to its result."""
    if code == "F32":
        return None
    import torch

    low = torch.bfloat16 if code == "BF16" else torch.float16

    def rnd(t):
        return t.copy_(t.to(low))

    return rnd


def task_vectors(tensors, base, rnd=None):
    """theta_i - base, in place: the engine hands each method fresh copies it may overwrite. `rnd`: the
    inputs and each difference rounded to the compute dtype."""
    if rnd is None:
        return [t.sub_(base) for t in tensors]
    rnd(base)
    return [rnd(rnd(t).sub_(base)) for t in tensors]


def add_to_base(merged, base, lam, rnd=None):
    """base + lam * merged, written into `merged` (the method's own buffer): no fresh temporaries."""
    if lam != 1.0:
        merged.mul_(lam)
        if rnd is not None:
            rnd(merged)
    merged.add_(base)
    return merged if rnd is None else rnd(merged)


def weighted_sum(tensors: list[torch.Tensor], weight: torch.Tensor, rnd=None) -> torch.Tensor:
    """sum_i weight_i * tensors_i, with weight [N] or [N, rows]; accumulates in place, into tensors[0]
    (the engine hands methods fresh copies they may overwrite): no new buffer of the tensor's size.
    `rnd`: each product rounded to the compute dtype, then the float32 sum once (a torch sum over models)."""
    if rnd is not None:
        w = broadcast(weight, tensors[0])
        out = rnd(tensors[0].mul_(w[0]))
        for t, wi in zip(tensors[1:], w[1:]):
            out.add_(rnd(t.mul_(wi)))
        return rnd(out)
    # Each product rounded, then added (as the kernels do): torch's add with alpha and addcmul may fuse the
    # multiply-add into one rounding, and the two executors would differ in the last bit.
    if weight.dim() == 1:  # the common case: scalars, no stacked copy of the inputs
        out = tensors[0].mul_(float(weight[0]))
        for t, w in zip(tensors[1:], weight[1:].tolist()):
            out.add_(t.mul_(w))
        return out
    w = broadcast(weight, tensors[0])
    out = tensors[0].mul_(w[0])
    for t, wi in zip(tensors[1:], w[1:]):
        out.add_(t.mul_(wi))
    return out


def kth_largest(mag: torch.Tensor, k: int) -> torch.Tensor:
    """Exact k-th largest entry of a non-negative tensor, in O(n) with a few vectorised passes.

    A strided sample brackets the answer in [lo, hi]; counting the entries above hi tells which rank
    to select inside the thin band [lo, hi], where `kthvalue` runs on a small fraction of the data.
    The count proves the bracket right; if the sample misled us, a full `kthvalue` answers instead.
    About twice as fast as `kthvalue` on the whole tensor, which is most of TIES's time.
    """
    import torch

    flat = mag.reshape(-1)
    n = flat.numel()
    if n <= 65536:
        return flat.kthvalue(n - k + 1).values
    sample = flat[:: n // 32768].sort().values
    m = sample.numel()
    pos = (n - k) / (n - 1) * (m - 1)  # where the k-th largest sits in the sorted sample
    slack = 4 * m**0.5  # a few standard deviations of a sample quantile's rank error
    lo_i, hi_i = max(int(pos - slack), 0), min(int(pos + slack) + 1, m - 1)
    lo = sample[lo_i] if lo_i > 0 else flat.new_zeros(())
    hi = sample[hi_i] if hi_i < m - 1 else flat.max()
    # Two pooled masks instead of four fresh ones (each fresh full-size mask is a round of page faults).
    over = torch.gt(flat, hi, out=pool.empty((n,), torch.bool))
    above = int(torch.count_nonzero(over))  # (a bool tensor's sum() is ~30x slower: it widens to int64)
    inside = torch.ge(flat, lo, out=pool.empty((n,), torch.bool)).logical_and_(over.logical_not_())
    band = flat[inside]  # lo <= |d| <= hi (magnitudes are finite: inputs are checked)
    pool.release(over)
    pool.release(inside)
    need = k - above  # rank of the answer inside the band, counted from its top
    if not 1 <= need <= band.numel():
        return flat.kthvalue(n - k + 1).values
    return band.kthvalue(band.numel() - need + 1).values


_KEY_DTYPES = {"torch.float32": (0, "int32"), "torch.float16": (1, "int16"), "torch.bfloat16": (2, "int16")}


def order_statistics(x: torch.Tensor, ranks: list[int]) -> list[torch.Tensor]:
    """sorted(x.flatten())[r] for each 0-based rank r, exactly, as 0-d tensors of x's dtype. On the CPU with
    the C extension: a radix select over the values' float bits made monotone (signed values allowed), the
    top 16 bits of every entry counted in one pass (all of a bfloat16's bits) and, for fp16 and fp32, the
    low 16 bits of the chosen bins in one more per two bins, with no copy of x; elsewhere torch's `kthvalue`."""
    import torch

    flat = x.reshape(-1)
    n = flat.numel()
    codes = _KEY_DTYPES.get(str(flat.dtype))
    try:
        from .. import _kernels
    except ImportError:
        _kernels = None
    if _kernels is None or codes is None or flat.device.type != "cpu" or n >= 1 << 32 or n <= 4096:
        return [flat.kthvalue(r + 1).values for r in ranks]
    from .program import across_torch_threads

    code, view = codes
    data = flat.contiguous().view(getattr(torch, view)).numpy()

    def histogram(prefix: int, prefix2: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        def part(lo: int, hi: int) -> tuple[np.ndarray, np.ndarray]:
            h1, h2 = np.zeros(65536, np.uint32), np.zeros(65536, np.uint32)
            _kernels.abs_delta_histogram(data, code, None, 0, lo, hi, h1, prefix, signed=True,
                                         hist2=h2 if prefix2 is not None else None, prefix2=prefix2 or 0)
            return h1, h2
        parts = across_torch_threads(part, n, 1)  # (the kernel lets go of the GIL)
        return sum(p[0] for p in parts), sum(p[1] for p in parts)

    ascending = np.cumsum(histogram(-1)[0], dtype=np.int64)  # entries in bins <= b
    bins = [int(np.searchsorted(ascending, r, side="right")) for r in ranks]
    lows: dict[int, np.ndarray] = {}
    wanted = sorted(set(bins)) if code != 2 else []  # a bfloat16 value is its top 16 bits: one pass decides
    for i in range(0, len(wanted), 2):  # the low bits of two bins per pass
        pair = wanted[i: i + 2]
        h1, h2 = histogram(pair[0], pair[1] if len(pair) > 1 else None)
        lows[pair[0]] = h1
        if len(pair) > 1:
            lows[pair[1]] = h2
    out = []
    for r, b in zip(ranks, bins):
        below = int(ascending[b - 1]) if b else 0
        if b in lows:
            low = int(np.searchsorted(np.cumsum(lows[b], dtype=np.int64), r - below, side="right"))
        else:  # bfloat16: the low bits of its float32 bits are 0, so those of the key 0 or (negative) all ones
            low = 0 if b & 0x8000 else 0xFFFF
        key = np.uint32((b << 16) | low)
        bits = key ^ np.uint32(0x80000000) if key & np.uint32(0x80000000) else ~key
        out.append(torch.tensor(float(np.array([bits], np.uint32).view(np.float32)[0]), dtype=flat.dtype))
    return out


def recipe_decimal(value: float) -> float:
    """The decimal a recipe wrote, from the float32 copy the plan holds (0.01 stays 0.01, not 0.0099999998):
    counts such as int(density * n) must see the recipe's number, as mergekit (float64) does."""
    return float(str(np.float32(value)))


def trim_count(density: float, n: int) -> int:
    """How many entries TIES's trim keeps: k = int(density * n), at least one (mergekit's count, on the
    recipe's decimal: density 0.01 of 1000 entries keeps 10, where its float32 copy would keep 9)."""
    density = recipe_decimal(density)
    if density >= 1.0:
        return n
    return 0 if density <= 0.0 or n == 0 else max(1, int(density * n))


def trim_window(n: int, density: float, outliers: float | None = None) -> tuple[int, int]:
    """[lo, hi): the ascending-magnitude ranks a magnitude trim keeps out of n entries.

    outliers None (TIES): the k = trim_count(density, n) largest, [n - k, n). A fraction `outliers`
    (breadcrumbs' gamma; mergekit's magnitude_outliers count): keep = int(density n) entries below the
    top = int(outliers n) largest, [n - keep - top, n - top), the outlier cut shrinking where keep + top > n;
    density >= 1 keeps everything (the outliers too)."""
    if outliers is None:
        return n - trim_count(density, n), n
    if density >= 1.0:
        return 0, n
    keep, top = int(recipe_decimal(density) * n), int(recipe_decimal(outliers) * n)
    lo = max(0, n - keep - top)
    return lo, lo + keep


def window_mask(mag: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    """Boolean mask (flat) of the entries whose ascending rank in `mag` (>= 0) lies in [lo, hi): exactly
    hi - lo of them. The cuts are the values of ranks lo and hi - 1, each found by selection (`kth_largest`,
    O(n)); of the entries tied at a cut, a lower index ranks as the larger (the top k of a tensor keep the
    first ties in index order; mergekit's sorts order ties in no reproducible way)."""
    import torch

    n = mag.numel()
    flat = mag.reshape(-1)
    if hi <= lo:
        return torch.zeros(n, dtype=torch.bool, device=mag.device)
    if lo <= 0 and hi >= n:
        return torch.ones(n, dtype=torch.bool, device=mag.device)
    v_lo = kth_largest(flat, n - lo) if lo > 0 else None
    v_hi = kth_largest(flat, n - hi + 1) if hi < n else None
    keep = torch.ones(n, dtype=torch.bool, device=mag.device) if v_lo is None else torch.ge(flat, v_lo)
    if v_hi is not None:
        keep.logical_and_(torch.le(flat, v_hi))
    if int(torch.count_nonzero(keep)) == hi - lo:  # no ties straddle a cut (the common case in fp32)
        return keep
    if v_lo is not None:
        keep.logical_and_(torch.gt(flat, v_lo))
    if v_hi is not None:
        keep.logical_and_(torch.lt(flat, v_hi))
    cuts = [v for v in (v_lo, v_hi) if v is not None]
    if len(cuts) == 2 and bool(cuts[0] == cuts[1]):
        cuts = cuts[:1]
    for v in cuts:
        tied = torch.nonzero(flat == v).reshape(-1).flip(0)  # in ascending rank: descending index
        below = int(torch.count_nonzero(flat < v))
        # the tied block holds ranks below .. below + len - 1; keep the part inside [lo, hi)
        first, last = max(lo - below, 0), min(hi - below, tied.numel())
        if last > first:
            keep[tied[first:last]] = True
    return keep


def trim_to_window(delta: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    """Zero the entries of `delta` whose ascending-magnitude rank is outside [lo, hi), in place."""
    import torch

    n = delta.numel()
    if lo <= 0 and hi >= n:
        return delta
    if hi <= lo:
        return delta.zero_()
    mag = torch.abs(delta, out=pool.empty_like(delta))
    keep = window_mask(mag, lo, hi)
    pool.release(mag)
    return delta.mul_(keep.view(delta.shape))


def trim_to_density(delta: torch.Tensor, density: float) -> torch.Tensor:
    """Zero all but the k = trim_count(density) entries of largest magnitude, in place (TIES).

    A k-th value threshold (selection, O(n)) replaces a full sort; of the entries tied with the threshold,
    the first in index order are kept, so exactly k survive (mergekit keeps k too, choosing among ties by
    its sort's order, which no one can reproduce).
    """
    return trim_to_window(delta, *trim_window(delta.numel(), density))


def trim_windows(deltas: list[torch.Tensor], windows: list[tuple[int, int]]) -> list[torch.Tensor]:
    """Trim every task vector to its window, one thread per model: `kthvalue` runs on one core and releases
    the GIL, so on a multi-core machine the models' selections run side by side."""
    if len(deltas) == 1 or all(lo <= 0 and hi >= d.numel() for d, (lo, hi) in zip(deltas, windows)):
        return [trim_to_window(d, lo, hi) for d, (lo, hi) in zip(deltas, windows)]
    with ThreadPoolExecutor(max_workers=min(len(deltas), os.cpu_count() or 1)) as workers:
        return list(workers.map(pool.in_this_scope(lambda d, w: trim_to_window(d, *w)), deltas, windows))


def trim_all(deltas: list[torch.Tensor], density) -> list[torch.Tensor]:
    """TIES's trim of every task vector (per-model densities)."""
    return trim_windows(deltas, [trim_window(d.numel(), float(p)) for d, p in zip(deltas, density)])


def elect_and_merge(deltas: list[torch.Tensor], weight: torch.Tensor, normalize: bool, rnd=None) -> torch.Tensor:
    """Sign election and disjoint (weighted) mean of task vectors (consumed: overwritten in place).

    sign = +1 where sum_i w_i d_i >= 0, else -1; model i agrees at an entry when w_i d_i has that sign (and != 0);
    the result is sum over agreeing i of w_i d_i, divided by the agreeing weight mass when normalizing.
    Written as running sums over a few reused buffers: no [N, ...] stack, no temporary per model.
    """
    import torch

    w = broadcast(weight, deltas[0])
    if rnd is not None:  # in a low-precision compute dtype: each product, then the sums, rounded
        products = [rnd(d.mul_(wi)) for d, wi in zip(deltas, w)]
        total = torch.stack(products).sum(dim=0)
        sign = torch.where(total >= 0, 1.0, -1.0)
        agree = [(p.sign() == sign) & (p != 0) for p in products]
        merged = rnd(sum(torch.where(a, p, 0.0) for a, p in zip(agree, products)))
        if not normalize:
            return merged
        mass = rnd(sum(torch.where(a, wi, 0.0) for a, wi in zip(agree, w)))
        return rnd(torch.where(mass != 0, merged / torch.where(mass != 0, mass, 1.0), 0.0))
    for d, wi in zip(deltas, w):  # the products w_i d_i, each rounded (then summed, as the kernels do)
        d.mul_(wi)
    sign = torch.add(deltas[0], deltas[1], out=pool.empty_like(deltas[0])) if len(deltas) > 1 else \
        pool.empty_like(deltas[0]).copy_(deltas[0])
    for d in deltas[2:]:
        sign.add_(d)
    sign.ge_(0.0).mul_(2.0).sub_(1.0)  # +1 where the weighted sum is >= 0 (zero included), else -1: mergekit's rule
    mass = pool.empty_like(sign) if normalize else None
    merged = deltas[0]  # the running sum lives in the first task vector's storage: one buffer fewer
    for i, (d, wi) in enumerate(zip(deltas, w)):
        # |w_i d_i| where w_i d_i has the elected sign, else 0: "agrees" without a mask buffer. Times
        # sign it is w_i d_i again (exactly: sign is +-1) or 0; its sign() is the 0/1 agreement.
        d.mul_(sign).clamp_(min=0.0)
        if i == 0:
            if mass is not None:
                torch.sign(d, out=mass).mul_(wi)
            merged.mul_(sign)
        else:
            merged.addcmul_(d, sign)
            if mass is not None:
                mass.addcmul_(d.sign_(), wi)
    if mass is not None:
        w_min = float(w.min())
        if w_min > 0:
            # Where a model agrees, mass >= w_min; below it are only the entries none agrees on (mass
            # 0, merged 0), so lifting those to w_min / 2 divides 0 by a non-zero number. Exact, and ~20x
            # faster than masked_fill_ with a boolean mask.
            merged.div_(mass.clamp_(min=0.5 * w_min))
        else:  # weights of both signs can cancel: entries of zero agreeing mass become 0
            zero = mass == 0
            merged.div_(mass.masked_fill_(zero, 1.0)).masked_fill_(zero, 0.0)
    return merged



DRAW_BITS = 16
LEVELS = 1 << DRAW_BITS
# SplitMix64 (Steele, Lea and Flood 2014): the state advances by GAMMA, the output mixes it.
GAMMA, MIX1, MIX2 = 0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB
_U64 = (1 << 64) - 1


def draw_key(seed: int, canonical: str, model_index: int) -> int:
    """The 64-bit key of one model's draws for one tensor."""
    h = hashlib.sha256(f"{seed}|{canonical}|{model_index}".encode()).digest()
    return int.from_bytes(h[:8], "little")


def draw_keys(seed: int, canonical: str, n_models: int) -> list[int]:
    """One key per model, from (seed, tensor, model index): order-independent and reproducible."""
    return [draw_key(seed, canonical, i) for i in range(n_models)]


def keep_level(density: float) -> int:
    """An entry survives when its 16-bit draw is below this level: density rounded to a multiple of
    2**-16, never 0 for density > 0 (0 for density <= 0, all of them from density 1 on)."""
    return 0 if density <= 0.0 else min(LEVELS, max(1, round(density * LEVELS)))


def survivor_scale(level: int) -> float:
    """What a surviving entry is multiplied by: the inverse of its exact keep probability."""
    return LEVELS / level if level else 1.0


def _signed(x: int) -> int:
    """A uint64 as the int64 with the same bits (torch has no full uint64 arithmetic)."""
    x &= _U64
    return x - (1 << 64) if x >> 63 else x


def draws(key: int, n: int, device=None):
    """The 16-bit draws of entries 0..n-1 under `key`, as an int32 tensor of values in [0, 65536) (on `device`)."""
    import torch

    def shr(z, s):  # logical shift right of int64 bits
        return (z >> s) & ((1 << (64 - s)) - 1)

    # int64 products wrap around like uint64 ones: the bits are SplitMix64's.
    z = torch.arange(1, (n + 3) // 4 + 1, dtype=torch.int64, device=device).mul_(_signed(GAMMA)).add_(_signed(key))
    z = (z ^ shr(z, 30)).mul_(_signed(MIX1))
    z = (z ^ shr(z, 27)).mul_(_signed(MIX2))
    z ^= shr(z, 31)
    return z.view(torch.int16)[:n].to(torch.int32).bitwise_and_(0xFFFF)  # little-endian: lane j % 4


def drop_and_rescale(delta: torch.Tensor, density: float, key: int, rescale: str | None = "inverse",
                     rnd=None, compute: str = "F32") -> torch.Tensor:
    """Zero each entry whose draw is not below the keep level, in place; then rescale the survivors:
    `inverse` by 1/q, q the exact keep probability (unbiased entry by entry, the DARE paper's rule); `l1` by
    sum|delta| / sum|survivors| (the tensor keeps its L1 norm, mergekit's rule; unchanged when either sum is
    below 1e-7); None not at all. `rnd`/`compute`: the rescaled values rounded to the compute dtype."""
    if density >= 1.0:
        return delta
    if density <= 0.0:
        return delta.zero_()
    import torch

    level = keep_level(density)
    keep = draws(key, delta.numel(), delta.device).lt_(level).view(delta.shape)
    before = float(delta.abs().sum(dtype=torch.float64)) if rescale == "l1" else 0.0
    delta.mul_(keep)
    if rescale == "inverse":
        delta.mul_(survivor_scale(level))
    elif rescale == "l1":
        delta.mul_(l1_scale(before, float(delta.abs().sum(dtype=torch.float64)), compute))
    return delta if rnd is None or rescale is None else rnd(delta)


def random_dtype(compute: str) -> str:
    """The dtype DELLA's ramp and rescale run in: mergekit's random sparsifications work in bfloat16 for
    bfloat16 tensors and in float32 otherwise (float16 included) on the CPU, rounding to the tensor's dtype last."""
    return "BF16" if compute == "BF16" else "F32"


def ramp_levels(m: int, density: float, epsilon: float, work: str = "F32") -> np.ndarray:
    """DELLA's keep levels by magnitude rank within a row of m entries (uint32 [m], x 2**-16 = probability).

    Rank r (0 = smallest) gets p = (density - epsilon) + 2 epsilon (r / (m - 1)), computed as mergekit
    computes it: ranks + 1, normalised by (rank - min) / (max - min), times 2, times epsilon, plus
    (density - epsilon), each step rounded to the work dtype (`random_dtype`); then the level round(p 2**16),
    so that a 16-bit draw below it keeps the entry. A row of one entry keeps it with p = density (mergekit
    divides 0 by 0 there)."""
    f32 = np.float32
    if m == 1:
        p = np.array([density])
    else:
        ranks = round_to(round_to(np.arange(m, dtype=f32), work) + f32(1), work)
        lo, hi = ranks.min(), ranks.max()
        norm = round_to(round_to(ranks - lo, work) / round_to(np.array([hi - lo], f32), work), work).clip(0, 1)
        p = round_to(round_to(norm * f32(2), work) * f32(epsilon), work)
        p = round_to(f32(density - epsilon) + p, work)
    return np.clip(np.rint(p.astype(np.float64) * LEVELS), 0, LEVELS).astype(np.uint32)


def row_view(shape: tuple[int, ...]) -> tuple[int, int, int]:
    """A tensor as [outer, m, inner] for DELLA's per-row ranks: mergekit ranks along dim 1 (a 1-D tensor is
    one row)."""
    if len(shape) < 2:
        return 1, int(np.prod(shape, dtype=np.int64)), 1
    return int(shape[0]), int(shape[1]), int(np.prod(shape[2:], dtype=np.int64))


def magprune(delta: torch.Tensor, density: float, epsilon: float, key: int, rescale: bool, rnd=None,
             compute: str = "F32") -> torch.Tensor:
    """DELLA's drop, in place: keep entry j when its draw (`draws`, the DARE stream) is below
    ramp_levels[rank of |delta_j| in its row] (ranks ascending, ties in index order); with `rescale` the
    survivors are scaled to the tensor's L1 norm (`l1_scale`, in the work dtype), rounded to the compute dtype."""
    if density >= 1.0:
        return delta
    if density <= 0.0:
        return delta.zero_()
    import torch

    work = random_dtype(compute)
    outer, m, inner = row_view(tuple(delta.shape))
    rows = delta.abs().view(outer, m, inner).transpose(1, 2)  # [outer, inner, m]
    order = torch.argsort(rows, dim=-1, stable=True)
    levels = torch.from_numpy(ramp_levels(m, density, epsilon, work).astype(np.int32)).to(delta.device)
    lev = torch.empty(order.shape, dtype=torch.int32, device=delta.device)
    lev.scatter_(-1, order, levels.expand(order.shape))
    lev = lev.transpose(1, 2).reshape(delta.shape)
    keep = draws(key, delta.numel(), delta.device).view(delta.shape).lt_(lev)
    before = float(delta.abs().sum(dtype=torch.float64)) if rescale else 0.0
    delta.mul_(keep)
    if not rescale:
        return delta
    delta.mul_(l1_scale(before, float(delta.abs().sum(dtype=torch.float64)), work))
    return delta if rnd is None else rnd(delta)


def rescale_trimmed(delta: torch.Tensor, before: float, rnd=None, compute: str = "F32") -> torch.Tensor:
    """A trimmed task vector scaled back to its L1 norm `before` (breadcrumbs' `rescale`), in place."""
    import torch

    delta.mul_(l1_scale(before, float(delta.abs().sum(dtype=torch.float64)), compute))
    return delta if rnd is None else rnd(delta)


def l1_scale(before: float, after: float, compute: str = "F32") -> float:
    """The factor that gives a dropped tensor back its L1 norm (1 when either norm is below 1e-7); the norms
    and their quotient rounded to the compute dtype, as a torch sum and division in it round them."""
    b, a = (float(v) for v in round_to(np.array([before, after]), compute))
    return 1.0 if b < 1e-7 or a < 1e-7 else float(round_to(np.array([b / a]), compute)[0])


GRAM_CHUNK = 1 << 20


def gram_kernel(xs: list, codes: list[int], base, base_code: int, n: int, map_fn=map) -> np.ndarray:
    """G[i, j] = <x_i - base, x_j - base> (or <x_i, x_j>) over n entries of stored bytes, by the C kernel:
    float64 products and sums, in fixed chunks of 2**20 entries (`map_fn` may run them in threads) added in
    order, so any executor and any thread count give the same matrix."""
    from .. import _kernels

    m = len(xs)
    parts = map_fn(lambda lo: _kernels.gram(xs, codes, base, base_code, lo, min(n, lo + GRAM_CHUNK)),
                   range(0, n, GRAM_CHUNK))
    g = np.zeros((m, m), np.float64)
    for part in parts:
        g += np.asarray(part, np.float64).reshape(m, m)
    return g


def gram(tensors: list[torch.Tensor]) -> np.ndarray:
    """The Gram matrix of fp32 torch tensors (moved to the host when they live on a device): the kernel's
    when the C extension is built (so both executors agree to the bit), else the same float64 products and
    sums in NumPy, chunk by chunk."""
    flat = [t.detach().reshape(-1).cpu().numpy() for t in tensors]
    try:
        from .. import _kernels  # noqa: F401
    except ImportError:
        g = np.zeros((len(flat), len(flat)), np.float64)
        for lo in range(0, flat[0].size, GRAM_CHUNK):
            chunk = np.stack([x[lo: lo + GRAM_CHUNK] for x in flat]).astype(np.float64)
            g += chunk @ chunk.T
        return g
    return gram_kernel(flat, [0] * len(flat), None, 0, flat[0].size)


