"""Step 3, the torch executor: any method on fresh copies of the inputs, on the host or a torch device.

A Form gets float32 copies (its steps round to the compute dtype themselves); a tensor function flagged
`native_dtype` gets them in the compute dtype (engine/precision.py), so that its torch ops round as
mergekit's do; other tensor functions get float32.

The plan's items are read and computed IN_FLIGHT at a time (engine/in_flight.py, as the fused executor
does): on the host each with torch's threads divided among them, so that one item's Python between its
ops, its reads and its input checks run while the other's ops do; on a device one item at a time holds it,
the next one's reads overlapping. Memory is bounded by the largest tensor times the number of inputs,
times the items in flight, independent of model size. `execute_fused` runs the same plans without torch
where it can (`fused_blocker`).
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import SoupError, input_not_finite, output_not_finite
from ..io.dtypes import BY_CODE
from ..io.pool import BufferPool
from ..methods.form import run as run_form
from ..methods.steps import draw_keys
from .in_flight import IN_FLIGHT, in_order
from .plan import Item, Plan
from .precision import compute_dtype, input_dtype
from .recipe import Recipe
from .sources import Sources, prepare

if TYPE_CHECKING:
    import torch


def _finite(t: torch.Tensor, name: str, where: Path) -> torch.Tensor:
    # A finite sum proves every entry finite; only a non-finite sum pays for the exact check.
    import torch

    if t.is_floating_point() and not torch.isfinite(t.sum()) and not bool(torch.isfinite(t).all()):
        raise input_not_finite(name, where)
    return t


def _form_of(plan: Plan, item: Item):
    """The Form the item runs (methods/form.py), or None: the method's tensor function runs instead."""
    method = plan.method
    if method.form is None:
        return None
    return method.form_for(len(item.inputs), {**item.model_params, **item.global_params}, has_base=item.base is not None)


def _load_inputs(plan: Plan, sources: Sources, item: Item, pool: BufferPool | None = None):
    """(tensors, base, form): the item's inputs as fresh copies, float32 for a Form, and in the compute
    dtype for a tensor function that mergekit computes in it (engine/precision.py `input_dtype`)."""
    if item.copy_from is not None:
        return None
    form = _form_of(plan, item)
    dtype = BY_CODE[input_dtype(plan, item, form is not None)].torch
    ck = plan.checkpoints
    tensors = [_finite(sources.get(k, n, pool, dtype), n, ck[k].path) for k, n in zip(item.sources, item.inputs)]
    base = None
    if item.base is not None:
        base = _finite(sources.get(item.base_from, item.base, pool, dtype), item.base, ck[item.base_from].path)
    if item.common_rows is not None:
        tensors = [t[: item.common_rows] for t in tensors]
        base = base[: item.common_rows] if base is not None else None
    return tensors, base, form


def _compute(plan: Plan, sources: Sources, item: Item, loaded, device: torch.device | None = None) -> torch.Tensor:
    if item.copy_from is not None:  # copied unchanged: finite too
        k, name = item.copy_from
        return _finite(plan.checkpoints[k].get(name, dtype=None), name, plan.checkpoints[k].path)
    tensors, base, form = loaded
    if device is not None:  # (on "cpu" the moves are no-ops, which is how CI runs this path)
        # The inputs stay on the host's pooled buffers; the method runs on the device and its result comes back.
        tensors = [t.to(device, non_blocking=True) for t in tensors]
        base = base.to(device, non_blocking=True) if base is not None else None
        return _compute_on(plan, sources, item, tensors, base, form).to("cpu")
    return _compute_on(plan, sources, item, tensors, base, form)


