"""`lamra-pl merge-models`: two copies of a fit merge to that fit; an average is linear in its weights (checkpoints,
model folders, both); `--lora factors` is the merge of the averaged A and B; task arithmetic is its formula; trained
extras (projector, LM head, latent-attention pooling, the temperature) are combined too; the output is a model folder
that `index` and `fit` read; what does not match is refused in one line."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForImageTextToText

from helpers import ROOT, clean_error, lamra_here, ok, scalars
from lamra_pl.api import Reranker, Retriever
from lamra_pl.formats.index import EmbeddingIndex
from lamra_pl.formats.settings import POOLING_FILE
from lamra_pl.models.backbone import BackboneSpec, LoraSpec
from lamra_pl.models.clip import CLIPModule
from lamra_pl.models.embedding import EmbeddingModule
from lamra_pl.models.reranker import RerankModule
from lamra_pl.pipelines.merge_models import RECORD_FILE
from lamra_pl.recipes.mbeir import convert
from test_checkpoints import PAIRS
from test_embedding import ITEMS
from test_fit_merge import tiny_fit

FIXTURE = Path(__file__).parent / "fixtures" / "mbeir_tiny"
TEXTS = ["a red circle", "a tiny blue square drawn on white paper", "x"]


@pytest.fixture(scope="module")
def fits(tiny_backbone, shape_shards, tmp_path_factory) -> dict[str, Path]:
    """Two real 3-step fits of the tiny stage-2 config (LoRA r 32) from different seeds, and their `merge` folders."""
    root = tmp_path_factory.mktemp("merge_models")
    found: dict[str, Path] = {}
    for name, seed in (("a", 1), ("b", 2)):
        run = tiny_fit(
            tiny_backbone,
            shape_shards,
            root / f"runs_{name}",
            "--trainer.max_steps=3",
            "--data.init_args.batch_size=6",
            f"--seed_everything={seed}",
        )
        found[name] = run / "checkpoints" / "last.ckpt"
        found[name.upper()] = root / name.upper()
        ok(lamra_here("merge", f"--ckpt={found[name]}", f"--out={found[name.upper()]}"))
    return found


def merge_models(out: Path, models: list[Path], *args: str) -> Path:
    ok(lamra_here("merge-models", f"--models={json.dumps([str(m) for m in models])}", f"--out={out}", *args))
    return out


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "model.safetensors")


def assert_combination(got: dict, parts: list[tuple[float, dict]], atol: float = 1e-6) -> None:
    """Every tensor of `got` is sum(w * tensors) of `parts`, and some tensor differs between the parts (so the check
    could fail)."""
    assert set(got) == set(parts[0][1])
    for name, tensor in got.items():
        expected = sum(w * part[name].double() for w, part in parts)
        torch.testing.assert_close(tensor.double(), expected, atol=atol, rtol=1e-6, msg=name)
    first, second = parts[0][1], parts[1][1]
    assert max((first[n] - second[n]).abs().max().item() for n in first) > 1e-3


def perturbed_checkpoint(module: torch.nn.Module, path: Path, seed: int) -> Path:
    """A checkpoint as `lamra-pl fit` writes one (trainable tensors, hyperparameters), its trainable tensors moved
    off their initial values by seeded noise."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=generator))
    trainable = module.trainable_names()
    state = {k: v for k, v in module.state_dict().items() if k in trainable}
    hparams = {"_class_path": f"lamra_pl.{type(module).__name__}", **dict(module.hparams)}
    torch.save({"state_dict": state, "hyper_parameters": hparams}, path)
    return path


def with_hparams(ckpt: Path, out: Path, **changes) -> Path:
    """`ckpt` with some hyper-parameters changed (a `backbone` mapping updates the stored one)."""
    loaded = torch.load(ckpt, weights_only=True)
    hparams = dict(loaded["hyper_parameters"])
    if "backbone" in changes:
        changes["backbone"] = {**hparams["backbone"], **changes["backbone"]}
    loaded["hyper_parameters"] = {**hparams, **changes}
    torch.save(loaded, out)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("lora", ["delta", "factors"])
