"""What a verification rule sees at one tree level and what it decides (shared by ``strict`` and ``relaxed``)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from atspeed.decoding.search.draft_tree import TokenTree


@dataclass(frozen=True)
class LevelInput:
    """Level g of the verification of one tree, for every row of the batch."""

    cand: torch.Tensor  # [B, K * V] target cumulative scores of every extension of the current beams
    current: torch.Tensor  # [B, K] tree node ids of the current (already accepted) beams, at level g - 1
    level: int  # g
    can_match: torch.Tensor  # [B] rows with drafted nodes to check at g (else: the bonus step)
    tree: TokenTree
    generator: torch.Generator | None


@dataclass(frozen=True)
class LevelDecision:
    """``ok`` rows accept level g and continue from ``next_nodes``; the others stop with the ``stop_*`` beams."""

    ok: torch.Tensor  # [B]
    next_nodes: torch.Tensor  # [B, K] node ids at level g (rows with ok)
    next_scores: torch.Tensor  # [B, K]
    stop_parents: torch.Tensor  # [B, K] index into the current beams
    stop_tokens: torch.Tensor  # [B, K]
    stop_scores: torch.Tensor  # [B, K] target cumulative scores


VerifyLevel = Callable[[LevelInput], LevelDecision]


def match_drafted(inp: LevelInput, parents: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Find the target's choices (``parents`` [B, K] into the current beams, ``tokens``) among level g's nodes.

    Returns (found [B, K] bool, node ids [B, K]; meaningless where not found).
    """
    tree, g = inp.tree, inp.level
    vocab = inp.cand.shape[1] // inp.current.shape[1]
    if g > tree.levels:  # nothing drafted: nothing found (parents are never negative)
        return parents < 0, parents
    target_keys = inp.current.gather(1, parents) * vocab + tokens  # [B, K]
    equal = target_keys.unsqueeze(2) == tree.node_keys(vocab)[:, g - 1]  # [B, K, N]
    found, first = equal.max(2)  # ties: the first index (documented for ``max`` over a dimension)
    return found, tree.offset(g) + first
