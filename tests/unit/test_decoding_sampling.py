"""``beam_sample``, the target's own sampling beam search (the baseline of relaxed decoding), follows its distribution.

At K = 1 a sampled identifier should be drawn from the trie-constrained distribution: at each level the model's
next-token probabilities renormalised over the codes the trie allows, multiplied along the identifier. The test
enumerates that distribution for a small random Llama and a 30-item trie, draws 20,000 identifiers in one batch, and
runs a chi-square goodness-of-fit test (p-value from the regularised upper incomplete gamma function). The same test
must reject a biased sampler (the distribution sharpened to p^1.1: total variation 0.036 from p), so it can fail:
measured, p^1.1 gives p-values below 1e-16 over five seeds, p^1.08 (TV 0.029) below 1e-7.
"""

from __future__ import annotations

import pytest
import torch
from decoding_helpers import (
    ALL_FAMILIES,
    chi_square_p,
    exact_distribution,
    left_pad,
    one_torch_thread,
    sampling_world,
    tiny_model,
)

from atspeed.decoding.decoders import DecodeSettings, decode
from atspeed.items.trie import PrefixTrie

VOCAB, LEVELS, ITEMS, DRAWS = 40, 3, 30, 20_000


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    yield from one_torch_thread()


def setup(family: str = "llama") -> tuple[torch.nn.Module, torch.Tensor, PrefixTrie]:
    return sampling_world(VOCAB, LEVELS, ITEMS, seed=3, family=family)


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_beam_sample_at_k1_follows_the_constrained_distribution(family) -> None:
    model, identifiers, trie = setup(family)
    prompt = [5, 9, 11, 7]
    p = exact_distribution(model, prompt, identifiers, trie)
    assert float(p.sum()) == pytest.approx(1.0, abs=1e-5)
    input_ids, mask = left_pad([prompt] * DRAWS)
    out = decode("beam_sample", model, input_ids, mask, trie, DecodeSettings(1, LEVELS, seed=0))
    drawn = out.sequences[:, 0]  # [DRAWS, L]
    index = (drawn[:, None, :] == identifiers[None]).all(2).float().argmax(1)
    counts = torch.bincount(index, minlength=len(identifiers)).double()
    assert chi_square_p(counts, DRAWS * p.double()) > 1e-3

    biased = p.double() ** 1.1
    biased /= biased.sum()
    assert 0.5 * float((biased - p.double()).abs().sum()) > 0.03
    draws = torch.multinomial(biased, DRAWS, replacement=True, generator=torch.Generator().manual_seed(0))
    assert chi_square_p(torch.bincount(draws, minlength=len(p)).double(), DRAWS * p.double()) < 1e-6


def test_beam_sample_is_seeded_and_returns_distinct_items() -> None:
    model, _, trie = setup()
    input_ids, mask = left_pad([[5, 9, 11, 7], [8, 8]])
    runs = [decode("beam_sample", model, input_ids, mask, trie, DecodeSettings(5, LEVELS, seed=s)) for s in (0, 0, 1)]
    assert torch.equal(runs[0].sequences, runs[1].sequences)
    assert not torch.equal(runs[0].sequences, runs[2].sequences)
    for row in runs[0].sequences:
        assert len({tuple(r) for r in row.tolist()}) == 5


@pytest.mark.parametrize("draft_seed", [None, 4])  # None: the target drafts for itself (q = p)
def test_papers_relaxed_verification_follows_p_with_one_draft_and_is_biased_with_three(draft_seed) -> None:
    """spec_relaxed (the paper's procedure) at K = 1, gamma = 2: with N = 1 its identifiers follow the target's
    distribution; with N = 3 the same test rejects them (measured TV 0.08 when q = p, 0.034 with another draft):
    the accepted drafts were drawn without replacement but tested with single-draw probabilities, and one of them is
    kept uniformly (SPEC section 5). This records the paper variant's bias; an exact verifier must pass at N = 3."""
    model, identifiers, trie = setup()
    draft = model if draft_seed is None else tiny_model(VOCAB, seed=draft_seed)
    prompt = [5, 9, 11, 7]
    p = exact_distribution(model, prompt, identifiers, trie).double()
    input_ids, mask = left_pad([prompt] * DRAWS)
    for n, unbiased in ((1, True), (3, False)):
        settings = DecodeSettings(1, LEVELS, draft_beams=n, gamma=2, seed=0)
        drawn = decode("spec_relaxed", model, input_ids, mask, trie, settings, draft).sequences[:, 0]
        counts = torch.bincount((drawn[:, None, :] == identifiers[None]).all(2).float().argmax(1), minlength=len(p))
        p_value = chi_square_p(counts.double(), DRAWS * p)
        assert (p_value > 1e-3) if unbiased else (p_value < 1e-6), (n, p_value)
