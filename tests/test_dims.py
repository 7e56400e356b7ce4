"""Matryoshka dimensions at inference (`dim`: `--settings.dim`, `ModelSettings(dim=...)`): `index`, `retrieve`,
`search` and the Python API embed at the first D values of the full embedding, normalised again; an index records
the dimension it was built at and is searched at no other; a dimension the model cannot give is refused in one line.
All on the converted M-BEIR fixture with the tiny Qwen2-VL (64-d embeddings)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import THREADS
from helpers import clean_error, lamra_here, ok
from lamra_pl.api import Retriever
from lamra_pl.errors import LamraError
from lamra_pl.formats.index import EmbeddingIndex
from lamra_pl.formats.runs import read_run_file
from lamra_pl.formats.sample import decode_candidate
from lamra_pl.formats.settings import SETTINGS_FILE, ModelSettings
from lamra_pl.formats.shards import expand_shards, read_samples
from lamra_pl.models.checkpoints import load_retriever
from lamra_pl.models.matryoshka import truncate
from lamra_pl.ranking.search import unit_rows
from lamra_pl.recipes.mbeir import convert
from test_embedding import ITEMS

FIXTURE = Path(__file__).parent / "fixtures" / "mbeir_tiny"
DIM, FULL = 16, 64


def cut(rows: np.ndarray, dim: int = DIM) -> np.ndarray:
    """By hand, in float64: the first `dim` values of each row, L2-normalised."""
    rows = np.asarray(rows, dtype=np.float64)[:, :dim]
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


@pytest.fixture(scope="module")
def built(tiny_backbone, tmp_path_factory) -> dict[str, Path]:
    """The fixture converted; its global test pool indexed at the full width and at DIM, and the test queries
    retrieved against each at its own width, all by the real CLI."""
    torch.set_num_threads(THREADS)  # as in the tests that compare with it (a module fixture runs before theirs)
    root = tmp_path_factory.mktemp("dims")
    data = root / "data"
    convert(str(FIXTURE), str(data))
    model, pool, queries = (
        str(tiny_backbone),
        f"--pool={data}/eval/test/global_pool",
        f"--queries={data}/eval/test/*_task*",
    )
    at_dim = f"--settings.dim={DIM}"
    ok(lamra_here("index", f"--model={model}", pool, f"--out={root / 'full'}"))
    ok(lamra_here("index", f"--model={model}", pool, f"--out={root / 'dim'}", at_dim))
    ok(lamra_here("retrieve", f"--model={model}", f"--index={root / 'full'}", queries, f"--out={root / 'runs_full'}"))
    dim_runs = f"--out={root / 'runs_dim'}"
    ok(lamra_here("retrieve", f"--model={model}", f"--index={root / 'dim'}", queries, dim_runs, at_dim, "--k=10"))
    return {"root": root, "data": data, "model": Path(model)}


def pool_items(built: dict[str, Path]) -> list:
    return [decode_candidate(s) for s in read_samples(expand_shards(str(built["data"] / "eval/test/global_pool")))]


def test_embed_at_a_dim_is_the_full_embedding_cut_and_normalised_again(tiny_backbone):
    full = load_retriever(tiny_backbone, module={}).eval()
    at_dim = load_retriever(tiny_backbone, module={"dim": DIM}).eval()
    assert (full.dim, full.full_dim, at_dim.dim, at_dim.full_dim) == (None, FULL, DIM, FULL)
    batch = full.collator().encode(ITEMS)  # a text, an image, both, a short text: one padded batch
    with torch.no_grad():
        whole, cut_rows = full.embed(batch), at_dim.embed(batch)
    assert whole.shape == (len(ITEMS), FULL) and cut_rows.shape == (len(ITEMS), DIM)
    np.testing.assert_allclose(cut_rows.numpy(), cut(whole.numpy()), atol=1e-6, rtol=0)
    np.testing.assert_allclose(np.linalg.norm(cut_rows.numpy(), axis=1), 1.0, atol=1e-6)
    assert (cut_rows - whole[:, :DIM]).abs().max() > 1e-2  # normalised again, not merely cut
    # The probe an index records goes through the same cut.
    np.testing.assert_allclose(at_dim.probe_embeddings(), cut(full.probe_embeddings()), atol=1e-6, rtol=0)
    assert torch.equal(truncate(whole, None), torch.nn.functional.normalize(whole, dim=-1))


def test_the_index_at_a_dim_holds_the_full_rows_cut_by_hand_and_records_its_dim(built):
    full, at_dim = EmbeddingIndex(built["root"] / "full"), EmbeddingIndex(built["root"] / "dim")
    assert (full.dim, at_dim.dim) == (FULL, DIM) and at_dim.ids == full.ids
    assert at_dim.embeddings.dtype == np.float16 and at_dim.embeddings.shape == (len(full), DIM)
    model = json.loads((built["root"] / "dim" / "index.json").read_text())["model"]
    assert (model["dim"], model["full_dim"], len(model["probe"][0])) == (DIM, FULL, DIM)
    assert {k: full.meta["model"][k] for k in ("dim", "full_dim")} == {"dim": None, "full_dim": FULL}
    # Each row is the full embedding cut and normalised again (float32 from the Python API at the full width, cut
    # by hand), to float16 precision.
    items = pool_items(built)
    whole = Retriever.from_checkpoint(built["model"]).encode_documents(
        [i.text for i in items], [i.image for i in items]
    )
    np.testing.assert_allclose(at_dim.embeddings.astype(np.float64), cut(whole), atol=1e-3, rtol=0)
    # ... and not the full index's rows merely cut.
    assert np.abs(at_dim.embeddings.astype(np.float64) - full.embeddings[:, :DIM].astype(np.float64)).max() > 1e-2


def test_retrieve_at_a_dim_ranks_by_the_queries_cut_by_hand(built):
    runs_full, runs_dim = built["root"] / "runs_full", built["root"] / "runs_dim"
    index = EmbeddingIndex(built["root"] / "dim")
    tasks = sorted(p.name for p in (runs_dim / "queries").iterdir())
    assert tasks
    for task in tasks:
        queries, whole = EmbeddingIndex(runs_dim / "queries" / task), EmbeddingIndex(runs_full / "queries" / task)
        assert queries.dim == DIM and queries.meta["model"]["dim"] == DIM and queries.ids == whole.ids
        # The queries at DIM are the full-width queries (same instructions) cut and normalised again.
        np.testing.assert_allclose(queries.embeddings.astype(np.float64), cut(whole.embeddings), atol=2e-3, rtol=0)
        # The global run ranks by float64 scores of the stored rows, equal scores by id (as by hand).
        run = read_run_file(runs_dim / "global" / f"{task}.run")
        c = unit_rows(index.embeddings, np.float64)
        assert run.qids == queries.ids
        for qid, q, ranked in zip(queries.ids, unit_rows(queries.embeddings, np.float64), run.ranked, strict=True):
            by_hand = sorted(range(len(index)), key=lambda r: (-float(c[r] @ q), index.ids[r]))[:10]
            assert ranked == [index.ids[r] for r in by_hand], (task, qid)


def test_the_python_api_at_a_dim_gives_the_pipelines_vectors_and_ranking(built):
    retriever = Retriever.from_checkpoint(built["model"], settings=ModelSettings(dim=DIM))
    index = EmbeddingIndex(built["root"] / "dim")
    items = pool_items(built)
    documents = retriever.encode_documents([i.text for i in items], [i.image for i in items])
    assert documents.shape == (len(index), DIM) and documents.dtype == np.float32
    assert np.array_equal(documents.astype(np.float16), index.embeddings)  # batched as the pipeline: to the bit
    row = next(r for r, i in enumerate(items) if i.text and i.image is None)
    hits = retriever.search(index, query_text=items[row].text, k=3)
    assert hits[0].id == index.ids[row] and hits[0].score == pytest.approx(1, abs=1e-3)
    # build_index at DIM writes the same rows and records the dim.
    built_here = retriever.build_index(
        [i.text for i in items], [i.image for i in items], [i.id for i in items], out=built["root"] / "api_dim"
    )
    assert np.array_equal(built_here.embeddings, index.embeddings)
    assert (built_here.meta["model"]["dim"], built_here.meta["model"]["full_dim"]) == (DIM, FULL)


@pytest.mark.parametrize(
    ("index", "dim", "needles"),
    [
        ("dim", None, ["built at dim 16 of a 64-d model", "--settings.dim 16", "this model embeds at 64"]),
        ("dim", 32, ["built at dim 16", "--settings.dim 16", "this model embeds at 32"]),
        ("full", DIM, ["built with 64-d embeddings (the model's full width", "without --settings.dim", "embeds at 16"]),
    ],
    ids=["full_model_on_a_dim_index", "another_dim", "dim_model_on_a_full_index"],
)
def test_an_index_is_searched_only_at_the_dim_it_was_built_at(built, index, dim, needles, tmp_path):
    """`retrieve`, `search` and the Python API refuse in one line, naming the dimensions, before encoding a query."""
    model, folder = built["model"], built["root"] / index
    given = [] if dim is None else [f"--settings.dim={dim}"]
    queries = f"--queries={built['data']}/eval/test/*_task*"
    clean_error(
        lamra_here("retrieve", f"--model={model}", f"--index={folder}", queries, f"--out={tmp_path}", *given), *needles
    )
    assert not (tmp_path / "queries").exists()
    clean_error(lamra_here("search", f"--model={model}", f"--index={folder}", "--text=a red apple", *given), *needles)
    retriever = Retriever.from_checkpoint(model, settings=ModelSettings(dim=dim))
    with pytest.raises(LamraError) as refused:
        retriever.search(folder, query_text="a red apple")
    assert "\n" not in str(refused.value) and all(n in str(refused.value) for n in needles), str(refused.value)


def test_a_dim_the_model_cannot_give_is_refused_in_one_line(built, tmp_path):
    model, pool = built["model"], f"--pool={built['data']}/eval/test/global_pool"
    for dim, needles in (
        (0, ["--settings.dim", "whole number >= 1", "got 0"]),
        (65, ["--settings.dim", "65", "at most 64"]),
    ):
        clean_error(
            lamra_here("index", f"--model={model}", pool, f"--out={tmp_path / 'out'}", f"--settings.dim={dim}"),
            *needles,
        )
        assert not (tmp_path / "out").exists()
    with pytest.raises(LamraError, match="at most 64"):
        Retriever.from_checkpoint(model, settings=ModelSettings(dim=100))
    runs = f"--runs={built['root'] / 'runs_full' / 'local'}"  # a reranker has no dim
    clean_error(
        lamra_here("rerank", f"--model={model}", runs, f"--out={tmp_path / 'rr'}", "--settings.dim=8"),
        "RerankModule",
        "'dim'",
    )


def test_settings_write_records_the_dim_so_every_tool_embeds_at_it(built, tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(built["model"], folder)  # the session's tiny backbone stays as it is
    ok(lamra_here("settings", f"--model={folder}", f"--settings.dim={DIM}", "--write"))
    assert json.loads((folder / SETTINGS_FILE).read_text())["init_args"]["dim"] == DIM
    retriever = Retriever.from_checkpoint(folder)
    assert retriever.module.dim == DIM
    hits = retriever.search(built["root"] / "dim", query_text="a red apple", k=2)  # the index built at DIM
    assert len(hits) == 2
    with pytest.raises(LamraError, match="built with 64-d embeddings"):
        retriever.search(built["root"] / "full", query_text="a red apple")
