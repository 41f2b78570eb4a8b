"""``DecodeOptions`` (what a config says) -> ``DecodeSettings`` (what the decoders take), and ``DecodeResult`` (ms per
list and speed ratios, defined once)."""

from __future__ import annotations

from argparse import ArgumentTypeError

import pytest
from jsonargparse.typing import NonNegativeInt, PositiveInt

from atspeed.decoding.decoders import DECODERS
from atspeed.decoding.options import DecodeOptions, parse_budget
from atspeed.decoding.result import DecodeResult
from atspeed.decoding.settings import DecodeSettings


def test_options_give_the_settings_the_decoders_take() -> None:
    """The parsed restricted ints (PositiveInt, NonNegativeInt) become plain ints: DecodeSettings accepts the budget."""
    options = DecodeOptions("spec_relaxed", PositiveInt(5), PositiveInt(8), PositiveInt(2), NonNegativeInt(7), 3)
    settings = options.settings(levels=4, pad_token_id=9)
    assert settings == DecodeSettings(5, 4, draft_beams=8, gamma=2, pad_token_id=9, seed=3, budget=7)
    assert type(settings.budget) is int and options.spec is DECODERS["spec_relaxed"]
    assert DecodeOptions(budget="auto").settings(3).budget == "auto"
    assert options.as_dict() == {"decoder": "spec_relaxed", "num_beams": 5, "draft_beams": 8, "gamma": 2,
                                 "budget": 7, "seed": 3}  # fmt: skip


@pytest.mark.parametrize("name", [name for name, spec in DECODERS.items() if spec.needs_draft])
def test_decoders_that_draft_need_n_at_least_k(name: str) -> None:
    with pytest.raises(ValueError, match=r"decoding\.draft_beams \(N = 4\) must be >= decoding\.num_beams \(K = 5\)"):
        DecodeOptions(name, num_beams=5, draft_beams=4)
    DecodeOptions(name, num_beams=5, draft_beams=5)


def test_decoders_that_do_not_draft_ignore_n_and_unknown_names_are_refused() -> None:
    assert DecodeOptions("beam", num_beams=5, draft_beams=1).settings(2).num_beams == 5
    with pytest.raises(ValueError, match=r"decoding\.decoder: unknown decoder 'greedy'"):
        DecodeOptions("greedy")  # type: ignore[arg-type]


def test_budget_text_is_parsed_in_one_place() -> None:
    assert [parse_budget(v) for v in ("none", "null", None, "auto", "0", "20", 7)] == [None, None, None, "auto", 0,
                                                                                        20, 7]  # fmt: skip
    for bad in ("-1", "all", -1, True, 1.5):
        with pytest.raises(ArgumentTypeError, match="a budget is an integer >= 0, auto or none"):
            parse_budget(bad)


def test_decode_result_defines_ms_per_list_and_the_speedup_once() -> None:
    beam, spec = DecodeResult(8, 6.0), DecodeResult(8, 3.0)
    assert (beam.ms_per_list, spec.ms_per_list) == (750.0, 375.0)
    assert spec.speedup_over(beam) == 2.0 and beam.speedup_over(spec) == 0.5
    assert spec.speedup_over(None) is None and DecodeResult(0, 0.0).ms_per_list is None
    assert DecodeResult(8, 0.0).speedup_over(beam) is None  # no time measured: no ratio
    speed = spec.speed(beam)
    assert speed == {"ms_per_list": 375.0, "seconds": 3.0, "beam_ms_per_list": 750.0, "beam_seconds": 6.0,
                     "ratio_over_beam": 2.0, "timed_lists": 8, "warmup_excluded": True}  # fmt: skip
    assert DecodeResult.from_speed(speed) == spec and DecodeResult.from_speed(speed, "beam_") == beam
    assert DecodeResult.from_speed({}) is None
