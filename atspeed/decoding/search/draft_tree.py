"""Drafting: N-wide beam search of the draft for G steps from the target's K beams, and the token tree it makes.

Nodes are numbered level by level: the K current beams are level 0 (nodes 0..K-1); level g in 1..G holds N drafted
nodes ``K + (g - 1) * N + j``, each a (parent, token) pair. The target verifies all of them in one forward in which
every node sees the prompt, the fed tokens of its root beam, its ancestors in the tree and itself
(``TokenTree.ancestry``), at position prompt + depth.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import DynamicCache

from atspeed.decoding import constants
from atspeed.decoding.cache.kv_cache import cache_length
from atspeed.decoding.search.beam import BeamState, Grid, extend, feed, pick, plain_grid
from atspeed.items.trie import PrefixTrie

Select = Callable[[torch.Tensor, int, int], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class TokenTree:
    """G levels of N drafted nodes above K roots; ``parents`` index the previous level (level 0: the roots)."""

    roots: int  # K
    parents: torch.Tensor  # [B, G, N]
    tokens: torch.Tensor  # [B, G, N]
    log_q: torch.Tensor  # [B, G, N] the draft's log-probability of each drafted sequence among its candidates (drafted
    # without ``keep_distributions``: the cumulative scores, which are finite exactly where log q is)
    candidate_log_q: tuple[torch.Tensor, ...]  # per level: [B, W_prev, V] draft log-probs of all candidates (relaxed)
    scores: torch.Tensor | None = None  # [B, G, N] cumulative scores the draft ranked its nodes by
    verified: torch.Tensor | None = None  # [B, G, N] nodes within the budget (None: every drafted node)
    budget: int = 0  # with ``verified``: at most this many verified nodes per row

    @property
    def levels(self) -> int:
        return self.parents.shape[1]

    @property
    def width(self) -> int:
        return self.parents.shape[2]

    @property
    def num_nodes(self) -> int:
        return self.roots + self.levels * self.width

    def node_levels(self) -> torch.Tensor:
        """[1, Q] each node's level: K zeros (the roots), then N ones, ..., N times G (a shared constant)."""
        return _node_levels(self.roots, self.width, self.levels, self.parents.device)

    def offset(self, level: int) -> int:
        """Node id of the first node of ``level`` (0 = roots)."""
        return 0 if level == 0 else self.roots + (level - 1) * self.width

    def parent_nodes(self, level: int) -> torch.Tensor:
        """Node ids [B, N] of the parents of ``level``'s nodes (level >= 1)."""
        return self._parent_ids[:, level - 1]

    @functools.cached_property
    def _parent_ids(self) -> torch.Tensor:
        """[B, G, N] every drafted node's parent node id (made once per tree)."""
        return self.parents + _level_offsets(self.roots, self.width, self.levels, self.parents.device)

    def drafted(self, level: int) -> torch.Tensor:
        """[B, N] nodes of ``level`` that were drafted (finite) and are verified (within the budget)."""
        return self._drafted[:, level - 1]

    def node_keys(self, vocab: int) -> torch.Tensor:
        """[B, G, 1, N] ``parent node id * vocab + token`` of every node, -1 where not drafted or not verified (made
        once per tree: every level's verification looks its nodes up by these keys, against [B, K, 1] choices)."""
        cached = self.__dict__.get("_node_keys")
        if cached is None or cached[0] != vocab:
            keys = (self._parent_ids * vocab + self.tokens).masked_fill(~self._drafted, -1)[:, :, None]
            cached = self.__dict__["_node_keys"] = (vocab, keys)
        return cached[1]

    @functools.cached_property
    def _drafted(self) -> torch.Tensor:
        ok = self.log_q > float("-inf")  # [B, G, N] (log q is never +inf or NaN)
        return ok if self.verified is None else ok & self.verified

    def drafted_count(self) -> torch.Tensor:
        """[B] drafted nodes the target verifies."""
        return self._drafted.flatten(1).sum(1)

    def selection(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """The nodes a verification forward computes when a budget pruned the tree (None: all of them).

        ``(index [B, R]`` node ids: the K roots, then the verified nodes in node order, padded with node 0;
        ``valid [B, R]`` real entries; ``slot [B, Q]`` each node's entry in ``index`` (pruned nodes: 0)).
        """
        if self.verified is None:
            return None
        b, k = self.parents.shape[0], self.roots
        keep = torch.cat([self.verified.new_ones(b, k), self.verified.reshape(b, -1)], dim=1)  # [B, Q]
        count = keep.sum(1)
        width = k + min(self.budget, self.levels * self.width)  # known on the host: no read-back
        index = torch.sort((~keep).to(torch.int8), dim=1, stable=True).indices[:, :width]  # kept first, in order
        valid = torch.arange(width, device=keep.device)[None, :] < count[:, None]
        index = index.masked_fill(~valid, 0)
        slot = torch.zeros_like(keep, dtype=torch.long).scatter(
            1, index, torch.arange(width, device=keep.device).expand(b, width).masked_fill(~valid, 0)
        )
        return index, valid, slot.masked_fill(~keep, 0)

    def ancestry(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(``anc`` [B, Q, Q] bool: node i's ancestors and itself; ``root`` [B, Q]: the level-0 beam under node i)."""
        b, q, device = self.parents.shape[0], self.num_nodes, self.parents.device
        roots = constants.arange(self.roots, device).expand(b, self.roots)
        parent_of = torch.cat([roots, self._parent_ids.view(b, -1)], dim=1)  # [B, Q] (a root: itself)
        node = constants.arange(q, device).expand(b, q)
        chain = [node]
        for _ in range(self.levels):  # after G steps up, every node has reached its root
            node = parent_of.gather(1, node)
            chain.append(node)
        anc = torch.zeros(b, q, q, dtype=torch.bool, device=device).scatter_(2, torch.stack(chain, 2), True)
        return anc, node


@functools.lru_cache(maxsize=64)
def _node_levels(roots: int, width: int, levels: int, device: torch.device) -> torch.Tensor:
    with torch.inference_mode(False):
        counts = torch.tensor([roots] + [width] * levels, device=device)
        return torch.arange(levels + 1, device=device).repeat_interleave(counts)[None, :]


@functools.lru_cache(maxsize=64)
def _level_offsets(roots: int, width: int, levels: int, device: torch.device) -> torch.Tensor:
    """[G, 1]: node id of the first node of level g - 1, for g = 1..G (a shared constant: never write into it)."""
    with torch.inference_mode(False):
        return torch.tensor([0] + [roots + g * width for g in range(levels - 1)], device=device)[:, None]


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


def budget_rank(tree: TokenTree, by_score: bool) -> torch.Tensor:
    """[B, G * N] each drafted node's place in the order a budget keeps nodes (undrafted ones last).

    ``by_score`` (strict): best cumulative draft score first, ties to the shallower node; a node never scores above
    its parent, so every prefix of this order holds its nodes' ancestors. Otherwise (the sampling decoders): level by
    level, each level in the order the draft drew it, so that whether a level-g node is kept depends on levels <= g
    only and the deeper drafts stay plain draws of the draft (which keeps recursive rejection sampling exact).
    """
    b = tree.parents.shape[0]
    drafted = torch.isfinite(tree.log_q).reshape(b, -1)
    if by_score:
        key = tree.scores.reshape(b, -1)
    else:
        key = -torch.arange(drafted.shape[1], device=drafted.device, dtype=torch.float32).expand(b, -1)
    order = torch.sort(key.masked_fill(~drafted, float("-inf")), dim=1, descending=True, stable=True).indices
    positions = torch.arange(order.shape[1], device=order.device).expand_as(order)
    return torch.empty_like(order).scatter_(1, order, positions)


def within_budget(tree: TokenTree, budget: int | None, by_score: bool = True) -> TokenTree:
    """Keep at most ``budget`` drafted nodes per row for verification, the first of ``budget_rank``, closed under
    ancestors. Pruned nodes stay in the tree as drafted but unverified: the strict rule never matches them; the
    relaxed rules may accept one (a real draft), which ends the level, as the target did not compute its children."""
    if budget is None or budget >= tree.levels * tree.width:
        return tree
    drafted = torch.isfinite(tree.log_q)
    keep = ((budget_rank(tree, by_score) < budget).view_as(drafted) & drafted).clone()
    for g in range(1, tree.levels):
        keep[:, g] &= keep[:, g - 1].gather(1, tree.parents[:, g])
    return dataclasses.replace(tree, verified=keep, budget=budget)


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
    root_logits: torch.Tensor | None = None,
    longest_unfed: int | None = None,
    grid: Grid = plain_grid,
) -> tuple[TokenTree, NodeTable]:
    """Draft ``levels`` steps of ``width`` beams from ``beams`` (the target's K beams, their target scores).

    ``beams`` is expressed against the draft cache; their unfed tails are fed first. The draft feeds levels
    0..G-1 (G forwards); level G stays unfed, so ``NodeTable.draft_visible`` of a level-G node is its parent's.
    From the root (``beams`` with nothing unfed), ``root_logits`` [B, V] are the draft's prefill logits: they give
    level 1 without a forward, so G levels cost the prefill and G - 1 forwards. ``longest_unfed``: the longest unfed
    tail of ``beams`` when the caller knows it (later levels feed one token each), so nothing is read back. ``grid``
    scores the extensions the draft ranks (``keyed.beam_grid``: its keyed Gumbel keys)."""
    if levels == 0:  # a plain target step: nothing drafted, nothing fed
        empty = beams.scores.new_zeros(beams.scores.shape[0], 0, width)
        tree = TokenTree(beams.width, empty.long(), empty.long(), empty, (), empty)
        return tree, NodeTable(beams.sequences, beams.trie_states, beams.visible)
    state, fed_states = beams, []
    parents, tokens, log_q, scores, cand_log_q = [], [], [], [], []
    for g in range(levels):
        if g == 0 and root_logits is not None:
            logits = root_logits[:, None].expand(-1, beams.width, -1)  # [B, W, V]
        else:
            logits, state = feed(draft, cache, state, longest_unfed if g == 0 else 1)  # [B, W, V]
        fed_states.append(state)
        vocab = logits.shape[-1]
        cand, cand_log_probs = grid(logits, state, trie)  # [B, W * V]
        p, t, s = select(cand, width, vocab)
        parents.append(p)
        tokens.append(t)
        scores.append(s)
        if keep_distributions:  # only the sampling rules read q itself; strict reads which nodes are finite
            norm = torch.logsumexp(cand, dim=1, keepdim=True).nan_to_num(neginf=0.0)  # [B, 1]
            log_q.append(s - norm)
            cand_log_q.append((cand - norm).view(cand.shape[0], -1, vocab))
        state = extend(state, p, t, s, trie, log_probs=pick(cand_log_probs, p, t, vocab))
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
        log_q=torch.stack(log_q if keep_distributions else scores, 1),
        candidate_log_q=tuple(cand_log_q),
        scores=torch.stack(scores, 1),
    )
    return tree, table
