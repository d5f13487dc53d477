"""The fused CPU executor: a plan's tensors computed by one-pass C kernels (`souplm._kernels`), without torch.

The engine has two executors for the same plan, and both run each method's one statement, its `Form`
(methods/form.py) or its `Program` (methods/program.py: passes of entrywise operations, interpreted by one
C kernel over blocks that stay in L1). This one runs every method stated as either: a weighted combination of (optionally
trimmed or randomly dropped) task vectors, with TIES's sign election or without, and weights that may come
from the tensors' Gram matrix (SLERP). It sees the stored bytes (bf16, fp16 or fp32) in place in the mapped
input files (`MAP_INPUTS`) and computes each output element in a single pass that converts, subtracts the base, masks, weighs, elects the sign,
divides, adds the base, rounds to the output dtype and checks the inputs for NaN/Inf, split across the
CPU's cores. What a step needs from the whole tensor comes from passes before it: the trim's cuts (a radix
select over the float bits, two passes for one or two cuts: TIES, breadcrumbs), DARE's L1 norms, DELLA's
keep masks (a pass per task vector that radix-sorts each row's magnitudes), the Gram matrix. Merging with it
never imports torch.

The kernels state the Form's steps in fp32 with the same operation order as the torch statement
(methods/steps.py); tests hold them to each other and to NumPy references. DARE draws its random bits
from the same counter-based stream in both. `engine.merge` picks this executor when nothing blocks it
(`fused_blocker`: the kernels are built and cover every tensor); `SOUPLM_EXECUTOR=torch` forces the other.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import queue
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from ..errors import SoupError, input_not_finite
from ..errors import output_not_finite as _output_not_finite
from ..io.checkpoint import Checkpoint
from ..io.dtypes import DType
from ..methods.form import Form
from ..methods.program import (  # MIN_SPLIT, SPLIT_UNIT: module attributes here too (the tests shrink them)
    COMPUTE_CODES,
    MIN_SPLIT,
    SPLIT_UNIT,
    Program,
    kernel_sweep,
    split_ranges,
)
from ..methods.steps import (
    draw_keys,
    gram_kernel,
    keep_level,
    l1_scale,
    ramp_levels,
    random_dtype,
    round_to,
    row_view,
    survivor_scale,
    trim_window,
)
from .in_flight import IN_FLIGHT, in_order
from .plan import Item, Plan
from .precision import compute_dtype

try:
    from .. import _kernels
except ImportError:  # the extension is optional: without a C compiler the torch executor does everything
    _kernels = None

KERNEL_DTYPES = COMPUTE_CODES  # the kernels' dtype codes, by the plan's dtype code
SUM, ELECT = 0, 1


def fused_blocker(plan: Plan) -> str | None:
    """Why this executor cannot run the whole plan (the engine then uses torch), or None when it can."""
    if _kernels is None:
        return "the C kernels are not built (souplm._kernels)"
    if os.environ.get("SOUPLM_EXECUTOR", "").lower() == "torch":
        return "SOUPLM_EXECUTOR=torch"
    if plan.method.form is None:
        return f"method {plan.method.name} is stated in torch, not as a Form or a Program"
    if not all(isinstance(c, Checkpoint) and c.is_safetensors for c in plan.checkpoints):
        return "an input is not a plain safetensors checkpoint (pickled, mapped, or re-indexed to a merged vocabulary)"
    for item in plan.items:
        if item.copy_from is not None:
            continue
        names = list(zip(item.sources, item.inputs))
        if item.base is not None:
            names.append((item.base_from, item.base))
        if item.extra_from is not None:
            names.append(item.extra_from)
        codes = {plan.checkpoints[k].dtype(n).code for k, n in names} | {item.dtype.code}
        if not codes <= KERNEL_DTYPES.keys():
            return f"tensor {item.out_name} has dtype {min(codes - KERNEL_DTYPES.keys())}"
    return None


# -- byte buffers -----------------------------------------------------------------------------------
class Buffers:
    """Reusable byte buffers, best fit; the same few sizes come back layer after layer, and a fresh
    buffer costs a round of page faults (the same reasoning as `io.pool` for the torch executor). Inputs
    are seen in place in the mapped files where they can be (`MAP_INPUTS`): given back, their pages leave
    the resident set."""

    def __init__(self) -> None:
        self._free: list[np.ndarray] = []
        self._mapped: dict[int, tuple[np.ndarray, Callable[[], None]]] = {}
        self._lock = threading.Lock()

    def mapped(self, view: np.ndarray, release: Callable[[], None]) -> np.ndarray:
        """Hold a mapped view until it is given back, then `release()` it."""
        with self._lock:
            self._mapped[id(view)] = (view, release)
        return view

    def take(self, nbytes: int) -> np.ndarray:
        with self._lock:
            fits = [i for i, b in enumerate(self._free) if b.size >= nbytes]
            if fits:
                buf = self._free.pop(min(fits, key=lambda i: self._free[i].size))
                return buf[:nbytes] if buf.size > nbytes else buf
        return np.empty(max(nbytes, 1), dtype=np.uint8)[:nbytes]

    def give(self, buf: np.ndarray) -> None:
        with self._lock:
            held = self._mapped.pop(id(buf), None)
            if held is None:
                self._free.append(buf.base if buf.base is not None else buf)
        if held is not None:
            held[1]()


@dataclass
class Tensor:
    """The stored bytes of one input tensor and their dtype."""

    data: np.ndarray
    dtype: DType

    @property
    def code(self) -> int:
        """The kernels' code for the dtype."""
        return KERNEL_DTYPES[self.dtype.code]


