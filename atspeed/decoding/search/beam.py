"""Beam state and the constrained beam step, shared by every decoder.

A batch holds B requests with W beams each. The beams of a request share one row of the KV cache: the prompt is
stored once and every generated token once, and ``visible`` says which cached positions each beam attends (its
prompt and its own ancestors). Tokens a beam has generated but the model has not yet seen ("unfed", the tail
``sequences[:, :, fed:depth]``) are fed on the next forward.

Beam step (SPEC section 5): log-softmax over the full vocabulary, the trie mask (-inf), plus the beam's cumulative
score, flattened over (beam, token), then top-k: Hugging Face ``generate`` beam search without length penalty (the
same beam-major layout and ``torch.topk``; HF takes a top-2K first, so exactly equal float scores may be ordered
differently, which the tests never observed with real models). The
sampling variant (relaxed decoding) draws k candidates without replacement from the softmax over the same
cumulative scores (Gumbel top-k).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers import DynamicCache

from atspeed.decoding import constants
from atspeed.decoding.cache.tree_attention import forward_tree
from atspeed.items.trie import PrefixTrie


@dataclass(frozen=True)
class BeamState:
    """W beams for each of B requests, against one model's KV cache of S positions."""

    sequences: torch.Tensor  # [B, W, C] generated identifier tokens; valid up to depth
    scores: torch.Tensor  # [B, W] float32 cumulative log-probabilities (-inf: no valid beam)
    trie_states: torch.Tensor  # [B, W] trie node of each beam (-1: dead)
    visible: torch.Tensor  # [B, W, S] bool: cached positions each beam attends
    depth: torch.Tensor  # [B] tokens generated per beam
    fed: torch.Tensor  # [B] how many of them the cache holds (the rest are fed next)
    prompt_lengths: torch.Tensor  # [B] real prompt tokens (position of generated token d is length + d - 1)
    # keyed sampling (``keyed``) only: ``scores`` are then the Gumbel keys the beams are ranked by
    log_probs: torch.Tensor | None = None  # [B, W] cumulative log-probabilities (what the lists report)
    noise_keys: torch.Tensor | None = None  # [B] int64 key of each request's noise

    @property
    def list_scores(self) -> torch.Tensor:
        """[B, W] the scores a finished list reports: the cumulative log-probabilities."""
        return self.scores if self.log_probs is None else self.log_probs

    @property
    def width(self) -> int:
        return self.scores.shape[1]

    def select_rows(self, rows: torch.Tensor) -> BeamState:
        """The requests ``rows`` [B'] only, in that order."""
        values = (getattr(self, f.name) for f in dataclasses.fields(self))
        return BeamState(*(v if v is None else v.index_select(0, rows) for v in values))

    def gather_visible(self, index: torch.Tensor, kept: torch.Tensor) -> BeamState:
        """``visible`` re-expressed after the cache kept positions ``index`` [B, S'] (``kept`` marks real ones)."""
        b, w, _ = self.visible.shape
        rows, beams = constants.column(b, index.device, 2), constants.column(w, index.device)
        visible = self.visible[rows, beams, index[:, None, :]] & kept[:, None, :]
        return dataclasses.replace(self, visible=visible)


def root_state(attention_mask: torch.Tensor, capacity: int, width: int = 1) -> BeamState:
    """One empty beam per left-padded prompt (its whole prompt already in the cache); room for ``capacity`` tokens.

    With ``width`` W > 1 the empty beam is followed by W - 1 dead copies (score -inf, trie state -1), so that a step
    from the root has the shape of every later step (W beams) and still chooses among the live beam's extensions.
    """
    b = attention_mask.shape[0]
    device = attention_mask.device
    zeros = torch.zeros(b, dtype=torch.long, device=device)
    live = (constants.arange(width, device) == 0).expand(b, width)
    ninf, zero = (constants.filler(v, torch.float32, device) for v in (float("-inf"), 0.0))
    return BeamState(
        sequences=torch.zeros(b, width, capacity, dtype=torch.long, device=device),
        scores=torch.where(live, zero, ninf),
        trie_states=live.long() - 1,
        visible=attention_mask.bool()[:, None, :].expand(b, width, attention_mask.shape[1]),
        depth=zeros,
        fed=zeros.clone(),
        prompt_lengths=attention_mask.long().sum(1),
    )


def candidates(logits: torch.Tensor, scores: torch.Tensor, trie_states: torch.Tensor, trie: PrefixTrie) -> torch.Tensor:
    """Cumulative scores [B, W * V] of every one-token extension of beams with ``scores`` [B, W] and
    ``trie_states`` [B, W] given next-token ``logits`` [B, W, V] (beam-major), -inf where the trie forbids it."""
    b, w, v = logits.shape
    logprobs = torch.log_softmax(logits.float(), dim=-1).masked_fill(trie.forbidden(trie_states), float("-inf"))
    return (logprobs + scores.unsqueeze(2)).view(b, w * v)


