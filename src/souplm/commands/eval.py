"""`souplm eval MODEL_DIR --task T [--task T2 ...]`: score a model, print a table, write JSON."""

from __future__ import annotations

import argparse


def add_eval_options(p: argparse.ArgumentParser) -> None:
    """Options every evaluating command shares (eval, sweep, greedy)."""
    p.add_argument("--limit", type=int, help="score only the first N examples of each task (a quick look)")
    p.add_argument("--batch-size", type=int, default=8, help="examples per forward pass (default 8)")
    p.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="precision the model runs in (default float32)")
    p.add_argument("--cache-dir", help="result cache folder (default $SOUPLM_CACHE/eval or ~/.cache/souplm/eval)")
    p.add_argument("--no-cache", action="store_true", help="neither read nor write cached results")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def cache_arg(args: argparse.Namespace):
    """What `evaluate(cache=...)` takes for these flags (every evaluating command calls it first: the shared
    flags are checked here, so none is silently ignored or out of range)."""
    from ..errors import SoupError

    if args.no_cache and args.cache_dir:
        raise SoupError(f"--cache-dir {args.cache_dir} with --no-cache: give one (--no-cache reads and writes no cache)")
    for flag, value in (("--limit", args.limit), ("--batch-size", args.batch_size)):
        if value is not None and value < 1:
            raise SoupError(f"{flag} {value}: must be at least 1")
    if args.no_cache:
        return None
    return args.cache_dir or True


def register(sub) -> None:
    p = sub.add_parser(
        "eval",
        help="evaluate a model on tasks (built-in names or task YAML/JSON files)",
        description="Evaluate a local model directory. A --task is a built-in task (easy-vqa, shakespeare-ppl, "
        "shakespeare-mc, math, instruct-ppl) or a path to a task YAML/JSON file (docs/EVALUATION.md). "
        "Results are cached by (model content hash, task, task version, limit), so a rerun is instant. "
        "With --backend lm-eval, a --task is an lm-evaluation-harness task name or task YAML.",
    )
    p.add_argument("model", metavar="MODEL_DIR", help="a model directory (config.json + weights + tokenizer)")
    p.add_argument("--task", action="append", required=True, help="task name or task file (repeat)")
    p.add_argument("--backend", choices=["native", "lm-eval"], default="native",
                   help="native (souplm's runner) or lm-eval (lm-evaluation-harness, optional install)")
    p.add_argument("--out", help="write the results as JSON here")
    add_eval_options(p)
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from .. import distributed
    from ..evaluate.runner import format_table
    from ..io.output import OutputError, check_output, write_text

    if args.out:  # a bad --out fails before minutes of scoring
        if Path(args.out).is_dir():
            raise OutputError(f"--out {args.out} is a directory; give a file name (e.g. {Path(args.out) / 'eval.json'})")
        check_output(args.out, inputs=[args.model], what="--out")
    with distributed.session():
        if args.backend == "lm-eval":
            from ..evaluate.lm_eval_adapter import evaluate_lm_eval

            # lm-eval distributes itself (accelerate launch); under torchrun rank 0 runs it alone.
            report = distributed.on_main(lambda: evaluate_lm_eval(
                args.model, args.task, limit=args.limit, batch_size=args.batch_size, cache=cache_arg(args),
                device=args.device, dtype=args.dtype))
        else:
            from ..evaluate.parallel import evaluate_parallel

            # Under torchrun each process scores a shard of every task's examples; rank 0 caches.
            report = evaluate_parallel(args.model, args.task, limit=args.limit, batch_size=args.batch_size,
                                       cache=cache_arg(args), device=args.device, dtype=args.dtype,
                                       progress=not args.quiet)
        if not distributed.is_main():
            return 0
    print(format_table(report))
    if args.out:
        out = write_text(args.out, json.dumps(report, indent=1), what="--out")
        print(f"wrote {out}")
    return 0
