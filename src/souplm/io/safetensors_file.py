"""Minimal safetensors reader and streaming writer.

We parse the format ourselves (8-byte little-endian header length, JSON header, raw data) because
the engine needs two things the stock library does not give: a validation of every offset against
the file size up front (a truncated shard is named before any work starts), and a writer that emits
the header first and then streams tensor bytes one tensor at a time, so a merge never holds a shard
in memory.

Every header is validated before a byte of data is read (`_parse_header`): bounded size and JSON nesting,
no duplicate names, exact dtype/shape/offset types, and every tensor's bytes inside the data section and
disjoint from every other tensor's (aliased tensors would make one input count twice in a merge).

Every read and write goes through `pread_full` / `write_full`, which loop until the whole buffer is
transferred: Linux moves at most 0x7ffff000 bytes per `preadv`/`write` call, less than one embedding of a
70B-class model. The per-call cap is `IO_CHUNK` (env `SOUPLM_IO_CHUNK`, for tests).
"""

from __future__ import annotations

import json
import mmap
import os
import struct
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import SoupError, short_repr
from .dtypes import BY_CODE, DType, dtype_of
from .jsonsafe import load_json

if TYPE_CHECKING:
    import torch

_MAX_HEADER = 100 * 1024 * 1024  # the safetensors format's own bound
# Largest transfer asked of the kernel in one call (Linux's own cap is 0x7ffff000 bytes).
IO_CHUNK = int(os.environ.get("SOUPLM_IO_CHUNK") or 0x7FFFF000)


def pread_full(fd: int, view: memoryview, offset: int, path: Path | str, what: str) -> None:
    """Fill `view` from file offset `offset`, looping over short reads; end of file is a SoupError."""
    view = memoryview(view).cast("B")
    want, done = view.nbytes, 0
    while done < want:
        try:
            got = os.preadv(fd, [view[done : done + min(IO_CHUNK, want - done)]], offset + done)
        except InterruptedError:  # pragma: no cover  (PEP 475 retries; kept for clarity)
            continue
        except OSError as e:
            raise SoupError(f"cannot read {what} from {path}: {e.strerror}") from None
        if got <= 0:
            raise SoupError(f"{path}: unexpected end of file reading {what} ({done} of {want} bytes; "
                            "was the file truncated or rewritten while souplm ran?)")
        done += got


# Linux >= 5.14: fault the pages of a range in (page-cache pages mapped, none read twice); older kernels
# refuse it with EINVAL and get MADV_WILLNEED's readahead instead.
MADV_POPULATE_READ = getattr(mmap, "MADV_POPULATE_READ", 22 if sys.platform.startswith("linux") else None)


def write_full(fd: int, data, path: Path | str) -> None:
    """Write all of `data` (any buffer) at the file's position, looping over partial writes."""
    view = memoryview(data).cast("B")
    done = 0
    while done < view.nbytes:
        done += os.write(fd, view[done : done + min(IO_CHUNK, view.nbytes - done)])


@dataclass(frozen=True)
class TensorInfo:
    dtype: DType
    shape: tuple[int, ...]
    start: int  # absolute file offset of the first byte
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


