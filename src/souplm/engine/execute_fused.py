"""The fused CPU executor: a plan's tensors computed by one-pass C kernels (`souplm._kernels`), without torch.

The engine has two executors for the same plan, and both run each method's one statement, its `Form`
(methods/form.py). This one runs every method stated as a Form: a weighted combination of (optionally
trimmed or randomly dropped) task vectors, with TIES's sign election or without, and weights that may come
from the tensors' Gram matrix (SLERP). It reads the stored bytes (bf16, fp16 or fp32) and computes each
output element in a single pass that converts, subtracts the base, masks, weighs, elects the sign,
divides, adds the base, rounds to the output dtype and checks the inputs for NaN/Inf, split across the
CPU's cores. Merging with it never imports torch.

The kernels state the Form's steps in fp32 with the same operation order as the torch statement
(methods/steps.py); tests hold them to each other and to NumPy references. DARE draws its random bits
from the same counter-based stream in both. `engine.merge` picks this executor when nothing blocks it
(`fused_blocker`: the kernels are built and cover every tensor); `SOUPLM_EXECUTOR=torch` forces the other.
"""

from __future__ import annotations

import itertools
import os
import threading
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from ..errors import SoupError, input_not_finite
from ..errors import output_not_finite as _output_not_finite
from ..io.checkpoint import Checkpoint
from ..io.dtypes import DType
from ..methods.form import Form
from ..methods.steps import draw_keys, gram_kernel, keep_level, l1_scale, round_to, survivor_scale, trim_count
from .plan import Item, Plan
from .precision import compute_dtype

try:
    from .. import _kernels
except ImportError:  # the extension is optional: without a C compiler the torch executor does everything
    _kernels = None

KERNEL_DTYPES = {"F32": 0, "F16": 1, "BF16": 2}
SUM, ELECT = 0, 1
MIN_SPLIT = 1 << 18  # elements below which a tensor is not worth splitting across threads


def fused_blocker(plan: Plan) -> str | None:
    """Why this executor cannot run the whole plan (the engine then uses torch), or None when it can."""
    if _kernels is None:
        return "the C kernels are not built (souplm._kernels)"
    if os.environ.get("SOUPLM_EXECUTOR", "").lower() == "torch":
        return "SOUPLM_EXECUTOR=torch"
    if plan.method.form is None:
        return f"method {plan.method.name} is stated in torch, not as a one-pass Form"
    if not all(isinstance(c, Checkpoint) and c.is_safetensors for c in plan.checkpoints):
        return "an input is not a plain safetensors checkpoint (pickled, mapped, or re-indexed to a merged vocabulary)"
    for item in plan.items:
        if item.copy_from is not None:
            continue
        if plan.method.torch is not None and plan.method.form_for(
                len(item.inputs), {**item.model_params, **item.global_params}, has_base=item.base is not None) is None:
            return f"method {plan.method.name} is stated in torch for {item.out_name}'s parameters"
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
    buffer costs a round of page faults (the same reasoning as `io.pool` for the torch executor)."""

    def __init__(self) -> None:
        self._free: list[np.ndarray] = []
        self._lock = threading.Lock()

    def take(self, nbytes: int) -> np.ndarray:
        with self._lock:
            fits = [i for i, b in enumerate(self._free) if b.size >= nbytes]
            if fits:
                buf = self._free.pop(min(fits, key=lambda i: self._free[i].size))
                return buf[:nbytes] if buf.size > nbytes else buf
        return np.empty(max(nbytes, 1), dtype=np.uint8)[:nbytes]

    def give(self, buf: np.ndarray) -> None:
        with self._lock:
            self._free.append(buf.base if buf.base is not None else buf)


@dataclass
class Tensor:
    """The stored bytes of one input tensor and their dtype."""

    data: np.ndarray
    dtype: DType

    @property
    def code(self) -> int:
        """The kernels' code for the dtype."""
        return KERNEL_DTYPES[self.dtype.code]


