"""Keyed stochastic beam search (``beam_sample_keyed``) and speculative decoding on the same noise (``spec_keyed``).

1. Exact by construction: ``spec_keyed`` returns ``beam_sample_keyed``'s lists (same sequences, scores within 1e-4)
   for K = 1, 3, 5, 10, 20, three (N, gamma) shapes, budgets None, 0, 2 and auto, batches of 1 and 3 (left padded),
   with a weak draft; with the target as its own draft every level is accepted (one target call per list).
2. Keys: the same seed gives the same lists, another seed others; a list does not depend on how the requests are
   batched (they are numbered in order); the K-list lies inside the K'-list for K < K' (a node gets the same key in
   every search that reaches it).
3. Shared noise is what makes a good draft accepted: with the draft's noise keyed apart from the target's, the lists
   stay exact but the target drafting for itself accepts far less.
4. K = 1 chi-square (10 seeds x 2,000 requests) against the enumerated trie-constrained distribution; it rejects
   exponential instead of Gumbel noise and keys blind to the request. (At K = 1 the truncation cannot matter: it
   keeps the order of a beam's children.)
5. K = 3 inclusion probabilities on a 12-item trie against the exact ones of sampling 3 items without replacement
   (brute force over ordered triples); it rejects the search without the truncation (ranking by phi + g at each
   depth: max |z| 19 and 28 measured on two models, 1.6 and 2.0 for the truncated one) and ``beam_sample``.
"""

from __future__ import annotations

import dataclasses
import itertools

import pytest
import torch
from decoding_helpers import (
    EOS,
    chi_square_p,
    exact_distribution,
    left_pad,
    one_torch_thread,
    random_prompts,
    random_trie,
    sampling_world,
    tiny_model,
)

from atspeed.decoding.decoders import BoundDecoder, DecodeSettings, decode
from atspeed.decoding.output import DecodeOutput
from atspeed.decoding.search import keyed
from atspeed.items.trie import PrefixTrie

VOCAB, LEVELS = 60, 3
KS = [1, 3, 5, 10, 20]
BUDGETS = [None, 0, 2, "auto"]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    yield from one_torch_thread()


@pytest.fixture(scope="module")
def world() -> dict:
    prompts = random_prompts(VOCAB, [6, 2, 9], seed=50)
    return {
        "target": tiny_model(VOCAB, seed=0),
        "other": tiny_model(VOCAB, seed=100, hidden=16, layers=1),
        "trie": random_trie(VOCAB, LEVELS, seed=0),
        "prompts": prompts,
        "batch": left_pad(prompts),
    }


def assert_same_lists(got: DecodeOutput, ref: DecodeOutput) -> None:
    assert torch.equal(got.sequences, ref.sequences)
    torch.testing.assert_close(got.scores, ref.scores, atol=1e-4, rtol=0)


def _shape(k: int, index: int) -> tuple[int, int]:
    return [(k, 1), (2 * k, 2), (2 * k + 3, 3)][index % 3]


@pytest.mark.parametrize("budget", BUDGETS, ids=str)
@pytest.mark.parametrize("k", KS)
def test_spec_keyed_returns_the_keyed_samplers_lists(world, k, budget) -> None:
    n, gamma = _shape(k, KS.index(k) + BUDGETS.index(budget))
    settings = DecodeSettings(k, LEVELS, draft_beams=n, gamma=gamma, seed=7, budget=budget)
    for ids, mask in (world["batch"], left_pad(world["prompts"][1:2])):
        ref = decode("beam_sample_keyed", world["target"], ids, mask, world["trie"], settings)
        assert torch.isfinite(ref.scores).all()
        assert all(len({tuple(s) for s in row.tolist()}) == k for row in ref.sequences)  # k distinct items
        out = decode("spec_keyed", world["target"], ids, mask, world["trie"], settings, draft=world["other"])
        assert_same_lists(out, ref)


