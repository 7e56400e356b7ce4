"""VIST and multi-turn FashionIQ: queries that interleave several images with their texts (sample format version 3,
`Item.parts`). Converted from each set's published layout (tests/fixtures/zeroshot/make_fixtures.py), rendered as
LamRA's code renders them, embedded alone as in padded batches, reranked, and retrieved with VIST's own earlier
images left out of each story's ranking (task format version 3, excluded.jsonl), recall equal to a recomputation
from the embeddings."""

from __future__ import annotations

import io
import json
import re
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import shape_image
from helpers import convert_zeroshot, embeds_alone_as_in_a_batch, evaluate_zeroshot, lamra_here, ok
from lamra_pl.api import Interleaved, Retriever
from lamra_pl.errors import BadSampleError, LamraError
from lamra_pl.formats.index import EmbeddingIndex
from lamra_pl.formats.runs import read_run_file
from lamra_pl.formats.sample import Item, decode_candidate, decode_record, encode_record, evaluation_query, member_item
from lamra_pl.formats.shards import expand_shards, read_samples
from lamra_pl.formats.task import read_excluded, read_qrels, reported_metric, task_info, task_metrics, write_task
from lamra_pl.models.backbone import BackboneSpec
from lamra_pl.models.clip import CLIPCollator
from lamra_pl.models.embedding_inputs import EmbeddingCollator
from lamra_pl.models.rerank_inputs import POINTWISE_INSTRUCTION, pointwise_messages
from lamra_pl.models.reranker import RerankModule
from lamra_pl.ranking.metrics import evaluate_embeddings
from lamra_pl.ranking.search import search
from lamra_pl.recipes.mbeir import Converter, Problems
from lamra_pl.recipes.zeroshot.interleaved import SESSION, STORY

sys.path.insert(0, str(Path(__file__).parent / "fixtures" / "zeroshot"))
from make_fixtures import make

from test_video import module

SETS = ("vist", "multiturn_fashioniq")


@pytest.fixture(scope="module")
def raw(tmp_path_factory) -> dict[str, Path]:
    return make(tmp_path_factory.mktemp("raw"), list(SETS))


@pytest.fixture(scope="module")
def converted(raw, tmp_path_factory) -> dict[str, Path]:
    splits = convert_zeroshot(raw, tmp_path_factory.mktemp("data"), {name: "val" for name in SETS})
    return {name: split / f"{name}_task7" for name, split in splits.items()}


def records(task: Path) -> dict[str, object]:
    return {r.qid: r for r in map(decode_record, read_samples(expand_shards(str(task / "queries"))))}


def same_image(decoded: Image.Image, path: Path) -> bool:
    return np.array_equal(np.asarray(decoded), np.asarray(Image.open(path).convert("RGB")))


def test_vist_stories_become_interleaved_queries_with_their_earlier_images_excluded(raw, converted):
    """Read here from the published file, independently of the converter: per story (its lines in order) the
    query is sentence, image, ..., the last sentence; the positive its last image; its earlier images excluded."""
    data = json.loads((raw["vist"] / "sis" / "val.story-in-sequence.json").read_text())
    stories: dict[str, list[dict]] = {}
    for [line] in data["annotations"]:
        stories.setdefault(line["story_id"], []).append(line)
    told = {s: sorted(ls, key=lambda x: x["worker_arranged_photo_order"]) for s, ls in stories.items() if len(ls) > 1}
    task = converted["vist"]
    last = {f"vist:{s}": {f"vist:{ls[-1]['photo_flickr_id']}"} for s, ls in told.items()}
    assert read_qrels(task / "qrels.txt") == last
    assert read_excluded(task) == {
        f"vist:{s}": [f"vist:{x['photo_flickr_id']}" for x in ls[:-1]] for s, ls in told.items()
    }
    photos = sorted({f"vist:{line['photo_flickr_id']}" for ls in stories.values() for line in ls})
    assert (task / "pool" / "ids.txt").read_text().split() == photos  # every story's images, the lone one's too
    info = task_info(task)
    assert info["version"] == 3 and (task_metrics(info), reported_metric(info)) == (["R@1", "R@5", "R@10"], "R@1")
    images = raw["vist"] / "images" / "val"
    for qid, record in records(task).items():
        lines = told[qid.split(":")[1]]
        query = evaluation_query(record)
        assert query.text == STORY and query.modality == "image,text" and record.query.text is None
        texts = [p for p in query.parts if isinstance(p, str)]
        assert texts == [line["text"] for line in lines]
        assert [isinstance(p, str) for p in query.parts] == [True, False] * (len(lines) - 1) + [True]
        for part, line in zip(query.images, lines[:-1], strict=True):
            [file] = images.glob(f"{line['photo_flickr_id']}.*")  # one .png among the .jpg
            assert same_image(part, file)
    report = json.loads((task.parents[2] / "report.json").read_text())
    assert report["zeroshot"]["skipped"] == {"story_of_one_image": 1} and report["problems"] == {}


