"""The alignment losses (LOSSES) against plain float64 formulas on small hand-made distributions; the reduction."""

from __future__ import annotations

import dataclasses
import itertools
import math
import warnings
from typing import get_args

import pytest
import torch

from atspeed.losses import LOSSES, LossName, LossOptions, beam_weights, check_top_k, reduce

V = 7
SHAPE = (2, 3, 4)  # B, beams, L
DIVERGENCES = ("atspeed_r", "word_kd", "tvd_kd", "rkl", "jsd")  # 0 at equal distributions
NAMES = tuple(get_args(LossName))


def call(name: str, student, teacher, allowed, labels=None, **options) -> torch.Tensor:
    labels = torch.zeros(student.shape[:-1], dtype=torch.long) if labels is None else labels
    return LOSSES[name].fn(student, teacher, allowed, labels, LossOptions(**options))


def case(seed: int = 0, masked_value: float = float("-inf")):
    """Random student and teacher logits [2, 3, 4, V], a trie-like mask (one row fully masked), labels on allowed codes.

    Disallowed entries hold ``masked_value`` in both logits (the loss must not read them).
    """
    g = torch.Generator().manual_seed(seed)
    allowed = torch.rand((*SHAPE, V), generator=g) < 0.6
    allowed[..., 0] |= ~allowed.any(-1)  # every row allows something ...
    allowed[1, 2, 3] = False  # ... but this one (padding)
    student = (2 * torch.randn((*SHAPE, V), generator=g)).masked_fill(~allowed, masked_value)
    teacher = (2 * torch.randn((*SHAPE, V), generator=g)).masked_fill(~allowed, masked_value)
    labels = torch.where(allowed, torch.rand((*SHAPE, V), generator=g), -1.0).argmax(-1)
    labels[1, 2, 3] = -100
    return student, teacher, allowed, labels


def reference(formula, student, teacher, allowed, temperature: float = 1.0) -> torch.Tensor:
    """formula(q, p) per row in float64 on the allowed entries only (0 on rows with none)."""
    out = torch.zeros(allowed.shape[:-1], dtype=torch.float64)
    for index in itertools.product(*map(range, allowed.shape[:-1])):
        a = allowed[index]
        if a.any():
            q = (student[index][a].double() / temperature).softmax(-1)
            p = (teacher[index][a].double() / temperature).softmax(-1)
            out[index] = formula(q, p)
    return out


def forward_kl(q, p):
    return (p * (p / q).log()).sum()


def reverse_kl(q, p):
    return (q * (q / p).log()).sum()


def total_variation(q, p):
    return 0.5 * (q - p).abs().sum()


def close(actual: torch.Tensor, expected: torch.Tensor, atol: float = 1e-5) -> None:
    torch.testing.assert_close(actual.double(), expected.double(), atol=atol, rtol=1e-5)


def test_the_table_matches_the_literal_and_says_where_each_loss_trains() -> None:
    assert set(LOSSES) == set(get_args(LossName))
    positions = {name: spec.positions for name, spec in LOSSES.items()}
    assert positions == {
        "atspeed_s": "beams",
        "atspeed_s_authors": "beams",
        "atspeed_r": "beams",
        "sft": "none",
        "word_kd": "ground_truth",
        "seq_kd": "beams",
        "tvd_kd": "ground_truth",
        "rkl": "beams",
        "jsd": "beams",
    }
    assert LOSSES["atspeed_r"].fn is LOSSES["tvd_kd"].fn  # one TVD, trained on different positions


@pytest.mark.parametrize("name", DIVERGENCES)
@pytest.mark.parametrize("beta", [0.0, 0.3, 1.0])
def test_equal_distributions_give_zero(name: str, beta: float) -> None:
    student, _, allowed, _ = case()
    loss = call(name, student, student.clone(), allowed, beta=beta, temperature=1.7)
    close(loss, torch.zeros(SHAPE))


def test_atspeed_s_at_equal_distributions_is_its_regulariser_alone() -> None:
    """KL(q~ || p~) vanishes; p~(v_k) * H(q~) does not (it is 0 with a support of one code)."""
    student, _, allowed, _ = case()
    assert call("atspeed_s", student, student.clone(), allowed, top_k=3).sum() > 0
    close(call("atspeed_s", student, student.clone(), allowed, top_k=1), torch.zeros(SHAPE))


