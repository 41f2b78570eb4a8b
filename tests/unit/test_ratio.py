"""The realistic-ratio prediction: forwards at the ratio models' costs plus each row's measured host-side time."""

from __future__ import annotations

import pytest

from atspeed.bench.cost_model import predicted_ms_per_list
from atspeed.bench.ratio import predict, table

TRAINED = {"target": {"prefill": 2.0, "1": 0.5, "10": 0.6, "50": 1.0}, "draft": {"prefill": 0.5, "10": 0.3, "50": 0.4}}
RATIO = {
    "target": {"prefill": 80.0, "1": 10.0, "10": 15.0, "50": 30.0},
    "draft": {"prefill": 2.0, "10": 0.6, "50": 1.0},
}


def _row(decoder: str, seconds: float, **kw) -> dict:
    base = {"decoder": decoder, "K": 10, "batch_size": 1, "N": None, "gamma": None, "budget": None, "draft": None,
            "target_calls_per_list": 4.0, "draft_calls_per_list": 0.0, "verified_nodes_per_call": None,
            "seconds_per_list": seconds}  # fmt: skip
    return base | kw


def _report(rows: list[dict]) -> dict:
    return {"models": {"levels": 4, "vocab_size": 100}, "cost_model": {"prompt_tokens": 150, "ms": TRAINED},
            "rows": rows}  # fmt: skip


def test_a_row_is_its_forwards_at_the_ratio_costs_plus_its_measured_host_time() -> None:
    spec = _row("spec_strict", 0.009, N=10, gamma=4, draft="draft", target_calls_per_list=1.5,
                draft_calls_per_list=5.0, verified_nodes_per_call=40.0)  # fmt: skip
    beam = _row("beam", 0.004)
    rows = predict(_report([beam, spec, _row("hf_beam", 0.02), _row("spec_strict", 0.005, budget="auto", N=10,
                                                                     gamma=1, draft="draft")]), RATIO)  # fmt: skip
    assert [r["decoder"] for r in rows] == ["beam", "spec_strict"]  # HF generate and auto rows are left out
    for row, raw in zip(rows, (beam, spec), strict=True):
        at_trained = predicted_ms_per_list(raw, TRAINED["target"], TRAINED["draft"], 4)
        forwards = predicted_ms_per_list(raw, RATIO["target"], RATIO["draft"], 4)
        assert row["host_ms"] == pytest.approx(1e3 * raw["seconds_per_list"] - at_trained)
        assert row["predicted_ms_per_list"] == pytest.approx(forwards + row["host_ms"])
    assert rows[0]["x_beam"] == 1.0 and rows[1]["x_beam"] == pytest.approx(
        rows[0]["predicted_ms_per_list"] / rows[1]["predicted_ms_per_list"]
    )
    assert "| 10 | spec_strict | 10 | 4 | - |" in table(rows)


def test_the_target_drafting_for_itself_costs_target_forwards() -> None:
    own = _row("spec_strict", 0.006, N=10, gamma=4, draft="target", target_calls_per_list=1.0,
               draft_calls_per_list=4.0, verified_nodes_per_call=40.0)  # fmt: skip
    (row,) = predict(_report([own]), RATIO)
    assert row["forward_ms"] == pytest.approx(predicted_ms_per_list(own, RATIO["target"], RATIO["target"], 4))
    assert "| self |" in table([row | {"x_beam": 1.0}])