def test_multiturn_fashioniq_sessions_become_image_then_modification_turns(raw, converted):
    sessions = json.loads((raw["multiturn_fashioniq"] / "data" / "all.val.json").read_text())
    names = json.loads((raw["multiturn_fashioniq"] / "image_splits" / "split.all.val.json").read_text())
    kept = {i: s for i, s in enumerate(sessions) if s["target"][1] in names}
    task = converted["multiturn_fashioniq"]
    assert read_qrels(task / "qrels.txt") == {
        f"multiturn_fashioniq:{i}": {f"multiturn_fashioniq:{s['target'][1]}"} for i, s in kept.items()
    }
    assert (task / "pool" / "ids.txt").read_text().split() == [f"multiturn_fashioniq:{n}" for n in names]
    assert read_excluded(task) is None and task_info(task)["version"] == 2
    assert (task_metrics(task_info(task)), reported_metric(task_info(task))) == (
        ["R@1", "R@5", "R@10", "R@8"],
        "R@5",
    )
    for qid, record in records(task).items():
        turns = kept[int(qid.split(":")[1])]["reference"]
        query = evaluation_query(record)
        assert query.text == SESSION
        expected = []
        for _, texts, name in turns:
            expected += [name, " and ".join(t for t in texts if t)]
        expected = [e for e in expected if e]  # a turn of empty texts renders nothing: no part
        got = [p if isinstance(p, str) else None for p in query.parts]
        assert got == [None if e in [t[2] for t in turns] else e for e in expected]
        for part, (_, _, name) in zip(query.images, turns, strict=True):
            assert same_image(part, raw["multiturn_fashioniq"] / "images" / f"{name}.jpg")
    report = json.loads((task.parents[2] / "report.json").read_text())
    assert report["zeroshot"]["skipped"] == {"target_outside_image_list": 1}


STORY_ITEM = Item(
    "s",
    text=STORY,
    parts=["the family met .", shape_image("red", "circle"), "they ate .", shape_image("blue", "square"), "bye ."],
)


def test_an_interleaved_query_renders_as_lamras_vist_message(tiny_backbone):
    """LamRA's VIST query: instruction, then each sentence and its image, the last sentence, and its prompt, in one
    user turn; the assistant turn `<emb>.`. The collator's batch equals the processor's on that message."""
    m = module(tiny_backbone)
    lamra = [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": STORY},
                {"type": "text", "text": "the family met ."},
                {"type": "image"},
                {"type": "text", "text": "they ate ."},
                {"type": "image"},
                {"type": "text", "text": "bye ."},
                {"type": "text", "text": "\nSummarize above images and sentences in one word: "},
            ],
        },
        {"role": "assistant", "content": [{"type": "text", "text": "<emb>."}]},
    ]
    text = m.processor.apply_chat_template(lamra, tokenize=False, add_generation_prompt=False)
    expected = m.processor(text=[text], images=STORY_ITEM.images, return_tensors="pt", add_special_tokens=False)
    got = EmbeddingCollator(m.processor).encode([STORY_ITEM])
    assert got["input_ids"].tolist() == expected["input_ids"].tolist()
    torch.testing.assert_close(got["pixel_values"], expected["pixel_values"], atol=0, rtol=0)
    assert got["image_grid_thw"].tolist() == expected["image_grid_thw"].tolist() and len(got["image_grid_thw"]) == 2


MIXED = [
    Item("t", text="a red circle"),
    STORY_ITEM,
    Item("i", image=shape_image("green", "triangle")),
    Item("m", text=SESSION, parts=[shape_image("yellow", "square"), "is darker"]),
]