Grid = Callable[[torch.Tensor, BeamState, PrefixTrie], tuple[torch.Tensor, torch.Tensor | None]]
"""(next-token logits [B, W, V], beams, trie) -> (ranking scores [B, W * V] of every extension, their cumulative
log-probabilities when the ranking scores are not (keyed beams), else None)."""


def plain_grid(logits: torch.Tensor, state: BeamState, trie: PrefixTrie) -> tuple[torch.Tensor, None]:
    """The beam step's grid: ``candidates``, ranked by their cumulative log-probabilities."""
    return candidates(logits, state.scores, state.trie_states, trie), None


def pick(values: torch.Tensor | None, parents: torch.Tensor, tokens: torch.Tensor, vocab: int) -> torch.Tensor | None:
    """``values`` [B, W * V] at the chosen (``parents``, ``tokens``) [B, k] (None stays None)."""
    return None if values is None else values.gather(1, parents * vocab + tokens)


def ordered_keys(cand: torch.Tensor) -> torch.Tensor:
    """Keys [B, M] (float64) that order ``cand`` [B, M] (float32) by value, descending, and equal values by index,
    ascending.

    ``torch.topk`` leaves the order among equal values unspecified (and it differs on CUDA), while bf16 logits make
    exact ties common; one ``topk`` over these keys breaks every tie by the lower flattened index, i.e. the lower
    (beam, token id), wherever it runs. In float64 each value v moves down by ``(|v| + 2**-1000) * (i + 1) * eps``
    (``constants.tie_steps``, at most 2**-25 relative): less than half the gap to the next float32, more than two
    float64 steps between indices; -inf is first clamped to -1e300 so dead entries keep their index order too. Four
    ops (the integer-bits form took nine); beyond 2**25 candidates, or without float64 (MPS), the integer form.
    """
    m = cand.shape[1]
    if m > constants.TIE_STEPS_MAX or cand.device.type == "mps":
        return _ordered_bits(cand)
    value = cand.double().clamp_(min=-1e300)
    size = torch.hypot(value, constants.tie_floor(cand.device))  # |v|, or 2**-1000 for v = 0
    return torch.addcmul(value, size, constants.tie_steps(m, cand.device), value=-1.0)


def _ordered_bits(cand: torch.Tensor) -> torch.Tensor:
    """int64 keys of the same order as ``ordered_keys``: the float32 bits mapped to integers of the same order (+0.0
    for -0.0), shifted up, the index countdown in the low bits."""
    bits = (cand.float() + 0.0).view(torch.int32)
    ordered = (bits ^ ((bits >> 31) & 0x7FFFFFFF)).long()  # monotone in the float's value (negatives flipped)
    shift = max(cand.shape[1] - 1, 1).bit_length()
    return (ordered << shift) | constants.countdown(cand.shape[1], cand.device)


