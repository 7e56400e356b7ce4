"""Visual Dialog (VisDial v1.0 val): the image a whole dialog is about, retrieved from the dialog's text.

Published layout (visualdialog.org, `visdial_1.0_val.zip` and `VisualDialog_val2018.zip`), as LamRA's
`dataset/datasets_visdial.py` reads it::

    visdial_1.0_val.json   {"version": "1.0", "split": "val2018",
                            "data": {"questions": ["is the photo in color", ...],     # shared question texts
                                     "answers": ["yes", ...],                          # shared answer texts
                                     "dialogs": [{"image_id": 185565,                  # COCO-style image id
                                                  "caption": "a man ...",              # not used (LamRA: neither)
                                                  "dialog": [{"question": 12,          # index into questions
                                                              "answer": 34,            # index into answers
                                                              "answer_options": [...], "gt_index": 5}, ...]},
                                                 ...]}}
    VisualDialog_val2018/VisualDialog_val2018_<image_id as 12 digits>.jpg               the images (--images)

Task `visdial_task0`, text -> image: the dialog's rounds as one text, "Q: <question>? A: <answer>." joined by
spaces (LamRA's `full_context_sent`, every round, the caption left out), with LamRA's instruction "Find me an
everyday image that matches the given dialog."; the pool is the images of every dialog, bare (LamRA embeds them with
no text); the positive is the dialog's own image. Metrics: R@1/5/10 (LamRA's `image_retrieval_recall@k`, a hit rate
with one positive); reported R@1. Only the val split is evaluated (the test split's dialogs stop at a round with no
published answer): `--split val`, the default.
"""

from __future__ import annotations

from pathlib import Path

from lamra_pl.errors import LamraError
from lamra_pl.recipes.mbeir import Problems
from lamra_pl.recipes.zeroshot.layout import Layout, Task, entry_problem, query, read_json

DIALOG = "Find me an everyday image that matches the given dialog."
METRICS, REPORTED = ["R@1", "R@5", "R@10"], "R@1"


def index(value: object, size: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < size


def read(root: Path, split: str, problems: Problems) -> Layout:
    if split != "val":
        raise LamraError(
            f"VisDial's {split!r} split is not one LamRA evaluates (its test dialogs end in an unanswered round): "
            "convert --split val"
        )
    annotation = root / f"visdial_1.0_{split}.json"
    data = read_json(annotation, dict, f"VisDial v1.0's {split} dialogs (visdial_1.0_{split}.zip)")
    body = data.get("data")
    parts = {k: body.get(k) if isinstance(body, dict) else None for k in ("questions", "answers", "dialogs")}
    if not all(isinstance(v, list) for v in parts.values()):
        raise LamraError(f"{annotation}: expected 'data' with 'questions', 'answers' and 'dialogs' lists")
    questions, answers = parts["questions"], parts["answers"]
    layout = Layout("visdial", split, inputs=[annotation.relative_to(root).as_posix()])
    task = Task(0, "text", "image", DIALOG, METRICS, REPORTED)
    pool: dict[str, None] = {}
    for number, entry in enumerate(parts["dialogs"], start=1):
        layout.count("dialogs")
        image_id = entry.get("image_id") if isinstance(entry, dict) else None
        rounds = entry.get("dialog") if isinstance(entry, dict) else None
        if isinstance(image_id, bool) or not isinstance(image_id, int) or not isinstance(rounds, list) or not rounds:
            entry_problem(problems, layout, annotation, number, "a dialog needs an integer 'image_id' and 'dialog'")
            continue
        if not all(
            isinstance(r, dict)
            and index(r.get("question"), len(questions))
            and index(r.get("answer"), len(answers))
            and isinstance(questions[r["question"]], str)
            and isinstance(answers[r["answer"]], str)
            for r in rounds
        ):
            entry_problem(problems, layout, annotation, number, "a round's question/answer is not an index of a text")
            continue
        text = " ".join(f"Q: {questions[r['question']]}? A: {answers[r['answer']]}." for r in rounds)
        did = layout.image(f"visdial:{image_id}", f"VisualDialog_{split}2018_{image_id:012d}.jpg")
        if did in pool:  # VisDial has one dialog per image; a second one would share the positive
            layout.skip("duplicate_image")
            continue
        pool[did] = None
        layout.count("rounds", len(rounds))
        task.queries.append(query(f"visdial:d{number - 1}", text, None, [did], 0))
    task.pool = list(pool)
    layout.tasks = [task]
    return layout