def test_two_copies_of_one_fit_merge_to_that_fit(fits, lora, tmp_path):
    copy = tmp_path / "copy.ckpt"
    shutil.copy(fits["a"], copy)
    out = merge_models(tmp_path / "out", [fits["a"], copy], f"--lora={lora}")
    merged, reference = weights(out), weights(fits["A"])
    assert set(merged) == set(reference) and all(torch.equal(merged[k], reference[k]) for k in merged)
    # The same settings file `merge` writes (the temperature is fixed, so it is recorded as it was).
    assert (out / "lamra_pl.json").read_text() == (fits["A"] / "lamra_pl.json").read_text()
    record = json.loads((out / RECORD_FILE).read_text())
    assert record["weights"] == [0.5, 0.5] and record["method"] == "average" and record["lora"] == lora
    embedded = Retriever.from_checkpoint(out).encode(TEXTS, images=[None, None, ITEMS[1].image])
    np.testing.assert_array_equal(
        embedded, Retriever.from_checkpoint(fits["A"]).encode(TEXTS, images=[None, None, ITEMS[1].image])
    )
    np.testing.assert_allclose(
        embedded, Retriever.from_checkpoint(fits["a"]).encode(TEXTS, images=[None, None, ITEMS[1].image]), atol=1e-4
    )


@pytest.mark.slow
@pytest.mark.parametrize("inputs", ["checkpoints", "folders", "mixed"])
def test_an_average_is_linear_in_the_weights(fits, inputs, tmp_path):
    """merge(a, b, weights [w, 1 - w]) == w * a + (1 - w) * b, tensor by tensor: LoRA adapters as their merged
    weights (`--lora delta`), model folders as their full weights."""
    models = {
        "checkpoints": [fits["a"], fits["b"]],
        "folders": [fits["A"], fits["B"]],
        "mixed": [fits["a"], fits["B"]],
    }[inputs]
    out = merge_models(tmp_path / "out", models, "--weights=[0.3, 0.7]")
    assert_combination(weights(out), [(0.3, weights(fits["A"])), (0.7, weights(fits["B"]))])
    assert json.loads((out / RECORD_FILE).read_text())["models"] == [str(m) for m in models]


@pytest.mark.slow
def test_lora_factors_average_a_and_b_then_merge(fits, tiny_backbone, tmp_path):
    """`--lora factors`: W + s (0.3 B_a + 0.7 B_b)(0.3 A_a + 0.7 A_b) in every adapted layer, the base elsewhere;
    not the average of the deltas."""
    out = merge_models(tmp_path / "out", [fits["a"], fits["b"]], "--weights=[0.3, 0.7]", "--lora=factors")
    states = [torch.load(fits[n], weights_only=True)["state_dict"] for n in "ab"]
    base = dict(AutoModelForImageTextToText.from_pretrained(tiny_backbone, dtype=torch.float32).named_parameters())
    got = dict(AutoModelForImageTextToText.from_pretrained(out, dtype=torch.float32).named_parameters())
    scale = 64 / 32  # the tiny config's LoRA: alpha / r
    adapted = set()
    for key in states[0]:
        if ".lora_A." not in key:
            continue
        name = key.removeprefix("model.base_model.model.").replace(".lora_A.default", "")
        a = 0.3 * states[0][key] + 0.7 * states[1][key]
        b_key = key.replace("lora_A", "lora_B")
        b = 0.3 * states[0][b_key] + 0.7 * states[1][b_key]
        torch.testing.assert_close(got[name], base[name] + scale * b @ a, atol=1e-6, rtol=1e-6)
        adapted.add(name)
    assert len(adapted) == 14  # 7 targets x 2 layers
    assert all(torch.equal(got[n], base[n]) for n in set(got) - adapted)
    deltas = weights(merge_models(tmp_path / "delta", [fits["a"], fits["b"]], "--weights=[0.3, 0.7]"))
    factors = weights(out)
    assert max((deltas[k] - factors[k]).abs().max().item() for k in deltas) > 1e-4