def _compute_on(plan: Plan, sources: Sources, item: Item, tensors, base, form) -> torch.Tensor:
    import torch

    method = plan.method
    keys = draw_keys(plan.recipe.seed, item.canonical, len(item.inputs)) if method.random else None
    if form is not None:  # the method's one statement, run by torch (methods/form.py)
        out = run_form(form, tensors, base, keys, compute_dtype(plan, item))
    else:  # a tensor function, on inputs in the dtype its ops compute in (engine/precision.py)
        dev = tensors[0].device
        kwargs = {k: torch.tensor(v, device=dev) for k, v in item.model_params.items()}
        kwargs.update({k: v for k, v in item.global_params.items() if v is not None})
        if keys is not None:
            kwargs["keys"] = keys
        out = method.fn(tensors, base, **kwargs)
    if item.extra_from is not None:
        k, name = item.extra_from
        extra = sources.get(k, name)[item.common_rows :]
        out = torch.cat([out, extra.to(device=out.device, dtype=out.dtype)])
    # The cast is monotonic and NaN propagates through aminmax: the output is finite iff its extremes, cast, are.
    # (One pass over the result before the cast; a sum of the cast bf16 output costs five.)
    ends = torch.stack(torch.aminmax(out)).to(item.dtype.torch) if out.numel() else None
    out = out.to(item.dtype.torch)
    if ends is not None and not bool(torch.isfinite(ends).all()):
        raise output_not_finite(item.out_name, item.dtype.torch_name)  # overflow or the final cast
    return out


def merged_tensors(
    recipe: Recipe | str | os.PathLike | dict,
    *,
    coefficients=None,
    sources: Sources | None = None,
    plan: Plan | None = None,
    progress=None,
    device: str | None = None,
) -> Iterator[tuple[Item, torch.Tensor]]:
    """Yield (plan item, merged tensor) in plan order; the next item's inputs load in a thread meanwhile.

    `device` (e.g. "cuda") runs each method on that device, one tensor at a time; the yielded tensors are on the CPU.
    """
    import gc

    import torch  # (imported before the freeze below, so that it covers its objects)

    # torch's import leaves ~10^6 long-lived Python objects; every full collection the merge's allocations
    # trigger would walk them all (8% of a bf16 nearswap's CPU time). They live as long as the process.
    gc.freeze()
    dev = resolve_device(device)
    if plan is None:
        plan, sources = prepare(recipe, coefficients, sources)
    # Input copies and the methods' temporaries live on reused buffers (io/pool.py): fresh pages for
    # every tensor cost about as much CPU time as the merge arithmetic itself.
    buffers = BufferPool()
    items = plan.items
    on_host = dev is None
    # On the host the items in flight share the cores (torch's threads divided among them); on a device one
    # item at a time holds it (its memory bounds the merge), the next one's reads overlapping it. (A
    # `--device cpu` merge takes the device's path, which is how CI runs it.)
    device_turn = contextlib.nullcontext() if on_host else threading.Lock()
    threads = torch.get_num_threads()

    def produce(idx: int) -> torch.Tensor:
        item = items[idx]
        with buffers.scope() as temporaries:
            loaded = _load_inputs(plan, sources, item, buffers)
            with device_turn:
                out = _compute(plan, sources, item, loaded, dev)
        if loaded is not None:
            for t in [*loaded[0], loaded[1], *temporaries]:
                if t is not None:
                    buffers.give(t, keep_alive=out)
        return out

    results = in_order(len(items), produce, "souplm-compute")
    if on_host:
        torch.set_num_threads(max(1, threads // IN_FLIGHT))
    try:
        for item, out in zip(items, results):
            if progress is not None:
                progress.update(item.read_bytes)
            yield item, out
    finally:
        results.close()
        torch.set_num_threads(threads)


def resolve_device(device: str | None) -> torch.device | None:
    """The torch device for `--device`, checked before any tensor is read (None: the host, any executor)."""
    if device is None:
        return None
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise SoupError(f"--device {device!r} is not a torch device (cpu, cuda, cuda:1, ...)") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SoupError(f"--device {device}: CUDA is not available on this machine")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise SoupError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if dev.type not in ("cpu", "cuda"):
        raise SoupError(f"--device {device}: only cpu and cuda are supported")
    return dev


