"""The roofline prediction (predicted, not measured) on hand-computed numbers."""

from __future__ import annotations

import json

import pytest

from atspeed.bench import roofline
from atspeed.bench.roofline import Calls, Hardware, ModelShape, forward_ms, predict
from tests.integration.tiny_data import load_script

H100 = roofline.HARDWARE[1]


def test_a_forward_is_bound_by_bytes_or_by_flops() -> None:
    # 6.7e9 bf16 parameters = 13.4 GB over 3.35 TB/s = 4 ms; one token's 1.34e10 FLOP is nothing at 989 TFLOP/s
    assert forward_ms(H100, roofline.TARGET_7B, 1) == pytest.approx(4.0)
    # 150 cached tokens add 2 x 32 layers x 4096 x 2 bytes = 512 KiB each to read
    assert forward_ms(H100, roofline.TARGET_7B, 1, 150) == pytest.approx(4.0 + 1e3 * 524_288 * 150 / 3.35e12)
    # 1000 tokens: 2 x 6.7e9 x 1000 FLOP / 989e12 = 13.55 ms, above the 4 ms of bytes
    assert forward_ms(H100, roofline.TARGET_7B, 1000) == pytest.approx(1e3 * 1.34e13 / 989e12)
    assert forward_ms(H100, roofline.TARGET_7B, 1, 0, overhead_ms=0.5) == pytest.approx(4.5)


def test_the_ratio_over_beam_search_and_its_host_cost() -> None:
    """A toy machine where every forward is bytes-bound: target 2 ms, draft 0.2 ms, + 1 ms overhead each."""
    hw = Hardware("toy", bandwidth=1e12, flops=1e15)
    target, draft = ModelShape("t", 1e9, 1, 1), ModelShape("d", 1e8, 1, 1)  # KV bytes: 4 per token (negligible)
    calls = Calls(k=5, target_calls=1.5, draft_calls=4.0, n=10, gamma=2)
    (row,) = predict([calls], levels=4, prompt=150, overhead_ms=1.0, host_ms=0.5, hardware=[hw], target=target,
                     draft=draft)  # fmt: skip
    beam = 4 * 3.0 + 4 * 0.5  # L = 4 target calls of 3 ms, host 0.5 ms each
    spec = 1.5 * 3.0 + 4 * 1.2 + 1.5 * 0.5  # target calls, draft calls of 1.2 ms, host per target call
    assert row["tree"] == 25 and row["beam_ms"] == pytest.approx(beam, abs=1e-3)
    assert row["spec_ms"] == pytest.approx(spec, abs=1e-3)
    assert row["ratio"] == pytest.approx(14 / 10.05, abs=1e-4)
    assert row["per_host_ms"] == pytest.approx(18 / 11.55 - 14 / 10.05, abs=1e-4)


def test_calls_come_from_a_report_or_are_given(tmp_path, capsys) -> None:
    spec = {"decoder": "spec_strict", "batch_size": 1, "N": 40, "gamma": 3, "draft": "draft", "budget": None, "K": 10,
            "target_calls_per_list": 1.25, "draft_calls_per_list": 3.5, "verified_nodes_per_call": 30.0}  # fmt: skip
    others = [spec | {"draft": "target"}, spec | {"budget": "auto"}, spec | {"batch_size": 8}, spec | {"K": 7}]
    (calls,) = roofline.calls_from_report({"rows": [spec, *others]}, [1, 10], 40, 3)
    assert calls == Calls(10, 1.25, 3.5, 40, 3, 30.0) and calls.tree == 40
    assert roofline.given_calls([1, 20], 1.5, 40, 3) == [Calls(1, 1.5, 4.5, 40, 3), Calls(20, 1.5, 4.5, 40, 3)]
    bench = tmp_path / "bench.json"
    bench.write_text(json.dumps({"rows": [spec]}))
    script = load_script("predict_ratio")
    assert script.main(["--roofline", "--bench", str(bench), "--ks", "10", "--out", str(tmp_path / "r.json")]) == 0
    out = json.loads((tmp_path / "r.json").read_text())
    assert out["benchmark"] == "roofline (predicted)"
    assert [r["hardware"] for r in out["rows"]] == ["A100 80GB", "H100 SXM"]
    assert "PREDICTED" in capsys.readouterr().out
