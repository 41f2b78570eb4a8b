"""Acceptance (step 3 of the speculative loop): walk the verified tree level by level with a verification rule.

Every row decides on the device: the walk runs a fixed G + 1 levels (the last one is the bonus step), rows that
stopped keep their verdict through masks, and nothing is read back to the host; the loop reads the verdicts once
per call (``speculative``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from atspeed.decoding.adaptive import needed_budgets
from atspeed.decoding.beam import BeamState, candidates
from atspeed.decoding.draft_tree import NodeTable, TokenTree
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
    chosen: tuple[torch.Tensor, ...] = ()  # per drafted level g: [B, K] nodes chosen there (rows that accepted g)


def decide(
    logits: torch.Tensor,
    tree: TokenTree,
    table: NodeTable,
    beams: BeamState,
    levels: int,
    trie: PrefixTrie,
    verify_level: VerifyLevel,
    generator: torch.Generator | None,
    grid=None,
) -> Verdict:
    """Walk the tree's G levels and the bonus level with ``verify_level``; a row stops at its first rejection.
    ``grid`` (node logits [B, K, V], nodes [B, K], their scores, trie states) -> scores [B, K * V] of every extension
    (None: ``candidates``; ``keyed.TreeKeys.grid``: keyed Gumbel keys)."""
    b, k = beams.scores.shape
    remaining = levels - beams.depth  # [B]
    reachable = remaining.clamp(max=tree.levels)
    current = torch.arange(k, device=logits.device).expand(b, k)
    scores, trie_states = beams.scores, beams.trie_states
    active = torch.ones(b, dtype=torch.bool, device=logits.device)
    verdict = Verdict(torch.zeros_like(remaining), current, torch.zeros_like(current), scores, ~active)
    chosen: list[torch.Tensor] = []
    for g in range(1, tree.levels + 2):  # fixed count: no row's progress is read back
        node_logits = logits.gather(1, current[..., None].expand(b, k, logits.shape[2]))  # [B, K, V]
        if grid is None:
            cand = candidates(node_logits, scores, trie_states, trie)
        else:
            cand = grid(node_logits, current, scores, trie_states)
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
        if g <= tree.levels:
            chosen.append(d.next_nodes)
        current = torch.where(keep, d.next_nodes, current)
        scores = torch.where(keep, d.next_scores, scores)
        trie_states = torch.where(keep, table.trie_states.gather(1, current), trie_states)
        active = ok
    return dataclasses.replace(verdict, chosen=tuple(chosen))


def beam_step(logits: torch.Tensor, beams: BeamState, trie: PrefixTrie, select, grid=None) -> Verdict:
    """The verdict of a call with an empty tree: K new beams chosen from the beams' next-token ``logits`` [B, K, V]
    (``grid`` as in ``decide``)."""
    b, k, vocab = logits.shape
    if grid is None:
        cand = candidates(logits, beams.scores, beams.trie_states, trie)
    else:
        cand = grid(logits, torch.arange(k, device=logits.device).expand(b, k), beams.scores, beams.trie_states)
    parents, tokens, scores = select(cand, k, vocab)
    none = torch.zeros(b, dtype=torch.long, device=logits.device)
    return Verdict(none, parents, tokens, scores, none.bool())


def needed(tree: TokenTree, verdict: Verdict, by_score: bool) -> torch.Tensor:
    """[B, G] budgets that would have kept each accepted depth (``adaptive.needed_budgets``)."""
    if tree.levels == 0:
        return tree.log_q.new_zeros(tree.log_q.shape[0], 0, dtype=torch.long)
    return needed_budgets(tree, list(verdict.chosen), by_score)
