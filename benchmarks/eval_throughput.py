"""Evaluation throughput of the study's tasks, the plain scoring path against the fast one, side by side.

    python benchmarks/eval_throughput.py MODEL_DIR [--rows N] [--tasks T ...] [--repeat R] [--out FILE.json] [--profile]

MODEL_DIR: a LLaVA of the study's family (e.g. ~/.cache/souplm/family/quick/llava-*). The tasks are the
study's own five, built by `souplm.experiment.data` with N rows each (perplexity tasks N // 4 documents).
Per task the two paths alternate on the same loaded model (plain, fast, plain, fast: --repeat runs of each) and
the faster run of each counts, so machine load and first-call warm-up decide as little as they can; items/s (and kB/s for perplexity), the ratio, and whether the
scores agree are printed and written as JSON. `--profile` adds the fast path's cProfile top entries.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

from souplm.evaluate.lm import HFModel, load_model
from souplm.evaluate.runner import run_task
from souplm.experiment.data import prepare_data
from souplm.experiment.settings import FULL, TASKS


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--rows", type=int, default=16)
    ap.add_argument("--out", default=None)
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--repeat", type=int, default=2, help="runs of each mode, alternating; the fastest counts")
    ap.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    a = ap.parse_args()
    n = a.rows
    s = replace(FULL, mode="bench", test_rows={"easy-vqa": n, "math": n, "shakespeare-ppl": max(1, n // 4),
                                                "shakespeare-mc": n, "instruct-ppl": max(1, n // 2)})
    data = prepare_data(Path(tempfile.mkdtemp(prefix="souplm-bench-")), s)
    model, tok, proc = load_model(a.model, device="cpu")
    lms = {"plain": HFModel(model, tok, proc, batch_size=8, progress=False, fast=False),
           "fast": HFModel(model, tok, proc, batch_size=8, progress=False, fast=True)}
    report: dict = {"torch_threads": torch.get_num_threads(), "rows": n, "tasks": {}}
    prof = cProfile.Profile() if a.profile else None
    for name in a.tasks:
        task = data.tasks[name]
        rec = {}
        for rep in range(a.repeat):
            for mode, lm in lms.items():  # plain, fast, plain, fast, ...: the faster of each mode's runs counts
                if prof and mode == "fast" and rep == 0:
                    prof.enable()
                t0 = time.perf_counter()
                r = run_task(lm, task)
                dt = time.perf_counter() - t0
                if prof and mode == "fast" and rep == 0:
                    prof.disable()
                if mode in rec and rec[mode]["seconds"] <= dt:
                    continue
                rec[mode] = {"n": r["n"], "seconds": round(dt, 2), "items_per_s": round(r["n"] / dt, 4),
                             "score": r["score"]}
                if task.kind == "perplexity":
                    rec[mode]["kB_per_s"] = round(sum(r["items"]["bytes"]) / 1000 / dt, 4)
        rec["speedup"] = round(rec["plain"]["seconds"] / rec["fast"]["seconds"], 3)
        rec["score_difference"] = abs(rec["plain"]["score"] - rec["fast"]["score"])
        report["tasks"][name] = rec
        print(name, json.dumps(rec), flush=True)
    if a.out:
        Path(a.out).write_text(json.dumps(report, indent=1) + "\n")
    if prof:
        st = io.StringIO()
        pstats.Stats(prof, stream=st).sort_stats("tottime").print_stats(15)
        print(st.getvalue())


if __name__ == "__main__":
    main()
