"""Relaxed (sampling) speculative decoding: seeded reproducibility, valid lists with true target scores, and the
accept / residual branches of ``relaxed.verify_level``."""

from __future__ import annotations

import pytest
import torch
from decoding_helpers import (
    ALL_FAMILIES,
    OTHER_FAMILIES,
    STUB_PROMPT_A,
    STUB_PROMPT_B,
    TARGET_ROWS,
    BigramStub,
    check_spec_stats,
    left_pad,
    one_torch_thread,
    speculative_world,
    stub_table,
    stub_trie,
    true_scores,
)
from transformers import PreTrainedModel

from atspeed.decoding.decoders import DecodeSettings, decode
from atspeed.decoding.output import DecodeOutput
from atspeed.decoding.search.draft_tree import TokenTree
from atspeed.decoding.verification import relaxed
from atspeed.decoding.verification.verify import LevelInput
from atspeed.items.trie import PrefixTrie

VOCAB = 60
LEVELS = 3
NINF = float("-inf")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    yield from one_torch_thread()


@pytest.fixture(scope="module")
def worlds() -> dict[str, tuple[PreTrainedModel, PreTrainedModel, PrefixTrie, list[list[int]]]]:
    return {f: speculative_world(VOCAB, LEVELS, [6, 2, 9], 0, 100, prompt_seed=50, family=f) for f in ALL_FAMILIES}


@pytest.fixture(scope="module")
def world(worlds) -> tuple[PreTrainedModel, PreTrainedModel, PrefixTrie, list[list[int]]]:
    return worlds["llama"]


def relaxed_run(world, k: int, n: int, gamma: int, seed: int, draft_kind: str = "other") -> DecodeOutput:
    target, draft, trie, prompts = world
    input_ids, mask = left_pad(prompts)
    settings = DecodeSettings(num_beams=k, levels=LEVELS, draft_beams=n, gamma=gamma, seed=seed)
    return decode(
        "spec_relaxed", target, input_ids, mask, trie, settings, draft=target if draft_kind == "self" else draft
    )


def assert_valid_lists(out: DecodeOutput, trie: PrefixTrie, score_of) -> None:
    """Every list: K valid, distinct identifiers, best first, each scored with its true target log-probability
    (``score_of(row, sequences)`` recomputes them)."""
    b, k, levels = out.sequences.shape
    assert (trie.lookup(out.sequences.reshape(-1, levels)) >= 0).all(), out.sequences
    for row in range(b):
        assert torch.unique(out.sequences[row], dim=0).shape[0] == k
        assert (out.scores[row, :-1] >= out.scores[row, 1:]).all()
        torch.testing.assert_close(out.scores[row], score_of(row, out.sequences[row]), atol=1e-4, rtol=0)


@pytest.mark.parametrize("draft_kind", ["other", "self"])
@pytest.mark.parametrize(("k", "n", "gamma"), [(1, 2, 1), (3, 6, 2), (10, 13, 3), (20, 20, 2)])
def test_spec_relaxed_is_reproducible_and_returns_true_target_scores(world, k, n, gamma, draft_kind) -> None:
    """The same seed twice gives identical lists and stats; lists are valid, distinct, sorted, and scored with the
    target's true cumulative log-probabilities (a plain forward per returned identifier)."""
    check_reproducible_true_scores(world, k, n, gamma, draft_kind)


@pytest.mark.parametrize("family", OTHER_FAMILIES)
def test_spec_relaxed_returns_true_target_scores_in_every_family(worlds, family) -> None:
    check_reproducible_true_scores(worlds[family], 3, 6, 2, "other")


def check_reproducible_true_scores(world, k: int, n: int, gamma: int, draft_kind: str) -> None:
    first = relaxed_run(world, k, n, gamma, seed=3, draft_kind=draft_kind)
    again = relaxed_run(world, k, n, gamma, seed=3, draft_kind=draft_kind)
    assert torch.equal(first.sequences, again.sequences)
    assert torch.equal(first.scores, again.scores)
    assert torch.equal(first.stats.accepted, again.stats.accepted)
    check_spec_stats(first.stats, 3, LEVELS, gamma)
    target, _, trie, prompts = world
    assert_valid_lists(first, trie, lambda row, seqs: true_scores(target, prompts[row], seqs))


def test_spec_relaxed_depends_on_the_seed(world) -> None:
    """Different seeds give different lists (it samples): among 5 seeds at least two outputs differ."""
    outs = [relaxed_run(world, 3, 6, 2, seed=s) for s in range(5)]
    distinct = {tuple(o.sequences.flatten().tolist()) for o in outs}
    assert len(distinct) >= 2


