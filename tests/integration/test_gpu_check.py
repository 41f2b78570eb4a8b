"""scripts/gpu_check.sh --tiny on the CPU: every section runs (the GPU tests skipped, and said so), numbers are
finite, host syncs per target call stay within the decoders' limits."""

from __future__ import annotations

import json
import math
import os
import subprocess

import pytest

from tests.integration.tiny_data import ROOT, load_script

LIMIT = {"beam": 1.0, "spec_strict": 2.0}


@pytest.fixture(scope="module")
def check(tmp_path_factory) -> tuple[dict, str]:
    out = tmp_path_factory.mktemp("gpu_check")
    env = {**os.environ, "ATSPEED_DEVICE": "cpu"}
    done = subprocess.run(["bash", "scripts/gpu_check.sh", str(out), "--tiny"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=1200, check=False)  # fmt: skip
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    return json.loads((out / "gpu_check.json").read_text()), (out / "gpu_check.md").read_text()


def _positive(value) -> bool:
    return isinstance(value, float) and math.isfinite(value) and value > 0


@pytest.mark.slow
def test_every_section_runs_and_the_gpu_tests_say_they_were_skipped(check) -> None:
    report, md = check
    sections = report["sections"]
    assert list(sections) == ["gpu_tests", "smoke_bf16", "decode", "forward_costs", "memory"]
    assert sections["gpu_tests"]["status"] == "skipped" and "CUDA" in sections["gpu_tests"]["reason"]
    assert [sections[s]["status"] for s in ("smoke_bf16", "decode", "forward_costs")] == ["ok"] * 3
    assert sections["memory"]["status"] == "skipped" and report["nonfinite"] == [] and report["tiny"]
    for name in sections:
        assert f"| {name} | {sections[name]['status']} |" in md
    assert "## decode" in md and "## forward_costs" in md


@pytest.mark.slow
def test_decode_rows_cover_the_grid_with_host_syncs_within_the_limits(check) -> None:
    rows = check[0]["sections"]["decode"]["rows"]
    kinds = {(r["decoder"], r["draft"], r["N"], r["gamma"], r["budget"]) for r in rows if r["K"] == 10}
    assert kinds == {("beam", None, None, None, None), ("spec_strict", "target", 10, 4, None),
                     ("spec_strict", "draft", 40, 3, None), ("spec_strict", "draft", 40, 3, "auto")}  # fmt: skip
    assert {(r["K"], r["batch_size"]) for r in rows} == {(k, b) for k in (1, 10, 20) for b in (1, 8)}
    for r in rows:
        assert _positive(r["seconds_per_list"]) and _positive(r["ops_per_call"]), r
        # budget auto on the CPU: the planner's own host tensors (plan's bool, observe's .cpu()) count as syncs too,
        # one each per call; on a GPU they cost nothing and the counter leaves them out (HostSyncCounter(device=))
        planner = 2.0 if r["budget"] == "auto" else 0.0
        assert 0 <= r["syncs_per_call"] <= LIMIT[r["decoder"]] + planner, r
    smoke = check[0]["sections"]["smoke_bf16"]["rows"]
    assert smoke and all(r["syncs_per_call"] <= LIMIT[r["decoder"]] for r in smoke)


@pytest.mark.slow
def test_forward_costs_of_both_models(check) -> None:
    costs = check[0]["sections"]["forward_costs"]
    assert costs["prompt_tokens"] >= 30
    for name in ("target", "draft"):
        assert list(costs["ms"][name]) == ["prefill", "1", "16", "64", "128", "256"]
        assert all(_positive(v) for v in costs["ms"][name].values())


def test_a_missing_cuda_device_is_refused(tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.setenv("ATSPEED_DEVICE", "cuda")
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    with pytest.raises(SystemExit) as exit_info:
        load_script("gpu_check").main([str(tmp_path / "out")])
    assert exit_info.value.code == 2
    assert "error: ATSPEED_DEVICE=cuda: no CUDA device available" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
