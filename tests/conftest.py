"""Shared fixtures: tiny Qwen2-VL, LLaVA-Next and text-only checkpoints on disk and small real WebDataset shards."""

from __future__ import annotations

import io
import itertools
import json
import os
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageDraw

from lamra_pl.formats.sample import encode_record
from lamra_pl.formats.shards import write_shards
from lamra_pl.testing.tiny import build_tiny_causal_lm, build_tiny_llava_next, build_tiny_qwen2vl

COLORS = {"red": (220, 30, 30), "green": (30, 160, 60), "blue": (30, 60, 220), "yellow": (230, 210, 40)}
SHAPES = ("circle", "square", "triangle")


def shape_image(color: str, shape: str, size: int = 56) -> Image.Image:
    image = Image.new("RGB", (size, size), "white")
    draw = ImageDraw.Draw(image)
    box = (8, 8, size - 8, size - 8)
    fill = COLORS[color]
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    else:
        draw.polygon([(size // 2, 6), (6, size - 6), (size - 6, size - 6)], fill=fill)
    return image


def png(image: Image.Image) -> tuple[bytes, str]:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue(), "png"


def concepts() -> list[tuple[str, str]]:
    return list(itertools.product(COLORS, SHAPES))


def text_to_image_samples(repeat: int = 1, negatives: int = 0, tasks: int | None = None) -> list[dict]:
    """Name -> image queries over the 12 colour/shape concepts; negatives are same-shape other colours. With
    `tasks`, concept i's records carry task id i % tasks (else none)."""
    samples = []
    for r, (i, (color, shape)) in itertools.product(range(repeat), enumerate(concepts())):
        others = [c for c in COLORS if c != color][:negatives]
        samples.append(
            encode_record(
                f"q{r:02d}_{i:03d}",
                qid=f"q{r}:{i}",
                query={"txt": f"{color} {shape}"},
                instructions=["Find the picture of this shape."],
                positives=[{"id": f"img:{color}-{shape}", "image": png(shape_image(color, shape))}],
                negatives=[{"id": f"img:{o}-{shape}", "image": png(shape_image(o, shape))} for o in others],
                task_id=None if tasks is None else i % tasks,
            )
        )
    return samples


@pytest.fixture(scope="session")
def tiny_backbone(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_qwen2vl(tmp_path_factory.mktemp("backbone") / "tiny-qwen2vl")


@pytest.fixture(scope="session")
def tiny_llava_next(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_llava_next(tmp_path_factory.mktemp("backbone") / "tiny-llava-next")


@pytest.fixture(scope="session")
def tiny_text_lm(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A text-only causal LM (Qwen2): no processor, no vision."""
    return build_tiny_causal_lm(tmp_path_factory.mktemp("backbone") / "tiny-qwen2")


@pytest.fixture(scope="session")
def shape_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("shards") / "train"
    write_shards(text_to_image_samples(repeat=4, negatives=1), out, maxcount=12)
    return out


# `make test` runs two pytest workers (pytest-xdist), one per core: one thread each, then.
THREADS = 1 if os.environ.get("PYTEST_XDIST_WORKER") else 2


@pytest.fixture(autouse=True)
def _deterministic() -> None:
    torch.manual_seed(0)
    torch.set_num_threads(THREADS)


@pytest.fixture
def finding(request: pytest.FixtureRequest):
    """`finding(fault, outcome)`: a row of the README's Reliability table, appended to $LAMRA_FAULT_REPORT (set by
    `make reliability`) once the test has passed."""
    rows: list[dict[str, str]] = []
    where = {"file": request.node.path.name, "test": request.node.name}
    yield lambda fault, outcome: rows.append({"fault": fault, "outcome": outcome, **where})
    report = os.environ.get("LAMRA_FAULT_REPORT")
    if report and rows:
        with Path(report).open("a") as f:
            f.writelines(json.dumps(row) + "\n" for row in rows)
