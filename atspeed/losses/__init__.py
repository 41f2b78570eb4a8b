"""Alignment (distillation) losses of the draft against the target: the ``LOSSES`` table (pure tensor code).

How the alignment module uses it, per batch::

    spec = LOSSES[name]                        # name: LossName, a Literal: a typo fails at config parse time
    check_loss(name, options)                  # at construction: options that would train nothing
    check_top_k(options.top_k, level_masks)    # once, before training: level_masks [L, V] bool, the codes of each level
    check_support(name, options, teacher_top_k)  # and: truncated teacher data only for losses finite on it
    if spec.positions != "none":               # "beams": along the target's beams; "ground_truth": along the label
        per_position = spec.fn(student_logits, teacher_logits, allowed, labels, options)  # [B, N, L]
        weights = beam_weights(beam_scores) if weight_beams else None  # [B, N]; None: uniform
        l_align = reduce(per_position, weights, valid)  # scalar
    loss = (1 - alpha) * ce + alpha * l_align  # positions "none" (sft): loss = ce

with student_logits and teacher_logits [B, N, L, V] at the identifier positions (V: the code columns, or the whole
vocabulary), allowed [B, N, L, V] the trie mask at each position (broadcastable), labels [B, N, L] the sequence's
tokens (read by ``seq_kd`` only), valid [B, N, L] the real positions. ``allowed`` is always the trie's mask, never
the teacher's finite entries: truncated teacher logits (-inf outside its top-k) mean p = 0 at those codes.
Conventions (masking, dtype, detached teacher, zero at empty positions): ``atspeed.losses.divergences``; the
formulas and which losses accept truncated teacher data: ``atspeed.losses.table``.
"""

from atspeed.losses.options import OPTIONS_KEY, LossOptions, check_top_k
from atspeed.losses.reduction import beam_weights, reduce
from atspeed.losses.table import LOSSES, LossFn, LossName, LossSpec, Positions, check_loss, check_support

__all__ = [
    "LOSSES",
    "OPTIONS_KEY",
    "LossFn",
    "LossName",
    "LossOptions",
    "LossSpec",
    "Positions",
    "beam_weights",
    "check_loss",
    "check_support",
    "check_top_k",
    "reduce",
]
