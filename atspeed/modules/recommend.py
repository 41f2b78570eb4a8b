"""Recommendation as a Lightning predict loop: decode top-K lists for the test users with a named decoder.

``python -m atspeed predict --config configs/<dataset>/decode.yaml`` loads the target (and the draft) exported by the
SFT stage, decodes every test request, and reports Recall/NDCG@K (torchmetrics) and decode statistics (target calls
per list, accepted depths per call, tokens per target call, time split into draft / verify / other).
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
from atspeed.decoding.output import DecodeStats
from atspeed.errors import DataError
from atspeed.metrics.ranking import RankingMetrics
from atspeed.models.build import load_model, model_config

log = logging.getLogger(__name__)


class Recommender(pl.LightningModule):
    """Decode the datamodule's test requests with the target (and draft) of exported model directories."""

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
        dtype: str = "float32",
        seed: int = 0,
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
        self.decoder = BoundDecoder(
            hp.decoder, self.target_model, self.dm.prepared.trie, self.settings, self.draft_model, generator
        )
        self.metrics.reset()
        self.stats = []

    def predict_step(self, batch: dict, batch_idx: int) -> list[dict]:
        prepared = self.dm.prepared
        out = self.decoder(batch["input_ids"], batch["attention_mask"])
        items = prepared.trie.lookup(out.sequences).cpu()  # [B, K]
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
        }
        lines = [f"{name:<22}{value:>12.4f}" for name, value in metrics.items()]
        lines += [f"{name:<22}{value:>12.4f}" for name, value in self.results["decode"].items()]
        if hp.decoder in SPECULATIVE and merged:
            lines.append(f"{'accepted depths':<22}{self.results['accepted_histogram']!s:>12}")
        log.info("decoded with %s:\n%s", hp.decoder, "\n".join(lines))
