"""Tree attention through the public Hugging Face interface: a float 4D mask plus explicit ``position_ids``.

A forward appends Q new tokens ("nodes") after the S positions already in the cache. Node i may attend the cached
positions ``past[b, i]`` and the new nodes ``tree[b, i]`` (its ancestors and itself). The mask handed to the model
is [B, 1, Q, S + Q] with 0 where attention is allowed and the dtype's minimum elsewhere (a bool mask is read
differently by the eager path, so atspeed always passes floats). Every node sees at least itself, so no row of
the mask is fully blocked (sdpa would return NaN there).

Only some attention implementations read such a mask: ``sdpa``, ``eager`` and ``flex_attention``. Others (e.g.
``flash_attention_2``) take a 4D mask for a padding mask and attend wrongly without an error, so ``check_attention``
switches a model to ``sdpa`` before it decodes.
"""

from __future__ import annotations

import logging
import weakref

import torch
from transformers import DynamicCache

from atspeed.decoding import constants

log = logging.getLogger(__name__)

TREE_ATTENTION = ("sdpa", "eager", "flex_attention")  # the implementations that read a 4D float mask as given


def check_attention(model: torch.nn.Module) -> None:
    """Make ``model`` attend through an implementation of ``TREE_ATTENTION``: any other is switched to ``sdpa``
    (one logged line); a model that cannot switch is refused. Models without a Hugging Face config pass as they are.
    """
    config = getattr(model, "config", None)
    current = getattr(config, "_attn_implementation", None)
    if current is None or current in TREE_ATTENTION:
        return
    try:
        model.set_attn_implementation("sdpa")
    except (AttributeError, ImportError, ValueError) as err:
        raise ValueError(
            f"attention implementation {current!r} cannot read atspeed's 4D tree mask and the model cannot switch to "
            f"sdpa ({err}); load it with attn_implementation='sdpa'"
        ) from None
    if model.config._attn_implementation != "sdpa":
        raise ValueError(f"attention implementation {current!r} cannot read atspeed's 4D tree mask; use sdpa")
    log.warning("attention implementation %s cannot read the 4D tree mask: switched to sdpa", current)


def model_dtype(model: torch.nn.Module) -> torch.dtype:
    """The dtype of the model's first parameter (cheap: Hugging Face's ``dtype`` property walks every parameter)."""
    first = next(model.parameters(), None)
    if first is not None:
        return first.dtype
    dtype = getattr(model, "dtype", None)
    return dtype if isinstance(dtype, torch.dtype) else torch.float32


_FP32_HEADS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _fp32_head(model: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A float32 copy of the output embedding (weight, bias), made once per model, device and weight version (a
    draft validated while it trains gets a fresh copy after each optimizer step)."""
    head = model.get_output_embeddings()
    weight = head.weight
    cached = _FP32_HEADS.get(model)
    if cached is None or cached[2] is not weight or cached[3] != weight._version:
        bias = getattr(head, "bias", None)
        cached = (weight.detach().float(), None if bias is None else bias.detach().float(), weight, weight._version)
        _FP32_HEADS[model] = cached
    return cached[0], cached[1]


def run_model(model: torch.nn.Module, keep: int, **inputs) -> torch.Tensor:
    """float32 logits [B, Q or keep, V] of ``model`` on ``inputs`` (a forward that fills the cache).

    A float32 model returns them as they are. A lower-precision one (bf16/fp16) runs its body in its own dtype and
    its final hidden state goes through the output embedding in float32 (``_fp32_head``): bf16 logits come in steps
    of 0.06-0.125 at the values decoding meets, which turns close candidates into exact ties. Models without a
    ``base_model`` body (test stubs) return their logits as float32.
    """
    body = getattr(model, "base_model", model)
    if model_dtype(model) == torch.float32 or body is model:
        return model(**inputs, use_cache=True, logits_to_keep=keep).logits.float()
    hidden = body(**inputs, use_cache=True).last_hidden_state
    hidden = hidden[:, -keep:] if keep else hidden
    weight, bias = _fp32_head(model)
    return torch.nn.functional.linear(hidden.float(), weight, bias)


def float_mask(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[B, Q, S + Q] bool -> [B, 1, Q, S + Q] additive float mask."""
    attend, blocked = constants.mask_values(dtype, allowed.device)
    return torch.where(allowed[:, None], attend, blocked)


def forward_tree(
    model: torch.nn.Module,
    cache: DynamicCache,
    tokens: torch.Tensor,
    positions: torch.Tensor,
    past: torch.Tensor,
    tree: torch.Tensor,
    keep: int = 0,
    diagonal: bool = False,
) -> torch.Tensor:
    """Run ``model`` on nodes ``tokens`` [B, Q] at ``positions`` [B, Q]; append them to ``cache``.

    ``past`` [B, Q, S] and ``tree`` [B, Q, Q] (bool) say what each node attends; every node attends itself too
    (``diagonal``: ``tree`` already says so). Returns float32 logits [B, Q, V], or of the last ``keep`` nodes only
    when ``keep`` > 0.
    """
    own = tree if diagonal else tree | constants.eye(tokens.shape[1], tokens.device)
    allowed = torch.cat([past, own], dim=2)  # [B, Q, S + Q]
    return run_model(
        model, keep, input_ids=tokens, attention_mask=float_mask(allowed, model_dtype(model)), position_ids=positions,
        past_key_values=cache,
    )  # fmt: skip


def prompt_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids [B, P] of left-padded prompts: 0.. on real tokens (as Hugging Face ``generate`` counts)."""
    return (attention_mask.long().cumsum(1) - 1).clamp(min=0)


def prefill(
    model: torch.nn.Module,
    cache: DynamicCache,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    past: int = 0,
) -> torch.Tensor:
    """Run the left-padded prompts [B, P] into ``cache``; float32 logits [B, V] at the last position.

    With ``past`` > 0 the cache already holds that many positions (a shared header) which every prompt token attends,
    and the prompts' positions start after them.
    """
    real = attention_mask.bool()  # [B, P]
    b, p = input_ids.shape
    causal = constants.tril(p, input_ids.device)
    allowed = causal & real[:, None, :]  # [B, P, P]; pad rows keep their diagonal (see forward_tree)
    allowed |= constants.eye(p, input_ids.device)
    allowed = torch.cat([real.new_ones(b, p, past), allowed], dim=2)
    return run_model(
        model, 1, input_ids=input_ids, attention_mask=float_mask(allowed, model_dtype(model)),
        position_ids=past + prompt_positions(attention_mask), past_key_values=cache,
    )[:, -1]  # fmt: skip