# Inputs are seen in place in the mapped files (no copy, no fresh pages: on some VMs first-touching fresh
# memory costs more CPU than the merge itself); SOUPLM_MAP_INPUTS=0 reads them into buffers instead.
MAP_INPUTS = os.environ.get("SOUPLM_MAP_INPUTS", "1") != "0"


def _read_bytes(buffers: Buffers, ck: Checkpoint, name: str) -> np.ndarray:
    if MAP_INPUTS:
        view = ck.mapped_bytes(name, prefetch=True)
        if view is not None:
            return buffers.mapped(view, lambda: ck.unmap_bytes(name))
    buf = buffers.take(ck.nbytes(name))
    ck.read_bytes_into(name, memoryview(buf))
    return buf


def _read(buffers: Buffers, ck: Checkpoint, name: str) -> Tensor:
    return Tensor(_read_bytes(buffers, ck, name), ck.dtype(name))


def _load(plan: Plan, buffers: Buffers, item: Item) -> list[Tensor] | None:
    """The item's inputs (models in order, then the base, then the extra-rows source)."""
    if item.copy_from is not None:
        return None
    ck = plan.checkpoints
    out = [_read(buffers, ck[k], n) for k, n in zip(item.sources, item.inputs)]
    if item.base is not None:
        out.append(_read(buffers, ck[item.base_from], item.base))
    if item.extra_from is not None:
        out.append(_read(buffers, ck[item.extra_from[0]], item.extra_from[1]))
    return out


# -- one item -------------------------------------------------------------------------------------------
def _ranges(n: int, parts: int, unit: int = 1) -> list[tuple[int, int]]:
    """[0, n) in up to `parts` ranges (program.split_ranges), none below MIN_SPLIT elements unless there is one."""
    return split_ranges(n, parts, unit, MIN_SPLIT)


def _head(t: Tensor, numel: int) -> np.ndarray:
    """The first `numel` elements of a tensor's bytes (the rows all models share)."""
    return t.data[: numel * t.dtype.itemsize]


def _f32(values) -> bytes:
    return np.ascontiguousarray(values, dtype=np.float32).tobytes()