def select_top(cand: torch.Tensor, width: int, vocab: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The ``width`` best candidates: (parents [B, k], tokens [B, k], scores [B, k]), best first, ties by index."""
    index = torch.topk(ordered_keys(cand), width, dim=1).indices
    return index // vocab, index % vocab, cand.gather(1, index)


def _log_exponential(shape: torch.Size, generator: torch.Generator, device: torch.device) -> torch.Tensor:
    """log(-log u), u uniform from ``generator`` (drawn on the generator's device, then moved): minus a standard
    Gumbel variable."""
    u = torch.rand(shape, generator=generator, device=generator.device).to(device)
    return torch.log(-torch.log(u.clamp(min=1e-20, max=1.0 - 1e-7)))


def gumbel(shape: torch.Size, generator: torch.Generator, device: torch.device) -> torch.Tensor:
    """Standard Gumbel noise from ``generator``."""
    return -_log_exponential(shape, generator, device)


def perturbed(scores: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """``scores`` plus standard Gumbel noise (the same draws and values as ``scores + gumbel(...)``, one op less)."""
    return scores - _log_exponential(scores.shape, generator, scores.device)


def select_sample(
    cand: torch.Tensor, width: int, vocab: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``width`` candidates drawn without replacement from softmax(``cand``) (Gumbel top-k); scores are ``cand``."""
    keys = perturbed(cand, generator)
    index = torch.topk(keys, width, dim=1).indices
    return index // vocab, index % vocab, cand.gather(1, index)


def extend(
    state: BeamState,
    parents: torch.Tensor,
    tokens: torch.Tensor,
    scores: torch.Tensor,
    trie: PrefixTrie,
    grow: torch.Tensor | None = None,
    log_probs: torch.Tensor | None = None,
) -> BeamState:
    """New beams [B, k]: beam ``parents`` followed by ``tokens`` (not yet fed), with cumulative ``scores`` (and, for
    keyed beams, ``log_probs``).

    Rows where ``grow`` [B] is false take the parents as they are (no token appended: depth and trie states stay).
    """
    b, k = parents.shape
    rows = constants.column(b, parents.device)
    sequences = state.sequences[rows, parents]  # [B, k, C] a copy
    # a row that does not grow gets the token past its depth, where nothing reads it (capacity holds one more)
    sequences[rows, constants.arange(k, parents.device), state.depth[:, None]] = tokens
    parent_states = state.trie_states.gather(1, parents)
    trie_states, depth = trie.advance(parent_states, tokens, in_vocab=True), state.depth + 1
    if grow is not None:
        trie_states = torch.where(grow[:, None], trie_states, parent_states)
        depth = state.depth + grow.long()
    visible = state.visible[rows, parents]
    return dataclasses.replace(
        state,
        sequences=sequences,
        scores=scores,
        trie_states=trie_states,
        visible=visible,
        depth=depth,
        log_probs=log_probs,
    )


def feed(
    model: torch.nn.Module, cache: DynamicCache, state: BeamState, longest: int | None = None
) -> tuple[torch.Tensor, BeamState]:
    """Run every beam's unfed tail through ``model`` in one tree-masked forward.

    Returns the logits after each beam's last token [B, W, V] and the state with everything fed. Beams of a row
    with nothing to feed get meaningless logits. ``longest``, the longest unfed tail when the caller knows it (the
    decoders always do), saves reading it back from the device.
    """
    b, w, capacity = state.sequences.shape
    device = state.sequences.device
    r = max(int((state.depth - state.fed).max()) if longest is None else longest, 1)
    if r == 1:  # the draft's later steps: one token per beam, each beam's own chain is itself
        column = state.fed.clamp(max=capacity - 1)[:, None]
        tokens = state.sequences[constants.column(b, device), constants.arange(w, device), column]  # [B, W]
        positions = (state.prompt_lengths + state.fed)[:, None].expand(b, w)
        seen = constants.eye(w, device) & (state.fed < state.depth).view(b, 1, 1)  # [B, W, W]
        logits = forward_tree(model, cache, tokens, positions, state.visible, seen)  # [B, W, V]
        return logits, dataclasses.replace(state, visible=torch.cat([state.visible, seen], dim=2), fed=state.depth)
    steps = constants.arange(r, device)
    unfed = state.depth - state.fed  # [B]
    valid = steps < unfed[:, None]  # [B, R]
    column = (state.fed[:, None] + steps).clamp(max=capacity - 1)  # [B, R]
    rows, beams = constants.column(b, device, 2), constants.column(w, device)
    tokens = state.sequences[rows, beams, column[:, None, :]].reshape(b, w * r)
    positions = ((state.prompt_lengths + state.fed)[:, None] + steps)[:, None, :].expand(b, w, r)
    node_valid = valid[:, None, :].expand(b, w, r).reshape(b, w * r)  # [B, Q]
    past = (state.visible[:, :, None, :] & valid[:, None, :, None]).reshape(b, w * r, -1)
    # node (w, r) attends (w, r') for r' <= r: its own chain (which holds itself)
    tree = chains(w, r, device)[None] & node_valid[:, :, None] & node_valid[:, None, :]
    logits = forward_tree(model, cache, tokens, positions.reshape(b, w * r), past, tree)  # [B, Q, V]
    last = constants.arange(w, device)[None, :] * r + (unfed - 1).clamp(min=0)[:, None]  # [B, W]
    out = logits.gather(1, last[..., None].expand(b, w, logits.shape[2]))
    seen = chains(w, r, device)[None].expand(b, -1, -1).gather(1, last[..., None].expand(b, w, w * r))
    seen = seen & (unfed > 0)[:, None, None]  # [B, W, Q]
    return out, dataclasses.replace(state, visible=torch.cat([state.visible, seen], dim=2), fed=state.depth)


@functools.lru_cache(maxsize=64)
def chains(w: int, r: int, device: torch.device) -> torch.Tensor:
    """[W * R, W * R] bool: node (w, r) attends (w, r') for r' <= r (a shared constant: never write into it)."""
    with torch.inference_mode(False):
        same_beam = torch.eye(w, dtype=torch.bool, device=device)[:, None, :, None]
        chain = torch.ones(r, r, dtype=torch.bool, device=device).tril()[None, :, None, :]
        return (same_beam & chain).reshape(w * r, w * r)
