"""M-BEIR folder -> training shards, evaluation sets and the global pool (specs/mmembed_mbeir.md section 5).

    lamra-pl convert-mbeir --root M_BEIR_DIR --out OUT_DIR [--strict] [--splits test]

Reads the M-BEIR layout: `query/union_train/*.jsonl` (else `query/train/*.jsonl`), `query/<split>/
mbeir_<dataset>_task<N>_<split>.jsonl`, every pool under `cand_pool/`, `qrels/<split>/`,
`instructions/query_instructions.tsv` and the images (paths relative to the root). Writes:

    OUT_DIR/train/<dataset>_task<N>/shard-*.tar        training queries with positives, listed negatives and the
                                                        instructions of (dataset id, query modality, positive modality)
    OUT_DIR/train/<dataset>_task<N>/{qrels.txt,task.json,pool/ids.txt}   the same folder as an evaluation task on
                                                        the training pool (for `lamra-pl retrieve` + `rerank-data`)
    OUT_DIR/train_pool/                                M-BEIR's union training pool (else every candidate the
                                                        training queries list), with ids.txt
    OUT_DIR/eval/<split>/<dataset>_task<N>/queries/    evaluation queries (same sample schema)
    OUT_DIR/eval/<split>/<dataset>_task<N>/pool/       the task's local candidate pool, one candidate per sample,
                                                        and ids.txt (its ids, in shard order)
    OUT_DIR/eval/<split>/<dataset>_task<N>/qrels.txt   M-BEIR qrels; task.json: what the task is and its metric
    OUT_DIR/eval/<split>/global_pool/                  the union of the split's local pools
    OUT_DIR/report.json                                counts of what was read, written and skipped, by reason

Every problem is reported with file and line: a malformed line, an unknown modality, a missing image file, a
positive (or negative) id absent from every pool, a query left without positives, a missing instruction.
Without `--strict` the offending record is skipped and counted; with it, the first problem stops the run.
"""

from __future__ import annotations

import json
import logging
import re
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lamra_pl.errors import LamraError
from lamra_pl.formats.sample import MODALITIES, encode_candidate, encode_record
from lamra_pl.formats.shards import write_pool_ids, write_shards
from lamra_pl.formats.task import POOL, QUERIES, write_task

log = logging.getLogger(__name__)

# M-BEIR's task ids by (query modality, candidate modality) and its reported metric per dataset.
TASKS = {
    ("text", "image"): 0,
    ("text", "text"): 1,
    ("text", "image,text"): 2,
    ("image", "text"): 3,
    ("image", "image"): 4,
    ("image", "image,text"): 5,
    ("image,text", "text"): 6,
    ("image,text", "image"): 7,
    ("image,text", "image,text"): 8,
}
RECALL_AT_10 = {"fashion200k", "fashioniq"}  # M-BEIR reports R@10 for these, R@5 elsewhere
EVAL_FILE = re.compile(r"mbeir_(?P<dataset>.+)_task(?P<task>\d+)_(?P<split>[a-z]+)\.jsonl$")


@dataclass
class Problems:
    """Counts problems by reason; raises on the first one when strict. Nothing is dropped without a count."""

    strict: bool
    counts: Counter[str] = field(default_factory=Counter)

    def __call__(self, reason: str, file: Path, line: int, detail: str) -> None:
        message = f"{file}:{line}: {detail}"
        if self.strict:
            raise LamraError(f"{message} (convert-mbeir --strict stops at the first problem)")
        self.counts[reason] += 1
        log.warning("skipped (%s) %s", reason, message)


@dataclass
class Candidate:
    did: str
    txt: str | None
    img: str | None
    modality: str


