"""Export the trained model in Hugging Face format, with its tokenizer and item index, for later stages.

``write_export`` is the one writer of that directory: the ``ExportHuggingFace`` callback calls it when fit ends, and
``python -m atspeed export`` (``atspeed.export_checkpoint``) when it turns a checkpoint into an export; both hand it
``plain_model``'s result. A model with LoRA is copied to the CPU and merged there, so the accelerator never holds a
second copy. Under DeepSpeed ZeRO-3 each rank holds only its partition of the parameters: the callback gathers them
one module at a time into rank 0's CPU copy (a collective: all ranks take part), and rank 0 alone writes.
"""

from __future__ import annotations

import json
import logging
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

import lightning.pytorch as pl
import torch
from peft import PeftModel
from transformers import PreTrainedModel

from atspeed.atomic import atomic_directory, check_replaceable
from atspeed.data.export_dir import INDEX_FILE, ExportMeta
from atspeed.errors import DataError
from atspeed.models.zero3 import cpu_copy, partitioned
from atspeed.preflight import check_output_dir

if TYPE_CHECKING:
    from atspeed.data.datamodule import RecDataModule

log = logging.getLogger(__name__)
KEY = "ExportHuggingFace.dirpath"


def plain_model(model: torch.nn.Module, keep: bool = True) -> PreTrainedModel | None:
    """The Hugging Face model to save from a trained ``model``, or None where ``keep`` is false: ``model`` itself when
    it is whole and has no LoRA; else a copy on the CPU (under ZeRO-3 gathered one module at a time, a collective every
    rank joins, ``keep`` on one rank) with LoRA merged into it there."""
    if not isinstance(model, PeftModel) and not partitioned(model):
        return model if keep else None
    copied = cpu_copy(model, keep)
    return copied.merge_and_unload() if isinstance(copied, PeftModel) else copied


def write_export(
    dirpath: str | Path, model: PreTrainedModel, dm: RecDataModule, global_step: int, key: str = KEY
) -> None:
    """``save_pretrained`` + tokenizer + ``index.json`` + ``atspeed.json`` into ``dirpath``, atomically (``key`` names
    the setting in the message when ``dirpath`` may not be replaced)."""
    prepared = dm.prepared
    hp = dm.hparams
    meta = ExportMeta(
        prompt=hp.prompt, max_history=hp.max_history, levels=prepared.index.levels, constraint=hp.constraint,
        dataset=prepared.data.name, split=hp.split, global_step=global_step, export_id=uuid.uuid4().hex,
    )  # fmt: skip
    with atomic_directory(dirpath, key) as tmp:
        model.save_pretrained(tmp)
        prepared.tokenizer.save_pretrained(tmp)
        (tmp / INDEX_FILE).write_text(json.dumps(prepared.index.to_mapping()), encoding="utf-8")
        meta.save(tmp)
    log.info("exported the model to %s", Path(dirpath).resolve())


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
        """Before training: the export must not replace the run's own checkpoints or logs, and can be written."""
        if stage != "fit":
            return
        check_replaceable(self.dirpath, KEY)
        check_output_dir(Path(self.dirpath).absolute().parent, KEY)  # the export is made beside it, then renamed
        export = Path(self.dirpath).resolve()
        ours = [Path(trainer.default_root_dir)]
        ours += [Path(cb.dirpath) for cb in trainer.checkpoint_callbacks if getattr(cb, "dirpath", None)]
        ours += [Path(logger.log_dir) for logger in trainer.loggers if getattr(logger, "log_dir", None)]
        for path in ours:
            if export == path.resolve() or export in path.resolve().parents:
                raise DataError(f"{KEY}: {self.dirpath} would replace this run's {path}; export beside it instead")

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """On every rank (ZeRO-3 gathers the parameters collectively); rank 0 writes."""
        if trainer.interrupted:
            return
        model = plain_model(pl_module.export_model(), keep=trainer.is_global_zero)
        if trainer.is_global_zero:
            write_export(self.dirpath, model, trainer.datamodule, trainer.global_step)
        # every rank returns from fit with the export written (the next stage of a pipeline may read it at once)
        trainer.strategy.barrier("ExportHuggingFace")
