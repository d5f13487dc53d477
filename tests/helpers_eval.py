"""Tiny models and task files for the evaluation, sweep and greedy tests (built in a second)."""

from __future__ import annotations

import json
from pathlib import Path

CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "to be or not to be that is the question",
    "question: what is 2 plus 3? answer: 5",
    "all the world's a stage and all the men and women merely players",
    "#### 42 numbers 0123456789 , . ! ? - + = \n",
]


def make_tokenizer():
    """A byte-level BPE tokenizer trained on a few lines: no hub needed."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320, special_tokens=["<eos>", "<bos>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>")


def make_model_dir(path: Path, seed: int = 0, tokenizer=None, noise: float = 0.0, base: Path | None = None) -> Path:
    """Save a tiny random Llama (2 layers, hidden 32) with its tokenizer; `base` + noise makes a variant."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    tok = tokenizer or make_tokenizer()
    torch.manual_seed(seed)
    if base is not None:
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(noise * torch.randn_like(p))
    else:
        cfg = LlamaConfig(
            vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
            bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
            tie_word_embeddings=False,
        )
        model = LlamaForCausalLM(cfg)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def write_task(folder: Path, name: str, spec: dict, rows: list[dict]) -> Path:
    """A task YAML (as JSON, which YAML reads) plus its jsonl data."""
    folder.mkdir(parents=True, exist_ok=True)
    data = folder / f"{name}.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    spec = {"name": name, "data": data.name, **spec}
    path = folder / f"{name}.json"
    path.write_text(json.dumps(spec))
    return path


def text_task(folder: Path, name: str = "text-ppl") -> Path:
    return write_task(folder, name, {"kind": "perplexity", "context_length": 16}, [{"text": t} for t in CORPUS])


def mc_task(folder: Path, name: str = "mc") -> Path:
    rows = [
        {"query": "the quick brown fox", "choices": ["jumps", "sleeps", "stage"], "gold": 0},
        {"query": "to be or not to", "choices": ["be", "fox", "dog"], "gold": "be"},
        {"query": "all the world's a", "choices": ["dog", "stage"], "gold": "B"},
        {"query": "what is 2 plus 3?", "choices": ["4", "5", "6"], "gold": 1},
    ]
    return write_task(folder, name, {"kind": "multiple_choice"}, rows)


def make_llava_dir(path: Path, seed: int = 0) -> Path:
    """A tiny LLaVA (CLIP tower 16x16 px, 2+2 layers) with its processor, saved like a real one."""
    import torch
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    tok = make_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": ["<image>"]})
    image_id = tok.convert_tokens_to_ids("<image>")
    text = LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )
    vision = CLIPVisionConfig(image_size=16, patch_size=8, hidden_size=32, intermediate_size=64,
                              num_hidden_layers=2, num_attention_heads=2)
    cfg = LlavaConfig(vision_config=vision, text_config=text, image_token_index=image_id, vision_feature_layer=-2)
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(cfg)
    proc = LlavaProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16}),
        tokenizer=tok, patch_size=8, vision_feature_select_strategy="default", image_token="<image>",
        num_additional_image_tokens=1,
    )
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    proc.save_pretrained(path)
    return path


def assert_card_rebuilds(model_dir, tmp_path) -> None:
    """The card's reproduce step (`souplm merge souplm_recipe.yaml -o OUT`), run from an unrelated working directory,
    writes the same weight bytes as `model_dir` holds (issue 12 §4: every card's command rebuilds its output)."""
    import subprocess
    import sys
    from pathlib import Path

    model_dir = Path(model_dir)
    assert "souplm_recipe.yaml" in (model_dir / "README.md").read_text()
    elsewhere = Path(tmp_path) / "rebuild-cwd"
    elsewhere.mkdir(exist_ok=True)
    r = subprocess.run([sys.executable, "-m", "souplm", "merge", str(model_dir / "souplm_recipe.yaml"), "-o", "again",
                        "--quiet"], cwd=elsewhere, capture_output=True, text=True, timeout=300, check=False)
    assert r.returncode == 0, r.stderr
    files = sorted(p.name for p in model_dir.glob("*.safetensors"))
    assert files and files == sorted(p.name for p in (elsewhere / "again").glob("*.safetensors"))
    for name in files:
        assert (model_dir / name).read_bytes() == (elsewhere / "again" / name).read_bytes(), name
