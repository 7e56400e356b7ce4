"""Write the README's Reliability table from the fault suite's findings (`make reliability`).

    python tests/faults/reliability_table.py FINDINGS.jsonl README.md

Replaces what lies between the `<!-- reliability -->` and `<!-- /reliability -->` markers.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

START, END = "<!-- reliability -->", "<!-- /reliability -->"


def table(findings: Path) -> str:
    rows = [json.loads(line) for line in findings.read_text().splitlines() if line.strip()]
    if not rows:
        raise SystemExit(f"{findings}: no findings (did the fault suite pass?)")
    lines = ["| fault injected | what lamra-pl did (asserted) | test |", "|---|---|---|"]
    lines += [f"| {r['fault']} | {r['outcome']} | `tests/faults/{r['file']}::{r['test']}` |" for r in rows]
    return "\n".join(lines)


def main() -> None:
    findings, readme = Path(sys.argv[1]), Path(sys.argv[2])
    text = readme.read_text()
    if START not in text or END not in text:
        raise SystemExit(f"{readme}: no {START} ... {END} markers")
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    readme.write_text(f"{head}{START}\n{table(findings)}\n{END}{tail}")


if __name__ == "__main__":
    main()
