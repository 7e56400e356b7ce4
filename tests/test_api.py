"""The Python API (`lamra_pl.Retriever`, `lamra_pl.Reranker`) computes what the command-line tools compute for the
same items: the vectors of `lamra-pl index` / `retrieve`, their rankings, their index folder, and the scores of
`lamra-pl rerank` (pointwise, listwise, zero-shot), all on the converted M-BEIR fixture with the tiny Qwen2-VL."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from conftest import THREADS, shape_image
from helpers import ROOT, lamra_here, ok
from lamra_pl.api import Reranker, Retriever
from lamra_pl.data.candidates import CandidateStore
from lamra_pl.errors import LamraError
from lamra_pl.formats.index import EmbeddingIndex
from lamra_pl.formats.runs import read_run_file, scores_file
from lamra_pl.formats.sample import Item, Record, decode_candidate, decode_record
from lamra_pl.formats.shards import expand_shards, read_samples
from lamra_pl.models.backbone import BackboneSpec, LoraSpec
from lamra_pl.models.embedding import EmbeddingModule
from lamra_pl.models.reranker import RerankModule
from lamra_pl.recipes.mbeir import convert

FIXTURE = Path(__file__).parent / "fixtures" / "mbeir_tiny"
# How the fixture reranks the local runs: (model, arguments); "checkpoint" is a LoRA reranker's `fit` checkpoint,
# "folder" the tiny model folder as MM-Embed's zero-shot judge.
RERANKS = {
    "pointwise": ("checkpoint", ["--top_n=3"]),
    "listwise": ("checkpoint", ["--mode=listwise", "--top_n=3"]),
    "zero_shot": ("folder", ["--zero_shot=true", "--top_n=2"]),
}


def reranker_checkpoint(backbone: Path, path: Path) -> Path:
    """A checkpoint as `lamra-pl fit` writes one for a LoRA reranker (trainable tensors and hyperparameters), its
    adapter moved off its initial zeros so that it scores unlike the bare backbone."""
    module = RerankModule(BackboneSpec(str(backbone), gradient_checkpointing=False), lora=LoraSpec(r=4, alpha=8))
    module.configure_model()
    generator = torch.Generator().manual_seed(3)
    trainable = set(module.trainable_names())
    with torch.no_grad():
        for name, tensor in module.named_parameters():
            if name in trainable:
                tensor.add_(0.05 * torch.randn(tensor.shape, generator=generator))
    state = {k: v for k, v in module.state_dict().items() if k in trainable}
    torch.save(
        {"state_dict": state, "hyper_parameters": {"_class_path": "lamra_pl.RerankModule", **module.hparams}}, path
    )
    return path


@pytest.fixture(scope="module")
def pipeline(tiny_backbone, tmp_path_factory) -> dict[str, Path]:
    """The fixture converted; its test pool indexed, its test queries retrieved (both pools, top 5) and the local
    runs reranked three ways, all by the real CLI."""
    torch.set_num_threads(THREADS)  # as in the tests that compare with it (a module fixture runs before theirs)
    root = tmp_path_factory.mktemp("api")
    data = root / "data"
    convert(str(FIXTURE), str(data))
    model = str(tiny_backbone)
    index, runs = root / "index", root / "runs"
    ok(lamra_here("index", f"--model={model}", f"--pool={data}/eval/test/global_pool", f"--out={index}"))
    queries = f"--queries={data}/eval/test/*_task*"
    ok(lamra_here("retrieve", f"--model={model}", f"--index={index}", queries, f"--out={runs}", "--k=5"))
    models = {"folder": Path(model), "checkpoint": reranker_checkpoint(tiny_backbone, root / "reranker.ckpt")}
    for name, (which, args) in RERANKS.items():
        out = f"--out={root / name}"
        ok(lamra_here("rerank", f"--model={models[which]}", f"--runs={runs / 'local'}", out, *args))
    return {"root": root, "data": data, "model": Path(model), "index": index, "runs": runs, **models}


@pytest.fixture(scope="module")
def retriever(pipeline) -> Retriever:
    return Retriever.from_checkpoint(pipeline["model"])


def tasks(pipeline: dict[str, Path]) -> list[Path]:
    return sorted((pipeline["data"] / "eval/test").glob("*_task*"))


def records(task: Path) -> list[Record]:
    return [decode_record(sample) for sample in read_samples(expand_shards(str(task / "queries")))]


def pool(pipeline: dict[str, Path]) -> list[Item]:
    return [decode_candidate(s) for s in read_samples(expand_shards(str(pipeline["data"] / "eval/test/global_pool")))]


def source_file(item: Item) -> Path | None:
    """The fixture's image file an item's image came from (the same bytes as its shard member)."""
    return None if item.image is None else FIXTURE / str(item.source)


def as_input(item: Item) -> dict[str, Any]:
    return {key: value for key, value in (("text", item.text), ("image", item.image)) if value is not None}


def test_reranker_is_exported_like_the_retriever():
    import lamra_pl

    assert lamra_pl.Reranker is Reranker and lamra_pl.Retriever is Retriever
    assert {"Reranker", "Retriever"} <= set(lamra_pl.__all__)


# ---------------------------------------------------------------------------------------------- Retriever
def test_encode_documents_and_queries_equal_the_pipelines_vectors(pipeline, retriever):
    """Batched as the pipeline batches a shard (by length), so the vectors are the index's to the bit once rounded
    to the index's float16; images given as PIL images or as their files alike."""
    items = pool(pipeline)
    index = EmbeddingIndex(pipeline["index"])
    assert [i.id for i in items] == index.ids
    documents = retriever.encode_documents([i.text for i in items], [i.image for i in items])
    assert documents.dtype == np.float32 and documents.shape == (len(index), index.dim)
    np.testing.assert_allclose(np.linalg.norm(documents, axis=1), 1.0, atol=1e-5)
    assert np.array_equal(documents.astype(np.float16), index.embeddings)
    from_files = retriever.encode_documents([i.text for i in items], [source_file(i) for i in items])
    assert np.array_equal(from_files, documents)
    assert len({tuple(row) for row in documents.round(4)}) == len(items)  # distinct inputs, distinct vectors
    for task in tasks(pipeline):
        queries = records(task)
        instruction = queries[0].instructions[0]
        assert all(q.instructions[0] == instruction for q in queries)  # one instruction per task, as retrieve's
        encoded = retriever.encode_queries(
            [q.query.text for q in queries], [q.query.image for q in queries], instruction=instruction
        )
        stored = EmbeddingIndex(pipeline["runs"] / "queries" / task.name)
        assert stored.ids == [q.qid for q in queries]
        assert np.array_equal(encoded.astype(np.float16), stored.embeddings), task.name
        bare = retriever.encode_documents([q.query.text for q in queries], [q.query.image for q in queries])
        assert not np.allclose(bare, encoded, atol=1e-3)  # the instruction is really part of a query


