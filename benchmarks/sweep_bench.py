"""Sweep overhead: a whole `souplm sweep` against the same number of evaluations of a loaded model.

The sweep builds one model, reads both bases into memory once, and per alpha writes the soup into the
model's parameters in place. Its cost beyond the evaluations themselves is the one-time load plus one
in-memory merge per alpha; the target is a whole sweep costing at most 1.2x the evaluations alone.

    python benchmarks/sweep_bench.py                          # SmolLM2-135M and a perturbed copy
    python benchmarks/sweep_bench.py --model A --model B --task shakespeare-mc --limit 100
    python benchmarks/sweep_bench.py --synthetic              # a small random Llama, seconds

Caching is off for both sides, so every alpha is really merged and evaluated. The two sides are
interleaved alpha by alpha, because on a shared machine the load changes faster than a whole sweep.
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
    ap.add_argument("--repeats", type=int, default=1, help="run the interleaved grid this many times")
    ap.add_argument("--json", help="also write the numbers here")
    args = ap.parse_args()

    import torch

    from souplm.engine.recipe import Recipe
    from souplm.evaluate.cache import model_hash, soup_key
    from souplm.evaluate.lm import HFModel, load_model
    from souplm.evaluate.runner import run_task
    from souplm.evaluate.tasks import load_task
    from souplm.search.sweep import SoupModel, evaluate_candidate, parse_alphas

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

    # The machine is shared (2 cores, other people's jobs), so the two sides are interleaved alpha by
    # alpha: a burst of someone else's work then hits both alike. Per alpha, the sweep side is exactly
    # what `sweep()` runs per candidate (`evaluate_candidate`: soup_into the one model, then evaluate);
    # its one-time setup (build the model, read both bases into memory) is added once.
    model, tok, proc = load_model(a)
    n_params = sum(p.numel() for p in model.parameters())
    lm = HFModel(model, tok, proc, batch_size=args.batch_size, progress=False)
    hashes = [model_hash(a), model_hash(b)]

    def recipe(alpha: float):
        return Recipe.vanilla(str(a), str(b), alpha, output_model=str(a))

    t0 = time.perf_counter()
    soup = SoupModel([str(a), str(b)], batch_size=args.batch_size, progress=False)
    soup.load(recipe(grid[0]))
    setup_s = time.perf_counter() - t0
    run_task(lm, task, args.limit)  # warm-up of both sides (allocator, kernels), not timed
    evaluate_candidate(soup, recipe(0.5), "warm-up", [task], limit=args.limit, cache=None)
    soup.soup_seconds = 0.0

    def base() -> float:
        t = time.perf_counter()
        run_task(lm, task, args.limit)
        return time.perf_counter() - t

    def step(alpha: float) -> float:
        t = time.perf_counter()
        key = soup_key(hashes, "linear", {"weights": [alpha, 1.0 - alpha]})
        evaluate_candidate(soup, recipe(alpha), key, [task], limit=args.limit, cache=None)
        return time.perf_counter() - t

    evals_only = sweep_steps = 0.0
    for rep in range(args.repeats):
        for i, alpha in enumerate(grid):
            if (i + rep) % 2:  # alternate which side goes first
                sweep_steps += step(alpha)
                evals_only += base()
            else:
                evals_only += base()
                sweep_steps += step(alpha)
    soup_s = soup.soup_seconds
    whole = setup_s + sweep_steps
    n_evals = len(grid) * args.repeats
    rows = [
        ("model", f"{a.name} ({n_params / 1e6:.1f}M params) x {b.name}"),
        ("task / examples per eval", f"{task.name} / {args.limit}"),
        ("alphas x repeats", f"{len(grid)} x {args.repeats}"),
        ("torch threads", str(torch.get_num_threads())),
        (f"evaluations alone, {n_evals} (s)", f"{evals_only:.2f}"),
        ("sweep: setup once (load model + bases) (s)", f"{setup_s:.2f}"),
        (f"sweep: {n_evals} candidates (soup_into + evaluate) (s)", f"{sweep_steps:.2f}"),
        ("  of which soup_into (s)", f"{soup_s:.2f}  ({soup_s / n_evals:.2f} per alpha)"),
        ("whole sweep (s)", f"{whole:.2f}"),
        ("ratio whole sweep / evaluations alone", f"{whole / evals_only:.3f}  (target <= 1.2)"),
    ]
    width = max(len(k) for k, _ in rows)
    print("\n".join(f"{k:<{width}}  {v}" for k, v in rows))
    if args.json:
        Path(args.json).write_text(json.dumps({k: v for k, v in rows}, indent=1))


if __name__ == "__main__":
    main()
