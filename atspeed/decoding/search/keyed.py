"""Shared keyed Gumbel noise: the target's sampling beam search as stochastic beam search, and the same noise for
the draft (``beam_sample_keyed``, ``spec_keyed``).

Sampling. p(y) = prod_t p(y_t | x, y_<t) over identifiers, each factor the model's next-token probability
renormalised over the codes the trie allows; phi(y_1..t) = log p(y_1..t) (the root's is 0, and a prefix's children
sum to it in probability). Gumbel-top-K (Kool, van Hoof, Welling, ICML 2019, "stochastic beam search"): give every
identifier y the key phi(y) + g_y, g_y independent Gumbel(0, 1); the K largest keys are K draws without replacement
from p, in draw order. A prefix's key G(prefix), the largest key below it, is Gumbel(phi(prefix)); given its parent's
G = T, the children's keys are Gumbel(phi(child)) conditioned on their maximum being T, drawn exactly by the
truncation: G_i = phi_i + g_i for every allowed child i, Z = max_i G_i, and

    G~_i = -log(exp(-T) - exp(-Z) + exp(-G_i))  =  -logaddexp(-T, -G_i + log(1 - exp(G_i - Z)))

(the second form is the one computed: no overflow; the best child gets T itself). The root's T is 0. A child's key
never exceeds its parent's, so the K largest keys at depth L lie below the K largest at every depth: a beam search of
width K ranking by G~ (``beam_search(noise_keys=...)``) returns the top-K keys, i.e. a sample of K identifiers
without replacement from p. Without the truncation (ranking by phi + g at each depth) it would draw each depth's
K from the flattened candidates instead: another distribution (the tests show the difference).

Keyed noise. g of the candidate (prefix, token) of a request is a counter-based hash of (seed, request, prefix
tokens, token) mapped to a uniform in (0, 1) and then to a Gumbel: no generator state, nothing read back. The key
G~ of a node is then a function of its path only (the noise and the model's distributions at its ancestors), the
same in any search that reaches it: ``spec_keyed``'s target, verifying strictly on its G~, returns exactly the
lists of ``beam_sample_keyed`` with that seed, and the draft, proposing by its own G~ (its own phi with the same
noise, from the target's beams and keys), ranks like the target when its distributions are close. Requests are
numbered by the decoder in the order it sees them (``BoundDecoder``), so the lists do not depend on the batch size.

A keyed beam holds G~ in ``BeamState.scores`` (what the beam steps and strict verification rank by), phi in
``BeamState.log_probs`` (what the lists report) and its request's key in ``BeamState.noise_keys``.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from atspeed.decoding import constants
from atspeed.decoding.search.beam import BeamState
from atspeed.decoding.search.draft_tree import NodeTable, TokenTree
from atspeed.items.trie import PrefixTrie


def _signed(value: int) -> int:
    return value - (1 << 64) if value >= 1 << 63 else value


_GOLDEN, _MUL1, _MUL2 = (_signed(c) for c in (0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB))
_LOW48 = (1 << 48) - 1


def mix(x: torch.Tensor) -> torch.Tensor:
    """SplitMix64's output function on int64 tensors (wrapping arithmetic; ``>>`` made logical by a mask)."""
    x = x + _GOLDEN
    x = (x ^ ((x >> 30) & ((1 << 34) - 1))) * _MUL1
    x = (x ^ ((x >> 27) & ((1 << 37) - 1))) * _MUL2
    return x ^ ((x >> 31) & ((1 << 33) - 1))


def request_keys(seed: int, request_ids: torch.Tensor) -> torch.Tensor:
    """[B] int64 key of each request (``request_ids`` [B]) under ``seed``."""
    return mix(mix(torch.full_like(request_ids, seed)) ^ request_ids.long())


