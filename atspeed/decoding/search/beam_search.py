"""The target's own constrained beam search (the reference decoder and the oracle of speculative decoding).

All K beams of a request live in one cache row: the prompt is computed once (prefill), then each step feeds the K
newest tokens as one tree-masked forward, where each token sees the prompt and its own beam's tokens only. L
identifier tokens cost the prefill plus L - 1 forwards of K tokens. With ``sample=True`` the step draws its K
beams without replacement instead of taking the top K (the target side of relaxed decoding); with ``noise_keys`` it
is the keyed stochastic beam search (``keyed``: ``beam_sample_keyed``). ``lockstep_coverage``
runs the target's search with the draft alongside, measuring at every depth how much of the target's top-K the
draft's top-N covers (what strict verification needs).
"""

from __future__ import annotations

import torch

from atspeed.decoding.cache.header import PromptHeader, Prompts
from atspeed.decoding.cache.kv_cache import new_cache
from atspeed.decoding.cache.tree_attention import prefill
from atspeed.decoding.output import DecodeOutput, StageClock
from atspeed.decoding.search import keyed
from atspeed.decoding.search.beam import (
    candidates,
    extend,
    feed,
    pick,
    plain_grid,
    root_state,
    select_sample,
    select_top,
)
from atspeed.items.trie import PrefixTrie
from atspeed.metrics.coverage import coverage


def beam_search(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    trie: PrefixTrie,
    num_beams: int,
    levels: int,
    sample: bool = False,
    generator: torch.Generator | None = None,
    header: PromptHeader | None = None,
    synced_clock: bool = False,
    noise_keys: torch.Tensor | None = None,
) -> DecodeOutput:
    """Top-``num_beams`` identifiers of ``levels`` tokens for each left-padded prompt [B, P] (the shared ``header``'s
    cached keys/values reused when it has one). Nothing is read back to the host: every step feeds exactly one
    token per beam. ``noise_keys`` [B] (``keyed.request_keys``): the keyed stochastic beam search."""
    if sample and generator is None:
        raise ValueError("sampling beam search needs a generator")
    clock = StageClock(input_ids.device, sync=synced_clock)
    prompts = header.split(input_ids, attention_mask) if header is not None else Prompts(input_ids, attention_mask)
    cache = prompts.cache(model, input_ids.shape[0])
    clock.switch("verify")
    logits = prefill(model, cache, prompts.input_ids, prompts.mask, prompts.past)[:, None]  # [B, 1, V]
    state = root_state(prompts.visible, levels)
    step = plain_grid if noise_keys is None else keyed.beam_grid
    if noise_keys is not None:
        state = keyed.keyed_root(state, noise_keys)
    vocab = logits.shape[-1]
    for t in range(levels):
        if t:
            clock.switch("verify")
            logits, state = feed(model, cache, state, longest=1)  # [B, K, V]
        clock.switch("other")
        cand, log_probs = step(logits, state, trie)
        if sample:
            parents, tokens, scores = select_sample(cand, num_beams, vocab, generator)
        else:
            parents, tokens, scores = select_top(cand, num_beams, vocab)
        state = extend(state, parents, tokens, scores, trie, log_probs=pick(log_probs, parents, tokens, vocab))
    scores, order = state.list_scores.sort(dim=1, descending=True, stable=True)
    sequences = state.sequences.gather(1, order[..., None].expand_as(state.sequences))
    calls = torch.full((input_ids.shape[0],), levels, dtype=torch.long)
    stats = clock.stats(calls, torch.zeros_like(calls), [])
    return DecodeOutput(sequences, scores, stats)


def lockstep_coverage(
    target: torch.nn.Module,
    draft: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    trie: PrefixTrie,
    num_beams: int,
    draft_beams: int,
    levels: int,
) -> list[torch.Tensor]:
    """Top-K coverage per depth d = 1..levels, each [B]: the target's beam search of width K, with the draft beside it.

    At depth d both models extend the target's own K beams of depth d - 1, from the target's cumulative scores (as the
    draft does when it drafts from the target's beams): the target keeps its top K (parent, token) pairs, the draft
    its top N. coverage@d is the share of the target's K pairs among the draft's N (``atspeed.metrics.coverage``),
    which is what strict verification asks of a drafted depth; 1 at every depth means every depth would be accepted.
    Pairs the trie forbids (fewer than K valid extensions) count on neither side.
    """
    caches = {"target": new_cache(), "draft": new_cache()}
    models = {"target": target, "draft": draft}
    logits = {name: prefill(models[name], caches[name], input_ids, attention_mask)[:, None] for name in models}
    state = root_state(attention_mask, levels)
    vocab = logits["target"].shape[-1]
    out = []
    for t in range(levels):
        if t:  # both caches hold the same positions: one state describes both
            logits["draft"], _ = feed(draft, caches["draft"], state)
            logits["target"], state = feed(target, caches["target"], state)
        kept = {}
        for name, width in (("target", num_beams), ("draft", draft_beams)):
            cand = candidates(logits[name], state.scores, state.trie_states, trie)
            kept[name] = select_top(cand, min(width, cand.shape[1]), vocab)
        out.append(coverage(*(_pairs(*kept[name]) for name in ("target", "draft"))))
        state = extend(state, *kept["target"], trie)
    return out


def _pairs(parents: torch.Tensor, tokens: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    """(parent, token) pairs [B, W, 2]; pairs with no valid extension (score -inf) as -1."""
    return torch.where(torch.isfinite(scores)[..., None], torch.stack([parents, tokens], dim=2), -1)