@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_word_kd_and_rkl_are_the_two_kl_directions(temperature: float) -> None:
    student, teacher, allowed, _ = case(1)
    close(call("word_kd", student, teacher, allowed, temperature=temperature),
          reference(forward_kl, student, teacher, allowed, temperature))  # fmt: skip
    close(call("rkl", student, teacher, allowed, temperature=temperature),
          reference(reverse_kl, student, teacher, allowed, temperature))  # fmt: skip


def test_jsd_endpoints_are_forward_and_reverse_kl() -> None:
    student, teacher, allowed, _ = case(2)
    close(call("jsd", student, teacher, allowed, beta=0.0), reference(forward_kl, student, teacher, allowed))
    close(call("jsd", student, teacher, allowed, beta=1.0), reference(reverse_kl, student, teacher, allowed))


@pytest.mark.parametrize("beta", [0.1, 0.5, 0.8])
def test_jsd_is_the_mixture_formula(beta: float) -> None:
    """beta KL(p || m) + (1 - beta) KL(q || m) with m = beta p + (1 - beta) q."""

    def generalised_jsd(q, p):
        m = beta * p + (1 - beta) * q
        return beta * forward_kl(m, p) + (1 - beta) * forward_kl(m, q)  # forward_kl(m, p) = KL(p || m)

    student, teacher, allowed, _ = case(3)
    close(call("jsd", student, teacher, allowed, beta=beta), reference(generalised_jsd, student, teacher, allowed))


def test_jsd_at_one_half_is_symmetric_and_bounded_by_ln_2() -> None:
    student, teacher, allowed, _ = case(4)
    forth = call("jsd", student, teacher, allowed, beta=0.5)
    close(forth, call("jsd", teacher, student, allowed, beta=0.5))
    assert (forth <= math.log(2)).all()
    one_hot = torch.tensor([[0.0, -1e4, -1e4], [-1e4, 0.0, -1e4]])  # disjoint: JSD reaches ln 2
    close(call("jsd", one_hot[0], one_hot[1], torch.ones(3, dtype=torch.bool), beta=0.5), torch.tensor(math.log(2)))


@pytest.mark.parametrize("name", ["atspeed_r", "tvd_kd"])
def test_tvd_is_half_the_l1_distance_bounded_by_one(name: str) -> None:
    student, teacher, allowed, _ = case(5)
    loss = call(name, student, teacher, allowed)
    close(loss, reference(total_variation, student, teacher, allowed))
    assert (loss <= 1).all()
    disjoint = torch.tensor([[0.0, 0.0, -1e4, -1e4], [-1e4, -1e4, 3.0, 1.0]])
    close(call(name, disjoint[0], disjoint[1], torch.ones(4, dtype=torch.bool)), torch.tensor(1.0))


def test_atspeed_s_worked_example() -> None:
    """Codes 0-3 allowed (code 4 is not, and would rank first if read), top_k = 2.

    q = (0.5, 0.3, 0.15, 0.05), p = (0.2, 0.4, 0.1, 0.3). The draft's top-2 is S = {0, 1}:
    q~ = (0.5, 0.3) / 0.8 = (0.625, 0.375), p~ = (0.2, 0.4) / 0.6 = (1/3, 2/3).
    KL(q~ || p~) = 0.625 ln(0.625 * 3) + 0.375 ln(0.375 * 1.5) = 0.625 ln 1.875 + 0.375 ln 0.5625 = 0.177119
    H(q~) = -(0.625 ln 0.625 + 0.375 ln 0.375) = 0.661563
    p~(v_2) = p~(code 1) = 2/3: the target's (renormalised) probability of the draft's 2nd-ranked code.
    loss = 0.177119 + 2/3 * 0.661563 = 0.177119 + 0.441042 = 0.618161
    With top_k = 3, S = {0, 1, 2}: q~ = (0.5, 0.3, 0.15) / 0.95, p~ = (0.2, 0.4, 0.1) / 0.7, p~(v_3) = 0.1 / 0.7,
    KL = 0.150050, H = 0.993268, loss = 0.150050 + 0.142857 * 0.993268 = 0.291946.
    """
    allowed = torch.tensor([True, True, True, True, False])
    student = torch.tensor([0.5, 0.3, 0.15, 0.05, 1.0]).log()
    student[4] = 10.0
    teacher = torch.tensor([0.2, 0.4, 0.1, 0.3, 1.0]).log()
    teacher[4] = 5.0
    kl = 0.625 * math.log(1.875) + 0.375 * math.log(0.5625)
    entropy = -(0.625 * math.log(0.625) + 0.375 * math.log(0.375))
    assert kl + 2 / 3 * entropy == pytest.approx(0.618161, abs=1e-6)
    close(call("atspeed_s", student, teacher, allowed, top_k=2), torch.tensor(kl + 2 / 3 * entropy))
    close(call("atspeed_s", student, teacher, allowed, top_k=3), torch.tensor(0.291946), atol=1e-6)


