"""Keep interrupted training resumable: on any exception (Ctrl-C, SIGTERM, a crash) save ``last.ckpt``.

Lightning's own ``OnExceptionCheckpoint`` also makes every later ``fit`` resume silently; this one only
refreshes the checkpoint that ``--ckpt_path last`` picks, so resuming stays an explicit choice.
"""

from __future__ import annotations

import logging
from pathlib import Path

import lightning.pytorch as pl
from lightning.pytorch.callbacks import ModelCheckpoint

log = logging.getLogger(__name__)


class SaveLastOnException(pl.Callback):
    """Write the state after the last completed step to ``<checkpoint dir>/last.ckpt`` when fit is interrupted."""

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        if trainer.state.fn != "fit" or trainer.global_step == 0:
            return
        checkpoint = next((cb for cb in trainer.checkpoint_callbacks if isinstance(cb, ModelCheckpoint)), None)
        if checkpoint is None or checkpoint.dirpath is None:
            return
        path = Path(checkpoint.dirpath) / f"{checkpoint.CHECKPOINT_NAME_LAST}{checkpoint.FILE_EXTENSION}"
        trainer.save_checkpoint(path)
        log.warning("fit interrupted at step %d (%r): saved %s", trainer.global_step, exception, path)
