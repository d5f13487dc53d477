"""Tensor element types without importing torch.

A merge that runs on the fused kernels (`souplm.engine.execute_fused`) never needs torch, and importing it costs about
a second, as long as the whole merge of a 370M-parameter model. Headers, plans and writers therefore
speak of dtypes as `DType` values (the safetensors name and the item size); code that computes with
torch asks a `DType` for its `.torch` twin, and only then is torch imported.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class DType:
    code: str  # the safetensors header name: "BF16"
    itemsize: int
    torch_name: str  # the attribute of the torch module: "bfloat16"

    @property
    def torch(self) -> Any:
        import torch

        return getattr(torch, self.torch_name)

    def __str__(self) -> str:
        return self.torch_name


_ALL = [
    DType("F64", 8, "float64"), DType("F32", 4, "float32"), DType("F16", 2, "float16"), DType("BF16", 2, "bfloat16"),
    DType("I64", 8, "int64"), DType("I32", 4, "int32"), DType("I16", 2, "int16"), DType("I8", 1, "int8"),
    DType("U8", 1, "uint8"), DType("BOOL", 1, "bool"),
]
BY_CODE: dict[str, DType] = {d.code: d for d in _ALL}
BY_NAME: dict[str, DType] = {d.torch_name: d for d in _ALL}
FLOAT32 = BY_CODE["F32"]


def dtype_of(value: Any) -> DType:
    """A `DType` from a DType, a torch.dtype, or a name ("bfloat16", "BF16")."""
    if isinstance(value, DType):
        return value
    if isinstance(value, str):
        found = BY_NAME.get(value) or BY_CODE.get(value)
        if found is None:
            raise ValueError(f"unknown dtype {value!r}")
        return found
    name = str(value).removeprefix("torch.")  # a torch.dtype, without importing torch to test for one
    if name not in BY_NAME:
        raise ValueError(f"unsupported dtype {value!r}")
    return BY_NAME[name]


def torch_dtype(value: Any) -> Any:
    """The torch.dtype for a DType, a torch.dtype or a name; None stays None."""
    return None if value is None else dtype_of(value).torch
