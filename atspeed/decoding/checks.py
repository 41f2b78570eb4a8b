"""What every decoder checks before it decodes: prompts left-padded and non-empty, K within the items, the levels of
the trie, prompts that fit a model's context (pure checks; ``BoundDecoder`` runs them once per decoder or batch)."""

from __future__ import annotations

import torch

from atspeed.decoding.settings import DecodeSettings
from atspeed.errors import DataError
from atspeed.items.trie import PrefixTrie


def vocab_size(model: torch.nn.Module) -> int:
    return int(model.get_output_embeddings().weight.shape[0])


def check_levels(settings: DecodeSettings, trie: PrefixTrie) -> None:
    if settings.levels != trie.levels:
        raise ValueError(f"levels = {settings.levels}, but the trie's identifiers have {trie.levels} tokens")


def check_prompts(input_ids: torch.Tensor, mask: torch.Tensor, bad: int | None = None) -> None:
    """A non-empty left-padded prompt [B, P] for every request: each mask row is 0s then 1s (a 0 after a 1, right or
    inner padding, would shift the positions and the last-token logits). ``bad``: ``prompt_faults`` already read
    back (the bound decoder reads it with the header's length in one host sync); read here otherwise. The message is
    built only on failure."""
    check_prompt_shapes(input_ids, mask)
    if (int(prompt_faults(mask)) if bad is None else bad) == 0:
        return
    m = mask.bool()  # the failure path may read back freely
    present, left = m.any(1), (m[:, 1:] >= m[:, :-1]).all(1)
    empty, right = (~present).nonzero().flatten().tolist(), (~left).nonzero().flatten().tolist()
    if empty:
        raise ValueError(f"request {empty[0]} of the batch has an empty prompt ({len(empty)} empty in all)")
    raise ValueError(
        f"request {right[0]} of the batch is not left-padded (its attention mask has a 0 after a 1; "
        f"{len(right)} such rows in all): pad prompts on the left"
    )


def check_prompt_shapes(input_ids: torch.Tensor, mask: torch.Tensor) -> None:
    """Prompts [B, P] with P > 0 and a mask of the same shape (no read-back)."""
    if input_ids.ndim != 2 or mask.shape != input_ids.shape:
        raise ValueError(f"prompts must be [B, P] with a mask of the same shape, got {tuple(input_ids.shape)} and "
                         f"{tuple(mask.shape)}")  # fmt: skip
    if not input_ids.shape[1]:
        raise ValueError(f"request 0 of the batch has an empty prompt ({len(input_ids)} empty in all)")


def prompt_faults(mask: torch.Tensor) -> torch.Tensor:
    """[] on the device: how many prompts of the batch are empty or not left-padded (a 0 after a 1)."""
    m = mask.bool()
    return (~(m.any(1) & (m[:, 1:] >= m[:, :-1]).all(1))).sum()


def check_list_length(k: int, num_items: int, key: str) -> None:
    """A top-``k`` list of distinct items needs at least ``k`` items in the index."""
    if k > num_items:
        raise DataError(f"{key}: K = {k} exceeds the {num_items} items of the index: lists hold distinct items")


def check_context(model, prompt_tokens: int, levels: int, what: str = "target") -> None:
    """Prompts of ``prompt_tokens`` plus ``levels`` identifier tokens must fit the context of ``model`` (a model,
    or its config alone, so the check can run before any weights load)."""
    limit = getattr(getattr(model, "config", model), "max_position_embeddings", None)
    if limit is not None and prompt_tokens + levels > limit:
        raise DataError(
            f"prompts of {prompt_tokens} tokens + {levels} identifier tokens exceed the {what}'s context of {limit} "
            "positions: lower data.max_history"
        )
