"""SIGTERM during ``predict`` stops at the next batch boundary (Lightning checks it only while training and
evaluating); the prediction writer keeps the completed batches and the CLI exits 143."""

from __future__ import annotations

import lightning.pytorch as pl
from lightning.pytorch.utilities.exceptions import SIGTERMException


class StopPredictOnSigterm(pl.Callback):
    """Raise Lightning's ``SIGTERMException`` after the batch that was running when SIGTERM arrived."""

    def on_predict_batch_end(self, trainer: pl.Trainer, *args) -> None:
        if trainer.received_sigterm:
            raise SIGTERMException
