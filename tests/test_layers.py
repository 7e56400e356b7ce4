"""The layers of `src/lamra_pl` point down only: every module's imports (lazy ones included) are parsed and checked
against LAYERS, the rules written once, here."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from helpers import ROOT

SRC = ROOT / "src"
# Package or module -> its layer. A module may import modules of lower layers and of its own package; nothing of a
# higher layer, nor of another package of its own layer (so `data` and `models` stand side by side).
LAYERS: dict[str, int] = {
    "lamra_pl.errors": 0,
    "lamra_pl.files": 0,
    "lamra_pl.progress": 0,  # progress bars and log lines
    "lamra_pl.formats": 1,  # every on-disk contract
    "lamra_pl.ranking": 2,  # search, metrics, fusion: arrays and files
    "lamra_pl.callbacks": 2,  # training policies
    "lamra_pl.strategies": 2,
    "lamra_pl.data": 3,  # DataModules, streams, evaluation items
    "lamra_pl.models": 3,  # modules, backbone, pooling, losses, inputs, checkpoints
    "lamra_pl.pipelines": 4,  # the command-line jobs
    "lamra_pl.api": 4,
    "lamra_pl.tools": 4,  # grid, report
    "lamra_pl.recipes": 4,  # raw data -> shards
    "lamra_pl.testing": 4,  # tiny checkpoints
    "lamra_pl.cli": 5,
    "lamra_pl.__main__": 6,
    "lamra_pl": 6,  # the package's own __init__: its public names are loaded lazily, by name
}


# (module, what it may import against the rules) with why: compatibility aliases of class paths that files written by
# earlier versions name, imported lazily where the class used to be.
ALIASES: dict[tuple[str, str], str] = {
    ("lamra_pl.files", "lamra_pl.formats.checkpoint"): "lamra_pl.files.AtomicCheckpointIO in older run configs",
}


def unit(module: str) -> str:
    """The LAYERS entry a module belongs to (its package, or itself)."""
    parts = module.split(".")
    for n in range(len(parts), 0, -1):
        if ".".join(parts[:n]) in LAYERS:
            return ".".join(parts[:n])
    raise KeyError(f"{module} is in no layer: add its package to LAYERS")


def local_names() -> set[str]:
    """Top-level names that are this repository's folders and test modules, never importable from the library."""
    folders = {p.name for p in ROOT.iterdir() if p.is_dir() and not p.name.startswith(".") and p.name != "src"}
    return folders | {p.stem for p in (ROOT / "tests").rglob("*.py")}


def imports(source: str) -> list[str]:
    names = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                names.append("." * node.level + (node.module or ""))
            elif node.module != "__future__":
                names.append(node.module or "")
    return names


def violations(module: str, source: str) -> list[str]:
    """What is wrong with `module`'s imports."""
    found = []
    own = unit(module)
    for name in imports(source):
        top = name.split(".")[0]
        if name.startswith("."):
            found.append(f"{module} imports {name!r} relatively: name the module")
        elif top in local_names():
            found.append(f"{module} imports {name!r}, a folder or test module outside the package")
        elif top == "lamra_pl":
            target = unit(name)
            if target == own or (module, name) in ALIASES:
                continue
            if LAYERS[target] > LAYERS[own]:
                found.append(f"{module} (layer {LAYERS[own]}) imports {name} (layer {LAYERS[target]}): upwards")
            elif LAYERS[target] == LAYERS[own]:
                found.append(f"{module} imports {name}: {own} and {target} stand side by side")
    return found


def modules() -> list[tuple[str, Path]]:
    found = []
    for path in sorted((SRC / "lamra_pl").rglob("*.py")):
        parts = path.relative_to(SRC).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found.append((name, path))
    return found


@pytest.mark.parametrize(("module", "path"), modules(), ids=lambda x: x if isinstance(x, str) else "")
def test_every_import_points_down(module, path):
    assert violations(module, path.read_text()) == []


def test_the_rules_catch_each_kind_of_wrong_import():
    assert violations("lamra_pl.formats.index", "from lamra_pl.ranking.search import search")  # upwards
    assert violations("lamra_pl.formats.index", "def f():\n    import lamra_pl.models.backbone\n")  # lazily, too
    assert violations("lamra_pl.data.datamodule", "from lamra_pl.models.embedding import EmbeddingModule")
    assert violations("lamra_pl.models.embedding", "from lamra_pl.data.stream import TrainStream")  # side by side
    assert violations("lamra_pl.pipelines.evaluate", "from lamra_pl.tools.report import table")
    assert violations("lamra_pl.recipes.mbeir", "import experiments.benchmarks.train_step")  # a top-level folder
    assert violations("lamra_pl.cli", "from helpers import lamra")  # a test module
    assert violations("lamra_pl.testing.tiny", "from tests.conftest import png")
    assert violations("lamra_pl.models.pooling", "from . import backbone")
    assert not violations("lamra_pl.models.embedding", "from lamra_pl.models.pooling import pooling_index")
    assert not violations("lamra_pl.pipelines.encode", "from lamra_pl.formats.index import EmbeddingIndex")


def test_every_command_is_a_function_of_a_layer_below_the_cli():
    from lamra_pl.cli import COMMANDS

    for name, (target, _) in COMMANDS.items():
        module = target.split(":")[0]
        assert LAYERS[unit(module)] < LAYERS["lamra_pl.cli"], name


def test_the_readme_layout_names_every_layer():
    readme = (ROOT / "README.md").read_text()
    layout = readme[readme.index("## Layout") :]
    for unit_name in LAYERS:
        if unit_name in ("lamra_pl", "lamra_pl.__main__"):
            continue
        leaf = unit_name.rsplit(".", 1)[1]
        is_package = (SRC / unit_name.replace(".", "/")).is_dir()
        assert f"  {leaf}{'/' if is_package else '.py'}" in layout, unit_name
