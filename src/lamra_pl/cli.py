"""The `lamra-pl` command: LightningCLI subcommands (fit, validate, test, predict) and tool subcommands.

    lamra-pl fit -c experiments/lamra_ret/stage1_text.yaml [--model.backbone PATH] [--trainer.max_steps N]
    lamra-pl tiny-backbone --out checkpoints/tiny-qwen2vl
    lamra-pl merge --ckpt runs/stage1/version_0/checkpoints/last.ckpt --out checkpoints/stage1-merged

Errors in user input (paths, config keys, data) print as one line and exit with status 2.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from jsonargparse import auto_cli
from lightning.pytorch import LightningDataModule, LightningModule
from lightning.pytorch.cli import LightningCLI

import lamra_pl.data.datamodule
import lamra_pl.models.embedding  # noqa: F401
from lamra_pl.errors import LamraError


def tiny_backbone(
    out: str,
    hidden_size: int = 64,
    num_layers: int = 2,
    vocab_size: int = 512,
    vision_dim: int = 32,
    min_pixels: int = 56 * 56,
    max_pixels: int = 112 * 112,
    corpus: str | None = None,
    seed: int = 0,
) -> None:
    """Write a tiny randomly initialised Qwen2-VL checkpoint (for tests and the CPU demo).

    Args:
        out: output directory.
        hidden_size: language model width (the vision merger projects into it).
        num_layers: decoder layers.
        vocab_size: embedding rows; the byte-level BPE tokenizer is trained to leave a few spare.
        vision_dim: vision tower width.
        min_pixels: smallest image area the processor resizes to.
        max_pixels: largest image area the processor resizes to.
        corpus: optional text file (one text per line) to train the tokenizer on besides the prompts.
        seed: weight initialisation seed.
    """
    from lamra_pl.models.tiny import build_tiny_qwen2vl

    lines: list[str] = []
    if corpus is not None:
        if not Path(corpus).is_file():
            raise LamraError(f"corpus file {corpus!r} does not exist")
        lines = Path(corpus).read_text(encoding="utf-8").splitlines()
    path = build_tiny_qwen2vl(
        out,
        hidden_size=hidden_size,
        num_layers=num_layers,
        vocab_size=vocab_size,
        vision_dim=vision_dim,
        min_pixels=min_pixels,
        max_pixels=max_pixels,
        corpus=lines,
        seed=seed,
    )
    print(f"tiny Qwen2-VL written to {path}")


def merge(ckpt: str, out: str) -> None:
    """Merge a LoRA adapter into its base weights (float32) and save a full checkpoint in the base dtype.

    Args:
        ckpt: Lightning checkpoint written by `lamra-pl fit`.
        out: output directory (model, processor, chat template).
    """
    from lamra_pl.models.merge import merge as merge_checkpoint

    print(f"merged checkpoint written to {merge_checkpoint(ckpt, out)}")


def convert_mbeir(root: str, out: str, strict: bool = False, splits: list[str] | None = None) -> None:
    """Convert an M-BEIR folder to training shards, evaluation sets and the global pool.

    Args:
        root: the M-BEIR folder (query/, cand_pool/, qrels/, instructions/, images).
        out: output folder (train/, eval/<split>/, report.json).
        strict: stop at the first problem instead of skipping and counting.
        splits: evaluation splits to convert (default: test).
    """
    from data_recipes.mbeir import convert

    _report(convert, root, out, strict=strict, splits=tuple(splits or ["test"]))


def convert_nli(csv: str, out: str, strict: bool = False) -> None:
    """Convert SimCSE-style NLI triples (sent0,sent1,hard_neg) to text-only training shards.

    Args:
        csv: the CSV file.
        out: output folder (train/nli_task1/).
        strict: stop at the first bad row instead of skipping and counting.
    """
    from data_recipes.nli import convert

    _report(convert, csv, out, strict=strict)


def _report(convert: Callable[..., dict[str, Any]], *args: Any, **kwargs: Any) -> None:
    """Run a converter with its per-line warnings on stderr, then print its counts as JSON."""
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    print(json.dumps(convert(*args, **kwargs), indent=1))


TOOLS: dict[str, Callable[..., Any]] = {
    "tiny-backbone": tiny_backbone,
    "merge": merge,
    "convert-mbeir": convert_mbeir,
    "convert-nli": convert_nli,
}


class LamraCLI(LightningCLI):
    """LightningCLI with lamra-pl's defaults: any LightningModule/DataModule by class_path, config overwrite."""

    def instantiate_classes(self) -> None:
        try:
            super().instantiate_classes()
        except Exception as err:
            # jsonargparse reports a failing __init__ as "does not validate against any of the Union subtypes";
            # surface our own error (which names the bad path or value) instead.
            cause = _lamra_cause(err)
            if cause is None:
                raise
            raise cause from None


def _lamra_cause(err: BaseException | None) -> LamraError | None:
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, LamraError):
            return err
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None


def main(argv: Sequence[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        if args and args[0] in TOOLS:
            auto_cli(TOOLS[args[0]], args=args[1:], as_positional=False, prog=f"lamra-pl {args[0]}")
        else:
            LamraCLI(
                LightningModule,
                LightningDataModule,
                subclass_mode_model=True,
                subclass_mode_data=True,
                save_config_kwargs={"overwrite": True},
                args=None if argv is None else args,  # None: LightningCLI reads sys.argv itself
                parser_kwargs={"prog": "lamra-pl", "epilog": f"tool subcommands: {', '.join(TOOLS)}"},
            )
    except LamraError as err:
        print(f"lamra-pl: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
