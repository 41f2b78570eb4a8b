"""One target call per list and the tree budget M: the first call takes the prompt with the whole first tree; a
budget verifies only the draft's best M nodes; ``budget="auto"`` plans M per call. Strict stays equal to beam search
whatever the budget."""

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
from atspeed.decoding.cache.header import Prompts
from atspeed.decoding.cache.tree_attention import prefill
from atspeed.decoding.decoders import BoundDecoder, DecodeSettings, decode
from atspeed.decoding.planning.adaptive import BudgetPlanner
from atspeed.decoding.search.beam import candidates, extend, root_state, select_sample, select_top
from atspeed.decoding.search.draft_tree import budget_rank, draft_tree, within_budget
from atspeed.decoding.speculative import speculative_decode
from atspeed.decoding.verification import strict
from atspeed.decoding.verification.tree_forward import first_forward as _first_forward
from atspeed.decoding.verification.tree_forward import verify_forward as _verify_forward

VOCAB, LEVELS = 50, 3
ATOL = 1e-4


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    yield from one_torch_thread()


@pytest.fixture(scope="module")
def world():
    return speculative_world(VOCAB, LEVELS, [6, 2, 9], seed=7, draft_seed=8, prompt_seed=7, items=120)


def first_tree(world, k: int, n: int, levels: int, sample: bool = False):
    """The first iteration's tree drafted from the root (draft prefill, then levels - 1 steps)."""
    _, draft, trie, prompts = world
    input_ids, mask = left_pad(prompts)
    d_cache = kv_cache.new_cache()
    root_logits = prefill(draft, d_cache, input_ids, mask)
    root = root_state(mask, capacity=8, width=k)
    gen = torch.Generator().manual_seed(0)
    select = (lambda c, w, v: select_sample(c, w, v, gen)) if sample else select_top
    tree, table = draft_tree(draft, d_cache, root, trie, n, levels, select, root_logits=root_logits)
    return tree, table, input_ids, mask


@pytest.mark.parametrize("budget", [None, 0, 1, 5, 11])
@torch.no_grad()
def test_the_first_call_gives_every_verified_node_its_sequential_logits(world, budget) -> None:
    """Prompt + tree in one forward (K = 3 roots, N = 4, G = 3): the roots get the prompt's next-token logits and
    every verified node the logits of a plain run of prompt + its path; the cache holds the prompt and the
    verified nodes only."""
    target, _, _, prompts = world
    tree, table, input_ids, mask = first_tree(world, 3, 4, 3)
    tree = within_budget(tree, budget)
    cache = kv_cache.new_cache()
    logits, visible = _first_forward(target, cache, Prompts(input_ids, mask), tree)
    verified = int(tree.drafted_count().max())
    assert kv_cache.cache_length(cache) == input_ids.shape[1] + verified
    assert visible.shape == (3, tree.num_nodes, input_ids.shape[1] + verified)
    for row, prompt in enumerate(prompts):
        for node in range(tree.num_nodes):
            level = 0 if node < 3 else 1 + (node - 3) // 4
            if level and not bool(tree.drafted(level)[row, (node - 3) % 4]):
                continue
            path = table.sequences[row, node, :level].tolist()
            ref = plain_logits(target, prompt + path)[-1]
            torch.testing.assert_close(logits[row, node], ref, atol=ATOL, rtol=0, msg=f"row {row} node {node}")
            assert int(visible[row, node].sum()) == len(prompt) + level  # the prompt and its drafted path


@torch.no_grad()
def test_a_budgeted_verification_forward_gives_verified_nodes_their_logits(world) -> None:
    """A later call (K beams after the prompt) under budget 5: verified nodes as a plain run; the cache grows by
    K + the verified nodes."""
    target, draft, trie, prompts = world
    input_ids, mask = left_pad(prompts)
    out = decode("spec_strict", target, input_ids, mask, trie, DecodeSettings(2, LEVELS, 4, 1), draft)
    assert out.stats.verified_nodes is not None
    # drive one verification by hand: prefill both, the target's first step, a budgeted tree
    t_cache, d_cache = kv_cache.new_cache(), kv_cache.new_cache()
    logits = prefill(target, t_cache, input_ids, mask)
    prefill(draft, d_cache, input_ids, mask)
    root = root_state(mask, capacity=8)
    beams = extend(root, *select_top(candidates(logits[:, None], root.scores, root.trie_states, trie), 2, VOCAB), trie)
    tree, table = draft_tree(draft, d_cache, beams, trie, 4, 2, select_top)
    tree = within_budget(tree, 5)
    before = kv_cache.cache_length(t_cache)
    node_logits, _ = _verify_forward(target, t_cache, beams, tree)
    assert kv_cache.cache_length(t_cache) == before + 2 + int(tree.drafted_count().max())
    for row, prompt in enumerate(prompts):
        for node in range(tree.num_nodes):
            level = 0 if node < 2 else 1 + (node - 2) // 4
            if level and not bool(tree.drafted(level)[row, (node - 2) % 4]):
                continue
            ref = plain_logits(target, prompt + table.sequences[row, node, : level + 1].tolist())[-1]
            torch.testing.assert_close(node_logits[row, node], ref, atol=ATOL, rtol=0)


