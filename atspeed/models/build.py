"""Build a causal LM of a model family (``atspeed.models.families``) from a small spec, or load one from a local path,
sized to a tokenizer."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from jsonargparse.typing import PositiveInt
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase

from atspeed.models.families import Family, check_attention, family_config, random_model
from atspeed.models.zero3 import hf_zero3
from atspeed.preflight import check_model_weights

# Attention implementations that read atspeed's 4D float tree mask (``atspeed.decoding.cache.tree_attention``): every
# stage decodes (SFT and alignment validate by decoding), so flash_attention_2, which would read that mask as padding,
# is refused when the config is parsed.
Attention = Literal["sdpa", "eager", "flex_attention"]
# The weights' torch dtype, named ``dtype`` in every stage (the model built or trained: ``model.dtype``; the models
# loaded for inference: the teacher's, the alignment's frozen target, the decoding stage's target and draft).
DType = Literal["float32", "bfloat16", "float16"]


@dataclass
class ModelSpec:
    """Which causal LM to use: a local Hugging Face checkpoint, or a model of ``family`` built from these sizes."""

    path: str | None = None
    """Local Hugging Face checkpoint directory; when set, the family and size fields below are ignored (the
    checkpoint's config.json says them)."""
    family: Family = "llama"
    """Model family built from scratch (``atspeed.models.families.FAMILIES``): llama or qwen2."""
    hidden_size: PositiveInt = 128
    """Width of the model built from scratch."""
    num_layers: PositiveInt = 2
    """Decoder layers of the model built from scratch."""
    num_heads: PositiveInt = 4
    """Attention heads of the model built from scratch."""
    intermediate_size: PositiveInt | None = None
    """MLP width; default 4 x hidden_size."""
    max_positions: PositiveInt = 256
    """Context length of the model built from scratch (prompt + identifier)."""
    dtype: DType = "float32"
    """torch dtype name of the weights, e.g. float32 or bfloat16."""
    attn_implementation: Attention = "sdpa"
    """Hugging Face attention implementation (one that reads the tree mask; flash_attention_2 does not)."""

    def __post_init__(self) -> None:
        for key in ("hidden_size", "num_layers", "num_heads", "max_positions"):
            if getattr(self, key) < 1:
                raise ValueError(f"model.{key} must be >= 1, got {getattr(self, key)}")
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"model.hidden_size ({self.hidden_size}) must divide by model.num_heads ({self.num_heads})"
            )
        if not isinstance(getattr(torch, self.dtype, None), torch.dtype):
            raise ValueError(f"model.dtype: unknown torch dtype {self.dtype!r}")
        if self.path is not None and not Path(self.path).is_dir():
            raise ValueError(f"model.path: directory not found: {self.path}")
        if self.path is not None:
            check_model_weights(self.path, "model.path")
            model_config(self.path, "model.path")


@dataclass
class LoraSpec:
    """LoRA through peft; the new identifier-token rows of the embedding and output layers still train."""

    r: int = 8
    alpha: int = 16
    dropout: float = 0.05
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])
    train_new_tokens: bool = True
    """Train the identifier tokens' embedding and output rows (peft trainable tokens)."""


def model_config(spec_or_path: ModelSpec | str | Path, key: str = "model") -> PretrainedConfig | None:
    """The config of a local checkpoint (read without loading weights), refused (``DataError`` naming ``key``) when its
    attention cannot take the tree mask (``families.check_attention``); None for a model built from sizes."""
    path = spec_or_path.path if isinstance(spec_or_path, ModelSpec) else spec_or_path
    if path is None:
        return None
    config = AutoConfig.from_pretrained(str(path), local_files_only=True, trust_remote_code=False)
    check_attention(config, f"{key} ({path})")
    return config


def context_length(spec: ModelSpec) -> int | None:
    """Positions the model of ``spec`` can attend, known before it is built (None: no fixed limit)."""
    config = model_config(spec)
    return spec.max_positions if config is None else getattr(config, "max_position_embeddings", None)


_outside_depth = 0  # open ``outside_zero_init`` contexts


@contextlib.contextmanager
def outside_zero_init() -> Iterator[None]:
    """Build modules whole inside DeepSpeed ZeRO-3's ``zero.Init`` (Lightning enters it around ``configure_model``):
    there transformers 5 would initialise weights on already partitioned, empty tensors and fail. Models built from
    sizes, drafts and LoRA adapters are built so; ``deepspeed.initialize`` partitions them right after (each process
    holds them whole for a moment). A checkpoint loads partitioned instead (``build_causal_lm``'s ``zero3``)."""
    global _outside_depth
    zero = sys.modules.get("deepspeed.runtime.zero.partition_parameters")  # never imports DeepSpeed itself
    if zero is None or not zero.zero_init_context or _outside_depth:  # nested: the outermost one restores
        yield
        return
    zero.shutdown_init_context()
    _outside_depth += 1
    try:
        yield
    finally:
        _outside_depth -= 1
        zero.restore_init_context()


