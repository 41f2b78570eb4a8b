"""``spec_relaxed_exact`` (recursive rejection sampling, ``atspeed.decoding.verification.recursive``) keeps the
distribution of the target's sampling beam search, where the paper's ``spec_relaxed`` does not.

1. K = 1: its identifiers follow the enumerated trie-constrained distribution (chi-square on 20,000 draws, the test
   of ``test_decoding_sampling``) at N = 3 and 5, gamma = 2, with the target as its own draft (q = p) and with
   another draft: the settings in which that test rejects ``spec_relaxed``.
2. K = 3: per-item inclusion counts of 10,000 lists equal those of ``beam_sample`` (a two-sample chi-square, see
   ``two_sample_p``), for N = 3 and 6, gamma = 1 and 2 with another draft. The same test rejects ``spec_relaxed``
   with q = p, N = 6, passes ``beam_sample`` against itself under another seed, and rejects synthetic lists whose
   normalised inclusion frequencies are 0.03 away in total variation.
3. ``recursive.verify_level`` on hand-built levels: with q = p the first K drafts are accepted; the K outputs, as
   ordered tuples, are K draws without replacement from p, also with drafts off the grid and on forbidden
   candidates; fewer positive candidates than K never yields a repeat.
"""

from __future__ import annotations

import dataclasses
import itertools

import pytest
import torch
from decoding_helpers import (
    OTHER_FAMILIES,
    chi_square_p,
    exact_distribution,
    left_pad,
    one_torch_thread,
    sampling_world,
    tiny_model,
)

from atspeed.decoding.decoders import DecodeSettings, decode
from atspeed.decoding.search.draft_tree import TokenTree
from atspeed.decoding.verification import recursive
from atspeed.decoding.verification.verify import LevelInput
from atspeed.items.trie import PrefixTrie

VOCAB, LEVELS, ITEMS, DRAWS = 40, 3, 30, 20_000
LISTS = 10_000  # per decoder at K = 3: enough to detect a total variation of 0.03 (see the power test)
PROMPT = [5, 9, 11, 7]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    yield from one_torch_thread()


def family_world(family: str) -> tuple[torch.nn.Module, torch.nn.Module, torch.Tensor, PrefixTrie]:
    """The world of ``test_decoding_sampling`` (target, 30 items) plus another random draft, of ``family``."""
    target, identifiers, trie = sampling_world(VOCAB, LEVELS, ITEMS, seed=3, family=family)
    return target, tiny_model(VOCAB, seed=4, family=family), identifiers, trie


@pytest.fixture(scope="module")
def world() -> tuple[torch.nn.Module, torch.nn.Module, torch.Tensor, PrefixTrie]:
    return family_world("llama")


def item_counts(
    world, name: str, k: int, n: int, gamma: int, seed: int, self_draft: bool = False, budget: int | None = None
) -> torch.Tensor:
    """How often each item [I] appears in the lists of ``name`` for the same prompt (DRAWS of them at K = 1, else
    LISTS)."""
    target, draft, identifiers, trie = world
    input_ids, mask = left_pad([PROMPT] * (DRAWS if k == 1 else LISTS))
    settings = DecodeSettings(k, LEVELS, draft_beams=n, gamma=gamma, seed=seed, budget=budget)
    lists = decode(name, target, input_ids, mask, trie, settings, target if self_draft else draft).sequences
    index = (lists.reshape(-1, 1, LEVELS) == identifiers[None]).all(2).float().argmax(1)
    return torch.bincount(index, minlength=len(identifiers)).double()


# ----- 1. K = 1: the trie-constrained distribution


@pytest.mark.parametrize("self_draft", [True, False])
@pytest.mark.parametrize("n", [3, 5])
def test_at_k1_identifiers_follow_the_constrained_distribution(world, n, self_draft) -> None:
    target, _, identifiers, trie = world
    p = exact_distribution(target, PROMPT, identifiers, trie).double()
    counts = item_counts(world, "spec_relaxed_exact", 1, n, gamma=2, seed=0, self_draft=self_draft)
    assert chi_square_p(counts, DRAWS * p) > 1e-3


@pytest.mark.parametrize("family", OTHER_FAMILIES)
def test_at_k1_identifiers_follow_the_constrained_distribution_in_every_family(family) -> None:
    """The K = 1 test on models of each other family, with another draft (N = 3)."""
    test_at_k1_identifiers_follow_the_constrained_distribution(family_world(family), 3, self_draft=False)