class SafetensorsFile:
    """One .safetensors file. Tensors are read with `readinto` into buffers (`get`, `read_bytes_into`), or
    seen in place through a read-only mapping of the file (`mapped_bytes`, the fused executor's inputs: no
    copy and no fresh pages to fault in), whose pages leave the resident set again with `unmap_bytes` (so
    peak RSS stays bounded by the tensors in use, not the model)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        try:
            self._fh = open(self.path, "rb", buffering=0)  # noqa: SIM115  (owned; closed by close())
        except OSError as e:
            raise SoupError(f"cannot open {self.path}: {e.strerror}") from None
        size = os.fstat(self._fh.fileno()).st_size
        self.tensors, self.metadata = _parse_header(self._fh, size, self.path)
        self._map: mmap.mmap | None | bool = None  # False: the file cannot be mapped (read it instead)
        self._map_lock = threading.Lock()

    def mapped_bytes(self, name: str, prefetch: bool = False):
        """The stored bytes of tensor `name` as a read-only NumPy uint8 view of the mapped file, or None
        where the file cannot be mapped (then read it). `prefetch`: ask the kernel to read its pages ahead.
        The file must not be truncated while mapped (a concurrent in-place writer would fault the reader;
        souplm's own writer replaces files rather than rewriting them)."""
        import numpy as np

        info = self.tensors[name]
        with self._map_lock:
            if self._map is None:
                try:
                    self._map = mmap.mmap(self._fh.fileno(), 0, access=mmap.ACCESS_READ)
                except (OSError, ValueError):
                    self._map = False
        if self._map is False or not info.nbytes:
            return None
        # prefetch: map the pages in now, in one call (on the thread that reads the item), not one fault per 64 KiB later
        if prefetch and not self._advise(info, MADV_POPULATE_READ):
            self._advise(info, getattr(mmap, "MADV_WILLNEED", None))
        return np.frombuffer(self._map, dtype=np.uint8, count=info.nbytes, offset=info.start)

    def unmap_bytes(self, name: str) -> None:
        """Drop tensor `name`'s mapped pages from this process's resident set (the page cache keeps them;
        touching them again maps them back)."""
        if isinstance(self._map, mmap.mmap):
            self._advise(self.tensors[name], getattr(mmap, "MADV_DONTNEED", None))

    def _advise(self, info, advice) -> bool:
        """madvise over tensor `info`'s pages; whether the kernel took the advice (it is advice only)."""
        if advice is None or not info.nbytes:
            return False
        start = info.start - info.start % mmap.PAGESIZE
        try:
            self._map.madvise(advice, start, info.start + info.nbytes - start)
        except (OSError, ValueError, AttributeError):
            return False
        return True

    def get(self, name: str, dtype=None) -> torch.Tensor:
        """A fresh tensor holding the stored values, converted to `dtype` when given.

        A conversion reads into a per-thread scratch buffer that is reused across tensors, so only
        the converted tensor is a new allocation (fresh pages cost page faults, a third of a merge's
        system time)."""
        import torch

        info = self.tensors[name]
        return self.read_into(name, torch.empty(info.shape, dtype=dtype_of(dtype or info.dtype).torch))

    def read_into(self, name: str, out: torch.Tensor) -> torch.Tensor:
        """Fill `out` (the tensor's shape, any dtype) with the stored values, converting on the way."""
        info = self.tensors[name]
        if out.dtype == info.dtype.torch or not info.nbytes:
            self._read_into(name, out)
            return out
        scratch = _scratch(info.nbytes)[: info.nbytes]
        self._read_into(name, scratch)
        return out.copy_(scratch.view(info.dtype.torch).view(info.shape))

    def _read_into(self, name: str, out: torch.Tensor) -> None:
        import torch

        if not out.is_contiguous():  # reshape would copy, and the bytes would land in the copy
            raise RuntimeError(f"read_into needs a contiguous tensor for {name}")
        self.read_bytes_into(name, memoryview(out.reshape(-1).view(torch.uint8).numpy()))

    def read_bytes_into(self, name: str, view: memoryview) -> None:
        """The stored bytes of tensor `name` into the writable buffer `view` (exactly its size)."""
        info = self.tensors[name]
        if not info.nbytes:
            return
        if memoryview(view).nbytes != info.nbytes:  # a caller bug, not bad input
            raise RuntimeError(f"tensor {name}: buffer of {memoryview(view).nbytes} bytes, stored {info.nbytes}")
        pread_full(self._fh.fileno(), view, info.start, self.path, f"tensor {name}")

    def get_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows [start, stop) of dim 0 as a fresh tensor: one contiguous byte range, so a process
        that holds a shard of a tensor (FSDP, issue 7) reads only its part of the file."""
        import torch

        info = self.tensors[name]
        if not info.shape:
            return self.get(name)
        rows = info.shape[0]
        start, stop = min(max(start, 0), rows), min(max(stop, start), rows)
        out = torch.empty((stop - start, *info.shape[1:]), dtype=info.dtype.torch)
        row_bytes = info.nbytes // rows if rows else 0
        want = (stop - start) * row_bytes
        if want:
            view = memoryview(out.view(torch.uint8).reshape(-1).numpy())
            pread_full(self._fh.fileno(), view, info.start + start * row_bytes, self.path,
                       f"rows {start}:{stop} of tensor {name}")
        return out

    def close(self) -> None:
        if isinstance(self._map, mmap.mmap):
            try:
                self._map.close()
            except BufferError:
                pass  # views of it are still alive: the mapping goes with the last of them
        self._fh.close()


_local = threading.local()


def _scratch(nbytes: int) -> torch.Tensor:
    """This thread's reusable byte buffer, grown to the largest tensor it has read."""
    import torch

    buf = getattr(_local, "buf", None)
    if buf is None or buf.numel() < nbytes:
        buf = _local.buf = torch.empty(nbytes, dtype=torch.uint8)
    return buf


_MAX_HEADER_DEPTH = 4  # {name: {"shape": [..]}} is depth 3; __metadata__ is a flat str -> str object


def _parse_header(fh, size: int, path: Path) -> tuple[dict[str, TensorInfo], dict]:
    """Read and validate the header of the open file `fh` of `size` bytes (see the module docstring)."""
    if size < 8:
        raise SoupError(f"{path} is truncated or not a safetensors file ({size} bytes)")
    raw8 = bytearray(8)
    pread_full(fh.fileno(), memoryview(raw8), 0, path, "the header length")
    (n,) = struct.unpack("<Q", raw8)
    if n > _MAX_HEADER or 8 + n > size:
        raise SoupError(f"{path} is corrupted or truncated: header length {n} exceeds "
                        f"{'the 100 MiB limit' if n > _MAX_HEADER else f'file size {size}'}")
    raw = bytearray(n)
    pread_full(fh.fileno(), memoryview(raw), 8, path, "the header")
    header = load_json(bytes(raw), f"{path}: its safetensors header", max_depth=_MAX_HEADER_DEPTH)
    if not isinstance(header, dict):
        raise SoupError(f"{path} is corrupted: its safetensors header is not an object")
    metadata = header.pop("__metadata__", None)
    if metadata is None:
        metadata = {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise SoupError(f"{path} is corrupted: its __metadata__ is not an object of strings")
    base = 8 + n
    data_size = size - base
    tensors: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        tensors[name] = _entry(entry, name, base, data_size, path)
    _check_disjoint(tensors, path)
    return tensors, metadata


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _entry(entry, name: str, base: int, data_size: int, path: Path) -> TensorInfo:
    """One tensor's header entry, checked: exact types, offsets matching the shape, inside the data section."""
    shown = short_repr(name)
    if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= entry.keys():
        raise SoupError(f"{path}: tensor {shown} has a malformed header entry (needs dtype, shape, data_offsets)")
    code, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if not isinstance(code, str) or code not in BY_CODE:
        raise SoupError(f"{path}: tensor {shown} has an unsupported dtype {short_repr(code)}")
    dtype = BY_CODE[code]
    if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
        raise SoupError(f"{path}: tensor {shown} has a malformed shape {short_repr(shape)}")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(x) for x in offsets)
            and 0 <= offsets[0] <= offsets[1]):
        raise SoupError(f"{path}: tensor {shown} has malformed data_offsets {short_repr(offsets)}")
    lo, hi = offsets
    if hi > data_size:
        raise SoupError(f"{path} is truncated: tensor {shown} ends at byte {base + hi} "
                        f"but the file has {base + data_size}")
    nbytes = 0 if 0 in shape else dtype.itemsize
    for d in shape:
        nbytes *= d
        if nbytes > data_size:
            break  # already larger than the file: refused below, without multiplying a huge shape out
    if hi - lo != nbytes:
        raise SoupError(f"{path}: tensor {shown} has data offsets {lo}..{hi} that do not match "
                        f"its shape {short_repr(shape)} and dtype {code}")
    return TensorInfo(dtype, tuple(shape), base + lo, base + hi)