@pytest.mark.parametrize("padding_side", ["left", "right"])
@pytest.mark.parametrize("rope", ["model", "1d"])
def test_interleaved_items_embed_alone_as_in_a_padded_batch(tiny_backbone, padding_side, rope):
    m = module(tiny_backbone, padding_side=padding_side, rope=rope)
    batch, alone = embeds_alone_as_in_a_batch(m, MIXED)
    assert len(batch["image_grid_thw"]) == 4  # 2 + 1 + 1, in placeholder order
    assert (batch["attention_mask"].sum(1) < batch["attention_mask"].shape[1]).sum() >= 3
    collate = EmbeddingCollator(m.processor)
    # The order of the parts is read: the same story told the other way round embeds otherwise.
    swapped = Item("s2", text=STORY, parts=[STORY_ITEM.parts[i] for i in (0, 3, 2, 1, 4)])
    with torch.no_grad():
        assert (m.embed(collate.encode([swapped])) - alone[1]).abs().max() > 1e-4


def test_the_reranker_reads_an_interleaved_query_as_lamras_vist_reranker_does(tiny_backbone):
    """LamRA's VIST reranking chat: its instruction, "Query:", the story's instruction and parts in order,
    "Candidate:" and the image; the reranker scores such a pair alone as in a padded batch."""
    candidate = Item("c", image=shape_image("green", "circle"))
    [message] = pointwise_messages(STORY_ITEM, candidate)
    content = [p.get("text", p["type"]) for p in message["content"]]
    assert content == [
        POINTWISE_INSTRUCTION,
        "Query:",
        STORY,
        "the family met .",
        "image",
        "they ate .",
        "image",
        "bye .",
        "Candidate:",
        "image",
    ]
    images = [p["_image"] for p in message["content"] if "_image" in p]
    assert images == [*STORY_ITEM.images, candidate.image]
    reranker = RerankModule(BackboneSpec(tiny_backbone, gradient_checkpointing=False))
    reranker.configure_model()
    collator = reranker.eval().collator()
    pairs = [(STORY_ITEM, candidate), (Item("q", "a green circle"), candidate), (MIXED[3], candidate)]
    with torch.no_grad():
        together = reranker.score_pointwise(collator.pointwise_inputs(pairs))
        alone = torch.cat([reranker.score_pointwise(collator.pointwise_inputs([p])) for p in pairs])
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=0)
    assert ((together > 0) & (together < 1)).all()


def test_interleaved_items_round_trip_and_bad_parts_are_refused():
    png = shape_image("red", "circle")
    data = io.BytesIO()
    png.save(data, format="PNG")
    parts = [{"txt": "one"}, {"image": (data.getvalue(), "png"), "img_src": "a/b.png"}, {"txt": "two"}]
    sample = encode_record("k", qid="q", query={"txt": None, "parts": parts}, positives=[{"id": "p", "txt": "x"}])
    record = json.loads(sample["json"])
    assert record["query"]["parts"] == [{"txt": "one"}, {"img": "query.p001.png", "img_src": "a/b.png"}, {"txt": "two"}]
    assert record["query"]["modality"] == "image,text"
    query = decode_record(sample).query
    assert query.parts[0] == "one" and query.parts[2] == "two" and query.source == "a/b.png"
    assert np.array_equal(np.asarray(query.parts[1]), np.asarray(png))
    for broken, why in (
        ({**record["query"], "parts": [{"txt": "one"}, {"img": "query.p009.png"}]}, "missing"),
        ({**record["query"], "parts": [{"txt": "only text"}]}, "at least one image"),
        ({**record["query"], "parts": [{"txt": "a", "img": "query.p001.png"}]}, "exactly one"),
        ({**record["query"], "txt": "beside"}, "mixes"),
    ):
        bad = {**sample, "json": json.dumps({**record, "query": broken}).encode()}
        with pytest.raises(BadSampleError, match=why):
            decode_record(bad)
    with pytest.raises(LamraError, match="interleaved parts"):  # CLIP would drop all but one image unseen
        CLIPCollator(tokenizer=None, preprocess=None).encode([STORY_ITEM])


