"""The optimizer every training stage uses: AdamW on the trainable parameters, linear warm-up, cosine decay."""

from __future__ import annotations

import lightning.pytorch as pl
import torch
from transformers import get_cosine_schedule_with_warmup

from atspeed.deepspeed_config import offloads_optimizer


def _adamw(module: pl.LightningModule) -> type[torch.optim.Optimizer]:
    """torch's AdamW, or DeepSpeed's CPU Adam (AdamW mode) when ZeRO-Offload keeps the optimizer state on the CPU:
    DeepSpeed refuses other optimizers there unless told to, and steps them far slower."""
    trainer = getattr(module, "_trainer", None)
    if trainer is not None and offloads_optimizer(trainer.strategy):
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam
    return torch.optim.AdamW


def adamw_cosine(module: pl.LightningModule, model: torch.nn.Module) -> dict:
    """``configure_optimizers`` result for ``model``'s trainable parameters, from the module's ``lr``,
    ``weight_decay`` and ``warmup_steps`` hyper-parameters; the schedule spans the fit's optimizer steps."""
    hp = module.hparams
    params = [p for p in model.parameters() if p.requires_grad]
    opt = _adamw(module)(params, lr=hp.lr, weight_decay=hp.weight_decay)
    total = max(int(module.trainer.estimated_stepping_batches), 1)
    sched = get_cosine_schedule_with_warmup(opt, min(hp.warmup_steps, total), total)
    return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
