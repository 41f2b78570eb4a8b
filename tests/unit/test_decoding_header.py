"""The shared prompt header: learned from the prompts, computed once per model, reused by every decoder that can."""

from __future__ import annotations

import pytest
import torch
from decoding_helpers import (
    left_pad,
    one_torch_thread,
    plain_logits,
    speculative_world,
)

from atspeed.decoding.cache import kv_cache
from atspeed.decoding.cache.header import PromptHeader
from atspeed.decoding.cache.tree_attention import prefill
from atspeed.decoding.decoders import BoundDecoder, DecodeSettings
from atspeed.decoding.search.beam import root_state, select_top
from atspeed.decoding.search.draft_tree import draft_tree
from atspeed.decoding.verification.tree_forward import first_forward as _first_forward

VOCAB, LEVELS = 50, 3
HEADER = [11, 4, 29, 8, 17, 3, 40, 22, 9, 13]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    yield from one_torch_thread()


@pytest.fixture(scope="module")
def world():
    target, draft, trie, rests = speculative_world(VOCAB, LEVELS, [4, 1, 7, 3, 9, 2], 5, 6, prompt_seed=5, items=120)
    return target, draft, trie, [HEADER + rest for rest in rests]


def test_the_header_is_the_common_prefix_of_the_prompts_seen() -> None:
    header = PromptHeader(min_tokens=4)
    header.observe(*left_pad([[*HEADER, 1, 2, 3]]))
    assert header.tokens.tolist() == [*HEADER, 1, 2] and not header.usable  # one prompt: never used
    header.observe(*left_pad([[*HEADER, 1, 5], [*HEADER, 1, 2, 7, 7]]))
    assert header.tokens.tolist() == [*HEADER, 1] and header.usable
    header.observe(*left_pad([[*HEADER[:6], 0]]))  # a prompt that disagrees shrinks it
    assert header.tokens.tolist() == HEADER[:6]
    header.observe(*left_pad([HEADER[:6]]))  # never a whole prompt: one token is left to run
    assert header.tokens.tolist() == HEADER[:5]
    header.observe(*left_pad([[1, *HEADER]]))
    assert header.tokens.numel() == 0 and not header.usable


def test_split_removes_the_header_from_left_padded_rows(world) -> None:
    _, _, _, prompts = world
    header = PromptHeader()
    input_ids, mask = left_pad(prompts)
    header.observe(input_ids, mask)
    split = header.split(input_ids, mask)
    assert split.past == len(HEADER) and split.input_ids.shape[1] == input_ids.shape[1] - len(HEADER)
    for row, prompt in enumerate(prompts):
        rest = split.input_ids[row][split.mask[row].bool()].tolist()
        assert HEADER + rest == prompt
    assert split.visible.sum(1).tolist() == [len(p) for p in prompts]


@torch.no_grad()
def test_prefill_and_the_first_call_after_a_cached_header_give_sequential_logits(world) -> None:
    target, draft, trie, prompts = world
    header = PromptHeader()
    header.observe(*left_pad(prompts))
    split = header.split(*left_pad(prompts))
    cache = split.cache(target, len(prompts))
    assert kv_cache.cache_length(cache) == len(HEADER)
    logits = prefill(target, cache, split.input_ids, split.mask, split.past)
    for row, prompt in enumerate(prompts):
        torch.testing.assert_close(logits[row], plain_logits(target, prompt)[-1], atol=1e-4, rtol=0)
    # the first speculative call: prompt rest + a drafted tree, behind the cached header
    d_cache = kv_cache.new_cache()
    root_logits = prefill(draft, d_cache, *left_pad(prompts))
    root = root_state(left_pad(prompts)[1], capacity=6, width=2)
    tree, table = draft_tree(draft, d_cache, root, trie, 3, 2, select_top, root_logits=root_logits)
    node_logits, _ = _first_forward(target, split.cache(target, len(prompts)), split, tree)
    for row, prompt in enumerate(prompts):
        for node in range(tree.num_nodes):
            level = 0 if node < 2 else 1 + (node - 2) // 3
            ref = plain_logits(target, prompt + table.sequences[row, node, :level].tolist())[-1]
            torch.testing.assert_close(node_logits[row, node], ref, atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", ["beam", "spec_strict", "beam_sample", "spec_relaxed"])
def test_decoders_with_the_shared_header_return_the_same_lists(world, name) -> None:
    """Three batches of two through one bound decoder with and without the header cache: the same identifiers,
    scores within float rounding (the sampling decoders draw the same samples from the same seed)."""
    target, draft, trie, prompts = world
    settings = DecodeSettings(3, LEVELS, 6, 2)
    shared = BoundDecoder(name, target, trie, settings, draft)
    plain = BoundDecoder(name, target, trie, settings, draft, share_header=False)
    for i in range(0, len(prompts), 2):
        batch = left_pad(prompts[i : i + 2])
        a, b = shared(*batch), plain(*batch)
        assert torch.equal(a.sequences, b.sequences), (name, i)
        torch.testing.assert_close(a.scores, b.scores, atol=1e-4, rtol=0)
    assert shared.header.tokens.tolist() == HEADER and plain.header is None
