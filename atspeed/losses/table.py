"""The table of alignment losses, chosen by name (``LOSSES``), and where each one trains.

==============  ================  =================================================================================
name            positions         per-position loss (p = target, q = draft, over the trie-allowed codes)
==============  ================  =================================================================================
``atspeed_s``   ``beams``         KL(q~ || p~) + p~(v_k) * H(q~) on the draft's top-k support (AtSpeed-S, strict)
``atspeed_r``   ``beams``         TVD 0.5 * sum_v |q(v) - p(v)| (AtSpeed-R, relaxed)
``sft``         ``none``          0: no alignment term (the module's (1 - alpha) * CE carries the training)
``word_kd``     ``ground_truth``  forward KL(p || q)
``seq_kd``      ``beams``         cross-entropy -log q(label) on the target's beams
``tvd_kd``      ``ground_truth``  TVD 0.5 * sum_v |q(v) - p(v)| (DistillSpec style)
``rkl``         ``beams``         reverse KL(q || p) on all allowed codes
``jsd``         ``beams``         generalised JSD, beta = 0 forward KL, beta = 1 reverse KL (TRL's convention)
==============  ================  =================================================================================

``positions`` says which sequences the module scores: ``beams`` along each of the target's stored beams
(conditioned on (x, y_<t)), ``ground_truth`` along the ground-truth identifier, ``none`` nowhere. Every ``fn`` has
the signature ``LossFn`` (see ``atspeed.losses.divergences`` for the shared conventions); options such as the
temperature, the top-k support and beta are ``LossOptions``, and beam weighting belongs to ``reduce``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, get_args

import torch

from atspeed.losses import divergences
from atspeed.losses.options import LossOptions

LossName = Literal["atspeed_s", "atspeed_r", "sft", "word_kd", "seq_kd", "tvd_kd", "rkl", "jsd"]
Positions = Literal["ground_truth", "beams", "none"]

# (student_logits [..., V], teacher_logits [..., V], allowed [..., V] bool, labels [...] long, options) -> loss [...]
LossFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, LossOptions], torch.Tensor]


@dataclass(frozen=True)
class LossSpec:
    """A per-position loss and the positions it trains on."""

    fn: LossFn
    positions: Positions

    def __post_init__(self) -> None:
        if self.positions not in get_args(Positions):
            raise ValueError(f"positions must be one of {get_args(Positions)}, got {self.positions!r}")


LOSSES: dict[LossName, LossSpec] = {
    "atspeed_s": LossSpec(divergences.atspeed_s, "beams"),
    "atspeed_r": LossSpec(divergences.tvd, "beams"),
    "sft": LossSpec(divergences.sft, "none"),
    "word_kd": LossSpec(divergences.word_kd, "ground_truth"),
    "seq_kd": LossSpec(divergences.seq_kd, "beams"),
    "tvd_kd": LossSpec(divergences.tvd, "ground_truth"),
    "rkl": LossSpec(divergences.rkl, "beams"),
    "jsd": LossSpec(divergences.jsd, "beams"),
}
assert set(LOSSES) == set(get_args(LossName))