def test_a_model_without_instructions_leaves_them_out_as_retrieve_does(tiny_backbone):
    module = EmbeddingModule(BackboneSpec(str(tiny_backbone), gradient_checkpointing=False), instructions=False)
    module.configure_model()
    retriever = Retriever(module)
    assert not retriever.instructions
    with pytest.warns(UserWarning, match="trained without instructions"):
        queries = retriever.encode_queries(["red apple"], instruction="Find the emoji image that matches this name.")
    assert np.array_equal(queries, retriever.encode_documents(["red apple"]))
    with_it = retriever.encode(["red apple"], instruction="Find the emoji image that matches this name.")
    assert not np.allclose(with_it, queries, atol=1e-3)  # `encode` prepends it whatever the model


def test_batch_search_equals_one_by_one_and_retrieve(pipeline, retriever):
    index = EmbeddingIndex(pipeline["index"])
    for task in tasks(pipeline):
        queries = records(task)
        texts = [q.query.text for q in queries]
        images = [source_file(q.query) for q in queries]
        instruction = queries[0].instructions[0]
        batch = retriever.search(index, query_text=texts, query_image=images, k=5, instruction=instruction)
        assert isinstance(batch, list) and len(batch) == len(queries)
        one_by_one = [
            retriever.search(index, query_text=t, query_image=i, k=5, instruction=instruction)
            for t, i in zip(texts, images, strict=True)
        ]
        assert [[h.id for h in hits] for hits in batch] == [[h.id for h in hits] for hits in one_by_one]
        for hits, alone in zip(batch, one_by_one, strict=True):
            assert [h.rank for h in hits] == [1, 2, 3, 4, 5]
            np.testing.assert_allclose([h.score for h in hits], [h.score for h in alone], atol=1e-3)
        # ... and what `lamra-pl retrieve` ranked in the global pool, with its scores
        run = read_run_file(pipeline["runs"] / "global" / f"{task.name}.run")
        assert run.qids == [q.qid for q in queries]
        assert [[h.id for h in hits] for hits in batch] == run.ranked
        for hits, scores in zip(batch, run.scores, strict=True):
            np.testing.assert_allclose([h.score for h in hits], scores, atol=1e-6)
        first = batch[0][0]
        shown = index.items([index.row_of[first.id]])[0]
        assert (first.txt, first.img) == (shown["txt"], shown["img"])
    assert retriever.search(index, query_text=[], k=5) == []


