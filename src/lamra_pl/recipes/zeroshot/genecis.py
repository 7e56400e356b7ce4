"""GeneCIS: conditional image similarity, each query ranked in its own small gallery.

Published layout (github.com/facebookresearch/genecis, `genecis/annotations/`), as LamRA's `eval_genecis.py` reads
it; every subset whose file is there is converted::

    annotations/change_object.json, focus_object.json        (COCO 2017 val)
        [{"reference": {"val_image_id": 139, ...}, "target": {"val_image_id": 632, ...},
          "condition": "dog", "gallery": [{"val_image_id": 724, ...}, ...]}, ...]
    annotations/change_attribute.json, focus_attribute.json  (Visual Genome crops, VAW)
        [{"reference": {"image_id": 2345, ...}, "target": {"image_id": ...}, "condition": "red",
          "gallery": [{"image_id": ...}, ...]}, ...]
    val2017/<val_image_id as 12 digits>.jpg                    COCO 2017 val images
    vg/<subset>/<image_id>_<i>_<k>.jpg                          the crops of query i: k = 0 reference, 1 target,
                                                                2.. its gallery in order (LamRA's crop files)

Tasks `genecis_<subset>_task7`, image+text -> image: the reference image with the condition, LamRA's instruction
("I'm looking for an image with the same attributes as described." for focus_attribute, "I'm looking for a similar
everyday image with the described changes." for the others); each query's gallery is its target and its
`gallery` (galleries.jsonl: `lamra-pl retrieve` ranks only those); the task's pool is the union of its galleries.
Metrics: R@1/2/3 in the gallery (hit rate of the target); reported R@1.
"""

from __future__ import annotations

from pathlib import Path

from lamra_pl.errors import LamraError
from lamra_pl.recipes.mbeir import Problems
from lamra_pl.recipes.zeroshot.layout import CHANGES, SAME_ATTRIBUTES, Layout, Task, entry_problem, query, read_json

SUBSETS = ("change_object", "focus_object", "change_attribute", "focus_attribute")
METRICS, REPORTED = ["R@1", "R@2", "R@3"], "R@1"


def integer(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def read(root: Path, split: str, problems: Problems) -> list[Layout]:
    layouts = []
    for subset in SUBSETS:
        annotation = root / "annotations" / f"{subset}.json"
        if annotation.is_file():
            layouts.append(read_subset(root, annotation, subset, split, problems))
    if not layouts:
        names = ", ".join(f"{s}.json" for s in SUBSETS)
        raise LamraError(f"{root / 'annotations'} holds none of GeneCIS's annotation files ({names})")
    return layouts


def read_subset(root: Path, annotation: Path, subset: str, split: str, problems: Problems) -> Layout:
    data = read_json(annotation, list, f"GeneCIS's {subset} queries")
    coco = subset.endswith("_object")
    key = "val_image_id" if coco else "image_id"
    name = f"genecis_{subset}"
    layout = Layout(name, split, inputs=[annotation.relative_to(root).as_posix()])
    instruction = SAME_ATTRIBUTES if subset == "focus_attribute" else CHANGES
    task = Task(7, "image,text", "image", instruction, METRICS, REPORTED, galleries={})
    pool: dict[str, None] = {}
    for number, entry in enumerate(data, start=1):
        layout.count("queries")
        i = number - 1
        parts = [entry.get(k) for k in ("reference", "target")] if isinstance(entry, dict) else []
        gallery = entry.get("gallery") if isinstance(entry, dict) else None
        condition = entry.get("condition") if isinstance(entry, dict) else None
        items = [*parts, *(gallery if isinstance(gallery, list) else [])]
        if (
            len(parts) != 2
            or not isinstance(gallery, list)
            or not isinstance(condition, str)
            or not all(isinstance(p, dict) and integer(p.get(key)) for p in items)
        ):
            entry_problem(problems, layout, annotation, number, f"a query needs reference, target, gallery ({key}s)")
            continue
        if coco:
            rels = [f"val2017/{p[key]:012d}.jpg" for p in items]
            ids = [f"{name}:{p[key]}" for p in items]
        else:  # LamRA's crops: one file per (query, position)
            rels = [f"vg/{subset}/{p[key]}_{i}_{k}.jpg" for k, p in enumerate(items)]
            ids = [f"{name}:{p[key]}_{i}_{k}" for k, p in enumerate(items)]
        for did, rel in zip(ids[1:], rels[1:], strict=True):
            layout.image(did, rel)
            pool[did] = None
        qid = f"{name}:{i}"
        task.queries.append(query(qid, condition.strip(), rels[0], [ids[1]], 7))
        task.galleries[qid] = list(dict.fromkeys(ids[1:]))
    task.pool = list(pool)
    layout.tasks = [task]
    return layout
