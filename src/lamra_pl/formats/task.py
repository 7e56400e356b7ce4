"""An evaluation task folder: one task's queries, its local pool and its qrels (written by `convert-mbeir`).

Layout version VERSION:

    TASK/                    named <dataset>_task<N>, e.g. eval/test/mscoco_task0
      task.json              {"format": "lamra-pl-task", "version": 2, "dataset", "task_id", "split",
                              "query_modalities", "queries": n, "pool": n, "recall_k": 5 | 10,
                              "metrics": ["R@1", "R@5", "R@10"], "reported": "R@5"}
                             (folders written before the version field read as version 1)
      qrels.txt              M-BEIR qrels, one line per positive: `qid 0 did relevance task_id` (relevance > 0 counts)
      qrels.trec             the same in TREC's four columns, `qid 0 did relevance`, for TREC tools (trec_eval,
                             pytrec_eval, ir_measures), which refuse the fifth; with the run files of `lamra-pl
                             retrieve` (`qid Q0 did rank score tag`) they score a run folder without lamra-pl
                             (folders written before it have qrels.txt only, which is all lamra-pl reads)
      queries/               the query shards (`lamra_pl.formats.sample` records); a training task folder holds
                             its shards at its top level instead
      pool/ids.txt           the ids of the task's local pool; an evaluation task's pool/ also holds the pool's
                             candidate shards

`recall_k` is M-BEIR's reported metric for the task (R@10 for Fashion200K and FashionIQ, R@5 elsewhere).

Version 2 adds the metric spec: "metrics", the metrics `lamra-pl evaluate` computes for the task besides R@1/5/10
(`R@k`: hit rate in the top k; `mAP@k`: CIRCO's mean average precision at k, `lamra_pl.ranking.metrics`), and
"reported", the one the task reports (its column in a results table, e.g. CIRCO's "mAP@5"). A version-1 folder
(no spec) reads as metrics R@1/5/10 and reported R@`recall_k`: `task_metrics` and `reported_metric` give either.
An older lamra-pl refuses version 2, rather than scoring a CIRCO task by the wrong metric.

Optional, version 2: `galleries.jsonl`, one line `{"qid": ..., "ids": [...]}` per query, each query's own gallery
(GeneCIS): `lamra-pl retrieve` ranks a query's gallery only, in the local pool setting.

Optional, version 3: `excluded.jsonl`, the same lines, the candidates a query may not be answered with (VIST: the
images its story shows already, which LamRA scores out of the ranking): `lamra-pl retrieve` leaves them out of the
query's ranking, in both pool settings. A folder is written at the lowest version that describes it (3 only with
excluded.jsonl), so an older lamra-pl refuses only what it would score wrongly.
"""

from __future__ import annotations

import glob
import json
import re
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from lamra_pl.errors import LamraError
from lamra_pl.formats.shards import POOL_IDS, write_pool_ids

FORMAT, VERSION = "lamra-pl-task", 3
READABLE = (1, 2, 3)  # version 1: no metric spec (M-BEIR's R@1/5/10, reported R@recall_k); 3: excluded.jsonl
METRIC = re.compile(r"(?P<name>R|mAP)@(?P<k>[1-9][0-9]*)")  # the metric names a task.json may list
DEFAULT_METRICS = ("R@1", "R@5", "R@10")
GALLERIES_FILE = "galleries.jsonl"
EXCLUDED_FILE = "excluded.jsonl"
TASK_FILE = "task.json"
QRELS_FILE = "qrels.txt"
TREC_QRELS_FILE = "qrels.trec"
QUERIES = "queries"
POOL = "pool"


def task_dirs(spec: str) -> list[Path]:
    """Task folders from a glob ("data/eval/test/*_task*", or "data/train/*_task*": training folders are tasks on
    the training pool too) or one folder."""
    found = sorted(Path(p) for p in glob.glob(spec) if (Path(p) / TASK_FILE).is_file())
    if not found:
        raise LamraError(f"no evaluation task folder (with {TASK_FILE}) matches {spec!r}")
    return found


def task_info(task_dir: str | Path) -> dict[str, Any]:
    """The task's task.json."""
    path = Path(task_dir) / TASK_FILE
    if not path.is_file():
        raise LamraError(f"{task_dir} is not an evaluation task folder (no {TASK_FILE}; see `lamra-pl convert-mbeir`)")
    info = json.loads(path.read_text())
    if info.get("version", 1) not in READABLE:
        raise LamraError(f"{path}: a {FORMAT} of version {info['version']}; this lamra-pl reads versions {READABLE}")
    for name in (*info.get("metrics", ()), *([info["reported"]] if "reported" in info else [])):
        if not isinstance(name, str) or not METRIC.fullmatch(name):
            raise LamraError(f"{path}: metric {name!r} is not one this lamra-pl computes (R@k, mAP@k)")
    return info


