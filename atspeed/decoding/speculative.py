"""Speculative beam search: the draft proposes a token tree, the target verifies it in one forward.

One iteration for a batch of B requests (each at its own depth; SPEC section 5):

1. the draft runs G = min(gamma, levels left) beam steps of width N from the target's K beams and their target
   scores (``draft_tree``);
2. the target runs ONE forward over the K beams' newest tokens plus the tree (tree attention);
3. a verification rule (``strict`` or ``relaxed``) walks the levels: each row accepts m levels and gets K new beams
   at depth m + 1 (a correction, or the bonus step when all of its levels passed): m + 1 tokens per target call;
4. both caches keep only what the new beams attend (the accepted paths); finished requests leave the batch.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass

import torch
from transformers import DynamicCache

from atspeed.decoding import kv_cache
from atspeed.decoding.beam import BeamState, candidates, extend, root_state, select_sample, select_top
from atspeed.decoding.draft_tree import NodeTable, TokenTree, draft_tree
from atspeed.decoding.output import DecodeOutput, StageClock
from atspeed.decoding.tree_attention import forward_tree, prefill
from atspeed.decoding.verify import LevelInput, VerifyLevel
from atspeed.items.trie import PrefixTrie


@dataclass(frozen=True)
class Verdict:
    """Per row: ``accepted`` levels m, then K new beams = node ``nodes`` + ``tokens`` (none where ``complete``)."""

    accepted: torch.Tensor  # [B]
    nodes: torch.Tensor  # [B, K] parent node ids (level m)
    tokens: torch.Tensor  # [B, K]
    scores: torch.Tensor  # [B, K]
    complete: torch.Tensor  # [B] the accepted nodes already hold all L tokens


def _verify_forward(
    target: torch.nn.Module, cache: DynamicCache, beams: BeamState, tree: TokenTree
) -> tuple[torch.Tensor, torch.Tensor]:
    """Target logits at every tree node [B, Q, V] and what each node attends [B, Q, S + Q]."""
    if not bool((beams.depth - beams.fed == 1).all()):
        raise RuntimeError("target beams must have exactly one unfed token before verification")
    b, k, s = beams.visible.shape
    anc, root = tree.ancestry()  # [B, Q, Q], [B, Q]
    newest = beams.sequences.gather(2, (beams.depth - 1)[:, None, None].expand(b, k, 1))[..., 0]  # [B, K]
    tokens = torch.cat([newest, tree.tokens.reshape(b, -1)], dim=1)  # [B, Q]
    level = torch.arange(tree.levels + 1, device=tokens.device).repeat_interleave(
        torch.tensor([k] + [tree.width] * tree.levels, device=tokens.device)
    )  # [Q]
    positions = (beams.prompt_lengths + beams.depth - 1)[:, None] + level[None, :]
    past = beams.visible.gather(1, root[..., None].expand(b, tree.num_nodes, s))  # [B, Q, S]
    logits = forward_tree(target, cache, tokens, positions, past, anc)
    return logits, torch.cat([past, anc], dim=2)


def _decide(
    logits: torch.Tensor,
    tree: TokenTree,
    table: NodeTable,
    beams: BeamState,
    levels: int,
    trie: PrefixTrie,
    verify_level: VerifyLevel,
    generator: torch.Generator | None,
) -> Verdict:
    """Walk the tree level by level with ``verify_level`` until every row has stopped."""
    b, k = beams.scores.shape
    remaining = levels - beams.depth  # [B]
    reachable = remaining.clamp(max=tree.levels)
    current = torch.arange(k, device=logits.device).expand(b, k)
    scores, trie_states = beams.scores, beams.trie_states
    active = torch.ones(b, dtype=torch.bool, device=logits.device)
    verdict = Verdict(torch.zeros_like(remaining), current, torch.zeros_like(current), scores, ~active)
    for g in range(1, tree.levels + 2):
        if not bool(active.any()):
            break
        node_logits = logits.gather(1, current[..., None].expand(b, k, logits.shape[2]))  # [B, K, V]
        cand = candidates(node_logits, scores, trie_states, trie)
        d = verify_level(LevelInput(cand, current, g, active & (g <= reachable), tree, generator))
        ok = active & d.ok
        stop = (active & ~ok)[:, None]  # [B, 1]
        complete = stop[:, 0] & (remaining == g - 1)  # [B] nothing left to choose
        full = complete[:, None]
        verdict = Verdict(
            accepted=torch.where(stop[:, 0], g - 1, verdict.accepted),
            nodes=torch.where(stop, torch.where(full, current, current.gather(1, d.stop_parents)), verdict.nodes),
            tokens=torch.where(stop, d.stop_tokens, verdict.tokens),
            scores=torch.where(stop, torch.where(full, scores, d.stop_scores), verdict.scores),
            complete=verdict.complete | complete,
        )
        keep = ok[:, None]
        current = torch.where(keep, d.next_nodes, current)
        scores = torch.where(keep, d.next_scores, scores)
        trie_states = torch.where(keep, table.trie_states.gather(1, current), trie_states)
        active = ok
    return verdict


def _compact(cache: DynamicCache, beams: BeamState) -> BeamState:
    """Keep only the cache positions some beam attends; re-express ``visible`` over the kept ones."""
    index, kept = kv_cache.keep_index(beams.visible.any(1))
    kv_cache.gather_positions(cache, index)
    return beams.gather_visible(index, kept)


@dataclass(frozen=True)
class DecodeOutputBuffer:
    """Finished lists, filled as requests leave the batch: [B, K, L] and [B, K]."""

    sequences: torch.Tensor
    scores: torch.Tensor


def _retire(
    finished: torch.Tensor, rows: torch.Tensor, beams: tuple[BeamState, BeamState], caches, out: DecodeOutputBuffer
) -> tuple[torch.Tensor, tuple[BeamState, BeamState]]:
    """Copy finished rows' beams to ``out`` and drop them from the batch (states and both caches)."""
    t_beams, d_beams = beams
    done = finished.nonzero()[:, 0]
    out.sequences[rows[done]] = t_beams.sequences[done, :, : out.sequences.shape[2]]
    out.scores[rows[done]] = t_beams.scores[done]
    going = (~finished).nonzero()[:, 0]
    for cache in caches:
        kv_cache.select_rows(cache, going)
    return rows[going], (t_beams.select_rows(going), d_beams.select_rows(going))


