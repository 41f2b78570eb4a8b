"""The table of alignment losses, chosen by name (``LOSSES``), and where each one trains.

=====================  ================  ======  ==================================================================
name                   positions         trunc.  per-position loss (p = target, q = draft, on the trie's codes)
=====================  ================  ======  ==================================================================
``atspeed_s``          ``beams``         no      KL(q~ || p~) + p~(v_k) * H(q~) on the draft's top-k (AtSpeed-S)
``atspeed_s_authors``  ``beams``         no      the same two terms as the authors' code computes them:
                                                 softmax(q / 0.001), softmax(p / 0.001) on the top-k, x L / (L + 1)
``atspeed_r``          ``beams``         yes     TVD 0.5 * sum_v |q(v) - p(v)| (AtSpeed-R, relaxed)
``sft``                ``none``          yes     0: no alignment term (the module trains on the full CE; alpha unused)
``word_kd``            ``ground_truth``  yes     forward KL(p || q)
``seq_kd``             ``beams``         yes     cross-entropy -log q(label) on the target's beams (p not read)
``tvd_kd``             ``ground_truth``  yes     TVD 0.5 * sum_v |q(v) - p(v)| (DistillSpec style)
``rkl``                ``beams``         no      reverse KL(q || p) on all allowed codes
``jsd``                ``beams``         beta<1  generalised JSD (TRL): beta = 0 forward KL, beta = 1 reverse KL
=====================  ================  ======  ==================================================================

``positions`` says which sequences the module scores: ``beams`` along each of the target's stored beams
(conditioned on (x, y_<t)), ``ground_truth`` along the ground-truth identifier, ``none`` nowhere. ``trunc.`` says
whether the loss is finite on truncated teacher data (made with the teacher's ``top_k``: p = 0 outside the target's
top-k codes, renormalised on them, while q keeps every code the trie allows): "no" losses take a reverse KL, +inf
where p = 0 and q > 0, and ``LossSpec.full_support`` tells the module to refuse such data for them. Every ``fn``
has the signature ``LossFn`` (see ``atspeed.losses.divergences`` for the shared conventions); options such as the
temperature, the top-k support and beta are ``LossOptions``, and beam weighting belongs to ``reduce``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, get_args

import torch

from atspeed.losses import divergences
from atspeed.losses.options import OPTIONS_KEY, LossOptions

LossName = Literal["atspeed_s", "atspeed_s_authors", "atspeed_r", "sft", "word_kd", "seq_kd", "tvd_kd", "rkl", "jsd"]
Positions = Literal["ground_truth", "beams", "none"]

# (student_logits [..., V], teacher_logits [..., V], allowed [..., V] bool, labels [...] long, options) -> loss [...]
LossFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, LossOptions], torch.Tensor]


@dataclass(frozen=True)
class LossSpec:
    """A per-position loss, the positions it trains on, and whether it needs the target's full distribution."""

    fn: LossFn
    positions: Positions
    full_support: Callable[[LossOptions], bool] = lambda options: False
    """True (for these options) when the loss takes a reverse KL, +inf on truncated teacher data: refuse such data."""

    def __post_init__(self) -> None:
        if self.positions not in get_args(Positions):
            raise ValueError(f"positions must be one of {get_args(Positions)}, got {self.positions!r}")


def _always(options: LossOptions) -> bool:
    return True


def _at_beta_1(options: LossOptions) -> bool:  # jsd: reverse KL at beta = 1 only
    return options.beta == 1.0


LOSSES: dict[LossName, LossSpec] = {
    "atspeed_s": LossSpec(divergences.atspeed_s, "beams", _always),
    "atspeed_s_authors": LossSpec(divergences.atspeed_s_authors, "beams", _always),
    "atspeed_r": LossSpec(divergences.tvd, "beams"),
    "sft": LossSpec(divergences.sft, "none"),
    "word_kd": LossSpec(divergences.word_kd, "ground_truth"),
    "seq_kd": LossSpec(divergences.seq_kd, "beams"),
    "tvd_kd": LossSpec(divergences.tvd, "ground_truth"),
    "rkl": LossSpec(divergences.rkl, "beams", _always),
    "jsd": LossSpec(divergences.jsd, "beams", _at_beta_1),
}
assert set(LOSSES) == set(get_args(LossName))


def check_loss(name: LossName, options: LossOptions) -> None:
    """Fail at construction on options that make the loss ``name`` train nothing."""
    if name in ("atspeed_s", "atspeed_s_authors") and options.top_k == 1:
        raise ValueError(
            f"{OPTIONS_KEY}.top_k = 1 with model.loss {name}: a top-1 support gives a zero loss and a zero "
            "gradient at every position; set top_k >= 2, or null for all allowed codes"
        )


def check_support(
    name: LossName, options: LossOptions, teacher_top_k: int | None, source: str = "teacher data"
) -> None:
    """Fail before training when the loss ``name`` needs the target's full distribution (``LossSpec.full_support``)
    but the teacher data (``source``, named in the message) keeps only its ``teacher_top_k`` most likely codes per
    position (None: all of them)."""
    if teacher_top_k is not None and LOSSES[name].full_support(options):
        raise ValueError(
            f"{source}: teacher data truncated to the target's top {teacher_top_k} codes (teacher model.top_k), but "
            f"model.loss {name} takes a reverse KL, infinite where the target's distribution was cut: make the "
            "teacher data without top_k, use model.teacher recompute, or a loss that accepts truncated data "
            "(atspeed_r, word_kd, seq_kd, tvd_kd, jsd with beta < 1)"
        )
