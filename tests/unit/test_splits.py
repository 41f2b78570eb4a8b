"""Splits and training pairs: exact output on hand-made data, and the paper's figures on Beauty."""

from __future__ import annotations

from pathlib import Path

import pytest

from atspeed.data.schema import Interactions
from atspeed.data.sources import ProcessedOptions, load_source
from atspeed.data.splits import EvalSample, Split, split_interactions, training_pairs
from atspeed.errors import DataError

BEAUTY = Path(__file__).resolve().parents[3] / "shared" / "data" / "amazon-beauty"


def make(sequences: list[list[int]], **fields: object) -> Interactions:
    n_items = 1 + max((i for s in sequences for i in s), default=0)
    return Interactions(
        name="toy",
        user_ids=[f"u{u}" for u in range(len(sequences))],
        item_ids=[f"i{i}" for i in range(n_items)],
        sequences=sequences,
        **fields,  # type: ignore[arg-type]
    )


TIMED = make(
    [[0, 1, 2, 3], [1, 2], [4, 0, 4, 5]],
    timestamps=[[1.0, 2.0, 8.0, 10.0], [3.0, 9.0], [4.0, 5.0, 6.0, 7.0]],
)


def test_global_time_on_timestamps_default_ratios() -> None:
    # 10 interactions: times 1..8 train, 9 (u1's item 2) valid, 10 (u0's item 3) test
    split = split_interactions(TIMED, "global_time")
    assert split == Split(
        train=[[0, 1, 2], [1], [4, 0, 4, 5]],
        valid=[EvalSample(1, (1,), (2,))],
        test=[EvalSample(0, (0, 1, 2), (3,))],
    )


def test_global_time_on_timestamps_custom_ratios() -> None:
    # 6 / 2 / 2: times 1..6 train, 7..8 valid, 9..10 test; test history = train + valid items
    split = split_interactions(TIMED, "global_time", ratios=(0.6, 0.2, 0.2))
    assert split.train == [[0, 1], [1], [4, 0, 4]]
    assert split.valid == [EvalSample(0, (0, 1), (2,)), EvalSample(2, (4, 0, 4), (5,))]
    assert split.test == [EvalSample(0, (0, 1, 2), (3,)), EvalSample(1, (1,), (2,))]


def test_global_time_ties_are_cut_in_user_then_position_order() -> None:
    data = make([[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]], timestamps=[[0.0] * 5, [0.0] * 5])
    split = split_interactions(data, "global_time")
    assert split.train == [[0, 1, 2, 3, 4], [5, 6, 7]]
    assert split.valid == [EvalSample(1, (5, 6, 7), (8,))]
    assert split.test == [EvalSample(1, (5, 6, 7, 8), (9,))]


def test_global_time_uses_periods_first() -> None:
    data = make(
        [[0, 1, 2, 3, 3, 4], [2, 3], [1, 4], [], [0]],
        periods=[[0, 0, 1, 2, 2, 2], [0, 0], [0, 2], [], [2]],
        timestamps=[[9.0] * 6, [1.0, 2.0], [3.0, 4.0], [], [5.0]],  # ignored: periods win
    )
    split = split_interactions(data, "global_time")
    assert split.train == [[0, 1], [2, 3], [1], [], []]
    assert split.valid == [EvalSample(0, (0, 1), (2,))]
    # repeated test item 3 is one target; a user with no earlier items gets an empty history
    assert split.test == [EvalSample(0, (0, 1, 2), (3, 4)), EvalSample(2, (1,), (4,)), EvalSample(4, (), (0,))]


def test_global_time_needs_timestamps_or_periods() -> None:
    with pytest.raises(DataError, match=r"global_time.*data\.split.*leave_one_out"):
        split_interactions(make([[0, 1, 2]]), "global_time")


@pytest.mark.parametrize("ratios", [(0.8, 0.2, 0.0), (0.5, 0.2, 0.2), (1.1, -0.05, -0.05), (0.5, 0.5)])
def test_global_time_rejects_bad_ratios(ratios: tuple[float, float, float]) -> None:
    with pytest.raises(ValueError, match="ratios"):
        split_interactions(TIMED, "global_time", ratios=ratios)


def test_unknown_split_name() -> None:
    with pytest.raises(ValueError, match=r"data\.split 'random'.*leave_one_out"):
        split_interactions(TIMED, "random")  # type: ignore[arg-type]


def test_bad_period_values() -> None:
    with pytest.raises(DataError, match="periods"):
        split_interactions(make([[0, 1]], periods=[[0, 3]]), "global_time")


def test_leave_one_out() -> None:
    data = make([[0, 1, 2, 3], [4, 5], [1, 2, 1], []], periods=[[0, 0, 0, 0], [0, 0], [0, 0, 0], []])
    split = split_interactions(data, "leave_one_out")
    assert split.train == [[0, 1], [4, 5], [1], []]
    assert split.valid == [EvalSample(0, (0, 1), (2,)), EvalSample(2, (1,), (2,))]
    assert split.test == [EvalSample(0, (0, 1, 2), (3,)), EvalSample(2, (1, 2), (1,))]


def test_eval_sample_needs_targets() -> None:
    with pytest.raises(ValueError, match="no targets"):
        EvalSample(0, (1,), ())


def test_training_pairs_sliding_and_last() -> None:
    train = [[0, 1, 2, 3], [4], [], [5, 6]]
    assert training_pairs(train, "sliding", max_history=2) == [((0,), 1), ((0, 1), 2), ((1, 2), 3), ((5,), 6)]
    assert training_pairs(train, "sliding", max_history=10) == [((0,), 1), ((0, 1), 2), ((0, 1, 2), 3), ((5,), 6)]
    assert training_pairs(train, "last", max_history=2) == [((1, 2), 3), ((5,), 6)]
    assert training_pairs(train, "last", max_history=1) == [((2,), 3), ((5,), 6)]


def test_training_pairs_checks_arguments() -> None:
    with pytest.raises(ValueError, match="max_history"):
        training_pairs([[0, 1]], "sliding", max_history=0)
    with pytest.raises(ValueError, match="mode 'all'"):
        training_pairs([[0, 1]], "all", max_history=5)  # type: ignore[arg-type]


def test_beauty_global_time_matches_the_paper_figures() -> None:
    if not BEAUTY.is_dir():
        pytest.skip(f"no Beauty data at {BEAUTY}")
    data = load_source(ProcessedOptions(path=BEAUTY))
    split = split_interactions(data, "global_time")
    assert len(split.train) == 19_383
    assert sum(len(t) for t in split.train) == 122_241
    assert len(split.test) == 3_553
    assert len(split.valid) == 4_295  # 4,131 + 485 - 321 users with a valid item, as the authors report
    first = split.test[0]
    assert data.user_ids[first.user] == "1"
    assert [data.item_ids[i] for i in first.history] == ["1955", "28", "12031", "2758", "2273", "9634", "11791"]
    assert [data.item_ids[i] for i in first.targets] == ["3004"]
    assert all(len(t) >= 2 for t in split.train)  # the authors dropped users with < 2 training items
    pairs = training_pairs(split.train, "sliding", max_history=20)
    assert len(pairs) == 122_241 - 19_383
    assert max(len(h) for h, _ in pairs) == 20
    assert len(training_pairs(split.train, "last", max_history=20)) == 19_383
