"""The constrained beam step and atspeed's beam search against Hugging Face ``generate`` (the oracle)."""

from __future__ import annotations

import math

import pytest
import torch
from decoding_helpers import (
    OTHER_FAMILIES,
    PAD,
    left_pad,
    one_torch_thread,
    random_prompts,
    random_trie,
    tiny_model,
    true_scores,
)
from transformers import PreTrainedModel

from atspeed.decoding.search import beam
from atspeed.decoding.search.beam import candidates, ordered_keys, select_sample, select_top
from atspeed.decoding.search.beam_search import beam_search
from atspeed.decoding.search.hf_generate import hf_generate
from atspeed.items.trie import PrefixTrie

VOCAB = 60
NINF = float("-inf")
# (model seed, identifier levels): two unrelated Llama worlds; every other family gets the first one's
WORLDS = [(0, 3), (1, 4)]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    yield from one_torch_thread()


@pytest.fixture(scope="module")
def worlds() -> dict[int | str, tuple[PreTrainedModel, PrefixTrie, list[list[int]]]]:
    """Llama worlds by seed, and each other family's world (seed 0) by the family's name."""
    out = {}
    specs = [(seed, seed, levels, "llama") for seed, levels in WORLDS]
    specs += [(family, *WORLDS[0], family) for family in OTHER_FAMILIES]
    for key, seed, levels, family in specs:
        trie = random_trie(VOCAB, levels, seed=seed)
        assert len(trie.allowed_tokens([])) >= 20  # K = 20 must be a real choice at the first level
        model = tiny_model(VOCAB, seed=seed, family=family)
        out[key] = (model, trie, random_prompts(VOCAB, [6, 2, 9], seed=seed + 50))
    return out


@pytest.mark.parametrize("seed", [s for s, _ in WORLDS])
@pytest.mark.parametrize("k", [1, 3, 5, 10, 20])
@torch.no_grad()
def test_beam_search_equals_hf_generate(worlds, seed: int, k: int) -> None:
    """Left-padded batch of 3 prompts of different lengths: same sequences in the same order, scores within 1e-4,
    all of them valid identifiers with finite scores."""
    check_equals_hf_generate(worlds[seed], k)


@pytest.mark.parametrize("family", OTHER_FAMILIES)
@pytest.mark.parametrize("k", [1, 5, 20])
@torch.no_grad()
def test_beam_search_equals_hf_generate_in_every_family(worlds, family: str, k: int) -> None:
    """The same oracle on a model of each other family (Qwen2: biased q/k/v projections)."""
    check_equals_hf_generate(worlds[family], k)


def check_equals_hf_generate(world: tuple[PreTrainedModel, PrefixTrie, list[list[int]]], k: int) -> None:
    model, trie, prompts = world
    input_ids, mask = left_pad(prompts)
    ours = beam_search(model, input_ids, mask, trie, k, trie.levels)
    oracle = hf_generate(model, input_ids, mask, trie, k, trie.levels, PAD)
    assert ours.sequences.shape == (3, k, trie.levels)
    assert torch.isfinite(ours.scores).all()
    assert (trie.lookup(ours.sequences.reshape(-1, trie.levels)) >= 0).all()
    assert torch.equal(ours.sequences, oracle.sequences)
    torch.testing.assert_close(ours.scores, oracle.scores, atol=1e-4, rtol=0)
    assert ours.stats.target_calls.tolist() == [trie.levels] * 3
    assert ours.stats.accepted.numel() == 0


@pytest.mark.parametrize(("world", "k"), [(1, 1), (1, 5), *((family, 5) for family in OTHER_FAMILIES)])
@torch.no_grad()
def test_beam_search_scores_are_true_cumulative_log_probabilities(worlds, world, k: int) -> None:
    """Every returned score equals the plain (uncached, unpadded) sum of the sequence's token log-probabilities,
    and lists come best first with K distinct identifiers."""
    model, trie, prompts = worlds[world]
    input_ids, mask = left_pad(prompts)
    out = beam_search(model, input_ids, mask, trie, k, trie.levels)
    for row, prompt in enumerate(prompts):
        torch.testing.assert_close(out.scores[row], true_scores(model, prompt, out.sequences[row]), atol=1e-4, rtol=0)
        assert torch.unique(out.sequences[row], dim=0).shape[0] == k
        assert (out.scores[row, :-1] >= out.scores[row, 1:]).all()


