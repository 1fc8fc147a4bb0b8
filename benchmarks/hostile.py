"""Every hostile case in one command: a table of case, expected verdict, actual, data lost.

The cases are the hostile-input catalogues of the test suite (`tests/test_hostile*.py`: the auditor's verify
catalogue, the output-directory catalogue, the service's crash and upload cases), run by pytest in this
process. Each case records what it expected, what happened and whether any file that existed before it changed
or vanished (`record_property`); this script gathers those records and prints them, one row per case, with the
pytest outcome. A row holds when its case passed. Exit 0 when every row holds.

    python benchmarks/hostile.py                     # all catalogues
    python benchmarks/hostile.py -k verify           # a pytest -k expression
    python benchmarks/hostile.py --json hostile.json # the rows as JSON too
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
# A case's temporary folder, which every error message names first: left out of the table.
_TMP = re.compile(r"\S*/pytest-\d+/[^/\s]+/")


def _short(text: Any, width: int = 100) -> str:
    text = _TMP.sub("", str(text)).replace("\n", " ")
    return text if len(text) <= width else text[: width - 3] + "..."


class Rows:
    """A pytest plugin: one row per test of the catalogues, from the properties each case records."""

    def __init__(self) -> None:
        self.rows: list[dict[str, Any]] = []

    def pytest_runtest_logreport(self, report: Any) -> None:
        if report.when != "call" and not (report.when == "setup" and (report.skipped or report.failed)):
            return
        props = dict(report.user_properties)
        name = report.nodeid.split("::", 1)[1]
        first_line = (report.longreprtext.strip().splitlines() or [""])[-1] if report.failed else ""
        self.rows.append({
            "case": name,
            "file": report.nodeid.split("::", 1)[0].rsplit("/", 1)[-1],
            "expected": props.get("expected", "as the test states"),
            "actual": _short(props.get("actual", "as expected" if report.passed else first_line or report.outcome)),
            "data_lost": props.get("data_lost", "-"),
            "holds": "yes" if report.passed else ("skipped" if report.skipped else "NO"),
        })


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-k", default=None, help="a pytest -k expression selecting cases")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows here")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import pytest

    files = sorted(str(p) for p in (ROOT / "tests").glob("test_hostile*.py"))
    plugin = Rows()
    argv = [*files, "-q", "-p", "no:cacheprovider", "--rootdir", str(ROOT), "-o", "console_output_style=classic"]
    if args.k:
        argv += ["-k", args.k]
    code = pytest.main(argv, plugins=[plugin])
    rows = plugin.rows
    print()
    print("| case | expected | actual | data lost | holds |")
    print("|---|---|---|---|---|")
    for r in rows:
        cells = [f"{r['file']}::{r['case']}", r["expected"], r["actual"], r["data_lost"], r["holds"]]
        print("| " + " | ".join(str(c).replace("|", "/").replace("\n", " ") for c in cells) + " |")
    held = sum(r["holds"] == "yes" for r in rows)
    skipped = sum(r["holds"] == "skipped" for r in rows)
    print(f"\n{held} of {len(rows)} rows hold" + (f", {skipped} skipped" if skipped else "")
          + f"; data lost in {sum(r['data_lost'].startswith('yes') for r in rows)}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1) + "\n")
    return 0 if code == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
