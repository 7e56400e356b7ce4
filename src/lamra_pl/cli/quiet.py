"""The upstream noise `lamra-pl` filters: all of it is here, each filter with why it is safe.

`quiet_upstream()` runs when a subcommand starts (`lamra_pl.cli.run`), in every process of a run (DDP's processes
run the same command), before the libraries are imported. It filters warnings and log lines that other libraries
emit about their own code and that a user can do nothing about; it never filters lamra-pl's own warnings, which are
fixed where they arise instead (tests/test_quiet.py runs the tools with lamra-pl's warnings as errors). Lightning's
banners are not filtered here: a tool's Trainer runs without them (`lamra_pl.pipelines.predict.quiet_lightning`),
and `fit` keeps them. The Python API filters nothing: a program that imports lamra-pl keeps its own warning
settings.

Nothing heavy is imported here: `lamra-pl --help` must stay fast.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings

from lamra_pl.progress import is_terminal


def quiet_upstream() -> None:
    """Install the filters below (idempotent: a filter installed twice is kept once)."""
    # peft 0.21 reads transformers' `PreTrainedModel.is_gradient_checkpointing`, which transformers 5 deprecated in
    # favour of `is_activation_checkpointing` (the same value), on every LoRA model it wraps. Safe: the warning is
    # about peft's code; the value peft gets, and so what lamra-pl computes, is unchanged.
    warnings.filterwarnings(
        "ignore",
        message=r"`is_gradient_checkpointing` is deprecated",
        category=FutureWarning,
        module=r"transformers\.modeling_utils",
    )
    # Lightning's own pytree helper (used to flatten every batch and dataloader collection) builds torch's
    # `LeafSpec()`, which torch 2.14 deprecated. Safe: Lightning's code, whose result torch still computes the
    # same way; nothing of lamra-pl's calls it.
    warnings.filterwarnings(
        "ignore",
        message=r"`isinstance\(treespec, LeafSpec\)` is deprecated",
        category=FutureWarning,
        module=r"lightning\.pytorch\.utilities\._pytree",
    )
    # Lightning prints "💡 Tip: For seamless cloud logging ... try installing [litlogger]" (and litmodels) from
    # every Trainer. Safe: advertisements of optional cloud packages, no information about the run.
    tips = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    if _no_tips not in tips.filters:
        tips.addFilter(_no_tips)
    # transformers draws a per-tensor bar ("Loading weights", "Writing model shards") for every model it loads or
    # saves; in a log (stderr not a terminal) each leaves carriage-return frames, not lines. Safe: loading and saving
    # are seconds next to the tools' own work, which reports its progress (`lamra_pl.progress`). Set only when the
    # user has not set it, and read when huggingface_hub is first imported (after this).
    if not is_terminal(sys.stderr):
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


def _no_tips(record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith("💡 Tip")
