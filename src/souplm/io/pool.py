"""Reusable buffers for the merge loop: the same few tensor sizes come back layer after layer.

A fresh large tensor costs a round of page faults when first written, and on the 2-core machine that
cost is several times the arithmetic done on it (filling a fresh 80 MB buffer: ~30 ms; an in-place
multiply over it: ~4 ms). Before the pool, the kernel's page-fault time was about half of a merge's
CPU time. The engine therefore reads its fp32 input copies into pooled buffers, and methods take their
full-size temporaries with `empty_like` (pooled while the engine is computing an item, plain
`torch.empty_like` otherwise); once an item's output is converted, every buffer it used goes back.

Buffers are flat byte storages handed out as typed views, chosen best-fit (the smallest free one that
is large enough), so after the first (largest) tensors no new memory is touched. The pool only keeps
what was live at one time, so peak memory stays what the merge needed anyway.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    import torch

_active = threading.local()
T = TypeVar("T")


class BufferPool:
    """Free byte buffers plus the ones lent out (by data pointer), shared by the reader and compute threads."""

    def __init__(self) -> None:
        self._free: list[torch.Tensor] = []
        self._lent: dict[int, torch.Tensor] = {}
        self._lock = threading.Lock()
        self.allocated_bytes = 0  # new memory the pool asked for (the rest was reused)

    def empty(self, shape: tuple[int, ...] | torch.Size, dtype: torch.dtype) -> torch.Tensor:
        """An uninitialised tensor of `shape` and `dtype` on a pooled buffer (give it back with `give`)."""
        import torch

        numel = 1
        for d in shape:
            numel *= int(d)
        nbytes = max(numel * dtype.itemsize, 1)
        with self._lock:
            fits = [i for i, b in enumerate(self._free) if b.numel() >= nbytes]
            if fits:  # best fit: the smallest free buffer that is large enough
                buf = self._free.pop(min(fits, key=lambda i: self._free[i].numel()))
            else:
                buf = torch.empty(nbytes, dtype=torch.uint8)
                self.allocated_bytes += nbytes
            self._lent[buf.data_ptr()] = buf
        return buf[: numel * dtype.itemsize].view(dtype).view(tuple(shape))

    def give(self, tensor: torch.Tensor, keep_alive: torch.Tensor | None = None) -> None:
        """Return the buffer `tensor` lives on; ignored for tensors the pool did not lend, and for the
        one `keep_alive` (an output still to be written) lives on, which the pool forgets instead."""
        ptr = tensor.untyped_storage().data_ptr()
        with self._lock:
            buf = self._lent.pop(ptr, None)
            if buf is None:
                return
            if keep_alive is not None and keep_alive.untyped_storage().data_ptr() == ptr:
                return  # the caller still needs it: dropped from the pool, freed by Python when done
            self._free.append(buf)

    @contextmanager
    def scope(self) -> Iterator[list[torch.Tensor]]:
        """While active on this thread, `empty_like` lends from this pool; the list collects what it lent."""
        taken: list[torch.Tensor] = []
        previous = getattr(_active, "frame", None)
        _active.frame = (self, taken)
        try:
            yield taken
        finally:
            _active.frame = previous


def empty(shape: tuple[int, ...] | torch.Size, dtype: torch.dtype, device: torch.device | str | None = None) -> torch.Tensor:
    """`torch.empty(shape, dtype=dtype, device=device)`, from the active pool when the engine is computing an
    item and the device is the CPU (the default)."""
    frame = getattr(_active, "frame", None)
    if frame is None or (device is not None and str(device) != "cpu"):
        import torch

        return torch.empty(tuple(shape), dtype=dtype, device=device)
    pool, taken = frame
    out = pool.empty(shape, dtype)
    taken.append(out)
    return out


def empty_like(t: torch.Tensor) -> torch.Tensor:
    """`torch.empty_like(t)` (contiguous), from the active pool when the engine is computing an item."""
    return empty(t.shape, t.dtype, t.device)


def release(t: torch.Tensor) -> None:
    """Hand a temporary from `empty`/`empty_like` back before the item ends, so the method's next
    temporary reuses its buffer (a no-op outside the engine)."""
    frame = getattr(_active, "frame", None)
    if frame is None:
        return
    pool, taken = frame
    for i, x in enumerate(taken):
        if x is t:
            del taken[i]
            pool.give(t)
            return


def in_this_scope(fn: Callable[..., T]) -> Callable[..., T]:
    """`fn`, run (in whatever thread) with the calling thread's active pool: for methods' worker threads."""
    frame = getattr(_active, "frame", None)

    def run(*args: Any, **kwargs: Any) -> T:
        previous = getattr(_active, "frame", None)
        _active.frame = frame
        try:
            return fn(*args, **kwargs)
        finally:
            _active.frame = previous

    return run
