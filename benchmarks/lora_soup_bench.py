#!/usr/bin/env python
"""Learned adapter soup: the low-rank path against the dense path, side by side.

N PEFT LoRA adapters (random factors, r 8 on every attention and MLP projection) over one random
Llama with SmolLM2-135M's widths (hidden 576, MLP 1536, 9 heads / 3 KV heads, vocab 49152, tied
embeddings) and --layers decoder layers. Each configuration runs in its own child process (so peak
RSS is its own) and reports: the time to build the soup, the time of one training step (forward +
backward w.r.t. the alphas, batch x tokens, median of --steps after a warm-up), and peak RSS.

    low_rank   souplm learn's default for BASE+ADAPTER models: y = W0 x + sum_i alpha_i s_i B_i (A_i x)
    dense      the dense learnable soup of the N merged models (every touched weight held N times,
               merged on the fly in each forward and backward)
    base       the base model alone, forward + backward to its input embeddings (the floor)

    python benchmarks/lora_soup_bench.py --adapters 8 --layers 4
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch


def build(workdir: Path, layers: int, n_adapters: int, rank: int) -> tuple[Path, list[Path]]:
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    base = workdir / f"base-l{layers}"
    if not (base / "config.json").is_file():
        torch.manual_seed(0)
        cfg = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=layers,
                          num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True,
                          max_position_embeddings=2048)
        LlamaForCausalLM(cfg).save_pretrained(base)
    adapters = []
    for i in range(n_adapters):
        d = workdir / f"adapter-l{layers}-r{rank}-{i}"
        adapters.append(d)
        if (d / "adapter_model.safetensors").is_file():
            continue
        model = LlamaForCausalLM.from_pretrained(base)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pm = get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=[
                "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
        g = torch.Generator().manual_seed(100 + i)
        with torch.no_grad():
            for n, p in pm.named_parameters():
                if "lora_B" in n:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.01)
        pm.save_pretrained(d)
    return base, adapters


def child(mode: str, base: Path, adapters: list[Path], batch: int, tokens: int, steps: int) -> dict:
    from transformers import AutoModelForCausalLM

    from souplm.learn.lora_soup import build_lora_soup
    from souplm.learn.soup_module import build_soup
    from souplm.lora.checkpoint import open_with_adapters

    torch.manual_seed(0)
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    specs = [open_with_adapters(f"{base}+{a}") for a in adapters]
    if mode == "low_rank":
        soup = build_lora_soup(model, specs, granularity="layer_mapping", activation="softmax")
    elif mode == "dense":
        from souplm.learn.lora_soup import load_adapted

        load_adapted(model, specs[0])
        soup = build_soup(model, specs[1:], base_index=0, granularity="layer_mapping", activation="softmax")
    else:
        soup = None
        model.requires_grad_(False)  # the floor: activations' backward only, no weight gradients
    build_s = time.perf_counter() - t0
    ids = torch.randint(0, 49152, (batch, tokens), generator=torch.Generator().manual_seed(1))
    times = []
    for k in range(steps + 1):
        t = time.perf_counter()
        if soup is not None:
            logits = soup(input_ids=ids)
            loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                                     ids[:, 1:].reshape(-1))
            loss.backward()
            soup.alphas.raw.grad = None
        else:
            emb = model.get_input_embeddings()(ids).detach().requires_grad_(True)
            logits = model(inputs_embeds=emb, use_cache=False).logits
            loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                                     ids[:, 1:].reshape(-1))
            loss.backward()
        del logits, loss
        if k:  # the first step is a warm-up
            times.append(time.perf_counter() - t)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"mode": mode, "build_s": build_s, "step_s": statistics.median(times), "peak_rss": peak,
            "low_rank_modules": len(getattr(soup, "low_rank_modules", []))}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--adapters", type=int, default=8)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "souplm-lora-soup-bench")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    base, adapters = build(args.workdir, args.layers, args.adapters, args.rank)
    if args.child:
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
        print(json.dumps(child(args.child, base, adapters, args.batch, args.tokens, args.steps)))
        return 0
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"))
    rows = {}
    for mode in ("base", "low_rank", "dense"):
        cmd = [sys.executable, __file__, "--child", mode, *sys.argv[1:]]
        out = subprocess.run(cmd, check=False, env=env, capture_output=True, text=True)
        if out.returncode != 0:
            print(out.stderr[-2000:], file=sys.stderr)
            return 1
        rows[mode] = json.loads(out.stdout.strip().splitlines()[-1])
        r = rows[mode]
        print(f"{mode}: build {r['build_s']:.1f}s, step {r['step_s']:.2f}s, peak RSS {r['peak_rss'] / 2**30:.2f} GiB",
              flush=True)
    lo, de, ba = rows["low_rank"], rows["dense"], rows["base"]
    lines = [(f"{args.adapters} adapters (r {args.rank}, all 7 projections) over a random Llama with SmolLM2-135M's "
             f"widths and {args.layers} layers, fp32; step = forward + backward w.r.t. the alphas, batch "
             f"{args.batch} x {args.tokens} tokens, median of {args.steps}; OMP_NUM_THREADS={env['OMP_NUM_THREADS']}."),
             "",
             "| path | build s | step s | peak RSS GiB |", "|---|---|---|---|",
             (f"| base model alone (forward + backward) | {ba['build_s']:.1f} | {ba['step_s']:.2f} | "
             f"{ba['peak_rss'] / 2**30:.2f} |"),
             (f"| low-rank adapter soup ({lo['low_rank_modules']} LoraSoupLinear) | {lo['build_s']:.1f} | "
             f"{lo['step_s']:.2f} | {lo['peak_rss'] / 2**30:.2f} |"),
             (f"| dense soup of the merged models | {de['build_s']:.1f} | {de['step_s']:.2f} | "
             f"{de['peak_rss'] / 2**30:.2f} |"),
             (f"| dense / low-rank | {de['build_s'] / lo['build_s']:.1f}x | {de['step_s'] / lo['step_s']:.1f}x | "
             f"{de['peak_rss'] / lo['peak_rss']:.1f}x |"),
             f"| low-rank / base alone | | {lo['step_s'] / ba['step_s']:.2f}x | {lo['peak_rss'] / ba['peak_rss']:.2f}x |"]
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
