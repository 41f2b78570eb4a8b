"""Decoding outputs beside the predictions: a JSON report (metrics + decode statistics) and a live progress bar."""

from __future__ import annotations

import json
import logging

import lightning.pytorch as pl
from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.utilities import rank_zero_only

from atspeed.atomic import write_text_atomic
from atspeed.callbacks.predictions import output_path
from atspeed.preflight import check_new_file

log = logging.getLogger(__name__)


class DecodeReport(pl.Callback):
    """After ``predict``: write the module's ``results`` (Recall/NDCG, calls, acceptance, timing) as JSON."""

    def __init__(self, path: str | None = None, overwrite: bool = False) -> None:
        """
        Args:
            path: the JSON file (default: ``<trainer.default_root_dir>/report.json``), written atomically by rank 0
                when every request is decoded; with several processes its metrics and decode statistics are those
                of all of them (each request once), the numbers of a single-process run.
            overwrite: replace an existing report; by default a second predict into the same place stops first.
        """
        super().__init__()
        self.path = path
        self.overwrite = overwrite

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "predict":
            check_new_file(output_path(trainer, self.path, "report.json"), "DecodeReport.path", self.overwrite)

    @rank_zero_only
    def on_predict_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        results = getattr(pl_module, "results", None)
        if not results:
            return
        path = output_path(trainer, self.path, "report.json")
        write_text_atomic(path, json.dumps(results, indent=2) + "\n")
        log.info("wrote the decode report to %s", path)


class DecodeProgressBar(TQDMProgressBar):
    """The TQDM bar, with the module's running ``progress_metrics()`` (e.g. acceptance) shown while predicting."""

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        super().on_predict_batch_end(trainer, pl_module, outputs, batch, batch_idx, dataloader_idx)
        live = getattr(pl_module, "progress_metrics", None)
        if self.predict_progress_bar is not None and live is not None:
            self.predict_progress_bar.set_postfix({k: f"{v:.2f}" for k, v in live().items()}, refresh=False)
