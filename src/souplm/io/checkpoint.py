"""Opening model checkpoints: a directory of safetensors shards (or pickled .bin, on request).

A `Checkpoint` is lazy: opening one reads headers only. Tensors come out one at a time, so the
engine's memory is bounded by the largest tensor, not by the model.
"""

from __future__ import annotations

import hashlib
import json
import os
import zipfile
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING

from ..arch.layouts import GENERIC, Layout, account, detect_layout
from ..errors import SoupError
from .checkdir import check_index_agrees, contained_file, read_config, read_index, unlisted_shards
from .dtypes import FLOAT32, DType, dtype_of, torch_dtype
from .hub import resolve_model
from .jsonsafe import load_json
from .safetensors_file import SafetensorsFile

if TYPE_CHECKING:
    import torch

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
EMBED = "model.embed_tokens.weight"
LM_HEAD = "lm_head.weight"


class Checkpoint:
    def __init__(self, path: str | os.PathLike, allow_pickle: bool = False, generic_layout: bool = False):
        self.path = resolve_model(path, allow_pickle)  # a local path, or the snapshot of a Hub id
        if not self.path.exists():
            raise SoupError(f"model not found: {self.path}")
        self.allow_pickle = allow_pickle
        self._files: dict[Path, SafetensorsFile | dict[str, torch.Tensor]] = {}
        self._where: dict[str, Path] = {}  # tensor name -> file
        self._index()
        # generic_layout: an unknown layout reads as canonical = stored name (only with a mapping spec).
        fallback = GENERIC if generic_layout else None
        self.layout: Layout = detect_layout(self._where, where=str(self.path), fallback=fallback,
                                            shape=self.shape, config=self._config_or_none())
        # Every stored tensor in exactly one place: the LM (canonical name), extra (outside the LM, by
        # the key it lines up by across models) or dropped (declared buffers, with the reason).
        acc = account(self.layout, self._where, str(self.path))
        self._canonical: dict[str, str] = acc.lm
        self._extra: dict[str, str] = acc.extra
        self.dropped: dict[str, str] = acc.dropped

    # -- discovery ---------------------------------------------------------------------------
    def _index(self) -> None:
        """Find the weight files (see io/checkdir.py for what an index and its shards must satisfy)."""
        p = self.path
        index: Path | None = None
        weight_map: dict[str, Path] = {}
        if p.is_file():
            files = [p]
        else:
            idx = p / "model.safetensors.index.json"
            bin_idx = p / "pytorch_model.bin.index.json"
            if idx.is_file():
                index, weight_map = idx, read_index(idx, p, ".safetensors")
            elif list(p.glob("*.safetensors")):
                files = [contained_file(p, f.name, str(p)) for f in sorted(p.glob("*.safetensors"))]
            elif bin_idx.is_file():
                index, weight_map = bin_idx, read_index(bin_idx, p, ".bin")
            elif list(p.glob("*.bin")):
                files = [contained_file(p, f.name, str(p)) for f in sorted(p.glob("*.bin"))]
            else:
                raise SoupError(f"{p}: no .safetensors or .bin weight files found")
            if index is not None:
                files = sorted(set(weight_map.values()))
                unlisted_shards(p, files, ".safetensors" if index is idx else ".bin", index)
        for f in files:
            if f.suffix == ".safetensors":
                st = SafetensorsFile(f)
                self._files[f] = st
                names = st.tensors
            else:
                sd = self._load_pickle(f)
                self._files[f] = sd
                names = sd
            for name in names:
                if name in self._where:
                    raise SoupError(f"{self.path}: tensor {name} is stored twice ({self._where[name].name}, {f.name})")
                self._where[name] = f
        if index is not None:
            check_index_agrees(index, weight_map, {f: self._files[f].keys() if isinstance(self._files[f], dict)
                                                   else self._files[f].tensors for f in files})
        if not self._where:
            raise SoupError(f"{self.path}: the checkpoint holds no tensors")

    def _load_pickle(self, f: Path) -> dict[str, torch.Tensor]:
        if not self.allow_pickle:
            raise SoupError(
                f"{f} is a pickled checkpoint; pickles can run code when loaded. "
                "Pass --allow-pickle (allow_pickle: true) to load it with weights_only=True"
            )
        import torch

        try:
            # A legacy (pre-zip) pickle cannot be memory-mapped; it is read whole, still weights-only.
            sd = torch.load(f, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(f))
        except Exception as e:  # noqa: BLE001  (torch raises many types for bad pickles)
            raise SoupError(f"{f} could not be loaded as a weights-only checkpoint: {type(e).__name__}") from None
        if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
            raise SoupError(f"{f} is not a state dict of tensors")
        return sd

    # -- metadata ----------------------------------------------------------------------------
    @cached_property
    def config(self) -> dict:
        return read_config((self.path if self.path.is_dir() else self.path.parent) / "config.json")

    def _config_or_none(self) -> dict | None:
        """The config for layout detection; an unreadable one is reported later, where it is used."""
        try:
            return self.config
        except SoupError:
            return None

    @property
    def names(self) -> list[str]:
        return list(self._where)

    @property
    def tied(self) -> bool:
        """True when lm_head is not stored and the embedding serves as output projection."""
        return LM_HEAD not in self._canonical and EMBED in self._canonical

    def canonical_names(self) -> list[str]:
        names = list(self._canonical)
        if self.tied:
            names.append(LM_HEAD)
        return names

    def extra_names(self) -> list[str]:
        """Stored tensors outside the language model (vision tower, projector, ...); dropped buffers are not."""
        return list(self._extra.values())

    def extra_keys(self) -> dict[str, str]:
        """Key -> stored name of the tensors outside the LM; keys line the namings of one part up
        (`vision_tower.x` is `model.vision_tower.x` in memory and `vision_tower.x` on disk)."""
        return dict(self._extra)

    def extra_key(self, name: str) -> str:
        return self.layout.extra_key(name)

    def stored_name(self, canonical: str) -> str:
        """The stored name of a canonical LM tensor (or of a non-LM tensor by its key)."""
        if canonical == LM_HEAD and self.tied:
            canonical = EMBED
        try:
            return self._canonical[canonical]
        except KeyError:
            if canonical in self._extra:
                return self._extra[canonical]
            raise SoupError(f"{self.path}: has no tensor {canonical}") from None

    # -- tensors -----------------------------------------------------------------------------
    def _raw(self, name: str, dtype=None) -> torch.Tensor:
        try:
            f = self._where[name]
        except KeyError:
            raise SoupError(f"{self.path}: has no tensor {name}") from None
        src = self._files[f]
        return src.get(name, dtype) if isinstance(src, SafetensorsFile) else src[name]

    def shape(self, name: str) -> tuple[int, ...]:
        src = self._files[self._where[name]]
        return tuple(src.tensors[name].shape) if isinstance(src, SafetensorsFile) else tuple(src[name].shape)

    def dtype(self, name: str) -> DType:
        src = self._files[self._where[name]]
        return src.tensors[name].dtype if isinstance(src, SafetensorsFile) else dtype_of(src[name].dtype)

    def nbytes(self, name: str) -> int:
        n = 1
        for d in self.shape(name):
            n *= d
        return n * self.dtype(name).itemsize

    def get(self, name: str, dtype=FLOAT32) -> torch.Tensor:
        """A fresh tensor by stored name, converted to `dtype` (None: as stored)."""
        if isinstance(self._files.get(self._where.get(name)), SafetensorsFile):
            return self._raw(name, dtype)  # read and converted in one go, always a fresh tensor
        dtype = torch_dtype(dtype)
        t = self._raw(name)  # a pickled state dict's tensor is shared: hand out a copy
        return t.clone() if dtype is None or t.dtype == dtype else t.to(dtype)

    def read_into(self, name: str, out: torch.Tensor) -> torch.Tensor:
        """Fill `out` (shaped like tensor `name`) with its values, converted to out's dtype."""
        src = self._files[self._where[name]] if name in self._where else None
        if src is None:
            raise SoupError(f"{self.path}: has no tensor {name}")
        if isinstance(src, SafetensorsFile):
            return src.read_into(name, out)
        return out.copy_(src[name])

    def read_bytes_into(self, name: str, view: memoryview) -> None:
        """The stored bytes of tensor `name` (safetensors only) into `view`, a buffer of exactly its size."""
        src = self._files[self._where[name]] if name in self._where else None
        if not isinstance(src, SafetensorsFile):
            raise SoupError(f"{self.path}: tensor {name} is not stored in safetensors")
        src.read_bytes_into(name, view)

    def mapped_bytes(self, name: str, prefetch: bool = False):
        """The stored bytes of tensor `name` (safetensors only) as a read-only view of the mapped file, or
        None where it cannot be mapped (SafetensorsFile.mapped_bytes); `unmap_bytes` when done with them."""
        src = self._files[self._where[name]] if name in self._where else None
        if not isinstance(src, SafetensorsFile):
            raise SoupError(f"{self.path}: tensor {name} is not stored in safetensors")
        return src.mapped_bytes(name, prefetch)

    def unmap_bytes(self, name: str) -> None:
        self._files[self._where[name]].unmap_bytes(name)

    @property
    def is_safetensors(self) -> bool:
        return all(isinstance(src, SafetensorsFile) for src in self._files.values())

    def get_canonical(self, canonical: str, dtype=FLOAT32) -> torch.Tensor:
        return self.get(self.stored_name(canonical), dtype)

    def get_rows(self, name: str, start: int, stop: int, dtype=FLOAT32) -> torch.Tensor:
        """Rows [start, stop) of dim 0 of a stored tensor; from safetensors only those bytes are read."""
        try:
            src = self._files[self._where[name]]
        except KeyError:
            raise SoupError(f"{self.path}: has no tensor {name}") from None
        t = src.get_rows(name, start, stop) if isinstance(src, SafetensorsFile) else src[name][start:stop].clone()
        dtype = torch_dtype(dtype)
        return t if dtype is None or t.dtype == dtype else t.to(dtype)

    def weight_files(self) -> list[Path]:
        return sorted(self._files)

    def close(self) -> None:
        for src in self._files.values():
            if isinstance(src, SafetensorsFile):
                src.close()