def _read_bytes(buffers: Buffers, ck: Checkpoint, name: str) -> np.ndarray:
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
def _ranges(n: int, parts: int) -> list[tuple[int, int]]:
    if n <= 0:
        return []
    parts = max(1, min(parts, n // MIN_SPLIT))
    edges = [n * i // parts for i in range(parts + 1)]
    return [(a, b) for a, b in itertools.pairwise(edges) if b > a]


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
        # One 65536-bin histogram per thread, reused: TIES asks for two per model and tensor.
        self._hists = [np.zeros(1 << 16, dtype=np.uint32) for _ in range(self.threads)]

    def close(self) -> None:
        self.workers.shutdown()

    def _parallel(self, fn, n: int) -> list:
        ranges = _ranges(n, self.threads)
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
        weight = form.weight
        if form.reweigh is not None:  # the Form's terms' Gram matrix: x_i, or x_i - base
            gb, gc = (b, base.code) if form.use_base else (None, 0)
            weight = form.reweigh(gram_kernel(xs, [t.code for t in models], gb, gc, merged, self.workers.map))
        weight = weight[:, :rows] if weight.ndim == 2 else weight
        cc = compute_dtype(plan, item)  # what each step rounds to (engine/precision.py)
        ccode = KERNEL_DTYPES[cc]
        weight = round_to(weight, cc)  # (mergekit holds the weights in the compute dtype too)
        dare = _dare_args(form, plan.recipe.seed, item.canonical, n_models)
        base_arg, base_code = (b, base.code) if form.use_base else (None, 0)
        if form.drop is not None and form.rescale == "l1":  # each dropped task vector keeps its L1 norm
            dare = (*dare[:2], _f32([self._l1_scale(x, t.code, base_arg, base_code, merged, key, level, cc)
                                     for x, t, key, level in zip(xs, models, np.frombuffer(dare[0], np.uint64),
                                                                 np.frombuffer(dare[1], np.uint32))]))
        elif form.drop is not None and form.rescale is None:
            dare = (*dare[:2], _f32([1.0] * n_models))
        thresholds, quotas = None, {}
        if form.trim:
            cuts = [self._threshold(x, t.code, b, base.code, merged, p, ccode) for x, t, p in zip(xs, models, form.trim)]
            thresholds = _f32([c[0] for c in cuts])
            if any(c[1] is not None for c in cuts):  # ties to split: how many each range keeps, per model
                for r, (start, _) in enumerate(_ranges(merged, self.threads)):
                    quotas[start] = np.array([-1 if q is None else q[r] for _, q in cuts], np.int64).tobytes()
        weights = _f32(weight)
        in_codes = [t.code for t in models]
        mode = ELECT if form.elect else SUM

        def run(start: int, stop: int) -> int:
            return _kernels.combine(out_view, out_code, xs, in_codes, base_arg, base_code, weights, row_len, start,
                                    stop, mode, form.lam, form.normalize, thresholds, *dare, quotas.get(start), ccode)

        bad = [r for r in self._parallel(run, merged) if r >= 0]
        if bad:
            k = min(bad)
            if k == len(xs) + 1:  # inputs finite, a written value not: overflow or the cast to the output dtype
                raise output_not_finite(item)
            where = plan.checkpoints[item.sources[k] if k < n_models else item.base_from]
            tensor = item.inputs[k] if k < n_models else item.base
            raise input_not_finite(tensor, where.path)
        if item.extra_from is not None:  # rows only the larger vocabulary has: converted, not merged
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

    def _threshold(self, x: np.ndarray, code: int, base: np.ndarray, base_code: int, n: int,
                   density: float, compute: int = 0) -> tuple[float, list[int] | None]:
        """TIES's trim: the exact k-th largest |x - base| (k = trim_count), by a two-pass radix select over
        the float bits (the top 16 bits, then the low 16 within the chosen bin); and, when more entries tie
        with it than there is room for, how many ties each of the executor's ranges keeps (the first in
        index order), else None (all ties kept)."""
        k = trim_count(density, n)
        if k >= n:
            return 0.0, None  # |d| >= 0 keeps every entry
        if k <= 0:
            return float("inf"), None  # keeps none (inputs are finite)
        ranges = _ranges(n, self.threads)

        def histograms(prefix: int) -> list[np.ndarray]:
            def part(i: int, start: int, stop: int) -> np.ndarray:
                hist = self._hists[i]
                hist.fill(0)
                _kernels.abs_delta_histogram(x, code, base, base_code, start, stop, hist, prefix, compute)
                return hist
            return list(self.workers.map(part, range(len(ranges)), *zip(*ranges)))

        def total(parts: list[np.ndarray]) -> np.ndarray:
            out = parts[0].copy()
            for h in parts[1:]:  # counts of one tensor fit uint32 (the kernel takes ranges below 2**32)
                out += h
            return out

        hi, above = _select(total(histograms(-1)), k)
        low = histograms(hi)
        lo, above_lo = _select(total(low), k - above)
        per_range = [int(h[lo]) for h in low]
        threshold = float(np.array([(hi << 16) | lo], dtype=np.uint32).view(np.float32)[0])
        need = k - above - above_lo  # ties kept
        if need >= sum(per_range):
            return threshold, None
        quota, left = [], need
        for ties in per_range:
            quota.append(min(ties, left))
            left -= quota[-1]
        return threshold, quota

    def _l1_scale(self, x: np.ndarray, code: int, base, base_code: int, n: int, key, level, cc: str) -> float:
        """DARE's norm-keeping rescale of one model's task vector: sum|d| / sum|kept d| (steps.l1_scale)."""
        sums = self._parallel(lambda a, z: _kernels.dare_abs_sums(x, code, base, base_code, a, z, int(key), int(level),
                                                                   KERNEL_DTYPES[cc]), n)
        return l1_scale(sum(s[0] for s in sums), sum(s[1] for s in sums), cc)


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
    """Yield (item, stored bytes of the output tensor) in plan order; the next item's inputs are read in
    a thread meanwhile. A yielded buffer stays valid until the one after the next is asked for, so a sink
    may write it in a thread while the next tensor is computed."""
    buffers = Buffers()
    executor = Executor(plan)
    try:
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="souplm-read") as reader:
            pending: Future | None = None
            previous: np.ndarray | None = None
            items = plan.items
            for idx, item in enumerate(items):
                inputs = pending.result() if pending is not None else _load(plan, buffers, item)
                pending = reader.submit(_load, plan, buffers, items[idx + 1]) if idx + 1 < len(items) else None
                if inputs is None:  # copied unchanged, in its stored bytes
                    k, name = item.copy_from
                    out = _read_bytes(buffers, plan.checkpoints[k], name)
                    check_copied_bytes(out, item, plan.checkpoints[k].dtype(name).torch_name, plan.checkpoints[k].path)
                else:
                    out = buffers.take(item.nbytes)
                    executor.compute(item, inputs, out)
                    for t in inputs:
                        buffers.give(t.data)
                if progress is not None:
                    progress.update(item.read_bytes)
                yield item, out
                if previous is not None:
                    buffers.give(previous)
                previous = out
    finally:
        executor.close()

