"""`souplm sweep --model A --model B --alphas 0:1:0.1 --task T -o DIR`: the vanilla soup curve."""

from __future__ import annotations

import argparse

from .eval import add_eval_options, cache_arg


def register(sub) -> None:
    p = sub.add_parser(
        "sweep",
        help="score alpha*A + (1-alpha)*B over a grid of alphas (the SoupLM paper's Figure 1)",
        description="Vanilla soup sweep: for each alpha, write alpha*A + (1-alpha)*B into one in-memory model "
        "(the bases are read once; no checkpoint is written) and evaluate every task. alpha=1 is A and "
        "alpha=0 is B. Writes sweep.csv, sweep.md, sweep.json and sweep.png/.svg to the output folder. "
        "Results are cached per soup, so an interrupted sweep resumes. If you pick the best alpha from this "
        "table, report its score on a different task split (validation leakage, docs/EVALUATION.md).",
    )
    p.add_argument("--model", action="append", required=True, help="model directory; give exactly two (A, then B)")
    p.add_argument("--alphas", default="0:1:0.1", help="start:stop:step (stop included) or a comma list; "
                   "alpha is the weight of A (default 0:1:0.1)")
    p.add_argument("--task", action="append", required=True, help="task name or task file (repeat)")
    p.add_argument("-o", "--out", required=True, help="output folder for tables and plots")
    p.add_argument("--stream", action="store_true",
                   help="re-read the bases from disk per alpha instead of holding both in memory")
    p.add_argument("--vocab-policy", choices=["error", "extend", "truncate"],
                   help="when embedding rows differ (a LLaVA and its plain LM): see docs/MERGING.md")
    add_eval_options(p)
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .. import distributed
    from ..io.output import check_output
    from ..search.sweep import sweep

    check_output(args.out, inputs=args.model, what="output folder", report=True)  # before the sweep, not after it
    # Under torchrun the alphas are spread over the processes; rank 0 writes and prints.
    with distributed.session():
        result = sweep(args.model, args.alphas, args.task, out_dir=args.out, limit=args.limit,
                       batch_size=args.batch_size, cache=cache_arg(args), device=args.device, dtype=args.dtype,
                       progress=not args.quiet, in_memory=not args.stream, vocab_policy=args.vocab_policy)
        if not distributed.is_main():
            return 0
    print(result.to_markdown())
    for t in result.tasks:
        print(f"best alpha for {t['name']}: {result.best_alpha(t['name']):g}")
    print(f"wrote {Path(args.out) / 'sweep.csv'}, sweep.md, sweep.json, sweep.png, sweep.svg")
    return 0
