"""`lamra-pl fit|validate|test|predict`: LightningCLI over any LightningModule and DataModule by class path.

Imported only when one of these subcommands runs (Lightning takes seconds to import; `lamra-pl --help` and the
tools do not need it).
"""

from __future__ import annotations

from lightning.pytorch import LightningDataModule, LightningModule
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from lamra_pl.cli import OneLineErrors
from lamra_pl.errors import LamraError


class FitParser(OneLineErrors, LightningArgumentParser):
    """LightningCLI's parser, its errors raised for `lamra_pl.cli.main` to print as one line."""


class LamraCLI(LightningCLI):
    """LightningCLI over any LightningModule and DataModule by class path, which hands the DataModule the module's
    collator (`connect`), reports lamra-pl's own errors as themselves, and reads a `--ckpt_path` as data."""

    def _parse_ckpt_path(self) -> None:
        """LightningCLI merges a checkpoint's hyper-parameters into the config, and jsonargparse then instantiates
        whatever class paths they name. Here the checkpoint is first read as every checkpoint is
        (`lamra_pl.models.checkpoints.read_checkpoint`: weights_only, every class path it names allowed: lamra-pl's
        own or one your config names), and only then are a lamra-pl module's own arguments merged (migrated from
        earlier versions; trust_remote_code stays what your config says). Another module's checkpoint is checked
        and not merged; remote ones (s3://) are read by Lightning with weights_only."""
        subcommand = self.config.get("subcommand")
        ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if ckpt_path is None or str(ckpt_path) in ("last", "best", "hpc") or str(ckpt_path).startswith("registry"):
            return  # Lightning finds these itself and reads them through CheckpointWriter.load_checkpoint
        if "://" in str(ckpt_path) and not str(ckpt_path).startswith("file://"):
            return
        from lamra_pl.formats.checkpoint import class_paths, read
        from lamra_pl.models.checkpoints import MODULES, check_class_paths, checkpoint_arguments, class_path_of

        config = self.config[subcommand]
        path = str(ckpt_path).removeprefix("file://")
        yours = {class_path for _, class_path in class_paths(config.as_dict(), "config")}
        ckpt = read(path)  # once: the checks below and the arguments merged come from this one read
        hparams = ckpt.get("hyper_parameters") or {}
        if not isinstance(hparams, dict):
            raise LamraError(f"checkpoint {path}: 'hyper_parameters' is not a mapping")
        check_class_paths(dict(hparams), f"checkpoint {path}", "hyper_parameters", also=yours)
        if hparams.get("_class_path") not in MODULES:
            return  # a module built in Python, or one of your own: checked, its config is yours
        cls, args = checkpoint_arguments(ckpt, path, also=yours)
        backbone = args.get("backbone")
        if isinstance(backbone, dict):
            backbone.pop("trust_remote_code", None)
        model = config.get("model")
        named = model.get("class_path") if model is not None and hasattr(model, "get") else None
        class_path = named if named is not None and MODULES.get(named) is cls else class_path_of(cls)
        merged = {subcommand: {"model": {"class_path": class_path, "init_args": args}}}
        self.config = self.parser.parse_object(merged, self.config)

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
        connect = getattr(self.datamodule, "connect", None)
        collator = getattr(self.model, "collator", None)
        if connect is not None and collator is not None:
            connect(collator())


def lightning_cli(args: list[str] | None) -> LamraCLI:
    """`lamra-pl fit|validate|test|predict`."""
    return LamraCLI(
        LightningModule,
        LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        trainer_defaults={"plugins": [{"class_path": "lamra_pl.CheckpointWriter"}]},
        args=args,  # None: LightningCLI reads sys.argv itself
        parser_kwargs={"prog": "lamra-pl"},
        # The modules build their own optimizer (`model.init_args.optimizer`) with their LR schedule: LightningCLI's
        # `--optimizer`/`--lr_scheduler` would be a second way, and a broken one.
        auto_configure_optimizers=False,
        parser_class=FitParser,
    )


def _lamra_cause(err: BaseException | None) -> LamraError | None:
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, LamraError):
            return err
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None
