"""Exact relaxed verification: recursive rejection sampling keeps the target's sampling beam search distribution.

Notation as in ``relaxed``. At level g, p = softmax(cand) over the [B, K * V] grid of one-token extensions of the
target's K current beams. The draft drew its N level-g nodes x_1, ..., x_N one after the other WITHOUT replacement
from its own distribution q (Gumbel top-N, in order of decreasing key). q spreads over the extensions of all the
draft's level g-1 nodes, of which the current beams are K: a draft whose parent is not a current beam lies off the
grid, where p = 0. The target's sampling beam search wants K draws y_1, ..., y_K without replacement from p. Per
row, the K output slots are filled in turn (recursive rejection sampling, Jeon et al. 2024, drafts without
replacement):

1. slot k starts from r = p_k: p without y_1..y_{k-1}, renormalised (a fresh start every slot);
2. the next draft x not yet consumed (in any slot) is proposed from q_i: q without every consumed draft,
   renormalised. It is accepted with probability min(1, r(x) / q_i(x)), and then slot k = x; otherwise
   r = max(r - q_i, 0) renormalised, and the next draft is tried for the same slot. Either way x is consumed;
3. when the drafts run out, slot k is drawn from r and the later slots from p without the chosen (Gumbel top-k).

Why it is exact. One speculative step (propose x ~ q_i, accept with min(1, r / q_i), else fall back to a draw from
the residual max(r - q_i, 0) normalised) yields exactly a draw from r. Given everything so far, the next draft is
a draw from q without the consumed drafts: the draft drew it so, and the verification coins do not touch it. So
each fallback is itself such a step on the residual, down to the direct draw of step 3, and by induction over the
drafts left slot k is distributed as p_k given the earlier slots. The K outputs are K draws without replacement
from p: the target's own sampling beam search step. The level passes when all K outputs are drafted nodes; the
next level's drafts depend on the tree only, not on the coins, so the argument repeats there. Drafts whose parents
were not chosen only ever meet p = 0, which step 2 rejects (consuming their q mass, tracked in the normaliser);
dead beams (score -inf, such as the root's copies in a first call) have p = q = 0 on every extension.

Every real draft (finite q) is tested, also one a verification budget left unverified (``within_budget``):
testing only some would break the identity above. Accepting such a node is exact but ends the level (the target did
not compute its children). For the sampling decoders the budget keeps nodes level by level in draw order
(``budget_rank``), so whether a level-g node is verified depends on levels <= g only and the next level's drafts
stay plain draws of the draft: the argument holds under any budget.

``relaxed`` (the paper's AtSpeed-R) instead tests every draft with its single-draw probability and keeps a uniform
K of the accepted: biased once N > 1. All randomness comes from the given ``torch.Generator``.
"""

from __future__ import annotations

import torch

from atspeed.decoding.search.beam import gumbel, select_sample
from atspeed.decoding.verification.relaxed import candidate_draft_probs
from atspeed.decoding.verification.verify import LevelDecision, LevelInput, match_drafted

_TINY = 1.0e-300  # floor of the proposal's normaliser (float64)
_ZERO_WEIGHT = -1.0e30  # Gumbel key of an unchosen p = 0 candidate: after every p > 0 one, before the chosen


def _drafts_on_grid(inp: LevelInput, vocab: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Level g's drafts, in draft order: (grid index [B, N] (meaningless off the grid), on the grid [B, N],
    single-draw q [B, N] float64, real draft [B, N])."""
    tree, g = inp.tree, inp.level
    parent_nodes, tokens = tree.parent_nodes(g), tree.tokens[:, g - 1]  # [B, N]
    hit = parent_nodes[:, :, None] == inp.current[:, None, :]  # [B, N, K]
    log_q = tree.log_q[:, g - 1].double()
    return hit.int().argmax(2) * vocab + tokens, hit.any(2), log_q.exp(), torch.isfinite(log_q)


def _normalise(weights: torch.Tensor, fallback: torch.Tensor) -> torch.Tensor:
    """``weights`` [B, M] scaled to sum 1 per row; ``fallback`` where a row sums to 0."""
    total = weights.sum(1, keepdim=True)
    return torch.where(total > 0, weights / total.clamp(min=_TINY), fallback)


def _keys(weights: torch.Tensor, chosen: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Gumbel keys whose top-k draws without replacement from ``weights`` [B, M]; candidates of weight 0 rank after
    every positive one (only reached with fewer positive candidates than slots), ``chosen`` ones last."""
    keys = weights.log() + noise
    return torch.where(weights > 0, keys, torch.where(chosen, float("-inf"), _ZERO_WEIGHT))


