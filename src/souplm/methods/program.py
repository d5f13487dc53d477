"""A merge method's one statement as a `Program`: entrywise operations in a stated order, for methods that
are not a weighted combination of task vectors (nearswap, RAM, Model Stock).

A program's body is a function `body(sweep, compute)` of two things the executor hands it: `sweep`, which
runs one pass of entrywise operations over the whole tensor and returns the sums it asked for, and the
compute dtype ("F32", "BF16", "F16"). Between passes the body works on those sums as numbers (the scalar
arithmetic of a method, in NumPy, rounded as torch rounds in the compute dtype: `steps.round_to`). A pass is
written with an `Ops` builder:

    ops = Ops(n_inputs)                 # registers 0 .. n_inputs - 1 are the inputs (the models, then the base)
    w = ops.abs(ops.sub(ops.input(1), ops.input(0)))
    w = ops.max(w, ops.const(1e-6))     # a number, or one per row or column (`ops.vector_const`)
    ops.sum(w)                          # sum slot 0: returned by sweep, float64, per vector with an axis
    ops.store(w)                        # the result (the last pass only)
    sums = sweep(ops)

Every operation computes in float32 and rounds its result to the compute dtype (`exact=True`: it does not,
as an operation on a float32 tensor in mergekit's formula does not). That is torch's arithmetic on a tensor
of that dtype, operation by operation, which is how mergekit computes these methods (engine/precision.py).
The inputs arrive rounded to the compute dtype.

The operations (each op is one opcode of the C kernels, `_kernels.program`):

    input k            the k-th input               const v / vector_const [v per row or column]
    add sub mul div    a + b, a - b, a * b, a / b   abs neg recip      |a|, -a, 1 / a
    max min            a > b ? a : b, a < b ? a : b gt eq              1.0 where a > b (a == b), else 0.0
    where c a b        a where c != 0, else b       sum a              sum of a (float64), slot in call order
    round a            a rounded (a * 1.0)
    store a            the output, converted to the output dtype (overflow is an error)

Two interpreters run a pass: the C kernels (`_kernels.program`, blocks that stay in L1) and torch (a
whole-tensor float32 op per operation, for the GPU and where the kernels are not built); tests/test_program.py
holds the two to the same bits. The fused executor (`engine/execute_fused.py`) runs the kernels over the
files' mapped bytes without torch; `run` below runs a program over torch tensors (pickled or mapped inputs,
in-memory sweeps, the GPU), by the kernels where the tensors are on the CPU; `apply` runs one pass, for
methods that compute some steps with torch between their passes (sce's selection).
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch

# opcodes, in the C kernels' order (_kernels.c, OP_LOAD ...)
OPCODES = ("input", "fill", "add", "sub", "mul", "div", "abs", "neg", "recip", "max", "min", "gt", "eq", "where",
           "sum", "store")
OP = {name: code for code, name in enumerate(OPCODES)}
MAX_REGISTERS = 64  # the kernels' limit (PROGRAM_MAX_REGS)


@dataclass
class Program:
    """body(sweep, compute): the method's passes (see the module docstring). `axis`: the sums (and the
    `vector_const`s) are over the whole tensor (None), per vector along the last dimension (-1: each row,
    as Model Stock's `filter_wise`), or per vector along the first (0: each column of a matrix, as
    NuSLERP's `nuslerp_row_wise`); a 1-D tensor is one vector either way."""

    body: Callable[[Callable, str], None]
    axis: int | None = None

    def vectors(self, shape: tuple[int, ...]) -> tuple[int, int]:
        """(kernel axis code, row length) for a tensor of this shape, seen as [numel / row length, row
        length]: its vectors are its rows (code 1) or its columns (code 2), or it is one (code 0)."""
        numel = int(np.prod(shape)) if len(shape) else 1
        if self.axis is None or len(shape) <= 1:
            return 0, max(numel, 1)
        if self.axis == 0:
            return 2, max(numel // shape[0] if shape[0] else 1, 1)
        return 1, max(shape[-1], 1)


@dataclass
class Ops:
    """One pass: registers 0 .. n_inputs - 1 hold the inputs; every operation writes a new register."""

    n_inputs: int
    code: list[tuple[int, int, int, int, int, int]] = field(default_factory=list)
    table: list[float] = field(default_factory=list)
    vectors: list[np.ndarray] = field(default_factory=list)  # the vector constants, in table order after the numbers
    n_sums: int = 0
    stored: int | None = None
    wide: bool = False
    n_regs: int = 0

    def __post_init__(self) -> None:
        self.n_regs = self.n_inputs
        self.code = [(OP["input"], k, k, 0, 0, 1) for k in range(self.n_inputs)]

    def _new(self, op: str, a: int = 0, b: int = 0, c: int = 0, exact: bool = False) -> int:
        from ..errors import SoupError

        if self.n_regs >= MAX_REGISTERS:
            raise SoupError(f"a program pass needs more than {MAX_REGISTERS} registers")
        d = self.n_regs
        self.n_regs += 1
        self.code.append((OP[op], d, a, b, c, 0 if exact else 1))
        return d

    def input(self, k: int) -> int:
        return k

    def const(self, value: float) -> int:
        """A number (float32), the same in every entry: rounded to the compute dtype by the caller where the
        formula has it in that dtype (a torch scalar operand stays float32)."""
        self.table.append(float(np.float32(value)))
        return self._new("fill", len(self.table) - 1, 0, exact=True)

    def vector_const(self, values) -> int:
        """One float32 number per vector (per row or column: the program's `axis`)."""
        self.vectors.append(np.asarray(values, dtype=np.float32).reshape(-1))
        return self._new("fill", -len(self.vectors), 1, exact=True)  # offset fixed in `tables`

    def add(self, a, b, exact=False):
        return self._new("add", a, b, exact=exact)

    def sub(self, a, b, exact=False):
        return self._new("sub", a, b, exact=exact)

    def mul(self, a, b, exact=False):
        return self._new("mul", a, b, exact=exact)

    def div(self, a, b, exact=False):
        return self._new("div", a, b, exact=exact)

    def abs(self, a, exact=False):
        return self._new("abs", a, exact=exact)

    def neg(self, a, exact=False):
        return self._new("neg", a, exact=exact)

    def recip(self, a, exact=False):
        return self._new("recip", a, exact=exact)

    def max(self, a, b):
        return self._new("max", a, b, exact=True)  # one of its operands: nothing to round

    def min(self, a, b):
        return self._new("min", a, b, exact=True)

    def gt(self, a, b):
        return self._new("gt", a, b, exact=True)

    def eq(self, a, b):
        return self._new("eq", a, b, exact=True)

    def where(self, c, a, b):
        return self._new("where", c, a, b, exact=True)

    def round(self, a: int) -> int:
        """a rounded to the compute dtype (a float32 value a torch op writes into a tensor of that dtype)."""
        return self.mul(a, self.const(1.0))

    def sum(self, a: int) -> int:
        """Ask for the sum of register a; returns its slot in what `sweep` returns."""
        self.code.append((OP["sum"], 0, a, self.n_sums, 0, 0))
        self.n_sums += 1
        return self.n_sums - 1

    def store(self, a: int, wide: bool = False) -> None:
        """The result: register a, in the compute dtype (`wide`: in float32, where mergekit's formula promotes
        it, as RAM+'s float32 lambda does)."""
        self.code.append((OP["store"], 0, a, 0, 0, 0))
        self.stored = a
        self.wide = wide

    def tables(self) -> tuple[np.ndarray, np.ndarray]:
        """(code int32 [n, 6], table float32): the vector constants' offsets resolved."""
        offsets, at = [], len(self.table)
        for r in self.vectors:
            offsets.append(at)
            at += r.size
        code = np.array([(op, d, offsets[-a - 1] if op == OP["fill"] and b == 1 else a, b, c, rnd)
                         for op, d, a, b, c, rnd in self.code], dtype=np.int32).reshape(-1, 6)
        table = np.concatenate([np.asarray(self.table, np.float32), *self.vectors]) if (self.table or self.vectors) \
            else np.zeros(1, np.float32)
        return code, table


def scalar(compute: str):
    """The rounding of a number to the compute dtype (float32 -> the dtype -> float32), for the scalar
    arithmetic between passes."""
    from .steps import round_to

    def rnd(x):
        v = np.asarray(x, dtype=np.float32)
        out = round_to(v, compute).reshape(v.shape)
        return out if out.ndim else np.float32(out)

    return rnd


def run(program: Program, tensors: list[torch.Tensor], base: torch.Tensor | None, compute: str = "F32",
        kernels: bool = True) -> torch.Tensor:
    """A program over torch tensors: each pass by `apply` (the C kernels where the tensors are on the CPU,
    else torch; `kernels=False`: torch always, the statement the kernels are tested against). Returns the
    stored register, in the compute dtype (float32 where the program stores it `wide`)."""
    inputs = [*tensors, *([base] if base is not None else [])]
    result: list[torch.Tensor] = []

    def sweep(ops: Ops) -> np.ndarray:
        sums, stored = apply(ops, inputs, program.axis, compute, kernels)
        if stored is not None:
            result.append(stored)
        return sums

    program.body(sweep, compute)
    return result[-1]


KERNEL_CODES = {"torch.float32": 0, "torch.float16": 1, "torch.bfloat16": 2}  # the kernels' dtype codes
COMPUTE_CODES = {"F32": 0, "F16": 1, "BF16": 2}


def compute_of(dtype) -> str:
    """The compute code a torch op on tensors of this dtype (or its name) computes in: "BF16", "F16", else "F32"."""
    return {"torch.bfloat16": "BF16", "torch.float16": "F16"}.get(str(dtype), "F32")


def c_kernels():
    """The C extension `souplm._kernels`, or None where it is not built."""
    try:
        from .. import _kernels
    except ImportError:
        return None
    return _kernels


def apply(ops: Ops, inputs: list[torch.Tensor], axis: int | None, compute: str, kernels: bool = True
          ) -> tuple[np.ndarray, torch.Tensor | None]:
    """One pass over tensors of one shape: (the sums it asks for, float64 [n_sums, vectors], and the stored
    register, shaped as the inputs, in the compute dtype or float32 where stored `wide`; None if it stores
    nothing). `axis` as a Program's. On the CPU the C kernels run it (`_kernels.program`, in L1-sized blocks);
    elsewhere, or with `kernels=False`, torch: a whole-tensor float32 op per operation, rounded to the compute
    dtype as the kernels round it (tests/test_program.py holds the two to the same bits)."""
    shape = tuple(inputs[0].shape)
    code_axis, row_len = Program(lambda *_: None, axis).vectors(shape)
    if kernels and _kernel_ready(inputs):
        out = _kernel_pass(ops, inputs, code_axis, row_len, compute)
        if out is not None:
            return out
    return _torch_pass(ops, inputs, code_axis, row_len, compute)


def _kernel_ready(inputs: list[torch.Tensor]) -> bool:
    return c_kernels() is not None and inputs[0].numel() > 0 and all(
        t.device.type == "cpu" and str(t.dtype) in KERNEL_CODES for t in inputs)


def _kernel_pass(ops: Ops, inputs: list[torch.Tensor], code_axis: int, row_len: int, compute: str):
    """The pass by the C kernels, split across torch's intra-op threads, or None where a value was not
    finite (torch then runs it, with its NaN and Inf)."""
    import torch

    n = inputs[0].numel()
    flat = [t.contiguous().reshape(-1) for t in inputs]
    bufs = [t.view(torch.int16).numpy() if t.dtype != torch.float32 else t.numpy() for t in flat]
    codes = [KERNEL_CODES[str(t.dtype)] for t in flat]
    stored = None
    if ops.stored is not None:  # on a pooled buffer while the engine computes an item (fresh pages cost more)
        from ..io import pool

        low = {"BF16": torch.bfloat16, "F16": torch.float16}.get(compute)
        stored = pool.empty(inputs[0].shape, torch.float32 if ops.wide or low is None else low)
    out = None if stored is None else (stored.reshape(-1).numpy() if stored.dtype == torch.float32 else
                                       stored.reshape(-1).view(torch.int16).numpy())
    bad, sums = kernel_sweep(ops, bufs, codes, out, KERNEL_CODES[str(stored.dtype)] if stored is not None else 0, n,
                             row_len, code_axis, COMPUTE_CODES[compute], across_torch_threads)
    if bad >= 0:
        return None
    return sums, stored


MIN_SPLIT = 1 << 18  # elements below which a pass is not worth splitting across threads
SPLIT_UNIT = 1 << 12  # a whole-tensor pass is split into ranges of multiples of this many elements


def split_ranges(n: int, parts: int, unit: int = 1, min_split: int = MIN_SPLIT) -> list[tuple[int, int]]:
    """[0, n) in up to `parts` ranges of n's units (elements, or rows of `unit` elements), none below
    `min_split` elements unless there is only one."""
    if n <= 0:
        return []
    parts = max(1, min(parts, n, n * unit // min_split))
    edges = [n * i // parts for i in range(parts + 1)]
    return [(a, b) for a, b in itertools.pairwise(edges) if b > a]


def kernel_sweep(ops: Ops, bufs: list, codes: list[int], out, out_code: int, n: int, row_len: int, code_axis: int,
                 compute_code: int, parallel: Callable, split_unit: int = SPLIT_UNIT) -> tuple[int, np.ndarray]:
    """One pass by the C kernels (`_kernels.program`) over elements [0, n) of the inputs' bytes: split by
    `parallel(fn, units, unit)` (which runs fn(u0, u1) over ranges of [0, units) and returns the results in
    order) into whole rows, so that sums and constants per row or column need no seams, or, where the
    tensor is one vector (code_axis 0), into units of `split_unit` elements; the ranges' float64 sums are
    added in range order. Returns (the lowest index the kernels flagged, or -1; the sums [n_sums, vectors])."""
    code, table = ops.tables()
    code, table = code.tobytes(), table.tobytes()
    unit = split_unit if code_axis == 0 else row_len
    kernels = c_kernels()

    def part(u0: int, u1: int) -> tuple[int, np.ndarray | None]:
        width = (u1 - u0) if code_axis == 1 else (row_len if code_axis == 2 else 1)
        sums = np.zeros((ops.n_sums, width)) if ops.n_sums else None
        bad = kernels.program(out, out_code, bufs, codes, code, table, ops.n_regs, row_len, u0 * unit,
                              min(n, u1 * unit), compute_code, sums=sums, axis=code_axis)
        return bad, sums

    units = -(-n // unit) if code_axis == 0 else n // row_len
    results = parallel(part, units, unit) if units else []
    bad = min((r for r, _ in results if r >= 0), default=-1)
    if not ops.n_sums:
        return bad, np.zeros((0, 1))
    parts = [s for _, s in results]
    return bad, (np.concatenate(parts, axis=1) if code_axis == 1 else np.sum(parts, axis=0))


def across_torch_threads(fn: Callable, units: int, unit: int) -> list:
    """fn(u0, u1) over [0, units) split across torch's intra-op threads (the kernels let go of the GIL)."""
    import torch

    threads = torch.get_num_threads()
    ranges = split_ranges(units, threads, unit)
    if len(ranges) <= 1:
        return [fn(*r) for r in ranges]
    return list(_pool(threads).map(lambda r: fn(*r), ranges))


@functools.cache
def _pool(threads: int):
    from concurrent.futures import ThreadPoolExecutor

    return ThreadPoolExecutor(max_workers=threads, thread_name_prefix="souplm-program")


def _torch_pass(ops: Ops, inputs: list[torch.Tensor], code_axis: int, row_len: int, compute: str):
    """The pass by torch (module docstring)."""
    import torch

    from .steps import rounder

    shape = tuple(inputs[0].shape)
    rnd = rounder(compute) or (lambda t: t)
    flat = [rnd(t.reshape(-1, row_len).to(torch.float32)) for t in inputs]  # [rows, row_len]
    reduce = {0: (0, 1), 1: 1, 2: 0}[code_axis]  # the dims a sum runs over
    regs: list[torch.Tensor | None] = [*flat, *([None] * (ops.n_regs - len(flat)))]
    sums: list[torch.Tensor] = []
    stored = None
    code, table = ops.tables()
    like = flat[0]
    for op, d, a, b, c, r in code.tolist():
        name = OPCODES[op]
        if name == "input":
            continue
        if name == "sum":
            sums.append(regs[a].to(torch.float64).sum(dim=reduce).reshape(-1))
            continue
        if name == "store":
            low = {"BF16": torch.bfloat16, "F16": torch.float16}.get(compute)
            stored = (regs[a] if ops.wide or low is None else regs[a].to(low)).reshape(shape)
            continue
        if name == "fill":
            if b:  # one number per vector: a column of per-row values, or a row of per-column ones
                count = like.shape[1] if code_axis == 2 else like.shape[0]
                vals = torch.as_tensor(table[a: a + count], device=like.device)
                regs[d] = (vals.reshape(1, -1) if code_axis == 2 else vals.reshape(-1, 1)).expand_as(like)
            else:
                regs[d] = torch.full_like(like, float(table[a]))
            continue
        v = _torch_ops()[name](regs[a], regs[b], regs[c])
        regs[d] = rnd(v) if r else v
    return (torch.stack(sums).cpu().numpy() if sums else np.zeros((0, 1))), stored


@functools.cache
def _torch_ops() -> dict[str, Callable]:
    """The torch statement of each operation (imported on first use)."""
    import torch

    return {
        "add": lambda x, y, z: x + y,
        "sub": lambda x, y, z: x - y,
        "mul": lambda x, y, z: x * y,
        "div": lambda x, y, z: x / y,
        "abs": lambda x, y, z: x.abs(),
        "neg": lambda x, y, z: -x,
        "recip": lambda x, y, z: 1.0 / x,
        "max": lambda x, y, z: torch.where(x > y, x, y),
        "min": lambda x, y, z: torch.where(x < y, x, y),
        "gt": lambda x, y, z: (x > y).to(x.dtype),
        "eq": lambda x, y, z: (x == y).to(x.dtype),
        "where": lambda x, y, z: torch.where(x != 0, y, z),
    }
