"""Per-position alignment losses between the draft (student, q) and the target (teacher, p) over the trie's codes.

Every loss here has the one signature of the ``LOSSES`` table::

    fn(student_logits [..., V], teacher_logits [..., V], allowed [..., V] bool, labels [...] long,
       options: LossOptions) -> loss [...]

Conventions shared by all of them:

- q = softmax(student_logits / T) and p = softmax(teacher_logits / T) over the entries where ``allowed`` is True (the
  codes the trie allows after that position's prefix); T = ``options.temperature``, applied to both. Disallowed
  entries get probability 0 whatever they hold (finite values, -inf, NaN). Allowed student entries must be finite.
- Truncated teachers: an allowed teacher entry may be -inf (teacher data kept to the target's top-k codes), p = 0
  there, the rest renormalised. ``allowed`` stays the trie's mask, so q spreads over every code the trie allows and
  no loss mistakes the cut codes for forbidden ones. Each loss says what it makes of a truncated p: finite for
  ``word_kd``, ``tvd``, ``seq_kd``, ``sft`` and ``jsd`` with beta < 1; +inf for ``rkl``, ``jsd`` with beta = 1 and
  (where the cut meets the draft's support) ``atspeed_s``, whose reverse KL needs the full support
  (``LossSpec.full_support``: the alignment module refuses truncated data for them).
- ``teacher_logits`` may equally be log-probabilities (a softmax is shift-invariant), e.g. stored teacher data.
- Computed in float32 whatever the input dtype (float64 stays float64); the result has that dtype.
- The teacher is detached: gradients reach ``student_logits`` only.
- A position with no allowed entry (padding) gives 0, with zero gradient.
- No product ever meets -inf: log-probabilities are set to 0 at disallowed entries before any product, so masked
  entries contribute exactly 0 to values and gradients (``torch.nn.functional.kl_div`` would give NaN there).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from atspeed.losses.options import LossOptions


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for half-precision inputs, the input's own dtype from float32 up."""
    return torch.promote_types(dtype, torch.float32)


def masked_log_softmax(logits: Tensor, allowed: Tensor, temperature: float = 1.0) -> tuple[Tensor, Tensor]:
    """(log-probabilities, probabilities), each [..., V], of ``logits / temperature`` over the allowed entries.

    Both are 0 at disallowed entries and on rows with no allowed entry, so that products with them are safe.
    """
    x = logits.to(compute_dtype(logits.dtype)) / temperature
    empty = ~allowed.any(-1, keepdim=True)  # [..., 1]
    x = x.masked_fill(~allowed, float("-inf")).masked_fill(empty, 0.0)  # empty rows: a finite dummy, zeroed below
    log_probs = x.log_softmax(-1).masked_fill(~allowed, 0.0)
    return log_probs, log_probs.exp().masked_fill(~allowed, 0.0)


def kl(log_a: Tensor, a: Tensor, log_b: Tensor) -> Tensor:
    """KL(a || b) = sum_v a(v) (log a(v) - log b(v)), [..., V] -> [...], on masked_log_softmax outputs.

    Entries where a = 0 contribute 0 (a truncated teacher's cut codes, log a = -inf there); where a > 0 and b = 0 the
    result is +inf, as it should be.
    """
    return torch.where(a > 0, a * (log_a - log_b), 0.0).sum(-1)


def _checked(student_logits: Tensor, teacher_logits: Tensor, allowed: Tensor, labels: Tensor) -> Tensor:
    """``allowed`` expanded to the logits' shape, after checking shapes and dtype (no device sync)."""
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student logits {tuple(student_logits.shape)} and teacher logits {tuple(teacher_logits.shape)} differ "
            "in shape: restrict both to the same code columns"
        )
    if allowed.dtype != torch.bool:
        raise ValueError(f"allowed must be a bool mask, got {allowed.dtype}")
    if labels.shape != student_logits.shape[:-1]:
        raise ValueError(f"labels {tuple(labels.shape)} must have the logits' shape without V, {student_logits.shape}")
    try:
        return allowed.expand(student_logits.shape)
    except RuntimeError:
        raise ValueError(
            f"allowed {tuple(allowed.shape)} does not broadcast to the logits {tuple(student_logits.shape)}"
        ) from None


