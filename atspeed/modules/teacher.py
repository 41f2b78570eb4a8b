"""Teacher data as a Lightning predict loop: the target's own top-K_t beams and its distributions along them.

``python -m atspeed predict --config configs/<dataset>/teacher.yaml`` runs the trained target (an SFT export) over
every training sample (``data.predict_set: train``): its beam search of width K_t, and p(. | x, y_<t) restricted to
the trie's codes at every identifier position along each beam and along the ground truth, one distribution per
distinct prefix (``atspeed.decoding.teaching.teacher``). ``TeacherShardWriter`` stores them in shards; a resumed run
skips the samples of complete shards (``skip``). With ``distributions: false`` only the beams, their scores and the
ground truth are stored (under a kilobyte per sample, what a 7B target affords): the alignment then computes the
target's distributions on the fly (``Align(teacher="recompute" | "on_policy")``).
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from jsonargparse.typing import PositiveInt

from atspeed.data.datamodule import RecDataModule
from atspeed.data.export_dir import ExportMeta
from atspeed.decoding.checks import check_context, check_list_length
from atspeed.decoding.teaching.teacher import teacher_targets
from atspeed.errors import DataError
from atspeed.models.build import DType, load_model, model_config

# The node tables (parent, token, depth, which node each position reads) follow from beams + truth through
# ``prefix_forest``, so only the sequences and the distributions are stored (the sequences only without distributions).
SEQUENCES = ("beams", "scores", "truth")
STORED = (*SEQUENCES, "node_logprobs")


class Teacher(pl.LightningModule):
    """Decode every training sample with the target and keep what the alignment losses need."""

    def __init__(
        self,
        target: str,
        beams: PositiveInt = 20,
        top_k: PositiveInt | None = None,
        dtype: DType = "float32",
        distributions: bool = True,
    ):
        """
        Args:
            target: directory of the target exported by the SFT stage (weights, tokenizer, index.json).
            beams: K_t, the target's beam width (the paper: 20).
            top_k: keep each distribution's k most likely codes only (the rest -inf); None keeps every allowed code.
                The alignment still masks with the trie (p = 0 at the cut codes); the losses that take a reverse KL
                (atspeed_s, rkl, jsd with beta 1) refuse truncated data (``atspeed.losses.table``).
            dtype: torch dtype of the target's weights (bfloat16 on a GPU); distributions are stored as float16.
            distributions: store the target's distributions at every node; false stores the beams, scores and ground
                truth only (the alignment's ``recompute`` or ``on_policy`` modes compute the distributions).
        """
        super().__init__()
        self.save_hyperparameters()
        self.meta = ExportMeta.load(target)
        self.target_model: torch.nn.Module | None = None
        self.skip: set[int] = set()
        """Sample ids already in complete shards (set by ``TeacherShardWriter`` before predicting)."""

    @property
    def dm(self) -> RecDataModule:
        return self.trainer.datamodule

    def settings(self) -> dict[str, Any]:
        """What the stored data depends on besides the target export (part of the shards' fingerprint)."""
        hp, dm = self.hparams, self.dm.hparams
        return {
            "beams": hp.beams, "top_k": hp.top_k, "dtype": hp.dtype, "prompt": dm.prompt,
            "max_history": dm.max_history, "train_samples": dm.train_samples, "batch_size": dm.eval_batch_size,
            "constraint": dm.constraint, "distributions": hp.distributions,
        }  # fmt: skip

    def setup(self, stage: str) -> None:
        """Before the target loads: training samples as requests, K_t <= items, prompts within the context."""
        if self.dm.hparams.predict_set != "train":
            raise DataError("data.predict_set must be train: teacher data covers the training samples")
        prepared = self.dm.prepared
        check_list_length(self.hparams.beams, len(prepared.index), "model.beams")
        check_context(model_config(self.hparams.target), self.dm.longest_prompt(), prepared.index.levels)

    def configure_model(self) -> None:
        if self.target_model is None:
            self.target_model = load_model(self.hparams.target, self.hparams.dtype)

    def predict_step(self, batch: dict, batch_idx: int) -> dict[str, torch.Tensor]:
        ids = batch["request_ids"]
        if self.skip and all(i in self.skip for i in ids.tolist()):
            return {}  # in a complete shard of an interrupted run
        prepared = self.dm.prepared
        truth = prepared.item_token_ids[torch.tensor([t[0] for t in batch["targets"]])].to(self.device)  # [B, L]
        out = teacher_targets(
            self.target_model, batch["input_ids"], batch["attention_mask"], truth, prepared.trie.on(self.device),
            self.hparams.beams, top_k=self.hparams.top_k, dtype=torch.float16, distributions=self.hparams.distributions,
        )  # fmt: skip
        names = STORED if self.hparams.distributions else SEQUENCES
        return {"sample_id": ids.cpu(), **{name: getattr(out, name).cpu() for name in names}}
