"""The decoding API refuses what it would otherwise answer wrongly, without a word: prompts that are not left-padded
(the shorter prompt's list is another one) and K above the number of items (-inf filler rows that are no items)."""

from __future__ import annotations

import pytest
import torch

from atspeed.bench.host_syncs import HostSyncCounter
from atspeed.decoding.checks import check_prompts
from atspeed.decoding.decoders import DECODERS, BoundDecoder, decode
from atspeed.decoding.settings import DecodeSettings
from atspeed.errors import DataError
from atspeed.items.trie import PrefixTrie
from tests.unit.decoding_helpers import EOS, PAD, left_pad, random_identifiers, random_prompts, random_trie, tiny_model

VOCAB = 40


@pytest.fixture(scope="module")
def world():
    """A 1-layer Llama (vocabulary 40, seed 5), a random trie of 3-token identifiers, prompts of 5 and 9 tokens."""
    return (
        tiny_model(VOCAB, seed=5, hidden=32, layers=1),
        random_trie(VOCAB, 3, seed=5),
        random_prompts(VOCAB, [5, 9], 5),
    )


def right_pad(prompts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, prompts))
    input_ids = torch.tensor([p + [PAD] * (width - len(p)) for p in prompts])
    return input_ids, torch.tensor([[1] * len(p) + [0] * (width - len(p)) for p in prompts])


@pytest.mark.parametrize("name", ["beam", "spec_strict"])
def test_right_padded_prompts_are_refused_naming_the_row(world, name: str) -> None:
    """Right padding would hand row 0 (5 tokens of 9) the list of another context; left padding gives each prompt
    its list decoded alone. K = 3, N = 3, gamma = 2."""
    model, trie, prompts = world
    settings = DecodeSettings(num_beams=3, levels=3, draft_beams=3, gamma=2)
    draft = model if name == "spec_strict" else None
    with pytest.raises(ValueError, match=r"request 0 of the batch is not left-padded .*1 such rows"):
        decode(name, model, *right_pad(prompts), trie, settings, draft=draft)
    ids, mask = left_pad(prompts)
    both = decode(name, model, ids, mask, trie, settings, draft=draft)
    for row, prompt in enumerate(prompts):
        alone = decode(name, model, *left_pad([prompt]), trie, settings, draft=draft)
        assert torch.equal(both.sequences[row], alone.sequences[0])


@pytest.mark.parametrize(
    ("mask", "message"),
    [
        ([[1, 1, 1], [0, 1, 0]], "request 1 of the batch is not left-padded"),  # right padding
        ([[1, 0, 1], [0, 1, 1]], "request 0 of the batch is not left-padded"),  # a hole inside
        ([[0, 1, 1], [0, 0, 0]], "request 1 of the batch has an empty prompt"),
    ],
)
def test_check_prompts_refuses_a_0_after_a_1(mask, message: str) -> None:
    mask = torch.tensor(mask)
    with pytest.raises(ValueError, match=message):
        check_prompts(torch.ones_like(mask), mask)


def test_check_prompts_syncs_once_on_a_good_batch() -> None:
    """The hot path: one read-back of a combined condition, nothing else."""
    ids, mask = left_pad([[5, 6], [5, 6, 7, 8], [9]])
    with HostSyncCounter() as counter:
        check_prompts(ids, mask)
    assert counter.syncs == 1, counter.by_op


@pytest.mark.parametrize("name", sorted(DECODERS))
def test_more_beams_than_items_are_refused_when_bound(world, name: str) -> None:
    """6 items, K = 8: every decoder would return 2 -inf rows that are no items; the binding refuses it, from the
    trie (its exact leaves), once: the count is cached on the trie, so later calls pay no host sync for it."""
    model, _, _ = world
    trie = PrefixTrie.build(random_identifiers(VOCAB, 3, seed=0)[:6], VOCAB, eos_token_id=EOS)
    assert trie.num_items == 6 and "num_items" in vars(trie)
    settings = DecodeSettings(num_beams=8, levels=3, draft_beams=8, gamma=2)
    with pytest.raises(DataError, match=r"num_beams: K = 8 exceeds the 6 items"):
        BoundDecoder(name, model, trie, settings, draft=model)
    BoundDecoder(name, model, trie, DecodeSettings(num_beams=6, levels=3, draft_beams=8, gamma=2), draft=model)


def test_items_are_the_exact_tries_leaves_under_the_per_position_rule() -> None:
    """The per-position rule allows more sequences than there are items; K is bounded by the items."""
    identifiers = torch.tensor([[4, 5], [6, 7]])
    trie = PrefixTrie.build(identifiers, VOCAB, rule="per_position", eos_token_id=EOS)
    assert trie.num_items == 2
