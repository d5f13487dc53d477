"""`souplm greedy --model M1 ... --model Mn --task HELDOUT -o OUT`: greedy and uniform soup."""

from __future__ import annotations

import argparse

from .eval import add_eval_options, cache_arg


def register(sub) -> None:
    p = sub.add_parser(
        "greedy",
        help="greedy soup (Wortsman et al. 2022): add ingredients while the held-out score does not drop",
        description="Rank the models by their score on the held-out --task, start from the best, and add each "
        "next one to the running uniform average only if the held-out score does not drop. Also scores the "
        "uniform soup of all models. Writes the greedy soup to -o through the merge engine. "
        "VALIDATION LEAKAGE: --task chooses the soup, so its score of the soup is biased upward; report "
        "--test-task on a different split (the same task as --task is refused unless --allow-leakage).",
    )
    p.add_argument("--model", action="append", required=True, help="an ingredient model directory (repeat)")
    p.add_argument("--task", required=True, help="HELDOUT task that chooses the ingredients (validation split)")
    p.add_argument("--test-task", action="append", default=[],
                   help="task to report for best single / uniform / greedy soups (a different split; repeat)")
    p.add_argument("-o", "--out", help="write the greedy soup here (omit to only search)")
    p.add_argument("--force", action="store_true", help="replace a non-empty output directory")
    p.add_argument("--allow-leakage", action="store_true", help="allow a test task equal to the held-out task")
    p.add_argument("--stream", action="store_true",
                   help="re-read ingredients from disk per candidate instead of holding all in memory")
    p.add_argument("--vocab-policy", choices=["error", "extend", "truncate"],
                   help="when embedding rows differ (a LLaVA and its plain LM): see docs/MERGING.md")
    add_eval_options(p)
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from .. import distributed
    from ..errors import SoupError
    from ..search.greedy import greedy_soup

    if args.force and not args.out:
        raise SoupError("--force without -o: the greedy soup is written nowhere, so there is nothing to replace")
    if args.allow_leakage and not args.test_task:
        raise SoupError("--allow-leakage without --test-task: it only permits a test task equal to --task")
    # Under torchrun the ingredients are spread over the processes; rank 0 writes and prints.
    with distributed.session():
        result = greedy_soup(
            args.model, args.task, test_tasks=args.test_task, out_dir=args.out, limit=args.limit,
            batch_size=args.batch_size, cache=cache_arg(args), device=args.device, dtype=args.dtype,
            progress=not args.quiet, in_memory=not args.stream, allow_leakage=args.allow_leakage,
            vocab_policy=args.vocab_policy, force=args.force,
        )
        if not distributed.is_main():
            return 0
    print(result.to_markdown())
    if args.out:
        print(f"wrote the greedy soup ({len(result.chosen)} of {len(result.models)} models) to {args.out}")
    return 0