@pytest.mark.parametrize("self_draft", [True, False])
def test_at_k1_a_verification_budget_keeps_the_distribution(world, self_draft) -> None:
    """Budget M = 3 of the 10 drafted nodes (N = 5, gamma = 2): the budget keeps level 1 in draw order and prunes
    level 2 (``budget_rank``), so the drafts verified never depend on deeper ones and the output stays exact."""
    target, _, identifiers, trie = world
    p = exact_distribution(target, PROMPT, identifiers, trie).double()
    counts = item_counts(world, "spec_relaxed_exact", 1, 5, gamma=2, seed=2, self_draft=self_draft, budget=3)
    assert chi_square_p(counts, DRAWS * p) > 1e-3


# ----- 2. K = 3: item inclusion frequencies of the target's sampling beam search


def two_sample_p(a: torch.Tensor, b: torch.Tensor) -> float:
    """Pearson's chi-square p-value of the 2 x I table of item counts ``a``, ``b`` [I] (same distribution?); items
    expecting fewer than 5 in a sample are pooled into one.

    The table treats each sample's nK inclusions as a multinomial. They are not: a list holds K distinct items, so
    the inclusion indicators within a list are negatively correlated, and an item included with probability pi has
    count variance n pi (1 - pi), below the multinomial's n pi (1 - pi / K). The statistic is thus stochastically
    smaller than under the multinomial model: the p-value errs on the large (conservative) side.
    """
    expected = (a + b)[None] * torch.stack([a.sum(), b.sum()])[:, None] / (a.sum() + b.sum())  # [2, I]
    observed = torch.stack([a, b])
    small = expected.min(0).values < 5
    observed = torch.cat([observed[:, ~small], observed[:, small].sum(1, keepdim=True)], dim=1)
    expected = torch.cat([expected[:, ~small], expected[:, small].sum(1, keepdim=True)], dim=1)
    keep = expected.min(0).values > 0
    stat = float(((observed[:, keep] - expected[:, keep]) ** 2 / expected[:, keep]).sum())
    dof = int(keep.sum()) - 1
    return float(torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64), torch.tensor(stat / 2)))


def tv(a: torch.Tensor, b: torch.Tensor) -> float:
    return 0.5 * float((a / a.sum() - b / b.sum()).abs().sum())


@pytest.fixture(scope="module")
def beam_sample_counts(world) -> torch.Tensor:
    return item_counts(world, "beam_sample", 3, 3, 1, seed=0)


@pytest.mark.parametrize(("n", "gamma", "budget"), [(3, 1, None), (3, 2, None), (6, 1, None), (6, 2, None), (6, 2, 8)])
def test_at_k3_item_inclusion_matches_the_targets_sampling_beam_search(
    world, beam_sample_counts, n, gamma, budget
) -> None:
    counts = item_counts(world, "spec_relaxed_exact", 3, n, gamma, seed=1, budget=budget)
    assert two_sample_p(counts, beam_sample_counts) > 1e-3, tv(counts, beam_sample_counts)


def test_the_inclusion_test_rejects_papers_relaxed_verification_and_passes_beam_sample_itself(
    world, beam_sample_counts
) -> None:
    """spec_relaxed with q = p, N = 6, gamma = 2 is rejected (measured: TV 0.059 between the normalised
    inclusion frequencies, p-value 6e-49; with the other draft TV 0.26); beam_sample with another seed passes
    (TV 0.013, p-value 0.71, as for spec_relaxed_exact)."""
    relaxed = item_counts(world, "spec_relaxed", 3, 6, 2, seed=1, self_draft=True)
    assert two_sample_p(relaxed, beam_sample_counts) < 1e-6, tv(relaxed, beam_sample_counts)
    again = item_counts(world, "beam_sample", 3, 3, 1, seed=1)
    assert two_sample_p(again, beam_sample_counts) > 1e-3