def _finish(
    p: torch.Tensor, r: torch.Tensor, chosen: torch.Tensor, out: torch.Tensor, slot: torch.Tensor, inp: LevelInput
) -> torch.Tensor:
    """Step 3 for rows with slots left: slot ``slot`` [B] from ``r``, the later ones from ``p`` without the chosen."""
    gen, k = inp.generator, out.shape[1]
    slots = torch.arange(k, device=out.device)
    pending = slot < k
    first = _keys(r, chosen, gumbel(r.shape, gen, r.device).double()).argmax(1, keepdim=True)  # [B, 1]
    out = torch.where(pending[:, None] & (slots == slot[:, None]), first, out)
    chosen = chosen.scatter(1, first, chosen.gather(1, first) | pending[:, None])
    slot = slot + pending.long()
    noise = gumbel(p.shape, gen, p.device).double()
    rest = torch.topk(_keys(p.masked_fill(chosen, 0.0), chosen, noise), k, dim=1).indices  # [B, K]
    later = rest.gather(1, (slots[None, :] - slot[:, None]).clamp(min=0))
    return torch.where(slots[None, :] >= slot[:, None], later, out)


def _recursive_draws(inp: LevelInput, vocab: int) -> torch.Tensor:
    """K grid indices [B, K] per row, drawn without replacement from p by recursive rejection sampling of the
    drafts (rows that cannot match: plain draws from p)."""
    gen, k = inp.generator, inp.current.shape[1]
    p = torch.softmax(inp.cand.double(), dim=1).nan_to_num(0.0)  # [B, K * V]
    q = candidate_draft_probs(inp).double()  # [B, K * V] q over the grid, consumed drafts zeroed as we go
    index, on_grid, q_draft, real = _drafts_on_grid(inp, vocab)  # [B, N]
    b, n = index.shape
    u = torch.rand((b, n), generator=gen, device=gen.device).to(p.device, p.dtype)
    slots = torch.arange(k, device=p.device)
    out = torch.zeros(b, k, dtype=torch.long, device=p.device)  # [B, K] grid index of each filled slot
    slot = torch.zeros(b, dtype=torch.long, device=p.device)  # [B] the slot being filled
    chosen = torch.zeros_like(p, dtype=torch.bool)
    q_left = torch.ones(b, dtype=p.dtype, device=p.device)  # [B] q mass of the unconsumed (off the grid included)
    r = p  # [B, K * V] the working target of the current slot
    for j in range(n):  # all N drafts: rows done early only see ``live`` false (no read-back to stop sooner)
        live = inp.can_match & (slot < k) & real[:, j]  # [B] rows proposing draft j to their current slot
        x = index[:, j : j + 1]  # [B, 1]
        norm = q_left.clamp(min=_TINY)
        q_i = q / norm[:, None]  # [B, K * V] the proposal of draft j
        r_x = torch.where(on_grid[:, j], r.gather(1, x)[:, 0], 0.0)
        accept = live & (r_x > 0) & (u[:, j] * q_draft[:, j] / norm < r_x)
        out = torch.where(accept[:, None] & (slots == slot[:, None]), x, out)
        chosen = chosen.scatter(1, x, chosen.gather(1, x) | accept[:, None])
        slot = slot + accept.long()
        p_k = _normalise(p.masked_fill(chosen, 0.0), torch.zeros_like(p))  # fresh start of the next slot
        residual = _normalise((r - q_i).clamp(min=0.0), p_k)
        r = torch.where(accept[:, None], p_k, torch.where(live[:, None], residual, r))
        q_left = q_left - torch.where(live, q_draft[:, j], 0.0)
        q = q.scatter(1, x, torch.where((live & on_grid[:, j])[:, None], 0.0, q.gather(1, x)))
    return _finish(p, r, chosen, out, slot, inp)


def verify_level(inp: LevelInput) -> LevelDecision:
    k = inp.current.shape[1]
    vocab = inp.cand.shape[1] // k
    if inp.level > inp.tree.levels:  # the bonus step: K draws from p
        parents, tokens, scores = select_sample(inp.cand, k, vocab, inp.generator)
        return LevelDecision(torch.zeros_like(inp.can_match), parents, scores, parents, tokens, scores)
    chosen = _recursive_draws(inp, vocab)  # [B, K]
    parents, tokens, scores = chosen // vocab, chosen % vocab, inp.cand.gather(1, chosen)
    found, nodes = match_drafted(inp, parents, tokens)
    ok = inp.can_match & found.all(1)
    return LevelDecision(ok, nodes, scores, parents, tokens, scores)