def test_spec_relaxed_with_an_explicit_generator_matches_the_seeded_default(world) -> None:
    """decode() seeds its generator with settings.seed: passing torch.Generator().manual_seed(seed) is the same."""
    target, draft, trie, prompts = world
    input_ids, mask = left_pad(prompts)
    settings = DecodeSettings(num_beams=3, levels=LEVELS, draft_beams=5, gamma=2, seed=11)
    default = decode("spec_relaxed", target, input_ids, mask, trie, settings, draft=draft)
    explicit = decode(
        "spec_relaxed", target, input_ids, mask, trie, settings, draft=draft,
        generator=torch.Generator().manual_seed(11),
    )  # fmt: skip
    assert torch.equal(default.sequences, explicit.sequences)


# ----- stub models: force the accept and the residual branches


def stub_score_of(table: torch.Tensor, prompts: list[list[int]]):
    """True cumulative log-probability of identifiers under a bigram table, after each prompt."""
    logp = torch.log_softmax(table, dim=-1)

    def score(row: int, sequences: torch.Tensor) -> torch.Tensor:
        out = []
        for code in sequences.tolist():
            prev = [prompts[row][-1], *code[:-1]]
            out.append(sum(logp[a, b] for a, b in zip(prev, code, strict=True)))
        return torch.stack(out)

    return score


STUB_PROMPTS = [[17, STUB_PROMPT_A], [STUB_PROMPT_B]]


def stub_run(target_table, draft_table, levels: int, k: int, n: int, gamma: int, seed: int) -> DecodeOutput:
    input_ids, mask = left_pad(STUB_PROMPTS)
    settings = DecodeSettings(num_beams=k, levels=levels, draft_beams=n, gamma=gamma, seed=seed)
    trie = stub_trie(levels)
    out = decode(
        "spec_relaxed", BigramStub(target_table), input_ids, mask, trie, settings, draft=BigramStub(draft_table)
    )
    assert_valid_lists(out, trie, stub_score_of(target_table, STUB_PROMPTS))
    return out


@pytest.mark.parametrize(("levels", "gamma"), [(3, 1), (3, 2), (4, 2), (4, 3)])
@pytest.mark.parametrize("seed", range(3))
def test_stub_draft_equal_to_target_has_every_drafted_level_accepted(levels, gamma, seed) -> None:
    """Same table, K = N: p = q for every drafted sequence, so every drafted level of every call is accepted."""
    table = stub_table(TARGET_ROWS)
    out = stub_run(table, table, levels, k=2, n=2, gamma=gamma, seed=seed)
    per_list = check_spec_stats(out.stats, 2, levels, gamma)
    left = levels
    for calls in per_list:
        expected, remaining = [], left
        while remaining:
            expected.append(min(gamma, remaining))
            remaining -= min(gamma + 1, remaining)
        assert calls == expected


# the target gives ~0 probability (logit -40) to each token's least preferred child; the draft puts its mass on
# exactly those (and ~0 on the others)
LEAST = {t: min(row, key=row.get) for t, row in TARGET_ROWS.items()}
ZERO_ROWS = {t: {c: (-40.0 if c == LEAST[t] else v) for c, v in row.items()} for t, row in TARGET_ROWS.items()}
ADVERSE_ROWS = {t: {c: (5.0 if c == LEAST[t] else -30.0) for c in row} for t, row in TARGET_ROWS.items()}


@pytest.mark.parametrize(("levels", "gamma"), [(3, 2), (4, 1), (4, 3)])
@pytest.mark.parametrize("seed", range(3))
def test_stub_draft_on_tokens_the_target_rejects_is_never_accepted(levels, gamma, seed) -> None:
    """The draft's mass sits where the target has ~0: every call accepts depth 0 and the beams come from the
    residual; the lists are still valid and truly scored."""
    out = stub_run(
        stub_table(ZERO_ROWS, default=-40.0), stub_table(ADVERSE_ROWS), levels, k=2, n=2, gamma=gamma, seed=seed
    )
    per_list = check_spec_stats(out.stats, 2, levels, gamma)
    assert all(m == 0 for calls in per_list for m in calls), per_list
    assert all(len(calls) == levels for calls in per_list)


# ----- relaxed.verify_level on hand-built levels


V = 6  # vocabulary of the hand-built levels


def level_input(
    cand: torch.Tensor, q: torch.Tensor, drafted: list[tuple[int, int]], seed: int, can_match: bool = True
) -> LevelInput:
    """Level 1 of a one-level tree over K = cand.shape[1] / V roots: target candidate scores ``cand`` [1, K * V],
    the draft's candidate probabilities ``q`` [1, K * V], and the drafted (parent, token) nodes."""
    roots = cand.shape[1] // V
    log_q = q.log().view(1, roots, V)
    parents = torch.tensor([[[p for p, _ in drafted]]])
    tokens = torch.tensor([[[t for _, t in drafted]]])
    drafted_log_q = log_q[0, parents[0, 0], tokens[0, 0]].view(1, 1, -1)
    tree = TokenTree(roots, parents, tokens, drafted_log_q, (log_q,))
    generator = torch.Generator().manual_seed(seed)
    return LevelInput(cand, torch.arange(roots)[None], 1, torch.tensor([can_match]), tree, generator)


