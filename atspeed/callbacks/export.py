"""Export the trained model in Hugging Face format, with its tokenizer and item index, for later stages."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_only

from atspeed.atomic import atomic_directory
from atspeed.data.export_dir import INDEX_FILE, META_FILE

log = logging.getLogger(__name__)


class ExportHuggingFace(pl.Callback):
    """At the end of ``fit``: ``save_pretrained`` + tokenizer + ``index.json`` + ``atspeed.json``, atomically."""

    def __init__(self, dirpath: str) -> None:
        """
        Args:
            dirpath: directory of the exported model; replaced whole when the export is complete.
        """
        super().__init__()
        self.dirpath = dirpath

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
        }
        with atomic_directory(self.dirpath) as tmp:
            pl_module.export_model().save_pretrained(tmp)
            prepared.tokenizer.save_pretrained(tmp)
            (tmp / INDEX_FILE).write_text(json.dumps(prepared.index.to_mapping()), encoding="utf-8")
            (tmp / META_FILE).write_text(json.dumps(meta, indent=2), encoding="utf-8")
        log.info("exported the model to %s", Path(self.dirpath).resolve())
