"""A folder this project did not write (a released LamRA folder, a Qwen2-VL-Instruct download) is read with the
settings the user gives (`--settings.*`, `ModelSettings`), and with a one-line warning naming each default used
when the user gives none."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import AutoProcessor, Qwen2VLForConditionalGeneration

from conftest import png, shape_image
from helpers import lamra, lamra_here, ok
from lamra_pl.api import Retriever
from lamra_pl.formats.sample import encode_candidate
from lamra_pl.formats.settings import SETTINGS_FILE, ModelSettings
from lamra_pl.formats.shards import write_shards
from lamra_pl.testing.tiny import build_tiny_qwen2vl

LAMRA_ARCHITECTURE = "Qwen2VLRetForConditionalGeneration"  # the class name LamRA's released config.json gives
ITEMS = [
    ("c0", "a red circle on a white ground", None),
    ("c1", None, ("blue", "square", 112)),
    ("c2", "green", ("green", "triangle", 112)),
]
PROMPTS = {  # LamRA's prompts, written out here (not read from the project)
    "text": "{text}\nSummarize above sentence in one word: ",
    "image": "\nSummarize above image in one word: ",
    "image,text": "{text}\nSummarize above image and sentence in one word: ",
}


@pytest.fixture(scope="module")
def lamra_folder(tmp_path_factory) -> Path:
    """A tiny Qwen2-VL folder as LamRA's loader leaves it: `<emb>` in the tokenizer, the embedding matrix resized to
    the tokenizer, LamRA's architecture name in config.json, and no lamra-pl settings file."""
    root = tmp_path_factory.mktemp("lamra_style")
    base = build_tiny_qwen2vl(root / "base")
    processor = AutoProcessor.from_pretrained(base)
    processor.tokenizer.add_tokens(["<emb>"])
    model = Qwen2VLForConditionalGeneration.from_pretrained(base)
    model.resize_token_embeddings(len(processor.tokenizer))
    folder = root / "LamRA-Ret"
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    config["architectures"] = [LAMRA_ARCHITECTURE]
    (folder / "config.json").write_text(json.dumps(config))
    assert not (folder / SETTINGS_FILE).exists()
    return folder


def reference(folder: Path, text: str | None, image: tuple[str, str] | None) -> np.ndarray:
    """The hidden state before `<emb>` under plain 1-D positions, computed with transformers alone."""
    processor = AutoProcessor.from_pretrained(folder)
    model = Qwen2VLForConditionalGeneration.from_pretrained(folder, dtype=torch.float32).eval()
    modality = ",".join(m for m, present in (("image", image), ("text", text)) if present)
    content = ([{"type": "image"}] if image else []) + [{"type": "text", "text": PROMPTS[modality].format(text=text)}]
    chat = [
        {"role": "user", "content": content},
        {"role": "assistant", "content": [{"type": "text", "text": "<emb>."}]},
    ]
    rendered = processor.apply_chat_template(chat, tokenize=False)
    inputs = processor(text=[rendered], images=[shape_image(*image)] if image else None, return_tensors="pt")
    length = inputs["input_ids"].shape[1]
    positions = torch.arange(length).view(1, 1, -1).expand(3, 1, -1)  # the same 1-D position in all 3 mRoPE parts
    with torch.no_grad():
        states = model.model(**inputs, position_ids=positions, use_cache=False).last_hidden_state[0]
    emb = (inputs["input_ids"][0] == processor.tokenizer.convert_tokens_to_ids("<emb>")).nonzero()[0, 0]
    return F.normalize(states[emb - 1], dim=-1).numpy()


