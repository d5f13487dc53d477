"""`base + adapters` presented as one checkpoint, so every method and executor reads it unchanged.

`LoraCheckpoint` has the interface of `souplm.io.checkpoint.Checkpoint` (names, shape, dtype, get,
read_into, get_rows, layout, config, ...): tensors no adapter touches come from the base as they
are; a touched tensor is read in float32, each adapter's change applied in order (mergekit's
`model+lora` order), then converted. Nothing is materialised beyond the one tensor asked for.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import SoupError
from ..io.dtypes import FLOAT32, torch_dtype
from .adapter import LoraAdapter, is_adapter_dir

if TYPE_CHECKING:
    import torch

SEP = "+"


def split_spec(spec: str | os.PathLike) -> tuple[str, list[str]] | None:
    """'BASE+ADAPTER[+ADAPTER...]' -> (base, adapters); None when `spec` is a plain path."""
    s = str(spec)
    if SEP not in s or Path(s).exists():
        return None
    base, *adapters = s.split(SEP)
    if not base or not all(adapters):
        raise SoupError(f"model {s!r}: expected BASE+ADAPTER (mergekit's model+lora syntax)")
    return base, adapters


def join_spec(base: str, adapters: list[str]) -> str:
    for p in [base, *adapters]:
        if SEP in str(p):
            raise SoupError(f"path {p!r} contains '+', which separates a base from its adapters")
    return SEP.join([str(base), *map(str, adapters)])


class LoraCheckpoint:
    def __init__(self, base: Any, adapters: list[LoraAdapter]):
        self.base = base
        self.adapters = adapters
        self.spec = join_spec(str(base.path), [str(a.path) for a in adapters])
        self._touched: dict[str, list[LoraAdapter]] = {}
        stored = set(base.names)
        for ad in adapters:
            for name in ad.touches():
                if name not in stored:
                    if name == "lm_head.weight" and getattr(base, "tied", False):
                        raise SoupError(f"{ad.path}: changes lm_head, which {base.path} ties to its embedding; "
                                        "souplm refuses to untie it silently")
                    raise SoupError(f"{ad.path}: changes {name}, which {base.path} does not have (is the adapter "
                                    "for another base model?)")
                self._touched.setdefault(name, []).append(ad)
        for name, ads in self._touched.items():  # shapes checked now, before any tensor is read
            shape = tuple(base.shape(name))
            for ad in ads:
                mod = ad.modules.get(name)
                if mod is None:
                    continue
                sa = tuple(ad.file.tensors[mod.a_key].shape)
                sb = tuple(ad.file.tensors[mod.b_key].shape)
                if mod.kind == "embedding":
                    got = (sa[1], sb[0])
                else:
                    got = (sa[1], sb[0]) if ad.fan_in_fan_out else (sb[0], sa[1])
                if got != shape:
                    raise SoupError(f"{ad.path}: module {mod.module}: the LoRA delta has shape {list(got)}, "
                                    f"{base.path}'s {name} has {list(shape)}")

    def __getattr__(self, name: str) -> Any:  # path, layout, config, names, shape, dtype, tied, ...
        return getattr(self.base, name)

    @property
    def touched(self) -> list[str]:
        return list(self._touched)

    def get(self, name: str, dtype=FLOAT32) -> torch.Tensor:
        ads = self._touched.get(name)
        if not ads:
            return self.base.get(name, dtype)
        want = torch_dtype(dtype) or self.base.dtype(name).torch
        w = self.base.get(name, "float64" if want == torch_dtype("float64") else FLOAT32)  # float64 asked: kept
        for ad in ads:
            w = ad.apply(name, w)
        return w if w.dtype == want else w.to(want)

    def read_into(self, name: str, out: torch.Tensor) -> torch.Tensor:
        if name not in self._touched:
            return self.base.read_into(name, out)
        return out.copy_(self.get(name))

    def get_canonical(self, canonical: str, dtype=FLOAT32) -> torch.Tensor:
        return self.get(self.base.stored_name(canonical), dtype)

    def get_rows(self, name: str, start: int, stop: int, dtype=FLOAT32) -> torch.Tensor:
        if name not in self._touched:
            return self.base.get_rows(name, start, stop, dtype)
        return self.get(name, dtype)[start:stop].clone()

    @property
    def is_safetensors(self) -> bool:
        return False  # the fused executor reads stored bytes; adapted tensors go through torch

    def read_bytes_into(self, name: str, view: memoryview) -> None:
        raise SoupError(f"{self.spec}: adapted tensors have no stored bytes")

    def weight_files(self) -> list[Path]:
        return list(self.base.weight_files()) + [a.file.path for a in self.adapters]

    def close(self) -> None:
        for a in self.adapters:
            a.close()
        self.base.close()


def open_with_adapters(spec: str | os.PathLike, allow_pickle: bool = False, generic_layout: bool = False) -> LoraCheckpoint:
    """Open 'BASE+ADAPTER[+...]' as one checkpoint."""
    from ..io.checkpoint import Checkpoint

    parts = split_spec(spec)
    if parts is None:
        raise SoupError(f"{spec}: not of the form BASE+ADAPTER")
    base_path, adapter_paths = parts
    for p in adapter_paths:
        if not Path(p).exists():
            raise SoupError(f"adapter not found: {p}")
        if not is_adapter_dir(p):
            raise SoupError(f"{p}: not a PEFT adapter directory (no adapter_config.json)")
    adapters = [LoraAdapter(p) for p in adapter_paths]
    base = Checkpoint(base_path, allow_pickle=allow_pickle, generic_layout=generic_layout)
    return LoraCheckpoint(base, adapters)
