#!/usr/bin/env python
"""LoRA extraction benchmark: ``souplm extract-lora`` against ``mergekit-extract-lora`` (mergekit 0.1.5).

Builds (or reuses) merge_bench.py's random bf16 Llama trio, takes ``base`` and ``ft_a``, and runs
both tools at the same rank as child processes, measuring wall time, CPU time and peak RSS
(``os.wait4``). Then it reads both adapters (PEFT format) and reports, per tool, the relative
reconstruction error ||delta - s B A||_F / ||delta||_F of the extracted 2-D modules against the
true delta M - B (mean and max over the modules both extracted).

The trio's deltas are dense random matrices, so every rank-r extraction keeps only a small part
of them: the errors are high for both tools and the comparison is of equal work at equal rank.

    python benchmarks/extract_lora_bench.py --layers 4 --rank 16          # a smaller model
    python benchmarks/extract_lora_bench.py --rank 32 --out extract.md    # the ~370M trio
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from merge_bench import DEFAULT_CACHE, ModelSpec, build_trio, ensure_mergekit, find_souplm, run_measured


def adapter_errors(adapter_dir: Path, base: Path, model: Path) -> dict[str, float]:
    from souplm.io.checkpoint import Checkpoint
    from souplm.lora import LoraAdapter

    ad = LoraAdapter(adapter_dir)
    b, m = Checkpoint(base), Checkpoint(model)
    out = {}
    for name in ad.modules:
        d = m.get(name) - b.get(name)
        out[name] = float(torch.linalg.matrix_norm(d - ad.delta(name)) / torch.linalg.matrix_norm(d))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--workdir", type=Path, default=DEFAULT_CACHE / "bench")
    ap.add_argument("--venv", type=Path, default=Path("/work/venvs/mergekit"))
    ap.add_argument("--tools", default="souplm,mergekit")
    ap.add_argument("--out", type=Path, help="also write the markdown table here")
    args = ap.parse_args()

    spec = ModelSpec(layers=args.layers)
    dirs = build_trio(spec, args.workdir)
    base, model = dirs["base"], dirs["ft_a"]
    runs = args.workdir / "extract_runs"
    runs.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"))
    rows = []
    for tool in args.tools.split(","):
        out = runs / f"{tool}-r{args.rank}-l{args.layers}"
        if tool == "souplm":
            cmd = [*find_souplm(), "extract-lora", "--base", str(base), "--model", str(model), "--rank",
                   str(args.rank), "-o", str(out), "--force"]
        else:
            py = ensure_mergekit(args.venv)
            cmd = [str(py.parent / "mergekit-extract-lora"), "--model", str(model), "--base-model", str(base),
                   "--out-path", str(out), "--max-rank", str(args.rank)]
            if out.exists():
                import shutil

                shutil.rmtree(out)
        meas = run_measured(cmd, env, runs / f"{tool}.log")
        if meas.returncode != 0:
            print(f"{tool} failed (rc {meas.returncode}); see {runs / f'{tool}.log'}", flush=True)
            rows.append((tool, meas, None))
            continue
        rows.append((tool, meas, adapter_errors(out, base, model)))
        print(f"{tool}: {meas.wall_s:.1f}s wall, {meas.cpu_s:.1f}s CPU, {meas.peak_rss_bytes / 2**30:.2f} GiB peak RSS",
              flush=True)
    common = set.intersection(*[set(e) for _, _, e in rows if e]) if any(e for _, _, e in rows) else set()
    lines = [(f"Model: {spec.tag} ({spec.num_params() / 1e6:.0f}M params, bf16), rank {args.rank}, "
             f"OMP_NUM_THREADS={env['OMP_NUM_THREADS']}."), "",
             "| tool | wall s | CPU s | peak RSS GiB | modules | rel. error mean (common modules) | max |",
             "|---|---|---|---|---|---|---|"]
    for tool, meas, errs in rows:
        if errs is None:
            lines.append(f"| {tool} | failed | | | | | |")
            continue
        c = [errs[k] for k in common] or [0.0]
        lines.append(f"| {tool} | {meas.wall_s:.1f} | {meas.cpu_s:.1f} | {meas.peak_rss_bytes / 2**30:.2f} | "
                     f"{len(errs)} | {sum(c) / len(c):.5f} | {max(c):.5f} |")
    table = "\n".join(lines)
    print(table)
    if args.out:
        args.out.write_text(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
