"""The golden fixtures' input models, rebuilt bit-for-bit from seeds (no transformers needed to rebuild).

scripts/golden/build.py builds each tiny model with transformers, notes every saved tensor's name and
shape, and replaces its values with `values(...)` below; it checks that `materialize` writes exactly the
bytes transformers' `save_pretrained` wrote (sha256 in tests/golden/manifest.json). The tests then rebuild
the inputs from the manifest alone: config.json and tokenizer files are committed under
tests/golden/models/<name>/, the weights are regenerated here.

A model is a base (seeded values) or a fine-tune of one: base + noise * N(0, 1) with seeds of its own
(see `values`).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import zlib
from pathlib import Path

import torch
from safetensors.torch import save_file

HERE = Path(__file__).parent
MODELS = HERE / "models"
MANIFEST = HERE / "manifest.json"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _gen(seed: int, name: str) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))


def _is_norm(name: str, shape: list[int]) -> bool:
    low = name.lower()
    return len(shape) == 1 and any(k in low for k in ("norm", "ln_", ".ln", "layernorm"))


def base_values(name: str, shape: list[int], seed: int) -> torch.Tensor:
    """A base model's tensor: N(0, 0.1) (norm scales 1 + N(0, 0.1)), fp32."""
    v = torch.randn(shape, generator=_gen(seed, name), dtype=torch.float32) * 0.1
    return v + 1.0 if _is_norm(name, shape) else v


def values(name: str, shape: list[int], spec: dict) -> torch.Tensor:
    """The fp32 values of tensor `name` of the model described by `spec` (a manifest "models" entry):
    base + sign * sum(noise * N(0, 1) per delta seed), each part on a grid of `grid` when set (exact sums:
    TIES' zero-sum and tie cases), times `scale` when set."""
    grid = spec.get("grid")

    def q(t: torch.Tensor) -> torch.Tensor:
        return t if grid is None else torch.round(t / grid) * grid

    v = q(base_values(name, shape, spec["base_seed"]))
    if spec.get("deltas"):
        d = torch.zeros(shape, dtype=torch.float32)
        for seed, noise in spec["deltas"]:
            d = d + noise * torch.randn(shape, generator=_gen(seed, name), dtype=torch.float32)
        v = v + spec.get("sign", 1) * q(d)
    if spec.get("scale") is not None:
        v = v * spec["scale"]
    return v


def tensors_for(spec: dict) -> dict[str, torch.Tensor]:
    dtype = DTYPES[spec["dtype"]]
    return {n: values(n, shape, spec).to(dtype) for n, shape in spec["tensors"]}


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def materialize(name: str, spec: dict, root: Path) -> Path:
    """Write model `name` under `root`: its committed side files and its seeded weights."""
    out = root / name
    out.mkdir(parents=True, exist_ok=True)
    src = MODELS / spec.get("files_from", name)
    for f in src.iterdir():
        shutil.copyfile(f, out / f.name)
    save_file(tensors_for(spec), str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


def load_manifest() -> dict:
    return json.loads(MANIFEST.read_text())
