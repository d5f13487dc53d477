"""Run mergekit 0.1.5's own CLI (`mergekit-yaml`) on every golden case, in one process (run by build.py with
mergekit's virtual environment: /work/venvs/mergekit/bin/python run_mergekit.py JOBS.json RESULTS.json).

Each job: {"name", "recipe", "out", "cwd", "args"}; the result says whether mergekit succeeded and, when
not, its error (the exception's last line). Model paths in the recipes are relative to `cwd`.
"""

from __future__ import annotations

import json
import os
import sys
import traceback
from importlib.metadata import version
from pathlib import Path

from mergekit.scripts.run_yaml import main as mergekit_yaml


def run(job: dict) -> dict:
    os.chdir(job["cwd"])
    try:
        mergekit_yaml([job["recipe"], job["out"], *job["args"]], standalone_mode=False)
        return {"ok": True, "error": None}
    except BaseException as e:  # noqa: BLE001 - recorded, never hidden: this is mergekit's failure
        last = traceback.format_exception_only(type(e), e)[-1].strip()
        return {"ok": False, "error": last[:2000]}


def main() -> None:
    jobs = json.loads(Path(sys.argv[1]).read_text())
    results = {}
    for job in jobs:
        results[job["name"]] = run(job)
        print(job["name"], "ok" if results[job["name"]]["ok"] else "FAILED: " + results[job["name"]]["error"],
              flush=True)
    Path(sys.argv[2]).write_text(json.dumps({"mergekit_version": version("mergekit"), "results": results}, indent=1))


if __name__ == "__main__":
    main()
