"""Check the random methods' statistical test on mergekit against itself (not run by CI).

    python scripts/golden/check_stats.py --work DIR [--seeds 1 2 3]

Runs mergekit again on every random golden case with other seeds and applies tests/test_golden.py's
`assert_same_statistics` to (mergekit seed s, the committed mergekit seed 0 fixture): two honest draws of
the same method must pass, else the tolerance is too tight. Also applies it to a deliberately wrong
output (the seed-0 delta scaled by 1.25) which must fail, else the tolerance is too loose.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "tests" / "golden"))

import inputs as golden_inputs
import test_golden as tg


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", required=True)
    ap.add_argument("--seeds", nargs="*", type=int, default=[1, 2, 3])
    args = ap.parse_args()
    work = Path(args.work)
    root = work / "check-inputs"
    cases = {n: c for n, c in tg.CASES.items() if c["random"] and c["mergekit_ok"]}
    for c in cases.values():
        for m in c["models"]:
            golden_inputs.materialize(m, tg.MANIFEST["models"][m], root)
    jobs = []
    for seed in args.seeds:
        for name, c in cases.items():
            path = work / "check-recipes" / f"{name}.yml"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(c["recipe"])
            jobs.append({"name": f"{name}@{seed}", "recipe": str(path), "out": str(work / "check-out" / f"{name}@{seed}"),
                         "cwd": str(root), "args": ["--random-seed", str(seed), "--no-write-model-card", *c["args"]]})
    (work / "check-jobs.json").write_text(json.dumps(jobs))
    subprocess.run([str(Path("/work/venvs/mergekit/bin/python")),
                    str(Path(__file__).parent / "run_mergekit.py"), str(work / "check-jobs.json"),
                    str(work / "check-results.json")], check=True, stdout=subprocess.DEVNULL)
    bad = 0
    for job in jobs:
        name = job["name"].split("@")[0]
        c = cases[name]
        want = tg._golden(c)
        got = tg._tensors(Path(job["out"]))
        try:
            tg.assert_same_statistics(c, got, want, root)
            print(f"{job['name']}: two mergekit draws agree (as they must)")
        except AssertionError as e:
            bad += 1
            print(f"{job['name']}: TOO TIGHT: {str(e)[:600]}")
    for name, c in cases.items():
        want = tg._golden(c)
        r = yaml.safe_load(c["recipe"])
        base = tg._tensors(root / r["base_model"])
        wrong = {n: (base[n].double() + 1.25 * (t.double() - base[n].double())).to(t.dtype) if n in base else t
                 for n, t in want.items()}
        try:
            tg.assert_same_statistics(c, wrong, want, root)
            bad += 1
            print(f"{name}: TOO LOOSE: a delta 1.25x too large passes")
        except AssertionError:
            print(f"{name}: a delta 1.25x too large is caught")
    raise SystemExit(1 if bad else 0)


if __name__ == "__main__":
    main()
