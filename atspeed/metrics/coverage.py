"""Set coverage: the share of one set of token tuples (the target's top-K) found in another (the draft's top-N).

``atspeed.decoding.search.beam_search.lockstep_coverage`` applies it at every depth to the (parent, token) pairs each
model keeps when extending the target's beams: strict verification accepts a drafted depth only when the share is 1.
"""

from __future__ import annotations

import torch


def coverage(target: torch.Tensor, draft: torch.Tensor) -> torch.Tensor:
    """Fraction [B] of the valid tuples ``target`` [B, K, d] found among the valid tuples ``draft`` [B, N, d].

    A tuple holding a negative token is invalid (a dead beam): it is neither counted nor matched. Rows without a
    valid target tuple give 0. Tuples within one set are assumed distinct (as beam search keeps them).
    """
    if target.shape[0] != draft.shape[0] or target.shape[2] != draft.shape[2]:
        raise ValueError(f"tuple sets must share batch and length: {tuple(target.shape)} vs {tuple(draft.shape)}")
    t_valid = (target >= 0).all(2)  # [B, K]
    d_valid = (draft >= 0).all(2)  # [B, N]
    same = (target[:, :, None, :] == draft[:, None, :, :]).all(3) & d_valid[:, None, :]  # [B, K, N]
    found = same.any(2) & t_valid  # [B, K]
    return found.sum(1).float() / t_valid.sum(1).clamp(min=1).float()
