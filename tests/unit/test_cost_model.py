"""The benchmark's cost model: tree sizes, interpolation and the predicted ms per list, on hand-made cost tables."""

from __future__ import annotations

import pytest
from decoding_helpers import one_torch_thread, random_prompts, tiny_model

from atspeed.bench.cost_model import forward_costs, predicted_ms_per_list, tree_sizes

TARGET = {"prefill": 10.0, "1": 1.0, "10": 2.0, "40": 4.0, "130": 8.0}
DRAFT = {"prefill": 3.0, "1": 0.5, "10": 0.6, "40": 1.0, "130": 2.0}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    yield from one_torch_thread()


def row(decoder: str, **kw) -> dict:
    return {"decoder": decoder, "batch_size": 1, "K": 10, "N": 40, "gamma": 3, **kw}


def test_tree_sizes_cover_k_n_and_every_tree() -> None:
    assert tree_sizes([1, 10], [10, 40], [1, 3]) == [1, 10, 11, 20, 31, 40, 41, 50, 121, 130]  # N >= K trees only


def test_beam_costs_a_prefill_and_l_minus_1_steps_of_k_tokens() -> None:
    assert predicted_ms_per_list(row("beam"), TARGET, DRAFT, levels=4) == 10.0 + 3 * 2.0


def test_speculative_costs_both_prefills_verifications_and_draft_steps() -> None:
    """2 calls of the 130-token tree, the first with the prompt (prefill + tree - a 1-token forward); 7 draft calls =
    prefill + 6 steps of N."""
    r = row("spec_strict", target_calls_per_list=2.0, draft_calls_per_list=7.0)
    assert predicted_ms_per_list(r, TARGET, DRAFT, levels=4) == pytest.approx(10.0 - 1.0 + 2 * 8.0 + 3.0 + 6 * 1.0)


def test_unmeasured_sizes_interpolate_and_uncovered_rows_give_none() -> None:
    r = row("spec_relaxed", N=20, target_calls_per_list=2.0, draft_calls_per_list=4.0)  # tree 70, draft width 20
    tree, width = 4.0 + (8.0 - 4.0) * 30 / 90, 0.6 + (1.0 - 0.6) * 10 / 30
    assert predicted_ms_per_list(r, TARGET, DRAFT, 4) == pytest.approx(10.0 - 1.0 + 3.0 + 2 * tree + 3 * width)
    assert predicted_ms_per_list(row("hf_beam"), TARGET, DRAFT, 4) is None
    assert predicted_ms_per_list({**row("beam"), "batch_size": 16}, TARGET, DRAFT, 4) is None


def test_forward_costs_measure_every_size_and_leave_no_trace() -> None:
    model = tiny_model(40, seed=0)
    costs = forward_costs(model, random_prompts(40, [12], seed=0)[0], [1, 7, 30], repeats=2, warmup=1)
    assert list(costs) == ["prefill", "1", "7", "30"] and all(v > 0 for v in costs.values())
