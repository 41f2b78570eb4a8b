"""Strict verification's branches forced with bigram stub models (fixed logits per input token).

The stub target prefers, after each token, one child over the others with clear gaps (``TARGET_ROWS``), so its K = 2
beams are known by hand: after prompt A (ends in 3) level 1 keeps 4 and 5, level 2 keeps (4, 7) and (5, 8).
A draft equal to the target drafts exactly the target's choices; reversing the draft's preferences after one
token makes it miss a target choice at a chosen depth.
"""

from __future__ import annotations

import pytest
import torch
from decoding_helpers import (
    STUB_PROMPT_A,
    STUB_PROMPT_B,
    STUB_VOCAB,
    TARGET_ROWS,
    BigramStub,
    check_spec_stats,
    left_pad,
    one_torch_thread,
    reversed_row,
    stub_table,
    stub_trie,
)

from atspeed.decoding.cache import kv_cache
from atspeed.decoding.decoders import DecodeSettings, decode
from atspeed.decoding.search.draft_tree import TokenTree
from atspeed.decoding.verification import strict
from atspeed.decoding.verification.verify import LevelInput

K = N = 2
PROMPTS = [[17, STUB_PROMPT_A], [STUB_PROMPT_B]]  # row 0 goes through tokens 4 and 7; row 1 through 6 and 9


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    yield from one_torch_thread()


def run(draft_rows: dict[int, dict[int, float]], levels: int, gamma: int) -> tuple[list[list[int]], torch.Tensor]:
    """spec_strict on the two prompts with a stub target and a stub draft; checks it equals the target's beam
    search and that the counters replay; returns the accepted depths per list and the sequences."""
    target, draft = BigramStub(stub_table(TARGET_ROWS)), BigramStub(stub_table(draft_rows))
    trie = stub_trie(levels)
    input_ids, mask = left_pad(PROMPTS)
    settings = DecodeSettings(num_beams=K, levels=levels, draft_beams=N, gamma=gamma)
    out = decode("spec_strict", target, input_ids, mask, trie, settings, draft=draft)
    ref = decode("beam", target, input_ids, mask, trie, settings)
    assert torch.equal(out.sequences, ref.sequences)
    torch.testing.assert_close(out.scores, ref.scores, atol=1e-5, rtol=0)
    return check_spec_stats(out.stats, 2, levels, gamma), out.sequences


def test_the_stub_honours_the_cache_protocol() -> None:
    """Each forward appends q positions to the cache; logits depend on the input token only; logits_to_keep works."""
    stub = BigramStub(stub_table(TARGET_ROWS))
    cache = kv_cache.new_cache()
    out = stub(input_ids=torch.tensor([[3, 4, 5], [16, 6, 9]]), past_key_values=cache, use_cache=True)
    assert out.logits.shape == (2, 3, STUB_VOCAB) and kv_cache.cache_length(cache) == 3
    assert torch.equal(out.logits[1, 0], stub_table(TARGET_ROWS)[16])
    out = stub(input_ids=torch.tensor([[7, 8], [9, 10]]), past_key_values=cache, logits_to_keep=1)
    assert out.logits.shape == (2, 1, STUB_VOCAB) and kv_cache.cache_length(cache) == 5


def test_the_stub_targets_beams_are_the_hand_computed_ones() -> None:
    """The premise of the forced cases below: the target's top-2 lists of 3-token identifiers."""
    _, sequences = run(TARGET_ROWS, levels=3, gamma=1)
    assert sequences.tolist() == [[[4, 7, 10], [5, 8, 11]], [[6, 9, 12], [5, 8, 11]]]


@pytest.mark.parametrize(
    ("levels", "gamma", "expected", "path"),
    [
        (3, 1, [1, 1], "bonus, then complete"),  # one drafted level per call, the target's bonus step adds one
        (3, 2, [2], "bonus"),
        (3, 3, [3], "complete"),  # the accepted drafted nodes already are complete identifiers: no bonus
        (3, 4, [3], "complete"),  # gamma is cut to the levels left
        (4, 1, [1, 1], "bonus, bonus"),
        (4, 2, [2, 1], "bonus, then complete"),
        (4, 3, [3], "bonus"),
    ],
)
def test_a_draft_equal_to_the_target_gets_every_drafted_level_accepted(levels, gamma, expected, path) -> None:
    """Same table for draft and target: every call accepts all min(gamma, levels left) drafted levels; the first
    call drafts from the root, so gamma >= L costs one target call."""
    per_list, _ = run(TARGET_ROWS, levels, gamma)
    assert per_list == [expected, expected], path


