"""`souplm extract-lora`: factor a fine-tune's difference from its base into a PEFT LoRA adapter."""

from __future__ import annotations

import argparse


def register(sub) -> None:
    p = sub.add_parser(
        "extract-lora",
        help="extract a LoRA adapter (PEFT format) from a fine-tuned model and its base",
        description="Factor M - B per module by truncated SVD into a PEFT LoRA adapter directory. Every input check "
        "(tensor names, shapes, vocabulary) runs before the first SVD; embeddings and changed norms are saved whole "
        "(modules_to_save); the per-module report gives each rank and relative reconstruction error.",
    )
    p.add_argument("--base", required=True, help="the base model directory")
    p.add_argument("--model", required=True, help="the fine-tuned model directory")
    p.add_argument("-o", "--out", required=True, help="output adapter directory")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--rank", type=int, help="the rank of every module")
    g.add_argument("--energy", type=float, help="per module, the smallest rank keeping this share of the "
                   "squared singular values (e.g. 0.9)")
    p.add_argument("--max-rank", type=int, help="with --energy: an upper bound on each module's rank")
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], help="factor dtype (default: the model's)")
    p.add_argument("--force", action="store_true", help="replace a non-empty output directory")
    p.add_argument("--allow-pickle", action="store_true", help="allow pickled .bin inputs (loaded weights_only)")
    p.add_argument("--verbose", action="store_true", help="print one line per tensor")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from ..lora.extract import extract_lora

    report = extract_lora(args.base, args.model, args.out, rank=args.rank, energy=args.energy,
                          max_rank=args.max_rank, dtype=args.dtype, force=args.force, allow_pickle=args.allow_pickle)
    if args.verbose:
        print(report.table())
    else:
        for r in report.results:
            if r.action == "saved":
                print(f"saved whole: {r.name} ({r.reason})")
        skipped = [r for r in report.results if r.action == "skipped" and r.reason != "unchanged"]
        for r in skipped:
            print(f"skipped: {r.name} ({r.reason})")
        unchanged = sum(r.reason == "unchanged" for r in report.results)
        if unchanged:
            print(f"skipped {unchanged} unchanged tensors")
    print(report)
    return 0
