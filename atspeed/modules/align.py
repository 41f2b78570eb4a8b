"""Draft alignment: loss = (1 - alpha) * CE(ground truth) + alpha * LOSSES[loss] against the target's teacher data
(``sft``, which has no alignment term: the full CE, alpha unused).

``python -m atspeed fit --config configs/<dataset>/align.yaml`` trains a draft (built from sizes, sharing the target's
tokenizer and identifiers) on the teacher data of ``atspeed.modules.teacher``: per training sample the target's K_t
beams, their scores, the ground truth, and (unless made with ``distributions: false``) the target's distributions at
every distinct prefix. ``teacher`` says where each batch's distributions come from:

- ``cached``: all from the teacher data (refused in ``setup`` when it holds no distributions);
- ``recompute``: beams, scores and truth from the teacher data, the distributions computed on the fly by the frozen
  target (``node_logprobs``, the teacher stage's own computation, in float32);
- ``on_policy`` (DistillSpec / GKD): with probability ``on_policy_ratio`` per batch (a CPU generator seeded from
  ``seed``, drawn the same way every batch, its state saved in the checkpoints) the beams are the draft's own sampling
  beam search of width K_t from the batch's prompts, which the target scores (distributions at every node, and each
  beam's cumulative log-probability as its score); the other batches are ``cached`` ones, or ``recompute`` ones when
  the teacher data holds no distributions. ``train/on_policy`` logs 1 or 0 per batch.

One draft forward per batch (a prefill plus one tree-attention forward over the prefix tree of beams and ground
truth, as the teacher stage) gives the draft's logits at every node: the CE term reads them along the ground truth,
the alignment term along the beams (or the ground truth, per the loss's ``positions``), both over each level's codes.
The target stays frozen and out of the module tree, the optimizer and the checkpoints; it is loaded in training only
by ``recompute`` and ``on_policy``, and at validation to log what predicts speed with the current draft
(``atspeed.decoding.speed_metrics``: strict and relaxed acceptance, ``val/coverage@d``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from jsonargparse.typing import ClosedUnitInterval, NonNegativeFloat, NonNegativeInt, PositiveFloat
from lightning.pytorch.utilities import rank_zero_info
from transformers import PreTrainedModel

from atspeed.data.datamodule import RecDataModule
from atspeed.data.export_dir import check_same_identifiers
from atspeed.data.teacher_store import TeacherStore, stack_padded, teacher_fingerprint
from atspeed.decoding.checks import check_list_length
from atspeed.decoding.options import DEFAULT_DECODING, DecodeOptions
from atspeed.decoding.speed_metrics import speed_metrics
from atspeed.decoding.teaching.teacher import Teaching, node_logits, on_policy_teaching, target_teaching
from atspeed.decoding.teaching.teacher_forest import along, gather_codes, level_codes
from atspeed.errors import DataError
from atspeed.losses import LOSSES, LossName, LossOptions, beam_weights, check_loss, check_support, check_top_k, reduce
from atspeed.models.build import DType, ModelSpec, build_causal_lm, load_model, outside_zero_init, unpartitioned
from atspeed.modules.optim import adamw_cosine
from atspeed.modules.sequence_ce import sequence_ce
from atspeed.tables import text_table

TeacherMode = Literal["cached", "recompute", "on_policy"]
CeOn = Literal["item", "all"]
GENERATOR_KEY = "on_policy_generator"  # checkpoint entry: the on-policy mixing generator's state


@dataclass
class _Frozen:
    """Holds a model outside the module tree (the target; validation's draft): not trained, not saved, not moved by
    Lightning."""

    model: torch.nn.Module


class Align(pl.LightningModule):
    """Train a draft towards the target's top-K (AtSpeed-S, AtSpeed-R and the baseline losses)."""

    # what it logs (patterns): the sweep runner checks a sweep's metric against them before any run starts
    LOGGED_METRICS = ("train/loss", "train/ce", "train/align", "train/on_policy", "val/mean_accepted_depth",
                      "val/target_calls_per_list", "val/relaxed_accepted_depth", "val/relaxed_target_calls_per_list",
                      "val/coverage@*")  # fmt: skip

    def __init__(
        self,
        target: str,
        teacher_dir: str,
        teacher: TeacherMode = "cached",
        on_policy_ratio: ClosedUnitInterval = 0.5,
        draft: ModelSpec | None = None,
        draft_init: str | None = None,
        loss: LossName = "atspeed_s",
        alpha: ClosedUnitInterval = 0.5,
        ce_on: CeOn = "item",
        loss_options: LossOptions | None = None,
        weight_beams: bool = False,
        lr: PositiveFloat = 1e-3,
        weight_decay: NonNegativeFloat = 0.01,
        warmup_steps: NonNegativeInt = 100,
        decoding: DecodeOptions = DEFAULT_DECODING,
        seed: int = 0,
        dtype: DType = "float32",
    ) -> None:
        """
        Args:
            target: the target's export (SFT stage): its tokenizer and identifiers are the draft's.
            teacher_dir: the teacher data of that target (``TeacherShardWriter.dirpath``).
            teacher: where the target's distributions come from: ``cached`` (the teacher data), ``recompute`` (the
                frozen target on the stored beams), ``on_policy`` (also on the draft's own sampled beams).
            on_policy_ratio: ``on_policy``: the share of batches aligned on the draft's own beams.
            draft: the draft's family and sizes (a draft built from scratch).
            draft_init: start instead from this exported draft (e.g. the SFT stage's non-aligned draft).
            loss: the alignment loss, a name of ``atspeed.losses.LOSSES``.
            alpha: weight of the alignment loss; 1 - alpha weighs the ground-truth cross-entropy (``sft``: the full
                cross-entropy, alpha unused).
            ce_on: the cross-entropy's tokens: ``item`` the identifier's codes; ``all`` the prompt, the identifier and
                EOS (the AtSpeed authors' setting, ``atspeed.modules.sequence_ce``; one more draft forward a batch).
            loss_options: temperature, top-k support (atspeed_s), beta (jsd).
            weight_beams: weigh the target's beams by their normalised probabilities instead of uniformly.
            lr: peak AdamW learning rate.
            weight_decay: AdamW weight decay.
            warmup_steps: linear warm-up steps before the cosine decay.
            decoding: the predict stage's block: K, N, gamma, seed of validation's spec_strict/relaxed (whole tree).
            seed: initialisation seed of the draft and seed of on-policy mixing.
            dtype: torch dtype the frozen target is loaded in (bfloat16 for a 7B target on a GPU: inference
                only, outside the optimizer and DeepSpeed's partition).
        """
        super().__init__()
        self.validation_options = dataclasses.replace(decoding, decoder="spec_strict", budget=None)  # refuses N < K
        self.options = loss_options or LossOptions()
        check_loss(loss, self.options)
        self.save_hyperparameters()
        self.spec = draft or ModelSpec()
        self.draft: PreTrainedModel | None = None
        self.frozen: _Frozen | None = None
        self.store: TeacherStore | None = None
        self.codes: torch.Tensor | None = None
        self.generator: torch.Generator | None = None
        self.validation_draft: _Frozen | None = None
        self.mixing = torch.Generator().manual_seed(seed)  # on CPU: on-policy or not, and the sampling seed, per batch

    @property
    def dm(self) -> RecDataModule:
        return self.trainer.datamodule

    # -- set-up ---------------------------------------------------------------------------------------

    def setup(self, stage: str) -> None:
        """Before any model is built: batches of requests, teacher data of this target, a valid top-k support."""
        hp, prepared = self.hparams, self.dm.prepared
        if self.dm.hparams.train_batches != "requests":
            raise DataError("data.train_batches must be requests: alignment looks up each sample's teacher data")
        check_list_length(self.validation_options.num_beams, len(prepared.index), "model.decoding.num_beams")
        self.validation_settings = self.validation_options.settings(prepared.index.levels)  # spec_strict, whole tree
        fp = teacher_fingerprint(hp.target, hp.teacher_dir)
        self.store = TeacherStore(hp.teacher_dir, fp)
        if hp.teacher == "cached" and "node_logprobs" not in self.store.keys:
            raise DataError(
                f"{hp.teacher_dir}: teacher data without distributions (made with distributions: false): "
                "model.teacher cached needs them; use model.teacher recompute or on_policy"
            )
        wanted = len(self.dm.training_requests())
        if self.store.sample_ids() != list(range(wanted)):
            raise DataError(
                f"{hp.teacher_dir}: teacher data covers {len(self.store)} samples, training has {wanted}: make it with "
                "the same data settings (data.train_samples, max_history)"
            )
        if hp.draft_init is not None:
            check_same_identifiers(hp.target, hp.draft_init, "model.draft_init")
        self.codes = level_codes(prepared.trie.on("cpu"))  # [L, C]
        level_masks = torch.zeros(prepared.index.levels, len(prepared.tokenizer), dtype=torch.bool)
        level_masks.scatter_(1, self.codes.clamp(min=0), self.codes >= 0)
        try:
            check_top_k(self.options.top_k, level_masks)
            if hp.teacher != "recompute" and "node_logprobs" in self.store.keys and hp.alpha > 0:  # recompute: full
                check_support(hp.loss, self.options, fp["settings"].get("top_k"), hp.teacher_dir)
        except ValueError as err:
            raise DataError(str(err)) from None

    def configure_model(self) -> None:
        if self.draft is not None:
            return
        with outside_zero_init():
            if self.hparams.draft_init is None:
                self.draft = build_causal_lm(self.spec, self.dm.prepared.tokenizer, seed=self.hparams.seed)
            else:
                self.draft = load_model(self.hparams.draft_init).train()

    def export_model(self) -> PreTrainedModel:
        return self.draft

    def _target(self) -> torch.nn.Module:
        if self.frozen is None:
            model = load_model(self.hparams.target, self.hparams.dtype).to(self.device)
            model.requires_grad_(False)
            self.frozen = _Frozen(model)
        return self.frozen.model

    def _codes(self) -> torch.Tensor:
        """The level codes [L, C] on the module's device (moved once)."""
        if self.codes.device != self.device:
            self.codes = self.codes.to(self.device)
        return self.codes

    # -- training -------------------------------------------------------------------------------------

    def _cached(self, sample_ids: torch.Tensor) -> dict[str, torch.Tensor]:
        rows = [self.store[i] for i in sample_ids.tolist()]
        return {key: stack_padded([row[key][None] for row in rows]).to(self.device) for key in rows[0]}

    def _teaching(self, batch: dict) -> Teaching:
        """The batch's beams and the target's distributions along them, per ``teacher`` (the module docstring)."""
        hp, trie, codes = self.hparams, self.dm.prepared.trie.on(self.device), self._codes()
        data = self._cached(batch["request_ids"])
        beams, scores, truth = data["beams"], data["scores"], data["truth"]
        ids, mask = batch["input_ids"], batch["attention_mask"]
        sampler = self._draw() if hp.teacher == "on_policy" else None
        if sampler is not None:  # width K_t, as the teacher data
            return on_policy_teaching(
                self._target(), self.draft, ids, mask, truth, trie, codes, beams.shape[1], sampler
            )
        if hp.teacher == "recompute" or "node_logprobs" not in data:
            return target_teaching(self._target(), ids, mask, beams, truth, trie, codes, scores)
        return Teaching.stored(beams, scores, truth, data["node_logprobs"], trie, codes)

    def _draw(self) -> torch.Generator | None:
        """One on-policy draw (two numbers from ``mixing`` every batch): a seeded generator for the draft's sampling
        with probability ``on_policy_ratio``, else None."""
        coin = float(torch.rand((), generator=self.mixing))
        seed = int(torch.randint(2**62, (), generator=self.mixing))
        if coin >= self.hparams.on_policy_ratio:
            return None
        return torch.Generator(device=self.device).manual_seed(seed)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        losses = self._losses(batch)
        size = batch["input_ids"].shape[0]
        for name, value in losses.items():
            self.log(f"train/{name}", value, prog_bar=name == "loss", batch_size=size)
        return losses["loss"]

    def _losses(self, batch: dict) -> dict[str, torch.Tensor]:
        hp = self.hparams
        teaching = self._teaching(batch)
        forest = teaching.forest
        logits = node_logits(self.draft, batch["input_ids"], batch["attention_mask"], forest)  # [B, M, V]
        codes = self._codes()
        student = gather_codes(logits, codes[forest.depth])  # [B, M, C]
        truth_nodes = forest.slot_node[:, -1:]  # [B, 1, L]
        truth_logits = along(logits, truth_nodes)[:, 0]  # [B, L, V]
        ce = self._ce(batch, teaching.truth, truth_logits)
        flag = torch.tensor(float(teaching.on_policy), device=self.device)
        mode = {"on_policy": flag} if hp.teacher == "on_policy" else {}  # logged: which batches were on-policy
        spec = LOSSES[hp.loss]
        if spec.positions == "none" or hp.alpha == 0:
            return {"loss": ce, "ce": ce, **mode}
        on_beams = spec.positions == "beams"
        nodes = forest.slot_node[:, :-1] if on_beams else truth_nodes  # [B, N, L]
        seqs = teaching.beams if on_beams else teaching.truth[:, None]  # [B, N, L]
        t_values = along(teaching.logprobs, nodes)  # [B, N, L, C], -inf outside a truncated teacher's top-k
        allowed = along(teaching.allowed, nodes)  # [B, N, L, C] the trie's codes, never read from the values
        labels = (codes[None, None] == seqs[..., None]).long().argmax(-1)  # [B, N, L] column of each token
        per = spec.fn(along(student, nodes), t_values.masked_fill(~allowed, 0.0), allowed, labels, self.options)
        weights = beam_weights(teaching.scores) if hp.weight_beams and on_beams else None
        aligned = reduce(per, weights, allowed.any(-1))
        return {"loss": (1 - hp.alpha) * ce + hp.alpha * aligned, "ce": ce, "align": aligned, **mode}

    def _ce(self, batch: dict, truth: torch.Tensor, truth_logits: torch.Tensor) -> torch.Tensor:
        """The ground-truth cross-entropy on the identifier's codes (``item``; truth_logits [B, L, V] from the tree
        forward), or on prompt, identifier and EOS (``all``: one more, teacher-forced, draft forward)."""
        if self.hparams.ce_on == "item":
            return torch.nn.functional.cross_entropy(truth_logits.flatten(0, 1), truth.flatten())
        eos = torch.full_like(truth[:, :1], self.dm.prepared.tokenizer.eos_token_id)
        return sequence_ce(self.draft, batch["input_ids"], batch["attention_mask"], torch.cat([truth, eos], 1))

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint[GENERATOR_KEY] = self.mixing.get_state()  # a resumed run draws the same on-policy batches

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if GENERATOR_KEY in checkpoint:
            self.mixing.set_state(checkpoint[GENERATOR_KEY])

    def configure_optimizers(self):
        return adamw_cosine(self, self.draft)

    # -- validation: what predicts speed --------------------------------------------------------------

    def on_validation_epoch_start(self) -> None:
        """A fresh seeded generator for spec_relaxed: every validation draws the same samples for the same draft;
        the draft whole for decoding (under ZeRO-3 a gathered copy: ``unpartitioned``)."""
        self.generator = torch.Generator(device=self.device).manual_seed(self.validation_options.seed)
        self.validation_draft = _Frozen(unpartitioned(self.draft))  # held outside the module tree

    def on_validation_epoch_end(self) -> None:
        self.validation_draft = None

    def validation_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> None:
        if dataloader_idx == 0:
            return  # the teacher-forced pairs: the CE is logged in training
        measured = speed_metrics(
            self._target(), self.validation_draft.model, batch["input_ids"], batch["attention_mask"],
            self.dm.prepared.trie.on(self.device), self.validation_settings, self.generator,
        )  # fmt: skip
        for name, value in measured.items():
            self.log(f"val/{name}", value, batch_size=len(batch["input_ids"]), add_dataloader_idx=False, sync_dist=True)

    def on_fit_end(self) -> None:
        found = {k: float(v) for k, v in self.trainer.callback_metrics.items() if k.startswith("val/")}
        if found:
            rank_zero_info(text_table(["metric", "value"], ([k, f"{v:.4f}"] for k, v in sorted(found.items()))))
