"""The model families atspeed builds from sizes: one row per family, read by everything that builds a random model.

A family is a Hugging Face ``model_type``; its config comes from ``AutoConfig.for_model`` and its model from
``AutoModelForCausalLM.from_config``, so a new family is one row here (plus a decoding oracle run over it: the
tests' ``FAMILIES``) as long as the stock model takes a 4D float attention mask and explicit ``position_ids``
(``atspeed.decoding.cache.tree_attention``). Sliding-window attention cannot: a 4D mask replaces the model's own
masks, so the window would silently be ignored, and every config that asks for one is refused (``check_attention``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig, PreTrainedModel

from atspeed.errors import DataError

Family = Literal["llama", "qwen2"]


@dataclass(frozen=True)
class ModelFamily:
    """How to build a model of one family: its ``model_type`` and the config keys atspeed fixes for it."""

    model_type: str
    fixed: dict[str, Any] = field(default_factory=dict)
    """Config keys set on every model of the family built from sizes (over the caller's)."""


FAMILIES: dict[str, ModelFamily] = {
    "llama": ModelFamily("llama"),
    # q/k/v projections with biases; full attention in every layer (sliding windows would ignore the tree mask)
    "qwen2": ModelFamily("qwen2", {"use_sliding_window": False}),
}


def family_config(family: Family, **config: Any) -> PretrainedConfig:
    """The config of a ``family`` model with Hugging Face config keys ``config`` (``num_key_value_heads`` defaults to
    ``num_attention_heads``: no grouped-query attention unless asked, whatever the family's own default)."""
    if family not in FAMILIES:
        raise ValueError(f"unknown model family {family!r}; expected one of {sorted(FAMILIES)}")
    row = FAMILIES[family]
    config.setdefault("num_key_value_heads", config.get("num_attention_heads"))
    return AutoConfig.for_model(row.model_type, **(config | row.fixed))


def random_model(config: PretrainedConfig, seed: int, dtype: torch.dtype | None = None) -> PreTrainedModel:
    """A model of ``config`` with weights drawn from ``seed`` (the global RNG is left as it was), in eval mode."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, **({"dtype": dtype} if dtype is not None else {}))
    return model.eval()


def family_of(config: PretrainedConfig | dict) -> Family | None:
    """The family of a model config (or a ``config.json`` read as a dict); None for a model type not in the table."""
    model_type = config.get("model_type") if isinstance(config, dict) else getattr(config, "model_type", None)
    return next((name for name, row in FAMILIES.items() if row.model_type == model_type), None)


def check_attention(config: PretrainedConfig, key: str) -> None:
    """Refuse a config with sliding-window attention (``key`` names the setting): atspeed's tree mask is a 4D mask,
    which Hugging Face models take as is, without the window, so decoding would differ from the model's own."""
    layers = getattr(config, "layer_types", None) or []
    if getattr(config, "use_sliding_window", False) or "sliding_attention" in layers:
        raise DataError(
            f"{key}: the model uses sliding-window attention ({config.model_type}: use_sliding_window / layer_types), "
            "which atspeed's tree attention mask cannot express; use a checkpoint with full attention in every layer"
        )