@pytest.mark.slow
@pytest.mark.parametrize("inputs", ["checkpoints", "folders"])
def test_task_arithmetic_is_the_base_plus_weighted_task_vectors(fits, inputs, tiny_backbone, tmp_path):
    """base + 1.0 (a - base) + 0.5 (b - base): the base is the checkpoints' backbone by default, --base otherwise."""
    models, extra = (
        ([fits["a"], fits["b"]], [])
        if inputs == "checkpoints"
        else ([fits["A"], fits["B"]], [f"--base={tiny_backbone}"])
    )
    out = merge_models(tmp_path / "out", models, "--method=task_arithmetic", "--weights=[1.0, 0.5]", *extra)
    base = weights(tiny_backbone)
    assert_combination(weights(out), [(1.0, weights(fits["A"])), (0.5, weights(fits["B"])), (-0.5, base)])
    assert json.loads((out / RECORD_FILE).read_text())["base"] == str(tiny_backbone)


@pytest.mark.slow
def test_trained_extras_are_combined_too(tiny_backbone, tmp_path):
    """Adapters of different ranks, a trained projector, latent-attention pooling and a learned temperature: each
    averaged, and the folder loads with them."""
    checkpoints, folders = [], []
    for i, (rank, seed) in enumerate(((4, 1), (8, 2))):
        module = EmbeddingModule(
            BackboneSpec(tiny_backbone, gradient_checkpointing=False, train_projector=True),
            lora=LoraSpec(r=rank, alpha=2 * rank, dropout=0.0, targets=["q_proj", "v_proj"]),
            pooling="latent_attention",
            latents=8,
            latent_heads=2,
            learnable_temperature=True,
        )
        module.configure_model()
        checkpoints.append(perturbed_checkpoint(module, tmp_path / f"{i}.ckpt", seed))
        folders.append(tmp_path / f"merged{i}")
        ok(lamra_here("merge", f"--ckpt={checkpoints[-1]}", f"--out={folders[-1]}"))
    out = merge_models(tmp_path / "out", checkpoints, "--weights=[0.25, 0.75]")

    parts = [(0.25, weights(folders[0])), (0.75, weights(folders[1]))]
    assert_combination(weights(out), parts)
    assert any("visual.merger" in n and not torch.equal(parts[0][1][n], parts[1][1][n]) for n in parts[0][1])
    pools = [load_file(f / POOLING_FILE) for f in folders]
    assert_combination(load_file(out / POOLING_FILE), [(0.25, pools[0]), (0.75, pools[1])])
    scales = [torch.load(c, weights_only=True)["state_dict"]["log_logit_scale"].item() for c in checkpoints]
    settings = json.loads((out / "lamra_pl.json").read_text())["init_args"]
    assert settings["learnable_temperature"] is True
    assert settings["temperature"] == pytest.approx(math.exp(-(0.25 * scales[0] + 0.75 * scales[1])), rel=1e-6)
    assert settings["pooling"] == "latent_attention" and settings["latents"] == 8
    retriever = Retriever.from_checkpoint(out)
    assert retriever.module.log_logit_scale.item() == pytest.approx(0.25 * scales[0] + 0.75 * scales[1], abs=1e-6)
    vectors = retriever.encode(TEXTS)
    assert np.isfinite(vectors).all() and np.allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-5)

    # Adapters of different shapes have no factor average; the pooling weights have no base to subtract.
    clean_error(
        lamra_here(
            "merge-models",
            f"--models={json.dumps([str(c) for c in checkpoints])}",
            f"--out={tmp_path / 'f'}",
            "--lora=factors",
        ),
        "hyper_parameters.lora.r",
        "1.ckpt",
    )
    clean_error(
        lamra_here(
            "merge-models",
            f"--models={json.dumps([str(c) for c in checkpoints])}",
            f"--out={tmp_path / 't'}",
            "--method=task_arithmetic",
        ),
        POOLING_FILE,
        str(tiny_backbone),
    )


