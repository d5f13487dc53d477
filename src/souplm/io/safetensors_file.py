"""Minimal safetensors reader and streaming writer.

We parse the format ourselves (8-byte little-endian header length, JSON header, raw data) because
the engine needs two things the stock library does not give: a validation of every offset against
the file size up front (a truncated shard is named before any work starts), and a writer that emits
the header first and then streams tensor bytes one tensor at a time, so a merge never holds a shard
in memory.
"""

from __future__ import annotations

import json
import os
import struct
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import SoupError
from .dtypes import BY_CODE, DType, dtype_of

if TYPE_CHECKING:
    import torch

_MAX_HEADER = 100 * 1024 * 1024


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
    """One .safetensors file. Tensors are read with `readinto` into fresh buffers rather than mapped:
    mapped pages count as resident memory, which would make peak RSS grow with the model."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        try:
            self._fh = open(self.path, "rb", buffering=0)  # noqa: SIM115  (owned; closed by close())
        except OSError as e:
            raise SoupError(f"cannot open {self.path}: {e.strerror}") from None
        size = os.fstat(self._fh.fileno()).st_size
        self.tensors, self.metadata = _parse_header(self._fh, size, self.path)

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

        self.read_bytes_into(name, memoryview(out.view(torch.uint8).reshape(-1).numpy()))

    def read_bytes_into(self, name: str, view: memoryview) -> None:
        """The stored bytes of tensor `name` into the writable buffer `view` (exactly its size)."""
        info = self.tensors[name]
        if not info.nbytes:
            return
        got = os.preadv(self._fh.fileno(), [view], info.start)
        if got != info.nbytes:
            raise SoupError(f"{self.path}: short read of tensor {name} ({got} of {info.nbytes} bytes)")

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
            got = os.preadv(self._fh.fileno(), [view], info.start + start * row_bytes)
            if got != want:
                raise SoupError(f"{self.path}: short read of rows of tensor {name} ({got} of {want} bytes)")
        return out

    def close(self) -> None:
        self._fh.close()


_local = threading.local()


def _scratch(nbytes: int) -> torch.Tensor:
    """This thread's reusable byte buffer, grown to the largest tensor it has read."""
    import torch

    buf = getattr(_local, "buf", None)
    if buf is None or buf.numel() < nbytes:
        buf = _local.buf = torch.empty(nbytes, dtype=torch.uint8)
    return buf


def _parse_header(fh, size: int, path: Path) -> tuple[dict[str, TensorInfo], dict]:
    if size < 8:
        raise SoupError(f"{path} is truncated or not a safetensors file ({size} bytes)")
    (n,) = struct.unpack("<Q", fh.read(8))
    if n > _MAX_HEADER or 8 + n > size:
        raise SoupError(f"{path} is corrupted or truncated: header length {n} exceeds file size {size}")
    try:
        header = json.loads(fh.read(n))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise SoupError(f"{path} is corrupted: its safetensors header is not valid JSON") from None
    if not isinstance(header, dict):
        raise SoupError(f"{path} is corrupted: its safetensors header is not an object")
    metadata = header.pop("__metadata__", None) or {}
    base = 8 + n
    tensors: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        try:
            dtype = BY_CODE[entry["dtype"]]
            shape = tuple(int(d) for d in entry["shape"])
            lo, hi = (int(x) for x in entry["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise SoupError(f"{path}: tensor {name} has a malformed or unsupported header entry") from None
        numel = 1
        for d in shape:
            numel *= d
        if hi - lo != numel * dtype.itemsize or lo < 0:
            raise SoupError(f"{path}: tensor {name} has data offsets that do not match its shape {shape}")
        if base + hi > size:
            raise SoupError(
                f"{path} is truncated: tensor {name} ends at byte {base + hi} but the file has {size}"
            )
        tensors[name] = TensorInfo(dtype, shape, base + lo, base + hi)
    return tensors, metadata


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
        self._fh = open(path, "wb")  # noqa: SIM115  (owned; closed by close())
        self._fh.write(struct.pack("<Q", len(raw)) + raw)
        self._next = 0
        self.total_bytes = offset

    def write(self, name: str, tensor: torch.Tensor) -> None:
        import torch

        t = tensor.contiguous()
        self.write_bytes(name, t.view(torch.uint8).reshape(-1).numpy() if t.numel() else b"")

    def write_bytes(self, name: str, data) -> None:
        """The next tensor's stored bytes (any buffer of exactly its size), in header order."""
        expect, nbytes = self._order[self._next]
        if name != expect:  # the planner fixes the order; a mismatch is a bug, not bad input
            raise RuntimeError(f"writer expected tensor {expect}, got {name}")
        if memoryview(data).nbytes != nbytes:
            raise RuntimeError(f"tensor {name}: {memoryview(data).nbytes} bytes, header says {nbytes}")
        self._fh.write(data)
        self._next += 1

    @property
    def done(self) -> bool:
        return self._next == len(self._order)

    def close(self) -> None:
        self._fh.close()