def test_atspeed_s_on_all_allowed_codes_is_rkl_plus_the_regulariser() -> None:
    """top_k None (or wider than a position's allowed codes): S = the allowed codes, v_k = the draft's last one."""
    student, teacher, allowed, _ = case(6)

    def full_support(q, p):
        return reverse_kl(q, p) - p[q.argmin()] * (q * q.log()).sum()

    expected = reference(full_support, student, teacher, allowed)
    close(call("atspeed_s", student, teacher, allowed), expected)
    close(call("atspeed_s", student, teacher, allowed, top_k=V), expected)


def test_top_k_restricts_the_support_to_the_drafts_top_k() -> None:
    """= the loss on all codes with the mask cut to the draft's top-3; the teacher outside that support is not read."""
    student, teacher, allowed, _ = case(7)
    ranked = student.masked_fill(~allowed, float("-inf")).topk(3, dim=-1).indices
    top3 = torch.zeros_like(allowed).scatter(-1, ranked, True) & allowed
    loss = call("atspeed_s", student, teacher, allowed, top_k=3)
    close(loss, call("atspeed_s", student, teacher, top3))
    close(loss, call("atspeed_s", student, teacher.masked_fill(~top3, 123.0), allowed, top_k=3))
    assert not torch.allclose(loss, call("atspeed_s", student, teacher, allowed))


def test_check_top_k_names_the_key_when_k_exceeds_a_level() -> None:
    levels = torch.zeros(3, 10, dtype=torch.bool)  # [L, V]: 4, 6 and 2 codes per level
    levels[0, :4] = levels[1, 4:] = levels[2, 2:4] = True
    check_top_k(None, levels)
    check_top_k(2, levels)
    check_top_k(2, torch.cat([levels, torch.zeros(1, 10, dtype=torch.bool)]))  # an empty row is skipped
    with pytest.raises(ValueError, match=r"model\.loss_options\.top_k = 3 exceeds the 2 codes allowed at row 2"):
        check_top_k(3, levels)


@pytest.mark.parametrize("name", NAMES)
def test_fully_masked_positions_give_zero_and_no_nan(name: str) -> None:
    student, teacher, allowed, labels = case(8)
    student.requires_grad_(True)
    loss = call(name, student, teacher, allowed, labels, top_k=2, beta=0.4)
    assert loss[1, 2, 3] == 0
    assert torch.isfinite(loss).all()
    if loss.requires_grad:
        loss.sum().backward()
        assert torch.isfinite(student.grad).all()
        assert (student.grad[1, 2, 3] == 0).all()
        assert (student.grad[~allowed] == 0).all()  # masked entries neither read nor trained


@pytest.mark.parametrize("name", NAMES)
def test_masked_entries_are_never_read(name: str) -> None:
    """-inf, NaN or any finite junk at disallowed entries: the same values, finite gradients."""
    results = []
    for junk in (float("-inf"), float("nan"), 50.0):
        student, teacher, allowed, labels = case(9, masked_value=junk)
        student.requires_grad_(True)
        loss = call(name, student, teacher, allowed, labels, top_k=3)
        assert torch.isfinite(loss).all()
        if loss.requires_grad:
            loss.sum().backward()
            assert torch.isfinite(student.grad).all()
        results.append(loss.detach())
    for other in results[1:]:
        close(other, results[0])


