"""`souplm merge`: run a recipe (souplm's or mergekit's YAML), or a quick vanilla soup from flags."""

from __future__ import annotations

import argparse


def register(sub) -> None:
    p = sub.add_parser(
        "merge",
        help="merge models by a recipe or a quick vanilla soup",
        description="Merge models. Either a recipe file (souplm or mergekit YAML) or --model A --model B "
        "--alpha 0.3 (0.3*A + 0.7*B).",
    )
    p.add_argument("recipe", nargs="?", help="recipe YAML (souplm or mergekit format)")
    p.add_argument("-o", "--out", required=True, help="output model directory")
    p.add_argument("--model", action="append", default=[], help="a model directory (repeat); quick form")
    p.add_argument("--alpha", type=float, help="quick form with two models: share of the first model")
    p.add_argument("--method", help="quick form: merge method (default linear; uniform for N>2 without --alpha)")
    p.add_argument("--base-model", help="quick form: base model for task_arithmetic, ties, dare_*, wise_ft")
    p.add_argument("--coefficients", help="coefficient table JSON (per-unit weights), e.g. from souplm learn")
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], help="output precision")
    p.add_argument("--vocab-policy", choices=["error", "extend", "truncate"], help="when embedding rows differ")
    p.add_argument("--output-model", help="the model whose config, tokenizer and layout the output takes")
    p.add_argument("--mapping", metavar="SPEC",
                   help="merge two models of different architectures through a mapping spec (a YAML/JSON file or "
                   "a built-in name such as llama-to-cogvlm, docs/ADAMMS.md): the first model is the target "
                   "(its layout, vision tower and projector are kept), the second the source; --alpha stays the first "
                   "model's share, so AdaMMS's alpha (the source's weight) is 1 - --alpha")
    p.add_argument("--allow-pickle", action="store_true", help="allow pickled .bin inputs (loaded weights_only)")
    p.add_argument("--seed", type=int, help="seed for DARE's random drops")
    p.add_argument("--shard-size", metavar="SIZE", help="largest output shard: 5GB, 500MB, 2GiB, mergekit's 5B, or "
                   "bytes (default 5GB, mergekit's default; recipes: shard_size)")
    p.add_argument("--force", action="store_true", help="replace a non-empty output directory")
    p.add_argument("--dry-run", action="store_true", help="print the plan and exit; writes nothing")
    p.add_argument("--no-hash", action="store_true", help="skip hashing inputs for the model card")
    p.add_argument("--device", help="run the merge methods on this torch device, e.g. cuda or cuda:1 (mergekit's "
                   "--cuda); tensors still stream one at a time. Default: the host's fused C kernels")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(handler=run)


def _recipe(args: argparse.Namespace):
    """The recipe the flags describe. Every flag takes effect or is refused by name (never ignored)."""
    import math

    from ..engine.recipe import Recipe
    from ..errors import SoupError
    from ..io.sizes import parse_size

    overrides = {k: v for k, v in {
        "dtype": args.dtype, "vocab_policy": args.vocab_policy, "output_model": args.output_model,
        "seed": args.seed, "allow_pickle": args.allow_pickle or None, "mapping": args.mapping,
        "shard_size": None if args.shard_size is None else parse_size(args.shard_size, "--shard-size"),
    }.items() if v is not None}
    if args.recipe:
        quick = [f for f, v in (("--model", args.model), ("--alpha", args.alpha), ("--method", args.method),
                                ("--base-model", args.base_model)) if v not in (None, [])]
        if quick:
            raise SoupError(f"{quick[0]} is a quick-form flag: give either a recipe file or --model/--alpha/--method/"
                            "--base-model, not both (put it in the recipe instead)")
        recipe = Recipe.load(args.recipe)
        if overrides:
            # model_validate, not model_copy: an override is checked like the file's own value
            data = recipe.model_dump(by_alias=False)
            recipe = Recipe.model_validate({**data, **overrides})
            recipe.check()  # an override (e.g. --mapping) must satisfy the same contract as the file
        return _refuse_unused(recipe, args)
    if len(args.model) < 1:
        raise SoupError("nothing to merge: give a recipe file or --model (twice or more)")
    # a coefficient table weighs the models, so without --method it means a linear soup (uniform takes no weights)
    method = args.method or ("linear" if args.alpha is not None or args.coefficients else "uniform")
    from ..methods import get_method

    m = get_method(method)
    if args.base_model is not None and not m.needs_base:
        raise SoupError(f"--base-model {args.base_model}: method {method} does not use a base model "
                        "(task_arithmetic, ties, dare_linear, dare_ties and wise_ft do)")
    if args.alpha is not None:
        if len(args.model) != 2:
            raise SoupError(f"--alpha needs exactly two --model, got {len(args.model)}")
        if not math.isfinite(args.alpha) or not 0.0 <= args.alpha <= 1.0:
            raise SoupError(f"--alpha {args.alpha!r} is outside [0, 1] or not finite: it is the first model's share "
                            "(to extrapolate, write a recipe with allow_extrapolation: true)")
        if method == "linear":
            recipe = Recipe.vanilla(args.model[0], args.model[1], args.alpha, **overrides)
        elif method == "slerp":  # slerp's t is the second model's share
            recipe = Recipe.from_models(args.model, "slerp", t=1.0 - args.alpha, **overrides)
        else:
            raise SoupError(f"--alpha: method {method} does not take a two-model share (--alpha works with linear "
                            "and slerp); give its per-model parameters in a recipe file")
    else:
        recipe = Recipe.from_models(args.model, method, base_model=args.base_model, **overrides)
    return _refuse_unused(recipe, args)


def _refuse_unused(recipe, args: argparse.Namespace):
    from ..errors import SoupError

    if args.seed is not None and not recipe.method.random:
        raise SoupError(f"--seed {args.seed}: method {recipe.merge_method} draws nothing at random "
                        "(only dare_linear and dare_ties take a seed)")
    return recipe


def run(args: argparse.Namespace) -> int:
    from ..engine import executor_for, merge

    recipe = _recipe(args)
    report = merge(recipe, args.out, coefficients=args.coefficients, force=args.force, dry_run=args.dry_run,
                   progress=not args.quiet, hash_inputs=not args.no_hash, device=args.device,
                   protect=[args.recipe] if args.recipe else [])
    if args.dry_run:
        print(report.plan.summary(executor=executor_for(report.plan, args.device)[1]))
    else:
        for note in report.plan.notes:
            print(f"note: {note}")
        print(report)
    return 0