def _check_disjoint(tensors: dict[str, TensorInfo], path: Path) -> None:
    """No two tensors may share a byte (aliased tensors would be read, and merged, as two inputs)."""
    prev_name, prev_end = None, 0
    for name, info in sorted(tensors.items(), key=lambda kv: (kv[1].start, kv[1].end)):
        if info.nbytes and info.start < prev_end:
            raise SoupError(f"{path} is corrupted: tensors {short_repr(prev_name)} and {short_repr(name)} "
                            "overlap in the file (their bytes alias)")
        if info.nbytes and info.end > prev_end:
            prev_name, prev_end = name, info.end


def tensor_bytes(tensor: torch.Tensor):
    """A tensor's stored bytes as a buffer that keeps the tensor alive (a write may run in a thread)."""
    import torch

    t = tensor.contiguous()
    return t.reshape(-1).view(torch.uint8).numpy() if t.numel() else b""


class SafetensorsWriter:
    """Writes one shard: the header (all names, dtypes and shapes known up front), then each
    tensor's bytes in header order, one at a time."""

    def __init__(self, path: Path, entries: list[tuple[str, DType, tuple[int, ...]]], metadata=None):
        self.path = path
        header: dict = {"__metadata__": metadata or {"format": "pt"}}
        offset = 0
        self._order: list[tuple[str, int]] = []
        for name, dtype, shape in entries:
            dtype = dtype_of(dtype)
            numel = 1
            for d in shape:
                numel *= d
            nbytes = numel * dtype.itemsize
            header[name] = {"dtype": dtype.code, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            self._order.append((name, nbytes))
            offset += nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # keep tensor data 8-byte aligned
        self._fh = open(path, "wb", buffering=0)  # noqa: SIM115  (owned; closed by close())
        write_full(self._fh.fileno(), struct.pack("<Q", len(raw)) + raw, path)
        self._next = 0
        self.total_bytes = offset

    def write(self, name: str, tensor: torch.Tensor) -> None:
        self.write_bytes(name, tensor_bytes(tensor))

    def write_bytes(self, name: str, data) -> None:
        """The next tensor's stored bytes (any buffer of exactly its size), in header order."""
        expect, nbytes = self._order[self._next]
        if name != expect:  # the planner fixes the order; a mismatch is a bug, not bad input
            raise RuntimeError(f"writer expected tensor {expect}, got {name}")
        if memoryview(data).nbytes != nbytes:
            raise RuntimeError(f"tensor {name}: {memoryview(data).nbytes} bytes, header says {nbytes}")
        write_full(self._fh.fileno(), data, self.path)
        self._next += 1

    @property
    def done(self) -> bool:
        return self._next == len(self._order)

    def close(self) -> None:
        self._fh.close()
