"""The target's verification forward over a drafted token tree (step 2 of the speculative loop).

``verify_forward``: the K beams' newest tokens (the roots) and the drafted nodes, after the cached prefix.
``first_forward``: the target's first call, which reads the prompts together with the first tree (no separate
prefill). Both return the target's logits at every tree node and what each node attends in the cache they leave;
under a budget (``TokenTree.selection``) only the roots and the verified nodes are computed.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache

from atspeed.decoding import constants
from atspeed.decoding.cache.header import Prompts
from atspeed.decoding.cache.tree_attention import forward_tree, prompt_positions
from atspeed.decoding.search.beam import BeamState
from atspeed.decoding.search.draft_tree import TokenTree


def _select(selection, anc: torch.Tensor, *rows: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Restrict a forward to the selected nodes: ``anc`` [B, Q, Q] -> [B, R, R], each [B, Q, ...] -> [B, R, ...]."""
    if selection is None:
        return (anc, *rows)
    index, valid, _ = selection
    b, r = index.shape
    anc = anc.gather(1, index[..., None].expand(b, r, anc.shape[2])).gather(2, index[:, None, :].expand(b, r, r))
    picked = [x.gather(1, index.view(b, r, *[1] * (x.ndim - 2)).expand(b, r, *x.shape[2:])) for x in rows]
    return (anc & valid[:, None, :] & valid[:, :, None], *picked)


def _unselect(selection, logits: torch.Tensor, anc: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits of every node [B, Q, V] (pruned ones: meaningless) and ``anc`` over the computed columns [B, Q, R]."""
    if selection is None:
        return logits, anc
    index, valid, slot = selection
    b, q = slot.shape
    logits = logits.gather(1, slot[..., None].expand(b, q, logits.shape[2]))
    return logits, anc.gather(2, index[:, None, :].expand(b, q, index.shape[1])) & valid[:, None, :]


def verify_forward(
    target: torch.nn.Module, cache: DynamicCache, beams: BeamState, tree: TokenTree
) -> tuple[torch.Tensor, torch.Tensor]:
    """Target logits at every tree node [B, Q, V] and what each node attends [B, Q, S + R] (R nodes computed:
    all Q, or the roots and the verified ones under a budget). The K beams must have exactly one unfed token (their
    newest), which the forward takes as the roots' tokens."""
    (b, k), device = beams.scores.shape, beams.depth.device
    anc, root = tree.ancestry()  # [B, Q, Q], [B, Q]
    rows = constants.column(b, device)
    last = (beams.depth - 1)[:, None]  # [B, 1] the beams' newest token
    newest = beams.sequences[rows, constants.arange(k, device), last]  # [B, K]
    tokens = torch.cat([newest, tree.tokens.reshape(b, -1)], dim=1)  # [B, Q]
    positions = (beams.prompt_lengths[:, None] + last) + tree.node_levels()
    past = beams.visible[rows, root]  # [B, Q, S]
    selection = tree.selection()
    tree_mask, tokens_r, positions_r, past_r = _select(selection, anc, tokens, positions, past)
    logits = forward_tree(target, cache, tokens_r, positions_r, past_r, tree_mask, diagonal=selection is None)
    logits, anc = _unselect(selection, logits, anc)
    return logits, torch.cat([past, anc], dim=2)


def first_forward(
    target: torch.nn.Module, cache: DynamicCache, prompts: Prompts, tree: TokenTree
) -> tuple[torch.Tensor, torch.Tensor]:
    """The first target call: the prompts [B, P] and the tree drafted from the root, in one forward.

    Prompt tokens attend the shared header (when ``prompts`` has one in the cache) and causally each other (padding
    excluded); tree nodes attend the whole prompt and their ancestors. The K roots are copies of the empty beam,
    i.e. the last prompt position. Returns what ``verify_forward`` returns, over the cache the call leaves (the
    header, the prompts, then the computed drafted nodes).
    """
    input_ids, past = prompts.input_ids, prompts.past
    b, p = input_ids.shape
    k = tree.roots
    real = prompts.mask.bool()
    seen = prompts.visible  # [B, past + P]
    anc, _ = tree.ancestry()
    positions = (seen.long().sum(1) - 1)[:, None] + tree.node_levels()
    tokens = torch.cat([input_ids[:, -1:].expand(b, k), tree.tokens.reshape(b, -1)], dim=1)
    selection = tree.selection()
    tree_mask, tokens, positions = _select(selection, anc, tokens, positions)
    # the roots are the prompt's last position: drop them from the forward, the prompt takes their place
    nodes, node_tree, node_positions = tokens[:, k:], tree_mask[:, k:, k:], positions[:, k:]
    t = nodes.shape[1]
    causal = constants.tril(p, real.device) & real[:, None, :]
    node_prompt = real[:, None, :].expand(b, t, p)
    allowed = torch.cat(
        [torch.cat([causal, causal.new_zeros(b, p, t)], dim=2), torch.cat([node_prompt, node_tree], dim=2)], dim=1
    )  # [B, P + T, P + T]; every token also attends the cached header
    logits = forward_tree(
        target, cache, torch.cat([input_ids, nodes], dim=1),
        torch.cat([past + prompt_positions(prompts.mask), node_positions], dim=1),
        real.new_ones(b, p + t, past), allowed, t + 1,
    )  # fmt: skip
    logits = torch.cat([logits[:, :1].expand(b, k, logits.shape[2]), logits[:, 1:]], dim=1)  # [B, R, V]
    logits, anc = _unselect(selection, logits, anc)
    # every node sees the header and the real prompt; among the computed columns, its drafted ancestors
    return logits, torch.cat([seen[:, None, :].expand(b, anc.shape[1], past + p), anc[:, :, k:]], dim=2)