@pytest.mark.slow
@pytest.mark.parametrize("lora", [True, False], ids=["lora", "full_fine_tuning"])
def test_rerankers_and_their_lm_head_are_averaged(lora, tiny_backbone, tmp_path):
    checkpoints, folders = [], []
    for seed in (1, 2):
        module = RerankModule(
            BackboneSpec(tiny_backbone, gradient_checkpointing=False, train_lm_head=True),
            lora=LoraSpec(r=4, alpha=8, dropout=0.0) if lora else None,
        )
        module.configure_model()
        checkpoints.append(perturbed_checkpoint(module, tmp_path / f"{seed}.ckpt", seed))
        folders.append(tmp_path / f"merged{seed}")
        ok(lamra_here("merge", f"--ckpt={checkpoints[-1]}", f"--out={folders[-1]}"))
    out = merge_models(tmp_path / "out", checkpoints, "--weights=[0.6, 0.4]")
    parts = [(0.6, weights(folders[0])), (0.4, weights(folders[1]))]
    assert_combination(weights(out), parts)
    assert not torch.equal(parts[0][1]["lm_head.weight"], parts[1][1]["lm_head.weight"])
    assert json.loads((out / "lamra_pl.json").read_text())["class_path"] == "lamra_pl.models.reranker.RerankModule"
    scores = Reranker.from_checkpoint(out).score(PAIRS[0][0].text, [p[1].text for p in PAIRS])
    assert np.isfinite(scores).all() and ((scores > 0) & (scores < 1)).all()


@pytest.mark.slow
def test_the_merged_folder_indexes_and_trains_as_a_backbone(fits, shape_shards, tmp_path):
    out = merge_models(tmp_path / "out", [fits["a"], fits["b"]])
    data = tmp_path / "data"
    convert(str(FIXTURE), str(data))
    index = tmp_path / "index"
    ok(lamra_here("index", f"--model={out}", f"--pool={data}/eval/test/global_pool", f"--out={index}"))
    stored = EmbeddingIndex(index)
    retriever = Retriever.from_checkpoint(out)
    np.testing.assert_allclose(stored.meta["model"]["probe"], retriever.module.probe_embeddings(), atol=1e-6)
    hits = retriever.search(index, query_text="red circle", k=3)
    assert len(hits) == 3 and hits[0].score >= hits[-1].score
    run = tiny_fit(out, shape_shards, tmp_path / "runs", "--trainer.max_steps=2", "--data.init_args.batch_size=6")
    assert all(math.isfinite(v) for _, v in scalars(run)["train/loss"])