@pytest.mark.parametrize(
    ("row", "why"),
    [
        ({"query_parts": [{"txt": "a"}], "query_modality": "text"}, "holds no image"),
        ({"query_parts": [{"img_path": "images/x.jpg"}], "query_modality": "image,text"}, "make it 'image'"),
        ({"query_parts": [{"txt": "a"}, {"img_path": "x"}], "query_txt": "b"}, "in query_parts only"),
        ({"query_parts": [{"txt": "a", "img_path": "x"}]}, r"query_parts\[0\] must be"),
        ({"query_parts": [{"txt": 3}, {"img_path": "x"}]}, r"query_parts\[0\] is an integer"),
        ({"query_parts": [{"txt": "a"}, {"img_path": "x"}], "task_id": None}, "needs a task_id"),
    ],
)
def test_a_malformed_interleaved_mbeir_row_is_a_counted_problem(row, why, tmp_path):
    full = {"qid": "9:1", "query_modality": "image,text", "pos_cand_list": ["9:2"], "task_id": 7, **row}
    reason, detail = Converter(tmp_path, Problems(False)).query_problem(full)
    assert reason == ("bad_task_id" if "task_id" in why else "bad_value")
    assert re.search(why, detail), detail


@pytest.fixture(scope="module")
def retrieved(converted, tiny_backbone, tmp_path_factory) -> dict[str, Path]:
    splits = {name: task.parent for name, task in converted.items()}
    runs = evaluate_zeroshot(tiny_backbone, splits, tmp_path_factory.mktemp("runs"), "[local,global]", "--batch_size=8")
    return {name: runs / name for name in SETS}


@pytest.mark.parametrize("name", SETS)
def test_retrieval_leaves_out_each_storys_own_images_and_recall_equals_a_recomputation(name, retrieved, converted):
    """From the embeddings `retrieve` wrote: each query's ranking of the pool by score, its excluded candidates
    (VIST) left out; the run files hold exactly that and `evaluate`'s recall is its hit rate."""
    task, runs = converted[name], retrieved[name]
    index = EmbeddingIndex(runs / "index")
    queries = EmbeddingIndex(runs / "queries" / task.name)
    excluded = read_excluded(task) or {}
    qrels = read_qrels(task / "qrels.txt")
    # The search's contract (`lamra_pl.ranking.search`): float64 cosine, ties broken by the ids' order.
    candidates = index.embeddings.astype(np.float64)
    unit = queries.embeddings.astype(np.float64)
    unit /= np.linalg.norm(unit, axis=1, keepdims=True)
    scores = (unit @ candidates.T) / np.linalg.norm(candidates, axis=1)
    expected = {}
    for q, qid in enumerate(queries.ids):
        order = sorted(range(len(index.ids)), key=lambda r: (-round(scores[q, r], 12), index.ids[r]))
        expected[qid] = [index.ids[r] for r in order if index.ids[r] not in excluded.get(qid, [])]
    if name == "vist":
        assert all(excluded[q] for q in queries.ids)
    for pool in ("local", "global"):  # one split's images: the local pool is the global one here
        run = read_run_file(runs / pool / f"{task.name}.run")
        assert dict(zip(run.qids, run.ranked, strict=True)) == expected
    results = json.loads((runs / "local" / "results.json").read_text())["tasks"][task.name]
    for k in (1, 5, 8, 10) if name != "vist" else (1, 5, 10):
        hits = [any(d in qrels[q] for d in expected[q][:k]) for q in queries.ids]
        assert results[f"R@{k}"] == pytest.approx(np.mean(hits))


def test_the_python_api_takes_an_interleaved_query(tiny_backbone, tmp_path):
    """`Interleaved([...])` goes where an image goes: `encode_queries` embeds it as the collator embeds the same
    item, a text beside it or an empty part is refused in one line, and `build_index` refuses it unencoded."""
    m = module(tiny_backbone)
    retriever = Retriever(m)
    story = Interleaved(STORY_ITEM.parts)
    got = retriever.encode_queries(images=[story], instruction=STORY)
    with torch.no_grad():
        expected = m.embed(EmbeddingCollator(m.processor).encode([STORY_ITEM])).float().numpy()
    np.testing.assert_allclose(got, expected, atol=1e-6)
    assert not np.allclose(retriever.encode_queries(images=[story]), got, atol=1e-3)  # the instruction is read
    with pytest.raises(LamraError, match="no text beside it"):
        retriever.encode(texts=["a"], images=[story])
    with pytest.raises(LamraError, match="part 1 is an empty text"):
        retriever.encode(images=[Interleaved([shape_image("red", "circle"), " "])])
    with pytest.raises(LamraError, match="build_index takes texts, images and videos"):
        retriever.build_index(images=[story], ids=["s"], out=tmp_path / "index")


