"""A merge method's one statement: a `Form`, the pipeline every executor runs.

Most merge methods are one pipeline with different settings. For each model i, on every entry of a tensor:

    d_i = x_i - base            (use_base; else d_i = x_i)
    d_i = trim(d_i, density_i)  (trim: keep the k = int(density_i * n) >= 1 entries of largest |d_i|, TIES;
                                 with outliers gamma_i, breadcrumbs: keep int(density_i n) entries below the
                                 int(gamma_i n) largest; of entries tied at a cut, a lower index ranks larger)
    d_i = drop(d_i, density_i)  (drop: keep each entry with probability density_i, DARE; with a ramp
                                 epsilon_i, DELLA: with probability density_i - epsilon_i + 2 epsilon_i
                                 r / (m - 1), r the rank of |d_ij| within its row of m)
    d_i = rescale(d_i)          (the survivors of a trim or drop: by sum|d_i| / sum|kept d_i|, or by
                                 1/density_i (drop only), or not at all)
    SUM:   m = sum_i w_i d_i, divided by sum_i w_i when normalizing
    ELECT: s = +1 if sum_i w_i d_i >= 0 else -1; m = sum over i with sign(w_i d_i) == s of w_i d_i,
           divided by the agreeing weight sum when normalizing (TIES's disjoint mean)
    out = base + lam * m        (use_base; else out = m)

with w_i the model's weight (one per model, or one per model and output row from a coefficient table),
optionally derived from the tensors' Gram matrix (`reweigh`: SLERP's two coefficients from the angle).

A method states its settings once, as a function of its parameters that returns a `Form`
(`methods/ties.py` is five lines). The fused executor (`engine/execute_fused.py`) runs a Form in one pass
over the stored bytes with the C kernels; `run` below runs it with torch (pickled or mapped inputs,
in-memory sweeps, the GPU). The steps themselves are stated once per executor (`methods/steps.py` for
torch, `_kernels.c` for the kernels), method-independent, and held bit for bit to a NumPy statement by
tests/test_kernels.py.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch

    from .program import Program


@dataclass
class Form:
    weight: np.ndarray  # float32 [N] or [N, rows]
    use_base: bool = False  # task vectors x_i - base, and base + lam * (...) at the end
    elect: bool = False  # TIES sign election and disjoint merge (else a weighted sum)
    normalize: bool = False  # divide by the weights' sum (ELECT: the agreeing weights' sum)
    lam: float = 1.0
    trim: list[float] | None = None  # per-model densities of the magnitude trim (TIES)
    outliers: list[float] | None = None  # per-model fractions of the largest entries the trim drops (breadcrumbs)
    drop: list[float] | None = None  # per-model keep probabilities of the random drop (DARE)
    ramp: list[float] | None = None  # per-model epsilons: the drop's probability ramps by rank in a row (DELLA)
    # the survivors of a trim or drop: "l1" (keep the tensor's L1 norm), "inverse" (1/q, a drop without a ramp), None
    rescale: str | None = None
    # The terms' Gram matrix G[i, j] = <d_i, d_j> (float64, over the whole tensor; d_i = x_i, or the task vector
    # x_i - base with use_base) -> the weights to use.
    reweigh: Callable[[np.ndarray], np.ndarray] | None = None


def as_weights(weight, nonzero_sum: bool = False) -> np.ndarray:
    """Per-model weights as float32 [N] (or [N, rows]); `nonzero_sum`: refuse weights that sum to zero
    (a linear soup would divide by it)."""
    from ..errors import SoupError

    w = np.asarray(weight, dtype=np.float32)
    if nonzero_sum and bool((np.abs(w.sum(axis=0, dtype=np.float32)) < 1e-12).any()):
        raise SoupError("weights sum to zero and cannot be normalized (set normalize: false)")
    return w


def as_numpy(value):
    """A parameter as the form builders take it: tensors become NumPy, everything else stays."""
    if hasattr(value, "detach"):
        return value.detach().cpu().numpy()
    return value


def run(form: Form | Program, tensors: list[torch.Tensor], base: torch.Tensor | None, keys: list[int] | None = None,
        compute: str = "F32") -> torch.Tensor:
    """The torch statement of a Form: the steps in the order the kernels take them, in fp32, each rounded to
    the compute dtype ("BF16"/"F16", engine/precision.py) where mergekit computes in it. `tensors` (and
    `base`) are fresh copies, overwritten in place. A `Program` (methods/program.py) runs its passes."""
    import torch

    from .program import Program
    from .program import run as run_program

    if isinstance(form, Program):
        return run_program(form, tensors, base, compute)

    from .steps import (
        add_to_base,
        drop_and_rescale,
        elect_and_merge,
        gram,
        magprune,
        rescale_trimmed,
        round_to,
        rounder,
        task_vectors,
        trim_window,
        trim_windows,
        weighted_sum,
    )

    rnd = rounder(compute)
    terms = task_vectors(tensors, base, rnd) if form.use_base else tensors
    weight = form.weight if form.reweigh is None else form.reweigh(gram(terms))  # the terms' Gram matrix
    weight = round_to(weight, compute)
    w = torch.as_tensor(weight, device=tensors[0].device)
    if w.dim() == 2:
        w = w[:, : tensors[0].shape[0]]
    if form.trim is not None:
        outliers = form.outliers or [None] * len(terms)
        before = [float(d.abs().sum(dtype=torch.float64)) for d in terms] if form.rescale == "l1" else None
        terms = trim_windows(terms, [trim_window(d.numel(), p, g) for d, p, g in zip(terms, form.trim, outliers)])
        if before is not None:
            terms = [d if p >= 1.0 else rescale_trimmed(d, b, rnd, compute)
                     for d, b, p in zip(terms, before, form.trim)]
    if form.drop is not None and form.ramp is not None:
        terms = [magprune(d, p, e, k, form.rescale == "l1", rnd, compute)
                 for d, p, e, k in zip(terms, form.drop, form.ramp, keys)]
    elif form.drop is not None:
        terms = [drop_and_rescale(d, p, k, form.rescale, rnd, compute) for d, p, k in zip(terms, form.drop, keys)]
    if form.elect:
        merged = elect_and_merge(terms, w, form.normalize, rnd)
    else:
        merged = weighted_sum(terms, w, rnd)
        if form.normalize:  # divided by the weights' sum (by 1 where it is below 1e-8 in magnitude)
            total = w.sum(dim=0)
            total = total if rnd is None else rnd(total)
            total = torch.where(total.abs() < 1e-8, 1.0, total)
            merged.div_(total.reshape(total.shape + (1,) * (merged.dim() - total.dim())))
            merged = merged if rnd is None else rnd(merged)
    return add_to_base(merged, base, form.lam, rnd) if form.use_base else merged.to(torch.float32)
