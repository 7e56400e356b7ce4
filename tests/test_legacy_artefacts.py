"""Artefacts written by the code before the re-layout (commit 4ccdac6, `tests/fixtures/legacy_4ccdac6`) still load,
embed as that code embedded them and evaluate to the numbers it wrote."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from helpers import ROOT, lamra_here, ok, scalars
from lamra_pl.api import Retriever
from lamra_pl.formats.index import EmbeddingIndex
from lamra_pl.models.checkpoints import load_module
from lamra_pl.models.embedding import EmbeddingModule
from test_embedding import ITEMS

LEGACY = ROOT / "tests" / "fixtures" / "legacy_4ccdac6"
EXPECTED = np.load(LEGACY / "expected_embeddings.npz")
INSTRUCTION = "Find the picture of this shape."


@pytest.fixture(autouse=True)
def _at_the_root(monkeypatch):
    monkeypatch.chdir(ROOT)  # the fixture's artefacts name each other by paths relative to the repository root


@pytest.mark.parametrize(("name", "path"), [("checkpoint", "retriever.ckpt"), ("merged", "merged")])
def test_a_legacy_checkpoint_and_merged_folder_load_and_embed_identically(name, path):
    module = load_module(LEGACY / path)
    assert isinstance(module, EmbeddingModule)
    with torch.no_grad():
        embedded = module.embed(module.collator().encode(ITEMS)).numpy()
    np.testing.assert_allclose(embedded, EXPECTED[name], atol=1e-6, rtol=0)
    instructed = Retriever.from_checkpoint(LEGACY / path).encode(
        ["red circle", "a blue square"], instruction=INSTRUCTION
    )
    np.testing.assert_allclose(instructed, EXPECTED[f"{name}_texts_with_instruction"], atol=1e-6, rtol=0)


def test_a_legacy_checkpoint_merges_into_a_folder_that_embeds_as_it_did(tmp_path):
    ok(lamra_here("merge", f"--ckpt={LEGACY / 'retriever.ckpt'}", f"--out={tmp_path / 'merged'}"))
    module = load_module(tmp_path / "merged")
    with torch.no_grad():
        embedded = module.embed(module.collator().encode(ITEMS)).numpy()
    np.testing.assert_allclose(embedded, EXPECTED["checkpoint"], atol=1e-6, rtol=0)


def test_a_legacy_index_is_searched_and_its_runs_are_retrieved_identically(tmp_path):
    index = EmbeddingIndex(LEGACY / "index")
    retriever = Retriever.from_checkpoint(LEGACY / "retriever.ckpt")
    index.check_model(retriever.module.probe_embeddings())  # the index's probe is this model's
    item = next(i for i in index.items(list(range(len(index)))) if i["txt"] and not i["img"])
    assert retriever.search(index, query_text=item["txt"], k=1)[0].id == item["id"]
    queries = f"{LEGACY.relative_to(ROOT)}/data/eval/test/*_task*"
    model, runs = LEGACY.relative_to(ROOT) / "retriever.ckpt", tmp_path / "runs"
    retrieve = ("retrieve", f"--model={model}", f"--index={index.path}", f"--queries={queries}", f"--out={runs}")
    ok(lamra_here(*retrieve, "--k=10"))
    for pool in ("local", "global"):
        for old in sorted((LEGACY / "runs" / pool).glob("*.run")):
            assert (runs / pool / old.name).read_bytes() == old.read_bytes(), (pool, old.name)


@pytest.mark.parametrize("pool", ["local", "global"])
def test_a_legacy_run_folder_evaluates_identically(pool, tmp_path):
    runs = tmp_path / pool
    shutil.copytree(LEGACY / "runs" / pool, runs, ignore=shutil.ignore_patterns("events.*", "hparams.yaml", "results*"))
    proc = ok(lamra_here("evaluate", f"--runs={runs}"))
    old = json.loads((LEGACY / "runs" / pool / "results.json").read_text())
    new = json.loads((runs / "results.json").read_text())
    # The same numbers; each task now also names itself as M-BEIR does and carries its chance level.
    added = {"dataset_id", "task_id", "mbeir_name", "chance"}
    assert {t: {k: v for k, v in r.items() if k not in added} for t, r in new["tasks"].items()} == old["tasks"]
    assert all(set(r) == set(old["tasks"][t]) | added for t, r in new["tasks"].items())
    assert {k: v for k, v in new.items() if k != "tasks"} == {k: v for k, v in old.items() if k != "tasks"}
    assert new["tasks"] and "wrong_modality@10" in new["average"]
    # Logged at the training step of the checkpoint the index names (the old code logged at 0).
    step = torch.load(LEGACY / "retriever.ckpt", weights_only=True, map_location="cpu")["global_step"]
    assert step == 3 and f"step 3 (the step of {LEGACY.relative_to(ROOT)}/retriever.ckpt)" in proc.stdout
    logged = scalars(runs)
    assert logged and {points[0][0] for points in logged.values()} == {step}
    again = tmp_path / "again"
    shutil.copytree(runs, again, ignore=shutil.ignore_patterns("events.*", "hparams.yaml", "results*"))
    ok(lamra_here("evaluate", f"--runs={again}", "--step=11"))  # given: as given
    assert {points[0][0] for points in scalars(again).values()} == {11}


def test_the_report_reads_legacy_evaluation_runs(tmp_path):
    """Event files of the old code (final metrics at step 0, written with TensorBoard's experiment summary) are
    tabulated as they were, beside a new evaluation of the same rankings."""
    shutil.copytree(LEGACY / "runs" / "local", tmp_path / "old", ignore=shutil.ignore_patterns("*.run"))
    shutil.copytree(LEGACY / "runs" / "local", tmp_path / "new", ignore=shutil.ignore_patterns("events.*", "results*"))
    ok(lamra_here("evaluate", f"--runs={tmp_path / 'new'}"))
    ok(lamra_here("report", f"--runs={tmp_path}"))
    saved = json.loads((tmp_path / "report.json").read_text())
    assert set(saved) == {"old", "new"}
    want = json.loads((LEGACY / "runs" / "local" / "results.json").read_text())
    for run in ("old", "new"):
        assert saved[run]["status"] == "finished"
        for task, numbers in want["tasks"].items():
            for metric in ("R@1", "R@5", "R@10"):
                assert saved[run]["metrics"][f"{task}/{metric}"] == pytest.approx(numbers[metric], rel=1e-6)
    assert saved["old"]["metrics"] == saved["new"]["metrics"]


def test_earlier_class_paths_import_as_the_classes_that_replaced_them():
    import importlib

    import lamra_pl
    from lamra_pl.callbacks import FinalMetrics
    from lamra_pl.models.reranker import RerankModule

    assert importlib.import_module("lamra_pl.models.rerank").RerankModule is RerankModule
    assert importlib.import_module("lamra_pl.report").FinalMetrics is FinalMetrics
    assert lamra_pl.EmbeddingModule is EmbeddingModule and lamra_pl.RerankModule is RerankModule  # configs' names