def task_metrics(info: dict[str, Any]) -> list[str]:
    """The metrics a task is scored by: R@1/5/10 and those its task.json lists (version 2), in that order."""
    return list(dict.fromkeys([*DEFAULT_METRICS, *info.get("metrics", ()), reported_metric(info)]))


def reported_metric(info: dict[str, Any]) -> str:
    """The metric a task reports: task.json's "reported" (version 2), else M-BEIR's R@`recall_k`."""
    return info.get("reported") or f"R@{info['recall_k']}"


def read_galleries(task_dir: str | Path) -> dict[str, list[str]] | None:
    """qid -> the ids of its own gallery, from the task's galleries.jsonl; None when the task has none."""
    return _id_lists(Path(task_dir) / GALLERIES_FILE)


def read_excluded(task_dir: str | Path) -> dict[str, list[str]] | None:
    """qid -> the ids its ranking leaves out, from the task's excluded.jsonl; None when the task has none."""
    return _id_lists(Path(task_dir) / EXCLUDED_FILE)


def _id_lists(path: Path) -> dict[str, list[str]] | None:
    """qid -> ids, from a file of `{"qid": ..., "ids": [...]}` lines; None when there is no such file."""
    if not path.is_file():
        return None
    found: dict[str, list[str]] = {}
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        try:
            row = json.loads(line)
            qid, ids = row["qid"], row["ids"]
        except (ValueError, TypeError, KeyError):
            raise LamraError(f'{path}:{number}: expected {{"qid": ..., "ids": [...]}}') from None
        if not isinstance(qid, str) or not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
            raise LamraError(f"{path}:{number}: qid must be a string and ids a list of strings")
        if qid in found:
            raise LamraError(f"{path}:{number}: qid {qid!r} has a line already")
        found[qid] = ids
    return found


def query_shards(task_dir: str | Path) -> Path:
    """A task's query shard folder: `queries/` in an evaluation task, the folder itself in a training task."""
    task_dir = Path(task_dir)
    return task_dir / QUERIES if (task_dir / QUERIES).is_dir() else task_dir


def qrels_file(task_dir: str | Path) -> Path:
    return Path(task_dir) / QRELS_FILE


def pool_ids_file(task_dir: str | Path) -> Path:
    return Path(task_dir) / POOL / POOL_IDS


def pool_ids(task_dir: str | Path) -> list[str]:
    """The ids of the task's local pool, in shard order."""
    path = pool_ids_file(task_dir)
    if not path.is_file():
        raise LamraError(f"{path} does not exist: convert the data again with `lamra-pl convert-mbeir`")
    return path.read_text().splitlines()


def write_task(
    task_dir: str | Path,
    info: dict[str, Any],
    qrels: Iterable[str],
    pool: Iterable[str] | None = None,
    galleries: dict[str, list[str]] | None = None,
    excluded: dict[str, list[str]] | None = None,
) -> Path:
    """task.json (with this layout's format and the lowest version that describes it), qrels.txt (M-BEIR lines as
    given: `qid 0 did relevance [task_id]`), qrels.trec (their first four columns) and, if given, pool/ids.txt,
    galleries.jsonl and excluded.jsonl."""
    task_dir = Path(task_dir)
    task_dir.mkdir(parents=True, exist_ok=True)
    if pool is not None:
        write_pool_ids(task_dir / POOL, pool)
    lines = list(qrels)
    qrels_file(task_dir).write_text("".join(f"{line}\n" for line in lines))
    trec = (" ".join(line.split()[:4]) for line in lines if line.strip())
    (task_dir / TREC_QRELS_FILE).write_text("".join(f"{line}\n" for line in trec))
    for name, lists in ((GALLERIES_FILE, galleries), (EXCLUDED_FILE, excluded)):
        if lists is not None:
            rows = (json.dumps({"qid": qid, "ids": ids}) for qid, ids in lists.items())
            (task_dir / name).write_text("".join(f"{row}\n" for row in rows))
    version = VERSION if excluded is not None else 2
    (task_dir / TASK_FILE).write_text(json.dumps({"format": FORMAT, "version": version, **info}, indent=1))
    return task_dir


def read_qrels(path: str | Path) -> dict[str, set[str]]:
    """qid -> its positive ids, from an M-BEIR qrels file."""
    path = Path(path)
    if not path.is_file():
        raise LamraError(f"qrels file {path} does not exist")
    qrels: dict[str, set[str]] = defaultdict(set)
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        fields = line.split()
        try:
            qid, did, relevance = fields[0], fields[2], int(fields[3])
        except (IndexError, ValueError):
            raise LamraError(f"{path}:{number}: expected 'qid 0 did relevance task_id', got {line!r}") from None
        if relevance > 0:
            qrels[qid].add(did)
    return dict(qrels)