@pytest.mark.parametrize(
    ("levels", "gamma", "row0"),
    [(3, 1, [0, 1]), (3, 2, [0, 2]), (4, 2, [0, 2]), (4, 3, [0, 3])],
)
def test_a_draft_missing_a_target_choice_at_the_first_drafted_level_accepts_nothing(levels, gamma, row0) -> None:
    """The draft reverses its preferences after prompt A's last token only: at level 1 it drafts 6 and 5 where the
    target wants 4 and 5: row 0's first call accepts depth 0 (correction = the target's level 1), and the next call
    goes on from the target's beams; row 1 never passes through that token and accepts everything."""
    per_list, _ = run({**TARGET_ROWS, STUB_PROMPT_A: reversed_row(TARGET_ROWS[STUB_PROMPT_A])}, levels, gamma)
    assert per_list[0] == row0
    assert per_list[1] == run(TARGET_ROWS, levels, gamma)[0][1]


@pytest.mark.parametrize(("levels", "gamma", "row0"), [(3, 2, [1, 1]), (3, 3, [1, 1]), (4, 2, [1, 2]), (4, 3, [1, 2])])
def test_a_draft_missing_a_target_choice_at_the_second_drafted_level_accepts_depth_one(levels, gamma, row0) -> None:
    """The draft reverses its preferences after token 4 only: level 1 is accepted, at level 2 the draft has (4, 9)
    and (5, 8) where the target wants (4, 7): accepted depth exactly 1 at the first call."""
    per_list, _ = run({**TARGET_ROWS, 4: reversed_row(TARGET_ROWS[4])}, levels, gamma)
    assert per_list[0] == row0
    assert per_list[1] == run(TARGET_ROWS, levels, gamma)[0][1]


@pytest.mark.parametrize(("levels", "gamma", "row0"), [(3, 3, [2]), (4, 3, [2, 1])])
def test_a_draft_missing_a_target_choice_at_the_third_drafted_level_accepts_depth_two(levels, gamma, row0) -> None:
    """The draft reverses its preferences after token 7 only: levels 1 and 2 are accepted, at level 3 the draft has
    (4, 7, 12) where the target wants (4, 7, 10): accepted depth exactly 2; the correction completes L = 3."""
    per_list, _ = run({**TARGET_ROWS, 7: reversed_row(TARGET_ROWS[7])}, levels, gamma)
    assert per_list[0] == row0
    assert per_list[1] == run(TARGET_ROWS, levels, gamma)[0][1]


def _level_input(cand: torch.Tensor, drafted: list[tuple[int, int]], can_match: bool = True) -> LevelInput:
    """Level 1 of a one-level tree over K = 2 roots, with drafted (parent, token) nodes."""
    parents = torch.tensor([[[p for p, _ in drafted]]])
    tokens = torch.tensor([[[t for _, t in drafted]]])
    tree = TokenTree(2, parents, tokens, torch.zeros(parents.shape), (torch.zeros(1, 2, cand.shape[1] // 2),))
    return LevelInput(cand, torch.tensor([[0, 1]]), 1, torch.tensor([can_match]), tree, None)


def test_strict_verify_level_accepts_exactly_when_the_targets_top_k_are_drafted() -> None:
    """Hand-built level: the target's top-2 are (1, 3) then (0, 2). Drafted in any order among others: accepted,
    continuing from the matching node ids; one of them missing: rejected, with the target's top-2 as the stop
    beams; no drafted level (bonus step): never accepted, same stop beams."""
    v = 5
    cand = torch.full((1, 2 * v), float("-inf"))
    cand[0, 0 * v + 2] = -0.5
    cand[0, 1 * v + 3] = -0.25
    cand[0, 0 * v + 4] = -3.0
    accepted = strict.verify_level(_level_input(cand, [(0, 4), (0, 2), (1, 3)]))
    assert accepted.ok.tolist() == [True]
    assert accepted.next_nodes.tolist() == [[2 + 2, 2 + 1]]  # node ids: K + index among the drafted
    assert accepted.next_scores.tolist() == [[-0.25, -0.5]]
    for drafted, can_match in [([(0, 4), (1, 3), (1, 2)], True), ([(0, 2), (1, 3), (0, 4)], False)]:
        rejected = strict.verify_level(_level_input(cand, drafted, can_match))
        assert rejected.ok.tolist() == [False]
        assert rejected.stop_parents.tolist() == [[1, 0]]
        assert rejected.stop_tokens.tolist() == [[3, 2]]
        assert rejected.stop_scores.tolist() == [[-0.25, -0.5]]
