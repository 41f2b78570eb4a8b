"""Strict speculative beam search is lossless: it returns the target's own beam search (and Hugging Face's)."""

from __future__ import annotations

import functools

import pytest
import torch
from decoding_helpers import (
    EOS,
    OTHER_FAMILIES,
    check_spec_stats,
    left_pad,
    one_torch_thread,
    random_identifiers,
    random_prompts,
    random_trie,
    tiny_model,
)
from transformers import PreTrainedModel

from atspeed.decoding.decoders import DecodeSettings, decode
from atspeed.decoding.output import DecodeOutput, DecodeStats
from atspeed.items.trie import PrefixTrie

VOCAB = 60
WORLDS = {0: 3, 1: 4}  # Llama model seed -> identifier levels L (every other family: seed 0's world, by its name)
KS = [1, 3, 5, 10, 20]
PROMPT_LENGTHS = [6, 2, 9]
# (K, draft shape, draft, batch size) of the strict oracle in every other family: a few decisive cases of the grid
FAMILY_CASES = [(1, 0, "other", 3), (3, 1, "other", 3), (10, 2, "other", 3), (20, 0, "other", 3), (5, 2, "self", 1)]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    yield from one_torch_thread()


def draft_shapes(k: int) -> list[tuple[int, int]]:
    """(N, gamma) pairs: N = K with one step, 2K with two, 2K + 3 with three."""
    return [(k, 1), (2 * k, 2), (2 * k + 3, 3)]


