"""Teacher targets for draft alignment (SPEC section 4, stage 2): the target's K_t beams and its distributions.

For each prompt x the target runs its own constrained beam search of width K_t (``decode("beam")``). The K_t beams
plus the ground truth y* (N = K_t + 1 sequences of L tokens) form a prefix tree whose nodes are their distinct
prefixes y_<t, t = 1..L (the empty prefix is the root, node 0). Every node gets the target's next-token
distribution p(. | x, y_<t) from ONE prefill of the prompts (the root) plus ONE tree-attention forward over the
non-root nodes (each node attends the prompt, its ancestors and itself; position = real prompt length + depth - 1).

What is stored, and why:

- ``node_logprobs`` [B, M, C]: the target's log-softmax over the FULL vocabulary, read at the codes of the node's
  level (``codes[depth]``, C = the most codes of any level, e.g. 256), and -inf at the codes the trie forbids after
  that prefix (and at the level's padding columns). The values are not renormalised over the allowed codes: they
  are exactly the terms of the beam step (so a beam's score is the sum of its tokens' entries), and the losses
  renormalise on their support anyway (softmax is shift-invariant). Under ``top_k`` truncation only the kept codes
  are finite, so the loss mask is never read from the values: it is the trie's codes at each node (``node_allowed``,
  ``Teaching.allowed``), and a truncated entry inside it means p = 0 (``atspeed.losses.divergences``).
- Compact: a level holds at most a few hundred identifier codes of a vocabulary of tens of thousands, and shared
  beam prefixes are stored once. ``expand_to_vocab`` maps code columns back to the vocabulary, ``gather_codes``
  reads student logits [..., V] at the same columns.
- Nodes are numbered level by level (parents before children), the root first; rows are padded to the batch's
  largest node count M (``node_valid``). Complete identifiers (depth L) need no distribution and are not nodes.

The function ``node_logprobs`` is the distribution part alone, for any sequences: the teacher stage runs it on the
target's beams (``teacher_targets``, or skips it with ``distributions=False``: beams, scores and truth only, under
a kilobyte per sample); the alignment runs it with the frozen target on the fly, on the stored beams
(``Align(teacher="recompute")``) or on the draft's own sampled beams (``"on_policy"``), which ``sequence_scores``
then scores under the target.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from atspeed.decoding.cache.kv_cache import new_cache
from atspeed.decoding.cache.tree_attention import forward_tree, prefill
from atspeed.decoding.decoders import DecodeSettings, decode
from atspeed.decoding.search.beam_search import beam_search
from atspeed.decoding.teaching.teacher_forest import (
    PrefixForest,
    along,
    gather_codes,
    level_codes,
    prefix_forest,
    truncate_top_k,
)
from atspeed.items.trie import PrefixTrie


@dataclass(frozen=True)
class TeacherTargets:
    """Teacher data of a batch of B prompts: K_t beams with scores, and the target's distribution at each node."""

    beams: torch.Tensor  # [B, K, L] long, best first
    scores: torch.Tensor  # [B, K] float32 cumulative log-probabilities
    truth: torch.Tensor  # [B, L] long, the ground-truth identifiers
    node_parent: torch.Tensor  # [B, M] long (-1: root and padding)
    node_token: torch.Tensor  # [B, M] long (-1: root and padding)
    node_depth: torch.Tensor  # [B, M] long prefix length (0: root and padding)
    node_valid: torch.Tensor  # [B, M] bool
    node_logprobs: torch.Tensor | None  # [B, M, C] full-vocab log-softmax at codes[depth]; -inf: not in the support
    beam_nodes: torch.Tensor  # [B, K, L] long: node of prefix beams[:, :, :t]
    truth_nodes: torch.Tensor  # [B, L] long: node of prefix truth[:, :t]
    codes: torch.Tensor  # [L, C] long: each level's sorted code token ids (-1: padding); shared by all rows

    def along(self, nodes: torch.Tensor) -> torch.Tensor:
        """The distributions [B, N, L, C] at every position of sequences whose prefix nodes are ``nodes`` [B, N, L]
        (``beam_nodes``, or ``truth_nodes[:, None]``); position t uses the codes ``codes[t]``."""
        return along(self.node_logprobs, nodes)


def node_states(trie: PrefixTrie, sequences: torch.Tensor, forest: PrefixForest) -> torch.Tensor:
    """Trie state [B, M] of each node's prefix under the trie's rule (-1: padding, or a prefix the trie forbids)."""
    b, n, levels = sequences.shape
    states = [trie.start(b * n)]
    for t in range(levels - 1):
        states.append(trie.advance(states[-1], sequences[:, :, t].reshape(-1).to(trie.device)))
    slot_states = torch.stack(states, 1).view(b, n * levels).to(sequences.device)  # [B, N * L]
    out = torch.full(forest.valid.shape, -1, dtype=torch.long, device=sequences.device)
    return out.scatter(1, forest.slot_node.reshape(b, -1), slot_states)


