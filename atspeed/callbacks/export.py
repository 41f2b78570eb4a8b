"""Export the trained model in Hugging Face format, with its tokenizer and item index, for later stages."""

from __future__ import annotations

import json
import logging
import uuid
from pathlib import Path

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_only

from atspeed.atomic import atomic_directory, check_replaceable
from atspeed.data.export_dir import INDEX_FILE, META_FILE
from atspeed.errors import DataError

log = logging.getLogger(__name__)
KEY = "ExportHuggingFace.dirpath"


class ExportHuggingFace(pl.Callback):
    """At the end of ``fit``: ``save_pretrained`` + tokenizer + ``index.json`` + ``atspeed.json``, atomically."""

    def __init__(self, dirpath: str) -> None:
        """
        Args:
            dirpath: directory of the exported model, written whole when fit ends. An existing directory is
                replaced only if an earlier atspeed export wrote it; anything else there stops the run before training.
        """
        super().__init__()
        self.dirpath = dirpath

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Before training: the export must not replace the run's own checkpoints or logs."""
        if stage != "fit":
            return
        check_replaceable(self.dirpath, KEY)
        export = Path(self.dirpath).resolve()
        ours = [Path(trainer.default_root_dir)]
        ours += [Path(cb.dirpath) for cb in trainer.checkpoint_callbacks if getattr(cb, "dirpath", None)]
        ours += [Path(logger.log_dir) for logger in trainer.loggers if getattr(logger, "log_dir", None)]
        for path in ours:
            if export == path.resolve() or export in path.resolve().parents:
                raise DataError(f"{KEY}: {self.dirpath} would replace this run's {path}; export beside it instead")

    @rank_zero_only
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.interrupted:
            return
        dm = trainer.datamodule
        prepared = dm.prepared
        meta = {
            "prompt": dm.hparams.prompt,
            "max_history": dm.hparams.max_history,
            "levels": prepared.index.levels,
            "constraint": dm.hparams.constraint,
            "dataset": prepared.data.name,
            "split": dm.hparams.split,
            "global_step": trainer.global_step,
            "export_id": uuid.uuid4().hex,  # tells two exports apart (teacher data names the one it came from)
        }
        with atomic_directory(self.dirpath, KEY) as tmp:
            pl_module.export_model().save_pretrained(tmp)
            prepared.tokenizer.save_pretrained(tmp)
            (tmp / INDEX_FILE).write_text(json.dumps(prepared.index.to_mapping()), encoding="utf-8")
            (tmp / META_FILE).write_text(json.dumps(meta, indent=2), encoding="utf-8")
        log.info("exported the model to %s", Path(self.dirpath).resolve())
