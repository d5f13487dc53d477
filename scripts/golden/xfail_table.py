"""Today's golden failures with no xfail marks, as a markdown table (not run by CI; see docs/GOLDEN.md).

    python scripts/golden/xfail_table.py > /tmp/table.md

Runs tests/test_golden.py with SOUPLM_GOLDEN_NO_XFAIL=1 and lists every failing case with its first error
line, beside the reason tests/test_golden.py's XFAIL table gives for it (or "NOT IN XFAIL").
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def main() -> None:
    env = dict(os.environ, SOUPLM_GOLDEN_NO_XFAIL="1", COLUMNS="4000")
    run = subprocess.run([sys.executable, "-m", "pytest", "tests/test_golden.py", "-q", "-rf", "--tb=no",
                          "-p", "no:cacheprovider"], check=False, cwd=ROOT, env=env, capture_output=True, text=True)
    sys.path.insert(0, str(ROOT / "tests"))
    import test_golden as tg

    rows = []
    for line in run.stdout.splitlines():
        m = re.match(r"FAILED tests/test_golden.py::test_(\w+)\[(\w+)\](?: - (.*))?", line)
        if m:
            name, msg = m.group(2), (m.group(3) or "").replace("|", "\\|")
            rows.append((name, msg[:220], tg.XFAIL.get(name, "NOT IN XFAIL")))
    print("| case | failure today | XFAIL reason |\n|---|---|---|")
    for name, msg, why in sorted(rows):
        print(f"| {name} | {msg} | {why} |")
    stale = sorted(set(tg.XFAIL) - {r[0] for r in rows})
    if stale:
        print(f"\nIn XFAIL but passing today (remove): {', '.join(stale)}")
    summary = [ln for ln in run.stdout.splitlines() if re.search(r"\d+ (passed|failed)", ln) and "::" not in ln]
    print(f"\n{summary[-1] if summary else run.stderr[-500:]}")


if __name__ == "__main__":
    main()
