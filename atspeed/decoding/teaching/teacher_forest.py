"""The prefix forest of teacher data (the distinct prefixes of a row's sequences as a tree) and the code-column
helpers that store a distribution over a level's identifier codes instead of the whole vocabulary (``teacher``)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from atspeed.items.trie import PrefixTrie


@dataclass(frozen=True)
class PrefixForest:
    """The distinct prefixes (depth 0..L-1) of N sequences per row, as a tree per row; M nodes, padded."""

    slot_node: torch.Tensor  # [B, N, L] node of prefix seq[:t] (the node whose distribution applies at position t)
    parent: torch.Tensor  # [B, M] parent node (-1: root and padding)
    token: torch.Tensor  # [B, M] last token of the node's prefix (-1: root and padding)
    depth: torch.Tensor  # [B, M] prefix length (0: root and padding)
    valid: torch.Tensor  # [B, M] bool: a real node
    ancestors: torch.Tensor  # [B, M, M] bool: node j is a non-root ancestor of node i, or i itself

    @property
    def num_nodes(self) -> int:
        return self.parent.shape[1]


def along(values: torch.Tensor, nodes: torch.Tensor) -> torch.Tensor:
    """Per-node values [B, M, C] read at every position of sequences whose prefix nodes are ``nodes`` [B, N, L]:
    [B, N, L, C] (the teacher's stored distributions, or a student's logits at the same nodes)."""
    b, n, levels = nodes.shape
    flat = nodes.reshape(b, n * levels, 1).expand(b, n * levels, values.shape[2])
    return values.gather(1, flat).view(b, n, levels, -1)


def level_codes(trie: PrefixTrie) -> torch.Tensor:
    """Sorted token ids [L, C] of each identifier level (the codes that some identifier has at that position),
    padded with -1 to the largest level; read from the exact trie, so it holds whatever the rule."""
    g = trie.exact
    counts = g.child_ptr[1:] - g.child_ptr[:-1]  # [S]
    edge_depth = torch.repeat_interleave(g.depth, counts)  # [E] depth of each edge's parent
    per_level = [torch.unique(g.child_token[edge_depth == t], sorted=True) for t in range(trie.levels)]
    width = max(u.numel() for u in per_level)
    return torch.stack([F.pad(u, (0, width - u.numel()), value=-1) for u in per_level])


def gather_codes(values: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """``values`` [..., V] read at ``codes`` [..., C] (broadcastable; -1 columns give -inf): [..., C]."""
    shape = torch.broadcast_shapes(values.shape[:-1], codes.shape[:-1])
    codes = codes.expand(*shape, codes.shape[-1])
    out = values.expand(*shape, values.shape[-1]).gather(-1, codes.clamp(min=0))
    return out.masked_fill(codes < 0, float("-inf"))


def expand_to_vocab(values: torch.Tensor, codes: torch.Tensor, vocab: int) -> torch.Tensor:
    """Code columns ``values`` [..., C] back to the vocabulary [..., V] (``codes`` [..., C] broadcastable; -1
    columns dropped); every other token gets -inf."""
    codes = codes.expand_as(values)
    out = torch.full((*values.shape[:-1], vocab + 1), float("-inf"), dtype=values.dtype, device=values.device)
    out.scatter_(-1, torch.where(codes < 0, vocab, codes), values)  # padding goes to a spare column
    return out[..., :vocab]


def truncate_top_k(logprobs: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the ``k`` largest entries of each row of ``logprobs`` [..., C]; the rest (and -inf ones) stay -inf."""
    k = min(k, logprobs.shape[-1])
    index = logprobs.topk(k, dim=-1).indices
    keep = torch.zeros_like(logprobs, dtype=torch.bool).scatter_(-1, index, True)
    return logprobs.masked_fill(~keep, float("-inf"))


def prefix_forest(sequences: torch.Tensor) -> PrefixForest:
    """The tree of the distinct prefixes of ``sequences`` [B, N, L] (lengths 0..L-1), per row.

    A prefix's node is owned by the first sequence that has it; nodes are numbered by (depth, owner).
    """
    b, n, levels = sequences.shape
    device = sequences.device
    same = sequences[:, :, None, :] == sequences[:, None, :, :]  # [B, N, N, L]
    equal_prefix = torch.cat([torch.ones_like(same[..., :1]), same.long().cumprod(-1)[..., :-1].bool()], -1)
    owner = equal_prefix.permute(0, 3, 1, 2).long().argmax(-1)  # [B, L, N] first sequence with the same prefix
    new = owner == torch.arange(n, device=device)  # [B, L, N]
    number = new.reshape(b, -1).long().cumsum(1).view(b, levels, n) - 1  # [B, L, N] valid where new
    slot_node = number.gather(2, owner).transpose(1, 2)  # [B, N, L]
    count = new.reshape(b, -1).sum(1)  # [B]
    m = int(count.max())
    depth_of_slot = torch.arange(levels, device=device).expand(b, n, levels)
    parent_of_slot = torch.cat([torch.full_like(slot_node[..., :1], -1), slot_node[..., :-1]], -1)
    token_of_slot = torch.cat([torch.full_like(sequences[..., :1], -1), sequences[..., :-1]], -1)
    flat = slot_node.reshape(b, -1)  # [B, N * L]; duplicates write equal values

    def scatter(values: torch.Tensor, fill: int) -> torch.Tensor:
        return torch.full((b, m), fill, dtype=torch.long, device=device).scatter(1, flat, values.reshape(b, -1))

    # ancestors: slot (i, t) -> nodes of slots (i, s) for 1 <= s <= t; the rest point at the node itself
    s, t = torch.arange(levels, device=device)[:, None], torch.arange(levels, device=device)[None, :]
    keep = (s >= 1) & (s <= t)  # [L(s), L(t)]
    node = slot_node[:, :, None, :].expand(b, n, levels, levels)  # [B, N, s, t]: node of (i, t)
    ancestor = torch.where(keep, slot_node[:, :, :, None].expand(b, n, levels, levels), node)
    ancestors = torch.zeros(b, m * m, dtype=torch.bool, device=device)
    ancestors.scatter_(1, (node * m + ancestor).reshape(b, -1), True)
    return PrefixForest(
        slot_node=slot_node,
        parent=scatter(parent_of_slot, -1),
        token=scatter(token_of_slot, -1),
        depth=scatter(depth_of_slot, 0),
        valid=torch.arange(m, device=device)[None, :] < count[:, None],
        ancestors=ancestors.view(b, m, m),
    )
