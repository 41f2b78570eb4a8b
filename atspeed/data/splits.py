"""Train / valid / test splits of ``Interactions``, and the (history, target) pairs used for training.

``global_time`` (the paper): all interactions are cut by time into train / valid / test periods, so
a user can have several ground-truth items, and the test history is train + valid items.
``leave_one_out`` (TIGER / LC-Rec): the last item is the test target, the one before it the valid one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, get_args

from atspeed.data.schema import Interactions
from atspeed.errors import DataError

SplitName = Literal["global_time", "leave_one_out"]
PairMode = Literal["last", "sliding"]

TRAIN, VALID, TEST = 0, 1, 2


@dataclass(frozen=True)
class EvalSample:
    """One evaluation query: a user's history and the items to be recommended next."""

    user: int
    """User position in ``Interactions.user_ids``."""
    history: tuple[int, ...]
    """Item indices in time order, complete (truncation to the prompt length happens later); may be empty."""
    targets: tuple[int, ...]
    """Ground-truth item indices, de-duplicated in first-seen order; never empty."""

    def __post_init__(self) -> None:
        if not self.targets:
            raise ValueError(f"EvalSample for user {self.user} has no targets")


@dataclass(frozen=True)
class Split:
    """The three parts of a split."""

    train: list[list[int]]
    """Per user (aligned with ``Interactions.user_ids``), training-period items in time order."""
    valid: list[EvalSample]
    """Only users with at least one valid target."""
    test: list[EvalSample]
    """Only users with at least one test target."""


def split_interactions(
    data: Interactions, how: SplitName, ratios: tuple[float, float, float] = (0.8, 0.1, 0.1)
) -> Split:
    """Split ``data`` the ``how`` way.

    ``global_time`` uses ``data.periods`` when the source is already split (``ratios`` are then only
    checked), else cuts the timestamps by ``ratios`` (train, valid, test). ``leave_one_out`` ignores
    periods and timestamps: it uses each user's sequence order.
    """
    if how == "leave_one_out":
        return _leave_one_out(data)
    if how != "global_time":
        raise ValueError(f"unknown data.split {how!r}; choose one of {list(get_args(SplitName))}")
    ratios = _check_ratios(ratios)
    if data.periods is not None:
        return _split_by_periods(data.sequences, data.periods)
    if data.timestamps is None:
        raise DataError(
            f"split 'global_time' (data.split) needs timestamps or periods, and dataset {data.name!r} has neither; "
            "use data.split=leave_one_out"
        )
    return _split_by_periods(data.sequences, _periods_by_time(data.timestamps, ratios))


def _check_ratios(ratios: tuple[float, float, float]) -> tuple[float, float, float]:
    """``ratios`` if they are three positive numbers summing to 1, else a ValueError naming them."""
    if len(ratios) != 3 or any(not r > 0 for r in ratios) or not math.isclose(sum(ratios), 1.0, abs_tol=1e-6):
        raise ValueError(f"split ratios must be three positive numbers summing to 1, got {ratios}")
    return ratios


def _periods_by_time(timestamps: list[list[float]], ratios: tuple[float, float, float]) -> list[list[int]]:
    """Period of each interaction after sorting all of them by time (stable) and cutting by ``ratios``."""
    order = sorted(
        ((u, j) for u, times in enumerate(timestamps) for j in range(len(times))),
        key=lambda uj: timestamps[uj[0]][uj[1]],
    )
    n = len(order)
    # floor, with a little slack so that e.g. 0.8 * 10 = 8.000000000000002 does not round the wrong way
    train_end = math.floor(n * ratios[0] + 1e-9)
    valid_end = math.floor(n * (ratios[0] + ratios[1]) + 1e-9)
    periods = [[TEST] * len(times) for times in timestamps]
    for rank, (u, j) in enumerate(order):
        if rank < train_end:
            periods[u][j] = TRAIN
        elif rank < valid_end:
            periods[u][j] = VALID
    return periods


def _split_by_periods(sequences: list[list[int]], periods: list[list[int]]) -> Split:
    """Train lists and eval samples from per-interaction periods (0 / 1 / 2)."""
    if any(p not in (TRAIN, VALID, TEST) for per in periods for p in per):
        raise DataError("periods must be 0 (train), 1 (valid) or 2 (test)")
    train: list[list[int]] = []
    valid: list[EvalSample] = []
    test: list[EvalSample] = []
    for user, (seq, per) in enumerate(zip(sequences, periods, strict=True)):
        train_items = [i for i, p in zip(seq, per, strict=True) if p == TRAIN]
        valid_items = [i for i, p in zip(seq, per, strict=True) if p == VALID]
        test_items = [i for i, p in zip(seq, per, strict=True) if p == TEST]
        train.append(train_items)
        if valid_items:
            valid.append(EvalSample(user, tuple(train_items), _distinct(valid_items)))
        if test_items:
            history = tuple(i for i, p in zip(seq, per, strict=True) if p in (TRAIN, VALID))
            test.append(EvalSample(user, history, _distinct(test_items)))
    return Split(train=train, valid=valid, test=test)


def _leave_one_out(data: Interactions) -> Split:
    """Last item is the test target, second-to-last the valid one; users with < 3 items only train."""
    train: list[list[int]] = []
    valid: list[EvalSample] = []
    test: list[EvalSample] = []
    for user, seq in enumerate(data.sequences):
        if len(seq) < 3:
            train.append(list(seq))
            continue
        train.append(list(seq[:-2]))
        valid.append(EvalSample(user, tuple(seq[:-2]), (seq[-2],)))
        test.append(EvalSample(user, tuple(seq[:-1]), (seq[-1],)))
    return Split(train=train, valid=valid, test=test)


def _distinct(items: list[int]) -> tuple[int, ...]:
    """Items without repeats, first occurrence order kept."""
    return tuple(dict.fromkeys(items))


def training_pairs(train: list[list[int]], mode: PairMode, max_history: int) -> list[tuple[tuple[int, ...], int]]:
    """``(history, target)`` pairs from each user's training items, history cut to the last ``max_history``.

    ``sliding``: every position i >= 1 of a user's list is a target; ``last``: only the final one.
    Users with fewer than 2 training items give no pairs.
    """
    if max_history < 1:
        raise ValueError(f"max_history must be >= 1, got {max_history}")
    if mode not in get_args(PairMode):
        raise ValueError(f"unknown training pair mode {mode!r}; choose one of {list(get_args(PairMode))}")
    pairs: list[tuple[tuple[int, ...], int]] = []
    for items in train:
        if len(items) < 2:
            continue
        positions = range(1, len(items)) if mode == "sliding" else (len(items) - 1,)
        pairs.extend((tuple(items[max(0, i - max_history) : i]), items[i]) for i in positions)
    return pairs