class Executor:
    """Runs plan items on the kernels with a fixed pool of worker threads (the kernels release the GIL)."""

    def __init__(self, plan: Plan, threads: int | None = None):
        self.plan = plan
        self.threads = threads or os.cpu_count() or 1
        self.workers = ThreadPoolExecutor(max_workers=self.threads, thread_name_prefix="souplm-fused")
        # Two 65536-bin histograms per thread, reused: a trim asks for two or three per model and tensor.
        self._hists = [np.zeros(1 << 16, dtype=np.uint32) for _ in range(self.threads)]
        self._hists2 = [np.zeros(1 << 16, dtype=np.uint32) for _ in range(self.threads)]
        self._masks: list[np.ndarray] = []  # DELLA's per-model keep masks, reused (the largest tensor's size)

    def close(self) -> None:
        self.workers.shutdown()

    def _parallel(self, fn, n: int, unit: int = 1) -> list:
        """fn(start, stop) over [0, n) split across the threads (`_ranges`)."""
        ranges = _ranges(n, self.threads, unit)
        if len(ranges) <= 1:
            return [fn(*r) for r in ranges]
        return list(self.workers.map(lambda r: fn(*r), ranges))

    def compute(self, item: Item, inputs: list[Tensor], out: np.ndarray) -> None:
        plan, method = self.plan, self.plan.method
        n_models = len(item.inputs)
        models = inputs[:n_models]
        base = inputs[n_models] if item.base is not None else None
        numel = 1
        for d in item.shape:
            numel *= d
        rows = item.common_rows if item.common_rows is not None else (item.shape[0] if item.shape else 1)
        row_len = numel // item.shape[0] if item.shape and item.shape[0] else max(numel, 1)
        merged = rows * row_len if item.shape else numel
        out_code = KERNEL_DTYPES[item.dtype.code]
        out_view = out[: merged * item.dtype.itemsize]
        xs = [_head(t, merged) for t in models]
        b = _head(base, merged) if base is not None else None

        form = method.form_for(n_models, {**item.model_params, **item.global_params}, has_base=base is not None)
        if isinstance(form, Program):
            self._program(item, form, [*xs, *([b] if b is not None else [])],
                          [t.code for t in (*models, *([base] if base is not None else []))], out_view, out_code,
                          row_len, merged)
            self._extra_rows(item, inputs, out, merged, numel)
            return
        weight = form.weight
        if form.reweigh is not None:  # the Form's terms' Gram matrix: x_i, or x_i - base
            gb, gc = (b, base.code) if form.use_base else (None, 0)
            gram = gram_kernel(xs, [t.code for t in models], gb, gc, merged, self.workers.map)
            # float64 sums of finite stored values cannot overflow: a non-finite entry means an input holds
            # NaN or Inf, which the combining pass below names (any weights do for that)
            weight = form.reweigh(gram) if np.isfinite(gram).all() else np.ones(n_models)
        weight = weight[:, :rows] if weight.ndim == 2 else weight
        cc = compute_dtype(plan, item)  # what each step rounds to (engine/precision.py)
        ccode = KERNEL_DTYPES[cc]
        weight = round_to(weight, cc)  # (mergekit holds the weights in the compute dtype too)
        base_arg, base_code = (b, base.code) if form.use_base else (None, 0)
        masks = None
        if form.drop is not None and form.ramp is not None:  # DELLA: a pass that ranks rows and draws the masks
            shape = (rows, *item.shape[1:]) if item.shape else (merged,)
            masks, scales = self._magprune(form, xs, [t.code for t in models], base_arg, base_code, shape, cc,
                                           draw_keys(plan.recipe.seed, item.canonical, n_models))
            dare = (None, None, _f32(scales))
        else:
            dare = _dare_args(form, plan.recipe.seed, item.canonical, n_models)
        if form.drop is not None and form.ramp is None and form.rescale == "l1":  # each keeps its L1 norm
            dare = (*dare[:2], _f32([self._l1_scale(x, t.code, base_arg, base_code, merged, key, level, cc)
                                     for x, t, key, level in zip(xs, models, np.frombuffer(dare[0], np.uint64),
                                                                 np.frombuffer(dare[1], np.uint32))]))
        elif form.drop is not None and form.ramp is None and form.rescale is None:
            dare = (*dare[:2], _f32([1.0] * n_models))
        thresholds, upper, quotas = None, None, {}
        if form.trim:
            outliers = form.outliers or [None] * n_models
            cuts = [self._window(x, t.code, b, base.code, merged, *trim_window(merged, p, g), ccode)
                    for x, t, p, g in zip(xs, models, form.trim, outliers)]
            thresholds = _f32([c.lower for c in cuts])
            if form.outliers is not None:
                upper = _f32([c.upper for c in cuts])
            if any(c.quota is not None for c in cuts):  # ties to split: which ones each range keeps, per model
                for r, (start, _) in enumerate(_ranges(merged, self.threads)):
                    quotas[start] = np.array([c.quota[r] if c.quota is not None else (0, -1, 0, 0) for c in cuts],
                                             np.int64).tobytes()
            if form.rescale == "l1" and form.drop is None:  # the survivors keep the task vector's L1 norm
                dare = (None, None, _f32([1.0 if p >= 1.0 else self._trim_scale(x, t.code, b, base.code, merged, c, cc)
                                          for x, t, p, c in zip(xs, models, form.trim, cuts)]))
        weights = _f32(weight)
        in_codes = [t.code for t in models]
        mode = ELECT if form.elect else SUM

        def run(start: int, stop: int) -> int:
            return _kernels.combine(out_view, out_code, xs, in_codes, base_arg, base_code, weights, row_len, start,
                                    stop, mode, form.lam, form.normalize, thresholds, *dare, quotas.get(start), ccode,
                                    upper=upper, masks=masks)

        bad = [r for r in self._parallel(run, merged) if r >= 0]
        if bad:
            k = min(bad)
            if k == len(xs) + 1:  # inputs finite, a written value not: overflow or the cast to the output dtype
                raise output_not_finite(item)
            where = plan.checkpoints[item.sources[k] if k < n_models else item.base_from]
            tensor = item.inputs[k] if k < n_models else item.base
            raise input_not_finite(tensor, where.path)
        self._extra_rows(item, inputs, out, merged, numel)

    def _extra_rows(self, item: Item, inputs: list[Tensor], out: np.ndarray, merged: int, numel: int) -> None:
        """The rows only the larger vocabulary has (after the first `merged` elements): converted, not merged."""
        plan = self.plan
        out_code = KERNEL_DTYPES[item.dtype.code]
        if item.extra_from is not None:
            extra = inputs[-1]
            isz, osz = extra.dtype.itemsize, item.dtype.itemsize
            src, dst = extra.data[merged * isz:], out[merged * osz: numel * osz]
            count = numel - merged
            results = self._parallel(lambda a, z: _kernels.combine(
                dst, out_code, [src], [extra.code], None, 0, _f32([1.0]), 1, a, z, SUM, 1.0, False,
                None, None, None, None), count)
            if any(r >= 0 for r in results):
                ck, nm = plan.checkpoints[item.extra_from[0]], item.extra_from[1]
                if min(r for r in results if r >= 0) == 2:
                    raise output_not_finite(item)
                raise input_not_finite(nm, ck.path)

    def _program(self, item: Item, program: Program, inputs: list[np.ndarray], codes: list[int], out: np.ndarray,
                 out_code: int, row_len: int, n: int) -> None:
        """A Program's passes (methods/program.py) over the inputs' stored bytes, split across the threads by
        whole rows (so that sums and constants per row or column need no seams), or, where the tensor is one
        vector, by elements; partial sums (float64) are added in range order."""
        shape = (n // row_len, *item.shape[1:]) if item.shape else (n,)  # the merged rows
        axis, cols = program.vectors(shape)
        cc = KERNEL_DTYPES[compute_dtype(self.plan, item)]

        def sweep(ops) -> np.ndarray:
            store = out if ops.stored is not None else None
            bad, sums = kernel_sweep(ops, inputs, codes, store, out_code, n, cols, axis, cc, self._parallel, SPLIT_UNIT)
            if bad >= 0:
                if bad == len(inputs):
                    raise output_not_finite(item)
                n_models = len(item.inputs)
                where = self.plan.checkpoints[item.sources[bad] if bad < n_models else item.base_from]
                raise input_not_finite(item.inputs[bad] if bad < n_models else item.base, where.path)
            return sums

        program.body(sweep, compute_dtype(self.plan, item))

    def _window(self, x: np.ndarray, code: int, base: np.ndarray, base_code: int, n: int, lo: int, hi: int,
                compute: int = 0) -> Cut:
        """A magnitude trim that keeps the entries of ascending |x - base| rank [lo, hi) (steps.trim_window):
        the exact values at ranks lo and hi - 1, by a radix select over the float bits (the top 16 bits for
        both cuts in one pass, then the low 16 within each chosen bin in a second); and, where more entries
        tie with a cut than the window holds, which ties each of the executor's ranges keeps (a lower index
        ranks as the larger, as `steps.window_mask`)."""
        if lo <= 0 and hi >= n:
            return Cut(-1.0, math.inf)  # every |d| >= 0 kept
        if hi <= lo:
            return Cut(math.inf, math.inf)  # none kept (inputs are finite)
        ranges = _ranges(n, self.threads)

        def histograms(prefix: int, prefix2: int | None = None) -> list[tuple[np.ndarray, np.ndarray | None]]:
            def part(i: int, start: int, stop: int) -> tuple[np.ndarray, np.ndarray | None]:
                hist, hist2 = self._hists[i], (self._hists2[i] if prefix2 is not None else None)
                hist.fill(0)
                if hist2 is not None:
                    hist2.fill(0)
                    _kernels.abs_delta_histogram(x, code, base, base_code, start, stop, hist, prefix, compute,
                                                 hist2=hist2, prefix2=prefix2)
                else:
                    _kernels.abs_delta_histogram(x, code, base, base_code, start, stop, hist, prefix, compute)
                return hist, hist2
            return list(self.workers.map(part, range(len(ranges)), *zip(*ranges)))

        def total(parts: list[np.ndarray]) -> np.ndarray:
            out = parts[0].copy()
            for h in parts[1:]:  # counts of one tensor fit uint32 (the kernel takes ranges below 2**32)
                out += h
            return out

        # the cuts as k-th largest: rank lo is the (n - lo)-th largest, rank hi - 1 the (n - hi + 1)-th
        ks = [n - lo if lo > 0 else None, n - hi + 1 if hi < n else None]
        high = total([h for h, _ in histograms(-1)])
        bins = [None if k is None else _select(high, k) for k in ks]
        prefixes = sorted({b for b, _ in filter(None, bins)})
        parts = histograms(prefixes[0], prefixes[1] if len(prefixes) > 1 else None)
        low = {prefixes[0]: [h.copy() for h, _ in parts]}
        if len(prefixes) > 1:
            low[prefixes[1]] = [h2.copy() for _, h2 in parts]
        found = []  # per cut: (value, entries above it, ties per range)
        for k, b in zip(ks, bins):
            if k is None:
                found.append(None)
                continue
            hb, above = b
            lb, above_lo = _select(total(low[hb]), k - above)
            value = float(np.array([(hb << 16) | lb], dtype=np.uint32).view(np.float32)[0])
            found.append((value, above + above_lo, [int(h[lb]) for h in low[hb]]))
        lower, upper = (f[0] if f is not None else v for f, v in zip(found, (-1.0, math.inf)))
        # each cut's tied block: ascending ranks [n - above - ties, n - above); in index order the ranks
        # descend, so the lower cut keeps the block's first ties, the upper cut its last
        plan: list[tuple[int, int] | None] = [None, None]  # (skip, keep) of each cut's ties in index order
        if found[0] is not None and found[1] is not None and found[0][0] == found[1][0]:
            _, above, ties = found[0]
            block = n - above - sum(ties)  # the block's lowest rank
            plan[0] = (block + sum(ties) - hi, hi - lo)  # ranks [lo, hi) inside one block
            found[1] = None
        else:
            if found[0] is not None:
                _, above, ties = found[0]
                plan[0] = (0, n - above - lo)  # ranks >= lo of the block
            if found[1] is not None:
                _, above, ties = found[1]
                kept = hi - (n - above - sum(ties))  # ranks < hi of the block
                plan[1] = (sum(ties) - kept, kept)
        kept_ties = [(f[0], plan[c][1]) for c, f in enumerate(found) if f is not None]
        if all(p is None or (p[0] == 0 and p[1] >= sum(f[2])) for p, f in zip(plan, found)):
            return Cut(lower, upper, None, kept_ties)  # every tie kept: the plain comparisons do it
        per_range = []
        left = [list(p) if p is not None else [0, 0] for p in plan]
        for r in range(len(ranges)):
            quota = []
            for c in range(2):
                t = found[c][2][r] if found[c] is not None else 0
                skip = min(t, left[c][0])
                keep = min(t - skip, left[c][1])
                left[c] = [left[c][0] - skip, left[c][1] - keep]
                quota += [skip, keep]
            per_range.append(tuple(quota))
        return Cut(lower, upper, per_range, kept_ties)

    def _trim_scale(self, x: np.ndarray, code: int, base, base_code: int, n: int, cut: Cut, cc: str) -> float:
        """Breadcrumbs' rescale: sum|d| / sum|kept d| (steps.l1_scale): the sums strictly inside the cuts by
        the kernel, plus the tied entries the window keeps."""
        sums = self._parallel(lambda a, z: _kernels.dare_abs_sums(x, code, base, base_code, a, z, 0, 1 << 16,
                                                                   KERNEL_DTYPES[cc], lower=cut.lower,
                                                                   upper=cut.upper), n)
        before, inside = sum(s[0] for s in sums), sum(s[1] for s in sums)
        inside += sum(count * value for value, count in cut.kept_ties)
        return l1_scale(before, inside, cc)

    def _magprune(self, form: Form, xs: list[np.ndarray], codes: list[int], base, base_code: int,
                  shape: tuple[int, ...], cc: str, keys: list[int]) -> tuple[list[np.ndarray], list[float]]:
        """DELLA's drop (steps.magprune): per model, one pass that ranks each row's |d| (a radix sort in C),
        draws the keep mask against the ramp's levels and sums |d| and the kept |d|; returns the masks and
        the survivors' scales (the L1 rescale in mergekit's work dtype, or 1)."""
        outer, m, inner = row_view(shape)
        n, n_rows = outer * m * inner, outer * inner
        work = random_dtype(cc)
        while len(self._masks) < len(xs):
            self._masks.append(np.empty(0, np.uint8))
        masks, scales = [], []
        for i, (x, code, p, e, key) in enumerate(zip(xs, codes, form.drop, form.ramp, keys)):
            if self._masks[i].size < n:
                self._masks[i] = np.empty(n, np.uint8)
            mask = self._masks[i][:n]
            if p >= 1.0:  # kept whole (steps.magprune)
                mask.fill(1)
                masks.append(mask)
                scales.append(1.0)
                continue
            levels = ramp_levels(m, p, e, work)
            sums = self._parallel(functools.partial(
                _prune_rows, x, code, base, base_code, m, inner, levels, key, mask, KERNEL_DTYPES[cc]), n_rows, m * inner)
            masks.append(mask)
            scales.append(l1_scale(sum(s[0] for s in sums), sum(s[1] for s in sums), work)
                          if form.rescale == "l1" else 1.0)
        return masks, scales

    def _l1_scale(self, x: np.ndarray, code: int, base, base_code: int, n: int, key, level, cc: str) -> float:
        """DARE's norm-keeping rescale of one model's task vector: sum|d| / sum|kept d| (steps.l1_scale)."""
        sums = self._parallel(lambda a, z: _kernels.dare_abs_sums(x, code, base, base_code, a, z, int(key), int(level),
                                                                   KERNEL_DTYPES[cc]), n)
        return l1_scale(sum(s[0] for s in sums), sum(s[1] for s in sums), cc)


def _prune_rows(x, code, base, base_code, m, inner, levels, key, mask, cc, row_start, row_stop):
    return _kernels.magprune_mask(x, code, base, base_code, m, inner, row_start, row_stop, levels, int(key), mask, cc)


@dataclass
class Cut:
    """A magnitude trim's cuts for one model and tensor: kept where lower <= |d| <= upper; `quota`: per
    executor range (skip, keep) counts of the ties at the lower cut, then at the upper (None: all ties
    kept); `kept_ties`: (value, how many tied entries the window keeps) per cut."""

    lower: float
    upper: float
    quota: list[tuple[int, int, int, int]] | None = None
    kept_ties: list[tuple[float, int]] = dataclasses.field(default_factory=list)


def _dare_args(form: Form, seed: int, canonical: str, n: int) -> tuple:
    """DARE's kernel arguments: one draw key per model, keep levels and survivor scales (or Nones)."""
    if form.drop is None:
        return (None, None, None)
    levels = [keep_level(p) for p in form.drop]
    return (np.array(draw_keys(seed, canonical, n), np.uint64).tobytes(), np.array(levels, np.uint32).tobytes(),
            _f32([survivor_scale(lv) for lv in levels]))


def _select(hist: np.ndarray, k: int) -> tuple[int, int]:
    """The bin holding the k-th largest key, and how many keys lie in bins above it (over the populated
    bins only: deltas fill a few hundred of the 65536)."""
    filled = np.flatnonzero(hist)[::-1]
    from_top = np.cumsum(hist[filled], dtype=np.int64)
    m = int(np.searchsorted(from_top, k))
    b = int(filled[m])
    return b, int(from_top[m] - hist[b])


# -- the stream ---------------------------------------------------------------------------------------
def output_not_finite(item: Item) -> SoupError:
    return _output_not_finite(item.out_name, item.dtype.torch_name)


_EXPONENT = {"float32": (np.uint32, 0x7F800000), "float16": (np.uint16, 0x7C00), "bfloat16": (np.uint16, 0x7F80)}


def check_copied_bytes(data: np.ndarray, item: Item, stored_dtype: str, where) -> None:
    """A tensor copied unchanged is finite too (all-ones exponent bits = Inf/NaN); other dtypes pass."""
    if stored_dtype not in _EXPONENT:
        return
    kind, mask = _EXPONENT[stored_dtype]
    bits = data[: item.nbytes].view(kind)
    if np.any(np.bitwise_and(bits, kind(mask)) == kind(mask)):
        raise SoupError(f"tensor {item.copy_from[1] if item.copy_from else item.out_name} of model {where} "
                        "contains NaN or Inf (copied unchanged into the output); nothing was written")


def merged_buffers(plan: Plan, progress=None) -> Iterator[tuple[Item, np.ndarray]]:
    """Yield (item, stored bytes of the output tensor) in plan order, IN_FLIGHT items read and computed at
    once (engine/in_flight.py), each by an Executor of its own (its own worker threads and scratch). A
    yielded buffer stays valid until the one after the next is asked for, so a sink may write it in a thread
    while the next tensors are computed."""
    buffers = Buffers()
    items = plan.items
    executors = [Executor(plan) for _ in range(min(IN_FLIGHT, max(len(items), 1)))]
    idle = queue.SimpleQueue()  # the executors no item is using (one per item computing)
    for e in executors:
        idle.put(e)

    def produce(idx: int) -> np.ndarray:
        item = items[idx]
        inputs = _load(plan, buffers, item)
        if inputs is None:  # copied unchanged, in its stored bytes
            k, name = item.copy_from
            out = _read_bytes(buffers, plan.checkpoints[k], name)
            check_copied_bytes(out, item, plan.checkpoints[k].dtype(name).torch_name, plan.checkpoints[k].path)
            return out
        out = buffers.take(item.nbytes)
        executor = idle.get()
        try:
            executor.compute(item, inputs, out)
        finally:
            idle.put(executor)
            for t in inputs:
                buffers.give(t.data)
        return out

    results = in_order(len(items), produce, "souplm-compute", len(executors))
    try:
        previous: np.ndarray | None = None
        for item, out in zip(items, results):
            if progress is not None:
                progress.update(item.read_bytes)
            yield item, out
            if previous is not None:
                buffers.give(previous)
            previous = out
    finally:
        results.close()  # the item still computing finishes before its executor closes
        for e in executors:
            e.close()