def test_build_index_writes_the_index_the_cli_writes_and_reads(pipeline, retriever, tmp_path):
    items = pool(pipeline)
    reference = EmbeddingIndex(pipeline["index"])
    out = tmp_path / "built"
    texts, images, ids = [i.text for i in items], [source_file(i) for i in items], [i.id for i in items]
    built = retriever.build_index(texts, images, ids, out=out)
    assert built.ids == reference.ids and built.modalities == reference.modalities
    assert np.array_equal(built.embeddings, reference.embeddings)  # the same batches: the same bits
    meta = json.loads((out / "index.json").read_text())
    assert {k: meta[k] for k in ("format", "version", "count", "dim", "dtype", "kind", "sources")} == {
        "format": "lamra-pl-index",
        "version": 1,
        "count": len(items),
        "dim": reference.dim,
        "dtype": "float16",
        "kind": "pool",
        "sources": [],
    }
    assert meta["model"]["probe"] == reference.meta["model"]["probe"]
    assert not (out / "parts").exists()
    rows = [json.loads(line) for line in (out / "items.jsonl").read_text().splitlines()]
    assert [r["img"] for r in rows] == [None if i is None else str(i) for i in images]
    # `lamra-pl search` and `lamra-pl retrieve` read it: the same rankings as on the pipeline's own index
    text = next(i.text for i in items if i.image is None)
    model = f"--model={pipeline['model']}"
    found = [
        [
            line.split()[:3]
            for line in ok(
                lamra_here("search", model, f"--index={where}", f"--text={text}", "--k=3")
            ).stdout.splitlines()[1:]
        ]
        for where in (out, pipeline["index"])
    ]
    assert found[0] == found[1] and len(found[0]) == 3
    runs = tmp_path / "runs"
    queries = f"--queries={pipeline['data']}/eval/test/*_task*"
    ok(lamra_here("retrieve", model, f"--index={out}", queries, f"--out={runs}", "--k=5"))
    for pool_setting in ("local", "global"):
        for task in tasks(pipeline):
            ours = (runs / pool_setting / f"{task.name}.run").read_bytes()
            assert ours == (pipeline["runs"] / pool_setting / f"{task.name}.run").read_bytes()
    # again with the same candidates: nothing to do; with others: refused, the index left as it is
    written = (out / "index.json").stat().st_mtime_ns
    assert retriever.build_index(texts, images, ids, out=out).ids == built.ids
    assert (out / "index.json").stat().st_mtime_ns == written
    with pytest.raises(LamraError, match="already holds an index"):
        retriever.build_index(texts[:-1], images[:-1], ids[:-1], out=out)
    assert (out / "index.json").stat().st_mtime_ns == written


