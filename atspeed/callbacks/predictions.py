"""Write ``predict`` results as JSON lines (one request per line), atomically, at the end of the epoch."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import lightning.pytorch as pl
from lightning.pytorch.callbacks import BasePredictionWriter

from atspeed.atomic import write_text_atomic

log = logging.getLogger(__name__)


class JsonlPredictionWriter(BasePredictionWriter):
    """Each ``predict_step`` returns a list of JSON-serialisable dicts; all of them land in ``path``."""

    def __init__(self, path: str | None = None) -> None:
        """
        Args:
            path: output file (default: ``<trainer.default_root_dir>/predictions.jsonl``); with several processes,
                rank r writes ``<stem>.rank<r><suffix>``.
        """
        super().__init__(write_interval="epoch")
        self.path = path

    def write_on_epoch_end(self, trainer: pl.Trainer, pl_module, predictions, batch_indices) -> None:
        path = Path(self.path) if self.path else Path(trainer.default_root_dir) / "predictions.jsonl"
        if trainer.world_size > 1:
            path = path.with_name(f"{path.stem}.rank{trainer.global_rank}{path.suffix}")
        rows = [row for batch in predictions for row in batch]
        write_text_atomic(path, "".join(json.dumps(row) + "\n" for row in rows))
        log.info("wrote %d predictions to %s", len(rows), path)
