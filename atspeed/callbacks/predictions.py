"""Write ``predict`` results as JSON lines (one request per line): streamed batch by batch to ``<path>.partial``,
renamed to ``path`` when every request is done, so an interrupted decode keeps its completed batches.

With several processes each streams its own part (``<stem>.rank<r><suffix>``); when all are done, rank 0 merges them
into ``path`` atomically (each request once, in request order: the file of a single-process run) and removes them.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import IO

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import BasePredictionWriter

from atspeed.atomic import atomic_file
from atspeed.items.index import ItemIndex
from atspeed.preflight import check_new_file

log = logging.getLogger(__name__)
KEY = "JsonlPredictionWriter.path"


def prediction_rows(
    request_ids: torch.Tensor, items: torch.Tensor, scores: torch.Tensor, targets: list, index: ItemIndex
) -> list[dict]:
    """One JSON row per request: its top-K item ids (None where a slot holds no item), scores and ground truth.

    ``request_ids`` [B], ``items`` [B, K] item positions (``PrefixTrie.lookup`` of the decoded lists), ``scores``
    [B, K], ``targets`` B tuples of item positions.
    """
    return [
        {
            "request": int(rid),
            "items": [index.item_ids[i] if i >= 0 else None for i in row],
            "scores": [round(s, 6) for s in srow],
            "targets": [index.item_ids[t] for t in truth],
        }
        for rid, row, srow, truth in zip(request_ids.tolist(), items.tolist(), scores.tolist(), targets, strict=True)
    ]


def merge_parts(parts: list[Path], path: Path) -> int:
    """Write the rows of ``parts`` to ``path`` atomically in request order (the rows' ``request``), each request once
    (its row in the first part that holds it); then remove the parts. Returns the number of rows written."""
    missing = [str(part) for part in parts if not part.is_file()]
    if missing:
        raise FileNotFoundError(
            f"{KEY}: the parts {missing} of other processes are not visible to rank 0; with several nodes the path "
            "must be on a filesystem every node shares"
        )
    keyed = []
    for part in parts:
        with open(part, encoding="utf-8") as handle:
            keyed.extend((json.loads(line)["request"], line) for line in handle)
    keyed.sort(key=lambda pair: pair[0])  # stable: a repeated request keeps the row of its first part
    rows, last = 0, None
    with atomic_file(path) as tmp, open(tmp, "w", encoding="utf-8") as out:
        for request, line in keyed:
            if request != last:
                out.write(line)
                rows, last = rows + 1, request
        out.flush()
        os.fsync(out.fileno())
    for part in parts:
        part.unlink()
    return rows


def output_path(trainer: pl.Trainer, path: str | None, default_name: str) -> Path:
    """``path``, or ``<trainer.default_root_dir>/<default_name>``."""
    return Path(path) if path else Path(trainer.default_root_dir) / default_name


class JsonlPredictionWriter(BasePredictionWriter):
    """Each ``predict_step`` returns a list of JSON-serialisable dicts; all of them land in ``path``."""

    def __init__(self, path: str | None = None, overwrite: bool = False) -> None:
        """
        Args:
            path: output file (default: ``<trainer.default_root_dir>/predictions.jsonl``); with several processes,
                rank r writes ``<stem>.rank<r><suffix>``, and rank 0 merges these parts into ``path`` at the end
                (``path`` must be on a filesystem that every node shares).
            overwrite: replace an existing file at ``path``; by default a second predict into the same place stops
                before decoding.
        """
        super().__init__(write_interval="batch")
        self.path = path
        self.overwrite = overwrite
        self._handle: IO[str] | None = None
        self._rows = 0

    def _final(self, trainer: pl.Trainer) -> Path:
        return output_path(trainer, self.path, "predictions.jsonl")

    def _part(self, trainer: pl.Trainer, rank: int) -> Path:
        path = self._final(trainer)
        return path.with_name(f"{path.stem}.rank{rank}{path.suffix}")

    def _path(self, trainer: pl.Trainer) -> Path:
        """What this process writes: ``path``, or its part with several processes."""
        return self._part(trainer, trainer.global_rank) if trainer.world_size > 1 else self._final(trainer)

    def _partial(self, trainer: pl.Trainer) -> Path:
        path = self._path(trainer)
        return path.with_name(path.name + ".partial")

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "predict":
            check_new_file(self._final(trainer), KEY, self.overwrite)

    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        partial = self._partial(trainer)
        partial.parent.mkdir(parents=True, exist_ok=True)
        self._handle, self._rows = open(partial, "w", encoding="utf-8"), 0  # noqa: SIM115 (closed at the end)

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx):
        self._handle.write("".join(json.dumps(row) + "\n" for row in prediction))
        self._handle.flush()
        self._rows += len(prediction)

    def _close(self) -> None:
        if self._handle is not None:
            self._handle.flush()
            os.fsync(self._handle.fileno())
            self._handle.close()
            self._handle = None

    def on_predict_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._close()
        path = self._path(trainer)
        os.replace(self._partial(trainer), path)
        if trainer.world_size == 1:
            log.info("wrote %d predictions to %s", self._rows, path)
            return
        trainer.strategy.barrier("JsonlPredictionWriter")  # every part is complete
        if trainer.is_global_zero:
            parts = [self._part(trainer, rank) for rank in range(trainer.world_size)]
            rows = merge_parts(parts, self._final(trainer))
            log.info("wrote %d predictions of %d processes to %s", rows, len(parts), self._final(trainer))

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        if self._handle is not None:
            self._close()
            log.warning("predict stopped: the %d completed requests are in %s", self._rows, self._partial(trainer))