def probs(weights: dict[tuple[int, int], float], roots: int = 2) -> torch.Tensor:
    """[1, K * V] probabilities from {(parent, token): weight}, normalised; 0 elsewhere."""
    out = torch.zeros(1, roots * V)
    for (p, t), w in weights.items():
        out[0, p * V + t] = w
    return out / out.sum()


def chosen(decision, k: int | None = None) -> list[tuple[int, int]]:
    """The (parent, token) stop beams of row 0 (the first ``k``)."""
    pairs = list(zip(decision.stop_parents[0].tolist(), decision.stop_tokens[0].tolist(), strict=True))
    return pairs if k is None else pairs[:k]


def test_verify_level_with_p_equal_to_q_accepts_every_drafted_candidate() -> None:
    """p = q: each drafted candidate is accepted (min(1, p/q) = 1); the level passes and the K continuing nodes are
    drafted ones, a uniformly random K of the N."""
    p = probs({(0, 1): 4, (0, 2): 2, (0, 3): 1, (1, 2): 3, (1, 4): 1, (1, 5): 0.5})
    cand = p.log()
    drafted = [(0, 1), (1, 2), (0, 3), (1, 5)]
    picks = torch.zeros(len(drafted))
    runs = 400
    for seed in range(runs):
        d = relaxed.verify_level(level_input(cand, p, drafted, seed))
        assert d.ok.tolist() == [True]
        got = chosen(d)
        assert all(c in drafted for c in got) and len(set(got)) == 2
        nodes = [2 + drafted.index(c) for c in got]
        assert d.next_nodes[0].tolist() == nodes
        torch.testing.assert_close(d.next_scores[0], torch.stack([cand[0, a * V + b] for a, b in got]))
        for c in got:
            picks[drafted.index(c)] += 1
    # every drafted candidate is kept with probability K / N = 1/2
    assert ((picks / runs - 0.5).abs() < 0.1).all(), picks


def test_verify_level_never_accepts_a_candidate_the_target_forbids() -> None:
    """A drafted candidate with target probability 0 is never accepted nor drawn; the others, all with p = q,
    are; with only one acceptable candidate left the level fails and the missing beam comes from the residual."""
    q = probs({(0, 1): 4, (0, 2): 2, (1, 2): 3, (1, 4): 1})
    p = probs({(0, 2): 2, (1, 2): 3, (1, 4): 1})  # (0, 1) forbidden by the target
    cand = p.log()
    for seed in range(200):
        d = relaxed.verify_level(level_input(cand, q, [(0, 1), (0, 2), (1, 2)], seed))
        got = chosen(d)
        assert (0, 1) not in got
        assert len(set(got)) == 2
        assert torch.isfinite(d.stop_scores).all()
    # only (0, 1) and (0, 2) drafted: (0, 2) is accepted (p/q > 1), (0, 1) never: one short of K, stop
    for seed in range(200):
        d = relaxed.verify_level(level_input(cand, q, [(0, 1), (0, 2)], seed))
        assert d.ok.tolist() == [False]
        got = chosen(d)
        assert (0, 2) in got and (0, 1) not in got and len(set(got)) == 2


def test_verify_level_accepts_with_probability_p_over_q() -> None:
    """K = 1 root, one drafted candidate with p/q = 0.3: the level passes in ~30% of 2000 seeds, continuing from
    it; otherwise the residual draw is another candidate (never the rejected one: p < q there)."""
    q = probs({(0, 1): 5, (0, 2): 3, (0, 3): 2}, roots=1)
    p = probs({(0, 1): 1.5, (0, 2): 4.5, (0, 3): 4}, roots=1)  # p(0,1) / q(0,1) = 0.15 / 0.5 = 0.3
    cand = p.log()
    accepted = 0
    runs = 2000
    for seed in range(runs):
        d = relaxed.verify_level(level_input(cand, q, [(0, 1)], seed))
        ok = bool(d.ok[0])
        first = chosen(d, 1)[0]
        accepted += ok
        if ok:
            assert first == (0, 1) and d.next_nodes.tolist() == [[1]]
        else:
            assert first != (0, 1), "a rejected candidate has no residual mass: p < q there"
    assert abs(accepted / runs - 0.3) < 0.04, accepted / runs