def gathered_parameters(params: Iterable[torch.nn.Parameter]) -> contextlib.AbstractContextManager:
    """Context in which the ZeRO-3 partitioned ``params`` are whole on every rank (every rank must enter it); a no-op
    for parameters DeepSpeed does not partition (any other strategy, ZeRO-1/2)."""
    partitioned = [p for p in params if hasattr(p, "ds_id")]
    if not partitioned:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(partitioned, modifier_rank=None)


def unpartitioned(model: PreTrainedModel) -> PreTrainedModel:
    """``model`` itself, or when ZeRO-3 partitions its parameters over the processes, a plain copy in eval mode with
    the whole weights, gathered once (a collective: every process must call this). Decoding needs it: how many
    forwards a batch takes depends on its data, and each forward of a partitioned model is a collective that every
    process would have to join as often."""
    params = list(model.parameters())
    if not any(hasattr(param, "ds_id") for param in params):  # DeepSpeed marks the parameters it partitions
        return model
    with gathered_parameters(model.parameters()):
        weights = {name: param.detach().clone() for name, param in model.named_parameters()}
    with outside_zero_init():
        whole = type(model)(model.config)
    missing, unexpected = whole.load_state_dict(weights, strict=False)
    if unexpected or set(missing) - {name for name, _ in whole.named_buffers()}:
        raise RuntimeError(f"gathering the partitioned model: missing {missing}, unexpected {unexpected}")
    return whole.to(device=params[0].device, dtype=params[0].dtype).eval()


def build_causal_lm(
    spec: ModelSpec, tokenizer: PreTrainedTokenizerBase, seed: int = 0, zero3: dict | None = None
) -> PreTrainedModel:
    """A causal LM whose vocabulary covers ``tokenizer`` (embeddings resized for new tokens).

    ``zero3``: the run's DeepSpeed config when called inside ZeRO-3's ``zero.Init`` (``zero3.zero3_config``): a
    checkpoint then loads partitioned, each process holding its share only and rank 0 alone reading the file
    (``atspeed.models.zero3``). A model built from sizes is built whole on every process, outside ``zero.Init``, and
    partitioned by ``deepspeed.initialize`` (its weights do not depend on the number of processes)."""
    dtype = getattr(torch, spec.dtype)
    if spec.path is not None:
        with hf_zero3(zero3) if zero3 is not None else outside_zero_init():
            model = AutoModelForCausalLM.from_pretrained(
                spec.path,
                local_files_only=True,
                trust_remote_code=False,
                weights_only=True,
                dtype=dtype,
                attn_implementation=spec.attn_implementation,
            )
        if model.get_input_embeddings().num_embeddings < len(tokenizer):
            # transformers builds the grown embeddings whole (outside zero.Init) and gathers the old ones to fill them
            with outside_zero_init(), hf_zero3(zero3):
                model.resize_token_embeddings(len(tokenizer))
        return model.train()  # from_pretrained returns eval mode: dropout (LoRA's included) would stay off in training
    config = family_config(
        spec.family,
        vocab_size=len(tokenizer),
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size or 4 * spec.hidden_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        max_position_embeddings=spec.max_positions,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
        attn_implementation=spec.attn_implementation,
    )
    with outside_zero_init():
        model = random_model(config, seed)
    return model.to(dtype).train()


def load_model(path: str | Path, dtype: DType = "float32", attn_implementation: Attention = "sdpa") -> PreTrainedModel:
    """A causal LM saved with ``save_pretrained`` in local directory ``path`` (no remote code), in eval mode, with
    ``attn_implementation`` whatever its saved config asks for."""
    if not isinstance(getattr(torch, dtype, None), torch.dtype):
        raise ValueError(f"unknown torch dtype {dtype!r}")
    model_config(path, "model")
    model = AutoModelForCausalLM.from_pretrained(
        str(path), local_files_only=True, trust_remote_code=False, weights_only=True, dtype=getattr(torch, dtype),
        attn_implementation=attn_implementation,
    )  # fmt: skip
    return model.eval()


def apply_lora(model: PreTrainedModel, spec: LoraSpec, new_token_ids: list[int]) -> PeftModel:
    """Wrap ``model`` with LoRA adapters; ``new_token_ids`` rows of input and output embeddings stay trainable.

    On a ZeRO-3 partitioned model the adapters are built whole, outside ``zero.Init`` (peft initialises them in place,
    which a partitioned tensor would ignore; ``deepspeed.initialize`` partitions them), and the embedding tables are
    gathered while peft copies the identifier rows (peft's own ZeRO-3 path there is CUDA-only)."""
    trainable = None
    if spec.train_new_tokens:
        names = {"embed_tokens": new_token_ids}
        if not model.config.tie_word_embeddings:
            names["lm_head"] = new_token_ids
        trainable = names
    config = LoraConfig(
        r=spec.r,
        lora_alpha=spec.alpha,
        lora_dropout=spec.dropout,
        target_modules=spec.target_modules,
        trainable_token_indices=trainable,
        task_type="CAUSAL_LM",
    )
    tables = [m.weight for m in (model.get_input_embeddings(), model.get_output_embeddings()) if m is not None]
    with outside_zero_init(), gathered_parameters(tables):
        return get_peft_model(model, config)
