"""Drafting: N-wide beam search of the draft for G steps from the target's K beams, and the token tree it makes.

Nodes are numbered level by level: the K current beams are level 0 (nodes 0..K-1); level g in 1..G holds N drafted
nodes ``K + (g - 1) * N + j``, each a (parent, token) pair. The target verifies all of them in one forward in which
every node sees the prompt, the fed tokens of its root beam, its ancestors in the tree and itself
(``TokenTree.ancestry``), at position prompt + depth.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import DynamicCache

from atspeed.decoding.beam import BeamState, candidates, extend, feed
from atspeed.decoding.kv_cache import cache_length
from atspeed.items.trie import PrefixTrie

Select = Callable[[torch.Tensor, int, int], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class TokenTree:
    """G levels of N drafted nodes above K roots; ``parents`` index the previous level (level 0: the roots)."""

    roots: int  # K
    parents: torch.Tensor  # [B, G, N]
    tokens: torch.Tensor  # [B, G, N]
    log_q: torch.Tensor  # [B, G, N] the draft's log-probability of each drafted sequence among its candidates
    candidate_log_q: tuple[torch.Tensor, ...]  # per level: [B, W_prev, V] draft log-probs of all candidates (relaxed)

    @property
    def levels(self) -> int:
        return self.parents.shape[1]

    @property
    def width(self) -> int:
        return self.parents.shape[2]

    @property
    def num_nodes(self) -> int:
        return self.roots + self.levels * self.width

    def offset(self, level: int) -> int:
        """Node id of the first node of ``level`` (0 = roots)."""
        return 0 if level == 0 else self.roots + (level - 1) * self.width

    def parent_nodes(self, level: int) -> torch.Tensor:
        """Node ids [B, N] of the parents of ``level``'s nodes (level >= 1)."""
        return self.offset(level - 1) + self.parents[:, level - 1]

    def ancestry(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(``anc`` [B, Q, Q] bool: node i's ancestors and itself; ``root`` [B, Q]: the level-0 beam under node i)."""
        b, q, k = self.parents.shape[0], self.num_nodes, self.roots
        device = self.parents.device
        anc = torch.zeros(b, q, q, dtype=torch.bool, device=device)
        anc[:, :k, :k] = torch.eye(k, dtype=torch.bool, device=device)
        root = torch.arange(q, device=device).repeat(b, 1)
        for g in range(1, self.levels + 1):
            first, parents = self.offset(g), self.parent_nodes(g)  # parents [B, N]
            rows = anc.gather(1, parents[..., None].expand(b, self.width, q)).clone()
            own = torch.arange(first, first + self.width, device=device)
            rows[:, torch.arange(self.width, device=device), own] = True
            anc[:, first : first + self.width] = rows
            root[:, first : first + self.width] = root.gather(1, parents)
        return anc, root


@dataclass(frozen=True)
class NodeTable:
    """Per tree node: its identifier tokens so far, trie state, and the draft-cache positions it attends."""

    sequences: torch.Tensor  # [B, Q, C]
    trie_states: torch.Tensor  # [B, Q]
    draft_visible: torch.Tensor  # [B, Q, S_draft]

    def as_beams(self, visible: torch.Tensor, depth: torch.Tensor, prompt_lengths: torch.Tensor) -> BeamState:
        """Every node as a fed beam (scores 0) of the target's cache, where ``visible`` [B, Q, S] is what nodes
        attend; meaningful for the nodes at ``depth`` [B]."""
        scores = torch.zeros(self.trie_states.shape, device=self.trie_states.device)
        return BeamState(self.sequences, scores, self.trie_states, visible, depth, depth, prompt_lengths)


def _pad_positions(visible: torch.Tensor, length: int) -> torch.Tensor:
    return F.pad(visible, (0, length - visible.shape[2]))


def draft_tree(
    draft: torch.nn.Module,
    cache: DynamicCache,
    beams: BeamState,
    trie: PrefixTrie,
    width: int,
    levels: int,
    select: Select,
    keep_distributions: bool = False,
) -> tuple[TokenTree, NodeTable]:
    """Draft ``levels`` steps of ``width`` beams from ``beams`` (the target's K beams, their target scores).

    ``beams`` is expressed against the draft cache; their unfed tails are fed first. The draft feeds levels
    0..G-1 (G forwards); level G stays unfed, so ``NodeTable.draft_visible`` of a level-G node is its parent's.
    """
    state, fed_states = beams, []
    parents, tokens, log_q, cand_log_q = [], [], [], []
    for _ in range(levels):
        logits, state = feed(draft, cache, state)  # [B, W, V]
        fed_states.append(state)
        vocab = logits.shape[-1]
        cand = candidates(logits, state.scores, state.trie_states, trie)  # [B, W * V]
        norm = torch.logsumexp(cand, dim=1, keepdim=True).nan_to_num(neginf=0.0)  # [B, 1]
        p, t, s = select(cand, width, vocab)
        parents.append(p)
        tokens.append(t)
        log_q.append(s - norm)
        if keep_distributions:  # only relaxed verification's residual needs them
            cand_log_q.append((cand - norm).view(cand.shape[0], -1, vocab))
        state = extend(state, p, t, s, trie)
    levels_states = [*fed_states, state]
    s_final = cache_length(cache)
    table = NodeTable(
        sequences=torch.cat([st.sequences for st in levels_states], dim=1),
        trie_states=torch.cat([st.trie_states for st in levels_states], dim=1),
        draft_visible=torch.cat([_pad_positions(st.visible, s_final) for st in levels_states], dim=1),
    )
    tree = TokenTree(
        roots=beams.width,
        parents=torch.stack(parents, 1),
        tokens=torch.stack(tokens, 1),
        log_q=torch.stack(log_q, 1),
        candidate_log_q=tuple(cand_log_q),
    )
    return tree, table
