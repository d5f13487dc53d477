"""Today's golden results as markdown tables (not run by CI; see docs/GOLDEN.md).

    python scripts/golden/xfail_table.py            # failures with no xfail marks, beside their XFAIL reasons
    python scripts/golden/xfail_table.py --cases    # every case: mergekit ok/failed, souplm pass/xfail/FAIL
    python scripts/golden/xfail_table.py --docs     # the same, written into docs/GOLDEN.md's "Current results"

The first runs tests/test_golden.py with SOUPLM_GOLDEN_NO_XFAIL=1 and lists every failing case with its
first error line, beside the reason the XFAIL table gives for it (or "NOT IN XFAIL"); the second runs it
as CI does.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def cases_table(docs: bool = False) -> None:
    env = dict(os.environ, COLUMNS="4000")
    run = subprocess.run([sys.executable, "-m", "pytest", "tests/test_golden.py", "-q", "-rA", "--tb=no",
                          "-p", "no:cacheprovider"], check=False, cwd=ROOT, env=env, capture_output=True, text=True)
    sys.path.insert(0, str(ROOT / "tests"))
    import test_golden as tg

    status: dict[str, str] = {}
    for line in run.stdout.splitlines():
        m = re.match(r"(PASSED|FAILED|XFAIL|XPASS) tests/test_golden.py::test_(\w+)\[(\w+)\]", line)
        if m:
            status[m.group(3)] = {"PASSED": "pass", "XFAIL": "xfail", "FAILED": "FAIL", "XPASS": "XPASS"}[m.group(1)]
    lines = ["| case | group | method | arch | mergekit | souplm | load | note |", "|---|---|---|---|---|---|---|---|"]
    plain = []
    for name, c in tg.CASES.items():
        mk = "ok" if c["mergekit_ok"] else "failed: " + (c["mergekit_error"] or "").splitlines()[0][:90]
        note = tg.XFAIL.get(name) or tg.NOT_REFERENCE.get(name) or ""
        if not c["mergekit_ok"] and name not in tg.NOT_REFERENCE:
            note = note or "souplm must refuse it too"
        elif name in tg.NOT_REFERENCE:
            note = "reference: float64 statement (" + note + ")"
        load = status.get(f"load_{name}", "")
        if docs and mk == "ok" and status.get(name) == "pass" and not note and load in ("", "pass"):
            plain.append(name + (" (+load)" if load else ""))
            continue
        lines.append(f"| {name} | {c['group']} | {c['method']} | {c['arch']} | {mk.replace('|', '/')} | "
                     f"{status.get(name, '?')} | {load} | {note.replace('|', '/')} |")
    counts: dict[str, int] = {}
    for v in status.values():
        counts[v] = counts.get(v, 0) + 1
    foot = "Tests: " + ", ".join(f"{n} {k}" for k, n in sorted(counts.items()))
    if not docs:
        print("\n".join(lines) + "\n\n" + foot)
        return
    stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    text = (f"From `python scripts/golden/xfail_table.py --docs` at {stamp} ({foot}; load = the load-and-generate "
            f"test):\n\n" + "\n".join(lines) + f"\n\nmergekit ok, souplm pass ({len(plain)}): {', '.join(plain)}.\n\n")
    doc = ROOT / "docs" / "GOLDEN.md"
    s = doc.read_text()
    a = s.index("## Current results") + len("## Current results\n\n")
    b = s.index("## Differences measured")
    doc.write_text(s[:a] + text + s[b:])


def main() -> None:
    if "--cases" in sys.argv or "--docs" in sys.argv:
        cases_table(docs="--docs" in sys.argv)
        return
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