def _distributions(
    student_logits: Tensor, teacher_logits: Tensor, allowed: Tensor, labels: Tensor, options: LossOptions
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(log q, q, log p, p), each [..., V], over the allowed codes; p detached."""
    allowed = _checked(student_logits, teacher_logits, allowed, labels)
    log_q, q = masked_log_softmax(student_logits, allowed, options.temperature)
    log_p, p = masked_log_softmax(teacher_logits.detach(), allowed, options.temperature)
    return log_q, q, log_p, p


def word_kd(
    student_logits: Tensor, teacher_logits: Tensor, allowed: Tensor, labels: Tensor, options: LossOptions
) -> Tensor:
    """Forward KL(p || q) = sum_v p(v) log(p(v) / q(v)) over the allowed codes -> [...].

    Truncated teacher: finite; the sum runs over the kept codes (p renormalised on them) while q keeps every allowed
    code, so the draft is pulled towards the target's top-k (top_k 1: -log q(the target's best code)).
    """
    log_q, _, log_p, p = _distributions(student_logits, teacher_logits, allowed, labels, options)
    return kl(log_p, p, log_q)


def rkl(
    student_logits: Tensor, teacher_logits: Tensor, allowed: Tensor, labels: Tensor, options: LossOptions
) -> Tensor:
    """Reverse KL(q || p) = sum_v q(v) log(q(v) / p(v)) over the allowed codes -> [...].

    Needs the target's full distribution: +inf wherever a truncated teacher cut an allowed code (q > 0, p = 0).
    """
    log_q, q, log_p, _ = _distributions(student_logits, teacher_logits, allowed, labels, options)
    return kl(log_q, q, log_p)


def tvd(
    student_logits: Tensor, teacher_logits: Tensor, allowed: Tensor, labels: Tensor, options: LossOptions
) -> Tensor:
    """Total variation distance 0.5 * sum_v |q(v) - p(v)| over the allowed codes -> [...], in [0, 1].

    1 - TVD is the acceptance probability of speculative sampling (DistillSpec); ``atspeed_r`` and ``tvd_kd``.
    Truncated teacher: finite, against p renormalised on the kept codes (q keeps every allowed code; top_k 1 gives
    1 - q(the target's best code)).
    """
    _, q, _, p = _distributions(student_logits, teacher_logits, allowed, labels, options)
    return 0.5 * (q - p).abs().sum(-1)


def jsd(
    student_logits: Tensor, teacher_logits: Tensor, allowed: Tensor, labels: Tensor, options: LossOptions
) -> Tensor:
    """Generalised Jensen-Shannon divergence with TRL's (GKD's) convention, beta = ``options.beta`` -> [...].

    JSD_beta = beta * KL(p || m) + (1 - beta) * KL(q || m), m = beta * p + (1 - beta) * q, for 0 < beta < 1
    (bounded by the binary entropy of beta: ln 2 at beta = 0.5, where it is symmetric in p and q). The endpoints are
    special-cased as TRL does: beta = 0 gives forward KL(p || q), beta = 1 reverse KL(q || p). (The mixture formula
    itself tends to 0 at both ends, like beta * KL(p || q) near 0 and (1 - beta) * KL(q || p) near 1.)
    Truncated teacher: finite for beta < 1 (m > 0 wherever q > 0); beta = 1 is reverse KL, +inf at the cut codes.
    """
    log_q, q, log_p, p = _distributions(student_logits, teacher_logits, allowed, labels, options)
    beta = options.beta
    if beta == 0.0:
        return kl(log_p, p, log_q)
    if beta == 1.0:
        return kl(log_q, q, log_p)
    log_m = torch.logaddexp(log_p + math.log(beta), log_q + math.log1p(-beta))  # finite: 0 + logs at masked entries
    return beta * kl(log_p, p, log_m) + (1.0 - beta) * kl(log_q, q, log_m)


def seq_kd(
    student_logits: Tensor, teacher_logits: Tensor, allowed: Tensor, labels: Tensor, options: LossOptions
) -> Tensor:
    """Cross-entropy -log q(label) of the draft on the sequence's token, within the allowed codes -> [...].

    Along the target's beams this is sequence-level KD. 0 where ``labels`` < 0 (ignore index) or no code is allowed;
    +inf where a label >= 0 is not an allowed code (a sequence off the trie is a data bug, and should show).
    The teacher's logits are not read (only checked for shape), so truncated teacher data changes nothing as long as
    ``allowed`` is the trie's mask (not the teacher's finite entries, which would cut the beams' own tokens).
    """
    allowed = _checked(student_logits, teacher_logits, allowed, labels)
    log_q, _ = masked_log_softmax(student_logits, allowed, options.temperature)
    index = labels.clamp_min(0).unsqueeze(-1)  # [..., 1]
    nll = -log_q.gather(-1, index).squeeze(-1)
    label_allowed = allowed.gather(-1, index).squeeze(-1)
    nll = torch.where(label_allowed, nll, float("inf"))
    return torch.where((labels >= 0) & allowed.any(-1), nll, 0.0)


def sft(
    student_logits: Tensor, teacher_logits: Tensor, allowed: Tensor, labels: Tensor, options: LossOptions
) -> Tensor:
    """No alignment: zeros [...]. The module trains on the full ground-truth CE alone (alpha is not read: with
    positions ``none`` there is no alignment term to mix, and (1 - alpha) * CE would only rescale the learning rate).
    """
    _checked(student_logits, teacher_logits, allowed, labels)
    return torch.zeros(student_logits.shape[:-1], dtype=compute_dtype(student_logits.dtype), device=labels.device)


def atspeed_s(
    student_logits: Tensor, teacher_logits: Tensor, allowed: Tensor, labels: Tensor, options: LossOptions
) -> Tensor:
    """AtSpeed-S (strict top-K alignment): reverse KL on the draft's top-k support plus the density regulariser.

    At each position let v_1, ..., v_k be the draft's k highest-ranked allowed codes (k = ``options.top_k``; None, or
    a k above the number of allowed codes at that position, takes all allowed codes), S = {v_1, ..., v_k}, and
    q~ = q / q(S), p~ = p / p(S) the two distributions renormalised on S. Then::

        loss = KL(q~ || p~) + p~(v_k) * H(q~)
             = sum_{v in S} q~(v) log(q~(v) / p~(v)) - p~(v_k) * sum_{v in S} q~(v) log q~(v)

    p~(v_k) is "the target's probability of the draft's k-th ranked token" (SPEC section 4), taken on S like the rest
    of the loss: one scalar per position, the k-th (lowest) rank, as in the authors' released code, not a sum over
    ranks. It is a constant weight (p is detached); minimising p~(v_k) * H(q~) makes q~ peakier within S (the density
    regulariser), the more so where the target still gives the draft's last code mass. The ranking is not
    differentiated; gradients flow through q~ only. A support of one code gives 0. With equal q and p the KL term
    vanishes but the regulariser does not, so unlike the other divergences this loss is not 0 there.

    Needs the target's full distribution: a truncated teacher that cut one of the draft's top-k codes makes
    KL(q~ || p~) +inf (and NaN where it cut them all), so the alignment module refuses truncated data for it; and
    k = 1 is refused too (a support of one code: zero loss and zero gradient everywhere).

    Deliberate differences from the authors' released setting (``AtSpeedSModel.loss_strict`` run by their
    ``train.sh`` with ``--constrained_loss --constrained_softmax --temperature_softmax 0.001``; reproduced as
    ``atspeed_s_authors``):

    1. q~, p~: q and p renormalised on S (the paper's formula); theirs softmax(probability / 0.001) on S, nearly
       one-hot on each side's most likely code of S, so their density weight p~(v_k) is about exp(-(p(v_1) -
       p(v_k)) / 0.001) (1e-15 for a gap of 0.035: the regulariser is effectively off) and their KL between two
       near-one-hot distributions is 1-2 orders of magnitude larger, with another gradient direction.
    2. Averaging: a mean over the identifier's L code positions; theirs a mean over L + 1 slots whose last (the EOS
       position, every code masked there, NaN zeroed by ``nan_to_num``) is 0: theirs = ours x L / (L + 1).
    3. Cross-entropy (the module's, ``model.ce_on``): over the identifier's codes by default (``item``); theirs over
       the prompt, the identifier and EOS (``all``), which with the same alpha weighs the CE about prompt length / 5
       times more against the alignment term.
    4. Support size k: ``options.top_k`` (the shipped configs: 8); theirs ``--topK`` 20, the number of teacher beams.
    5. Logit temperature: ``options.temperature`` divides both logits (default 1); their strict loss has none.

    Differences ``atspeed_s_authors`` keeps as well (our data cannot give theirs):

    6. Codes: the trie's codes after each prefix (``allowed``), p renormalised on them as the teacher data stores it;
       theirs every code of the position's level, whatever the prefix, with p over all of them.
    7. Where a prefix has fewer than k children the support is all of them; their level masks always hold >= k codes.
    8. On-policy data: the module's ``teacher on_policy`` (a share of batches on the draft's own sampled beams);
       theirs ``--r_original`` / ``--r_student``, both 0 in ``train.sh`` (always the teacher's beams).
    """
    allowed = _checked(student_logits, teacher_logits, allowed, labels)
    ranked = student_logits.detach().masked_fill(~allowed, float("-inf"))
    k = ranked.shape[-1] if options.top_k is None else min(options.top_k, ranked.shape[-1])
    rank = ranked.topk(k, dim=-1, sorted=True).indices  # [..., k] draft's codes, best first
    support = allowed.gather(-1, rank)  # [..., k] True for the first min(k, #allowed) ranks
    log_q, q = masked_log_softmax(student_logits.gather(-1, rank), support, options.temperature)
    log_p, p = masked_log_softmax(teacher_logits.detach().gather(-1, rank), support, options.temperature)
    last = (support.sum(-1, keepdim=True) - 1).clamp_min(0)  # [..., 1] rank of v_k within the support
    p_k = p.gather(-1, last).squeeze(-1)
    entropy = -(q * log_q).sum(-1)
    return kl(log_q, q, log_p) + p_k * entropy


def atspeed_s_authors(
    student_logits: Tensor, teacher_logits: Tensor, allowed: Tensor, labels: Tensor, options: LossOptions
) -> Tensor:
    """AtSpeed-S as the authors' code computes it (their ``train.sh``: ``--constrained_softmax``,
    ``--temperature_softmax 0.001``), on [..., L, V] inputs whose second-last axis is the identifier's L levels.

    With q, p the draft's and the target's distributions over the allowed codes, S = {v_1, ..., v_k} the draft's k
    most likely allowed codes (k = ``options.top_k``, best first, as ``atspeed_s``) and tau =
    ``options.support_temperature``::

        q~ = softmax(q(S) / tau),  p~ = softmax(p(S) / tau)          (probabilities, not logits, over tau)
        loss = (KL(q~ || p~) + p~(v_k) * H(q~)) * L / (L + 1)

    The factor L / (L + 1) is their averaging: a mean over L + 1 slots per beam, the last (EOS) always 0, so that the
    module's mean over the L code positions equals theirs. Gradients flow through q on every allowed code (q(S) is
    not renormalised on S before the division, as in their code). With tau = 0.001, q~ and p~ are nearly one-hot;
    p~(v_k) is about 1e-15 as soon as p(v_1) - p(v_k) > 0.035, so the density term is effectively off, and the KL
    term is large (tens to hundreds) where the draft's and the target's favourite codes differ. Every deliberate
    difference from their setting is listed in ``atspeed_s``'s docstring (items 6-8 hold for this loss too).
    Needs the target's full distribution (a reverse KL), as ``atspeed_s``; k = 1 is refused (zero loss).
    """
    allowed = _checked(student_logits, teacher_logits, allowed, labels)
    _, q_all = masked_log_softmax(student_logits, allowed, options.temperature)  # [..., V]
    _, p_all = masked_log_softmax(teacher_logits.detach(), allowed, options.temperature)
    ranked = student_logits.detach().masked_fill(~allowed, float("-inf"))
    k = ranked.shape[-1] if options.top_k is None else min(options.top_k, ranked.shape[-1])
    rank = ranked.topk(k, dim=-1, sorted=True).indices  # [..., k] draft's codes, best first
    support = allowed.gather(-1, rank)  # [..., k]
    tau = options.support_temperature
    log_q, q = masked_log_softmax(q_all.gather(-1, rank), support, tau)
    log_p, p = masked_log_softmax(p_all.gather(-1, rank), support, tau)
    last = (support.sum(-1, keepdim=True) - 1).clamp_min(0)  # [..., 1] rank of v_k within the support
    p_k = p.gather(-1, last).squeeze(-1)
    entropy = -(q * log_q).sum(-1)
    levels = student_logits.shape[-2] if student_logits.dim() >= 2 else 1
    return (kl(log_q, q, log_p) + p_k * entropy) * (levels / (levels + 1))
