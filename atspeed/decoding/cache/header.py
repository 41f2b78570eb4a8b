"""The prompt header every request shares (the instruction), computed once per model and reused by every batch.

``PromptHeader`` learns the header as the longest common token prefix of the prompts it has seen (at least two, and
at least ``min_tokens`` long; it only ever shrinks, when a prompt disagrees), so it needs no knowledge of the
template or the tokenizer. Its keys and values are computed once per model (batch 1) and copied into each batch's
fresh cache; the batch then runs only the rest of each prompt (``Prompts``), whose tokens attend the whole header.
Positions are unchanged (the header takes 0..H-1 in every row, as it does in the full prompt), so the decoders see
the same sequences; the numbers differ from a full-prompt prefill only by float rounding (other matrix shapes).
The keys/values are kept per model object: a model whose weights change (a draft in training) needs a new header,
which is why one-shot ``decode()`` builds a fresh one every call and only long-lived ``BoundDecoder``s keep one.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from transformers import DynamicCache

from atspeed.decoding import constants
from atspeed.decoding.cache import kv_cache
from atspeed.decoding.cache.tree_attention import prefill


@dataclass(frozen=True)
class Prompts:
    """Left-padded prompt tokens still to run [B, P'] with their ``mask``, behind ``past`` cached header positions
    that every row attends (0 without a header)."""

    input_ids: torch.Tensor
    mask: torch.Tensor
    past: int = 0
    header: PromptHeader | None = None

    @property
    def visible(self) -> torch.Tensor:
        """[B, past + P'] the cache positions each prompt occupies (the header's, then its own real tokens)."""
        ones = self.mask.new_ones(self.mask.shape[0], self.past)
        return torch.cat([ones, self.mask], dim=1).bool()

    def cache(self, model: torch.nn.Module, rows: int) -> DynamicCache:
        """A cache for ``rows`` requests holding the header (empty without one)."""
        return kv_cache.new_cache() if self.header is None else self.header.cache(model, rows)

    def select(self, rows: torch.Tensor) -> Prompts:
        return Prompts(self.input_ids[rows], self.mask[rows], self.past, self.header)


@dataclass
class PromptHeader:
    """The shared header's tokens, learned from the prompts observed, and its keys/values per model."""

    min_tokens: int = 8
    tokens: torch.Tensor | None = None  # [H]
    prompts_seen: int = 0
    _kv: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = field(default_factory=dict, repr=False)
    _candidate: torch.Tensor | None = field(default=None, repr=False)  # row 0 of the first batch, left-aligned

    def observe(self, input_ids: torch.Tensor, mask: torch.Tensor) -> None:
        """Shrink the header to the common prefix of itself and every prompt of the batch (one host sync; decoders
        that check their prompts too read both back at once: ``common_length`` + ``shrink``)."""
        self.shrink(int(self.common_length(input_ids, mask)), input_ids.shape[0])

    def common_length(self, input_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """[] on the device: how much of the header (first: of row 0's prompt without its last token, as a header
        never takes a whole prompt) every prompt of the batch starts with."""
        lengths = mask.long().sum(1)  # [B]
        p = input_ids.shape[1]
        start = p - lengths  # [B] first real column
        ref = self.tokens
        if ref is None:  # row 0's real tokens, left-aligned (only the first lengths[0] - 1 can count)
            ref = self._candidate = input_ids[0].gather(
                0, (start[0] + torch.arange(p, device=input_ids.device)).clamp(max=p - 1)
            )
        h = ref.numel()
        if h == 0:
            return lengths.new_zeros(())
        steps = constants.arange(h, input_ids.device)
        same = input_ids.gather(1, (start[:, None] + steps).clamp(max=p - 1)) == ref[None, :]
        same &= steps < (lengths - 1)[:, None]
        return same.long().cumprod(1).sum(1).min()

    def shrink(self, common: int, batch: int) -> None:
        """Keep the first ``common`` header tokens (``common_length``, read back), after a batch of ``batch``."""
        if self.tokens is None:
            self.tokens = self._candidate[:common].clone()
        elif common < self.tokens.numel():
            self.tokens, self._kv = self.tokens[:common], {}
        self.prompts_seen += batch

    @property
    def usable(self) -> bool:
        return self.prompts_seen >= 2 and self.tokens is not None and self.tokens.numel() >= self.min_tokens

    def split(self, input_ids: torch.Tensor, mask: torch.Tensor) -> Prompts:
        """The batch without its header tokens (after ``observe``), or whole when no header is usable yet."""
        if not self.usable:
            return Prompts(input_ids, mask)
        h, p = self.tokens.numel(), input_ids.shape[1]
        start = p - mask.long().sum(1)  # [B]
        index = constants.arange(p - h, input_ids.device)
        source = torch.where(index < start[:, None], index, index + h)  # padding, then the rest of the prompt
        return Prompts(input_ids.gather(1, source), mask.gather(1, source), h, self)

    def cache(self, model: torch.nn.Module, rows: int) -> DynamicCache:
        """A fresh cache holding the header for ``rows`` requests (its keys/values computed on first use)."""
        key = id(model)
        if key not in self._kv:
            cache = kv_cache.new_cache()
            tokens = self.tokens.to(next(model.parameters()).device)[None]
            prefill(model, cache, tokens, torch.ones_like(tokens))
            self._kv[key] = kv_cache.layer_states(cache)
        return kv_cache.cache_holding(self._kv[key], rows)
