"""``--summary.path FILE``: the run's final metrics as one JSON object, what a W&B run's summary would hold.

Every key the run logged (``trainer.callback_metrics``: training, validation and test metrics, their last value)
and, after ``predict``, the module's ``summary_metrics()`` (ranking metrics and decode statistics, which predict
cannot ``self.log``). The offline sweep runner (``python -m atspeed sweep``) reads a run's metric from this file;
W&B's own agent reads it from the run's W&B summary instead.
"""

from __future__ import annotations

import json
import logging
import math

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_only

from atspeed.atomic import write_text_atomic

log = logging.getLogger(__name__)


def logged_metrics(trainer: pl.Trainer) -> dict[str, float]:
    """The scalars logged so far (last values)."""
    return {name: float(value) for name, value in trainer.callback_metrics.items() if value.numel() == 1}


def final_metrics(trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, float]:
    """The logged scalars (last values) and the module's ``summary_metrics()`` where it has one, finite ones only."""
    found = logged_metrics(trainer)
    extra = getattr(pl_module, "summary_metrics", None)
    if callable(extra):
        found.update({name: float(value) for name, value in extra().items()})
    return {name: value for name, value in sorted(found.items()) if math.isfinite(value)}


class MetricsSummary(pl.Callback):
    """At the end of fit, validate, test or predict (not when interrupted): write ``final_metrics`` to ``path``."""

    def __init__(self, path: str | None = None) -> None:
        """
        Args:
            path: the JSON file, written atomically by rank 0 (metrics are already reduced over ranks); null (the
                default) writes nothing.
        """
        super().__init__()
        self.path = path
        self._trainer: pl.Trainer | None = None
        self._restored: dict[str, float] = {}

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._trainer = trainer

    def state_dict(self) -> dict:
        """Saved in checkpoints: a fit resumed after its last validation (even after its last step) still reports
        the metrics logged before the interruption."""
        current = logged_metrics(self._trainer) if self._trainer is not None else {}
        return {"metrics": {**self._restored, **current}}

    def load_state_dict(self, state_dict: dict) -> None:
        self._restored = dict(state_dict.get("metrics", {}))

    @rank_zero_only
    def _write(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.path is None or trainer.interrupted:
            return
        metrics = {**self._restored, **final_metrics(trainer, pl_module)}
        write_text_atomic(self.path, json.dumps(dict(sorted(metrics.items())), indent=2) + "\n")
        log.info("wrote the run's final metrics to %s", self.path)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._write(trainer, pl_module)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.state.fn == "validate":
            self._write(trainer, pl_module)

    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._write(trainer, pl_module)

    def on_predict_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._write(trainer, pl_module)
