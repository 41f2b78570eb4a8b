"""SFT: teach a causal LM (the target, or a draft) to write the next item's identifier for a user's history."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import lightning.pytorch as pl
import torch
from jsonargparse.typing import NonNegativeFloat, NonNegativeInt, PositiveFloat, PositiveInt
from lightning.pytorch.utilities import rank_zero_info
from transformers import PreTrainedModel

from atspeed.callbacks.predictions import prediction_rows
from atspeed.data.batches import IGNORE
from atspeed.data.datamodule import RecDataModule
from atspeed.decoding.checks import check_list_length
from atspeed.decoding.decoders import DecodeSettings, decode
from atspeed.errors import DataError
from atspeed.metrics.ranking import RankingMetrics, popularity_ranking
from atspeed.models.build import LoraSpec, ModelSpec, apply_lora, build_causal_lm, context_length
from atspeed.models.zero3 import zero3_config
from atspeed.modules.optim import adamw_cosine
from atspeed.tables import text_table


class SFT(pl.LightningModule):
    """Cross-entropy fine-tuning of a causal LM (target or draft) on (prompt, identifier + EOS), with Recall/NDCG from
    beam search."""

    # what it logs (patterns): the sweep runner checks a sweep's metric against them before any run starts
    LOGGED_METRICS = ("train/loss", "val/loss", "test/loss", "val/recall@*", "val/ndcg@*", "test/recall@*",
                      "test/ndcg@*", "val/pop_*", "test/pop_*")  # fmt: skip

    def __init__(
        self,
        model: ModelSpec | None = None,
        lora: LoraSpec | None = None,
        loss_on: Literal["response", "all"] = "response",
        lr: PositiveFloat = 1e-3,
        weight_decay: NonNegativeFloat = 0.01,
        warmup_steps: NonNegativeInt = 100,
        eval_ks: Sequence[PositiveInt] = (5, 10, 20),
        seed: int = 0,
    ) -> None:
        """
        Args:
            model: the causal LM to fine-tune (local checkpoint, or a llama or qwen2 built from sizes).
            lora: LoRA adapters; None = full fine-tuning.
            loss_on: response (identifier + EOS tokens) or all (the whole sequence).
            lr: peak AdamW learning rate.
            weight_decay: AdamW weight decay.
            warmup_steps: linear warm-up steps before the cosine decay.
            eval_ks: K of Recall@K / NDCG@K; beam width = max(eval_ks).
            seed: initialisation seed of a model built from scratch.
        """
        super().__init__()
        if not eval_ks:
            raise ValueError("model.eval_ks must name at least one K")
        self.save_hyperparameters()
        self.spec = model or ModelSpec()
        self.lora = lora
        self.model: PreTrainedModel | None = None
        self.val_metrics = RankingMetrics(eval_ks, prefix="val/")
        self.test_metrics = RankingMetrics(eval_ks, prefix="test/")
        self.baseline: dict[str, dict[str, float]] = {}

    # -- model ------------------------------------------------------------------------------------

    @property
    def dm(self) -> RecDataModule:
        return self.trainer.datamodule

    def setup(self, stage: str) -> None:
        """Before any model is built: prompts fit its context and every list can be filled with distinct items."""
        prepared = self.dm.prepared
        longest = self.dm.longest_prompt() + prepared.index.levels + 1
        limit = context_length(self.spec)
        if limit is not None and longest > limit:
            raise DataError(
                f"prompts of {longest} tokens exceed the model's context ({limit}): "
                "lower data.max_history or raise model.max_positions"
            )
        check_list_length(max(self.hparams.eval_ks), len(prepared.index), "model.eval_ks")

    def configure_model(self) -> None:
        if self.model is not None:
            return
        prepared = self.dm.prepared
        zero3 = zero3_config(self.trainer.strategy)  # under ZeRO-3 a checkpoint loads partitioned
        model = build_causal_lm(self.spec, prepared.tokenizer, seed=self.hparams.seed, zero3=zero3)
        if self.lora is not None:
            new_ids = sorted(set(prepared.item_token_ids.flatten().tolist()))
            model = apply_lora(model, self.lora, new_ids)
        self.model = model

    def export_model(self) -> torch.nn.Module:
        """The trained model (with its LoRA adapters): ``callbacks.export.plain_model`` merges them on a CPU copy."""
        return self.model

    # -- training -------------------------------------------------------------------------------

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        labels = batch["labels"]
        if self.hparams.loss_on == "all":
            labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, IGNORE)
        return self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels).loss

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self(batch)
        self.log("train/loss", loss, prog_bar=True, batch_size=batch["input_ids"].shape[0])
        return loss

    def configure_optimizers(self):
        return adamw_cosine(self, self.model)

    # -- evaluation -----------------------------------------------------------------------------

    def _eval_step(self, batch: dict, dataloader_idx: int, stage: str, metrics: RankingMetrics) -> None:
        if dataloader_idx == 0:
            loss = self(batch)
            size = batch["input_ids"].shape[0]
            self.log(f"{stage}/loss", loss, batch_size=size, add_dataloader_idx=False, sync_dist=True)
            return
        items, _ = self.recommend(batch)
        metrics.update_lists(items, batch["targets"], batch["request_ids"])

    def recommend(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-K item positions [B, K] and scores [B, K] for a batch of left-padded prompts."""
        prepared = self.dm.prepared
        levels = prepared.index.levels
        settings = DecodeSettings(num_beams=max(self.hparams.eval_ks), levels=levels)
        trie = prepared.trie.on(batch["input_ids"].device)
        out = decode("beam", self.model, batch["input_ids"], batch["attention_mask"], trie, settings)
        return trie.lookup(out.sequences).cpu(), out.scores.cpu()

    def validation_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._eval_step(batch, dataloader_idx, "val", self.val_metrics)

    def test_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._eval_step(batch, dataloader_idx, "test", self.test_metrics)

    def _log_metrics(self, stage: str, metrics: RankingMetrics) -> None:
        self.log_dict(metrics.compute(), add_dataloader_idx=False)
        metrics.reset()
        # identical on every rank (computed from all requests); sync_dist only keeps Lightning from warning
        self.log_dict(self._popularity(stage), add_dataloader_idx=False, sync_dist=True)

    def _popularity(self, stage: str) -> dict[str, float]:
        """The most-popular baseline on the same requests (computed once per stage), for comparison."""
        if stage not in self.baseline:
            requests = self.dm.eval_requests(stage)
            metrics = RankingMetrics(self.hparams.eval_ks, prefix=f"{stage}/pop_")
            if requests:
                top = popularity_ranking(self.dm.prepared.split.train, max(self.hparams.eval_ks))
                ids = torch.tensor([rid for rid, _, _ in requests])
                metrics.update_lists(top.expand(len(requests), -1), [t for _, _, t in requests], ids)
            self.baseline[stage] = {k: float(v) for k, v in metrics.compute().items()} if requests else {}
        return self.baseline[stage]

    def on_validation_epoch_end(self) -> None:
        self._log_metrics("val", self.val_metrics)

    def on_test_epoch_end(self) -> None:
        self._log_metrics("test", self.test_metrics)

    def on_fit_end(self) -> None:
        """Print the final validation metrics beside the most-popular baseline."""
        nan = float("nan")
        found, baseline = self.trainer.callback_metrics, self.baseline.get("val", {})
        if not any(key.startswith("val/recall@") for key in found):
            rank_zero_info(
                "no validation ran during this fit (trainer.val_check_interval beyond the steps trained?): "
                "`python -m atspeed validate --config ... --ckpt_path last` measures the model"
            )
            return
        rows = []
        for name in (f"{m}@{k}" for m in ("recall", "ndcg") for k in self.hparams.eval_ks):
            model, pop = found.get(f"val/{name}", nan), baseline.get(f"val/pop_{name}", nan)
            rows.append([f"val/{name}", f"{float(model):.4f}", f"{pop:.4f}"])
        rank_zero_info(text_table(["metric", "model", "most-popular"], rows))

    def predict_step(self, batch: dict, batch_idx: int) -> list[dict]:
        items, scores = self.recommend(batch)
        return prediction_rows(batch["request_ids"], items, scores, batch["targets"], self.dm.prepared.index)
