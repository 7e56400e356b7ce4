"""Flickr30K and MSCOCO 5k from Karpathy's split files (`dataset_flickr30k.json`, `dataset_coco.json`).

Published layout (Karpathy & Fei-Fei's splits, the `caption_datasets.zip` every captioning/retrieval paper uses)::

    {"dataset": "flickr30k" | "coco",
     "images": [{"filename": "1000092795.jpg",            # the image file's name
                 "filepath": "val2014",                     # COCO only: its folder (train2014 | val2014)
                 "split": "test",                           # train | val | test | restval
                 "imgid": 0,                                # the image's number in this file
                 "sentences": [{"raw": "Two young guys ...", "sentid": 0, "tokens": [...], "imgid": 0}, ...],
                 ...}, ...]}

The test split is Flickr30K's 1k images / 5k captions and COCO's 5k images / 25k captions. LamRA's
`eval_flickr.py` / `eval_coco.py` read the same split preprocessed (image i, caption j of image j // 5): five
captions per image, so the first five `sentences` of an image are kept (a COCO image with more counts under
`skipped.extra_caption`, as the 5k/25k benchmark does).

Tasks, as LamRA embeds them (each item embedded once, used in both directions):

* `<set>_task0`, text -> image: the caption, bare (no instruction); the pool is the split's images.
* `<set>_task3`, image -> text: the image; the pool is the split's captions.

Flickr30K (LamRA's `--mode finetuned`) gives every image the instruction "Find an image caption describing the
following everyday image.": the image->text queries carry it as their instruction, and the text->image pool's
images carry it as their text (image+text candidates, the very embedding LamRA ranks). COCO (`eval_coco.py`) gives
none. Metrics: R@1/5/10 (hit rate) both ways; reported R@1.
"""

from __future__ import annotations

from pathlib import Path

from lamra_pl.errors import LamraError
from lamra_pl.recipes.mbeir import Problems
from lamra_pl.recipes.zeroshot.layout import Layout, Task, entry_problem, query, read_json

CAPTIONS_PER_IMAGE = 5
METRICS, REPORTED = ["R@1", "R@5", "R@10"], "R@1"


def read(
    name: str, annotation: Path, split: str, problems: Problems, image_instruction: str | None, root: Path
) -> Layout:
    data = read_json(annotation, dict, f"Karpathy's split file of {name} (caption_datasets.zip)")
    images = data.get("images")
    if not isinstance(images, list):
        raise LamraError(f"{annotation}: no 'images' list (Karpathy's split file has one)")
    layout = Layout(name, split, inputs=[annotation.relative_to(root).as_posix()])
    cand_modality = "image,text" if image_instruction else "image"
    t2i = Task(0, "text", cand_modality, None, METRICS, REPORTED)
    i2t = Task(3, "image", "text", image_instruction, METRICS, REPORTED)
    for number, entry in enumerate(images, start=1):
        layout.count("images")
        if not isinstance(entry, dict) or not isinstance(entry.get("split"), str):
            entry_problem(problems, layout, annotation, number, "an image entry is not an object with a 'split'")
            continue
        if entry["split"] != split:
            layout.skip(f"split_{entry['split']}")
            continue
        sentences, filename, imgid = entry.get("sentences"), entry.get("filename"), entry.get("imgid")
        folder = entry.get("filepath", "")
        if (
            not isinstance(filename, str)
            or not isinstance(folder, str)
            or isinstance(imgid, bool)
            or not isinstance(imgid, int)
            or not isinstance(sentences, list)
        ):
            entry_problem(problems, layout, annotation, number, "an image needs 'filename', 'imgid' and 'sentences'")
            continue
        rel = f"{folder}/{filename}" if folder else filename
        captions = []
        for sentence in sentences:
            raw, sentid = (sentence.get("raw"), sentence.get("sentid")) if isinstance(sentence, dict) else (None, None)
            if isinstance(raw, str) and raw.strip() and isinstance(sentid, int) and not isinstance(sentid, bool):
                captions.append((sentid, raw.strip()))
                continue
            entry_problem(problems, layout, annotation, number, "a sentence needs a 'raw' text and a 'sentid'")
        layout.count("captions", len(captions))
        if len(captions) > CAPTIONS_PER_IMAGE:
            layout.skip("extra_caption", len(captions) - CAPTIONS_PER_IMAGE)
            captions = captions[:CAPTIONS_PER_IMAGE]
        if not captions:
            entry_problem(problems, layout, annotation, number, f"image {filename!r} has no usable caption")
            continue
        image_id = layout.image(f"{name}:img{imgid}", rel, image_instruction)
        t2i.pool.append(image_id)
        caption_ids = [layout.text(f"{name}:cap{sentid}", raw) for sentid, raw in captions]
        i2t.pool.extend(caption_ids)
        i2t.queries.append(query(f"{name}:i2t{imgid}", None, rel, caption_ids, 3))
        t2i.queries += [query(f"{name}:t2i{sentid}", raw, None, [image_id], 0) for sentid, raw in captions]
    layout.tasks = [t2i, i2t]
    return layout