def test_build_index_goes_on_where_a_stopped_call_stopped(retriever, tmp_path, capsys):
    texts = [f"emoji number {i}" for i in range(7)]
    images: list[Any] = [None] * 7
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image")
    images[5] = broken
    out = tmp_path / "index"
    with pytest.raises(LamraError, match="is not a readable image"):
        retriever.build_index(texts, images, out=out, chunk_size=2)
    assert sorted(p.name for p in (out / "parts").glob("chunk-*.npy")) == ["chunk-000000.npy", "chunk-000001.npy"]
    changed = [text.upper() if i == 1 else text for i, text in enumerate(texts)]
    with pytest.raises(LamraError, match=r"items given in Python changed since .* \(items\[0:2\] changed after"):
        retriever.build_index(changed, images, out=out, chunk_size=2)  # a chunk already encoded may not change
    shape_image("red", "circle").save(broken, format="PNG")  # a chunk not yet encoded may change before the resume
    capsys.readouterr()
    resumed = retriever.build_index(texts, images, out=out, chunk_size=2, show_progress_bar=True)
    assert "3/3" in capsys.readouterr().err  # chunks 2 and 3 only: 3 candidates left to encode
    fresh = retriever.build_index(texts, images, out=tmp_path / "fresh", chunk_size=2)
    assert resumed.ids == fresh.ids == [str(i) for i in range(7)]
    assert np.array_equal(resumed.embeddings, fresh.embeddings)
    assert resumed.modalities[5] == "image,text" and resumed.modalities[0] == "text"


def test_bad_inputs_are_one_line_errors(pipeline, retriever, tmp_path):
    cases = [
        (lambda: retriever.encode([]), "at least one input"),
        (lambda: retriever.encode(["a", "b"], [None]), "same length"),
        (lambda: retriever.encode([None]), "neither text nor image"),
        (lambda: retriever.encode([3]), "not a str"),
        (lambda: retriever.encode(images=[tmp_path / "missing.png"]), "does not exist"),
        (lambda: retriever.build_index(["a", "b"], ids=["x", "x"], out=tmp_path / "i"), "given twice"),
        (lambda: retriever.build_index(["a"], ids=["an id"], out=tmp_path / "i"), "white space"),
        (lambda: retriever.build_index(["a"], ids=["x", "y"], out=tmp_path / "i"), "2 ids for 1"),
        (lambda: retriever.search(pipeline["index"], ["a"], tmp_path / "x.png"), "not a list and a single value"),
        (lambda: retriever.search(pipeline["index"]), "needs a query"),
        (lambda: retriever.encode(["a"], batch_size=0), "batch_size must be a whole number >= 1"),
        (lambda: retriever.build_index(["a"], out=tmp_path / "i", chunk_size=0), "chunk_size must be"),
    ]
    for call, message in cases:
        with pytest.raises(LamraError, match=message):
            call()
    assert not (tmp_path / "i").exists()


# ----------------------------------------------------------------------------------------------- Reranker
@pytest.mark.parametrize("mode", list(RERANKS))
def test_reranker_scores_equal_the_rerank_command(pipeline, mode):
    """For every query the CLI reranked: the same query (its raw text and image + the task instruction) and the
    same head candidates, read from the pool; `score`/`rank` give the scores `lamra-pl rerank` wrote."""
    reranker = Reranker.from_checkpoint(pipeline[RERANKS[mode][0]], zero_shot=mode == "zero_shot")
    assert reranker.zero_shot == (mode == "zero_shot")
    store = CandidateStore(EmbeddingIndex(pipeline["index"]).meta["sources"])
    every = []
    for task in tasks(pipeline):
        written: dict[str, list[tuple[str, float]]] = {}
        for line in scores_file(pipeline["root"] / mode, task.name).read_text().splitlines():
            qid, did, _, _, value = line.split("\t")
            written.setdefault(qid, []).append((did, float(value)))
        queries = records(task)
        assert sorted(written) == sorted(q.qid for q in queries)
        for record in queries:
            dids, cli = zip(*written[record.qid], strict=True)
            candidates = [as_input(store.item(did)) for did in dids]
            query, instruction = as_input(record.query), record.instructions[0]
            ranked = reranker.rank(
                query, candidates, mode="listwise" if mode == "listwise" else "pointwise", instruction=instruction
            )
            api = np.array([r.score for r in sorted(ranked, key=lambda r: r.index)])
            if mode != "listwise":
                np.testing.assert_allclose(reranker.score(query, candidates, instruction=instruction), api)
            np.testing.assert_allclose(api, cli, atol=1e-5)
            assert [r.index for r in ranked] == sorted(range(len(api)), key=lambda i: (-api[i], i))
            assert [r.rank for r in ranked] == list(range(1, len(api) + 1))
            every += api.tolist()
    assert len({round(s, 6) for s in every}) > len(every) // 2  # the scores depend on their inputs
    if mode == "listwise":
        assert reranker.rank("a red apple", ["apple", "pear", "plum"], top_k=2, mode="listwise")[1].rank == 2


