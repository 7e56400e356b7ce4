"""SugarCrepe: compositional image->text, each image against its caption and one hard negative caption.

Published layout (github.com/RAIVNLab/sugar-crepe, `data/`), as LamRA's `dataset/datasets_sugar_crepe.py` reads it;
every subset whose file is there is converted::

    data/add_att.json, add_obj.json, replace_att.json, replace_obj.json, replace_rel.json, swap_att.json,
    swap_obj.json
        {"0": {"filename": "000000397133.jpg",            # a COCO 2017 val image
               "caption": "A man is in a kitchen ...",     # its COCO caption
               "negative_caption": "A man is in ..."},     # the caption with one concept added/replaced/swapped
         "1": {...}, ...}
    val2017/<filename>                                      COCO 2017 val images (--images; LamRA: images/val2017)

Tasks `sugarcrepe_<subset>_task3`, image -> text: the image, bare (LamRA embeds it with no instruction); each
query's gallery is its caption and its negative caption (galleries.jsonl); the task's pool is every caption of the
subset. LamRA reports accuracy, the share of images whose caption scores above the negative one: R@1 in that
two-caption gallery, the reported metric here.
"""

from __future__ import annotations

from pathlib import Path

from lamra_pl.errors import LamraError
from lamra_pl.formats import safe_name
from lamra_pl.recipes.mbeir import Problems
from lamra_pl.recipes.zeroshot.layout import Layout, Task, entry_problem, query, read_json

SUBSETS = ("add_att", "add_obj", "replace_att", "replace_obj", "replace_rel", "swap_att", "swap_obj")
METRICS, REPORTED = ["R@1"], "R@1"


def read(root: Path, split: str, problems: Problems) -> list[Layout]:
    if split != "test":
        raise LamraError("SugarCrepe has one split (on COCO 2017 val images): convert --split test")
    layouts = [
        read_subset(root, root / "data" / f"{subset}.json", subset, split, problems)
        for subset in SUBSETS
        if (root / "data" / f"{subset}.json").is_file()
    ]
    if not layouts:
        names = ", ".join(f"{s}.json" for s in SUBSETS)
        raise LamraError(f"{root / 'data'} holds none of SugarCrepe's annotation files ({names})")
    return layouts


def text(entry: dict, key: str) -> str | None:
    value = entry.get(key)
    return value.strip() if isinstance(value, str) and value.strip() else None


def read_subset(root: Path, annotation: Path, subset: str, split: str, problems: Problems) -> Layout:
    data = read_json(annotation, dict, f"SugarCrepe's {subset} image-caption-negative triples")
    name = f"sugarcrepe_{subset}"
    layout = Layout(name, split, inputs=[annotation.relative_to(root).as_posix()])
    task = Task(3, "image", "text", None, METRICS, REPORTED, galleries={})
    for number, (key, entry) in enumerate(data.items(), start=1):
        layout.count("triples")
        entry = entry if isinstance(entry, dict) else {}
        filename, caption, negative = text(entry, "filename"), text(entry, "caption"), text(entry, "negative_caption")
        if not safe_name(key) or filename is None or caption is None or negative is None:
            detail = "a triple needs a key of letters/digits and filename, caption, negative_caption"
            entry_problem(problems, layout, annotation, number, detail)
            continue
        ids = [layout.text(f"{name}:{key}:caption", caption), layout.text(f"{name}:{key}:negative", negative)]
        task.pool.extend(ids)
        qid = f"{name}:{key}"
        task.queries.append(query(qid, None, filename, ids[:1], 3))
        task.galleries[qid] = ids
    layout.tasks = [task]
    return layout