def speculative_decode(
    target: torch.nn.Module,
    draft: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    trie: PrefixTrie,
    num_beams: int,
    levels: int,
    draft_beams: int,
    gamma: int,
    verify_level: VerifyLevel,
    sample: bool = False,
    generator: torch.Generator | None = None,
) -> DecodeOutput:
    """Top-``num_beams`` identifiers of ``levels`` tokens per left-padded prompt [B, P], drafted ``gamma`` deep."""
    if sample and generator is None:
        raise ValueError("relaxed (sampling) decoding needs a generator")
    b, device = input_ids.shape[0], input_ids.device
    select = functools.partial(select_sample, generator=generator) if sample else select_top
    clock = StageClock(device)
    caches = (kv_cache.new_cache(), kv_cache.new_cache())  # target, draft
    clock.switch("verify")
    logits = prefill(target, caches[0], input_ids, attention_mask)  # [B, V]
    clock.switch("draft")
    prefill(draft, caches[1], input_ids, attention_mask)
    clock.switch("other")
    root = root_state(attention_mask, levels + gamma + 1)
    first = select(candidates(logits[:, None], root.scores, root.trie_states, trie), num_beams, logits.shape[-1])
    t_beams = d_beams = extend(root, *first, trie)  # both caches hold just the prompts: same view
    out = DecodeOutputBuffer(
        torch.zeros(b, num_beams, levels, dtype=torch.long, device=device), torch.zeros(b, num_beams, device=device)
    )
    target_calls, draft_calls = torch.ones(b, dtype=torch.long), torch.ones(b, dtype=torch.long)
    accepted: list[torch.Tensor] = []
    rows = torch.arange(b, device=device)  # original index of each row still decoding
    while True:
        finished = t_beams.depth >= levels
        if bool(finished.any()):
            rows, (t_beams, d_beams) = _retire(finished, rows, (t_beams, d_beams), caches, out)
        if rows.numel() == 0:
            break
        t_beams, d_beams = _compact(caches[0], t_beams), _compact(caches[1], d_beams)
        g = min(gamma, int((levels - t_beams.depth).max()))
        clock.switch("draft")
        tree, table = draft_tree(draft, caches[1], d_beams, trie, draft_beams, g, select, keep_distributions=sample)
        clock.switch("verify")
        logits, node_visible = _verify_forward(target, caches[0], t_beams, tree)
        verdict = _decide(logits, tree, table, t_beams, levels, trie, verify_level, generator)
        clock.switch("other")
        target_calls[rows.cpu()] += 1
        draft_calls[rows.cpu()] += g
        accepted.append(verdict.accepted.cpu())
        # new beams = parent node (depth + accepted) + token, except rows already complete; the draft's view of
        # the same beams differs only in what they attend in its cache and in how much of them it has fed
        depth = t_beams.depth + verdict.accepted
        nodes = verdict.nodes[..., None]
        view = table.as_beams(node_visible, depth, t_beams.prompt_lengths)
        t_beams = extend(view, verdict.nodes, verdict.tokens, verdict.scores, trie, grow=~verdict.complete)
        d_beams = dataclasses.replace(
            t_beams,
            visible=table.draft_visible.gather(1, nodes.expand(-1, -1, table.draft_visible.shape[2])),
            fed=depth - (verdict.accepted == g).long(),  # the draft never fed its last drafted level
        )
    scores, order = out.scores.sort(dim=1, descending=True, stable=True)
    sequences = out.sequences.gather(1, order[..., None].expand_as(out.sequences))
    return DecodeOutput(sequences, scores, clock.stats(target_calls, draft_calls, accepted))
