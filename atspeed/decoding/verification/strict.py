"""Strict top-K verification (lossless): a level is accepted when the target's own top-K are all drafted.

At level g the target takes its beam step from the current beams (exactly as its plain beam search would). If all
K chosen (parent, token) pairs are among the draft's N nodes of level g, the level is accepted and verification
goes on from the matched nodes; otherwise the target's top-K become the new beams (the correction). Either way the
beams are those of the target's own beam search, so the output equals it.

Fewer live extensions than K (a small trie, K above a level's children): the target's top-K then holds -inf
entries, which no draft can hold (the draft keeps only finite nodes). The level is accepted when every live
(finite) entry is drafted; each -inf entry continues from the node of the best entry with its -inf score, so it
stays a dead beam (every extension -inf), as in the beam search, where it can never reach the final list
(K <= the trie's items, ``check_list_length``).
"""

from __future__ import annotations

import torch

from atspeed.decoding.search.beam import select_top
from atspeed.decoding.verification.verify import LevelDecision, LevelInput, match_drafted


def verify_level(inp: LevelInput) -> LevelDecision:
    k = inp.current.shape[1]
    parents, tokens, scores = select_top(inp.cand, k, inp.cand.shape[1] // k)
    found, nodes = match_drafted(inp, parents, tokens)
    live = scores > float("-inf")  # [B, K] best first: the live entries lead
    ok = inp.can_match & live[:, 0] & (found >= live).all(1)  # found >= live: drafted, or not live
    nodes = torch.where(live, nodes, nodes[:, :1])  # dead entries: the best (drafted) node, kept at -inf
    return LevelDecision(ok, nodes, scores, parents, tokens, scores)