def test_validation_leaves_out_exclusions_as_retrieve_does_and_refuses_galleries(tmp_path):
    """`evaluate_embeddings` (validation during fit) ranks a task with excluded.jsonl as `retrieve` does, and
    refuses a task of per-query galleries in one line rather than rank its whole pool."""
    task = tmp_path / "vist_task7"
    write_task(task, {"dataset": "vist", "task_id": 7, "recall_k": 1}, ["q1 0 c2 1 7"], excluded={"q1": ["c0"]})
    queries = (["q1"], np.array([[1.0, 0.0, 0.0]], dtype=np.float32))
    pool = (["c0", "c1", "c2"], np.array([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.8, 0.6, 0.0]], dtype=np.float32))
    scores = evaluate_embeddings({str(task): {"queries": queries, "pool": pool}})["tasks"][task.name]
    assert scores["R@1"] == 1.0  # c0 would rank first; left out, the positive c2 does
    (task / "excluded.jsonl").unlink()
    assert evaluate_embeddings({str(task): {"queries": queries, "pool": pool}})["tasks"][task.name]["R@1"] == 0.0
    (task / "galleries.jsonl").write_text('{"qid": "q1", "ids": ["c1", "c2"]}\n')
    with pytest.raises(LamraError, match="own gallery"):
        evaluate_embeddings({str(task): {"queries": queries, "pool": pool}})
    (task / "excluded.jsonl").write_text('{"qid": "q1", "ids": ["c0"]}\n{"qid": "q1", "ids": ["c1"]}\n')
    with pytest.raises(LamraError, match="excluded.jsonl:2: qid 'q1' has a line already"):
        read_excluded(task)


def test_search_reads_a_pool_of_another_byte_order_as_the_native_one():
    rng = np.random.default_rng(0)
    pool = rng.standard_normal((40, 16)).astype(np.float16)
    queries = rng.standard_normal((3, 16)).astype(np.float32)
    native = search(pool, queries, 5)
    swapped = search(pool.astype(">f2"), queries, 5)
    assert np.array_equal(native.rows, swapped.rows) and np.array_equal(native.scores, swapped.scores)


def test_a_candidate_with_parts_beside_an_image_and_a_malformed_part_are_refused():
    data = io.BytesIO()
    shape_image("red", "circle").save(data, format="PNG")
    record = {"id": "c", "txt": None, "img": "img.png", "parts": [{"txt": "a"}, {"img": "img.png"}]}
    sample = {"__key__": "k", "img.png": data.getvalue(), "json": json.dumps(record).encode()}
    with pytest.raises(BadSampleError, match="parts with a text, an image or a video beside them"):
        decode_candidate(sample)
    query = {"txt": None, "parts": [{"txt": "a"}, {"img": ["not", "a", "name"]}]}
    with pytest.raises(BadSampleError, match=r"parts\[1\] must be"):
        member_item(sample, query, "here")


def test_a_vist_photo_id_leading_out_of_the_image_folder_is_counted_not_read(raw, tmp_path):
    """A photo id is part of a path: one that climbs out of the image folder drops its story, counted by reason,
    and nothing outside is read."""
    root = tmp_path / "vist"
    shutil.copytree(raw["vist"], root)
    secret = tmp_path / "secret.gif"
    shape_image("red", "circle").save(secret, format="GIF")
    annotation = root / "sis" / "val.story-in-sequence.json"
    data = json.loads(annotation.read_text())
    data["annotations"][1][0]["photo_flickr_id"] = "../../../secret"  # story 45531's second photo
    annotation.write_text(json.dumps(data))
    ok(lamra_here("convert-zeroshot", "--set=vist", f"--root={root}", f"--out={tmp_path / 'out'}"))
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["problems"] == {"unsafe_path": 2}  # the photo as a pool candidate, and in the story's query
    task = tmp_path / "out" / "eval" / "val" / "vist_task7"
    assert "vist:45531" not in read_qrels(task / "qrels.txt") and len(read_qrels(task / "qrels.txt")) == 2
    assert "vist:../../../secret" not in (task / "pool" / "ids.txt").read_text().split()