def node_logits(
    model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, forest: PrefixForest
) -> torch.Tensor:
    """The target's next-token logits [B, M, V] at every node: the prefill's last position for the root, one
    tree-attention forward over nodes 1..M-1 for the others (padding nodes attend the prompt and themselves)."""
    cache = new_cache()
    root = prefill(model, cache, input_ids, attention_mask)[:, None]  # [B, 1, V]
    b, q = forest.valid.shape[0], forest.num_nodes - 1
    if q == 0:
        return root
    lengths = attention_mask.long().sum(1)  # [B]
    tokens = forest.token[:, 1:].clamp(min=0)  # [B, Q]
    positions = (lengths[:, None] + forest.depth[:, 1:] - 1).clamp(min=0)  # [B, Q]
    past = attention_mask.bool()[:, None, :].expand(b, q, attention_mask.shape[1])  # [B, Q, P]
    valid = forest.valid[:, 1:]
    tree = forest.ancestors[:, 1:, 1:] & valid[:, :, None] & valid[:, None, :]  # [B, Q, Q]
    logits = forward_tree(model, cache, tokens, positions, past, tree)  # [B, Q, V]
    return torch.cat([root, logits], 1)


def _check_inputs(truth: torch.Tensor, trie: PrefixTrie, codes: torch.Tensor, batch: int) -> None:
    if truth.shape != (batch, trie.levels):
        raise ValueError(f"truth must be [B={batch}, L={trie.levels}], got {tuple(truth.shape)}")
    if codes.dim() != 2 or codes.shape[0] != trie.levels:
        raise ValueError(f"codes must be [L={trie.levels}, C], got {tuple(codes.shape)}")
    if bool((trie.states_for(truth.to(trie.device)) < 0).any()):
        raise ValueError("a ground-truth identifier is not allowed by the trie")


def node_allowed(trie: PrefixTrie, sequences: torch.Tensor, forest: PrefixForest, codes: torch.Tensor) -> torch.Tensor:
    """The codes [B, M, C] bool the trie allows after each node's prefix (``codes`` [L, C] the level code lists;
    False at padding columns and padding nodes): the alignment losses' mask, whatever the teacher data kept."""
    states = node_states(trie, sequences, forest)  # [B, M]
    b, m = states.shape
    allowed = trie.mask(states.reshape(-1).to(trie.device)).view(b, m, -1).to(sequences.device)  # [B, M, V]
    node_codes = codes[forest.depth]  # [B, M, C]
    return allowed.gather(2, node_codes.clamp(min=0)) & (node_codes >= 0)


@torch.no_grad()
def node_logprobs(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    sequences: torch.Tensor,
    trie: PrefixTrie,
    codes: torch.Tensor,
    top_k: int | None = None,
) -> tuple[PrefixForest, torch.Tensor]:
    """The prefix tree of ``sequences`` [B, N, L] and the model's distributions at its nodes, float32 [B, M, C].

    Each node's entries are the full-vocabulary log-softmax of the model on prompt + prefix, read at the level's
    ``codes`` [L, C], -inf where the trie forbids the code (see the module docstring); ``top_k`` keeps each node's k
    largest. The teacher stage stores them; the alignment computes them on the fly with the frozen target
    (``Align(teacher="recompute" | "on_policy")``).
    """
    forest = prefix_forest(sequences)
    allowed = node_allowed(trie, sequences, forest, codes)  # [B, M, C]
    logprobs = torch.log_softmax(node_logits(model, input_ids, attention_mask, forest).float(), -1)  # [B, M, V]
    values = gather_codes(logprobs, codes[forest.depth]).masked_fill(~allowed, float("-inf"))
    return forest, values if top_k is None else truncate_top_k(values, top_k)


def sequence_scores(
    values: torch.Tensor, nodes: torch.Tensor, sequences: torch.Tensor, codes: torch.Tensor
) -> torch.Tensor:
    """Cumulative log-probabilities [B, N] of ``sequences`` [B, N, L] whose prefix nodes are ``nodes`` [B, N, L]:
    the sum over t of the node values [B, M, C] (untruncated ``node_logprobs``) at the column of token t in
    ``codes`` [L, C]: what the model's beam search would score them (the beam step's terms)."""
    columns = (codes == sequences[..., None]).long().argmax(-1)  # [B, N, L]
    return along(values, nodes).gather(-1, columns[..., None])[..., 0].sum(-1)


