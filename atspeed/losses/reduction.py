"""From per-position losses to the scalar alignment loss: a mean over valid positions, beams optionally weighted."""

from __future__ import annotations

import torch


def beam_weights(scores: torch.Tensor) -> torch.Tensor:
    """The target's normalised beam probabilities [B, N] from its beams' sequence log-probabilities ``scores`` [B, N].

    w[b, n] = exp(scores[b, n]) / sum_j exp(scores[b, j]), in float32 (float64 stays float64). Beams scored -inf
    (absent) get 0; a row with no beam gets all 0.
    """
    s = scores.detach().to(torch.promote_types(scores.dtype, torch.float32))
    present = s > float("-inf")
    s = s.masked_fill(~present.any(-1, keepdim=True), 0.0)  # no beam at all: a finite dummy, zeroed below
    return s.softmax(-1).masked_fill(~present, 0.0)


def reduce(per_position: torch.Tensor, weights: torch.Tensor | None, valid: torch.Tensor) -> torch.Tensor:
    """Weighted mean of the per-position losses over the valid positions -> scalar.

    per_position [B, N, L] (N beams, or N = 1 along the ground truth), weights [B, N] (e.g. ``beam_weights``; >= 0,
    treated as constants) or None for uniform, valid [B, N, L] bool::

        loss = sum_{b,n,t} w[b,n] valid[b,n,t] l[b,n,t] / sum_{b,n,t} w[b,n] valid[b,n,t]

    With weights summing to 1 over each sample's beams and every position valid, this is the mean over samples of the
    probability-weighted average over their beams. 0 when nothing is valid (or all weight is 0). Values at invalid
    positions (inf, NaN) are selected away, never multiplied, so they do not reach the result.
    """
    if valid.shape != per_position.shape or valid.dtype != torch.bool:
        raise ValueError(f"valid must be a bool mask of shape {tuple(per_position.shape)}, got {tuple(valid.shape)}")
    w = valid.to(per_position.dtype)  # [B, N, L]
    if weights is not None:
        if weights.shape != per_position.shape[:2]:
            raise ValueError(f"weights {tuple(weights.shape)} must be [B, N] = {tuple(per_position.shape[:2])}")
        w = w * weights.detach().to(per_position.dtype).unsqueeze(-1)
    total = torch.where(valid, per_position, 0.0).mul(w).sum()
    return total / w.sum().clamp_min(torch.finfo(w.dtype).tiny)
