"""Sweep overhead: a whole `souplm sweep` against the same number of evaluations of a loaded model.

The sweep builds one model, reads both bases into memory once, and per alpha writes the soup into the
model's parameters in place. Its cost beyond the evaluations themselves is the one-time load plus one
in-memory merge per alpha; the target is a whole sweep costing at most 1.2x the evaluations alone.

    python benchmarks/sweep_bench.py                          # SmolLM2-135M and a perturbed copy
    python benchmarks/sweep_bench.py --model A --model B --task shakespeare-mc --limit 100
    python benchmarks/sweep_bench.py --synthetic              # a small random Llama, seconds

Caching is off for both sides, so every alpha is really merged and evaluated.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path


def smollm2_pair(root: Path, noise: float) -> tuple[Path, Path]:
    """SmolLM2-135M-Instruct as safetensors (A) and a copy with small Gaussian noise (B)."""
    import torch
    from transformers import AutoModelForCausalLM

    from souplm.experiment.convert import gguf_to_safetensors, smollm2_gguf

    a, b = root / "smollm2", root / "smollm2-perturbed"
    if not (a / "config.json").is_file():
        gguf_to_safetensors(smollm2_gguf(), a)
    if not (b / "config.json").is_file():
        model = AutoModelForCausalLM.from_pretrained(a, dtype=torch.float32)
        gen = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=gen) * noise * p.std())
        model.save_pretrained(b)
        from transformers import AutoTokenizer

        AutoTokenizer.from_pretrained(a).save_pretrained(b)
    return a, b


def synthetic_pair(root: Path) -> tuple[Path, Path]:
    """Two random Llamas (hidden 256, 4 layers) with SmolLM2's tokenizer-free byte-level BPE."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    from souplm.data.sources import shakespeare_texts

    corpus = [t["text"][:200_000] for t in shakespeare_texts("train")[:3]]
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=2048, special_tokens=["<eos>"],
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                        show_progress=False))
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<eos>")
    out = []
    for seed, name in ((0, "synth-a"), (1, "synth-b")):
        torch.manual_seed(seed)
        cfg = LlamaConfig(vocab_size=len(hf_tok), hidden_size=256, intermediate_size=704, num_hidden_layers=4,
                          num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=1024,
                          eos_token_id=hf_tok.eos_token_id)
        LlamaForCausalLM(cfg).save_pretrained(root / name)
        hf_tok.save_pretrained(root / name)
        out.append(root / name)
    return out[0], out[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", action="append", default=[], help="two model dirs (default: SmolLM2 pair)")
    ap.add_argument("--synthetic", action="store_true", help="two small random Llamas instead of SmolLM2")
    ap.add_argument("--task", default="shakespeare-ppl", help="built-in task or task file")
    ap.add_argument("--limit", type=int, default=8, help="examples per evaluation")
    ap.add_argument("--alphas", default="0:1:0.1")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "souplm-sweep-bench"))
    ap.add_argument("--repeats", type=int, default=2, help="alternate both sides this often, keep the best")
    ap.add_argument("--json", help="also write the numbers here")
    args = ap.parse_args()

    import torch

    from souplm.evaluate.lm import HFModel, load_model
    from souplm.evaluate.runner import run_task
    from souplm.evaluate.tasks import load_task
    from souplm.search.sweep import parse_alphas, sweep

    root = Path(args.workdir)
    root.mkdir(parents=True, exist_ok=True)
    if len(args.model) == 2:
        a, b = Path(args.model[0]), Path(args.model[1])
    elif args.synthetic:
        a, b = synthetic_pair(root)
    else:
        a, b = smollm2_pair(root, noise=0.02)
    task = load_task(args.task)
    grid = sorted(set(parse_alphas(args.alphas)) | {0.0, 1.0})

    # The machine may be shared: time wall clock and this process's CPU time, alternate the two sides
    # `--repeats` times and keep each side's best, so a burst of someone else's work hits both alike.
    model, tok, proc = load_model(a)
    n_params = sum(p.numel() for p in model.parameters())
    lm = HFModel(model, tok, proc, batch_size=args.batch_size, progress=False)
    run_task(lm, task, args.limit)  # warm-up (allocator, kernels), excluded from both sides
    evals_only, whole, cpu_evals, cpu_whole, parts = [], [], [], [], []
    for _ in range(args.repeats):
        # 1. The evaluations alone: a loaded model, as many evaluations as the sweep makes.
        t0, c0 = time.perf_counter(), time.process_time()
        for _ in grid:
            run_task(lm, task, args.limit)
        evals_only.append(time.perf_counter() - t0)
        cpu_evals.append(time.process_time() - c0)
        # 2. The whole sweep, from model dirs to scores: load once, soup per alpha, evaluate.
        t0, c0 = time.perf_counter(), time.process_time()
        res = sweep([a, b], grid, [task], limit=args.limit, batch_size=args.batch_size, cache=None,
                    progress=False)
        whole.append(time.perf_counter() - t0)
        cpu_whole.append(time.process_time() - c0)
        parts.append((whole[-1] - res.timings["soup_s"] - res.timings["eval_s"], res.timings["soup_s"],
                      res.timings["eval_s"]))
    best = min(range(len(whole)), key=lambda i: whole[i])
    setup_s, soup_s, eval_s = parts[best]
    rows = [
        ("model", f"{a.name} ({n_params / 1e6:.1f}M params) x {b.name}"),
        ("task / examples per eval", f"{task.name} / {args.limit}"),
        ("alphas evaluated", str(len(grid))),
        ("torch threads / repeats", f"{torch.get_num_threads()} / {args.repeats}"),
        ("evaluations alone, wall (s)", f"{min(evals_only):.2f}"),
        ("whole sweep, wall (s)", f"{min(whole):.2f}"),
        ("  of which load model + bases (s)", f"{setup_s:.2f}"),
        ("  of which soup_into, all alphas (s)", f"{soup_s:.2f}"),
        ("  of which evaluation (s)", f"{eval_s:.2f}"),
        ("evaluations alone, CPU (s)", f"{min(cpu_evals):.2f}"),
        ("whole sweep, CPU (s)", f"{min(cpu_whole):.2f}"),
        ("ratio sweep / evaluations, wall", f"{min(whole) / min(evals_only):.3f}  (target <= 1.2)"),
        ("ratio sweep / evaluations, CPU", f"{min(cpu_whole) / min(cpu_evals):.3f}  (target <= 1.2)"),
    ]
    width = max(len(k) for k, _ in rows)
    print("\n".join(f"{k:<{width}}  {v}" for k, v in rows))
    if args.json:
        Path(args.json).write_text(json.dumps({k: v for k, v in rows}, indent=1))


if __name__ == "__main__":
    main()
