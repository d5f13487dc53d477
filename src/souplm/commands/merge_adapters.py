"""`souplm merge-adapters`: several PEFT LoRA adapters of one base into one adapter (PEFT's add_weighted_adapter)."""

from __future__ import annotations

import argparse


def register(sub) -> None:
    p = sub.add_parser(
        "merge-adapters",
        help="merge LoRA adapters into one LoRA adapter (linear, cat, svd, ties, dare_*, magnitude_prune, *_svd)",
        description="Merge PEFT LoRA adapters of one base into one adapter directory that PeftModel.from_pretrained "
        "loads, with the semantics of PEFT's add_weighted_adapter (docs/LORA.md).",
    )
    p.add_argument("--adapter", action="append", default=[], required=True, help="an adapter directory (repeat)")
    p.add_argument("--weight", action="append", type=float, default=[], help="its weight (repeat; default 1 each)")
    p.add_argument("--method", default="linear", help="linear, cat, svd, ties, dare_linear, dare_ties, magnitude_prune, "
                   "or a *_svd variant (default linear)")
    p.add_argument("--rank", type=int, help="svd methods: the output rank (default: the largest input rank)")
    p.add_argument("--density", type=float, default=1.0, help="ties/dare/magnitude_prune: share of entries kept")
    p.add_argument("--majority-sign-method", default="total", choices=["total", "frequency"])
    p.add_argument("--svd-clamp", type=float, help="svd methods: clamp the factors at this quantile")
    p.add_argument("--seed", type=int, default=0, help="seed for DARE's random drops")
    p.add_argument("-o", "--out", required=True, help="output adapter directory")
    p.add_argument("--force", action="store_true", help="replace a non-empty output directory")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from ..errors import SoupError
    from ..lora.merge import merge_adapters

    weights = args.weight or [1.0] * len(args.adapter)
    if len(weights) != len(args.adapter):
        raise SoupError(f"{len(args.adapter)} --adapter but {len(weights)} --weight")
    report = merge_adapters(args.adapter, weights, args.out, args.method, rank=args.rank, density=args.density,
                            majority_sign_method=args.majority_sign_method, svd_clamp=args.svd_clamp,
                            seed=args.seed, force=args.force)
    print(report)
    return 0