@pytest.fixture(scope="module")
def pool(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("pool") / "pool"
    samples = [
        encode_candidate(f"{i:04d}", id=cid, txt=text, image=png(shape_image(*image)) if image else None)
        for i, (cid, text, image) in enumerate(ITEMS)
    ]
    write_shards(samples, out, maxcount=10)
    return out


def test_index_with_rope_1d_reproduces_lamra_positions_and_warns_only_without_settings(lamra_folder, pool, tmp_path):
    expected = np.stack([reference(lamra_folder, text, image) for _, text, image in ITEMS])
    pixels = ["--settings.min_pixels=3136", "--settings.max_pixels=12544"]
    given = ok(
        lamra_here(
            "index",
            f"--model={lamra_folder}",
            f"--pool={pool}",
            f"--out={tmp_path / 'given'}",
            "--settings.rope=1d",
            "--settings.pooling=before_emb",
            "--settings.max_text_tokens=480",
            "--settings.system_prompt=default",
            *pixels,
        )
    )
    assert "no lamra-pl settings file" not in given.stderr
    vectors = np.load(tmp_path / "given" / "embeddings.npy").astype(np.float32)
    np.testing.assert_allclose(vectors, expected, atol=1e-3)  # the index stores float16
    # the Python API, in float32
    retriever = Retriever.from_checkpoint(
        lamra_folder,
        settings=ModelSettings(rope="1d", min_pixels=3136, max_pixels=12544, pooling="before_emb", max_text_tokens=480),
    )
    encoded = retriever.encode_documents(
        texts=[t for _, t, _ in ITEMS], images=[shape_image(*i) if i else None for _, _, i in ITEMS]
    )
    np.testing.assert_allclose(encoded, expected, atol=1e-5)
    # without the settings: the project's defaults (mRoPE), which give other vectors, and a warning naming them
    # (a subprocess: the warning as the command line prints it, not as pytest captures it)
    default = lamra(
        "index",
        f"--model={lamra_folder}",
        f"--pool={pool}",
        f"--out={tmp_path / 'default'}",
        env={"PYTHONWARNINGS": "default"},
    )
    ok(default)
    warning = [line for line in default.stderr.splitlines() if "no lamra-pl settings file" in line]
    assert len(warning) == 1, default.stderr[-2000:]
    for name in (
        "rope=model",
        "pooling=before_emb",
        "max_text_tokens=480",
        "min_pixels",
        "max_pixels",
        "system_prompt",
    ):
        assert name in warning[0]
    with_mrope = np.load(tmp_path / "default" / "embeddings.npy").astype(np.float32)
    given_vectors = np.load(tmp_path / "given" / "embeddings.npy").astype(np.float32)
    np.testing.assert_array_equal(with_mrope[0], given_vectors[0])  # text alone: mRoPE is 1-D
    assert np.abs(with_mrope[1:] - given_vectors[1:]).max() > 0  # images: the positions differ
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mrope = Retriever.from_checkpoint(lamra_folder).encode_documents(
            texts=[t for _, t, _ in ITEMS], images=[shape_image(*i) if i else None for _, _, i in ITEMS]
        )
    np.testing.assert_allclose(mrope[0], encoded[0], atol=1e-6)
    assert np.abs(mrope[1:] - encoded[1:]).max() > 5e-4  # in float32: far above rounding
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        Retriever.from_checkpoint(lamra_folder, settings=ModelSettings(rope="1d"))
    assert any("pooling=before_emb" in str(w.message) and "rope=" not in str(w.message) for w in caught)


def test_a_lamra_style_folder_loads_without_adding_or_resizing(lamra_folder):
    retriever = Retriever.from_checkpoint(
        lamra_folder,
        settings=ModelSettings(rope="1d", min_pixels=3136, max_pixels=12544, pooling="before_emb", max_text_tokens=480),
    )
    module = retriever.module
    tokenizer = module.processor.tokenizer
    saved = AutoProcessor.from_pretrained(lamra_folder).tokenizer
    assert len(tokenizer) == len(saved)  # <emb> was not added again
    rows = module.model.get_input_embeddings().weight
    reference_rows = Qwen2VLForConditionalGeneration.from_pretrained(lamra_folder).get_input_embeddings().weight
    assert rows.shape == reference_rows.shape  # not resized
    assert torch.equal(rows, reference_rows)


def test_a_setting_the_module_does_not_have_is_one_line(lamra_folder, tmp_path):
    from lamra_pl.api import Reranker
    from lamra_pl.errors import LamraError

    with pytest.raises(LamraError, match="no 'pooling' setting"):
        Reranker.from_checkpoint(lamra_folder, settings=ModelSettings(pooling="last_token"))


def test_settings_write_makes_a_foreign_folder_read_as_trained(lamra_folder, pool, tmp_path):
    import shutil

    folder = tmp_path / "LamRA-Ret"
    shutil.copytree(lamra_folder, folder)
    shown = ok(lamra_here("settings", f"--model={folder}", "--settings.rope=1d"))
    assert '"rope": "1d"' in shown.stdout and not (folder / SETTINGS_FILE).exists()  # without --write: printed only
    pixels = ["--settings.min_pixels=3136", "--settings.max_pixels=12544"]
    ok(lamra_here("settings", f"--model={folder}", "--settings.rope=1d", *pixels, "--write"))
    assert json.loads((folder / SETTINGS_FILE).read_text())["init_args"]["backbone"]["system_prompt"] == "default"
    assert (folder / SETTINGS_FILE).is_file()
    written = lamra(
        "index", f"--model={folder}", f"--pool={pool}", f"--out={tmp_path / 'index'}", env={"PYTHONWARNINGS": "default"}
    )
    ok(written)
    assert "no lamra-pl settings file" not in written.stderr
    given = ok(
        lamra_here(
            "index",
            f"--model={lamra_folder}",
            f"--pool={pool}",
            f"--out={tmp_path / 'given'}",
            "--settings.rope=1d",
            *pixels,
        )
    )
    assert given.returncode == 0
    np.testing.assert_array_equal(
        np.load(tmp_path / "index" / "embeddings.npy"), np.load(tmp_path / "given" / "embeddings.npy")
    )
    refused = lamra_here("settings", f"--model={folder}", "--kind=reranker")
    assert refused.returncode == 2 and "not a reranker" in refused.stderr


DEFAULT_TURN = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"  # Qwen2-VL's template writes it


def test_system_prompt_default_none_or_a_text(lamra_folder, pool, tmp_path):
    """`system_prompt`: the template's own system turn (Qwen2-VL's "You are a helpful assistant."), none at all, or
    a given text; the setting reaches every tool through the settings file and `--settings.system_prompt`."""
    from lamra_pl.errors import LamraError
    from lamra_pl.models.backbone import BackboneSpec, load_processor, render_chats

    chat = [
        {"role": "user", "content": [{"type": "text", "text": "a red circle"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "<emb>."}]},
    ]
    rendered = {
        prompt: render_chats(load_processor(BackboneSpec(str(lamra_folder), system_prompt=prompt)), [chat], False)[0]
        for prompt in ("default", "none", "Embed this.")
    }
    assert rendered["default"].startswith(DEFAULT_TURN)
    assert rendered["none"] == rendered["default"].replace(DEFAULT_TURN, "")
    assert rendered["Embed this."] == rendered["default"].replace(
        DEFAULT_TURN, "<|im_start|>system\nEmbed this.<|im_end|>\n"
    )
    settings = dict(rope="1d", min_pixels=3136, max_pixels=12544, pooling="before_emb", max_text_tokens=480)
    texts = [t for _, t, _ in ITEMS]
    images = [shape_image(*i) if i else None for _, _, i in ITEMS]
    vectors = {
        prompt: Retriever.from_checkpoint(
            lamra_folder, settings=ModelSettings(**settings, system_prompt=prompt)
        ).encode_documents(texts=texts, images=images)
        for prompt in ("default", "none")
    }
    assert np.abs(vectors["default"] - vectors["none"]).max() > 1e-3  # the system turn is read
    folder = tmp_path / "no-system"
    import shutil

    shutil.copytree(lamra_folder, folder)
    args = [f"--settings.{k}={v}" for k, v in settings.items()]
    ok(lamra_here("settings", f"--model={folder}", *args, "--settings.system_prompt=none", "--write"))
    ok(lamra_here("index", f"--model={folder}", f"--pool={pool}", f"--out={tmp_path / 'index'}"))
    indexed = np.load(tmp_path / "index" / "embeddings.npy").astype(np.float32)
    np.testing.assert_allclose(indexed, vectors["none"], atol=1e-3)  # the index stores float16
    refused = lamra_here("export", f"--model={folder}", f"--out={tmp_path / 'st'}", "--to=sentence-transformers")
    assert refused.returncode == 2 and "system_prompt 'none'" in refused.stderr, refused.stderr
    with pytest.raises(LamraError, match="refuses a system turn|cannot be cut out"):
        template = (
            "{% for m in messages %}{% if m.role == 'system' %}{{ raise_exception('no') }}{% endif %}{% endfor %}"
        )
        processor = load_processor(BackboneSpec(str(lamra_folder), system_prompt="none"))
        processor.chat_template = template
        render_chats(processor, [chat], False)
