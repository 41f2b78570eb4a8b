"""The token graphs behind ``PrefixTrie``: the exact trie of a set of identifiers and the per-position layers, in CSR
form, and their transition by ``torch.searchsorted``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

Rule = Literal["exact", "per_position"]
RULES: tuple[Rule, ...] = ("exact", "per_position")


@dataclass(frozen=True)
class Graph:
    """A layered token graph in CSR form, plus ``depth [S]`` and, for exact tries, ``item [S]``."""

    depth: torch.Tensor
    child_ptr: torch.Tensor
    child_token: torch.Tensor
    child_state: torch.Tensor
    keys: torch.Tensor
    item: torch.Tensor


def csr(
    parent: torch.Tensor, token: torch.Tensor, child: torch.Tensor, depth: torch.Tensor, vocab_size: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Edge lists [E] sorted by (parent, token) -> ``(child_ptr, child_token, child_state, keys)``."""
    counts = torch.bincount(parent, minlength=depth.numel())  # [S]
    child_ptr = torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)])  # [S+1]
    return child_ptr, token, child, parent * vocab_size + token


def exact_graph(identifiers: torch.Tensor, vocab_size: int) -> Graph:
    """The exact trie of ``identifiers`` [I, L]; node ids grow with depth, then lexicographically."""
    num_items, levels = identifiers.shape
    parents, tokens, depths = [], [], [torch.zeros(1, dtype=torch.long)]
    parent_of_row = torch.zeros(num_items, dtype=torch.long)  # [I] node of each row's prefix so far
    offset = 1
    for t in range(levels):
        # unique (parent node, token) pairs, sorted: parents ascend with their own lexicographic order
        pair_keys = parent_of_row * vocab_size + identifiers[:, t]  # [I]
        unique_keys, inverse = torch.unique(pair_keys, sorted=True, return_inverse=True)  # [N_t], [I]
        parents.append(unique_keys // vocab_size)
        tokens.append(unique_keys % vocab_size)
        depths.append(torch.full((unique_keys.numel(),), t + 1, dtype=torch.long))
        parent_of_row = offset + inverse
        offset += unique_keys.numel()
    parent, token, depth = torch.cat(parents), torch.cat(tokens), torch.cat(depths)
    child = torch.arange(1, offset, dtype=torch.long)
    item = torch.full((offset,), -1, dtype=torch.long)
    item[parent_of_row] = torch.arange(num_items)
    return Graph(depth, *csr(parent, token, child, depth, vocab_size), item)


def per_position_graph(identifiers: torch.Tensor, vocab_size: int) -> Graph:
    """One node per depth 0..L; node t links to node t+1 by every token seen at level t."""
    levels = identifiers.shape[1]
    per_level = [torch.unique(identifiers[:, t], sorted=True) for t in range(levels)]
    parent = torch.cat([torch.full((u.numel(),), t, dtype=torch.long) for t, u in enumerate(per_level)])
    token = torch.cat(per_level)
    depth = torch.arange(levels + 1)
    item = torch.full((levels + 1,), -1, dtype=torch.long)
    return Graph(depth, *csr(parent, token, parent + 1, depth, vocab_size), item)


def step(
    graph_keys: torch.Tensor, next_state: torch.Tensor, states: torch.Tensor, tokens: torch.Tensor, vocab: int
) -> torch.Tensor:
    """Follow edge ``(state, token)`` for each row of ``states``/``tokens`` [M]; -1 where there is none."""
    alive = (states >= 0) & (tokens >= 0) & (tokens < vocab)
    query = states.clamp(min=0) * vocab + tokens.clamp(0, vocab - 1)  # [M]
    index = torch.searchsorted(graph_keys, query).clamp(max=max(graph_keys.numel() - 1, 0))  # [M]
    found = alive & (graph_keys.numel() > 0) & (graph_keys[index] == query)
    return torch.where(found, next_state[index], torch.full_like(states, -1))


def check_identifiers(identifiers: torch.Tensor, vocab_size: int, eos_token_id: int | None, rule: str) -> None:
    if rule not in RULES:
        raise ValueError(f"rule must be one of {RULES}, got {rule!r}")
    if vocab_size < 1:
        raise ValueError(f"vocab_size must be >= 1, got {vocab_size}")
    if identifiers.dim() != 2 or identifiers.shape[0] == 0 or identifiers.shape[1] == 0:
        raise ValueError(f"identifiers must be a non-empty [I, L] tensor, got shape {tuple(identifiers.shape)}")
    if identifiers.dtype.is_floating_point or identifiers.dtype == torch.bool:
        raise ValueError(f"identifiers must hold integer token ids, got {identifiers.dtype}")
    if identifiers.min() < 0 or identifiers.max() >= vocab_size:
        raise ValueError(f"identifier token ids must lie in [0, vocab_size={vocab_size})")
    if eos_token_id is not None:
        if not 0 <= eos_token_id < vocab_size:
            raise ValueError(f"eos_token_id must lie in [0, vocab_size={vocab_size}), got {eos_token_id}")
        if (identifiers == eos_token_id).any():
            raise ValueError(f"eos_token_id {eos_token_id} is also an identifier token")
    if torch.unique(identifiers, dim=0).shape[0] != identifiers.shape[0]:
        raise ValueError("identifiers must be distinct: resolve duplicate item identifiers first")
