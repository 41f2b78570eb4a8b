"""Memory at scale under DeepSpeed ZeRO-3: load a checkpoint partitioned; copy a partitioned model to CPU by layer.

Loading: Lightning calls ``configure_model`` inside DeepSpeed's ``zero.Init`` under ZeRO-3. With ``hf_zero3`` alive
(transformers' ``HfDeepSpeedConfig`` holding the run's DeepSpeed config), ``from_pretrained`` builds the model
partitioned as it goes (each process keeps only its share of every layer), rank 0 alone reads the checkpoint, and each
layer is gathered in turn for rank 0 to fill it and partitioned again: a node holds about one copy of the weights
(rank 0's, memory-mapped from safetensors) instead of one per process.

Export: ``cpu_copy`` gathers a partitioned model one module at a time and keeps the whole weights on rank 0's CPU only,
so no accelerator ever holds the whole model twice (LoRA is merged on that copy) nor does every rank gather it all.
None of this imports DeepSpeed unless the model is partitioned.
"""

from __future__ import annotations

import contextlib
import copy
import sys
from collections.abc import Iterator
from typing import Any

import torch


def zero_init_active() -> bool:
    """Whether DeepSpeed's ``zero.Init`` is open (modules built now are partitioned at once)."""
    zero = sys.modules.get("deepspeed.runtime.zero.partition_parameters")  # never imports DeepSpeed itself
    return zero is not None and bool(zero.zero_init_context)


def zero3_config(strategy: Any) -> dict | None:
    """The DeepSpeed config of Lightning's ``strategy`` while it builds the model inside ZeRO-3's ``zero.Init``
    (``configure_model`` under stage 3), else None."""
    config = getattr(strategy, "config", None)
    if not zero_init_active() or not isinstance(config, dict):
        return None
    return config


@contextlib.contextmanager
def hf_zero3(config: dict | None) -> Iterator[None]:
    """transformers' ZeRO-3 mode for the duration (a no-op for None): ``from_pretrained`` loads partitioned,
    ``resize_token_embeddings`` and peft's trainable tokens gather what they touch. Only inside this context: the
    frozen target of alignment, loaded later, must stay a plain model."""
    if config is None:
        yield
        return
    from transformers.integrations.deepspeed import HfDeepSpeedConfig, unset_hf_deepspeed_config

    alive = HfDeepSpeedConfig(copy.deepcopy(config))  # transformers keeps only a weak reference
    try:
        yield
    finally:
        unset_hf_deepspeed_config()
        del alive


def partitioned(module: torch.nn.Module) -> bool:
    return any(hasattr(p, "ds_id") for p in module.parameters())  # DeepSpeed marks the parameters it partitions


def cpu_copy(model: torch.nn.Module, keep: bool) -> torch.nn.Module | None:
    """A copy of ``model`` whose parameters and buffers are detached CPU tensors (shared ones stay shared), or None
    where ``keep`` is false. A ZeRO-3 partitioned model is gathered one module at a time, a collective every rank
    must join (``keep`` on one rank only); any other model is copied tensor by tensor."""
    copies: dict[int, torch.Tensor] = {}
    is_partitioned = partitioned(model)
    if is_partitioned:
        import deepspeed
    for module in model.modules():
        own = list(module.parameters(recurse=False))
        gather = deepspeed.zero.GatheredParameters(own, modifier_rank=None) if is_partitioned and own else None
        with gather or contextlib.nullcontext():
            if keep:
                for param in own:
                    if id(param) not in copies:
                        copies[id(param)] = torch.nn.Parameter(_cpu(param), requires_grad=param.requires_grad)
                for buffer in module.buffers(recurse=False):
                    copies.setdefault(id(buffer), _cpu(buffer))
    if not keep:
        return None
    # deepcopy finds every tensor in its memo: the module tree is copied, the tensors are the CPU copies
    return copy.deepcopy(model, memo=dict(copies))


def _cpu(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.detach().to("cpu", copy=True)
