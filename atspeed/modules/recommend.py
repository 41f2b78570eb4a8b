"""Recommendation as a Lightning predict loop: decode top-K lists for the test users with a named decoder.

``python -m atspeed predict --config configs/<dataset>/decode.yaml`` loads the target (and the draft) exported by the
SFT stage, decodes every test request, and reports Recall/NDCG@K (torchmetrics) and decode statistics (target calls
per list, accepted depths per call, tokens per target call, time split into draft / verify / other), plus the wall time
per list; with ``compare_beam`` every batch is also decoded by the target's beam search (timed alike, in alternating
order), which gives the decoder's speed ratio over beam search measured in the same run. At the end the flat
``summary_metrics()`` go to every logger of the trainer (and tables to W&B).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from jsonargparse.typing import PositiveInt

from atspeed.callbacks.predictions import prediction_rows
from atspeed.data.datamodule import RecDataModule
from atspeed.data.export_dir import INDEX_FILE, ExportMeta, check_same_identifiers
from atspeed.data.json_file import read_json
from atspeed.decoding.checks import check_context, check_list_length
from atspeed.decoding.decoders import BoundDecoder, DecodeSettings
from atspeed.decoding.options import DEFAULT_DECODING, DecodeOptions
from atspeed.decoding.output import SUMMARY_KEYS, DecodeOutput, synced_now
from atspeed.errors import DataError
from atspeed.metrics.ranking import RankingMetrics
from atspeed.models.build import DType, load_model, model_config
from atspeed.modules.decode_tally import DecodeTally, gather_batches, merged_stats, speed_summary
from atspeed.tables import text_table
from atspeed.wandb_log import log_predict_tables

log = logging.getLogger(__name__)

SPEED_KEYS = ("ms_per_list", "beam_ms_per_list", "ratio_over_beam")  # of results["speed"], in summary_metrics()


class Recommender(pl.LightningModule):
    """Decode the datamodule's test requests with the target (and draft) of exported model directories."""

    # what summary_metrics() holds (patterns): the sweep runner checks a sweep's metric against them before any run
    LOGGED_METRICS = ("test/recall@*", "test/ndcg@*", *(f"decode/{key}" for key in (*SUMMARY_KEYS, *SPEED_KEYS)))

    def __init__(
        self,
        target: str,
        draft: str | None = None,
        decoding: DecodeOptions = DEFAULT_DECODING,
        eval_ks: Sequence[PositiveInt] = (1, 3, 5, 10, 20),
        dtype: DType = "float32",
        compare_beam: bool = False,
    ) -> None:
        """
        Args:
            target: directory of the target exported by the SFT stage (weights, tokenizer, index.json).
            draft: directory of the draft (same tokenizer and index); needed by the decoders that draft.
            decoding: the decoder and its settings (K, N, gamma, budget, seed): ``DecodeOptions``.
            eval_ks: K of Recall@K / NDCG@K (each at most decoding.num_beams).
            dtype: torch dtype of both models' weights (bfloat16 on a GPU).
            compare_beam: also decode every batch with the target's beam search (same K, trie and target) and report
                ``speed.ratio_over_beam`` = beam search's ms per list / the decoder's (> 1: the decoder is faster).
                The two run one after the other on each batch, in alternating order from batch to batch (so drift in
                the machine's speed falls on both). Only the decoder's lists are returned and scored.
                ``speed.ms_per_list`` is reported either way (``atspeed.decoding.result.DecodeResult``: whole calls,
                each process's first batch an untimed warm-up unless it is its only one; with several processes
                the slowest process's wall time over all the lists).
        """
        super().__init__()
        self.save_hyperparameters()
        self.decoding = decoding
        if max(eval_ks) > decoding.num_beams:
            raise ValueError(
                f"model.eval_ks: K = {max(eval_ks)} exceeds model.decoding.num_beams = {decoding.num_beams}"
            )
        self.drafts = decoding.spec.needs_draft
        if self.drafts and draft is None:
            raise ValueError(f"model.draft: decoder {decoding.decoder} needs a draft model directory")
        self.meta = ExportMeta.load(target)
        if self.drafts:
            check_same_identifiers(target, draft)
        self.settings: DecodeSettings | None = None  # in setup: the index's levels, the tokenizer's pad id
        self.target_model: torch.nn.Module | None = None
        self.draft_model: torch.nn.Module | None = None
        self.metrics = RankingMetrics(eval_ks, prefix="test/")
        self.tally = DecodeTally()
        self.results: dict[str, Any] = {}
        self.decoder: BoundDecoder | None = None
        self.beam: BoundDecoder | None = None

    @property
    def dm(self) -> RecDataModule:
        return self.trainer.datamodule

    def setup(self, stage: str) -> None:
        """Before any weights load: same identifiers as the target, prompts that fit both contexts, K <= items; the
        decoders' settings, built once."""
        hp, prepared = self.hparams, self.dm.prepared
        if prepared.index.to_mapping() != read_json(Path(hp.target) / INDEX_FILE, INDEX_FILE):
            raise DataError(f"data: the item index differs from {hp.target}/{INDEX_FILE}; set data.model_dir")
        check_list_length(self.decoding.num_beams, len(prepared.index), "model.decoding.num_beams")
        longest, levels = self.dm.longest_prompt(), self.meta.levels
        check_context(model_config(hp.target), longest, levels)
        if self.drafts:
            check_context(model_config(hp.draft), longest, levels, "draft")
        self.settings = self.decoding.settings(levels, prepared.tokenizer.pad_token_id)

    def configure_model(self) -> None:
        if self.target_model is not None:
            return
        hp = self.hparams
        self.target_model = load_model(hp.target, hp.dtype)
        if self.drafts:
            self.draft_model = load_model(hp.draft, hp.dtype)

    def on_predict_start(self) -> None:
        generator = torch.Generator(device=self.device).manual_seed(self.settings.seed)
        trie = self.dm.prepared.trie.on(self.device)
        name = self.decoding.decoder
        self.decoder = BoundDecoder(name, self.target_model, trie, self.settings, self.draft_model, generator)
        if self.hparams.compare_beam:
            self.beam = BoundDecoder("beam", self.target_model, trie, self.settings)
        self.metrics.reset()
        self.tally = DecodeTally()

    def _decode(self, batch: dict) -> DecodeOutput:
        """The decoder's output on the batch, tallied with each decoder's wall time; with compare_beam beam search
        runs on the same batch, first on odd batches and second on even ones."""
        input_ids, attention_mask = batch["input_ids"], batch["attention_mask"]
        runs = {"decoder": self.decoder} | ({"beam": self.beam} if self.beam is not None else {})
        outputs, seconds = {}, {}
        for name in self.tally.order(list(runs)):
            start = synced_now(input_ids.device)
            outputs[name] = runs[name](input_ids, attention_mask)
            seconds[name] = synced_now(input_ids.device) - start
        self.tally.add(batch["request_ids"], outputs["decoder"].stats, seconds)
        return outputs["decoder"]

    def predict_step(self, batch: dict, batch_idx: int) -> list[dict]:
        prepared = self.dm.prepared
        out = self._decode(batch)
        items = prepared.trie.on(out.sequences.device).lookup(out.sequences).cpu()  # [B, K]
        self.metrics.update_lists(items, batch["targets"], batch["request_ids"])
        return prediction_rows(batch["request_ids"], items, out.scores.cpu(), batch["targets"], prepared.index)

    def progress_metrics(self) -> dict[str, float]:
        """Running decode statistics of this process for the progress bar."""
        local = self.tally.local_stats()
        if local is None:
            return {}
        summary = local.summary(self.settings.levels)
        return {"calls/list": summary["target_calls_per_list"], "accepted": summary["mean_accepted_depth"]}

    def on_predict_epoch_end(self) -> None:
        """The results of every process (each request once): the same on every rank, as of a single-process run."""
        hp, options = self.hparams, self.decoding.as_dict()
        ranks = gather_batches(self.tally.batches)
        merged = merged_stats(ranks)
        metrics = {k: float(v) for k, v in self.metrics.compute().items()} if merged else {}
        self.results = {
            "decoder": options.pop("decoder"),
            "target": hp.target,
            "draft": hp.draft if self.drafts else None,
            "settings": options,
            "metrics": metrics,
            "decode": merged.summary(self.settings.levels) if merged else {},
            "accepted_histogram": merged.histogram(self.settings.gamma) if merged else [],
            "speed": speed_summary(ranks),
        }
        if self.trainer.is_global_zero:  # the results of all processes: one table
            self._print_table()
        self._log_summary()

    def _print_table(self) -> None:
        results = self.results
        speed = {key: value for key, value in results["speed"].items() if key in SPEED_KEYS}
        rows = results["metrics"] | results["decode"] | speed
        lines = [[name, f"{value:.4f}"] for name, value in rows.items()]
        if self.drafts and results["decode"]:
            lines.append(["accepted depths", str(results["accepted_histogram"])])
        log.info("decoded with %s:\n%s", self.decoding.decoder, text_table(["metric", "value"], lines))

    def summary_metrics(self) -> dict[str, float]:
        """The results as flat numbers: the ranking metrics under their own names (``test/recall@10``, ...), every
        decode statistic as ``decode/<key>`` and the speed as ``decode/ms_per_list``, ``decode/beam_ms_per_list``,
        ``decode/ratio_over_beam`` (the last two with compare_beam); empty until predict ends."""
        if not self.results:
            return {}
        out = dict(self.results["metrics"])
        decode = self.results["decode"] | {k: v for k, v in self.results["speed"].items() if k in SPEED_KEYS}
        numbers = {k: v for k, v in decode.items() if isinstance(v, int | float) and not isinstance(v, bool)}
        return out | {f"decode/{key}": float(value) for key, value in numbers.items()}

    def _log_summary(self) -> None:
        """``summary_metrics()`` to every logger of the trainer (predict has no ``self.log``); W&B also gets tables."""
        if not self.trainer.is_global_zero or not self.results["metrics"]:
            return
        step = self.trainer.global_step
        for logger in self.trainer.loggers:
            logger.log_metrics(self.summary_metrics(), step=step)
        histogram = self.results["accepted_histogram"] if self.drafts else None
        log_predict_tables(self.trainer.loggers, self._table_row(), histogram, step)
        for logger in self.trainer.loggers:
            logger.save()

    def _table_row(self) -> dict:
        """The decode-statistics row of W&B: the settings that apply to the decoder, then ``summary_metrics()``."""
        o, spec = self.decoding.as_dict(), self.drafts
        budget = str(o["budget"]).lower() if spec else None  # one type in the column: "none", "auto" or "20"
        settings = {"decoder": o["decoder"], "K": o["num_beams"], "N": o["draft_beams"] if spec else None,
                    "gamma": o["gamma"] if spec else None, "budget": budget}  # fmt: skip
        return settings | self.summary_metrics()