def inclusion_probabilities(w: torch.Tensor, k: int = 3) -> torch.Tensor:
    """P(item in a list) [I] for k draws without replacement from weights ``w`` [I] (all ordered k-tuples)."""
    w = (w / w.sum()).double()
    tuples = torch.tensor([t for t in itertools.permutations(range(len(w)), k)])  # [T, k]
    taken = w[tuples]  # [T, k]
    before = torch.cat([torch.zeros(len(tuples), 1, dtype=w.dtype), taken.cumsum(1)[:, :-1]], dim=1)
    prob = (taken / (1 - before)).prod(1)  # [T]
    return torch.zeros_like(w).index_add(0, tuples.reshape(-1), prob.repeat_interleave(k))


def test_the_inclusion_test_detects_a_total_variation_of_003(world) -> None:
    """Lists of 3 items drawn without replacement from the K = 1 item distribution w, against lists from w^1.092
    (normalised inclusion frequencies 0.03 apart in total variation): LISTS lists each are enough to reject
    (measured over 40 seeds: largest p-value 8e-6, median 5e-11; 0 of 40 below 0.05 when both come from w)."""
    target, _, identifiers, trie = world
    w = exact_distribution(target, PROMPT, identifiers, trie).double()
    biased = w**1.092
    assert tv(inclusion_probabilities(w), inclusion_probabilities(biased)) == pytest.approx(0.03, abs=0.002)
    gen = torch.Generator().manual_seed(0)

    def sample(weights: torch.Tensor) -> torch.Tensor:
        u = torch.rand(LISTS, len(weights), generator=gen, dtype=torch.float64)
        lists = torch.topk(weights.log() - (-u.log()).log(), 3, dim=1).indices
        return torch.bincount(lists.reshape(-1), minlength=len(weights)).double()

    reference = sample(w)
    assert two_sample_p(sample(biased), reference) < 1e-3
    assert two_sample_p(sample(w), reference) > 1e-3


# ----- 3. verify_level on hand-built levels

V = 5  # vocabulary of the hand-built levels