@functools.lru_cache(maxsize=64)
def _constant(kind: str, lo: int, hi: int, device: torch.device) -> torch.Tensor:
    """Hash inputs that depend only on sizes, made once per device (``decoding.constants``' reasoning)."""
    with torch.inference_mode(False):
        if kind == "positions":  # position c's offset in a prefix part, (c + 1) << 40, c in lo..hi-1
            return (torch.arange(lo, hi, device=device) + 1) << 40
        return mix(torch.arange(lo, hi, device=device) * _MUL2)  # "tokens": each token's own hash


def prefix_keys(sequences: torch.Tensor, depth: torch.Tensor, noise_keys: torch.Tensor) -> torch.Tensor:
    """[B, W] int64 key of each prefix: ``sequences`` [B, W, C] read up to ``depth`` ([B] or [B, W]) tokens, under
    its request's key [B]. Each (position, token) is hashed apart, then summed (48-bit parts: no overflow)."""
    column = constants.arange(sequences.shape[2], sequences.device)
    parts = mix(sequences + _constant("positions", 0, sequences.shape[2], sequences.device)) & _LOW48  # [B, W, C]
    depth = depth[:, None] if depth.ndim == 1 else depth
    inside = column[None, None, :] < depth[..., None]  # [B, W, C]
    return mix(torch.where(inside, parts, constants.filler(0, parts.dtype, parts.device)).sum(2) ^ noise_keys[:, None])


