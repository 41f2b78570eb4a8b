"""Top-K coverage along the target's beam search (``lockstep_coverage``) and the set coverage it uses.

The hand-checked case uses the bigram stubs of ``decoding_helpers``: after prompt A the target's K = 2 beams are
4, 5 at depth 1 and (4, 7), (5, 8) at depth 2; after prompt B they are 6, 5 and (6, 9), (5, 8).
"""

from __future__ import annotations

import pytest
import torch
from decoding_helpers import (
    STUB_PROMPT_A,
    STUB_PROMPT_B,
    TARGET_ROWS,
    BigramStub,
    left_pad,
    one_torch_thread,
    random_prompts,
    random_trie,
    stub_table,
    stub_trie,
    tiny_model,
)

from atspeed.decoding.decoders import DecodeSettings, decode
from atspeed.decoding.search.beam_search import lockstep_coverage
from atspeed.metrics.coverage import coverage

VOCAB = 60


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    yield from one_torch_thread()


def as_sets(prefixes: torch.Tensor) -> list[set[tuple[int, ...]]]:
    """Per request, the set of valid tuples (no negative token) of ``prefixes`` [B, W, d]."""
    return [{tuple(p) for p in row if min(p) >= 0} for row in prefixes.tolist()]


def per_depth(target, draft, prompts, trie, k: int, n: int, levels: int) -> list[list[float]]:
    input_ids, mask = left_pad(prompts)
    with torch.inference_mode():
        return [c.tolist() for c in lockstep_coverage(target, draft, input_ids, mask, trie, k, n, levels)]


@pytest.mark.parametrize(("seed", "levels", "k", "n"), [(0, 3, 5, 5), (1, 4, 4, 12)])
def test_a_draft_equal_to_the_target_covers_everything(seed: int, levels: int, k: int, n: int) -> None:
    model, trie = tiny_model(VOCAB, seed=seed), random_trie(VOCAB, levels, seed=seed)
    prompts = random_prompts(VOCAB, [6, 2, 9], seed=seed + 50)
    assert per_depth(model, model, prompts, trie, k, n, levels) == [[1.0] * 3] * levels


def test_coverage_by_hand_on_bigram_stubs() -> None:
    """Target K = 2, draft N = 3; the draft differs from the target after token 5 only (it prefers 9, then 7, 8).

    Depth 1: the draft is the target after both prompts: coverage 1. Depth 2: both extend the target's beams with
    the target's scores; after prompt A (beams 4, 5) the draft's top 3 are (4, 7), (5, 9) and one of (4, 8), (5, 7),
    all better than (5, 8) by at least 2: the target's (5, 8) is missed, coverage 1/2. After prompt B (beams 6, 5)
    the draft's top 3 are (6, 9), (6, 7), (5, 9): again (5, 8) is missed.
    """
    draft_rows = {**TARGET_ROWS, 5: {9: 0.0, 7: -1.0, 8: -3.0}}
    target, draft = BigramStub(stub_table(TARGET_ROWS)), BigramStub(stub_table(draft_rows))
    got = per_depth(target, draft, [[17, STUB_PROMPT_A], [STUB_PROMPT_B]], stub_trie(2), 2, 3, 2)
    assert got == [[1.0, 1.0], [0.5, 0.5]]
    wider = per_depth(target, draft, [[17, STUB_PROMPT_A], [STUB_PROMPT_B]], stub_trie(2), 2, 5, 2)
    assert wider == [[1.0, 1.0], [1.0, 0.5]]  # N = 5 keeps (5, 8) after A (4th), not after B (6th of 6)


def test_coverage_per_depth_predicts_strict_acceptance() -> None:
    """L = 3, gamma = 2. A draft equal to the target covers every depth and strict decoding accepts both drafted
    depths in its one verification; the stub draft of the hand case misses a depth-2 pair (coverage 1/2 there, 1
    elsewhere) and strict decoding accepts depth 1 and rejects depth 2 in its first call, then, after the correction,
    accepts depth 3."""
    trie = stub_trie(3)
    target = BigramStub(stub_table(TARGET_ROWS))
    drafts = {"same": BigramStub(stub_table(TARGET_ROWS)),
              "off": BigramStub(stub_table({**TARGET_ROWS, 5: {9: 0.0, 7: -1.0, 8: -3.0}}))}  # fmt: skip
    expected = {"same": ([[1.0], [1.0], [1.0]], [2]), "off": ([[1.0], [0.5], [1.0]], [1, 1])}
    input_ids, mask = left_pad([[STUB_PROMPT_A]])
    for name, draft in drafts.items():
        covered = per_depth(target, draft, [[STUB_PROMPT_A]], trie, 2, 3, 3)
        with torch.inference_mode():
            out = decode("spec_strict", target, input_ids, mask, trie, DecodeSettings(2, 3, 3, 2), draft)
        assert (covered, out.stats.accepted.tolist()) == expected[name], name


def brute_force(target: torch.Tensor, draft: torch.Tensor) -> list[float]:
    out = []
    for t, q in zip(as_sets(target), as_sets(draft), strict=True):
        out.append(len(t & q) / len(t) if t else 0.0)
    return out


def distinct_prefixes(b: int, width: int, d: int, tokens: int, gen: torch.Generator) -> torch.Tensor:
    """[b, width, d] distinct prefixes per row over ``tokens`` symbols, about a quarter of them dead (one -1)."""
    codes = torch.stack([torch.randperm(tokens**d, generator=gen)[:width] for _ in range(b)])  # [b, width]
    digits = tokens ** torch.arange(d - 1, -1, -1)
    prefixes = codes[..., None] // digits % tokens
    dead = torch.rand(b, width, generator=gen) < 0.25
    column = torch.randint(d, (b, width, 1), generator=gen)
    return torch.where(dead[..., None], prefixes.scatter(2, column, -1), prefixes)


def test_coverage_equals_python_sets_on_random_prefixes() -> None:
    """Vectorised coverage equals the Python-set computation, over small alphabets (many collisions)."""
    gen = torch.Generator().manual_seed(0)
    for trial in range(300):
        b, d, tokens = 1 + trial % 4, 1 + trial % 3, 2 + trial % 3
        room = tokens**d
        k = int(torch.randint(1, room + 1, (), generator=gen))
        n = int(torch.randint(1, room + 1, (), generator=gen))
        target, draft = distinct_prefixes(b, k, d, tokens, gen), distinct_prefixes(b, n, d, tokens, gen)
        got = coverage(target, draft)
        assert got.shape == (b,) and ((got >= 0) & (got <= 1)).all()
        assert got.tolist() == pytest.approx(brute_force(target, draft), abs=1e-6), trial


def test_coverage_rejects_mismatched_sets() -> None:
    with pytest.raises(ValueError, match="share batch and length"):
        coverage(torch.zeros(2, 3, 2, dtype=torch.long), torch.zeros(2, 3, 1, dtype=torch.long))