@torch.no_grad()
def test_batch_equals_single_prompts(worlds) -> None:
    """A left-padded batch returns what each prompt returns alone."""
    model, trie, prompts = worlds[0]
    input_ids, mask = left_pad(prompts)
    batch = beam_search(model, input_ids, mask, trie, 5, trie.levels)
    for row, prompt in enumerate(prompts):
        ids, m = left_pad([prompt])
        single = beam_search(model, ids, m, trie, 5, trie.levels)
        assert torch.equal(batch.sequences[row], single.sequences[0])
        torch.testing.assert_close(batch.scores[row], single.scores[0], atol=1e-5, rtol=0)


def test_select_top_orders_by_score_and_splits_index_into_parent_and_token() -> None:
    """Scores descending; parents = flat index // V, tokens = flat index % V, per row."""
    vocab = 5
    cand = torch.tensor(
        [
            [NINF, -1.0, NINF, -3.0, NINF, -0.5, NINF, NINF, -2.0, NINF],
            [-4.0, NINF, NINF, NINF, NINF, NINF, NINF, -0.125, NINF, -0.25],
        ]
    )
    parents, tokens, scores = select_top(cand, 3, vocab)
    assert scores.tolist() == [[-0.5, -1.0, -2.0], [-0.125, -0.25, -4.0]]
    assert parents.tolist() == [[1, 0, 1], [1, 1, 0]]
    assert tokens.tolist() == [[0, 1, 3], [2, 4, 0]]
    torch.testing.assert_close(cand.gather(1, parents * vocab + tokens), scores)


def test_select_top_breaks_ties_by_the_lower_index() -> None:
    """Exact ties straddling the cut: the chosen candidates are the k largest values, equal ones by (beam, token)."""
    cand = torch.tensor([[-1.0, -2.0, -1.0, -2.0, -2.0, -5.0]])
    parents, tokens, scores = select_top(cand, 3, 3)
    assert (parents * 3 + tokens).tolist() == [[0, 2, 1]]
    assert scores.tolist() == [[-1.0, -1.0, -2.0]]


@pytest.mark.parametrize("seed", range(5))
def test_select_top_is_a_stable_descending_sort_on_bf16_rounded_scores(seed: int) -> None:
    """bf16-like scores (many exact ties, -inf, -0.0 and +0.0): the first k of a stable descending sort."""
    gen = torch.Generator().manual_seed(seed)
    cand = (torch.randn(4, 300, generator=gen) * 8).bfloat16().float()
    cand[:, ::7] = float("-inf")
    cand[:, 3], cand[:, 5] = -0.0, 0.0
    parents, tokens, scores = select_top(cand, 25, 30)
    order = torch.sort(cand, dim=1, descending=True, stable=True).indices[:, :25]
    assert torch.equal(parents * 30 + tokens, order)
    assert torch.equal(scores, cand.gather(1, order))


@pytest.mark.parametrize("seed", range(3))
def test_ordered_keys_sort_like_a_stable_sort_over_every_float32_magnitude(seed: int) -> None:
    """Both key forms (float64 steps; integer bits) order neighbouring float32 values (one step apart, either
    sign, subnormal to huge), exact ties, zeros of both signs and -inf like a stable descending sort, over the
    whole row."""
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(2, 400, generator=gen) * torch.logspace(-44, 38, 400).float()
    neighbours = torch.nextafter(base, torch.full_like(base, float("inf")))
    cand = torch.cat([base, neighbours, base[:, :50], -base[:, ::3]], dim=1)  # steps, ties, both signs
    cand[:, ::11] = float("-inf")
    cand[:, 7], cand[:, 9], cand[:, 13] = -0.0, 0.0, 1e-45
    cand = cand[:, torch.randperm(cand.shape[1], generator=gen)]
    order = torch.sort(cand, dim=1, descending=True, stable=True).indices
    for keys in (ordered_keys(cand), beam._ordered_bits(cand)):
        assert torch.equal(torch.sort(keys, dim=1, descending=True).indices, order)


