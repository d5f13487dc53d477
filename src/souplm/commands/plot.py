"""`souplm plot alphas TABLE.json [...] -o DIR`: the SoupLM paper's Figure 5/6 view of learned alphas."""

from __future__ import annotations

import argparse


def register(sub) -> None:
    p = sub.add_parser("plot", help="draw figures from souplm outputs", description="Draw figures (PNG and SVG).")
    kinds = p.add_subparsers(dest="plot_kind", metavar="KIND")
    a = kinds.add_parser(
        "alphas",
        help="learned alphas per layer and mapping (paper Fig. 5/6)",
        description="For each mapping, one model's alpha per layer (--model; default the first model; bars coloured by the dominant model, "
        "a 0.5 line), plus a layer x mapping heatmap. Several tables are drawn side by side.",
    )
    a.add_argument("tables", nargs="+", help="coefficient tables (coefficients.json from souplm learn)")
    a.add_argument("-o", "--out", required=True, help="output directory")
    a.add_argument("--label", action="append", default=[], help="a name per table (repeat; default: its folder)")
    a.add_argument("--model", type=int, default=0,
                   help="whose share to draw on the y-axis: an index from 0 in the table's model order (default 0, "
                   "the first model)")
    a.set_defaults(handler=run_alphas)
    p.set_defaults(handler=lambda args: (p.print_help(), 2)[1])


def run_alphas(args: argparse.Namespace) -> int:
    from ..plots.alphas import plot_alphas

    paths = plot_alphas(args.tables, args.out, labels=args.label or None, model=args.model)
    for path in paths:
        print(path)
    return 0


run = run_alphas
