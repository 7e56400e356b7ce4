"""LamRA's zero-shot evaluation sets, from each set's published files to this project's task folders.

    lamra-pl convert-zeroshot --set NAME --root RAW_DIR --out OUT_DIR [--images DIR] [--split S] [--strict]

    set         root holds (published layout)              images (--images; default)    split  tasks    metric
    flickr30k   dataset_flickr30k.json (Karpathy)          flickr30k-images/             test   t0, t3   R@1/5/10
    coco        dataset_coco.json (Karpathy, 5k test)      the root (val2014/...)        test   t0, t3   R@1/5/10
    sharegpt4v  datas_for_validation.json                  val_data/                     test   t0, t3   R@1/5/10
    urban1k     caption/<n>.txt                            image/                        test   t0, t3   R@1/5/10
    circo       annotations/val.json, COCO2017_unlabeled/  COCO2017_unlabeled/           val    t7       mAP@5/10/25/50
                annotations/image_info_unlabeled2017.json  unlabeled2017/
    genecis     annotations/<subset>.json (4 subsets)      the root (val2017/, vg/)      test   t7 each  R@1/2/3
    visdial     visdial_1.0_val.json                       VisualDialog_val2018/         val    t0       R@1/5/10
    ccneg       ccneg_preprocessed.pt (CoN-CLIP)           the root (cc3m_subset_...)    test   t3       R@1 of 2
    sugarcrepe  data/<subset>.json (7 subsets)             val2017/ (COCO 2017 val)      test   t3 each  R@1 of 2
    msrvtt      annotations/MSRVTT_JSFUSION_test.csv       videos/ (<video_id>.mp4)      test   t0, t3   R@1/5/10
    msvd        test_list.txt, raw-captions.pkl            YouTubeClips/ (<id>.avi)      test   t0, t3   R@1/5/10
    vist        sis/<split>.story-in-sequence.json         images/<split>/               val    t7       R@1/5/10
    multiturn_  data/all.<split>.json,                     images/ (FashionIQ's          val    t7       R@5/8/10
    fashioniq   image_splits/split.all.<split>.json        <name>.jpg; --images)

(t0: text -> image, t3: image -> text, t7: image+text -> image; for MSR-VTT and MSVD t0 is text -> video and t3
video -> text, with --images the video folder; the reported metric is R@1, CIRCO's mAP@5, multi-turn FashionIQ's
R@5. VIST's and multi-turn FashionIQ's t7 queries interleave several images with their texts. GeneCIS ranks each
query's own gallery: galleries.jsonl in its task folders. VisDial's t0 query is a whole dialog. CC-Neg and
SugarCrepe rank each image's caption and its negative: R@1 there is LamRA's accuracy.)

Each set's module says where every field comes from and how LamRA's loader uses it (`karpathy`, `long_captions`,
`circo`, `genecis`, `visdial`, `ccneg`, `sugarcrepe`, `video_sets`, `interleaved`).

How: the set's reader turns its annotation files into M-BEIR rows (`layout.Layout`), written as an M-BEIR folder in
OUT/mbeir (query/, cand_pool/, instructions/, and `images`, a link to the image folder); `recipes.mbeir` converts
that into OUT with all of convert-mbeir's checks and guarantees (image paths kept inside the image folder, images
decoded once, one-line refusals, OUT's INCOMPLETE marker until report.json is written, a rerun rewrites). The
output is convert-mbeir's evaluation layout, without training folders:

    OUT/eval/<split>/<set>_task<N>/    queries/, pool/, qrels.txt, task.json with the set's metric spec
                                       ("metrics", "reported": `lamra_pl.formats.task` version 2), "zeroshot_set"
                                       and "instruction" (LamRA's, or null: the query is encoded bare)
    OUT/eval/<split>/global_pool/      the union of the tasks' pools (what `lamra-pl index` encodes)
    OUT/report.json                    convert-mbeir's report, plus "zeroshot": the set, its annotation files, the
                                       entries read per kind and those skipped per reason (problems, and entries
                                       left out by design: other splits, captions beyond the fifth)

LamRA encodes the query text as `instruction + " " + text`; this project's evaluation does the same through
`formats.sample.with_instruction`, which also applies UniIR's `format_string` (capitalised, a final period added
when missing), as for M-BEIR: the only difference to LamRA's zero-shot scripts in what the model reads.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lamra_pl.errors import LamraError
from lamra_pl.formats import safe_name
from lamra_pl.formats.sample import MAX_IMAGE_PIXELS
from lamra_pl.recipes.mbeir import Problems, run_conversion
from lamra_pl.recipes.zeroshot import (
    ccneg,
    circo,
    genecis,
    interleaved,
    karpathy,
    long_captions,
    sugarcrepe,
    video_sets,
    visdial,
)
from lamra_pl.recipes.zeroshot.layout import I2T, Layout, write_mbeir

MBEIR_FOLDER = "mbeir"  # OUT/mbeir: the set as an M-BEIR folder, the input of the conversion (kept to be read)


@dataclass(frozen=True)
class ZeroShotSet:
    """A set: its default split and image folder (relative to the root), and its reader."""

    split: str
    images: str
    read: Callable[[Path, Path, str, Problems], list[Layout]]
    pipeline: str  # what `make zeroshot` shows of it: LamRA's table column


SETS: dict[str, ZeroShotSet] = {
    "flickr30k": ZeroShotSet(
        "test",
        "flickr30k-images",
        lambda root, images, split, p: [
            karpathy.read("flickr30k", root / "dataset_flickr30k.json", split, p, I2T, root)
        ],
        "Flickr30K",
    ),
    "coco": ZeroShotSet(
        "test",
        ".",
        lambda root, images, split, p: [karpathy.read("coco", root / "dataset_coco.json", split, p, None, root)],
        "MSCOCO 5k",
    ),
    "sharegpt4v": ZeroShotSet(
        "test",
        "val_data",
        lambda root, images, split, p: [
            long_captions.read_sharegpt4v(root / "datas_for_validation.json", split, p, root)
        ],
        "ShareGPT4V",
    ),
    "urban1k": ZeroShotSet(
        "test", "image", lambda root, images, split, p: [long_captions.read_urban1k(root, images, split, p)], "Urban1K"
    ),
    "circo": ZeroShotSet(
        "val", "COCO2017_unlabeled/unlabeled2017", lambda root, images, split, p: [circo.read(root, split, p)], "CIRCO"
    ),
    "genecis": ZeroShotSet("test", ".", lambda root, images, split, p: genecis.read(root, split, p), "GeneCIS"),
    "visdial": ZeroShotSet(
        "val", "VisualDialog_val2018", lambda root, images, split, p: [visdial.read(root, split, p)], "VisDial"
    ),
    "ccneg": ZeroShotSet("test", ".", lambda root, images, split, p: [ccneg.read(root, split, p)], "CC-Neg"),
    "sugarcrepe": ZeroShotSet(
        "test", "val2017", lambda root, images, split, p: sugarcrepe.read(root, split, p), "SugarCrepe"
    ),
    "msrvtt": ZeroShotSet(
        "test", "videos", lambda root, images, split, p: [video_sets.read_msrvtt(root, split, p)], "MSR-VTT"
    ),
    "msvd": ZeroShotSet(
        "test", "YouTubeClips", lambda root, images, split, p: [video_sets.read_msvd(root, split, p)], "MSVD"
    ),
    "vist": ZeroShotSet(
        "val", "images/{split}", lambda root, images, split, p: [interleaved.read_vist(root, images, split, p)], "VIST"
    ),
    "multiturn_fashioniq": ZeroShotSet(
        "val",
        "images",
        lambda root, images, split, p: [interleaved.read_multiturn_fashioniq(root, split, p)],
        "Multi-turn FashionIQ",
    ),
}


def convert(
    set: str,
    root: str,
    out: str,
    images: str | None = None,
    split: str | None = None,
    strict: bool = False,
    max_image_pixels: int = MAX_IMAGE_PIXELS,
) -> dict[str, Any]:
    """Convert one of LamRA's zero-shot sets from its published files to evaluation task folders.

    Prints and returns the report (also OUT/report.json): convert-mbeir's, with a "zeroshot" part saying what of the
    set's own files was read and skipped. A run over an earlier conversion in OUT rewrites it.

    Args:
        set: a name of `SETS`.
        root: the set's folder, as its authors distribute it (see the table in `lamra_pl.recipes.zeroshot`).
        out: output folder (eval/<split>/<set>_task<N>/, eval/<split>/global_pool/, mbeir/, report.json).
        images: the image (video) folder, if not where the set's layout puts it under the root.
        split: the split to convert (default: the one LamRA evaluates: test; CIRCO and VisDial val).
        strict: stop at the first problem instead of skipping and counting.
        max_image_pixels: images with more pixels are skipped and counted (read from their header).
    """
    if set not in SETS:
        raise LamraError(f"--set {set!r} is not a zero-shot set this lamra-pl converts; choose from {list(SETS)}")
    spec = SETS[set]
    root_path = Path(root)
    if not root_path.is_dir():
        raise LamraError(f"--root {root!r} is not a folder (the {set} set as its authors distribute it)")
    split = split or spec.split
    if not safe_name(split):
        raise LamraError(f"--split {split!r} is not a split name (letters, digits, '_', '.', '-')")
    image_dir = Path(images) if images is not None else root_path / spec.images.format(split=split)
    if not image_dir.is_dir():
        raise LamraError(f"the image folder {str(image_dir)!r} does not exist (give --images)")
    out_path = Path(out)
    if out_path.exists() and not out_path.is_dir():
        raise LamraError(f"--out {out!r} is a file, not a folder")
    if os.path.realpath(out_path).startswith(os.path.realpath(root_path) + os.sep):
        raise LamraError(f"--out {out!r} is inside --root {root!r}: give a folder outside the raw data")
    problems = Problems(strict)
    layouts = spec.read(root_path, image_dir, split, problems)
    folder = out_path / MBEIR_FOLDER
    write_mbeir(layouts, folder, image_dir)
    task_specs = {
        f"{layout.dataset}_task{t.task_id}": {
            "metrics": t.metrics,
            "reported": t.reported,
            # what `tune-fusion` optimises: the reported recall, else (mAP) M-BEIR's R@5
            **({"recall_k": int(t.reported[2:])} if t.reported.startswith("R@") else {}),
            "zeroshot_set": set,
            "instruction": t.instruction,
            **({"galleries": t.galleries} if t.galleries is not None else {}),
            **({"excluded": t.excluded} if t.excluded is not None else {}),
        }
        for layout in layouts
        for t in layout.tasks
    }
    zeroshot = {
        "set": set,
        "root": os.path.abspath(root_path),
        "images": os.path.abspath(image_dir),
        "split": split,
        "annotations": sorted({f for layout in layouts for f in layout.inputs}),
        "read": merged(layout.read for layout in layouts),
        "skipped": merged(layout.skipped for layout in layouts),
        "problems": dict(problems.counts),
        "where": dict(problems.where),
    }
    report = run_conversion(
        str(folder),
        out,
        strict=strict,
        splits=(split,),
        max_image_pixels=max_image_pixels,
        image_roots=(str(image_dir),),
        train=False,
        task_specs=task_specs,
        extra_report={"zeroshot": zeroshot},
        quiet=True,
    )
    print(json.dumps(report, indent=1))
    return report


def merged(counts: Any) -> dict[str, int]:
    total: dict[str, int] = {}
    for part in counts:
        for key, n in part.items():
            total[key] = total.get(key, 0) + n
    return total
