"""bfloat16 on CPU: fit (bf16-mixed with a bfloat16 base, and bf16-true), index, retrieve, rerank and merge run in
bfloat16 and agree with float32 within stated tolerances (the GPU recipes' precision; every other test is float32).

Tolerances, from the tiny random model (bfloat16 keeps 8 bits of mantissa, ~3 significant digits):
- the first step's InfoNCE loss (before any update) within 5% of float32's;
- embeddings (index, retrieve's query vectors, a merged folder's) within cosine 0.99 of float32's, row by row;
- zero-shot judge scores (probabilities) within 0.05 of float32's.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

from helpers import lamra, lamra_here, ok, scalars
from lamra_pl.api import Retriever
from lamra_pl.recipes.mbeir import convert
from lamra_pl.testing.tiny import build_tiny_qwen2vl

FIXTURE = Path(__file__).parent / "fixtures" / "mbeir_tiny"
FITS = {  # name: the fit's precision arguments (bf16-mixed as the GPU recipes: a bfloat16 folder, loaded as such)
    "float32": ["--trainer.precision=32-true"],
    "bf16-mixed": ["--trainer.precision=bf16-mixed", "--model.init_args.backbone.dtype=bfloat16"],
    "bf16-true": ["--trainer.precision=bf16-true"],
}


@pytest.fixture(scope="module")
def fits(tiny_backbone, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bf16")
    data = root / "data"
    convert(str(FIXTURE), str(data))
    # the same random weights saved in bfloat16, as real Qwen2-VL folders are
    bf16_backbone = build_tiny_qwen2vl(root / "tiny-qwen2vl-bf16", dtype=torch.bfloat16)
    checkpoints = {"data": data}
    for name, precision in FITS.items():
        backbone = bf16_backbone if name == "bf16-mixed" else tiny_backbone
        ok(
            lamra(
                "fit",
                "-c",
                "experiments/tiny/stage2_instruct.yaml",
                f"--model.init_args.backbone.path={backbone}",
                f"--data.init_args.train_shards={data}/train",
                "--data.init_args.batch_size=4",
                "--data.init_args.num_workers=0",
                "--trainer.max_steps=2",
                "--trainer.log_every_n_steps=1",
                f"--trainer.logger.init_args.save_dir={root / 'runs'}",
                f"--trainer.logger.init_args.version={name}",
                *precision,
            )
        )
        checkpoints[name] = root / "runs" / "tiny_stage2" / name / "checkpoints" / "last.ckpt"
    return checkpoints


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.astype(np.float64), b.astype(np.float64)
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["bf16-mixed", "bf16-true"])
def test_fit_in_bfloat16_starts_where_float32_does(fits, name):
    runs = fits[name].parents[1]
    losses = scalars(runs)["train/loss"]
    reference = scalars(fits["float32"].parents[1])["train/loss"]
    assert all(math.isfinite(value) for _, value in losses) and len(losses) >= 2
    first, first_reference = losses[0][1], reference[0][1]
    assert abs(first - first_reference) <= 0.05 * abs(first_reference), (first, first_reference)
    assert fits[name].is_file()


@pytest.mark.slow
def test_index_retrieve_and_rerank_in_bfloat16_agree_with_float32(fits, tiny_backbone, tmp_path):
    data, model = fits["data"], fits["float32"]
    vectors, scores = {}, {}
    for precision in ("32-true", "bf16-mixed", "bf16-true"):
        out = tmp_path / precision
        trainer = f"--trainer.precision={precision}"
        ok(
            lamra_here(
                "index", f"--model={model}", f"--pool={data}/eval/test/global_pool", f"--out={out}/index", trainer
            )
        )
        ok(
            lamra_here(
                "retrieve",
                f"--model={model}",
                f"--index={out}/index",
                f"--queries={data}/eval/test/*_task*",
                f"--out={out}/eval",
                "--k=5",
                trainer,
            )
        )
        ok(
            lamra_here(
                "rerank",
                f"--model={tiny_backbone}",
                "--zero_shot",
                f"--runs={tmp_path / '32-true' / 'eval' / 'local'}",
                f"--out={out}/reranked",
                "--top_n=3",
                trainer,
            )
        )
        queries = sorted((out / "eval" / "queries").glob("*/embeddings.npy"))
        assert queries
        vectors[precision] = {
            "index": np.load(out / "index" / "embeddings.npy"),
            **{path.parent.name: np.load(path) for path in queries},
        }
        run_files = sorted((out / "reranked").glob("*.run"))
        assert run_files
        scores[precision] = {  # TREC run lines: qid Q0 doc rank score tag
            (path.name, *line.split()[0:3:2]): float(line.split()[4])
            for path in run_files
            for line in path.read_text().splitlines()
        }
    for precision in ("bf16-mixed", "bf16-true"):
        assert vectors[precision].keys() == vectors["32-true"].keys()
        for part, reference in vectors["32-true"].items():
            similarity = cosines(vectors[precision][part], reference)
            assert similarity.min() >= 0.99, (precision, part, similarity.min())
        assert scores[precision].keys() == scores["32-true"].keys()
        gaps = [abs(scores[precision][key] - value) for key, value in scores["32-true"].items()]
        assert max(gaps) <= 0.05, (precision, max(gaps))


@pytest.mark.slow
def test_merge_of_a_bfloat16_fit_is_bfloat16_and_embeds_as_its_checkpoint(fits, tmp_path):
    merged = tmp_path / "merged"
    ok(lamra_here("merge", f"--ckpt={fits['bf16-mixed']}", f"--out={merged}"))
    with safe_open(str(next(merged.glob("*.safetensors"))), "pt") as weights:
        dtypes = {str(weights.get_slice(name).get_dtype()) for name in weights.keys()}  # noqa: SIM118 (safe_open is not iterable)
    assert dtypes == {"BF16"}, dtypes
    texts = ["red circle", "a blue square on white", "green triangle"]
    from_merged = Retriever.from_checkpoint(merged).encode(texts=texts)
    from_checkpoint = Retriever.from_checkpoint(fits["bf16-mixed"]).encode(texts=texts)
    reference = Retriever.from_checkpoint(fits["float32"]).encode(texts=texts)
    assert cosines(from_merged, from_checkpoint).min() >= 0.99
    assert not np.allclose(from_checkpoint, reference, atol=1e-3)  # the two fits differ: the check above can fail