class Converter:
    def __init__(self, root: Path, problems: Problems) -> None:
        self.root = root
        self.problems = problems
        # Every non-empty input line is read, then written or dropped: read == written + dropped, per kind.
        self.read: Counter[str] = Counter()
        self.written: Counter[str] = Counter()
        self.dropped: Counter[str] = Counter()
        self.pool: dict[str, Candidate] = {}
        self.pool_files: dict[Path, list[str]] = defaultdict(list)  # valid ids, in file order
        self.instructions: dict[tuple[str, str, str], list[str]] = {}
        self.dataset_names: dict[str, str] = {}

    # ----------------------------------------------------------------------------------- reading
    def lines(self, path: Path, kind: str) -> Any:
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            self.read[kind] += 1
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                self.problems("malformed_line", path, number, f"not valid JSON ({err.msg})")
                self.dropped[kind] += 1
                continue
            if not isinstance(row, dict):
                self.problems("malformed_line", path, number, "a line must be a JSON object")
                self.dropped[kind] += 1
                continue
            yield number, row

    def image_ok(self, rel: str | None, path: Path, number: int) -> bool:
        if rel is None:
            return True
        if not (self.root / rel).is_file():
            self.problems("missing_image", path, number, f"image file {rel!r} does not exist under {self.root}")
            return False
        return True

    def load_pools(self) -> None:
        files = sorted((self.root / "cand_pool").rglob("*.jsonl"))
        if not files:
            raise LamraError(f"{self.root}: no candidate pool files under cand_pool/")
        for path in files:
            for number, row in self.lines(path, "candidates"):
                candidate = self.candidate(row, path, number)
                if candidate is None:
                    self.dropped["candidates"] += 1
                else:
                    self.written["candidates"] += 1
                    self.pool[candidate.did] = candidate
                    self.pool_files[path].append(candidate.did)

    def candidate(self, row: dict, path: Path, number: int) -> Candidate | None:
        missing = [k for k in ("did", "modality") if k not in row]
        if missing:
            self.problems("malformed_line", path, number, f"candidate has no {missing[0]!r} field")
            return None
        if row["modality"] not in MODALITIES:
            self.problems("unknown_modality", path, number, f"modality {row['modality']!r}; use {MODALITIES}")
            return None
        txt, img = row.get("txt"), row.get("img_path")
        if txt is None and img is None:
            self.problems("malformed_line", path, number, "candidate has neither txt nor img_path")
            return None
        return Candidate(str(row["did"]), txt, img, row["modality"]) if self.image_ok(img, path, number) else None

    def load_instructions(self) -> None:
        path = self.root / "instructions" / "query_instructions.tsv"
        if not path.is_file():
            raise LamraError(f"{path} does not exist: M-BEIR keeps the task instructions there")
        rows = path.read_text(encoding="utf-8").splitlines()
        for number, line in enumerate(rows[1:], start=2):
            cols = line.split("\t")
            if len(cols) < 5:
                self.problems(
                    "malformed_line", path, number, "expected query_modality, cand_modality, name, id, prompts"
                )
                continue
            qm, cm, name, dataset_id = (c.strip() for c in cols[:4])
            self.instructions[(dataset_id, qm, cm)] = [p.strip() for p in cols[4:] if p.strip()]
            self.dataset_names[dataset_id] = name.strip().lower()

    def query_record(self, row: dict, path: Path, number: int, pool: dict[str, Candidate]) -> dict[str, Any] | None:
        for key in ("qid", "query_modality", "pos_cand_list"):
            if key not in row:
                self.problems("malformed_line", path, number, f"query has no {key!r} field")
                return None
        if row["query_modality"] not in MODALITIES:
            self.problems(
                "unknown_modality", path, number, f"query_modality {row['query_modality']!r}; use {MODALITIES}"
            )
            return None
        if not self.image_ok(row.get("query_img_path"), path, number):
            return None
        positives = []
        for did in row["pos_cand_list"]:
            if str(did) in pool:
                positives.append(pool[str(did)])
            else:
                self.problems("unknown_positive", path, number, f"positive {did!r} of {row['qid']} is in no pool")
        if not positives:
            self.problems("no_positive", path, number, f"query {row['qid']} has no usable positive")
            return None
        negatives = []
        for did in row.get("neg_cand_list") or []:
            if str(did) in pool:
                negatives.append(pool[str(did)])
            else:
                self.problems("unknown_negative", path, number, f"negative {did!r} of {row['qid']} is in no pool")
        dataset_id = str(row["qid"]).split(":")[0]
        key = (dataset_id, row["query_modality"], positives[0].modality)
        instructions = self.instructions.get(key)
        if instructions is None:
            self.problems("no_instruction", path, number, f"no instruction for {key} in query_instructions.tsv")
            return None
        task = TASKS[(row["query_modality"], positives[0].modality)]
        return {
            "qid": str(row["qid"]),
            "query_modality": row["query_modality"],
            "task_id": row.get("task_id", task),
            "query": {
                "txt": row.get("query_txt"),
                "image": self.image(row.get("query_img_path")),
                "img_src": row.get("query_img_path"),
            },
            "positives": [self.item(c) for c in positives],
            "negatives": [self.item(c) for c in negatives],
            "instructions": instructions,
        }

    def image(self, rel: str | None) -> tuple[bytes, str] | None:
        if rel is None:
            return None
        path = self.root / rel
        return path.read_bytes(), path.suffix.lstrip(".").lower() or "jpg"

    def item(self, c: Candidate) -> dict[str, Any]:
        return {"id": c.did, "txt": c.txt, "image": self.image(c.img), "img_src": c.img, "modality": c.modality}

    def group(self, dataset_id: str, task: int) -> str:
        return f"{self.dataset_names.get(dataset_id, dataset_id)}_task{task}"

    # ----------------------------------------------------------------------------------- writing
    def train(self, out: Path) -> None:
        folder = self.root / "query" / "union_train"
        files = sorted(folder.glob("*.jsonl")) or sorted((self.root / "query" / "train").glob("*.jsonl"))
        groups: dict[str, list[dict]] = defaultdict(list)
        for path in files:
            for number, row in self.lines(path, "train_queries"):
                record = self.query_record(row, path, number, self.pool)
                if record is None:
                    self.dropped["train_queries"] += 1
                else:
                    groups[self.group(record["qid"].split(":")[0], record["task_id"])].append(record)
        pool = self.train_pool(groups)
        self.write_pool(pool, out / "train_pool")
        for name, records in sorted(groups.items()):
            samples = (encode_record(f"{i:08d}", **_fields(r)) for i, r in enumerate(records))
            self.written["train_queries"] += sum(write_shards(samples, out / "train" / name).values())
            self.train_task(out / "train" / name, records, pool)

    def train_pool(self, groups: dict[str, list[dict]]) -> list[Candidate]:
        """M-BEIR's union training pool, else every candidate the training queries list (positive or negative)."""
        union = [p for p in self.pool_files if p.name.endswith("union_train_cand_pool.jsonl")]
        if union:
            return [self.pool[did] for did in self.pool_files[union[0]]]
        listed = {c["id"] for rs in groups.values() for r in rs for c in r["positives"] + r["negatives"]}
        return [c for did, c in self.pool.items() if did in listed]

    def train_task(self, task_dir: Path, records: list[dict], pool: list[Candidate]) -> None:
        """What makes a training folder an evaluation task too (`lamra-pl retrieve` runs its queries, as
        `lamra-pl rerank-data` needs): qrels, task.json and its local pool, the training-pool candidates of its
        dataset and of its positives' modalities (LamRA's per-task rerank pools, spec lamra.md section 4)."""
        dataset_id = records[0]["qid"].split(":")[0]
        modalities = {p["modality"] for r in records for p in r["positives"]}
        ids = [c.did for c in pool if c.modality in modalities and c.did.split(":")[0] == dataset_id]
        qrels = [f"{r['qid']} 0 {p['id']} 1 {r['task_id']}" for r in records for p in r["positives"]]
        dataset = self.dataset_names.get(dataset_id, dataset_id)
        info = {
            "dataset": dataset,
            "task_id": records[0]["task_id"],
            "split": "train",
            "query_modalities": sorted({r["query_modality"] for r in records}),
            "queries": len(records),
            "pool": len(ids),
            "recall_k": 10 if dataset in RECALL_AT_10 else 5,
        }
        write_task(task_dir, info, qrels, pool=ids)

    def evaluation(self, out: Path, split: str) -> None:
        union: dict[str, Candidate] = {}
        for path in sorted((self.root / "query" / split).glob("*.jsonl")):
            match = EVAL_FILE.search(path.name)
            if match is None:
                raise LamraError(f"{path}: expected a name like mbeir_<dataset>_task<N>_{split}.jsonl")
            dataset, task = match["dataset"], int(match["task"])
            name = f"mbeir_{dataset}_task{task}"
            local = self.root / "cand_pool" / "local"
            pool_file = local / f"{name}_{split}_cand_pool.jsonl"
            pool_file = pool_file if pool_file.is_file() else local / f"{name}_cand_pool.jsonl"
            if not pool_file.is_file():
                raise LamraError(f"{path}: its local pool {pool_file} does not exist")
            pool = {did: self.pool[did] for did in self.pool_files[pool_file]}
            task_dir = out / "eval" / split / f"{dataset}_task{task}"
            records = []
            query_modalities: set[str] = set()
            for number, row in self.lines(path, f"{split}_queries"):
                # M-BEIR's eval positives come from the whole union (OVEN/InfoSeek cross-reference); the local
                # pool is what is searched.
                record = self.query_record(row, path, number, self.pool)
                if record is None:
                    self.dropped[f"{split}_queries"] += 1
                else:
                    records.append(record)
                    query_modalities.add(row["query_modality"])
            self.written[f"{split}_queries"] += sum(
                write_shards(
                    (encode_record(f"{i:08d}", **_fields(r)) for i, r in enumerate(records)), task_dir / QUERIES
                ).values()
            )
            self.write_pool(pool.values(), task_dir / POOL)
            qrels = self.root / "qrels" / split / f"{name}_{split}_qrels.txt"
            lines = (
                qrels.read_text().splitlines()
                if qrels.is_file()
                else [f"{r['qid']} 0 {p['id']} 1 {r['task_id']}" for r in records for p in r["positives"]]
            )
            kept = {r["qid"] for r in records}
            info = {
                "dataset": dataset,
                "task_id": task,
                "split": split,
                "query_modalities": sorted(query_modalities),
                "queries": len(records),
                "pool": len(pool),
                "recall_k": 10 if dataset in RECALL_AT_10 else 5,
            }
            write_task(task_dir, info, (line for line in lines if line.split()[0] in kept))
            union.update(pool)
        if union:
            self.write_pool(union.values(), out / "eval" / split / "global_pool")

    def write_pool(self, candidates: Any, folder: Path) -> None:
        candidates = list(candidates)
        samples = (
            encode_candidate(f"{i:08d}", id=c.did, txt=c.txt, image=self.image(c.img), img_src=c.img)
            for i, c in enumerate(candidates)
        )
        self.written[f"pool:{folder.parent.name}/{folder.name}"] = sum(write_shards(samples, folder).values())
        # The pool's ids in shard order: restricts a search of the global index to this pool without reading it.
        write_pool_ids(folder, (c.did for c in candidates))


