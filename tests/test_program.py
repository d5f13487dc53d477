"""Programs (methods/program.py): the C kernels' interpreter against the torch one, bit for bit, and against
plain NumPy statements of the operations; the methods stated as programs through both executors.

The methods themselves are checked against independent statements of their formulas elsewhere
(test_torch_methods_dtype.py in each dtype, test_golden.py against mergekit 0.1.5).
"""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import souplm
from souplm.engine import execute_fused as fused
from souplm.engine.recipe import Recipe
from souplm.methods.program import Ops, Program, run

pytestmark = pytest.mark.skipif(fused._kernels is None, reason="souplm._kernels is not built")
K = fused._kernels
CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
COMPUTE = {"F32": 0, "F16": 1, "BF16": 2}
TORCH = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def raw(t: torch.Tensor) -> np.ndarray:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy() if t.dtype != torch.float32 else \
        t.contiguous().reshape(-1).numpy().view(np.uint8)


def kernel_run(program: Program, tensors: list[torch.Tensor], compute: str, out_dtype=torch.float32,
               splits: int = 1):
    """A program through the kernels, the tensor cut into `splits` ranges of whole rows; returns (stored
    tensor, the sums of every pass)."""
    shape = tensors[0].shape
    n = tensors[0].numel()
    axis, cols = program.vectors(tuple(shape))
    rows = n // cols
    bufs, codes = [raw(t) for t in tensors], [CODES[t.dtype] for t in tensors]
    out = np.zeros(n * torch.finfo(out_dtype).bits // 8, np.uint8)
    all_sums = []

    def sweep(ops: Ops) -> np.ndarray:
        code, table = ops.tables()
        edges = [rows * i // splits for i in range(splits + 1)]
        parts = []
        for r0, r1 in itertools.pairwise(edges):
            width = (r1 - r0) if axis == 1 else (cols if axis == 2 else 1)
            sums = np.zeros((ops.n_sums, width)) if ops.n_sums else None
            bad = K.program(out if ops.stored is not None else None, CODES[out_dtype], bufs, codes, code.tobytes(),
                            table.tobytes(), ops.n_regs, cols, r0 * cols, r1 * cols, COMPUTE[compute], sums=sums,
                            axis=axis)
            assert bad == -1
            parts.append(sums)
        if not ops.n_sums:
            return np.zeros((0, 1))
        s = np.concatenate(parts, axis=1) if axis == 1 else np.sum(parts, axis=0)
        all_sums.append(s)
        return s

    program.body(sweep, compute)
    dt = {torch.float32: np.float32, torch.float16: np.uint16, torch.bfloat16: np.uint16}[out_dtype]
    return torch.from_numpy(out.view(dt).copy()).view(out_dtype).reshape(shape), all_sums


def every_op(axis: int | None, vector_values: np.ndarray | None, seen: list) -> Program:
    """A two-pass program that uses every operation: the first pass's sums feed the second's constants."""

    def body(sweep, compute):
        ops = Ops(3)
        x, y, z = ops.input(0), ops.input(1), ops.input(2)
        d = ops.sub(x, y)
        ops.sum(ops.mul(d, d, exact=True))
        ops.sum(ops.abs(d))
        sums = sweep(ops)
        seen.append(sums)
        ops = Ops(3)
        x, y, z = ops.input(0), ops.input(1), ops.input(2)
        c = ops.vector_const(vector_values) if axis is not None else ops.const(0.37)
        s = ops.const(float(np.float32(sums[1].sum() / (1 + sums[0].sum()))))
        a = ops.add(ops.mul(x, c), ops.div(y, ops.max(ops.abs(z), ops.const(0.25))))
        b = ops.sub(ops.neg(a), ops.recip(ops.add(ops.abs(x), ops.const(1.5)), exact=True))
        m = ops.min(ops.max(a, b), ops.const(2.0))
        g = ops.where(ops.gt(x, y), m, ops.mul(b, s))
        e = ops.where(ops.eq(ops.round(x), x), g, ops.neg(g))
        ops.sum(e)
        ops.store(ops.round(e))
        sweep(ops)

    return Program(body, axis=axis)


def numpy_every_op(x, y, z, c, compute):
    """The second pass of `every_op` in NumPy float32, each rounded result as the compute dtype rounds it."""
    def r(v):
        return numpy_round(v, compute)

    x, y, z = (r(v) for v in (x, y, z))
    d = r(x - y)
    sums = [(d * d).astype(np.float64).sum(), np.abs(d).astype(np.float64).sum()]
    s = np.float32(sums[1] / (1 + sums[0]))
    a = r(r(x * c) + r(y / np.maximum(np.abs(z), np.float32(0.25))))
    b = r(-a - (np.float32(1) / r(np.abs(x) + np.float32(1.5))).astype(np.float32))
    m = np.minimum(np.maximum(a, b), np.float32(2.0))
    g = np.where(x > y, m, r(b * s))
    e = np.where(r(x * np.float32(1.0)) == x, g, -g)
    return r(e)


@pytest.mark.parametrize("compute", ["F32", "BF16", "F16"])
@pytest.mark.parametrize("axis", [None, -1, 0])
def test_run_on_cpu_tensors_takes_the_kernels_to_the_torch_bits(compute, axis):
    """`run` over CPU tensors (the torch executor's programs, sce's passes) goes through the kernels
    (`program.apply`), and gives the torch interpreter's bits and sums."""
    from souplm.methods import program as prog

    g = torch.Generator().manual_seed(9)
    shape = (23, 130)
    xs = [torch.randn(shape, generator=g).to(TORCH[compute]) for _ in range(3)]
    per_vector = np.linspace(-1.5, 2.0, shape[1] if axis == 0 else shape[0]).astype(np.float32)
    calls = []
    real = prog._kernel_pass
    try:
        prog._kernel_pass = lambda *a: calls.append(1) or real(*a)
        seen_k, seen_t = [], []
        got = run(every_op(axis, per_vector, seen_k), [x.clone() for x in xs[:2]], xs[2].clone(), compute)
    finally:
        prog._kernel_pass = real
    want = run(every_op(axis, per_vector, seen_t), [x.clone() for x in xs[:2]], xs[2].clone(), compute,
               kernels=False)
    assert calls, "the kernels did not run"
    assert got.dtype == want.dtype and got.shape == want.shape
    np.testing.assert_array_equal(got.float().numpy(), want.float().numpy())
    for a, b in zip(seen_k, seen_t):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=0)


@pytest.mark.parametrize("compute", ["F32", "BF16", "F16"])
@pytest.mark.parametrize("stored", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("axis", [None, -1, 0])
def test_kernels_and_torch_run_a_program_to_the_same_bits(compute, stored, axis):
    g = torch.Generator().manual_seed(5)
    shape = (37, 300)
    xs = [torch.randn(shape, generator=g).to(stored) for _ in range(3)]
    per_vector = np.linspace(-1.5, 2.0, shape[1] if axis == 0 else shape[0]).astype(np.float32)
    seen_k, seen_t = [], []
    got, _ = kernel_run(every_op(axis, per_vector, seen_k), xs, compute, splits=3)
    want = run(every_op(axis, per_vector, seen_t), [x.clone() for x in xs[:2]], xs[2].clone(), compute,
               kernels=False)
    assert torch.equal(got.view(torch.int32), want.float().view(torch.int32))
    for a, b in zip(seen_k, seen_t):
        np.testing.assert_allclose(a, b, rtol=1e-12)
    # and the operations mean what the docstring says (NumPy, float32): a constant per row or column
    c = {None: np.float32(0.37), -1: per_vector[:, None], 0: per_vector[None, :]}[axis]
    ref = numpy_every_op(*(x.float().numpy() for x in xs), c, compute)
    assert np.array_equal(got.numpy().view(np.int32), ref.view(np.int32))
    # the first pass's sums: whole, per row, per column
    x0, x1 = (numpy_round(x.float().numpy(), compute) for x in xs[:2])  # the inputs as the compute dtype holds them
    d = numpy_round(x0 - x1, compute)
    dims = {None: None, -1: 1, 0: 0}[axis]
    np.testing.assert_allclose(seen_k[0][1].reshape(-1), np.abs(d).astype(np.float64).sum(axis=dims).reshape(-1),
                               rtol=1e-12)


def numpy_round(v, compute):
    if compute == "F32":
        return v.astype(np.float32)
    return torch.from_numpy(np.asarray(v, np.float32)).to(TORCH[compute]).float().numpy()


def test_ranges_do_not_change_the_bits():
    g = torch.Generator().manual_seed(6)
    xs = [torch.randn(64, 129, generator=g).to(torch.bfloat16) for _ in range(3)]
    for axis, count in ((-1, 64), (0, 129)):
        per_vector = np.arange(count, dtype=np.float32) / 7
        one, _ = kernel_run(every_op(axis, per_vector, []), xs, "BF16", splits=1)
        many, _ = kernel_run(every_op(axis, per_vector, []), xs, "BF16", splits=5)
        assert torch.equal(one.view(torch.int32), many.view(torch.int32))


def test_a_nan_input_and_an_overflow_are_reported():
    x = torch.ones(1000)
    y = torch.ones(1000)
    y[777] = float("nan")
    ops = Ops(2)
    ops.store(ops.add(ops.input(0), ops.input(1)))
    code, table = ops.tables()
    out = np.zeros(2000, np.uint8)
    args = (out, 2, [raw(x), raw(y)], [0, 0], code.tobytes(), table.tobytes(), ops.n_regs, 1000)
    assert K.program(*args, 0, 1000) == 1  # the second input
    assert K.program(*args, 0, 700) == -1  # not in this range
    big = torch.full((1000,), 3e38)
    assert K.program(out, 2, [raw(big), raw(big)], [0, 0], code.tobytes(), table.tobytes(), ops.n_regs, 1000,
                     0, 1000) == 2  # finite inputs, an Inf written


@pytest.mark.parametrize("bad", [(99, 3, 0, 0, 0, 0), (2, 70, 0, 0, 0, 1), (0, 3, 5, 0, 0, 1), (1, 3, 50, 0, 0, 0),
                                 (14, 0, 0, 9, 0, 0)])
def test_an_instruction_out_of_range_is_refused(bad):
    x = raw(torch.ones(8))
    code = np.array([(0, 0, 0, 0, 0, 1), bad], np.int32).tobytes()
    with pytest.raises(ValueError, match="out of range"):
        K.program(np.zeros(32, np.uint8), 0, [x], [0], code, np.zeros(2, np.float32).tobytes(), 4, 8, 0, 8,
                  sums=np.zeros(1))


# -- the methods stated as programs, through both executors -----------------------------------------------
PROGRAMS = [
    ("ram", {}),
    ("ramplus_tl", {"r": 0.3, "alpha": 0.5}),
    ("model_stock", {}),
    ("model_stock", {"filter_wise": True}),
    ("nearswap", {"t": 0.01}),
    ("nuslerp", {"nuslerp_flatten": False}),  # per row
    ("nuslerp", {"nuslerp_flatten": False, "nuslerp_row_wise": True}),  # per column
]


def weights(path: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(f))
    return out


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
@pytest.mark.parametrize(("method", "params"), PROGRAMS, ids=[f"{m}{i}" for i, (m, _) in enumerate(PROGRAMS)])
def test_program_methods_give_the_same_bits_on_both_executors(family, tmp_path, monkeypatch, method, params, dtype):
    names = ("a",) if method == "nearswap" else ("a", "b")
    weights_of = {"nuslerp": [0.7, 0.4]}.get(method)
    models = [{"model": str(family[m]), **({"parameters": {"weight": weights_of[i]}} if weights_of else {})}
              for i, m in enumerate(names)]
    recipe = Recipe.load({"merge_method": method, "base_model": str(family["base"]), "dtype": dtype,
                          "models": models, "parameters": params})
    monkeypatch.setattr(fused, "MIN_SPLIT", 64)  # even these small tensors split across the threads:
    monkeypatch.setattr(fused, "SPLIT_UNIT", 64)  # by rows, or (whole-tensor sums) by elements
    out = {}
    for executor in ("fused", "torch"):
        monkeypatch.setenv("SOUPLM_EXECUTOR", executor)
        report = souplm.merge(recipe, tmp_path / executor, progress=False, hash_inputs=False)
        assert report.executor == executor
        out[executor] = weights(tmp_path / executor)
    assert out["fused"].keys() == out["torch"].keys()
    for k, t in out["fused"].items():
        assert t.dtype == out["torch"][k].dtype == getattr(torch, dtype), k
        assert torch.equal(t.view(torch.uint8) if t.dtype != torch.float32 else t.view(torch.int32),
                           out["torch"][k].view(torch.uint8) if t.dtype != torch.float32 else
                           out["torch"][k].view(torch.int32)), k
