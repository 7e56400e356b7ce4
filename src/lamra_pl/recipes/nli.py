"""SimCSE-style NLI triples (CSV `sent0,sent1,hard_neg`) or pairs (`sent0,sent1`) -> text-only training shards for
the language-only stage.

    lamra-pl convert-nli --csv nli_for_simcse.csv --out OUT_DIR [--strict]

Writes `OUT_DIR/train/nli_task1/` (M-BEIR task 1, text -> text): query = sent0, positive = sent1, and the
contradiction `hard_neg` kept as a hard negative (LamRA's reference reads it and drops it; train with
`data.num_negatives: 1` to use it, 0 to reproduce the reference). A CSV without the `hard_neg` column is pair
data (e.g. SimCSE's unsupervised or any query-positive pairs): its records have no negative. Candidate ids hash the
text, so the same sentence twice in a batch is masked as a duplicate instead of counted as a negative. A row with a
missing or empty field of the file's columns is reported with its line number and skipped (or stops the run with
`--strict`).
"""

from __future__ import annotations

import csv as csv_format
import hashlib
import json
from pathlib import Path
from typing import Any

from lamra_pl.errors import LamraError
from lamra_pl.formats.sample import encode_record
from lamra_pl.formats.shards import write_shards
from lamra_pl.progress import counted, progress
from lamra_pl.recipes.mbeir import Problems

COLUMNS = ("sent0", "sent1", "hard_neg")
REQUIRED = COLUMNS[:2]  # a file without hard_neg is pair data


def text_id(text: str) -> str:
    return "nli:" + hashlib.sha1(text.encode()).hexdigest()[:16]


def convert(csv: str, out: str, strict: bool = False) -> dict[str, Any]:
    """Convert SimCSE-style NLI triples (sent0,sent1,hard_neg) or pairs (sent0,sent1) to text-only training shards.

    Prints and returns {"read", "written", "dropped", "problems"}.

    Args:
        csv: the CSV file.
        out: output folder (train/nli_task1/).
        strict: stop at the first bad row instead of skipping and counting.
    """
    path = Path(csv)
    if not path.is_file():
        raise LamraError(f"NLI file {csv!r} does not exist")
    problems = Problems(strict)
    counts = {"read": 0, "written": 0, "dropped": 0}

    def samples() -> Any:
        with path.open(newline="", encoding="utf-8") as handle:
            reader = csv_format.DictReader(handle)
            missing = [c for c in REQUIRED if c not in (reader.fieldnames or [])]
            if missing:
                expected = f"{','.join(COLUMNS)} (triples) or {','.join(REQUIRED)} (pairs)"
                raise LamraError(f"{path}:1: the header has no column {missing[0]!r}; expected {expected}")
            columns = COLUMNS if COLUMNS[2] in (reader.fieldnames or []) else REQUIRED
            for row in reader:
                counts["read"] += 1
                line = reader.line_num
                empty = [c for c in columns if not (row.get(c) or "").strip()]
                if empty:
                    problems("malformed_line", path, line, f"empty or missing {empty[0]!r}")
                    counts["dropped"] += 1
                    continue
                sent0, sent1, *negative = (row[c].strip() for c in columns)
                counts["written"] += 1
                yield encode_record(
                    f"{counts['read']:09d}",
                    qid=f"nli:{counts['read']}",
                    task_id=1,
                    query={"txt": sent0},
                    positives=[{"id": text_id(sent1), "txt": sent1}],
                    negatives=[{"id": text_id(n), "txt": n} for n in negative],
                )

    with progress(desc="convert-nli", unit="rows") as bar:
        write_shards(counted(samples(), bar), Path(out) / "train" / "nli_task1", maxcount=10000)
    report = {**counts, "problems": dict(problems.counts)}
    print(json.dumps(report, indent=1))
    return report
