"""The options shared by the alignment losses (``LossOptions``) and the check of the top-k support against the trie."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

OPTIONS_KEY = "model.loss_options"  # where the options sit in the alignment config; error messages name it


@dataclass(frozen=True)
class LossOptions:
    """Options of every loss in ``LOSSES`` (each loss reads the ones it needs); checked at construction."""

    temperature: float = 1.0  # T: both the draft's and the target's logits are divided by T before the softmax
    top_k: int | None = None  # atspeed_s: size of the draft's top-k support; None = all allowed codes
    beta: float = 0.5  # jsd: 0 = forward KL(p || q), 1 = reverse KL(q || p), between = generalised JSD
    support_temperature: float = 0.001  # atspeed_s_authors: softmax(probabilities / this) on the top-k support

    def __post_init__(self) -> None:
        if not (math.isfinite(self.temperature) and self.temperature > 0):
            raise ValueError(f"{OPTIONS_KEY}.temperature must be > 0 and finite, got {self.temperature}")
        if self.top_k is not None and (isinstance(self.top_k, bool) or not isinstance(self.top_k, int)):
            raise ValueError(f"{OPTIONS_KEY}.top_k must be an integer or null, got {self.top_k!r}")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"{OPTIONS_KEY}.top_k must be >= 1 (or null for all allowed codes), got {self.top_k}")
        if not (math.isfinite(self.support_temperature) and self.support_temperature > 0):
            raise ValueError(
                f"{OPTIONS_KEY}.support_temperature must be > 0 and finite, got {self.support_temperature}"
            )
        if not 0.0 <= self.beta <= 1.0:
            raise ValueError(f"{OPTIONS_KEY}.beta must be in [0, 1], got {self.beta}")


def check_top_k(top_k: int | None, allowed: torch.Tensor) -> None:
    """Fail before training when the top-k support of ``atspeed_s`` is wider than the codes of some level.

    ``allowed`` [..., V] bool: the codes of each level, typically [L, V] (for level l, every code some trie node at
    depth l allows). Rows with no allowed code are skipped. Pass level masks, not the per-position trie masks: deep in
    the trie a prefix routinely has fewer than k children, and there the loss takes all of them as the support (see
    ``atspeed_s``), which is intended; a k wider than a whole level is a configuration mistake.
    """
    if top_k is None:
        return
    counts = allowed.reshape(-1, allowed.shape[-1]).sum(-1)  # [rows]
    too_few = (counts > 0) & (counts < top_k)
    if bool(too_few.any()):
        row = int(too_few.nonzero()[0, 0])
        raise ValueError(
            f"{OPTIONS_KEY}.top_k = {top_k} exceeds the {int(counts[row])} codes allowed at row {row} of the "
            f"{tuple(allowed.shape[:-1])} level mask (the level's whole code set): set it to at most "
            f"{int(counts[counts > 0].min())}, or null for all allowed codes"
        )