def open_checkpoint(
    path: str | os.PathLike, allow_pickle: bool = False, generic_layout: bool = False
) -> Checkpoint:
    if "+" in str(path) and not Path(path).exists():  # BASE+ADAPTER: a PEFT LoRA applied on read (souplm.lora)
        from ..lora import open_with_adapters

        return open_with_adapters(path, allow_pickle=allow_pickle, generic_layout=generic_layout)  # type: ignore[return-value]
    return Checkpoint(path, allow_pickle=allow_pickle, generic_layout=generic_layout)


def _hash_cache_path() -> Path:
    root = Path(os.environ.get("SOUPLM_CACHE", Path.home() / ".cache" / "souplm"))
    return root / "content_hashes.json"


_MEMO_READ: tuple[tuple, dict] | None = None  # (the memo file's identity when parsed, its entries)


def _memo() -> dict:
    """The memo's entries, parsed once per process while the file stays the same (a merge asks once per input
    file; parsing a memo of thousands of entries each time cost a few tenths of a second)."""
    global _MEMO_READ
    path = _hash_cache_path()
    try:  # a memo only: anything unreadable, too deep or of the wrong shape is ignored and rewritten
        st = path.stat()
        ident = (str(path), st.st_size, st.st_mtime_ns, st.st_ino)
        if _MEMO_READ is not None and _MEMO_READ[0] == ident:
            return _MEMO_READ[1]
        cache = load_json(path.read_bytes(), str(path), max_depth=2)
    except (OSError, SoupError):
        return {}
    cache = cache if isinstance(cache, dict) else {}
    _MEMO_READ = (ident, cache)
    return cache


