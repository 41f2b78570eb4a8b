"""The predict stage's tallies merged over processes: each request once, in request order; speed from the slowest."""

from __future__ import annotations

import pytest
import torch

from atspeed.decoding.output import DecodeStats
from atspeed.modules.decode_tally import BatchTally, DecodeTally, merged_stats, speed_summary


def _batch(ids: list[int], seconds: float = 1.0, beam: float | None = None) -> BatchTally:
    """A batch whose request r made r + 1 target calls, 2r draft calls and verified 3r nodes; accepted depth r per
    list; 1 s per stage."""
    t = torch.tensor(ids)
    stats = DecodeStats(t + 1, 2 * t, t.clone(), 1.0, 1.0, 1.0, verified_nodes=3 * t)
    return BatchTally(t, stats, {"decoder": seconds} | ({"beam": beam} if beam is not None else {}))


def test_speed_tally_alternates_and_keeps_the_warm_up_batch_apart() -> None:
    tally = DecodeTally()
    assert speed_summary([tally.batches]) == {} and tally.local_stats() is None
    orders = []
    for batch in (_batch([0, 1, 2, 3], 9.0, 9.0), _batch([4, 5, 6, 7], 1.0, 3.0), _batch([8, 9, 10, 11], 2.0, 3.0)):
        orders.append(tally.order(["decoder", "beam"]))
        tally.add(batch.request_ids, batch.stats, batch.seconds)
    assert orders == [["decoder", "beam"], ["beam", "decoder"], ["decoder", "beam"]]
    assert speed_summary([tally.batches]) == {"ms_per_list": 375.0, "seconds": 3.0, "beam_ms_per_list": 750.0,
                                              "beam_seconds": 6.0, "ratio_over_beam": 2.0, "timed_lists": 8,
                                              "warmup_excluded": True, "processes": 1}  # fmt: skip
    alone = [_batch([0, 1, 2, 3, 4], 0.5)]  # a single batch is timed after all, without a beam comparison
    assert speed_summary([alone]) == {"ms_per_list": 100.0, "seconds": 0.5, "timed_lists": 5,
                                      "warmup_excluded": False, "processes": 1}  # fmt: skip


def test_two_processes_give_the_single_process_statistics_in_request_order() -> None:
    """Requests 0..6 split as Lightning's predict sampler does (rank r gets r, r + 2, ...), in batches of 2."""
    one = [_batch([0, 1]), _batch([2, 3]), _batch([4, 5]), _batch([6])]
    two = [[_batch([0, 2], 3.0), _batch([4, 6], 3.0)], [_batch([1, 3], 1.0), _batch([5], 1.0)]]
    single, merged = merged_stats([one]), merged_stats(two)
    for name in ("target_calls", "draft_calls", "verified_nodes"):
        assert torch.equal(getattr(merged, name), getattr(single, name)), name
    assert merged.summary(2) == single.summary(2) and merged.histogram(6) == single.histogram(6)
    speed = speed_summary(two)  # the slowest process's 3 s (its warm-up apart) over the 3 timed lists 4, 5, 6
    assert speed == {"ms_per_list": 1000.0, "seconds": 3.0, "timed_lists": 3, "warmup_excluded": True, "processes": 2}


def test_repeated_requests_count_once() -> None:
    """A sampler that pads repeats requests on another process: a batch of repeats only is dropped whole, the repeated
    rows of a mixed batch are left out of the per-list counters."""
    two = [[_batch([0, 2]), _batch([4])], [_batch([1, 3]), _batch([0, 2])]]
    merged = merged_stats(two)
    assert merged.lists == 5 and merged.target_calls.tolist() == [1, 2, 3, 4, 5]
    assert merged.histogram(4) == [1, 1, 1, 1, 1] and merged.draft_seconds == 3.0
    mixed = merged_stats([[_batch([0, 1])], [_batch([1, 2])]])
    assert mixed.target_calls.tolist() == [1, 2, 3] and mixed.verified_nodes.tolist() == [0, 3, 6]
    assert speed_summary([[_batch([0, 1])], [_batch([0, 1])]])["timed_lists"] == 2
    assert merged_stats([[], []]) is None and speed_summary([[], []]) == {}


def test_stats_without_verified_nodes_merge_without_them() -> None:
    t = torch.tensor([1, 0])
    batch = BatchTally(t, DecodeStats(t + 1, t, torch.zeros(0, dtype=torch.long), 0.5, 0.0, 0.0), {"decoder": 1.0})
    merged = merged_stats([[batch]])
    assert merged.verified_nodes is None and merged.target_calls.tolist() == [1, 2]
    assert merged.summary(2)["draft_seconds"] == pytest.approx(0.5)
