"""What predicts the speed of speculative decoding with a draft, measured through the real decoders on a batch.

``speed_metrics`` decodes the batch with ``spec_strict`` and with seeded ``spec_relaxed`` (mean accepted depth and
target calls per list of each) and measures the top-K coverage per depth along the target's own beam search
(``lockstep_coverage``: the share of the target's top-K extensions at depth d among the draft's top-N extensions of
the same beams; strict verification accepts a drafted depth exactly when that share is 1). The alignment stage logs
these at validation.
"""

from __future__ import annotations

import torch

from atspeed.decoding.decoders import DecodeSettings, decode
from atspeed.decoding.search.beam_search import lockstep_coverage
from atspeed.items.trie import PrefixTrie


@torch.no_grad()
def speed_metrics(
    target: torch.nn.Module,
    draft: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    trie: PrefixTrie,
    settings: DecodeSettings,
    generator: torch.Generator,
) -> dict[str, float]:
    """Means over the batch [B, P]: strict and relaxed acceptance, and ``coverage@d`` for d = 1..L."""
    prompts = (input_ids, attention_mask, trie, settings, draft)
    strict = decode("spec_strict", target, *prompts).stats.summary(settings.levels)
    relaxed = decode("spec_relaxed", target, *prompts, generator).stats.summary(settings.levels)
    per_depth = lockstep_coverage(
        target, draft, input_ids, attention_mask, trie, settings.num_beams, settings.draft_beams, settings.levels
    )
    return {
        "mean_accepted_depth": strict["mean_accepted_depth"],
        "target_calls_per_list": strict["target_calls_per_list"],
        "relaxed_accepted_depth": relaxed["mean_accepted_depth"],
        "relaxed_target_calls_per_list": relaxed["target_calls_per_list"],
        **{f"coverage@{d}": float(value.mean()) for d, value in enumerate(per_depth, start=1)},
    }