def keyed_gumbel(keys: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    """[B, W, hi - lo] float64 standard Gumbel noise of tokens lo..hi-1 after each prefix key [B, W]."""
    tokens = _constant("tokens", lo, hi, keys.device)  # [V']
    bits = mix(keys[..., None] ^ tokens)
    u = (((bits >> 11) & ((1 << 53) - 1)).double() + 0.5) * 2.0**-53  # in (0, 1)
    return -torch.log(-torch.log(u))


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x <= 0 in float64 (-inf at 0). One branch: below -log 2, where log1p(-exp(x)) would be
    the accurate form, this one's absolute error stays under 1e-16, far below anything the keys compare."""
    return torch.log(-torch.expm1(x))


def truncate(raw: torch.Tensor, parent: torch.Tensor) -> torch.Tensor:
    """Children's keys [B, W, V'] from their perturbed log-probs ``raw`` = phi + g [B, W, V'] (-inf: not allowed)
    and the parents' keys ``parent`` [B, W]: conditioned on their maximum being the parent's (module docstring)."""
    z = raw.max(2, keepdim=True).values
    keys = -torch.logaddexp(-parent[..., None], -raw + _log1mexp(raw - z))
    live = (raw > float("-inf")) & (parent > float("-inf"))[..., None]  # neither is +inf or NaN
    return torch.where(live, keys, constants.ninf(keys))


def grid(
    logits: torch.Tensor,
    keys: torch.Tensor,
    log_probs: torch.Tensor,
    trie_states: torch.Tensor,
    prefixes: torch.Tensor,
    trie: PrefixTrie,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Every one-token extension of W beams with next-token ``logits`` [B, W, V], keys G~ ``keys`` [B, W], phi
    ``log_probs`` [B, W], ``trie_states`` and ``prefix_keys`` [B, W]: (keys G~ [B, W * V] float32, phi [B, W * V]),
    -inf where the trie forbids. Only the identifier span of the vocabulary gets noise; the rest is -inf."""
    b, w, v = logits.shape
    lo, hi = trie.span
    allowed = trie.mask(trie_states.reshape(-1)).view(b, w, v)[..., lo:hi]
    step = torch.log_softmax(logits[..., lo:hi].float().masked_fill(~allowed, float("-inf")), dim=-1)
    phi = torch.where(allowed, log_probs[..., None] + step, constants.ninf(step))  # no NaN from rows allowing nothing
    g = truncate(phi.double() + keyed_gumbel(prefixes, lo, hi), keys.double())
    pad = (lo, v - hi)
    return F.pad(g.float(), pad, value=float("-inf")).view(b, -1), F.pad(phi, pad, value=float("-inf")).view(b, -1)


def beam_grid(logits: torch.Tensor, state: BeamState, trie: PrefixTrie) -> tuple[torch.Tensor, torch.Tensor]:
    """``grid`` for the beams of ``state`` (a ``beam.Grid``: the keyed beam step of the target and of the draft)."""
    prefixes = prefix_keys(state.sequences, state.depth, state.noise_keys)
    return grid(logits, state.scores, state.log_probs, state.trie_states, prefixes, trie)


def keyed_root(root: BeamState, noise_keys: torch.Tensor) -> BeamState:
    """The root beams of a keyed search: key G~ = phi = 0 (dead copies -inf), the requests' keys [B]."""
    return dataclasses.replace(root, log_probs=root.scores.clone(), noise_keys=noise_keys)


def _step_log_probs(logits: torch.Tensor, trie_states: torch.Tensor, tokens: torch.Tensor, trie: PrefixTrie):
    """log p(token | node) [B, M] renormalised over the allowed codes, from the nodes' ``logits`` [B, M, V]."""
    b, m, v = logits.shape
    lo, hi = trie.span
    allowed = trie.mask(trie_states.reshape(-1)).view(b, m, v)[..., lo:hi]
    step = torch.log_softmax(logits[..., lo:hi].float().masked_fill(~allowed, float("-inf")), dim=-1)
    picked = step.gather(2, (tokens - lo).clamp(0, hi - lo - 1)[..., None])[..., 0]
    inside = (tokens >= lo) & (tokens < hi)
    return torch.where(inside & (picked > float("-inf")), picked, constants.ninf(picked))  # NaN (nothing allowed) too


@dataclass(frozen=True)
class TreeKeys:
    """The target's view of one verified tree: phi and the prefix key of every node [B, Q] (``build``)."""

    log_probs: torch.Tensor
    prefixes: torch.Tensor
    logits: torch.Tensor  # [B, Q, V] the target's logits at every node
    table: NodeTable
    trie: PrefixTrie

    @classmethod
    def build(cls, logits: torch.Tensor, tree: TokenTree, table: NodeTable, beams: BeamState, trie: PrefixTrie):
        """phi of the roots (the beams') and, level by level, of the drafted nodes under the target."""
        b = logits.shape[0]
        phi = [beams.log_probs]
        for g in range(1, tree.levels + 1):
            parents = tree.parent_nodes(g)  # [B, N]
            parent_logits = logits[constants.column(b, logits.device), parents]
            step = _step_log_probs(parent_logits, table.trie_states.gather(1, parents), tree.tokens[:, g - 1], trie)
            phi.append(torch.cat(phi, 1).gather(1, parents) + step)
        depth = beams.depth[:, None] + tree.node_levels()  # [B, Q]
        prefixes = prefix_keys(table.sequences, depth, beams.noise_keys)
        return cls(torch.cat(phi, 1), prefixes, logits, table, trie)

    def grid(self, node_logits: torch.Tensor, current: torch.Tensor, keys: torch.Tensor, trie_states: torch.Tensor):
        """The keys G~ [B, K * V] of every extension of the nodes ``current`` [B, K] (an ``accept.decide`` grid)."""
        lp, pk = self.log_probs.gather(1, current), self.prefixes.gather(1, current)
        return grid(node_logits, keys, lp, trie_states, pk, self.trie)[0]

    def new_log_probs(self, nodes: torch.Tensor, tokens: torch.Tensor, keys: torch.Tensor, grow: torch.Tensor):
        """phi [B, K] of the new beams: node ``nodes`` [B, K] + ``tokens`` (rows where ``grow`` [B]), keys ``keys``
        (-inf: a dead beam, whose phi is -inf too)."""
        node_logits = self.logits[constants.column(nodes.shape[0], nodes.device), nodes]
        step = _step_log_probs(node_logits, self.table.trie_states.gather(1, nodes), tokens, self.trie)
        phi = self.log_probs.gather(1, nodes) + torch.where(grow[:, None], step, 0.0)
        return torch.where(keys > float("-inf"), phi, constants.ninf(phi))
