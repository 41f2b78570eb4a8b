"""Decoder settings and pre-decoding checks fail early with a ValueError that names the offending key."""

from __future__ import annotations

import pytest
import torch
from decoding_helpers import left_pad, one_torch_thread, random_trie, tiny_model
from transformers import LlamaForCausalLM

from atspeed.decoding.checks import check_context
from atspeed.decoding.decoders import DECODERS, DecodeSettings, check_models, check_settings, decode

VOCAB = 40
DRAFTING = [name for name, spec in DECODERS.items() if spec.needs_draft]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    yield from one_torch_thread()


@pytest.fixture(scope="module")
def target() -> LlamaForCausalLM:
    return tiny_model(VOCAB, seed=0)


def test_the_decoder_table_lists_the_eight_decoders_and_what_each_promises() -> None:
    assert set(DECODERS) == {"beam", "spec_strict", "spec_relaxed", "spec_relaxed_exact", "hf_beam", "beam_sample",
                             "beam_sample_keyed", "spec_keyed"}  # fmt: skip
    assert set(DRAFTING) == {"spec_strict", "spec_relaxed", "spec_relaxed_exact", "spec_keyed"}
    assert {name for name, spec in DECODERS.items() if spec.samples} == {"spec_relaxed", "spec_relaxed_exact",
                                                                        "beam_sample", "beam_sample_keyed",
                                                                        "spec_keyed"}  # fmt: skip
    assert [name for name, spec in DECODERS.items() if not spec.uses_shared_header] == ["hf_beam"]
    contracts = {name: spec.contract for name, spec in DECODERS.items()}
    assert contracts == {"beam": "reference", "spec_strict": "equals beam", "spec_relaxed": "biased",
                         "spec_relaxed_exact": "samples beam_sample's distribution", "hf_beam": "equals beam",
                         "beam_sample": "reference", "beam_sample_keyed": "reference",
                         "spec_keyed": "equals beam_sample_keyed"}  # fmt: skip
    assert all(spec.help for spec in DECODERS.values())


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_beams": 0, "levels": 3}, r"num_beams \(K\) must be >= 1, got 0"),
        ({"num_beams": 2, "levels": 0}, r"levels \(L\) must be >= 1, got 0"),
        ({"num_beams": 2, "levels": 3, "gamma": 0}, r"gamma must be >= 1, got 0"),
        ({"num_beams": 2, "levels": 3, "gamma": -2}, r"gamma must be >= 1, got -2"),
        ({"num_beams": 2, "levels": 3, "draft_beams": 0}, r"draft_beams \(N\) must be >= 1, got 0"),
    ],
)
def test_settings_reject_non_positive_sizes(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        DecodeSettings(**kwargs)


def test_settings_defaults() -> None:
    """N = 40 and gamma = 3 by default (the paper's setting); seed 0."""
    s = DecodeSettings(num_beams=5, levels=4)
    assert (s.draft_beams, s.gamma, s.seed, s.pad_token_id) == (40, 3, 0, 0)


@pytest.mark.parametrize("name", DRAFTING)
def test_speculative_decoders_need_at_least_k_draft_beams(name: str) -> None:
    """N < K can never accept a level: refused, naming draft_beams (N) and num_beams (K)."""
    with pytest.raises(ValueError, match=r"draft_beams \(N = 4\) must be >= num_beams \(K = 5\)"):
        check_settings(name, DecodeSettings(num_beams=5, levels=3, draft_beams=4))
    check_settings(name, DecodeSettings(num_beams=5, levels=3, draft_beams=5))  # N = K is fine


@pytest.mark.parametrize("name", ["beam", "hf_beam"])
def test_non_speculative_decoders_ignore_the_draft_settings(name: str) -> None:
    check_settings(name, DecodeSettings(num_beams=5, levels=3, draft_beams=1))


def test_unknown_decoder_name_is_refused_with_the_choices() -> None:
    with pytest.raises(
        ValueError,
        match=r"unknown decoder 'beam_search'; choose one of \['beam', 'beam_sample', 'beam_sample_keyed', 'hf_beam'",
    ):
        check_settings("beam_search", DecodeSettings(num_beams=1, levels=1))  # type: ignore[arg-type]


def test_check_models_refuses_a_missing_draft_and_a_different_vocabulary(target) -> None:
    trie = random_trie(VOCAB, 3, seed=0)
    for name in DRAFTING:
        with pytest.raises(ValueError, match=f"decoder {name} needs a draft model"):
            check_models(name, target, None, trie)
        with pytest.raises(ValueError, match=r"draft and target vocabularies differ \(41 vs 40 tokens\)"):
            check_models(name, target, tiny_model(VOCAB + 1, seed=1, hidden=16, layers=1), trie)
        check_models(name, target, tiny_model(VOCAB, seed=1, hidden=16, layers=1), trie)
    check_models("beam", target, None, trie)


def test_check_models_refuses_a_trie_wider_than_the_vocabulary(target) -> None:
    trie = random_trie(VOCAB + 10, 3, seed=0)
    with pytest.raises(ValueError, match="the trie spans 50 token ids but the target's vocabulary has 40"):
        check_models("beam", target, None, trie)


def test_check_context_refuses_prompts_that_do_not_fit(target) -> None:
    """max_position_embeddings = 128: 125 prompt tokens + 3 levels fit, 126 do not; the message names the
    model and the setting to change (data.max_history)."""
    check_context(target, 125, 3)
    with pytest.raises(ValueError, match=r"126 tokens \+ 3 identifier tokens exceed the draft's context of 128.*"
                       r"data\.max_history"):  # fmt: skip
        check_context(target, 126, 3, "draft")


@pytest.mark.parametrize(
    ("name", "settings", "draft", "prompt", "message"),
    [
        ("spec_strict", DecodeSettings(3, 3, draft_beams=2), "same", 4, r"draft_beams \(N"),
        ("spec_relaxed", DecodeSettings(3, 3, draft_beams=6), None, 4, "needs a draft model"),
        ("spec_strict", DecodeSettings(3, 3, draft_beams=6), "wider", 4, "vocabularies differ"),
        ("greedy", DecodeSettings(3, 3), None, 4, "unknown decoder 'greedy'"),
        ("beam", DecodeSettings(3, 3), None, 126, r"exceed the target's context of 128.*max_history"),
        ("spec_strict", DecodeSettings(3, 3, draft_beams=6), "short", 60, r"exceed the draft's context of 32"),
    ],
)
def test_decode_checks_before_running(target, name, settings, draft, prompt, message) -> None:
    """decode() runs every check first: the model is never called when a check fails."""
    drafts = {
        None: None,
        "same": target,
        "wider": tiny_model(VOCAB + 1, seed=1, hidden=16, layers=1),
        "short": tiny_model(VOCAB, seed=1, hidden=16, layers=1),
    }
    draft_model = drafts[draft]
    if draft == "short":
        draft_model.config.max_position_embeddings = 32
    input_ids, mask = left_pad([[5] * prompt])
    trie = random_trie(VOCAB, 3, seed=0)
    calls = []
    hook = target.register_forward_pre_hook(lambda *_: calls.append(1))
    try:
        with pytest.raises(ValueError, match=message):
            decode(name, target, input_ids, mask, trie, settings, draft=draft_model)
    finally:
        hook.remove()
    assert not calls


@pytest.mark.parametrize("name", ["beam", "spec_strict", "spec_relaxed", "hf_beam"])
@pytest.mark.parametrize(
    ("prompts", "levels", "message"),
    [
        ([[5, 6, 7], [8]], 2, r"levels = 2, but the trie.s identifiers have 3 tokens"),  # beam returned 2-token lists
        ([[5, 6, 7], []], 3, r"request 1 of the batch has an empty prompt \(1 empty in all\)"),
        ([[], []], 3, r"request 0 of the batch has an empty prompt \(2 empty in all\)"),
    ],
)
def test_decode_refuses_mismatched_levels_and_empty_prompts(target, name, prompts, levels, message) -> None:
    """Every decoder stops with one message before any forward (an empty prompt used to fail inside the model)."""
    if all(not p for p in prompts):
        input_ids, mask = torch.zeros(2, 0, dtype=torch.long), torch.zeros(2, 0, dtype=torch.long)
    else:
        input_ids, mask = left_pad(prompts)
    calls = []
    hook = target.register_forward_pre_hook(lambda *_: calls.append(1))
    try:
        with pytest.raises(ValueError, match=message):
            settings = DecodeSettings(3, levels, draft_beams=6)
            decode(name, target, input_ids, mask, random_trie(VOCAB, 3, seed=0), settings, draft=target)
    finally:
        hook.remove()
    assert not calls


def test_decode_runs_without_gradients(target) -> None:
    """Decoding returns plain tensors with no autograd graph (it runs under inference mode)."""
    input_ids, mask = left_pad([[5, 6, 7]])
    out = decode("beam", target, input_ids, mask, random_trie(VOCAB, 3, seed=0), DecodeSettings(2, 3))
    assert not out.scores.requires_grad
    assert out.sequences.dtype == torch.long


def test_equals_names_the_decoder_whose_lists_a_contract_promises() -> None:
    equals = {name: spec.equals for name, spec in DECODERS.items() if spec.equals}
    assert equals == {"spec_strict": "beam", "hf_beam": "beam", "spec_keyed": "beam_sample_keyed"}
    assert all(target in DECODERS for target in equals.values())
