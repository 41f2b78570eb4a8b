"""Truncated teacher data (the target's top-k codes kept, the rest -inf) under the trie's mask: each loss is finite
and right on it, or is refused (it takes a reverse KL, +inf where the target was cut); options that train nothing
are refused; ``sft`` trains on the full CE, as its documentation says."""

from __future__ import annotations

from typing import get_args

import pytest
import torch

from atspeed import losses
from atspeed.losses import LOSSES, LossName, LossOptions
from atspeed.losses.table import __doc__ as TABLE_DOC

# one position, 5 codes the trie allows (code 5 it does not); the target kept its top 2 (codes 1 and 3)
ALLOWED = torch.tensor([True, True, True, True, True, False])
STUDENT = torch.tensor([0.5, 1.0, -0.3, 0.2, 0.0, 9.0], dtype=torch.float64)
FULL = torch.tensor([-2.0, -0.5, -3.0, -1.0, -2.5, 0.0], dtype=torch.float64)
CUT = torch.tensor([float("-inf"), -0.5, float("-inf"), -1.0, float("-inf"), float("-inf")], dtype=torch.float64)


def call(name: str, teacher: torch.Tensor, label: int = 1, **options) -> float:
    fn = LOSSES[name].fn
    return float(fn(STUDENT, teacher, ALLOWED, torch.tensor(label), LossOptions(**options)))


def q() -> torch.Tensor:
    return STUDENT.masked_fill(~ALLOWED, float("-inf")).softmax(-1)[:5]


def p_cut() -> torch.Tensor:
    return CUT.softmax(-1)[:5]  # 0 at the cut codes, renormalised on codes 1 and 3


def test_finite_losses_on_a_truncated_teacher_match_their_formulas() -> None:
    """q spreads over all 5 allowed codes; p is the target's top 2, renormalised. (Before: forward KL met 0 * -inf.)"""
    qq, pp = q(), p_cut()
    kept = pp > 0
    word_kd = float((pp[kept] * (pp[kept].log() - qq[kept].log())).sum())
    assert call("word_kd", CUT) == pytest.approx(word_kd, rel=1e-6)
    assert call("tvd_kd", CUT) == pytest.approx(float(0.5 * (qq - pp).abs().sum()), rel=1e-6)
    m = 0.5 * pp + 0.5 * qq
    jsd = 0.5 * float((pp[kept] * (pp[kept] / m[kept]).log()).sum()) + 0.5 * float((qq * (qq / m).log()).sum())
    assert call("jsd", CUT, beta=0.5) == pytest.approx(jsd, rel=1e-6)
    # seq_kd does not read the teacher: truncation changes nothing, the beam's token stays allowed
    assert call("seq_kd", CUT, label=2) == call("seq_kd", FULL, label=2) == pytest.approx(float(-qq[2].log()))


def test_top_1_data_gives_nonzero_losses_under_the_tries_mask() -> None:
    """Kept to the target's best code (1): forward KL is -log q(1), TVD is 1 - q(1), not 0."""
    top1 = CUT.masked_fill(torch.arange(6) != 1, float("-inf"))
    assert call("word_kd", top1) == pytest.approx(float(-q()[1].log()), rel=1e-6)
    assert call("atspeed_r", top1) == pytest.approx(float(1 - q()[1]), rel=1e-6)


@pytest.mark.parametrize(("name", "options"), [("rkl", {}), ("jsd", {"beta": 1.0}), ("atspeed_s", {"top_k": 3})])
def test_reverse_kl_losses_are_infinite_on_truncated_data_and_refused(name: str, options: dict) -> None:
    assert call(name, CUT, **options) == float("inf")
    assert losses.LOSSES[name].full_support(LossOptions(**options))
    with pytest.raises(ValueError, match=rf"^runs/t: teacher data truncated to the target's top 2 .* {name} takes"):
        losses.check_support(name, LossOptions(**options), 2, "runs/t")
    losses.check_support(name, LossOptions(**options), None)  # full data: fine


@pytest.mark.parametrize("name", get_args(LossName))
def test_what_the_table_says_of_truncation_is_what_each_loss_does(name: str) -> None:
    """The table's ``trunc.`` column (docs) and ``full_support`` (code) agree; accepted losses are finite."""
    (row,) = [line for line in TABLE_DOC.splitlines() if line.startswith(f"``{name}``")]
    column = row.split()[2]
    options = LossOptions(top_k=3, beta=0.5)
    assert losses.LOSSES[name].full_support(options) == (column == "no"), row
    if column != "no":
        assert torch.isfinite(torch.tensor(call(name, CUT, top_k=3, beta=0.5)))


def test_atspeed_s_with_top_1_is_refused_naming_the_key() -> None:
    with pytest.raises(ValueError, match=r"model\.loss_options\.top_k = 1 with model\.loss atspeed_s"):
        losses.check_loss("atspeed_s", LossOptions(top_k=1))
    losses.check_loss("atspeed_s", LossOptions(top_k=2))
    losses.check_loss("word_kd", LossOptions(top_k=1))  # top_k is read by atspeed_s only


def test_sft_documents_the_full_ce_the_module_trains_on() -> None:
    """The module returns the ground-truth CE unscaled for ``sft`` (positions none): no text may promise
    (1 - alpha) * CE for it."""
    from atspeed.losses import divergences
    from atspeed.modules import align

    assert LOSSES["sft"].positions == "none"
    (row,) = [line for line in TABLE_DOC.splitlines() if line.startswith("``sft``")]
    for text in (row, divergences.sft.__doc__, align.__doc__.split("\n\n")[0]):
        assert "full CE" in text or "full ground-truth CE" in text, text
    assert "(1 - alpha) * CE carries" not in TABLE_DOC and "(1 - alpha) * CE on" not in divergences.sft.__doc__