@pytest.mark.parametrize("k", KS)
def test_the_target_drafting_for_itself_is_accepted_at_every_level(world, k) -> None:
    settings = DecodeSettings(k, LEVELS, draft_beams=k, gamma=LEVELS, seed=3)
    ids, mask = world["batch"]
    ref = decode("beam_sample_keyed", world["target"], ids, mask, world["trie"], settings)
    out = decode("spec_keyed", world["target"], ids, mask, world["trie"], settings, draft=world["target"])
    assert_same_lists(out, ref)
    assert out.stats.target_calls.tolist() == [1, 1, 1]
    assert out.stats.accepted.tolist() == [LEVELS] * 3


def test_lists_follow_the_seed_and_not_the_batching(world) -> None:
    ids, mask = world["batch"]
    target, trie = world["target"], world["trie"]
    runs = [decode("beam_sample_keyed", target, ids, mask, trie, DecodeSettings(5, LEVELS, seed=s)) for s in (0, 0, 1)]
    assert torch.equal(runs[0].sequences, runs[1].sequences)
    assert not torch.equal(runs[0].sequences, runs[2].sequences)
    for name in ("beam_sample_keyed", "spec_keyed"):
        settings = DecodeSettings(5, LEVELS, draft_beams=8, gamma=2, seed=0)
        single = BoundDecoder(name, target, trie, settings, draft=world["other"])
        lists = [single(*left_pad([prompt])).sequences[0] for prompt in world["prompts"]]
        assert torch.equal(torch.stack(lists), runs[0].sequences), name


def test_a_shorter_list_lies_inside_a_longer_one(world) -> None:
    """The K largest keys are among the K' largest: the K-list is a subset of the K'-list (same seed)."""
    ids, mask = world["batch"]
    sets = {}
    for k in (1, 3, 10):
        out = decode("beam_sample_keyed", world["target"], ids, mask, world["trie"], DecodeSettings(k, LEVELS, seed=4))
        sets[k] = [{tuple(s) for s in row.tolist()} for row in out.sequences]
    for row in range(3):
        assert sets[1][row] <= sets[3][row] <= sets[10][row]


def test_unshared_noise_keeps_the_lists_but_loses_acceptance(world, monkeypatch) -> None:
    """The draft's keys moved off the target's (its own noise): the verification still returns the target's keyed
    lists, but the target drafting for itself, accepted at every level with shared noise, now accepts far less."""
    k, ids, mask = 5, *world["batch"]
    settings = DecodeSettings(k, LEVELS, draft_beams=k, gamma=LEVELS, seed=3)
    ref = decode("beam_sample_keyed", world["target"], ids, mask, world["trie"], settings)
    shared = keyed.beam_grid

    def unshared(logits, state, trie):
        return shared(logits, dataclasses.replace(state, noise_keys=state.noise_keys ^ 0x5DEECE66D), trie)

    monkeypatch.setattr(keyed, "beam_grid", unshared)
    out = decode("spec_keyed", world["target"], ids, mask, world["trie"], settings, draft=world["target"])
    assert_same_lists(out, ref)
    assert out.stats.accepted.float().mean() < 1.0, out.stats.accepted.tolist()


# ----- the keyed sampler's distribution

SAMPLE_VOCAB, PROMPT = 40, [5, 9, 11, 7]
SEEDS, REQUESTS = 10, 2_000


def _item_index(sequences: torch.Tensor, identifiers: torch.Tensor) -> torch.Tensor:
    """The item of every identifier in ``sequences`` [..., L] (its row in ``identifiers`` [I, L])."""
    flat = sequences.reshape(-1, 1, identifiers.shape[1])
    return (flat == identifiers[None]).all(2).float().argmax(1)


def _counts(name: str, model, identifiers: torch.Tensor, trie: PrefixTrie, k: int, seeds: int = SEEDS) -> torch.Tensor:
    """How often each item appears in ``seeds`` x REQUESTS lists of ``name`` for PROMPT."""
    ids, mask = left_pad([PROMPT] * REQUESTS)
    counts = torch.zeros(len(identifiers), dtype=torch.float64)
    for seed in range(seeds):
        out = decode(name, model, ids, mask, trie, DecodeSettings(k, identifiers.shape[1], seed=seed))
        counts += torch.bincount(_item_index(out.sequences, identifiers), minlength=len(identifiers)).double()
    return counts


