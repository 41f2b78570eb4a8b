"""``atspeed_s_authors`` against the AtSpeed authors' strict loss as their released code computes it.

The reference below is written here from their formulas, step by step, in float64 (``AtSpeedSModel.loss_strict`` with
``--constrained_loss --constrained_softmax --temperature_softmax 0.001``, the setting of their ``train.sh``): a
per-level code mask, L code slots plus an EOS slot whose codes are all masked, log-softmax over the allowed codes, the
draft's top-k by log-probability, softmax(probability / tau) on that support for both models, NaN set to 0, then
KLDivLoss(batchmean, log_target=True)(log p~, log q~) + mean over slots of -p~(v_k) * sum q~ log q~. The module's
reduction (``reduce``: a mean over the valid positions) of our per-position loss must give the same scalar and the
same gradients.
"""

from __future__ import annotations

import math

import pytest
import torch

from atspeed.losses import LOSSES, LossOptions, check_loss, reduce


def authors_loss(student: torch.Tensor, teacher: torch.Tensor, level_mask: torch.Tensor, k: int, tau: float):
    """Their scalar on [B, N, L, V] logits of the L code slots, level_mask [L, V]; their EOS slot appended."""
    b, n, _, v = student.shape
    eos_slot = torch.zeros(b, n, 1, v, dtype=student.dtype)
    q_logits = torch.cat([student, eos_slot], 2)  # [B, N, L + 1, V]
    p_logits = torch.cat([teacher, eos_slot], 2)
    mask = torch.cat([level_mask, torch.zeros(1, v, dtype=torch.bool)])  # EOS slot: no code allowed
    q_logits = q_logits.masked_fill(~mask, -math.inf)
    p_logits = p_logits.masked_fill(~mask, -math.inf)
    q_log = torch.log_softmax(q_logits, -1)  # NaN on the EOS slot
    p_log = torch.log_softmax(p_logits, -1)
    q_top, index = torch.topk(q_log, k)  # sorted, best first
    p_top = torch.gather(p_log, -1, index)
    q_s = torch.log_softmax(torch.exp(q_top) / tau, -1).nan_to_num(0).reshape(-1, k)
    p_s = torch.log_softmax(torch.exp(p_top) / tau, -1).nan_to_num(0).reshape(-1, k)
    rows = q_s.shape[0]  # B * N * (L + 1)
    reverse_kl = (torch.exp(q_s) * (q_s - p_s)).sum() / rows
    p_k = torch.exp(p_s[:, -1])
    density = -(p_k * (torch.exp(q_s) * q_s).sum(-1)).mean()
    return reverse_kl + density


def ours(student, teacher, level_mask, k: int, tau: float) -> torch.Tensor:
    allowed = level_mask.expand(student.shape)
    labels = torch.zeros(student.shape[:-1], dtype=torch.long)
    options = LossOptions(top_k=k, support_temperature=tau)
    per_position = LOSSES["atspeed_s_authors"].fn(student, teacher, allowed, labels, options)
    return reduce(per_position, None, allowed.any(-1))


def random_case(seed: int, scale: float):
    g = torch.Generator().manual_seed(seed)
    levels, v = 4, 12
    level_mask = torch.rand(levels, v, generator=g) < 0.7
    level_mask[:, :6] = True  # >= 6 codes per level, as their levels always hold more than k codes
    student = scale * torch.randn(2, 3, levels, v, generator=g, dtype=torch.float64)
    teacher = scale * torch.randn(2, 3, levels, v, generator=g, dtype=torch.float64)
    return student, teacher, level_mask


