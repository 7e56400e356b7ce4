"""ShareGPT4V (1k) and Urban1K: long-caption image<->text retrieval, one caption per image.

Published layouts, as LamRA's loaders read them:

* ShareGPT4V: `datas_for_validation.json`, a list of `{"image_name": "sa_1234.jpg", "caption": "The image ..."}`
  (the 1k validation pairs of ShareGPT4V's captions, LamRA's `dataset/datasets_sharegpt4v.py`), the images in
  `val_data/` (`image_name` relative to it).
* Urban1K (Long-CLIP's `Urban1k.zip`): `image/<n>.jpg` and `caption/<n>.txt`, n = 1..1000, the caption the first
  line of its file (stripped). Every `caption/*.txt` is read, in numeric order of its name; a caption without its
  image (or the reverse) is counted under `skipped`.

Tasks (LamRA's `eval_sharegpt4v.py`, `eval_urban1k.py`; each item embedded once, used both ways):

* `<set>_task0`, text -> image: the caption, bare; the pool is the images, each carrying LamRA's image instruction
  "Find an image caption describing the following everyday image." as its text (image+text candidates).
* `<set>_task3`, image -> text: the image, with that instruction; the pool is the captions.

Metrics: R@1/5/10 (hit rate) both ways; reported R@1.
"""

from __future__ import annotations

import re
from pathlib import Path

from lamra_pl.errors import LamraError
from lamra_pl.recipes.mbeir import Problems
from lamra_pl.recipes.zeroshot.layout import I2T, Layout, Task, entry_problem, query, read_json

METRICS, REPORTED = ["R@1", "R@5", "R@10"], "R@1"


def tasks() -> tuple[Task, Task]:
    return (
        Task(0, "text", "image,text", None, METRICS, REPORTED),
        Task(3, "image", "text", I2T, METRICS, REPORTED),
    )


def add_pair(layout: Layout, t2i: Task, i2t: Task, key: str, rel: str, caption: str) -> None:
    name = layout.dataset
    image_id = layout.image(f"{name}:img{key}", rel, I2T)
    caption_id = layout.text(f"{name}:cap{key}", caption)
    t2i.pool.append(image_id)
    i2t.pool.append(caption_id)
    t2i.queries.append(query(f"{name}:t2i{key}", caption, None, [image_id], 0))
    i2t.queries.append(query(f"{name}:i2t{key}", None, rel, [caption_id], 3))


def numeric_order(path: Path) -> tuple[bool, int, str]:
    """1.txt, 2.txt, ..., 10.txt (LamRA's order), then any other name."""
    return (not path.stem.isdigit(), int(path.stem) if path.stem.isdigit() else 0, path.stem)


def read_sharegpt4v(annotation: Path, split: str, problems: Problems, root: Path) -> Layout:
    data = read_json(annotation, list, "ShareGPT4V's validation pairs (image_name, caption)")
    layout = Layout("sharegpt4v", split, inputs=[annotation.relative_to(root).as_posix()])
    t2i, i2t = tasks()
    for number, entry in enumerate(data, start=1):
        layout.count("pairs")
        name, caption = (entry.get("image_name"), entry.get("caption")) if isinstance(entry, dict) else (None, None)
        if not isinstance(name, str) or not name or not isinstance(caption, str) or not caption.strip():
            entry_problem(problems, layout, annotation, number, "a pair needs an 'image_name' and a 'caption'")
            continue
        add_pair(layout, t2i, i2t, str(number - 1), name, caption.strip())
    layout.tasks = [t2i, i2t]
    return layout


def read_urban1k(root: Path, images: Path, split: str, problems: Problems) -> Layout:
    captions = root / "caption"
    if not captions.is_dir():
        raise LamraError(f"{captions} does not exist: Urban1K keeps its captions there (caption/<n>.txt)")
    layout = Layout("urban1k", split, inputs=["caption/"])
    t2i, i2t = tasks()
    files = sorted(captions.glob("*.txt"), key=numeric_order)
    for path in files:
        layout.count("captions")
        if not re.fullmatch(r"[A-Za-z0-9_-]+", path.stem):
            entry_problem(problems, layout, path, 1, "a caption file name must be a plain <n>.txt")
            continue
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except (UnicodeDecodeError, OSError) as err:
            entry_problem(problems, layout, path, 1, f"not readable UTF-8 text ({err})")
            continue
        caption = lines[0].strip() if lines else ""
        if not caption:
            entry_problem(problems, layout, path, 1, "its first line is empty")
            continue
        if not (images / f"{path.stem}.jpg").exists():
            problems("missing_image", path, 1, f"no image/{path.stem}.jpg for this caption")
            layout.skip("caption_without_image")
            continue
        add_pair(layout, t2i, i2t, path.stem, f"{path.stem}.jpg", caption)
    paired = {p.stem for p in files}
    unpaired = sum(1 for p in images.glob("*.jpg") if p.stem not in paired)
    if unpaired:
        layout.skip("image_without_caption", unpaired)
    layout.tasks = [t2i, i2t]
    return layout
