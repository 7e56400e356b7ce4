"""The CLIP dual-encoder baseline: UniIR's score fusion, local weights only, and the retriever's own train/eval path."""

from __future__ import annotations

import json
import math
from pathlib import Path

import open_clip
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from conftest import shape_image
from helpers import ROOT, clean_error, lamra, lamra_here, ok, scalars
from lamra_pl.api import Retriever
from lamra_pl.errors import LamraError
from lamra_pl.formats.sample import Item
from lamra_pl.models.clip import CLIPModule
from lamra_pl.recipes.mbeir import convert

TINY_CLIP = str(ROOT / "experiments/clip/tiny_clip.json")
FIXTURE = Path(__file__).parent / "fixtures" / "mbeir_tiny"


@pytest.fixture(scope="module")
def clip() -> CLIPModule:
    torch.manual_seed(0)
    return CLIPModule(TINY_CLIP).eval()


def test_fusion_is_the_sum_of_the_normalised_image_and_text_embeddings(clip):
    red, blue = shape_image("red", "circle"), shape_image("blue", "square", size=80)
    items = [Item("t", text="a red circle"), Item("i", image=red), Item("it", text="make it blue", image=blue)]
    got = clip.embed(clip.collator().encode(items))

    # By hand, with open_clip's own tokenizer, transform and towers.
    model, tokenize, preprocess = clip.clip, open_clip.get_tokenizer("tiny_clip"), clip.preprocess
    with torch.no_grad():
        text = F.normalize(model.encode_text(tokenize(["a red circle", "make it blue"])), dim=-1)
        image = F.normalize(model.encode_image(torch.stack([preprocess(red), preprocess(blue)])), dim=-1)
    expected = torch.stack([text[0], image[0], F.normalize(image[1] + text[1], dim=-1)])
    torch.testing.assert_close(got.detach(), expected, atol=1e-6, rtol=0)
    # Not a tautology: the fused row is neither tower alone, and every row is a unit vector.
    assert (got[2] @ image[1]).item() < 0.999 and (got[2] @ text[1]).item() < 0.999
    torch.testing.assert_close(got.norm(dim=-1), torch.ones(3))
    # The dot product of two fused vectors is UniIR's summed score (up to the final normalisation).
    fused = image[1] + text[1]
    assert (fused @ fused).item() == pytest.approx(
        (image[1] @ image[1] + image[1] @ text[1] + text[1] @ image[1] + text[1] @ text[1]).item(), abs=1e-5
    )


def test_clip_at_a_matryoshka_dim_cuts_the_fused_embedding_and_normalises_it_again(clip):
    items = [Item("t", text="a red circle"), Item("it", text="make it blue", image=shape_image("blue", "square"))]
    torch.manual_seed(0)
    at_dim = CLIPModule(TINY_CLIP, dim=16).eval()
    at_dim.load_state_dict(clip.state_dict())
    assert (clip.full_dim, at_dim.full_dim, at_dim.dim) == (64, 64, 16)
    with torch.no_grad():
        whole, cut = clip.embed(clip.collator().encode(items)), at_dim.embed(at_dim.collator().encode(items))
    assert cut.shape == (2, 16)
    torch.testing.assert_close(cut, F.normalize(whole[:, :16], dim=-1), atol=1e-6, rtol=0)
    with pytest.raises(LamraError, match="at most 64"):
        CLIPModule(TINY_CLIP, dim=65)


def test_weights_come_from_a_local_file_and_nothing_else(clip, tmp_path):
    weights = {k: v.clone() for k, v in clip.clip.state_dict().items()}
    weights["text_projection"] = weights["text_projection"] + 1.0  # differs from any random init
    save_file(weights, tmp_path / "tiny.safetensors")
    loaded = CLIPModule(TINY_CLIP, checkpoint=str(tmp_path / "tiny.safetensors"))
    torch.testing.assert_close(loaded.clip.text_projection, weights["text_projection"])
    # A pretrained *tag* would be a download in open_clip: refused before open_clip sees it.
    with pytest.raises(LamraError, match="is not a file"):
        CLIPModule(TINY_CLIP, checkpoint="openai")
    with pytest.raises(LamraError, match="neither an open_clip model name nor a config"):
        CLIPModule("no-such-model")
    (tmp_path / "bad.json").write_text('{"embed_dim": 8}')
    with pytest.raises(LamraError, match="lacks the open_clip config keys"):
        CLIPModule(str(tmp_path / "bad.json"))


def test_clip_trains_and_is_evaluated_by_the_retrievers_path(tmp_path):
    """`lamra-pl fit` of the tiny CLIP config with validation Recall, then `index`, `retrieve`, `evaluate` and
    `search` on its checkpoint: the validation numbers equal the evaluation's (one scoring path)."""
    data = tmp_path / "data"
    convert(str(FIXTURE), str(data))
    ok(
        lamra(
            "fit",
            "-c",
            "experiments/tiny/clip.yaml",
            f"--data.init_args.train_shards={data}/train",
            f"--data.init_args.val_tasks={data}/eval/test/*_task*",
            "--data.init_args.batch_size=8",
            "--trainer.max_steps=4",
            "--trainer.log_every_n_steps=1",
            f"--trainer.logger.init_args.save_dir={tmp_path}",
        )
    )
    ckpt = next(tmp_path.rglob("last.ckpt"))
    logged = scalars(ckpt.parent.parent)
    losses = [v for _, v in logged["train/loss"]]
    assert losses and all(math.isfinite(v) for v in losses)
    assert "hp/average/R@5" in logged  # FinalMetrics, for the report

    index, runs = tmp_path / "index", tmp_path / "runs"
    ok(lamra_here("index", f"--model={ckpt}", f"--pool={data}/eval/test/global_pool", f"--out={index}"))
    ok(
        lamra_here(
            "retrieve", f"--model={ckpt}", f"--index={index}", f"--queries={data}/eval/test/*_task*", f"--out={runs}"
        )
    )
    ok(lamra_here("evaluate", f"--runs={runs / 'local'}"))
    local = json.loads((runs / "local" / "results.json").read_text())
    assert set(local["tasks"]) == {"emoji_task0", "emoji_task1", "emoji_task3", "emoji_task7"}
    for task, got in local["tasks"].items():
        for k in (1, 5, 10):
            assert logged[f"val/{task}/R@{k}"][-1][1] == pytest.approx(got[f"R@{k}"]), (task, k)
    hits = Retriever.from_checkpoint(ckpt).search(index, query_text="red apple", k=3)
    assert len(hits) == 3 and hits[0].score >= hits[-1].score
    # A CLIP checkpoint has nothing to merge: a clear error, not a LamRA-shaped failure.
    clean_error(lamra_here("merge", f"--ckpt={ckpt}", f"--out={tmp_path / 'merged'}"), "CLIPModule checkpoint")