@pytest.mark.parametrize(("seed", "scale", "k", "tau"), [(0, 2.0, 5, 1e-3), (1, 0.02, 4, 1e-3), (2, 1.0, 3, 0.5)])
def test_values_and_gradients_equal_the_authors_formulas(seed: int, scale: float, k: int, tau: float) -> None:
    """scale 2: near one-hot q~ and p~ (tau 0.001 on probabilities 0.01-0.9 apart); scale 0.02: probabilities within
    0.001 of each other, where q~ and p~ are spread and the density term is alive; tau 0.5 as a milder setting."""
    student, teacher, level_mask = random_case(seed, scale)
    mine = student.clone().requires_grad_(True)
    theirs = student.clone().requires_grad_(True)
    value = ours(mine, teacher, level_mask, k, tau)
    expected = authors_loss(theirs, teacher, level_mask, k, tau)
    torch.testing.assert_close(value, expected, rtol=1e-10, atol=1e-12)
    value.backward()
    expected.backward()
    assert torch.isfinite(mine.grad).all() and mine.grad.abs().sum() > 0
    torch.testing.assert_close(mine.grad, theirs.grad, rtol=1e-8, atol=1e-12)


def test_their_mean_counts_the_zeroed_eos_slot() -> None:
    """x L / (L + 1): with L = 4 codes their mean is 0.8 of the mean over the code slots alone."""
    student, teacher, level_mask = random_case(3, 0.02)
    per_position = LOSSES["atspeed_s_authors"].fn(
        student, teacher, level_mask, torch.zeros(student.shape[:-1], dtype=torch.long), LossOptions(top_k=4)
    )
    code_slots_only = authors_loss(student, teacher, level_mask, 4, 1e-3) * 5 / 4
    torch.testing.assert_close(per_position.mean() / 0.8, code_slots_only, rtol=1e-10, atol=0)


def test_the_authors_temperature_switches_the_density_term_off() -> None:
    """The paper's AtSpeed-S (``atspeed_s``) weighs H(q~) by p~(v_k) = p(v_k) / p(S) = 0.3655 / 0.9655 here; the code's
    softmax(p / 0.001) gives exp(-(0.40 - 0.3655) / 0.001) ~ 1e-15, so its loss is its KL term alone."""
    q = torch.tensor([0.3000, 0.2995, 0.2990, 0.1015], dtype=torch.float64)  # draft: S = codes 0, 1, 2 (k = 3)
    p = torch.tensor([0.4000, 0.2000, 0.3655, 0.0345], dtype=torch.float64)
    student, teacher = q.log().view(1, 1, 1, 4), p.log().view(1, 1, 1, 4)
    allowed, labels = torch.ones(1, 1, 1, 4, dtype=torch.bool), torch.zeros(1, 1, 1, dtype=torch.long)
    options = LossOptions(top_k=3)
    authors = LOSSES["atspeed_s_authors"].fn(student, teacher, allowed, labels, options).item()

    q_s, p_s = (q[:3] / 1e-3).softmax(-1), (p[:3] / 1e-3).softmax(-1)
    assert 1e-16 < p_s[2] < 1e-14  # the target's weight on the draft's k-th code
    entropy = -(q_s * q_s.log()).sum()
    assert entropy > 0.5  # the draft's q~ is spread: only the weight switches the term off
    kl_only = (q_s * (q_s / p_s).log()).sum().item() * 0.5  # x L / (L + 1), L = 1
    assert authors == pytest.approx(kl_only, rel=1e-12)

    paper = LOSSES["atspeed_s"].fn(student, teacher, allowed, labels, options).item()
    q_t, p_t = q[:3] / q[:3].sum(), p[:3] / p[:3].sum()
    paper_kl = (q_t * (q_t / p_t).log()).sum().item()
    assert paper - paper_kl == pytest.approx(0.3655 / 0.9655 * -(q_t * q_t.log()).sum().item(), rel=1e-10)
    assert paper - paper_kl > 0.4  # the density term the paper's formula keeps


def test_a_top_1_support_is_refused() -> None:
    with pytest.raises(ValueError, match=r"top_k = 1 with model.loss atspeed_s_authors"):
        check_loss("atspeed_s_authors", LossOptions(top_k=1))
    with pytest.raises(ValueError, match=r"support_temperature must be > 0"):
        LossOptions(support_temperature=0.0)