@pytest.mark.parametrize("by_score", [True, False])
@pytest.mark.parametrize("budget", [0, 1, 3, 6, 9])
def test_within_budget_keeps_the_first_m_nodes_with_their_ancestors(world, budget, by_score) -> None:
    tree, _, _, _ = first_tree(world, 3, 4, 3, sample=not by_score)
    kept = within_budget(tree, budget, by_score).verified  # [B, G, N]
    rank = budget_rank(tree, by_score).view_as(kept)
    drafted = torch.isfinite(tree.log_q)
    assert (kept.flatten(1).sum(1) <= budget).all() and not (kept & ~drafted).any()
    for g in range(1, tree.levels):  # ancestors kept
        assert (~kept[:, g] | kept[:, g - 1].gather(1, tree.parents[:, g])).all()
    # by score, the first M are already closed: exactly the M best drafted nodes; in draw order, a level-major prefix
    expected = (rank < budget) & drafted
    if by_score:
        assert torch.equal(kept, expected)
    else:
        assert (~kept | expected).all()
        first = torch.arange(tree.levels * tree.width).view(1, tree.levels, tree.width) < budget
        assert torch.equal(expected, first.expand_as(expected) & drafted)


@pytest.mark.parametrize("draft_kind", ["self", "other"])
@pytest.mark.parametrize("k", [1, 3, 5])
def test_strict_equals_beam_search_under_any_budget(world, k, draft_kind) -> None:
    """M in {0, 1, K, 7, 2K + 1, all, auto}, N = 2K + 1, gamma = 2, a batch of 3: the lists of beam search; each call
    verifies at most M drafted nodes; M = 0 is plain beam steps (L target calls, the draft never runs)."""
    target, other, trie, prompts = world
    draft = target if draft_kind == "self" else other
    input_ids, mask = left_pad(prompts)
    ref = decode("beam", target, input_ids, mask, trie, DecodeSettings(k, LEVELS))
    n = 2 * k + 1
    for budget in [0, 1, k, 7, n, None, "auto"]:
        out = decode(
            "spec_strict", target, input_ids, mask, trie, DecodeSettings(k, LEVELS, n, 2, budget=budget), draft
        )
        assert torch.equal(out.sequences, ref.sequences), budget
        torch.testing.assert_close(out.scores, ref.scores, atol=1e-4, rtol=0)
        if isinstance(budget, int):
            assert (out.stats.verified_nodes <= budget * out.stats.target_calls).all()
        if budget == 0:
            assert out.stats.target_calls.tolist() == [LEVELS] * 3 and out.stats.draft_calls.tolist() == [0] * 3
            assert out.stats.verified_nodes.tolist() == [0] * 3


def test_needed_budgets_are_the_smallest_budgets_that_accept_as_much(world) -> None:
    """Strict, K = 3, N = 7, gamma = 3, the target as its own draft, one prompt at a time: a first call with the
    whole tree accepts depth m; the budget ``needed_budgets`` reports for m accepts m again, one node less accepts
    less."""
    target, _, trie, prompts = world
    draft = target
    seen = 0
    for prompt in prompts:
        input_ids, mask = left_pad([prompt])
        gen = torch.Generator()
        planner = _Recorder()
        settings = DecodeSettings(3, LEVELS, 7, 3, budget="auto")
        with torch.inference_mode():
            speculative_decode(target, draft, input_ids, mask, trie, settings, strict.verify_level, False, gen, planner)
        m, needed = planner.first
        if m == 0:
            continue
        seen += 1
        need = int(needed[0, m - 1])
        for budget, expect_full in ((need, True), (need - 1, False)):
            out = decode("spec_strict", target, input_ids, mask, trie, DecodeSettings(3, LEVELS, 7, 3, budget=budget),
                         draft)  # fmt: skip
            first = int(out.stats.accepted[0])
            assert (first == m) if expect_full else (first < m), (budget, first, m)
    assert seen


