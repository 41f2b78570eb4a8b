"""Acceptance (step 3 of the speculative loop): walk the verified tree level by level with a verification rule.

Every row decides on the device: the walk runs a fixed G + 1 levels (the last one is the bonus step), rows that
stopped keep their verdict through masks, and nothing is read back to the host; the loop reads the verdicts once
per call (``speculative``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from atspeed.decoding import constants
from atspeed.decoding.planning.adaptive import needed_budgets
from atspeed.decoding.search.beam import BeamState, candidates
from atspeed.decoding.search.draft_tree import NodeTable, TokenTree
from atspeed.decoding.verification.verify import LevelInput, VerifyLevel
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

    Every row walks all G + 1 levels (a row that stopped goes on with meaningless beams, never read): the verdict
    is gathered at each row's stopping level once, after the walk. ``grid`` (node logits [B, K, V], nodes [B, K],
    their scores, trie states) -> scores [B, K * V] of every extension (None: ``candidates``; ``keyed.TreeKeys.grid``:
    keyed Gumbel keys)."""
    b, k = beams.scores.shape
    left = levels - beams.depth  # [B]
    reachable = left.clamp(max=tree.levels)
    current = constants.arange(k, logits.device).expand(b, k)
    rows = constants.column(b, logits.device)
    scores, trie_states = beams.scores, beams.trie_states
    oks, visited, ids, values = [], [], [], []  # per level: [B]; [B, K]; current, parents, tokens; two scores
    for g in range(1, tree.levels + 2):  # fixed count: no row's progress is read back
        # [B, K, V] the current nodes' logits (level 1: the roots, nodes 0..K-1)
        node_logits = logits[:, :k] if g == 1 else logits[rows, current]
        if grid is None:
            cand = candidates(node_logits, scores, trie_states, trie)
        else:
            cand = grid(node_logits, current, scores, trie_states)
        d = verify_level(LevelInput(cand, current, g, g <= reachable, tree, generator))
        oks.append(d.ok)
        visited.append(current)
        ids += [current, d.stop_parents, d.stop_tokens]
        values += [scores, d.stop_scores]
        current, scores = d.next_nodes, d.next_scores
        trie_states = table.trie_states.gather(1, current)
    # the stopping level: the first rejection (the bonus level never accepts); ``min`` gives the first minimum
    accepted = torch.stack(oks, 1).min(1).indices  # [B]
    at = constants.arange(b, logits.device), accepted
    current, parents, tokens = torch.stack(ids, 1).view(b, -1, 3, k)[at].unbind(1)  # from [B, G + 1, 3, K]
    scores, stop_scores = torch.stack(values, 1).view(b, -1, 2, k)[at].unbind(1)
    complete = accepted == left  # [B] nothing left to choose
    full = complete.unsqueeze(1)
    return Verdict(
        accepted=accepted,
        nodes=torch.where(full, current, current.gather(1, parents)),
        tokens=tokens,
        scores=torch.where(full, scores, stop_scores),
        complete=complete,
        chosen=tuple(visited[1 : tree.levels + 1]),
    )


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
