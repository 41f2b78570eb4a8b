"""Strict top-K verification (lossless): a level is accepted when the target's own top-K are all drafted.

At level g the target takes its beam step from the current beams (exactly as its plain beam search would). If all
K chosen (parent, token) pairs are among the draft's N nodes of level g, the level is accepted and verification
goes on from the matched nodes; otherwise the target's top-K become the new beams (the correction). Either way the
beams are those of the target's own beam search, so the output equals it.
"""

from __future__ import annotations

from atspeed.decoding.beam import select_top
from atspeed.decoding.verify import LevelDecision, LevelInput, match_drafted


def verify_level(inp: LevelInput) -> LevelDecision:
    k = inp.current.shape[1]
    parents, tokens, scores = select_top(inp.cand, k, inp.cand.shape[1] // k)
    found, nodes = match_drafted(inp, parents, tokens)
    ok = inp.can_match & found.all(1)
    return LevelDecision(ok, nodes, scores, parents, tokens, scores)