class _Recorder:
    """A planner that always verifies the whole tree and records the first call's (accepted, needed)."""

    first = None

    def plan(self) -> None:
        return None

    def observe(self, budget, accepted, needed, remaining) -> None:
        if self.first is None:
            self.first = (int(accepted[0]), needed)


def _planner(**kw) -> BudgetPlanner:
    target = {str(t): 1.0 + 0.05 * t for t in range(1, 200)}
    return BudgetPlanner(num_beams=4, draft_beams=10, gamma=3, target_ms=target, draft_ms={"10": 0.2}, **kw)


def test_the_planner_turns_to_beam_steps_when_the_draft_keeps_missing() -> None:
    """Nothing is ever accepted: after the 2 warm calls, beam steps (M = 0), but for whole-tree calls at 10 (2 + 8),
    then 16 and 32 calls later (the interval doubles while beam steps win)."""
    planner = _planner(explore=8)
    assert planner.grid == [0, 4, 8, 16, 30]
    plans = []
    for _ in range(60):
        m = planner.plan()
        plans.append(m)
        needed = torch.full((5, 3), 31)
        planner.observe(m, torch.zeros(5, dtype=torch.long), needed, torch.full((5,), 3))
    assert [call for call, m in enumerate(plans, start=1) if m] == [1, 2, 10, 26, 58]
    assert {m for m in plans} == {0, 30}


def test_whole_lists_of_beam_steps_run_as_beam_search_until_an_exploring_call_is_due() -> None:
    planner = _planner(explore=8)
    assert not planner.beam_list(3)  # nothing observed yet
    for _ in range(2):  # the warm calls: nothing accepted
        planner.plan()
        planner.observe(30, torch.zeros(5, dtype=torch.long), torch.full((5, 3), 31), torch.full((5,), 3))
    assert planner.beam_list(3) and planner.beam_list(3)  # calls 3-5, 6-8
    assert not planner.beam_list(3)  # 9-11 would pass call 10, which explores
    assert [planner.plan() for _ in range(3)] == [0, 30, 0]


def test_the_planner_learns_larger_budgets_only_from_calls_that_used_them() -> None:
    """Beam-step calls (M = 0) say nothing about what a tree would have gained: after whole-tree calls that accepted
    everything, many beam steps do not lower the estimate of the whole tree."""
    planner = _planner(explore=1000)
    needed = torch.tensor([[5, 9, 12]]).expand(4, 3)
    for _ in range(3):
        planner.observe(30, torch.full((4,), 3), needed, torch.full((4,), 3))
    before = planner.speeds()
    for _ in range(50):
        planner.observe(0, torch.zeros(4, dtype=torch.long), needed[:, :0], torch.full((4,), 3))
    after = planner.speeds()
    assert after[0] == before[0] and torch.allclose(after[1:], before[1:])


def test_the_planner_takes_the_smallest_budget_that_keeps_the_acceptance() -> None:
    """Every call accepts all 3 levels needing 5, 9 and 12 nodes: 16 nodes get the full gain for less than 30."""
    planner = _planner(explore=1000)
    needed = torch.tensor([[5, 9, 12]]).expand(4, 3)
    for _ in range(5):
        planner.observe(30, torch.full((4,), 3), needed, torch.full((4,), 3))
    planner._calls = 5  # past the warm calls, before the first exploring one
    assert planner.plan() == 16
    # with no tokens to gain beyond one level, the cheapest budget giving that level wins
    planner = _planner(explore=1000)
    for _ in range(5):
        planner.observe(30, torch.ones(4, dtype=torch.long), needed, torch.full((4,), 2))
    planner._calls = 5
    assert planner.plan() == 8


def test_a_bound_decoder_plans_across_batches_and_stays_lossless(world) -> None:
    """budget auto: the planner is built once (cost model measured on the first batch) and kept across batches."""
    target, draft, trie, prompts = world
    bound = BoundDecoder("spec_strict", target, trie, DecodeSettings(3, LEVELS, 7, 2, budget="auto"), draft)
    for prompt in prompts * 2:
        input_ids, mask = left_pad([prompt])
        out = bound(input_ids, mask)
        ref = decode("beam", target, input_ids, mask, trie, DecodeSettings(3, LEVELS))
        assert torch.equal(out.sequences, ref.sequences)
    assert bound.planner is not None and bool((bound.planner._weight > 0).all())
    assert set(bound.planner.target_ms) >= {str(3 + m) for m in bound.planner.grid}


@pytest.mark.parametrize("budget", [-1, 1.5, "all"])
def test_bad_budgets_are_refused(budget) -> None:
    with pytest.raises(ValueError, match="budget"):
        DecodeSettings(3, 3, budget=budget)