def _live(key: str) -> bool:
    """Whether a memo entry can still hit: its file exists with the identity the key records."""
    where, _, ident = key.removeprefix("file:").rpartition("|")
    try:
        st = os.stat(where)
    except OSError:
        return False
    return ident == f"{st.st_size}:{st.st_mtime_ns}:{st.st_ino}:{st.st_ctime_ns}"


def _memo_store(key: str, digest: str) -> None:
    """Add an entry, dropping those that can never hit again (files removed or rewritten), so the memo holds
    about one entry per live weight file instead of growing with every file ever hashed."""
    cache_file = _hash_cache_path()
    cache = {k: v for k, v in _memo().items() if k != key and _live(k)}
    cache[key] = digest
    try:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache_file.with_name(f".{cache_file.name}.{os.getpid()}")
        tmp.write_text(json.dumps(cache))
        os.replace(tmp, cache_file)
    except OSError:
        pass  # the cache is an optimisation; a read-only home must not break merging


def plain_sha256(path: str | os.PathLike) -> str:
    """The sha256 of a file's bytes, what `sha256sum FILE` prints (always read)."""
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def file_sha256(path: str | os.PathLike) -> str:
    """`plain_sha256`, memoised where that is provably safe.

    Size and mtime can be restored by hand (touch -d), but inode and ctime cannot, so a file rewritten in
    place or replaced always misses the memo and is read again.
    """
    p = Path(path).resolve()
    st = p.stat()
    key = f"file:{p}|{st.st_size}:{st.st_mtime_ns}:{st.st_ino}:{st.st_ctime_ns}"
    hit = _memo().get(key)
    if isinstance(hit, str) and len(hit) == 64:
        return hit
    digest = plain_sha256(p)
    _memo_store(key, digest)
    return digest


def content_hash(path: str | os.PathLike) -> str:
    """sha256 over a model's weight files: each file's name and the sha256 of its bytes (`file_sha256`).

    This is the identity the evaluation cache and coefficient tables use: two directories with the same
    weights hash the same, and a rewritten file is re-hashed.
    """
    p = Path(path).resolve()
    files = [p] if p.is_file() else sorted(f for f in p.iterdir() if f.suffix in WEIGHT_SUFFIXES)
    if not files:
        raise SoupError(f"{p}: no weight files to hash")
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode() + b"\0")
        h.update(bytes.fromhex(file_sha256(f)))
    return h.hexdigest()