def level_one(p: torch.Tensor, q: torch.Tensor, drafted: torch.Tensor, seed: int) -> LevelInput:
    """Level 1 of a one-level tree over K = p.shape[1] / V roots, every row drafting ``drafted`` [B, N] (grid
    indices, in draft order): target probabilities ``p`` [B, K * V], draft probabilities ``q`` [B, K * V]."""
    b, roots = p.shape[0], p.shape[1] // V
    log_q = q.log()
    tree = TokenTree(
        roots, (drafted // V)[:, None], (drafted % V)[:, None], log_q.gather(1, drafted)[:, None],
        (log_q.view(b, roots, V),),
    )  # fmt: skip
    current = torch.arange(roots).expand(b, roots)
    can_match = torch.ones(b, dtype=torch.bool)
    return LevelInput(p.log(), current, 1, can_match, tree, torch.Generator().manual_seed(seed))


def test_with_q_equal_to_p_the_first_k_drafts_are_accepted() -> None:
    """q = p: draft 1 has r / q_1 = 1; slot 2 removes it from both sides alike, so again 1; and so on. The level
    passes with the first K drafts, in order, for every draft order and seed; not when one of them was pruned."""
    weights = torch.tensor([4.0, 2, 1, 0, 0.5, 3, 0, 1, 2.5, 1.5])  # K = 2 roots x V
    p = (weights / weights.sum()).expand(6, -1)
    drafted = torch.tensor([[0, 5, 8], [5, 0, 8], [8, 9, 1], [2, 4, 7], [9, 1, 0], [4, 2, 9]])  # [B, N = 3]
    for seed in range(20):
        d = recursive.verify_level(level_one(p, p, drafted, seed))
        assert d.ok.all()
        assert torch.equal(d.stop_parents * V + d.stop_tokens, drafted[:, :2])
        assert torch.equal(d.next_nodes, 2 + torch.arange(2).expand(6, 2))  # node ids of drafts 0 and 1
        torch.testing.assert_close(d.next_scores, p.log().gather(1, drafted[:, :2]))
    # a budget pruned draft 1 from the tree: still tested (and accepted), but the target cannot continue from it
    inp = level_one(p, p, drafted, seed=0)
    pruned = dataclasses.replace(inp.tree, verified=torch.tensor([[[True, False, True]]]).expand(6, 1, 3))
    d = recursive.verify_level(dataclasses.replace(inp, tree=pruned))
    assert torch.equal(d.stop_parents * V + d.stop_tokens, drafted[:, :2]) and not d.ok.any()


# the draft's level-2 distribution over the extensions of its level-1 nodes (rows; the target keeps nodes 0 and 2)
LEVEL_2_Q = torch.tensor([[1.0, 2, 0, 1, 0], [2, 0, 1, 0, 1], [0, 0.5, 0, 3, 1], [1, 0, 0, 2, 0], [0, 1, 1, 0, 0]])


@pytest.mark.parametrize("n", [3, 5])
def test_the_k_outputs_are_k_draws_without_replacement_from_p(n) -> None:
    """Level 2 of a tree with N level-1 nodes, of which the target kept nodes 0 and 2 (the others' extensions are
    off the grid); the draft's q puts mass off the grid and on candidates the target forbids. Each of B rows drafts
    N nodes without replacement from q; the ordered outputs (y1, y2) must have probability
    p(y1) p(y2) / (1 - p(y1)) (chi-square over the 30 pairs). Rows that cannot match take the same draws from p,
    never accepted."""
    b, k = DRAWS, 2
    p_grid = torch.tensor([[3.0, 0, 1, 2, 0], [0.5, 2, 0, 0, 1.5]]).reshape(-1)  # [K * V] extensions of nodes 0, 2
    p_grid, q_all = p_grid / p_grid.sum(), LEVEL_2_Q[:n] / LEVEL_2_Q[:n].sum()  # [K * V], [N, V]
    gen = torch.Generator().manual_seed(1)
    keys = q_all.log().reshape(-1) - (-torch.rand(b, n * V, generator=gen).log()).log()
    drafted = torch.topk(keys, n, dim=1).indices  # [B, N] into the draft's N x V candidates, in draft order
    level_1 = torch.zeros(b, 1, n, dtype=torch.long)
    tree = TokenTree(
        k, torch.cat([level_1, (drafted // V)[:, None]], 1), torch.cat([level_1 + 4, (drafted % V)[:, None]], 1),
        torch.cat([level_1.float(), q_all.log().reshape(-1)[drafted][:, None]], 1),
        (torch.zeros(b, k, V), q_all.log().expand(b, n, V)),
    )  # fmt: skip
    current = torch.tensor([k, k + 2]).expand(b, k)  # node ids of level-1 nodes 0 and 2
    can_match = torch.arange(b) % 4 != 0
    inp = LevelInput(p_grid.log().expand(b, -1), current, 2, can_match, tree, torch.Generator().manual_seed(0))
    d = recursive.verify_level(inp)
    y = d.stop_parents * V + d.stop_tokens  # [B, K] grid indices
    assert bool((p_grid[y] > 0).all()) and bool((y[:, 0] != y[:, 1]).all())
    pairs = torch.bincount(y[:, 0] * k * V + y[:, 1], minlength=(k * V) ** 2).double()
    exact = p_grid[:, None] * p_grid[None, :] / (1 - p_grid[:, None])
    exact = exact.fill_diagonal_(0).reshape(-1).double()
    assert chi_square_p(pairs, b * exact / exact.sum()) > 1e-3
    # the level passes exactly when both outputs are drafted nodes, continuing from those nodes
    parent = drafted // V
    grid_of_draft = torch.where(parent == 0, 0, torch.where(parent == 2, V, -V - 1)) + drafted % V  # [B, N]
    is_draft = y[:, :, None] == grid_of_draft[:, None, :]  # [B, K, N]
    assert torch.equal(d.ok, is_draft.any(2).all(1) & can_match)
    assert 0.1 < float(d.ok.double().mean()) < 0.9
    assert torch.equal(d.next_nodes[d.ok], (tree.offset(2) + is_draft.int().argmax(2))[d.ok])


def test_fewer_positive_candidates_than_k_never_repeat_an_output() -> None:
    """K = 3 beams but only two candidates with p > 0 (say a dead beam): both are output, then a third, distinct
    one; nothing is NaN."""
    p = torch.zeros(1, 3 * V)
    p[0, [1, 7]] = torch.tensor([0.7, 0.3])
    q = torch.full((1, 3 * V), 1.0 / (3 * V))
    for seed in range(30):
        d = recursive.verify_level(level_one(p, q, torch.tensor([[1, 2, 7]]), seed))
        y = (d.stop_parents * V + d.stop_tokens)[0].tolist()
        assert len(set(y)) == 3 and set(y[:2]) == {1, 7}
        assert not bool(d.ok[0])
