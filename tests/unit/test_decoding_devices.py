"""The trie follows the prompts' device (a copy per device, made once), and a model whose attention implementation
cannot read the 4D tree mask is switched to sdpa before it decodes."""

from __future__ import annotations

import logging

import pytest
import torch
from decoding_helpers import ElsewhereTrie, left_pad, speculative_world

from atspeed.decoding.cache.tree_attention import check_attention
from atspeed.decoding.decoders import BoundDecoder, DecodeSettings, decode

VOCAB, LEVELS = 60, 3
SETTINGS = DecodeSettings(num_beams=3, levels=LEVELS, draft_beams=6, gamma=2)


@pytest.fixture(scope="module")
def world():
    target, draft, trie, prompts = speculative_world(VOCAB, LEVELS, [5, 7, 4], seed=0, draft_seed=1, prompt_seed=2)
    return target, draft, trie, left_pad(prompts)


@pytest.mark.parametrize("name", ["beam", "spec_strict", "spec_relaxed", "hf_beam"])
def test_a_trie_on_another_device_is_moved_to_the_prompts_once(world, name: str) -> None:
    target, draft, trie, (ids, mask) = world
    elsewhere = ElsewhereTrie.of(trie)
    bound = BoundDecoder(name, target, elsewhere, SETTINGS, draft)
    first, second = bound(ids, mask), bound(ids, mask)
    reference = decode(name, target, ids, mask, trie, SETTINGS, draft)
    assert elsewhere.moves == [torch.device("cpu")], "one copy per device, made once"
    assert torch.equal(first.sequences, reference.sequences)
    if name in ("beam", "spec_strict", "hf_beam"):  # not sampled: the second call decodes the same lists
        assert torch.equal(second.sequences, reference.sequences)
    assert first.sequences.device == ids.device


def test_decode_moves_the_trie_too(world) -> None:
    target, draft, trie, (ids, mask) = world
    out = decode("spec_strict", target, ids, mask, ElsewhereTrie.of(trie), SETTINGS, draft)
    assert torch.equal(out.sequences, decode("beam", target, ids, mask, trie, SETTINGS).sequences)


def test_flash_attention_is_switched_to_sdpa_before_decoding(world, caplog) -> None:
    target, draft, trie, (ids, mask) = world
    reference = decode("spec_strict", target, ids, mask, trie, SETTINGS, draft)
    for model in (target, draft):
        model.config._attn_implementation = "flash_attention_2"  # as a checkpoint whose config asks for it
    try:
        with caplog.at_level(logging.WARNING, logger="atspeed.decoding.cache.tree_attention"):
            out = decode("spec_strict", target, ids, mask, trie, SETTINGS, draft)
        assert target.config._attn_implementation == draft.config._attn_implementation == "sdpa"
        assert target.model.layers[0].self_attn.config._attn_implementation == "sdpa"
        assert [r.getMessage() for r in caplog.records] == [
            "attention implementation flash_attention_2 cannot read the 4D tree mask: switched to sdpa"
        ] * 2
        assert torch.equal(out.sequences, reference.sequences)
    finally:
        for model in (target, draft):
            model.set_attn_implementation("sdpa")


@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
def test_implementations_that_read_the_mask_are_kept(world, implementation: str) -> None:
    target = world[0]
    target.set_attn_implementation(implementation)
    try:
        check_attention(target)
        assert target.config._attn_implementation == implementation
    finally:
        target.set_attn_implementation("sdpa")


def test_a_model_that_cannot_switch_is_refused_in_one_line(world, monkeypatch) -> None:
    target = world[0]
    monkeypatch.setattr(target.config, "_attn_implementation", "flash_attention_2")

    def refuse(name: str) -> None:
        raise ValueError("no sdpa here")

    monkeypatch.setattr(target, "set_attn_implementation", refuse)
    with pytest.raises(ValueError, match="'flash_attention_2' cannot read atspeed's 4D tree mask") as err:
        check_attention(target)
    assert "\n" not in str(err.value)
