"""bf16 decoding: float32 logits from the final hidden state, one tie-break, strict = beam, a self-draft accepted."""

from __future__ import annotations

import pytest
import torch
from decoding_helpers import left_pad, speculative_world, tiny_model

from atspeed.decoding.cache.tree_attention import run_model
from atspeed.decoding.decoders import decode
from atspeed.decoding.settings import DecodeSettings


def test_a_bf16_model_gives_float32_logits_of_its_final_hidden_state() -> None:
    model = tiny_model(50, seed=0).to(torch.bfloat16)
    ids = torch.tensor([[5, 6, 7, 8]])
    logits = run_model(model, 0, input_ids=ids)
    hidden = model.model(input_ids=ids).last_hidden_state
    expected = hidden.float() @ model.lm_head.weight.float().T
    assert logits.dtype == torch.float32
    torch.testing.assert_close(logits, expected, rtol=0, atol=1e-5)
    rounded = model(input_ids=ids).logits.float()  # what the bf16 head gives: coarser
    assert (rounded - expected).abs().max() > 1e-3


def test_the_float32_head_follows_in_place_weight_updates() -> None:
    """A draft validated while it trains: the cached float32 head is refreshed after an optimizer step."""
    model = tiny_model(50, seed=0).to(torch.bfloat16)
    ids = torch.tensor([[5, 6, 7]])
    before = run_model(model, 1, input_ids=ids)
    with torch.no_grad():
        model.lm_head.weight.mul_(2)
    after = run_model(model, 1, input_ids=ids)
    assert not torch.allclose(before, after)


@pytest.fixture(scope="module")
def bf16_world():
    target, draft, trie, prompts = speculative_world(80, 3, [6, 11, 9, 14], seed=7, draft_seed=8, prompt_seed=9)
    return target.to(torch.bfloat16), draft.to(torch.bfloat16), trie, left_pad(prompts)


@pytest.mark.parametrize("k", [1, 3, 6])
def test_strict_equals_beam_search_in_bf16(bf16_world, k: int) -> None:
    target, draft, trie, (ids, mask) = bf16_world
    settings = DecodeSettings(num_beams=k, levels=3, draft_beams=max(k, 6), gamma=2)
    beam = decode("beam", target, ids, mask, trie, settings)
    spec = decode("spec_strict", target, ids, mask, trie, settings, draft=draft)
    # the two paths compute bf16 hidden states over other shapes (a tree forward vs a step), so lists may differ
    # only where two items of beam's list, or its last and the next, are within that rounding of each other
    torch.testing.assert_close(spec.scores, beam.scores, rtol=0, atol=2e-2)
    differs = (spec.sequences != beam.sequences).flatten(1).any(1)
    near_tie = (beam.scores[:, :-1] - beam.scores[:, 1:]).abs().min(1).values < 2e-2 if k > 1 else differs
    assert not (differs & ~near_tie).any() and int(differs.sum()) <= 1, differs


@pytest.mark.parametrize("k", [1, 3, 6])
def test_the_target_as_its_own_draft_is_accepted_whole_in_bf16(bf16_world, k: int) -> None:
    target, _, trie, (ids, mask) = bf16_world
    settings = DecodeSettings(num_beams=k, levels=3, draft_beams=k, gamma=3)
    out = decode("spec_strict", target, ids, mask, trie, settings, draft=target)
    assert out.stats.target_calls.tolist() == [1] * len(ids)
