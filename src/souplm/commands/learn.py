"""`souplm learn CONFIG.yaml`: fit a learnable (or regularized) soup's alphas on meta sets."""

from __future__ import annotations

import argparse


def register(sub) -> None:
    p = sub.add_parser(
        "learn",
        help="learn per-unit soup coefficients on a small dev set (SoupLM's learnable soup)",
        description="Learn mixing weights alpha per soup unit by gradient descent on meta sets, with the "
        "base models frozen. Writes OUT/coefficients.json, OUT/merged/ (the souped model), OUT/log.jsonl "
        "and a checkpoint per epoch (OUT/checkpoint.pt) that --resume continues. Under torchrun (or srun) the "
        "bases are sharded over the processes with FSDP2 and the dev set is split between them; the result "
        "equals a single-process run, and --resume works with any number of processes (docs/SCALING.md).",
    )
    p.add_argument("config", help="learn config (YAML); see souplm/learn/config.py for the keys")
    p.add_argument("-o", "--out", help="output directory (overrides the config's `output`)")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt if there is one")
    p.add_argument("--force", action="store_true", help="start over in an output directory that holds a run")
    p.add_argument("--no-merge", action="store_true", help="write the coefficient table only")
    p.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: the config's, else cuda when available)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--shard-size", type=int, metavar="N",
                   help="under torchrun: shard the bases over groups of N processes and replicate across groups "
                   "(e.g. GPUs per node, so all-gathers stay inside a node; default: all processes)")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    import signal
    import sys
    from pathlib import Path

    from .. import distributed
    from ..learn import learn, load_config

    def _terminated(signum, frame):  # SIGTERM (a scheduler's kill) ends the run like Ctrl-C: cleaned up, reported
        raise KeyboardInterrupt

    try:
        signal.signal(signal.SIGTERM, _terminated)
    except ValueError:  # not the main thread
        pass
    from ..errors import SoupError

    if args.resume and args.force:
        raise SoupError("--resume continues the run in the output folder and --force starts it over: give one")
    if args.shard_size is not None and args.shard_size < 1:
        raise SoupError(f"--shard-size {args.shard_size}: must be at least 1")
    overrides = {"merge": False if args.no_merge else None, "device": args.device}
    cfg = load_config(args.config, output=args.out, **overrides)
    with distributed.session():
        if args.shard_size is not None and not distributed.is_distributed():
            raise SoupError(f"--shard-size {args.shard_size}: applies under torchrun only (this is one process)")
        main = distributed.is_main()
        if main and args.resume and not (Path(cfg.output) / "checkpoint.pt").is_file():
            print(f"souplm learn: no checkpoint in {cfg.output}; starting from the beginning", file=sys.stderr)
        result = learn(cfg, resume=args.resume, force=args.force, progress=not args.quiet,
                       shard_size=args.shard_size)
    if not main:
        return 0
    if result.resumed_from_epoch is not None:
        print(f"resumed after epoch {result.resumed_from_epoch}")
    if result.initial_loss is not None and result.final_loss is not None:
        print(f"dev loss {result.initial_loss:.4f} -> {result.final_loss:.4f} in {result.steps} steps")
    print(f"coefficients: {result.table_path}")
    if result.merged_dir is not None:
        print(f"merged model: {result.merged_dir}")
    return 0
