"""Recommendation as a Lightning predict loop: decode top-K lists for the test users with a named decoder.

``python -m atspeed predict --config configs/<dataset>/decode.yaml`` loads the target (and the draft) exported by the
SFT stage, decodes every test request, and reports Recall/NDCG@K (torchmetrics) and decode statistics (target calls
per list, accepted depths per call, tokens per target call, time split into draft / verify / other), plus the wall time
per list; with ``compare_beam`` every batch is also decoded by the target's beam search (timed alike, in alternating
order), which gives the decoder's speed ratio over beam search measured in the same run. At the end the flat
``summary_metrics()`` go to every logger of the trainer (and tables to W&B).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from jsonargparse.typing import NonNegativeInt, PositiveInt

from atspeed.callbacks.predictions import prediction_rows
from atspeed.data.datamodule import RecDataModule
from atspeed.data.export_dir import INDEX_FILE, check_same_identifiers, read_export
from atspeed.decoding.decoders import (
    SPECULATIVE,
    BoundDecoder,
    DecoderName,
    DecodeSettings,
    check_context,
    check_list_length,
    check_settings,
)
from atspeed.decoding.output import SUMMARY_KEYS, DecodeOutput, DecodeStats, synced_now
from atspeed.errors import DataError
from atspeed.metrics.ranking import RankingMetrics
from atspeed.models.build import DType, load_model, model_config
from atspeed.wandb_log import log_predict_tables

log = logging.getLogger(__name__)

SPEED_KEYS = ("ms_per_list", "beam_ms_per_list", "ratio_over_beam")  # of results["speed"], in summary_metrics()


class SpeedTally:
    """Wall seconds of each decoder ("decoder", and "beam" with compare_beam) summed over the predict batches.

    The first batch is kept apart as a warm-up: it alone pays each decoder's one-time work (the shared prompt
    header's keys and values, the cost model of budget="auto", lazy kernel and allocator set-up), which would
    otherwise weigh on short runs. Its time counts only when it was the only batch.
    """

    def __init__(self) -> None:
        self.first: tuple[dict[str, float], int] | None = None
        self.seconds: dict[str, float] = {}
        self.lists = 0
        self.batches = 0  # added so far, the warm-up included

    def order(self, names: list[str]) -> list[str]:
        """The run order of the next batch: as given on even batches, reversed on odd ones."""
        return names[::-1] if self.batches % 2 else names

    def add(self, seconds: dict[str, float], lists: int) -> None:
        self.batches += 1
        if self.first is None:
            self.first = (seconds, lists)
            return
        for name, value in seconds.items():
            self.seconds[name] = self.seconds.get(name, 0.0) + value
        self.lists += lists

    def summary(self) -> dict[str, float | int | bool]:
        """ms_per_list (and beam_ms_per_list, ratio_over_beam = beam time / decoder time: > 1 when faster)."""
        if self.first is None:
            return {}
        seconds, lists = (self.seconds, self.lists) if self.lists else self.first
        out: dict[str, float | int | bool] = {"ms_per_list": 1e3 * seconds["decoder"] / lists}
        if "beam" in seconds:
            out["beam_ms_per_list"] = 1e3 * seconds["beam"] / lists
            out["ratio_over_beam"] = seconds["beam"] / seconds["decoder"] if seconds["decoder"] > 0 else float("nan")
        return out | {"timed_lists": lists, "warmup_excluded": bool(self.lists)}


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
                beam_sample (the target's sampling beam search, seeded), spec_relaxed (speculative, keeps
                beam_sample's distribution exactly; seeded).
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
                list, whole calls) is reported either way; times are this process's (rank 0's report under DDP).
        """
        super().__init__()
        self.save_hyperparameters()
        check_settings(decoder, DecodeSettings(num_beams, 1, draft_beams, gamma, seed=seed, budget=budget))
        if max(eval_ks) > num_beams:
            raise ValueError(f"model.eval_ks: K = {max(eval_ks)} exceeds model.num_beams = {num_beams}")
        if decoder in SPECULATIVE and draft is None:
            raise ValueError(f"model.draft: decoder {decoder} needs a draft model directory")
        self.meta = read_export(target)
        if draft is not None and decoder in SPECULATIVE:
            check_same_identifiers(target, draft)
        self.target_model: torch.nn.Module | None = None
        self.draft_model: torch.nn.Module | None = None
        self.metrics = RankingMetrics(eval_ks, prefix="test/")
        self.stats: list[DecodeStats] = []
        self.results: dict[str, Any] = {}
        self.decoder: BoundDecoder | None = None
        self.beam: BoundDecoder | None = None
        self.speed = SpeedTally()

    @property
    def dm(self) -> RecDataModule:
        return self.trainer.datamodule

    @property
    def settings(self) -> DecodeSettings:
        hp = self.hparams
        pad = self.dm.prepared.tokenizer.pad_token_id
        levels = int(self.meta["levels"])
        return DecodeSettings(hp.num_beams, levels, hp.draft_beams, hp.gamma, pad, hp.seed, hp.budget)

    def setup(self, stage: str) -> None:
        """Before any weights load: same identifiers as the target, prompts that fit both contexts, K <= items."""
        hp, prepared = self.hparams, self.dm.prepared
        if prepared.index.to_mapping() != json.loads((Path(hp.target) / INDEX_FILE).read_text()):
            raise DataError(f"data: the item index differs from {hp.target}/{INDEX_FILE}; set data.model_dir")
        check_list_length(hp.num_beams, len(prepared.index), "model.num_beams")
        longest, levels = self.dm.longest_prompt(), int(self.meta["levels"])
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
        trie = self.dm.prepared.trie_on(self.device)
        self.decoder = BoundDecoder(hp.decoder, self.target_model, trie, self.settings, self.draft_model, generator)
        if hp.compare_beam:
            self.beam = BoundDecoder("beam", self.target_model, trie, self.settings)
        self.metrics.reset()
        self.stats = []
        self.speed = SpeedTally()

    def _decode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> DecodeOutput:
        """The decoder's output on the batch, each decoder's wall time tallied; with compare_beam beam search runs
        on the same batch, first on odd batches and second on even ones."""
        runs = {"decoder": self.decoder} | ({"beam": self.beam} if self.beam is not None else {})
        outputs, seconds = {}, {}
        for name in self.speed.order(list(runs)):
            start = synced_now(input_ids.device)
            outputs[name] = runs[name](input_ids, attention_mask)
            seconds[name] = synced_now(input_ids.device) - start
        self.speed.add(seconds, input_ids.shape[0])
        return outputs["decoder"]

    def predict_step(self, batch: dict, batch_idx: int) -> list[dict]:
        prepared = self.dm.prepared
        out = self._decode(batch["input_ids"], batch["attention_mask"])
        items = prepared.trie_on(out.sequences.device).lookup(out.sequences).cpu()  # [B, K]
        self.metrics.update_lists(items, batch["targets"], batch["request_ids"])
        self.stats.append(out.stats)
        return prediction_rows(batch["request_ids"], items, out.scores.cpu(), batch["targets"], prepared.index)

    def progress_metrics(self) -> dict[str, float]:
        """Running decode statistics for the progress bar."""
        if not self.stats:
            return {}
        merged = DecodeStats.merge(self.stats)
        summary = merged.summary(int(self.meta["levels"]))
        return {"calls/list": summary["target_calls_per_list"], "accepted": summary["mean_accepted_depth"]}

    def on_predict_epoch_end(self) -> None:
        hp = self.hparams
        merged = DecodeStats.merge(self.stats) if self.stats else None
        metrics = {k: float(v) for k, v in self.metrics.compute().items()} if merged else {}
        self.results = {
            "decoder": hp.decoder,
            "target": hp.target,
            "draft": hp.draft if hp.decoder in SPECULATIVE else None,
            "settings": {k: hp[k] for k in ("num_beams", "draft_beams", "gamma", "budget")},
            "metrics": metrics,
            "decode": merged.summary(int(self.meta["levels"])) if merged else {},
            "accepted_histogram": merged.histogram(hp.gamma) if merged else [],
            "speed": self.speed.summary(),
        }
        speed = {key: value for key, value in self.results["speed"].items() if key in SPEED_KEYS}
        lines = [f"{name:<22}{value:>12.4f}" for name, value in (metrics | self.results["decode"] | speed).items()]
        if hp.decoder in SPECULATIVE and merged:
            lines.append(f"{'accepted depths':<22}{self.results['accepted_histogram']!s:>12}")
        log.info("decoded with %s:\n%s", hp.decoder, "\n".join(lines))
        self._log_summary()

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
