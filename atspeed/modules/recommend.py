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
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from jsonargparse.typing import NonNegativeInt, PositiveInt

from atspeed.callbacks.predictions import prediction_rows
from atspeed.data.datamodule import RecDataModule
from atspeed.data.export_dir import INDEX_FILE, ExportMeta, check_same_identifiers
from atspeed.data.json_file import read_json
from atspeed.decoding.decoders import (
    SPECULATIVE,
    BoundDecoder,
    DecoderName,
    DecodeSettings,
    check_context,
    check_list_length,
    check_settings,
)
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
        decoder: DecoderName = "spec_strict",
        num_beams: PositiveInt = 20,
        draft_beams: PositiveInt = 40,
        gamma: PositiveInt = 3,
        budget: NonNegativeInt | Literal["auto"] | None = None,
        eval_ks: Sequence[PositiveInt] = (1, 3, 5, 10, 20),
        dtype: DType = "float32",
        seed: int = 0,
        compare_beam: bool = False,
    ) -> None:
        """
        Args:
            target: directory of the target exported by the SFT stage (weights, tokenizer, index.json).
            draft: directory of the draft (same tokenizer and index); needed by the speculative decoders.
            decoder: beam (the target's beam search), spec_strict (lossless), spec_relaxed, hf_beam (HF generate),
                beam_sample (the target's sampling beam search, seeded), spec_relaxed (the paper's relaxed
                verification; seeded), spec_relaxed_exact (speculative, keeps beam_sample's distribution exactly;
                seeded), beam_sample_keyed (the target's stochastic beam search on noise keyed by the seed: K items
                drawn without replacement), spec_keyed (speculative, returns beam_sample_keyed's lists exactly).
            num_beams: K, the length of each list.
            draft_beams: N, draft beams per step (speculative decoders; at least K).
            gamma: draft steps per target call (speculative decoders).
            budget: M, drafted nodes the target verifies per call, the draft's best (null: all gamma x N; 0: plain
                beam steps); "auto" plans each call's M from the measured forward costs and the acceptance observed
                so far. Strict decoding returns the beam search's lists whatever M is.
            eval_ks: K of Recall@K / NDCG@K (each at most num_beams).
            dtype: torch dtype of both models' weights (bfloat16 on a GPU).
            seed: seed of the relaxed decoder's sampling.
            compare_beam: also decode every batch with the target's beam search (same K, trie and target) and report
                ``speed.ratio_over_beam`` = beam search's wall time / the decoder's (> 1: the decoder is faster). The
                two run one after the other on each batch, in alternating order from batch to batch (so drift in the
                machine's speed falls on both); the first batch is an untimed warm-up unless it is the only one.
                Only the decoder's lists are returned and scored. ``speed.ms_per_list`` (the decoder's wall time per
                list, whole calls) is reported either way; with several processes it is the slowest process's wall
                time over all the lists (the job's throughput), and each process's first batch is its warm-up.
        """
        super().__init__()
        self.save_hyperparameters()
        check_settings(decoder, DecodeSettings(num_beams, 1, draft_beams, gamma, seed=seed, budget=budget))
        if max(eval_ks) > num_beams:
            raise ValueError(f"model.eval_ks: K = {max(eval_ks)} exceeds model.num_beams = {num_beams}")
        if decoder in SPECULATIVE and draft is None:
            raise ValueError(f"model.draft: decoder {decoder} needs a draft model directory")
        self.meta = ExportMeta.load(target)
        if draft is not None and decoder in SPECULATIVE:
            check_same_identifiers(target, draft)
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

    @property
    def settings(self) -> DecodeSettings:
        hp = self.hparams
        pad = self.dm.prepared.tokenizer.pad_token_id
        levels = self.meta.levels
        return DecodeSettings(hp.num_beams, levels, hp.draft_beams, hp.gamma, pad, hp.seed, hp.budget)

    def setup(self, stage: str) -> None:
        """Before any weights load: same identifiers as the target, prompts that fit both contexts, K <= items."""
        hp, prepared = self.hparams, self.dm.prepared
        if prepared.index.to_mapping() != read_json(Path(hp.target) / INDEX_FILE, INDEX_FILE):
            raise DataError(f"data: the item index differs from {hp.target}/{INDEX_FILE}; set data.model_dir")
        check_list_length(hp.num_beams, len(prepared.index), "model.num_beams")
        longest, levels = self.dm.longest_prompt(), self.meta.levels
        check_context(model_config(hp.target), longest, levels)
        if hp.decoder in SPECULATIVE:
            check_context(model_config(hp.draft), longest, levels, "draft")

    def configure_model(self) -> None:
        if self.target_model is not None:
            return
        hp = self.hparams
        self.target_model = load_model(hp.target, hp.dtype)
        if hp.decoder in SPECULATIVE:
            self.draft_model = load_model(hp.draft, hp.dtype)

    def on_predict_start(self) -> None:
        hp = self.hparams
        generator = torch.Generator(device=self.device).manual_seed(hp.seed)
        trie = self.dm.prepared.trie.on(self.device)
        self.decoder = BoundDecoder(hp.decoder, self.target_model, trie, self.settings, self.draft_model, generator)
        if hp.compare_beam:
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
        summary = local.summary(self.meta.levels)
        return {"calls/list": summary["target_calls_per_list"], "accepted": summary["mean_accepted_depth"]}

    def on_predict_epoch_end(self) -> None:
        """The results of every process (each request once): the same on every rank, as of a single-process run."""
        hp = self.hparams
        ranks = gather_batches(self.tally.batches)
        merged = merged_stats(ranks)
        metrics = {k: float(v) for k, v in self.metrics.compute().items()} if merged else {}
        self.results = {
            "decoder": hp.decoder,
            "target": hp.target,
            "draft": hp.draft if hp.decoder in SPECULATIVE else None,
            "settings": {k: hp[k] for k in ("num_beams", "draft_beams", "gamma", "budget")},
            "metrics": metrics,
            "decode": merged.summary(self.meta.levels) if merged else {},
            "accepted_histogram": merged.histogram(hp.gamma) if merged else [],
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
        if self.hparams.decoder in SPECULATIVE and results["decode"]:
            lines.append(["accepted depths", str(results["accepted_histogram"])])
        log.info("decoded with %s:\n%s", self.hparams.decoder, text_table(["metric", "value"], lines))

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
        histogram = self.results["accepted_histogram"] if self.hparams.decoder in SPECULATIVE else None
        log_predict_tables(self.trainer.loggers, self._table_row(), histogram, step)
        for logger in self.trainer.loggers:
            logger.save()

    def _table_row(self) -> dict:
        """The decode-statistics row of W&B: the settings that apply to the decoder, then ``summary_metrics()``."""
        hp = self.hparams
        spec = hp.decoder in SPECULATIVE
        budget = str(hp.budget).lower() if spec else None  # one type in the column: "none", "auto" or "20"
        settings = {"decoder": hp.decoder, "K": hp.num_beams, "N": hp.draft_beams if spec else None,
                    "gamma": hp.gamma if spec else None, "budget": budget}  # fmt: skip
        return settings | self.summary_metrics()
