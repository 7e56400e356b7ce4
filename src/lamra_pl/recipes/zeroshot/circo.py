"""CIRCO: composed image retrieval with several ground truths per query, in COCO 2017's unlabeled images.

Published layout (github.com/miccunifi/CIRCO)::

    CIRCO/
      annotations/val.json     [{"id": 0, "reference_img_id": 1234, "target_img_id": 5678,
                                 "relative_caption": "is a dog ...", "shared_concept": "...",
                                 "gt_img_ids": [5678, 910, ...]}, ...]
      annotations/test.json    the same without target_img_id and gt_img_ids (scored by CIRCO's server)
      COCO2017_unlabeled/annotations/image_info_unlabeled2017.json   COCO's {"images": [{"id", "file_name"}, ...]}
      COCO2017_unlabeled/unlabeled2017/<file_name>                    the images (--images)

(`image_info_unlabeled2017.json` is also looked for in `annotations/`, where LamRA's script reads it.)

Task `circo_task7`, image+text -> image: the reference image with the relative caption, instruction "I'm looking
for a similar everyday image with the described changes." (LamRA's `eval_circo.py`); the pool is every image of
the image info (the reference image included, as LamRA searches it); the positives are `gt_img_ids`. Metrics:
CIRCO's mAP@5/10/25/50 (`lamra_pl.ranking.metrics.map_at_k`); reported mAP@5. Only the val split has ground
truths: `--split test` is refused (CIRCO's evaluation server scores test rankings).
"""

from __future__ import annotations

from pathlib import Path

from lamra_pl.errors import LamraError
from lamra_pl.recipes.mbeir import Problems
from lamra_pl.recipes.zeroshot.layout import CHANGES, Layout, Task, entry_problem, query, read_json

METRICS, REPORTED = ["mAP@5", "mAP@10", "mAP@25", "mAP@50"], "mAP@5"
IMAGE_INFO = "image_info_unlabeled2017.json"


def integer(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def read(root: Path, split: str, problems: Problems) -> Layout:
    if split != "val":
        raise LamraError(
            f"CIRCO's {split!r} split has no public ground truths (its evaluation server scores test rankings): "
            "convert --split val"
        )
    info_path = root / "COCO2017_unlabeled" / "annotations" / IMAGE_INFO
    if not info_path.is_file() and (root / "annotations" / IMAGE_INFO).is_file():
        info_path = root / "annotations" / IMAGE_INFO
    info = read_json(info_path, dict, "COCO 2017's unlabeled image info, which CIRCO's pool is")
    annotation = root / "annotations" / f"{split}.json"
    data = read_json(annotation, list, f"CIRCO's {split} queries")
    layout = Layout("circo", split, inputs=[p.relative_to(root).as_posix() for p in (info_path, annotation)])
    task = Task(7, "image,text", "image", CHANGES, METRICS, REPORTED)
    file_of: dict[int, str] = {}
    for number, image in enumerate(info.get("images") if isinstance(info.get("images"), list) else [], start=1):
        layout.count("images")
        if not isinstance(image, dict) or not integer(image.get("id")) or not isinstance(image.get("file_name"), str):
            entry_problem(problems, layout, info_path, number, "an image entry needs an integer 'id' and 'file_name'")
            continue
        file_of[image["id"]] = image["file_name"]
        task.pool.append(layout.image(f"circo:{image['id']}", image["file_name"]))
    if not file_of:
        raise LamraError(f"{info_path}: no usable entry in its 'images' list")
    for number, entry in enumerate(data, start=1):
        layout.count("queries")
        fields = ("id", "reference_img_id", "relative_caption", "gt_img_ids")
        if not isinstance(entry, dict) or any(k not in entry for k in fields):
            entry_problem(problems, layout, annotation, number, f"a query needs {', '.join(fields)}")
            continue
        caption, gts, reference = entry["relative_caption"], entry["gt_img_ids"], entry["reference_img_id"]
        if (
            not integer(entry["id"])
            or not integer(reference)
            or not isinstance(caption, str)
            or not isinstance(gts, list)
            or not gts
            or not all(map(integer, gts))
        ):
            entry_problem(problems, layout, annotation, number, "id, reference_img_id, gt_img_ids must be integers")
            continue
        unknown = [i for i in (reference, *gts) if i not in file_of]
        if unknown:
            problems("unknown_image", annotation, number, f"image id {unknown[0]} is not in {IMAGE_INFO}")
            layout.skip("unknown_image")
            continue
        positives = [f"circo:{i}" for i in dict.fromkeys(gts)]
        task.queries.append(query(f"circo:{entry['id']}", caption.strip(), file_of[reference], positives, 7))
    layout.tasks = [task]
    return layout