class World:
    """A target, an unrelated smaller draft, a trie and three prompts; reference outputs computed once."""

    def __init__(self, seed: int, levels: int, family: str = "llama") -> None:
        self.levels = levels
        self.target = tiny_model(VOCAB, seed=seed, family=family)
        self.other = tiny_model(VOCAB, seed=seed + 100, hidden=16, layers=1, family=family)
        self.trie = random_trie(VOCAB, levels, seed=seed)
        self.prompts = random_prompts(VOCAB, PROMPT_LENGTHS, seed=seed + 50)
        self.input_ids, self.mask = left_pad(self.prompts)

    def draft(self, kind: str) -> PreTrainedModel:
        return self.target if kind == "self" else self.other

    def batch(self, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """All three prompts, or (size 1) the shortest one alone."""
        return (self.input_ids, self.mask) if size == 3 else left_pad([self.prompts[1]])

    @functools.cache  # noqa: B019 (module-lived objects)
    def reference(self, name: str, k: int, size: int = 3) -> DecodeOutput:
        input_ids, mask = self.batch(size)
        out = decode(name, self.target, input_ids, mask, self.trie, DecodeSettings(k, self.levels))
        assert torch.isfinite(out.scores).all(), "reference lists must be full (else ties among -inf are arbitrary)"
        return out


@pytest.fixture(scope="module")
def worlds() -> dict[int | str, World]:
    out: dict[int | str, World] = {seed: World(seed, levels) for seed, levels in WORLDS.items()}
    return out | {family: World(0, WORLDS[0], family) for family in OTHER_FAMILIES}


def assert_same_lists(got: DecodeOutput, ref: DecodeOutput) -> None:
    assert got.sequences.shape == ref.sequences.shape
    assert torch.equal(got.sequences, ref.sequences)
    torch.testing.assert_close(got.scores, ref.scores, atol=1e-4, rtol=0)


@pytest.mark.parametrize("size", [1, 3], ids=["B=1", "B=3"])
@pytest.mark.parametrize("draft_kind", ["other", "self"])
@pytest.mark.parametrize("seed", sorted(WORLDS))
@pytest.mark.parametrize("shape", range(3), ids=["N=K,g=1", "N=2K,g=2", "N=2K+3,g=3"])
@pytest.mark.parametrize("k", KS)
def test_spec_strict_equals_beam_search_and_hf_generate(worlds, k, shape, seed, draft_kind, size) -> None:
    """A left-padded batch of 3 (or one prompt): spec_strict returns exactly beam's (and hf_beam's) sequences,
    scores within 1e-4; the call counters replay consistently; a draft equal to the target always passes the
    first drafted level."""
    check_strict(worlds[seed], k, shape, draft_kind, size)


@pytest.mark.parametrize("family", OTHER_FAMILIES)
@pytest.mark.parametrize(("k", "shape", "draft_kind", "size"), FAMILY_CASES)
def test_spec_strict_equals_beam_search_and_hf_generate_in_every_family(worlds, family, k, shape, draft_kind, size):
    """The same oracles on models of each other family (Qwen2: biased q/k/v projections), a few decisive shapes."""
    check_strict(worlds[family], k, shape, draft_kind, size)


def check_strict(world: World, k: int, shape: int, draft_kind: str, size: int) -> None:
    n, gamma = draft_shapes(k)[shape]
    settings = DecodeSettings(num_beams=k, levels=world.levels, draft_beams=n, gamma=gamma)
    input_ids, mask = world.batch(size)
    out = decode("spec_strict", world.target, input_ids, mask, world.trie, settings, draft=world.draft(draft_kind))
    assert_same_lists(out, world.reference("beam", k, size))
    assert_same_lists(out, world.reference("hf_beam", k, size))
    per_list = check_spec_stats(out.stats, size, world.levels, gamma)
    if draft_kind == "self":
        assert float(out.stats.accepted.float().mean()) > 0
        # the draft starts from the target's beams and scores: its top-N of level 1 holds the target's top-K
        assert all(m >= 1 for calls in per_list for m in calls), per_list


@pytest.mark.parametrize("seed", sorted(WORLDS))
@pytest.mark.parametrize("k", [1, 3, 5])
def test_draft_equal_to_target_with_gamma_covering_every_level_needs_one_target_call(worlds, k, seed) -> None:
    """Draft = target, N = K, gamma >= L: a list whose one verification accepts every level costs exactly 1 target
    call (the prompt and the whole tree in one forward; no prefill call) and L draft calls (its prefill and L - 1
    steps); the beam search costs L. At least one list gets there."""
    world = worlds[seed]
    settings = DecodeSettings(num_beams=k, levels=world.levels, draft_beams=k, gamma=world.levels)
    out = decode("spec_strict", world.target, world.input_ids, world.mask, world.trie, settings, draft=world.target)
    assert_same_lists(out, world.reference("beam", k))
    assert world.reference("beam", k).stats.target_calls.tolist() == [world.levels] * 3
    per_list = check_spec_stats(out.stats, 3, world.levels, settings.gamma)
    full = [i for i, calls in enumerate(per_list) if calls == [world.levels]]
    assert full, per_list
    for i in full:
        assert int(out.stats.target_calls[i]) == 1
        assert int(out.stats.draft_calls[i]) == world.levels
    if k == 1:  # a single beam is always continued by the same model: everything is accepted
        assert full == [0, 1, 2]


@pytest.mark.parametrize("seed", sorted(WORLDS))
@pytest.mark.parametrize(("k", "shape"), [(3, 1), (10, 1), (5, 2), (1, 0)])
def test_spec_strict_batch_equals_single_runs(worlds, k: int, shape: int, seed: int) -> None:
    """A batch of 3 returns what each prompt returns alone (and alone equals its own beam search)."""
    world = worlds[seed]
    n, gamma = draft_shapes(k)[shape]
    settings = DecodeSettings(num_beams=k, levels=world.levels, draft_beams=n, gamma=gamma)
    batch = decode("spec_strict", world.target, world.input_ids, world.mask, world.trie, settings, draft=world.other)
    for row, prompt in enumerate(world.prompts):
        ids, mask = left_pad([prompt])
        single = decode("spec_strict", world.target, ids, mask, world.trie, settings, draft=world.other)
        check_spec_stats(single.stats, 1, world.levels, gamma)
        assert torch.equal(batch.sequences[row], single.sequences[0])
        torch.testing.assert_close(batch.scores[row], single.scores[0], atol=1e-4, rtol=0)
        beam = decode("beam", world.target, ids, mask, world.trie, DecodeSettings(k, world.levels))
        assert_same_lists(single, beam)


@pytest.mark.parametrize(("k", "n", "gamma"), [(3, 6, 3), (5, 5, 4), (2, 9, 2)])
def test_spec_strict_without_eos_in_the_trie(worlds, k: int, n: int, gamma: int) -> None:
    """With no EOS after complete identifiers, drafting past the last level finds no allowed token at all; rows
    that finish early (and drafts deeper than their remaining levels) must not disturb the result."""
    world = worlds[1]
    trie = PrefixTrie.build(random_identifiers(VOCAB, world.levels, seed=1), VOCAB, eos_token_id=None)
    settings = DecodeSettings(num_beams=k, levels=world.levels, draft_beams=n, gamma=gamma)
    for draft in (world.other, world.target):
        out = decode("spec_strict", world.target, world.input_ids, world.mask, trie, settings, draft=draft)
        ref = decode("beam", world.target, world.input_ids, world.mask, trie, settings)
        assert_same_lists(out, ref)
        check_spec_stats(out.stats, 3, world.levels, gamma)


def test_spec_strict_with_five_prompts_finishing_at_different_calls(worlds) -> None:
    """Five prompts, some finishing a call earlier than others (rows leave the batch mid-way), equal beam search."""
    world = worlds[1]
    prompts = random_prompts(VOCAB, [1, 7, 3, 12, 5], seed=77)
    ids, mask = left_pad(prompts)
    settings = DecodeSettings(num_beams=4, levels=world.levels, draft_beams=4, gamma=2)
    out = decode("spec_strict", world.target, ids, mask, world.trie, settings, draft=world.other)
    ref = decode("beam", world.target, ids, mask, world.trie, settings)
    assert_same_lists(out, ref)
    per_list = check_spec_stats(out.stats, 5, world.levels, settings.gamma)
    assert len({len(calls) for calls in per_list}) > 1, f"rows should finish at different calls: {per_list}"
    assert EOS not in out.sequences.unique().tolist()


@pytest.fixture(scope="module")
def dense_trie() -> PrefixTrie:
    """1840 identifiers of 4 tokens over 8 tokens per level: real choices at every level (not one child each)."""
    gen = torch.Generator().manual_seed(0)
    identifiers = torch.unique(torch.randint(4, 12, (2500, 4), generator=gen), dim=0)
    return PrefixTrie.build(identifiers, VOCAB, eos_token_id=EOS)


@pytest.mark.parametrize("seed", sorted(WORLDS))
@pytest.mark.parametrize(("k", "gamma"), [(1, 1), (2, 1), (3, 1), (3, 2)])
def test_draft_equal_to_target_always_passes_the_first_drafted_level(worlds, dense_trie, k, gamma, seed) -> None:
    """Draft = target with N = K on a dense trie: the first drafted level of every call starts from the target's
    beams and scores, so it is the target's own step and must be accepted, in every call, including calls that
    follow a fully accepted one (the draft must then have fed its last drafted token before the bonus token)."""
    world = worlds[seed]
    settings = DecodeSettings(num_beams=k, levels=4, draft_beams=k, gamma=gamma)
    out = decode("spec_strict", world.target, world.input_ids, world.mask, dense_trie, settings, draft=world.target)
    ref = decode("beam", world.target, world.input_ids, world.mask, dense_trie, settings)
    assert_same_lists(out, ref)
    per_list = check_spec_stats(out.stats, 3, 4, gamma)
    assert all(m >= 1 for calls in per_list for m in calls), per_list
    if gamma == 1:
        assert per_list == [[1, 1]] * 3


@pytest.mark.parametrize("name", ["spec_strict", "spec_relaxed"])
def test_one_level_identifiers_need_one_call_of_each_model(worlds, name: str) -> None:
    """L = 1: one target call (the prompt with the N drafted first tokens), the draft only prefilled; strict equals
    beam search."""
    world = worlds[0]
    trie = random_trie(VOCAB, 1, seed=0, count=40)
    settings = DecodeSettings(num_beams=5, levels=1, draft_beams=8, gamma=2)
    out = decode(name, world.target, world.input_ids, world.mask, trie, settings, draft=world.other)
    assert out.stats.target_calls.tolist() == [1, 1, 1] and out.stats.draft_calls.tolist() == [1, 1, 1]
    check_spec_stats(out.stats, 3, 1, settings.gamma)
    if name == "spec_strict":
        assert_same_lists(out, decode("beam", world.target, world.input_ids, world.mask, trie, settings))
    assert (trie.lookup(out.sequences.reshape(-1, 1)) >= 0).all()


@pytest.mark.parametrize("k", [3, 10])
def test_spec_strict_under_the_per_position_rule(worlds, k: int) -> None:
    """The paper's per-position constraint (one trie state per depth): strict still equals beam and hf_beam."""
    world = worlds[0]
    trie = PrefixTrie.build(random_identifiers(VOCAB, 3, seed=0), VOCAB, rule="per_position", eos_token_id=EOS)
    settings = DecodeSettings(num_beams=k, levels=3, draft_beams=2 * k, gamma=2)
    out = decode("spec_strict", world.target, world.input_ids, world.mask, trie, settings, draft=world.other)
    assert_same_lists(out, decode("beam", world.target, world.input_ids, world.mask, trie, settings))
    assert_same_lists(out, decode("hf_beam", world.target, world.input_ids, world.mask, trie, settings))


def test_stats_merge_histogram_and_summary(worlds) -> None:
    """Merged stats concatenate per-list counters and add seconds; the histogram counts accepted depths 0..gamma;
    the summary's means follow from the counters."""
    world = worlds[1]
    settings = DecodeSettings(num_beams=3, levels=world.levels, draft_beams=6, gamma=2)
    parts = [
        decode("spec_strict", world.target, world.input_ids, world.mask, world.trie, settings, draft=draft)
        for draft in (world.other, world.target)
    ]
    merged = DecodeStats.merge(p.stats for p in parts)
    assert merged.lists == 6
    assert merged.target_calls.tolist() == parts[0].stats.target_calls.tolist() + parts[1].stats.target_calls.tolist()
    assert merged.accepted.tolist() == parts[0].stats.accepted.tolist() + parts[1].stats.accepted.tolist()
    assert merged.seconds == pytest.approx(sum(p.stats.seconds for p in parts))
    hist = merged.histogram(settings.gamma)
    assert len(hist) == 3 and sum(hist) == merged.accepted.numel()
    assert hist == [merged.accepted.tolist().count(d) for d in range(3)]
    summary = merged.summary(world.levels)
    assert summary["lists"] == 6
    assert summary["target_calls_per_list"] == pytest.approx(merged.target_calls.float().mean().item())
    tokens_per_call = (world.levels / merged.target_calls.float()).mean().item()
    assert summary["tokens_per_target_call"] == pytest.approx(tokens_per_call)
    assert summary["mean_accepted_depth"] == pytest.approx(merged.accepted.float().mean().item())
    with pytest.raises(ValueError, match="nothing to merge"):
        DecodeStats.merge([])


@pytest.fixture(scope="module")
def narrow_trie() -> PrefixTrie:
    """3 first codes, 12 two-token prefixes, 60 identifiers: K = 5 or 20 exceeds the live extensions of level 1
    (and, for K = 20, of level 2), so the target's top-K there holds -inf entries."""
    gen = torch.Generator().manual_seed(3)
    firsts = torch.tensor([4, 5, 6]).repeat_interleave(4)
    seconds = torch.arange(10, 22)
    rows = [[int(a), int(b), int(c)] for a, b in zip(firsts, seconds, strict=True)
            for c in torch.randperm(12, generator=gen)[:5] + 30]  # fmt: skip
    return PrefixTrie.build(torch.tensor(rows), VOCAB, eos_token_id=EOS)


@pytest.mark.parametrize("k", [5, 20])
def test_strict_accepts_levels_with_fewer_live_extensions_than_k(worlds, narrow_trie, k: int) -> None:
    """Draft = target, N = K, gamma = L on a trie with fewer than K live extensions at level 1: every live entry of
    the target's top-K is drafted, so the whole list takes one target call (before: level 1 was never accepted,
    2 calls or more); the lists still equal beam and hf_beam. A weaker draft keeps the lists too."""
    world = worlds[0]
    settings = DecodeSettings(num_beams=k, levels=3, draft_beams=k, gamma=3)
    ids, mask = world.input_ids, world.mask
    beam = decode("beam", world.target, ids, mask, narrow_trie, settings)
    assert torch.isfinite(beam.scores).all()
    out = decode("spec_strict", world.target, ids, mask, narrow_trie, settings, draft=world.target)
    assert_same_lists(out, beam)
    assert_same_lists(out, decode("hf_beam", world.target, ids, mask, narrow_trie, settings))
    assert check_spec_stats(out.stats, 3, 3, 3) == [[3]] * 3
    assert out.stats.target_calls.tolist() == [1, 1, 1]
    for n, gamma in ((k, 1), (2 * k + 3, 2)):
        settings = DecodeSettings(num_beams=k, levels=3, draft_beams=n, gamma=gamma)
        other = decode("spec_strict", world.target, ids, mask, narrow_trie, settings, draft=world.other)
        assert_same_lists(other, beam)
        check_spec_stats(other.stats, 3, 3, gamma)
