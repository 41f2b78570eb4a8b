"""Relaxed sampling verification (AtSpeed-R): faster, approximately distribution-preserving.

Both sides run sampling-based beam search: K (target) or N (draft) sequences drawn without replacement from the
softmax over cumulative sequence log-probabilities. At level g, with p the target's and q the draft's distribution
over the candidate sequences:

1. each drafted sequence y is accepted with probability min(1, p(y) / q(y)) (p(y) = 0 when its parent is not one
   of the target's current beams);
2. with at least K accepted, K of them (uniformly at random) become the beams and verification continues;
3. otherwise the accepted ones are kept and the missing ones are drawn without replacement from the residual
   max(p - q, 0), renormalised, excluding the accepted (then from p itself if the residual has too few positive
   entries); stop.

When every drafted level passes, the bonus step samples K sequences from p. All randomness comes from the given
``torch.Generator``, so a seed reproduces the output.
"""

from __future__ import annotations

import torch

from atspeed.decoding import constants
from atspeed.decoding.search.beam import perturbed, select_sample
from atspeed.decoding.verification.verify import LevelDecision, LevelInput, match_drafted

_ACCEPTED_FIRST = 1.0e4  # sort key offset between tiers: accepted > residual draws > draws from p


def candidate_draft_probs(inp: LevelInput) -> torch.Tensor:
    """q over the target's candidates [B, K * V]: the draft's probability of the same extensions."""
    g, tree = inp.level, inp.tree
    log_q = tree.candidate_log_q[g - 1]  # [B, W_{g-1}, V]
    b = inp.current.shape[0]
    # current beams are level g-1 nodes of the draft's own search (rows no longer verifying hold others: clamp)
    rows = (inp.current - tree.offset(g - 1)).clamp(0, log_q.shape[1] - 1)
    return log_q[constants.column(b, rows.device), rows].reshape(b, -1).exp()


def verify_level(inp: LevelInput) -> LevelDecision:
    k = inp.current.shape[1]
    vocab = inp.cand.shape[1] // k
    gen, tree, g = inp.generator, inp.tree, inp.level
    if g > tree.levels:  # the bonus step (rows that cannot match at g take it below too)
        parents, tokens, scores = select_sample(inp.cand, k, vocab, gen)
        return LevelDecision(torch.zeros_like(inp.can_match), parents, scores, parents, tokens, scores)
    # 1. accept each drafted sequence with probability min(1, p / q)
    parent_nodes, drafted_tokens = tree.parent_nodes(g), tree.tokens[:, g - 1]  # [B, N]
    hit, beam = (parent_nodes[:, :, None] == inp.current[:, None, :]).max(2)  # [B, N]: under a current beam, which
    index = beam * vocab + drafted_tokens  # [B, N] position among the target's candidates
    log_p = inp.cand.gather(1, index) - torch.logsumexp(inp.cand, dim=1, keepdim=True)
    log_p = torch.where(hit, log_p, constants.ninf(log_p))
    u = torch.rand(parent_nodes.shape, generator=gen, device=gen.device).to(log_p.device)
    # log p = -inf (not under a current beam, or forbidden) or NaN (a row of -inf candidates) compares false; a
    # drafted node's log q is finite (an undrafted one's parent is never a current beam, or its log p is -inf too)
    accept = (u.log() < log_p - tree.log_q[:, g - 1]) & inp.can_match[:, None]
    accepted = torch.zeros_like(inp.cand, dtype=torch.int32).scatter_add(1, index, accept.int()) > 0  # [B, K*V]
    # 2./3. accepted candidates first (random order), then residual draws, then (when the residual has fewer
    # positive entries than beams are missing) draws from p, so a candidate the trie forbids is never taken
    p = torch.softmax(inp.cand, dim=1).nan_to_num(0.0).masked_fill(accepted, 0.0)
    residual = (p - candidate_draft_probs(inp)).clamp(min=0)
    # One Gumbel draw per candidate serves the one tier it falls in (each draw is used once, so they stay
    # independent): accepted candidates in random order, residual draws, draws from p; and in rows with nothing
    # drafted at this level, the bonus step's K samples from p.
    tier = torch.where(residual > 0, residual.log(), p.log() - _ACCEPTED_FIRST)
    tier = tier.masked_fill(accepted, _ACCEPTED_FIRST)
    keys = perturbed(torch.where(inp.can_match[:, None], tier, inp.cand), gen)
    chosen = torch.topk(keys, k, dim=1).indices
    parents, tokens, scores = chosen // vocab, chosen % vocab, inp.cand.gather(1, chosen)
    found, nodes = match_drafted(inp, parents, tokens)
    ok = inp.can_match & (accepted.sum(1) >= k) & found.all(1)  # under a budget, an accepted draft may be unverified
    return LevelDecision(ok, nodes, scores, parents, tokens, scores)
