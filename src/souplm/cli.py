"""The `souplm` command: a thin layer over the library.

Each subcommand lives in `souplm/commands/<name>.py` with two functions, `register(subparsers)` and
`run(args) -> int`. Command modules import only argparse-level things at module level; heavy
imports (torch, transformers) happen inside `run`, so `souplm --help` and `souplm merge` start fast.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from . import __version__
from .errors import SoupError

# Add a new subcommand by adding its module here.
COMMAND_MODULES: tuple[str, ...] = (
    "souplm.commands.merge",
    "souplm.commands.demo",
    "souplm.commands.eval",
    "souplm.commands.sweep",
    "souplm.commands.greedy",
    "souplm.commands.learn",
    "souplm.commands.plot",
    "souplm.commands.search",
    "souplm.commands.merge_adapters",
    "souplm.commands.extract_lora",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="souplm", description="Model soups for language and multimodal models."
    )
    parser.add_argument("--version", action="version", version=f"souplm {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


# Commands that load models with transformers while a souplm progress bar runs.
_OWN_PROGRESS = frozenset({"eval", "sweep", "greedy", "learn", "search", "demo"})


def _one_progress_display() -> None:
    """transformers' per-load bars ("Loading weights") would print over souplm's own: switch them off.

    Hub download bars (huggingface_hub's) are left alone: they are the only display while they run.
    """
    try:
        from huggingface_hub.utils import enable_progress_bars
        from transformers.utils import logging as hf_logging
    except ImportError:  # pragma: no cover - transformers is a dependency
        return
    hf_logging.disable_progress_bar()  # also switches huggingface_hub's off ...
    enable_progress_bars()  # ... which stay on


def _process_defaults() -> None:
    """Defaults for the command's own process, set before numpy loads: souplm does no linear algebra in
    numpy (torch has its own threads), and OpenBLAS's idle worker threads would otherwise spin for a while
    after start-up on the cores the merge kernels use (about 0.13 s of CPU per command, measured). A value
    the user set is kept."""
    if "numpy" not in sys.modules:
        os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")


def main(argv: list[str] | None = None) -> int:
    _process_defaults()
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "handler", None):
        parser.print_help()
        return 2
    if args.command in _OWN_PROGRESS:
        _one_progress_display()
    try:
        return int(args.handler(args) or 0)
    except SoupError as e:
        print(f"souplm: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:  # a command that keeps something (learn's checkpoint) says what
        print(f"souplm: interrupted; {getattr(e, 'kept', None) or 'nothing was written'}", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `souplm ... | head`
        os._exit(0)


# Commands whose every output is closed and in place (the atomic writer) when they return, so that the
# process may end without the interpreter's teardown: with torch loaded, that teardown (module dicts,
# torch's library finalizers) took 0.15-0.6 s after an arcee_fusion merge had finished, measured from the
# "merged" line to the process's end.
_QUICK_EXIT = frozenset({"merge"})


def console() -> None:
    """The `souplm` command: main(), then the end of the process."""
    argv = sys.argv[1:]
    rc = main(argv)
    if argv and argv[0] in _QUICK_EXIT and "torch" in sys.modules:
        import logging

        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(rc)
    sys.exit(rc)


if __name__ == "__main__":
    console()
