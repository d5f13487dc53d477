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
    p.add_argument("config", nargs="?", help="learn config (YAML); `souplm learn --show-config` prints every key")
    p.add_argument("--show-config", action="store_true",
                   help="print a commented config with every key, its default and its allowed values, and exit")
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

    if args.show_config:
        print(show_config(), end="")
        return 0
    if args.config is None:
        raise SoupError("learn: give a config file (souplm learn --show-config prints one with every key)")
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


_EXAMPLES = {  # required keys: an example value instead of a default
    "models": "[path/to/model_a, path/to/model_b]   # 2+ models of one architecture (required)",
    "meta_sets": "                                 # the dev set (required); one entry per file:",
}
_META_EXAMPLE = "  - {path: dev/a.jsonl, samples: 50}          # keys per entry below"


def _allowed(annotation) -> str:
    import typing

    args = typing.get_args(annotation)
    if typing.get_origin(annotation) is typing.Literal:
        return " | ".join(str(a) for a in args)
    lits = [str(x) for a in args if typing.get_origin(a) is typing.Literal for x in typing.get_args(a)]
    return " | ".join((["N"] if lits and int in args else []) + lits)


def _yaml_value(value) -> str:
    import json

    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float, str)):
        return str(value)
    return json.dumps(value)


def _section(model, indent: str) -> list[str]:
    from pydantic import BaseModel

    lines = []
    for name, field in model.model_fields.items():
        key = field.alias or name
        if key in _EXAMPLES:
            lines.append(f"{indent}{key}: {_EXAMPLES[key]}")
            if key == "meta_sets":
                from ..learn.config import MetaSetConfig

                lines.append(_META_EXAMPLE)
                lines += [f"  #   {line.strip()}" for line in _section(MetaSetConfig, "")]
            continue
        if field.is_required():
            lines.append(f"{indent}{key}: ...  # required")
            continue
        default = field.get_default(call_default_factory=True)
        if isinstance(default, BaseModel):
            lines.append(f"{indent}{key}:")
            lines += _section(type(default), indent + "  ")
            continue
        allowed = _allowed(field.annotation)
        note = f"  # {allowed}" if allowed else ""
        lines.append(f"{indent}{key}: {_yaml_value(default)}{note}")
    return lines


def show_config() -> str:
    """The learn config's keys with their defaults, as YAML that loads (after filling in the paths)."""
    from ..learn.config import LearnConfig

    head = ["# souplm learn config: every key with its default (the SoupLM paper's best setting).",
            "# Relative paths are relative to this file's folder. Optional extras: mix: {total: N, ratio: [..]}",
            "# (overrides each set's samples), fixed: {UNIT: [w1, w2]} (units held at given weights)."]
    body = [line for line in _section(LearnConfig, "") if not line.startswith(("mix:", "fixed:"))]
    return "\n".join(head + body) + "\n"