def test_verify_level_residual_draws_never_repeat_an_accepted_candidate() -> None:
    """Accepted candidates first, then distinct residual draws: the K stop beams are always distinct, finite,
    and include every accepted candidate when fewer than K were accepted."""
    q = probs({(0, 1): 3, (0, 2): 3, (0, 3): 1, (1, 2): 1, (1, 4): 1, (1, 5): 1})
    p = probs({(0, 1): 3, (0, 2): 0.5, (0, 3): 2, (1, 2): 2, (1, 4): 2, (1, 5): 0.5})
    cand = p.log()
    drafted = [(0, 1), (0, 2)]  # (0, 1) is always accepted (p >= q), (0, 2) with probability 1/6
    for seed in range(300):
        d = relaxed.verify_level(level_input(cand, q, drafted, seed))
        got = chosen(d)
        assert len(set(got)) == 2
        assert (0, 1) in got
        assert torch.isfinite(d.stop_scores).all()
        if not bool(d.ok[0]):
            assert got.count((0, 1)) == 1


def test_verify_level_bonus_step_samples_from_the_target() -> None:
    """No drafted level to check (can_match False): never accepted; K distinct candidates with p > 0."""
    p = probs({(0, 1): 3, (0, 3): 2, (1, 2): 2, (1, 4): 2})
    q = probs({(0, 1): 1, (0, 2): 1, (1, 5): 1})
    for seed in range(50):
        d = relaxed.verify_level(level_input(p.log(), q, [(0, 2), (1, 5)], seed, can_match=False))
        assert d.ok.tolist() == [False]
        got = chosen(d)
        assert len(set(got)) == 2 and all(p[0, a * V + b] > 0 for a, b in got)


# ----- a residual with fewer positive entries than missing beams


def test_verify_level_never_returns_a_forbidden_candidate_when_the_residual_is_too_small() -> None:
    """K = 3 beams, 9 allowed candidates. The draft gives the target's favourite (0, 1) almost no mass and more
    than the target to everything else, so max(p - q, 0) is positive on (0, 1) only. Drafted (0, 2), (0, 3),
    (1, 2) are mostly rejected (p/q ~ 0.1); then 2 or 3 beams are missing but the residual has 1 candidate.
    The missing beams must still be allowed candidates (p > 0), never trie-forbidden ones (cand = -inf)."""
    weights_p = {(0, 1): 90.0, (0, 2): 1, (0, 3): 1, (1, 2): 1, (1, 4): 1, (2, 3): 1, (2, 4): 1, (2, 5): 1, (1, 5): 3}
    weights_q = {c: (0.01 if c == (0, 1) else 10 * w) for c, w in weights_p.items()}
    p, q = probs(weights_p, roots=3), probs(weights_q, roots=3)
    assert ((p - q) > 0).sum() == 1
    bad = []
    for seed in range(50):
        d = relaxed.verify_level(level_input(p.log(), q, [(0, 2), (0, 3), (1, 2)], seed))
        if not torch.isfinite(d.stop_scores).all():
            bad.append((seed, chosen(d, 3), d.stop_scores[0].tolist()))
    assert not bad, f"{len(bad)}/50 seeds return trie-forbidden beams, e.g. {bad[0]}"


def test_spec_relaxed_end_to_end_returns_only_valid_identifiers_when_the_residual_is_too_small() -> None:
    """End to end through decode(): a stub draft equal to the target except that it nearly never proposes the
    target's favourite child of token 4. With K = N = 3 and 2-token identifiers the level after the prefill is
    the last one; when the drafted candidates are rejected the residual max(p - q, 0) has one positive entry and
    the other beams must still be items of the trie with finite scores."""
    target_rows = {**TARGET_ROWS, 4: {7: 3.0, 8: -2.0, 9: -5.0}}
    draft_rows = {**target_rows, 4: {7: -10.0, 8: -2.0, 9: -5.0}}
    input_ids, mask = left_pad([[17, STUB_PROMPT_A]])
    trie = stub_trie(2)
    target, draft = BigramStub(stub_table(target_rows)), BigramStub(stub_table(draft_rows))
    bad = []
    for seed in range(5):
        settings = DecodeSettings(num_beams=3, levels=2, draft_beams=3, gamma=1, seed=seed)
        out = decode("spec_relaxed", target, input_ids, mask, trie, settings, draft=draft)
        valid = (trie.lookup(out.sequences.reshape(-1, 2)) >= 0).all() and torch.isfinite(out.scores).all()
        if not valid:
            bad.append((seed, out.sequences[0].tolist(), out.scores[0].tolist()))
    assert not bad, f"{len(bad)}/5 seeds return non-items with -inf scores, e.g. {bad[0]}"
