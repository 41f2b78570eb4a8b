"""Decoding through the CLI: ``predict`` with each decoder on a tiny exported target and draft."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from atspeed.cli import SIGTERM_EXIT, main
from tests.integration.tiny_data import decode_args, run_cli


def _run(exported, out: Path, decoder: str, *extra: str) -> tuple[list[dict], dict]:
    main(["predict", *decode_args(exported, out, "--model.init_args.decoding.decoder", decoder, *extra)])
    rows = [json.loads(line) for line in (out / "p.jsonl").read_text().splitlines()]
    return rows, json.loads((out / "r.json").read_text())


def test_strict_speculative_predict_equals_beam_search_and_hf_generate(exported, tmp_path) -> None:
    beam_rows, beam_report = _run(exported, tmp_path / "beam", "beam")
    strict_rows, strict_report = _run(exported, tmp_path / "strict", "spec_strict")
    hf_rows, _ = _run(exported, tmp_path / "hf", "hf_beam")
    assert len(beam_rows) == 24 and all(len(r["items"]) == 3 for r in beam_rows)
    assert [r["items"] for r in strict_rows] == [r["items"] for r in beam_rows] == [r["items"] for r in hf_rows]
    assert strict_report["metrics"] == beam_report["metrics"]
    assert set(strict_report["metrics"]) == {"test/recall@1", "test/recall@3", "test/ndcg@1", "test/ndcg@3"}
    decode = strict_report["decode"]
    assert decode["lists"] == 24 and 1 <= decode["target_calls_per_list"] <= 2  # L = 2, no target prefill call
    assert sum(strict_report["accepted_histogram"]) >= 24  # one verification call per list at least
    assert beam_report["decode"]["target_calls_per_list"] == 2  # L = 2: prefill + one step


def test_relaxed_predict_is_reproducible_and_valid(exported, tmp_path) -> None:
    first, report = _run(exported, tmp_path / "a", "spec_relaxed", "--model.init_args.decoding.seed", "3")
    again, _ = _run(exported, tmp_path / "b", "spec_relaxed", "--model.init_args.decoding.seed", "3")
    assert first == again
    assert all(None not in r["items"] and len(set(r["items"])) == 3 for r in first)
    assert all(r["scores"] == sorted(r["scores"], reverse=True) for r in first)
    assert 0.0 <= report["metrics"]["test/recall@3"] <= 1.0


@pytest.mark.slow
def test_sigterm_stops_predict_at_the_next_batch_keeping_the_completed_ones(exported, tmp_path) -> None:
    full, _ = _run(exported, tmp_path / "full", "beam")
    out = tmp_path / "stopped"
    args = decode_args(exported, out, "--model.init_args.decoding.decoder", "beam")
    callbacks = json.loads(args[args.index("--trainer.callbacks") + 1])
    callbacks.append(
        {
            "class_path": "tests.integration.interrupts.SignalAt",
            "init_args": {"signal_name": "SIGTERM", "predict_batch": 0},
        }
    )
    args[args.index("--trainer.callbacks") + 1] = json.dumps(callbacks)
    done = run_cli("predict", args)
    assert done.returncode == SIGTERM_EXIT, done.stderr[-3000:]
    assert not (out / "p.jsonl").exists() and not (out / "r.json").exists(), "an incomplete decode is not reported"
    kept = [json.loads(line) for line in (out / "p.jsonl.partial").read_text().splitlines()]
    assert kept == full[: len(kept)] and 8 <= len(kept) < len(full), "whole batches (8 requests) before the stop"


def test_help_lists_every_decoder_with_its_contract(capsys) -> None:
    """``--model.help`` of the predict stage names each row of ``DECODERS`` with its exactness contract."""
    from atspeed.decoding.decoders import DECODERS

    with pytest.raises(SystemExit) as done:
        main(["predict", "--model.help", "atspeed.modules.recommend.Recommender"])
    assert done.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for name, spec in DECODERS.items():
        assert f"{name} ({spec.contract}): {spec.help};" in text, name