def test_reranker_inputs_and_refusals(pipeline):
    reranker = Reranker.from_checkpoint(pipeline["checkpoint"])
    image = shape_image("red", "circle")
    scores = reranker.score({"text": "a red circle"}, ["a red circle", image, {"text": "red", "image": image}])
    assert scores.dtype == np.float32 and scores.shape == (3,) and ((scores > 0) & (scores < 1)).all()
    bare = Reranker.from_checkpoint(pipeline["folder"]).score("a red circle", ["a red circle", image])
    assert not np.allclose(bare, scores[:2], atol=1e-3)  # the checkpoint's adapter is loaded
    np.testing.assert_allclose(reranker.score("a red circle", ["a red circle"]), scores[:1], atol=1e-5)  # str: text
    assert len(reranker.rank("q", ["a", "b", "c", "d"], top_k=2)) == 2
    judge = Reranker.from_checkpoint(pipeline["model"], zero_shot=True)
    cases = [
        (lambda: reranker.score("q", "a single text"), "candidates is a list"),
        (lambda: reranker.score("q", []), "candidates is a list"),
        (lambda: reranker.score({"txt": "q"}, ["a"]), r"keys \['txt'\]"),
        (lambda: reranker.score(3, ["a"]), "query is a int"),
        (lambda: reranker.score("q", ["a", {}]), r"candidates\[1\] has neither"),
        (lambda: reranker.rank("q", ["a"] * 10, mode="listwise"), r"\(1\)..\(9\): 10 candidates"),
        (lambda: reranker.rank("q", ["a"], top_k=0), "top_k must be a whole number >= 1"),
        (lambda: judge.rank("q", ["a", "b"], mode="listwise"), "one candidate at a time"),
    ]
    for call, message in cases:
        with pytest.raises(LamraError, match=message):
            call()


def test_the_readme_python_api_example_runs(tiny_backbone, tmp_path, monkeypatch, capsys):
    """The README's Python API snippet, as written, with its model paths pointing at the tiny model."""
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Python API") :]
    start = section.index("```python\n") + len("```python\n")
    code = section[start : section.index("```\n", start)]
    for path in (
        "runs/demo/stage2/checkpoints/last.ckpt",
        "runs/rerank/version_0/checkpoints/last.ckpt",
        "/models/Qwen2-VL-7B-Instruct",
    ):
        assert f'"{path}"' in code, path
        code = code.replace(f'"{path}"', repr(str(tiny_backbone)))
    monkeypatch.chdir(tmp_path)
    shape_image("red", "circle").save("apple.png")
    shape_image("green", "square").save("query.png")
    scope: dict[str, Any] = {}
    exec(compile(code, "README.md", "exec"), scope)
    assert scope["similarity"].shape == (2, 3) and scope["p_yes"].shape == scope["p_true"].shape == (3,)
    assert len(scope["per_query"]) == 2 and all(len(hits) == 2 for hits in scope["per_query"])
    assert EmbeddingIndex(tmp_path / "indexes/fruit").ids == ["a", "b", "c"]
    assert len(capsys.readouterr().out.splitlines()) == 4  # two hits, two ranked candidates
