"""LoRA adapters in PEFT's formats: as merge inputs (`base+adapter`), merged into adapters, extracted.

See docs/LORA.md.
"""

from .adapter import LoraAdapter, is_adapter_dir
from .checkpoint import LoraCheckpoint, join_spec, open_with_adapters, split_spec

__all__ = ["LoraAdapter", "LoraCheckpoint", "is_adapter_dir", "join_spec", "open_with_adapters", "split_spec"]