def test_at_k1_the_keyed_sampler_draws_items_with_the_targets_probabilities(monkeypatch) -> None:
    model, identifiers, trie = sampling_world(SAMPLE_VOCAB, 3, 30, seed=3)
    p = exact_distribution(model, PROMPT, identifiers, trie).double()
    expected = SEEDS * REQUESTS * p
    assert chi_square_p(_counts("beam_sample_keyed", model, identifiers, trie, 1), expected) > 1e-3

    gumbel = keyed.keyed_gumbel
    monkeypatch.setattr(keyed, "keyed_gumbel", lambda *args: torch.exp(-gumbel(*args)))  # Exponential(1) noise
    assert chi_square_p(_counts("beam_sample_keyed", model, identifiers, trie, 1), expected) < 1e-9
    monkeypatch.undo()
    blind = keyed.request_keys
    monkeypatch.setattr(keyed, "request_keys", lambda seed, ids: blind(seed, torch.zeros_like(ids)))
    counts = _counts("beam_sample_keyed", model, identifiers, trie, 1, seeds=2)  # one draw per seed, repeated
    assert chi_square_p(counts, 2 * REQUESTS * p) < 1e-9


def inclusion_probabilities(p: torch.Tensor, k: int) -> torch.Tensor:
    """P(item i among k draws without replacement from ``p`` [I]), summed over every ordered k-tuple."""
    out = torch.zeros_like(p)
    for drawn in itertools.permutations(range(len(p)), k):
        prob, left = 1.0, 1.0
        for i in drawn:
            prob, left = prob * p[i] / left, left - p[i]
        out[list(drawn)] += prob
    return out


@pytest.fixture(scope="module")
def small_world() -> tuple[torch.nn.Module, torch.Tensor, PrefixTrie, torch.Tensor]:
    """12 items of 2 tokens under 5 first codes (more than K = 3), their model and exact inclusion probabilities."""
    identifiers = torch.tensor([[4, 10], [4, 11], [4, 12], [5, 13], [5, 14], [6, 10], [6, 15], [6, 16], [7, 17],
                                [7, 11], [8, 18], [8, 19]])  # fmt: skip
    trie = PrefixTrie.build(identifiers, SAMPLE_VOCAB, eos_token_id=EOS)
    model = tiny_model(SAMPLE_VOCAB, seed=3)
    p = exact_distribution(model, PROMPT, identifiers, trie).double()
    return model, identifiers, trie, inclusion_probabilities(p, 3)


def _inclusion_z(counts: torch.Tensor, pi: torch.Tensor, seeds: int = SEEDS) -> float:
    """The largest |z| of the per-item inclusion counts of ``seeds`` x REQUESTS lists (binomial each)."""
    n = seeds * REQUESTS
    return float(((counts - n * pi) / (n * pi * (1 - pi)).sqrt()).abs().max())


def test_at_k3_the_keyed_sampler_includes_items_as_sampling_without_replacement(small_world, monkeypatch) -> None:
    """Per item, the inclusion count over 20,000 lists is within 4.5 standard deviations of its exact expectation
    (12 binomial tests, false alarm ~1e-4); without the truncation (or ``beam_sample``, which draws each
    depth's K from the flattened candidates) some item is off by more than 8 in 6,000 lists."""
    model, identifiers, trie, pi = small_world
    assert float(pi.sum()) == pytest.approx(3.0)
    assert _inclusion_z(_counts("beam_sample_keyed", model, identifiers, trie, 3), pi) < 4.5
    assert _inclusion_z(_counts("beam_sample", model, identifiers, trie, 3, seeds=3), pi, seeds=3) > 8
    monkeypatch.setattr(keyed, "truncate", lambda raw, parent: raw.where(parent[..., None].isfinite(), -torch.inf))
    assert _inclusion_z(_counts("beam_sample_keyed", model, identifiers, trie, 3, seeds=3), pi, seeds=3) > 8