def _fields(record: dict[str, Any]) -> dict[str, Any]:
    """`encode_record`'s arguments of a converted query (without the bookkeeping kept beside them)."""
    return {k: v for k, v in record.items() if k != "query_modality"}


def convert(root: str, out: str, strict: bool = False, splits: tuple[str, ...] = ("test",)) -> dict[str, Any]:
    """Convert an M-BEIR folder to training shards, evaluation sets and the global pool.

    Prints and returns the report of what was read, written and dropped (also OUT/report.json).

    Args:
        root: the M-BEIR folder (query/, cand_pool/, qrels/, instructions/, images).
        out: output folder (train/, train_pool/, eval/<split>/, report.json).
        strict: stop at the first problem instead of skipping and counting.
        splits: evaluation splits to convert.
    """
    root_path, out_path = Path(root), Path(out)
    if not root_path.is_dir():
        raise LamraError(f"M-BEIR root {root!r} does not exist")
    converter = Converter(root_path, Problems(strict))
    converter.load_instructions()
    converter.load_pools()
    converter.train(out_path)
    for split in splits:
        converter.evaluation(out_path, split)
    report = {
        "read": dict(converter.read),
        "written": dict(converter.written),
        "dropped": dict(converter.dropped),
        "problems": dict(converter.problems.counts),
        "strict": strict,
    }
    out_path.mkdir(parents=True, exist_ok=True)
    (out_path / "report.json").write_text(json.dumps(report, indent=1))
    print(json.dumps(report, indent=1))
    return report
