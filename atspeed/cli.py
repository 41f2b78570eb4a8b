"""``python -m atspeed fit|validate|test|predict --config FILE``: the LightningCLI entry point.

Configs are OmegaConf-flavoured YAML (interpolation allowed), several ``--config`` files merge left to
right, and dotted overrides such as ``--trainer.max_steps 10`` come last. Every run gets a checkpoint
callback (``checkpoint.*``; ``last.ckpt`` every ``checkpoint.every_n_train_steps`` steps) and an
interrupted fit refreshes ``last.ckpt`` on its way out, so ``fit ... --ckpt_path last`` resumes from the
latest completed step. Checkpoints load with ``weights_only=True`` by default.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import torch
from jsonargparse.typing import NonNegativeInt, PositiveFloat, PositiveInt
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningCLI

import atspeed.modules.recommend
import atspeed.modules.target_sft  # noqa: F401
from atspeed.callbacks.checkpoint import SaveLastOnException
from atspeed.data.datamodule import EvalSpec, RecDataModule
from atspeed.data.item_index import SemanticIdSpec
from atspeed.errors import DataError
from atspeed.models.build import LoraSpec, ModelSpec

# Config dataclasses travel in checkpoint hyper-parameters; allow them through torch.load(weights_only=True).
torch.serialization.add_safe_globals(
    [ModelSpec, LoraSpec, SemanticIdSpec, EvalSpec, PositiveInt, NonNegativeInt, PositiveFloat]
)

TRAINER_DEFAULTS = {
    "logger": {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": "runs"}},
}


class AtspeedCLI(LightningCLI):
    """LightningCLI with atspeed's data module, forced resumable checkpoints and one-line config errors."""

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.add_lightning_class_args(SaveLastOnException, "save_on_exception")
        parser.set_defaults({"checkpoint.save_last": True, "checkpoint.every_n_train_steps": 100})
        if "weights_only" in parser.get_defaults():
            parser.set_defaults({"weights_only": True})

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        if config.checkpoint.dirpath is None:
            root = config.trainer.default_root_dir or "."
            config.checkpoint.dirpath = str(Path(root) / "checkpoints")

    def instantiate_classes(self) -> None:
        try:
            super().instantiate_classes()
        except (DataError, ValueError, TypeError) as err:
            self.parser.error(str(err))


def _show_atspeed_logs() -> None:
    """atspeed's own INFO messages (dataset sizes, collisions resolved, exports) go to stderr."""
    logger = logging.getLogger("atspeed")
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("[atspeed] %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)


def main(args: list[str] | None = None, run: bool = True) -> AtspeedCLI:
    """Run the CLI (``args`` default to ``sys.argv[1:]``); data errors end with one message and exit code 2."""
    _show_atspeed_logs()
    try:
        return AtspeedCLI(
            datamodule_class=RecDataModule,
            subclass_mode_model=True,
            parser_kwargs={"parser_mode": "omegaconf"},
            save_config_kwargs={"overwrite": True},
            trainer_defaults=TRAINER_DEFAULTS,
            args=args,
            run=run,
        )
    except DataError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from err
