"""CC-Neg: an image, its true caption and a negated one; the model must score the true caption higher.

Published layout (github.com/jaisidhsingh/CoN-CLIP, `ccneg_dataset/`), as LamRA's `dataset/datasets_ccneg.py` reads
it::

    ccneg_preprocessed.pt     a torch file (read with weights_only=True: plain lists, dicts and strings):
                              {"image_paths": ["/workspace/datasets/cc3m/cc3m_subset_images_extracted_final/x.jpg",
                                               ...],
                               "annotations": [{"json": {"caption": "a dog on a beach", ...},      # true caption
                                                "sop_data": {"negative-prompt": "a dog, not on a beach", ...},
                                                ...}, ...]}                                        # same order
    cc3m_subset_images_extracted_final/<name>.jpg    the images (ccneg_images.tar.gz), under the root (--images)

The image paths are the authors' absolute paths: LamRA (as CoN-CLIP) replaces their prefix "/workspace/datasets/cc3m/"
with its own data folder, so here the rest of the path is taken relative to the image folder (a path without that
prefix is counted as a malformed entry). The test split is the last 40,000 entries (CoN-CLIP's
`num_ccneg_eval_samples`, LamRA's `split_size`); the ones before are its fine-tuning entries (`skipped.split_train`).

Task `ccneg_task3`, image -> text: the image, bare (LamRA embeds it with no instruction); each query's gallery is its
true caption and its negated caption, commas removed from the latter as LamRA does (galleries.jsonl); the task's pool
is every caption. LamRA reports accuracy, the share of images whose true caption scores above the negated one: R@1
in that two-caption gallery, the reported metric here.
"""

from __future__ import annotations

from pathlib import Path

import torch

from lamra_pl.errors import LamraError
from lamra_pl.recipes.mbeir import Problems
from lamra_pl.recipes.zeroshot.layout import Layout, Task, entry_problem, query

ANNOTATION = "ccneg_preprocessed.pt"
PREFIX = "/workspace/datasets/cc3m/"  # the authors' image folder, in every image path of the file
TEST_SIZE = 40_000
METRICS, REPORTED = ["R@1"], "R@1"


def load(path: Path) -> dict:
    """The annotation file, loaded with weights_only=True (nothing in it is run); one line when it cannot be."""
    if not path.is_file():
        raise LamraError(f"{path} does not exist: CC-Neg's annotations (CoN-CLIP's ccneg_dataset/)")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # not a torch file, truncated, or a pickle naming what weights_only refuses
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise LamraError(f"{path} is not a readable torch file of plain data ({first})") from None
    if not isinstance(data, dict) or not all(isinstance(data.get(k), list) for k in ("image_paths", "annotations")):
        raise LamraError(f"{path}: expected a dict with 'image_paths' and 'annotations' lists")
    if len(data["image_paths"]) != len(data["annotations"]):
        raise LamraError(
            f"{path}: {len(data['image_paths'])} image paths but {len(data['annotations'])} annotations "
            "(they pair up by position)"
        )
    return data


def caption(entry: object, part: str, key: str) -> str | None:
    inner = entry.get(part) if isinstance(entry, dict) else None
    text = inner.get(key) if isinstance(inner, dict) else None
    return text.strip() if isinstance(text, str) and text.strip() else None


def read(root: Path, split: str, problems: Problems) -> Layout:
    if split != "test":
        raise LamraError(f"CC-Neg's evaluation split is its last {TEST_SIZE} entries: convert --split test")
    annotation = root / ANNOTATION
    data = load(annotation)
    layout = Layout("ccneg", split, inputs=[ANNOTATION])
    task = Task(3, "image", "text", None, METRICS, REPORTED, galleries={})
    start = max(0, len(data["annotations"]) - TEST_SIZE)
    layout.count("entries", len(data["annotations"]))
    if start:
        layout.skip("split_train", start)
    for i in range(start, len(data["annotations"])):
        path, entry = data["image_paths"][i], data["annotations"][i]
        true, negated = caption(entry, "json", "caption"), caption(entry, "sop_data", "negative-prompt")
        negated = negated.replace(",", "").strip() or None if negated else None  # LamRA drops its commas
        if not isinstance(path, str) or not path.startswith(PREFIX) or true is None or negated is None:
            detail = f"an entry needs an image path under {PREFIX}, a json.caption and a sop_data.negative-prompt"
            entry_problem(problems, layout, annotation, i + 1, detail)
            continue
        ids = [layout.text(f"ccneg:{i}:true", true), layout.text(f"ccneg:{i}:negated", negated)]
        task.pool.extend(ids)
        qid = f"ccneg:{i}"
        task.queries.append(query(qid, None, path[len(PREFIX) :], ids[:1], 3))
        task.galleries[qid] = ids
    layout.tasks = [task]
    return layout
