"""Lightning's ``DeepSpeedStrategy`` on CPU processes, for the tests: a machine without a GPU runs the real DeepSpeed
path (``deepspeed.initialize``, ZeRO partitions, DeepSpeed's sharded checkpoints, Lightning's conversion of them).

Lightning refuses any accelerator but CUDA in ``setup_environment`` and CPU devices (which have no index) in
``setup_distributed``, and hands ``deepspeed.initialize`` the device index as the process's device rank (None on CPU,
which DeepSpeed cannot compare). Those three places are all that differ here; the rest is Lightning's own wiring.
DeepSpeed itself picks its CPU accelerator when no GPU is found (``DS_ACCELERATOR=cpu`` forces it), and the process
group is gloo, which Lightning chooses for a CPU root device. Name it in a config as
``tests.integration.deepspeed_cpu.CpuDeepSpeedStrategy`` (it ends in ``DeepSpeedStrategy``, so atspeed checks its
``init_args.config`` as for the real one). ``ParameterReport`` is a probe callback the tests add to see inside the
engine.
"""

from __future__ import annotations

import argparse
import atexit
import json
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.fabric.utilities.seed import reset_seed
from lightning.pytorch.strategies import DeepSpeedStrategy
from lightning.pytorch.strategies.ddp import DDPStrategy


def _destroy_process_group() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


class CpuDeepSpeedStrategy(DeepSpeedStrategy):
    """``DeepSpeedStrategy`` that accepts Lightning's CPU accelerator (tests only: DeepSpeed on CPU is slow)."""

    def setup_environment(self) -> None:
        """What ``DeepSpeedStrategy.setup_environment`` does, less its CUDA-only check."""
        DDPStrategy.setup_environment(self)

    def setup_distributed(self) -> None:
        """What ``DeepSpeedStrategy.setup_distributed`` does, less its check that devices are GPU indices."""
        reset_seed()
        self.set_world_ranks()
        self._init_deepspeed_distributed()
        atexit.register(_destroy_process_group)  # as Lightning does for NCCL: gloo's threads end before exit

    def _setup_model_and_optimizer(self, model: torch.nn.Module, optimizer, lr_scheduler=None):
        """``deepspeed.initialize`` as Lightning calls it, with the local rank as the device rank (DeepSpeed's CPU
        accelerator ignores it; Lightning passes the CUDA index)."""
        import deepspeed

        engine, deepspeed_optimizer, _, _ = deepspeed.initialize(
            args=argparse.Namespace(device_rank=self.local_rank),
            config=self.config,
            model=model,
            model_parameters=[p for p in model.parameters() if p.requires_grad],
            optimizer=optimizer,
            lr_scheduler=lr_scheduler,
            dist_init_required=False,
        )
        return engine, deepspeed_optimizer


class ParameterReport(pl.Callback):
    """When training ends, rank 0 writes to ``path`` (JSON) which parameters DeepSpeed's engine holds and which of
    them ZeRO partitions, beside the parameters of the module's frozen target (alignment) when one was loaded."""

    def __init__(self, path: str) -> None:
        super().__init__()
        self.path = path

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        engine = trainer.strategy.model
        named = list(engine.module.named_parameters())
        frozen = getattr(pl_module, "frozen", None)
        target = [] if frozen is None else list(frozen.model.parameters())
        report = {
            "engine": type(engine).__name__,
            "engine_holds": sorted(name for name, _ in named),
            "partitioned": sorted(name for name, p in named if hasattr(p, "ds_id")),
            "target_loaded": frozen is not None,
            "target_partitioned": sum(hasattr(p, "ds_id") for p in target),
            "target_trainable": sum(p.requires_grad for p in target),
            "target_in_engine": len({id(p) for p in target} & {id(p) for _, p in named}),
        }
        if trainer.is_global_zero:
            Path(self.path).write_text(json.dumps(report, indent=2), encoding="utf-8")