@pytest.mark.parametrize("name", NAMES)
def test_gradients_reach_the_student_only(name: str) -> None:
    student, teacher, allowed, labels = case(10)
    student.requires_grad_(True)
    teacher.requires_grad_(True)
    loss = call(name, student, teacher, allowed, labels, top_k=3)
    if name == "sft":
        assert not loss.requires_grad
        return
    loss.sum().backward()
    assert teacher.grad is None
    assert student.grad.abs().sum() > 0


@pytest.mark.parametrize("name", [name for name in NAMES if name != "sft"])
def test_gradients_match_finite_differences(name: str) -> None:
    """float64 inputs stay float64, so autograd's gradcheck applies (including the masked and empty rows)."""
    student, teacher, allowed, labels = case(17, masked_value=0.0)
    student = student[0, 0].double().requires_grad_(True)  # [L, V]

    def loss(x: torch.Tensor) -> torch.Tensor:
        return call(name, x, teacher[1, 2].double(), allowed[1, 2], labels[1, 2], top_k=3, beta=0.3)

    assert torch.autograd.gradcheck(loss, (student,), fast_mode=True)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", NAMES)
def test_half_precision_inputs_are_computed_in_float32(name: str, dtype: torch.dtype) -> None:
    student, teacher, allowed, labels = case(11)
    loss = call(name, student.to(dtype), teacher.to(dtype), allowed, labels, top_k=3)
    assert loss.dtype == torch.float32
    close(loss, call(name, student.to(dtype).float(), teacher.to(dtype).float(), allowed, labels, top_k=3), atol=1e-6)
    if name != "atspeed_s_authors":  # its probabilities / 0.001 amplify the inputs' half-precision rounding 1000-fold
        close(loss, call(name, student, teacher, allowed, labels, top_k=3), atol=0.05)


@pytest.mark.parametrize("name", NAMES)
def test_temperature_divides_both_logits(name: str) -> None:
    student, teacher, allowed, labels = case(12)
    loss = call(name, student, teacher, allowed, labels, temperature=2.5, top_k=3)
    close(loss, call(name, student / 2.5, teacher / 2.5, allowed, labels, top_k=3))


def test_seq_kd_is_the_cross_entropy_of_the_label_within_the_allowed_codes() -> None:
    student, teacher, allowed, labels = case(13)
    loss = call("seq_kd", student, teacher, allowed, labels)
    expected = torch.zeros(SHAPE, dtype=torch.float64)
    for index in itertools.product(*map(range, SHAPE)):
        a = allowed[index]
        if a.any():
            q = student[index].double().masked_fill(~a, float("-inf")).softmax(-1)
            expected[index] = -q[labels[index]].log()
    close(loss, expected)
    assert loss[1, 2, 3] == 0  # label -100 on a padding position
    off_trie = labels.clone()
    off_trie[0, 0, 0] = int((~allowed[0, 0, 0]).nonzero()[0, 0])
    assert call("seq_kd", student, teacher, allowed, off_trie)[0, 0, 0] == float("inf")


def test_sft_has_no_alignment_term() -> None:
    student, teacher, allowed, labels = case(14)
    loss = call("sft", student.half(), teacher, allowed, labels)
    assert loss.dtype == torch.float32 and loss.shape == SHAPE and (loss == 0).all()


