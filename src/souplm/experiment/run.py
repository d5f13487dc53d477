"""The SoupLM study on the real 135M model family, end to end: `docs/RESULTS.md` from one command.

    python -m souplm.experiment.run [--quick] [--cache DIR] [--out DIR]     (or: make experiment)

"Vicuna" is SmolLM2-135M-Instruct and "LLaVA" the LLaVA built from it (`souplm.experiment.family`); the
math and Shakespeare fine-tunes are the extra homologous variants for the N > 2 soups. The steps:

1. `vanilla`     alpha * LLaVA + (1 - alpha) * Vicuna for alpha = 0.0 ... 1.0 on every test task (Fig. 1).
2. `learnable`   per-mapping (`layer_mapping`) soups with each activation, trained on each single meta set
                 (dev splits) and on one mixed pair (paper Tables 2 and 3).
3. `regularized` L1-regularized soups over lambdas spanning orders of magnitude, at several seeds, against
                 the seed-to-seed variation without a penalty; alpha plots per mapping (Figs. 5 and 6).
4. `greedy`      greedy and uniform soups of the four variants, each chosen on a dev task.
5. `robustness`  three seeds of one learnable soup, and per-mapping against whole-model alpha.
6. `bases`       every variant alone on every test task, and the gap each opens on its speciality.
7. `adamms`      AdaMMS searches in several settings (target <- source on a task), alpha chosen without labels
                 by the authors' criterion and by souplm's older one, each checked against the labels.
   `rounds`      the paper's three ablation rounds (its section 3.3): each meta set over epochs x learning
                 rates, the best pair over rows x activation x learning rate x epochs, the pair's mixing ratio,
                 every grid point scored on the dev tasks; the chosen setting on the test tasks at 3 seeds.
   `general`     the chosen setting, the bases and the vanilla soup on tasks no meta set or variant was built from.
8. `statistics`  a 95% bootstrap interval over test items on every score, a paired test on every comparison
                 (McNemar or paired bootstrap), Holm's correction over all of them.
9. `claims`      a verdict (holds / does not hold / inconclusive) on each of the paper's claims.

Every evaluation goes through the souplm result cache and every learned soup lives in its own folder
named by its config, so an interrupted run resumes where it stopped and a rerun costs seconds. All
numbers land in `<out>/results/results.json` first; `RESULTS.md` is rendered from that file alone
(`render_markdown`), so no number in it is typed by hand. `--quick` runs the same code on a few rows per
task and a few learning steps, on the quick family (`family build --quick`).

The code: `settings` (roles, tasks, sizes), `data` (tasks and meta sets), `steps` (one function per step),
`stats` (intervals and paired tests), `pipeline` (`run_experiment`: the steps in order, timed), `report`
(`render_markdown`), and this module, the command line.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
from pathlib import Path

from souplm.errors import SoupError
from souplm.experiment.pipeline import run_experiment
from souplm.experiment.report import render_markdown
from souplm.experiment.settings import (
    ACTIVATIONS,
    ADAMMS_SETTINGS,
    FULL,
    GENERAL_TASKS,
    LARGE,
    META_SETS,
    QUICK,
    REQUIRED_PACKAGES,
    ROLES,
    ROLES_EXTRA,
    TASKS,
    Settings,
)

__all__ = ["ACTIVATIONS", "ADAMMS_SETTINGS", "FULL", "GENERAL_TASKS", "LARGE", "META_SETS", "QUICK", "REQUIRED_PACKAGES", "ROLES", "ROLES_EXTRA", "TASKS", "Settings",
           "check_packages", "main", "missing_packages", "render_markdown", "run_experiment"]


def missing_packages() -> list[tuple[str, str]]:
    """(package, install command) for each required package that is not installed."""
    return [(name, pip) for module, pip, name in REQUIRED_PACKAGES if importlib.util.find_spec(module) is None]


def check_packages() -> None:
    """Raise SoupError naming every missing package with the exact command that installs it."""
    missing = missing_packages()
    if missing:
        lines = "; ".join(f"{name} is not installed: {pip}" for name, pip in missing)
        raise SoupError(f"the experiment needs packages that are missing. {lines}")



# ------------------------------------------------------------------------------------------------ CLI


def default_out(quick: bool) -> Path:
    """docs/ for the full run; the quick run goes to a scratch folder, never over docs/RESULTS.md."""
    return Path("scratch/experiment-quick") if quick else Path("docs")


def main(argv: list[str] | None = None) -> int:
    """Command line: check packages, find the family, run every step; 2 and a message on a SoupError."""
    parser = argparse.ArgumentParser(prog="python -m souplm.experiment.run", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="a few rows per task and a few learning steps, on the quick family")
    parser.add_argument("--large", action="store_true",
                        help="issue 16 §2's test-set sizes (easy-vqa 1000, multiple choice 500, ~100 kB of text): "
                        "about 11 hours on 2 CPU cores; results go to --out (default scratch/experiment-large)")
    parser.add_argument("--cache", default=None, help="family folder (default $SOUPLM_CACHE/family, else ~/.cache/souplm/family)")
    parser.add_argument("--out", default=None,
                        help="where RESULTS.md and results/ go (default docs, or scratch/experiment-quick with --quick)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    parser.add_argument("--check", action="store_true", help="only check that the required packages are installed")
    args = parser.parse_args(argv)
    try:
        if args.large and args.quick:
            raise SoupError("--large and --quick: choose one")
        check_packages()
        if args.check:
            print("souplm experiment: required packages are installed")
            return 0
        import torch

        from souplm.experiment.family import MANIFEST, STAGE_NAMES, cache_root, family_dir, family_paths

        torch.set_num_threads(args.threads)
        paths = family_paths(args.cache, args.quick, STAGE_NAMES)
        folder = family_dir(args.cache, args.quick)
        # Generated data (the math problems) lives beside the family, as the family build put it.
        from souplm.data import sources

        sources.use_data_dir(cache_root(args.cache) / "data")
        manifest = json.loads((folder / MANIFEST).read_text())
        info = {name: {"dir": rec.get("dir"), "wall_s": rec.get("wall_s"),
                       "wall_min": (rec.get("wall_s") or 0.0) / 60}
                for name, rec in manifest.get("stages", {}).items()}
        out = Path(args.out) if args.out else Path("scratch/experiment-large") if args.large else default_out(args.quick)
        settings = QUICK if args.quick else LARGE if args.large else FULL
        from souplm.experiment.second_family import built_second_family

        run_experiment({k: paths[k] for k in (*ROLES, *ROLES_EXTRA)}, folder / "experiment", out, settings,
                       family_info=info, second_family=built_second_family(args.cache, args.quick))
    except SoupError as exc:
        print(f"souplm: error: {exc}", file=sys.stderr)
        return 2
    return 0


def _passive_openmp() -> None:
    """Re-run with OMP_WAIT_POLICY=PASSIVE (unless set): busy-waiting OpenMP threads waste a shared CPU."""
    if "OMP_WAIT_POLICY" in os.environ:
        return
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    os.execv(sys.executable, [sys.executable, "-m", "souplm.experiment.run", *sys.argv[1:]])


if __name__ == "__main__":
    _passive_openmp()
    sys.exit(main())
