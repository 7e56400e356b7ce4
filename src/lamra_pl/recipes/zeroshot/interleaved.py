"""VIST and multi-turn FashionIQ: queries that interleave several images with their texts (`formats.sample`'s
interleaved items, version 3).

VIST (Visual Storytelling, visionandlanguage.net/VIST), its story-in-sequence annotations as LamRA's
`dataset/datasets_vist.py` reads them::

    sis/<split>.story-in-sequence.json   {"images": [...], "albums": [...], "type": ...,
                                          "annotations": [[{"story_id": "45531",              # the story
                                                            "photo_flickr_id": "8142398",     # its image
                                                            "worker_arranged_photo_order": 0, # its place (0..4)
                                                            "text": "the family got together .",  # the sentence
                                                            "original_text": ..., "album_id": ..., ...}], ...]}
    images/<split>/<photo_flickr_id>.jpg (or .png, .gif: LamRA tries them in that order)

Task `vist_task7`, a story's first sentences and images -> its last image: the query is each sentence followed by
its image, for all but the last, then the last sentence, after LamRA's instruction "I will provide you with a series
of images and captions from a story, and I need you to retrieve the image corresponding to the last caption.";
sentences are the `text` field (lower-cased and tokenised, as LamRA reads it). The pool is every image the split's
stories use, bare; the positive is the story's last image. LamRA scores the story's own earlier images out of its
ranking (-100 before its top 50): `excluded.jsonl` (`lamra_pl.formats.task` version 3), which `lamra-pl retrieve`
honours. The annotations are listed in story order; a story's lines are taken in `worker_arranged_photo_order`
(a stable sort: on the published files it changes nothing). Metrics R@1/5/10 (LamRA's hit rate); reported R@1.
Split: val (LamRA's scripts), `--split` for another; images default to `images/<split>`.

Multi-turn FashionIQ (Yuan and Lam's multi-turn fashion image retrieval sets), as LamRA's
`dataset/datasets_multiturn_fashion.py` reads them::

    data/all.<split>.json                a list of sessions {"reference": [[_, ["is darker", "has a collar"],
                                          "B00006M009"], ...],                             # per turn: its image and
                                          "target": [_, "B0000CFNBB"]}                     # modification texts
    image_splits/split.all.<split>.json  the split's images ["B00006M009", ...]: the pool
    <name>.jpg                           the FashionIQ images (LamRA: M-BEIR's fashioniq_images; --images)

(the first element of a turn and of the target is not read, as LamRA does not). Task `multiturn_fashioniq_task7`:
the query is LamRA's instruction "Find me a similar fashion image based on the following multi-round
modifications." then each turn's image followed by its texts joined by " and " (empty ones dropped); the positive is
the target image; the pool is the split's image list, bare. Metrics R@5/8/10 (LamRA's), reported R@5. LamRA's code
ends this query with the single-image prompt ("image and sentence"); this project uses its interleaved prompt
(`models.embedding_inputs.INTERLEAVED_PROMPT`), one word apart.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lamra_pl.recipes.mbeir import Problems
from lamra_pl.recipes.zeroshot.layout import Layout, Task, entry_problem, interleaved_query, read_json

STORY = (
    "I will provide you with a series of images and captions from a story, and I need you to retrieve the image "
    "corresponding to the last caption."
)
SESSION = "Find me a similar fashion image based on the following multi-round modifications."
IMAGE_SUFFIXES = (".jpg", ".png", ".gif")  # LamRA's order of trying a VIST image's file


def read_vist(root: Path, images: Path, split: str, problems: Problems) -> Layout:
    annotation = root / "sis" / f"{split}.story-in-sequence.json"
    data = read_json(annotation, dict, f"VIST's story-in-sequence annotations of {split} (sis.tar.gz)")
    rows = data.get("annotations")
    layout = Layout("vist", split, inputs=[annotation.relative_to(root).as_posix()])
    if not isinstance(rows, list):
        entry_problem(problems, layout, annotation, 0, "'annotations' is not a list")
        return layout
    stories: dict[str, list[tuple[int, str, str]]] = {}
    for number, row in enumerate(rows, start=1):
        layout.count("annotations")
        entry = row[0] if isinstance(row, list) and len(row) == 1 else None
        fields = [entry.get(k) for k in ("story_id", "photo_flickr_id", "text")] if isinstance(entry, dict) else []
        order = entry.get("worker_arranged_photo_order") if isinstance(entry, dict) else None
        if (
            not fields
            or not all(isinstance(v, str) and v for v in fields)
            or isinstance(order, bool)
            or not (isinstance(order, int))
        ):
            entry_problem(
                problems,
                layout,
                annotation,
                number,
                "an annotation needs story_id, photo_flickr_id, text and worker_arranged_photo_order, one per list",
            )
            continue
        stories.setdefault(fields[0], []).append((order, fields[1], fields[2]))
    task = Task(7, "image,text", "image", STORY, ["R@1", "R@5", "R@10"], "R@1", excluded={})
    files = {p.name for p in images.iterdir()} if images.is_dir() else set()
    pool: dict[str, None] = {}

    def image(photo: str) -> str:
        name = next((photo + s for s in IMAGE_SUFFIXES if photo + s in files), photo + IMAGE_SUFFIXES[-1])
        did = layout.image(f"vist:{photo}", name)
        pool.setdefault(did)
        return did

    for story_id, lines in stories.items():
        layout.count("stories")
        for _, photo, _ in lines:  # LamRA's pool: every image of every story
            image(photo)
        if len(lines) < 2:
            layout.skip("story_of_one_image")
            continue
        lines.sort(key=lambda line: line[0])
        parts: list[tuple[str, str]] = []
        for _, photo, text in lines[:-1]:
            parts += [("txt", text), ("img", layout.candidates[f"vist:{photo}"]["img_path"].split("/", 1)[1])]
        parts.append(("txt", lines[-1][2]))
        qid = f"vist:{story_id}"
        task.queries.append(interleaved_query(qid, parts, [f"vist:{lines[-1][1]}"], 7))
        task.excluded[qid] = list(dict.fromkeys(f"vist:{photo}" for _, photo, _ in lines[:-1]))
    # The pool: every image of the split's stories, in LamRA's order (sorted ids).
    task.pool = sorted(pool)
    layout.tasks.append(task)
    return layout


def read_multiturn_fashioniq(root: Path, split: str, problems: Problems) -> Layout:
    sessions_file = root / "data" / f"all.{split}.json"
    images_file = root / "image_splits" / f"split.all.{split}.json"
    sessions = read_json(sessions_file, list, f"the multi-turn FashionIQ sessions of {split}")
    names = read_json(images_file, list, f"the multi-turn FashionIQ image list of {split}")
    layout = Layout(
        "multiturn_fashioniq", split, inputs=[p.relative_to(root).as_posix() for p in (sessions_file, images_file)]
    )
    task = Task(7, "image,text", "image", SESSION, ["R@5", "R@8", "R@10"], "R@5")
    for number, name in enumerate(names, start=1):
        layout.count("images")
        if not isinstance(name, str) or not name:
            entry_problem(problems, layout, images_file, number, "an image name must be a non-empty string")
            continue
        task.pool.append(layout.image(f"multiturn_fashioniq:{name}", f"{name}.jpg"))
    task.pool = list(dict.fromkeys(task.pool))
    for number, session in enumerate(sessions, start=1):
        layout.count("sessions")
        turns = session.get("reference") if isinstance(session, dict) else None
        target = session.get("target") if isinstance(session, dict) else None
        if not _turns_ok(turns) or not (isinstance(target, list) and len(target) >= 2 and _name(target[1])):
            entry_problem(
                problems,
                layout,
                sessions_file,
                number,
                "a session needs 'reference' turns [_, [texts], image] and a 'target' [_, image]",
            )
            continue
        parts: list[tuple[str, str]] = []
        for turn in turns:
            parts += [("img", f"{turn[2]}.jpg"), ("txt", " and ".join(t for t in turn[1] if t != ""))]
        positive = layout.image(f"multiturn_fashioniq:{target[1]}", f"{target[1]}.jpg")
        if positive not in task.pool:
            layout.skip("target_outside_image_list")
            continue
        task.queries.append(interleaved_query(f"multiturn_fashioniq:{number - 1}", parts, [positive], 7))
    layout.tasks.append(task)
    return layout


def _name(value: Any) -> bool:
    return isinstance(value, str) and bool(value)


def _turns_ok(turns: Any) -> bool:
    return (
        isinstance(turns, list)
        and bool(turns)
        and all(
            isinstance(t, list)
            and len(t) >= 3
            and isinstance(t[1], list)
            and all(isinstance(x, str) for x in t[1])
            and _name(t[2])
            for t in turns
        )
    )