@pytest.mark.slow
def test_make_merge_models(fits, tmp_path):
    venv = Path(sys.executable).parent.parent
    proc = subprocess.run(
        [
            "make",
            "--no-print-directory",
            "-o",  # the environment exists: never reinstalled from here, whatever the files' times
            str(venv / ".installed-cpu"),
            "merge-models",
            f"VENV={venv}",
            f"MODELS=[{fits['a']}, {fits['B']}]",
            f"MERGED={tmp_path / 'out'}",
            "ARGS=--weights=[0.3,0.7]",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert_combination(weights(tmp_path / "out"), [(0.3, weights(fits["A"])), (0.7, weights(fits["B"]))])


def resized_backbone(backbone: Path, out: Path) -> Path:
    """`backbone` with 500 embedding rows instead of 512: the same config.json but for its vocabulary size."""
    model = AutoModelForImageTextToText.from_pretrained(backbone, dtype=torch.float32)
    model.resize_token_embeddings(500, mean_resizing=False)
    model.save_pretrained(out)
    for name in ("tokenizer.json", "tokenizer_config.json", "processor_config.json", "chat_template.jinja"):
        shutil.copy(backbone / name, out / name)
    return out


def clip_checkpoint(path: Path) -> Path:
    module = CLIPModule(str(ROOT / "experiments/clip/tiny_clip.json"))
    torch.save(
        {"state_dict": module.state_dict(), "hyper_parameters": {"clip_model": module.hparams["clip_model"]}}, path
    )
    return path


def refused_models(case: str, fits: dict[str, Path], tmp: Path) -> list[Path]:
    """The models of a refusal case: the two fits, one of them changed or replaced."""
    a, b = fits["a"], fits["b"]
    if case == "another_class":
        return [a, with_hparams(b, tmp / "x.ckpt", _class_path="lamra_pl.RerankModule")]
    if case == "another_pooling":
        return [a, with_hparams(b, tmp / "x.ckpt", pooling="last_token")]
    if case == "other_positions":
        return [a, with_hparams(b, tmp / "x.ckpt", backbone={"rope": "1d"})]
    if case == "no_instructions":
        return [fits["A"], with_hparams(b, tmp / "x.ckpt", instructions=False)]
    if case == "another_architecture":  # a model folder of another shape (hidden size 32)
        return [a, ROOT / "tests/fixtures/legacy_4ccdac6/merged"]
    if case == "other_shapes":  # the same config.json but for the vocabulary: found as the tensors load
        stored = torch.load(b, weights_only=True)["hyper_parameters"]["backbone"]["path"]
        resized = resized_backbone(Path(stored), tmp / "resized")
        return [a, with_hparams(b, tmp / "x.ckpt", backbone={"path": str(resized)})]
    if case == "a_clip_checkpoint":
        return [a, clip_checkpoint(tmp / "clip.ckpt")]
    if case == "missing":
        return [a, tmp / "nothing.ckpt"]
    if case == "factors_of_a_folder":
        return [a, fits["B"]]
    if case in ("task_arithmetic_of_folders_without_base", "a_checkpoint_as_base"):
        return [fits["A"], fits["B"]]
    return [a, b]


# case -> (arguments besides the models and OUT, what the one line names)
REFUSALS: dict[str, tuple[list[str], list[str]]] = {
    "another_class": ([], ["x.ckpt", "RerankModule", "EmbeddingModule", "one kind"]),
    "another_pooling": ([], ["x.ckpt", "pooling is 'last_token'", "'before_emb'"]),
    "other_positions": ([], ["x.ckpt", "backbone.rope is '1d'"]),
    "no_instructions": ([], ["x.ckpt", "instructions is False"]),
    "another_architecture": ([], ["legacy_4ccdac6/merged", "config.json", "text_config.hidden_size is 32"]),
    "other_shapes": ([], ["x.ckpt", "embed_tokens.weight", "(500, 64)", "(512, 64)"]),
    "a_clip_checkpoint": ([], ["clip.ckpt", "CLIPModule"]),
    "missing": ([], ["nothing.ckpt", "does not exist"]),
    "weights_not_summing_to_1": (["--weights=[0.5, 0.6]"], ["sum to 1.1", "task_arithmetic"]),
    "a_weight_too_few": (["--weights=[1.0]"], ["1 values for 2 models"]),
    "factors_of_task_arithmetic": (
        ["--lora=factors", "--method=task_arithmetic"],
        ["takes --lora delta"],
    ),
    "factors_of_a_folder": (["--lora=factors"], ["holds no LoRA adapter"]),
    "task_arithmetic_of_folders_without_base": (["--method=task_arithmetic"], ["needs --base"]),
    "a_base_for_an_average": ([f"--base={ROOT}"], ["--base", "an average has none"]),
    "a_checkpoint_as_base": (["--method=task_arithmetic", "--base=CKPT"], ["not a model folder", "lamra-pl merge"]),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", REFUSALS)
def test_what_does_not_match_is_refused_in_one_line(fits, case, tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)  # the legacy folder's relative paths
    args, needles = REFUSALS[case]
    models = refused_models(case, fits, tmp_path)
    args = [arg.replace("CKPT", str(fits["a"])) for arg in args]
    out = tmp_path / "out"
    proc = lamra_here("merge-models", f"--models={json.dumps([str(m) for m in models])}", f"--out={out}", *args)
    clean_error(proc, *needles)
    errors = [line for line in proc.stderr.splitlines() if "error" in line]
    assert len(errors) == 1 and proc.stderr.strip().endswith(errors[0]), proc.stderr  # (above it: progress lines)
    assert not out.exists() and not list(tmp_path.glob(".out*"))


def test_an_output_folder_with_files_is_refused(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    proc = lamra_here("merge-models", "--models=[a.ckpt, b.ckpt]", f"--out={tmp_path / 'out'}")
    clean_error(proc, "not an empty folder")
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"