@dataclass(frozen=True)
class Teaching:
    """What a batch of B prompts is aligned on: K beams [B, K, L] with scores [B, K], the ground truth [B, L], the
    prefix tree of beams + truth (beam k's nodes ``forest.slot_node[:, k]``, the truth's ``[:, -1]``), the target's
    distributions at its nodes, float32 [B, M, C] (as ``node_logprobs``; possibly truncated to its top-k), and the
    trie's codes at its nodes [B, M, C] bool (``node_allowed``). ``on_policy``: the beams are the draft's."""

    beams: torch.Tensor
    scores: torch.Tensor
    truth: torch.Tensor
    forest: PrefixForest
    logprobs: torch.Tensor
    allowed: torch.Tensor
    on_policy: bool = False

    @classmethod
    def stored(
        cls,
        beams: torch.Tensor,
        scores: torch.Tensor,
        truth: torch.Tensor,
        logprobs: torch.Tensor,
        trie: PrefixTrie,
        codes: torch.Tensor,
    ) -> Teaching:
        """From teacher data: its ``node_logprobs`` [B, >= M, C] (padded) belong to the nodes of ``prefix_forest``;
        the mask comes from the trie, not from the stored values (which a teacher ``top_k`` truncated)."""
        sequences = torch.cat([beams, truth[:, None]], 1)
        forest = prefix_forest(sequences)  # the teacher stage's nodes, in its order
        allowed = node_allowed(trie, sequences, forest, codes)
        return cls(beams, scores, truth, forest, logprobs[:, : forest.num_nodes].float(), allowed)


@torch.no_grad()
def target_teaching(
    target: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    beams: torch.Tensor,
    truth: torch.Tensor,
    trie: PrefixTrie,
    codes: torch.Tensor,
    scores: torch.Tensor | None = None,
) -> Teaching:
    """The target's distributions along ``beams`` [B, K, L] and ``truth`` [B, L], computed now; ``scores`` [B, K]:
    the beams' stored scores, or None for the target's cumulative log-probabilities of the beams."""
    forest, logprobs = node_logprobs(
        target, input_ids, attention_mask, torch.cat([beams, truth[:, None]], 1), trie, codes
    )
    if scores is None:
        scores = sequence_scores(logprobs, forest.slot_node[:, :-1], beams, codes)
    return Teaching(beams, scores, truth, forest, logprobs, logprobs.isfinite())  # untruncated: finite = the trie's


@torch.no_grad()
def on_policy_teaching(
    target: torch.nn.Module,
    draft: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    truth: torch.Tensor,
    trie: PrefixTrie,
    codes: torch.Tensor,
    num_beams: int,
    generator: torch.Generator,
) -> Teaching:
    """On-policy data (DistillSpec, GKD): the draft's own ``num_beams`` beams from its sampling beam search, with the
    target's distributions along them and the ground truth, and the target's cumulative log-probabilities as scores."""
    beams = beam_search(draft, input_ids, attention_mask, trie, num_beams, trie.levels, True, generator).sequences
    return replace(target_teaching(target, input_ids, attention_mask, beams, truth, trie, codes), on_policy=True)


@torch.no_grad()
def teacher_targets(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    truth: torch.Tensor,
    trie: PrefixTrie,
    num_beams: int,
    codes: torch.Tensor | None = None,
    top_k: int | None = None,
    dtype: torch.dtype = torch.float32,
    distributions: bool = True,
) -> TeacherTargets:
    """Teacher data for left-padded prompts [B, P] with ground truths ``truth`` [B, L] (see the module docstring).

    ``num_beams``: K_t. ``codes`` [L, C]: the level code lists (default ``level_codes(trie)``). ``top_k``: keep
    each node's k most likely allowed codes only. ``dtype``: of ``node_logprobs`` (float16 for storage).
    ``distributions=False``: the beams only (no tree forward; ``node_logprobs`` is None).
    Runs without gradients but not in inference mode, so the results can serve an on-policy loss directly.
    """
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1 or None, got {top_k}")
    codes = (level_codes(trie) if codes is None else codes).to(input_ids.device)
    _check_inputs(truth, trie, codes, input_ids.shape[0])
    out = decode("beam", model, input_ids, attention_mask, trie, DecodeSettings(num_beams, trie.levels))
    beams, scores = out.sequences.clone(), out.scores.clone()  # ordinary tensors (decode runs in inference mode)
    if not bool(torch.isfinite(scores).all()):
        raise ValueError(f"fewer than K_t = {num_beams} identifiers are reachable: lower the beam width")
    truth = truth.to(input_ids.device, torch.long)
    sequences = torch.cat([beams, truth[:, None]], 1)  # [B, N = K + 1, L]
    if distributions:
        forest, values = node_logprobs(model, input_ids, attention_mask, sequences, trie, codes, top_k)
    else:
        forest, values = prefix_forest(sequences), None
    return TeacherTargets(
        beams=beams,
        scores=scores,
        truth=truth,
        node_parent=forest.parent,
        node_token=forest.token,
        node_depth=forest.depth,
        node_valid=forest.valid,
        node_logprobs=None if values is None else values.to(dtype),
        beam_nodes=forest.slot_node[:, :-1],
        truth_nodes=forest.slot_node[:, -1],
        codes=codes,
    )