def test_shapes_are_checked() -> None:
    student, teacher, allowed, labels = case(15, masked_value=0.0)
    with pytest.raises(ValueError, match="differ in shape"):
        call("rkl", student, teacher[..., :-1], allowed)
    with pytest.raises(ValueError, match="bool mask"):
        call("rkl", student, teacher, allowed.long())
    with pytest.raises(ValueError, match="labels"):
        call("seq_kd", student, teacher, allowed, labels[..., :-1])
    level_mask = allowed[0, 0]  # [L, V] broadcasts
    close(call("tvd_kd", student, teacher, level_mask), call("tvd_kd", student, teacher, level_mask.expand_as(allowed)))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"temperature": 0.0}, r"model\.loss_options\.temperature must be > 0"),
        ({"temperature": -1.0}, r"model\.loss_options\.temperature must be > 0"),
        ({"temperature": float("nan")}, r"model\.loss_options\.temperature must be > 0"),
        ({"temperature": float("inf")}, r"model\.loss_options\.temperature must be > 0"),
        ({"top_k": 0}, r"model\.loss_options\.top_k must be >= 1"),
        ({"top_k": True}, r"model\.loss_options\.top_k must be an integer"),
        ({"top_k": 2.5}, r"model\.loss_options\.top_k must be an integer"),
        ({"beta": -0.1}, r"model\.loss_options\.beta must be in \[0, 1\]"),
        ({"beta": 1.5}, r"model\.loss_options\.beta must be in \[0, 1\]"),
        ({"beta": float("nan")}, r"model\.loss_options\.beta must be in \[0, 1\]"),
    ],
)
def test_options_reject_out_of_range_values(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        LossOptions(**kwargs)


def test_options_defaults_and_frozen() -> None:
    options = LossOptions()
    assert (options.temperature, options.top_k, options.beta, options.support_temperature) == (1.0, None, 0.5, 1e-3)
    with pytest.raises(dataclasses.FrozenInstanceError):
        options.temperature = 2.0


def test_reduce_is_the_mean_over_valid_positions() -> None:
    per_position = torch.tensor([[[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]])  # [1, 2 beams, 3]
    valid = torch.tensor([[[True, True, False], [True, False, False]]])
    close(reduce(per_position, None, valid), torch.tensor((1 + 2 + 4) / 3))


def test_reduce_weights_beams() -> None:
    """w = (0.75, 0.25): (0.75 * (1 + 2) + 0.25 * 4) / (0.75 * 2 + 0.25 * 1) = 3.25 / 1.75."""
    per_position = torch.tensor([[[1.0, 2.0, float("nan")], [4.0, float("inf"), 6.0]]])
    valid = torch.tensor([[[True, True, False], [True, False, False]]])
    per_position.requires_grad_(True)
    loss = reduce(per_position, torch.tensor([[0.75, 0.25]]), valid)
    close(loss, torch.tensor(3.25 / 1.75))
    loss.backward()
    close(per_position.grad, torch.tensor([[[0.75, 0.75, 0.0], [0.25, 0.0, 0.0]]]) / 1.75)


def test_reduce_of_nothing_valid_is_zero() -> None:
    per_position = torch.ones(2, 3, 4, requires_grad=True)
    loss = reduce(per_position, None, torch.zeros(2, 3, 4, dtype=torch.bool))
    loss.backward()
    assert loss == 0 and torch.isfinite(per_position.grad).all()
    with pytest.raises(ValueError, match="weights"):
        reduce(per_position, torch.ones(2, 4), torch.ones(2, 3, 4, dtype=torch.bool))


def test_beam_weights_are_the_normalised_beam_probabilities() -> None:
    scores = torch.tensor([[math.log(0.3), math.log(0.1), float("-inf")], [float("-inf")] * 3])
    close(beam_weights(scores), torch.tensor([[0.75, 0.25, 0.0], [0.0, 0.0, 0.0]]))


@pytest.mark.parametrize("beta", [0.0, 0.3, 0.5, 1.0])
def test_jsd_agrees_with_trl(beta: float) -> None:
    """TRL's GKDTrainer.generalized_jsd_loss on plain [B, T, V] logits (every code allowed)."""
    pytest.importorskip("trl")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from trl.experimental.gkd import GKDTrainer
    except ImportError:
        try:
            from trl import GKDTrainer
        except ImportError as error:
            pytest.skip(f"trl's GKDTrainer does not import here: {error}")
    g = torch.Generator().manual_seed(16)
    student, teacher = torch.randn(2, 2, 5, V, generator=g).unbind(0)
    trl_loss = GKDTrainer.generalized_jsd_loss(student, teacher, beta=beta, temperature=1.5, reduction="none")
    ours = call("jsd", student, teacher, torch.ones(V, dtype=torch.bool), beta=beta, temperature=1.5)
    close(ours, trl_loss.sum(-1))
