"""The target's own constrained beam search (the reference decoder and the oracle of speculative decoding).

All K beams of a request live in one cache row: the prompt is computed once (prefill), then each step feeds the K
newest tokens as one tree-masked forward, where each token sees the prompt and its own beam's tokens only. L
identifier tokens cost the prefill plus L - 1 forwards of K tokens. With ``sample=True`` the step draws its K
beams without replacement instead of taking the top K (the target side of relaxed decoding).
"""

from __future__ import annotations

import torch

from atspeed.decoding.beam import candidates, extend, feed, root_state, select_sample, select_top
from atspeed.decoding.kv_cache import new_cache
from atspeed.decoding.output import DecodeOutput, StageClock
from atspeed.decoding.tree_attention import prefill
from atspeed.items.trie import PrefixTrie


def beam_search(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    trie: PrefixTrie,
    num_beams: int,
    levels: int,
    sample: bool = False,
    generator: torch.Generator | None = None,
) -> DecodeOutput:
    """Top-``num_beams`` identifiers of ``levels`` tokens for each left-padded prompt [B, P]."""
    if sample and generator is None:
        raise ValueError("sampling beam search needs a generator")
    clock = StageClock(input_ids.device)
    cache = new_cache()
    clock.switch("verify")
    logits = prefill(model, cache, input_ids, attention_mask)[:, None]  # [B, 1, V]
    state = root_state(attention_mask, levels)
    vocab = logits.shape[-1]
    for t in range(levels):
        if t:
            clock.switch("verify")
            logits, state = feed(model, cache, state)  # [B, K, V]
        clock.switch("other")
        cand = candidates(logits, state.scores, state.trie_states, trie)
        if sample:
            parents, tokens, scores = select_sample(cand, num_beams, vocab, generator)
        else:
            parents, tokens, scores = select_top(cand, num_beams, vocab)
        state = extend(state, parents, tokens, scores, trie)
    scores, order = state.scores.sort(dim=1, descending=True, stable=True)
    sequences = state.sequences.gather(1, order[..., None].expand_as(state.sequences))
    calls = torch.full((input_ids.shape[0],), levels, dtype=torch.long)
    stats = clock.stats(calls, torch.zeros_like(calls), [])
    return DecodeOutput(sequences, scores, stats)