def test_candidates_are_log_softmax_plus_score_where_the_trie_allows() -> None:
    """candidates() = log_softmax(logits) + beam score on allowed tokens, -inf on forbidden ones, beam-major;
    no renormalisation after masking."""
    identifiers = torch.tensor([[3, 4], [3, 5], [6, 4]])
    vocab = 8
    trie = PrefixTrie.build(identifiers, vocab, eos_token_id=2)
    logits = torch.randn(2, 3, vocab)
    scores = torch.tensor([[0.0, -1.5, -0.25], [-2.0, 0.0, -1.0]])
    states = trie.states_for(torch.tensor([[3], [6], [3], [6], [3], [6]])).view(2, 3)
    states[1, 0] = 0  # root: tokens 3 and 6
    states[1, 2] = -1  # dead beam: nothing allowed
    cand = candidates(logits, scores, states, trie).view(2, 3, vocab)
    expected = torch.log_softmax(logits, dim=-1) + scores[..., None]
    allowed = {(0, 0): {4, 5}, (0, 1): {4}, (0, 2): {4, 5}, (1, 0): {3, 6}, (1, 1): {4, 5}, (1, 2): set()}
    for (b, w), tokens in allowed.items():
        for t in range(vocab):
            if t in tokens:
                torch.testing.assert_close(cand[b, w, t], expected[b, w, t])
            else:
                assert cand[b, w, t] == NINF, (b, w, t)


def test_select_sample_is_reproducible_under_a_seeded_generator() -> None:
    """The same generator seed gives the same draws; another seed gives other draws somewhere."""
    cand = torch.randn(4, 30)

    def draw(seed: int) -> tuple[torch.Tensor, ...]:
        return select_sample(cand, 6, 10, torch.Generator().manual_seed(seed))

    first, again = draw(7), draw(7)
    for a, b in zip(first, again, strict=True):
        assert torch.equal(a, b)
    assert any(not torch.equal(draw(7)[1], draw(s)[1]) for s in range(8, 12))


def test_select_sample_draws_distinct_finite_candidates_with_their_scores() -> None:
    """Without replacement: k distinct candidates per row; never a -inf one while enough finite ones exist;
    the returned scores are the candidates' own cumulative scores."""
    vocab = 7
    gen = torch.Generator().manual_seed(0)
    for _ in range(200):
        cand = torch.randn(3, 4 * vocab, generator=gen)
        cand[torch.rand(cand.shape, generator=gen) < 0.8] = NINF
        cand[:, :5] = torch.randn(3, 5, generator=gen)  # at least 5 finite per row
        parents, tokens, scores = select_sample(cand, 5, vocab, gen)
        index = parents * vocab + tokens
        for row in range(3):
            assert len(set(index[row].tolist())) == 5
        assert torch.isfinite(scores).all()
        assert torch.equal(scores, cand.gather(1, index))
        assert ((tokens >= 0) & (tokens < vocab) & (parents >= 0) & (parents < 4)).all()


def test_select_sample_first_pick_follows_the_softmax() -> None:
    """The first of k draws (Gumbel top-k) is distributed as softmax(cand): 4000 draws, chi-square test."""
    cand = torch.tensor([[0.0, -0.5, -1.0, -2.0, NINF, -1.5]]).log_softmax(1)  # 2 beams of V = 3
    expected = cand.exp()[0]
    draws = 4000
    gen = torch.Generator().manual_seed(123)
    rows = cand.expand(draws, 6)
    parents, tokens, _ = select_sample(rows, 3, 3, gen)
    first = parents[:, 0] * 3 + tokens[:, 0]
    counts = torch.bincount(first, minlength=6).double()
    assert counts[4] == 0
    keep = expected > 0
    chi2 = float((((counts - draws * expected) ** 2) / (draws * expected))[keep].sum())
    # 4 degrees of freedom: P(chi2 > 20) ~ 5e-4 under the null; a biased sampler is far above
    assert chi2 < 20.0, (counts.tolist(), (draws * expected).tolist())
    # the law of the whole draw: P(first two = (a, b)) = p_a * p_b / (1 - p_a)
    second = parents[:, 1] * 3 + tokens[:, 1]
    pair = float(((first == 0) & (second == 1)).double().mean())
    p = expected.double()
    assert math.isclose(pair, float(p[0] * p[1] / (1 - p[0])), abs_tol=0.03)
