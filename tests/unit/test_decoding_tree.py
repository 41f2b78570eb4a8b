"""Tree attention: every tree node's logits equal a plain sequential run of its own path after the prompt."""

from __future__ import annotations

import dataclasses
import functools

import pytest
import torch
from decoding_helpers import (
    OTHER_FAMILIES,
    left_pad,
    one_torch_thread,
    plain_logits,
    random_prompts,
    random_trie,
    tiny_model,
)
from transformers import PreTrainedModel

from atspeed.decoding.cache import kv_cache
from atspeed.decoding.cache.tree_attention import forward_tree, prefill, prompt_positions
from atspeed.decoding.search.beam import candidates, extend, feed, root_state, select_top
from atspeed.decoding.search.draft_tree import TokenTree, draft_tree
from atspeed.decoding.verification.tree_forward import verify_forward as _verify_forward

VOCAB = 50
ATOL = 1e-4


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    yield from one_torch_thread()


@functools.cache
def target_of(family: str) -> PreTrainedModel:
    with torch.random.fork_rng():
        return tiny_model(VOCAB, seed=4, family=family)


@functools.cache
def draft_of(family: str) -> PreTrainedModel:
    with torch.random.fork_rng():
        return tiny_model(VOCAB, seed=104, hidden=16, layers=1, family=family)


@pytest.fixture(scope="module")
def model() -> PreTrainedModel:
    return target_of("llama")


def test_prompt_positions_count_real_tokens_only() -> None:
    """Left padding gets position 0; real tokens 0, 1, ... (as Hugging Face generate counts)."""
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    assert prompt_positions(mask).tolist() == [[0, 0, 0, 1, 2], [0, 1, 2, 3, 4]]


def test_ancestry_of_a_hand_made_tree() -> None:
    """Two rows, K = 2 roots, G = 2 levels of N = 3 nodes: ancestor sets (with self) and roots as drawn by hand."""
    parents = torch.tensor([[[0, 1, 0], [2, 0, 0]], [[1, 1, 0], [1, 2, 2]]])  # [B, G, N], into the previous level
    tree = TokenTree(
        roots=2,
        parents=parents,
        tokens=torch.zeros_like(parents),
        log_q=torch.zeros(parents.shape),
        candidate_log_q=(),
    )
    assert (tree.levels, tree.width, tree.num_nodes) == (2, 3, 8)
    assert [tree.offset(g) for g in range(3)] == [0, 2, 5]
    assert tree.parent_nodes(2).tolist() == [[4, 2, 2], [3, 4, 4]]
    anc, root = tree.ancestry()
    expected = [
        [{0}, {1}, {0, 2}, {1, 3}, {0, 4}, {0, 4, 5}, {0, 2, 6}, {0, 2, 7}],
        [{0}, {1}, {1, 2}, {1, 3}, {0, 4}, {1, 3, 5}, {0, 4, 6}, {0, 4, 7}],
    ]
    for b in range(2):
        assert [set(anc[b, i].nonzero()[:, 0].tolist()) for i in range(8)] == expected[b]
    assert root.tolist() == [[0, 1, 0, 1, 0, 0, 0, 0], [0, 1, 1, 1, 0, 1, 0, 0]]


@torch.no_grad()
def test_prefill_of_left_padded_prompts_equals_unpadded_runs(model) -> None:
    """The prefill's last-position logits equal a run of each prompt alone; the cache holds all P positions."""
    prompts = random_prompts(VOCAB, [3, 8, 1, 5], seed=1)
    input_ids, mask = left_pad(prompts)
    cache = kv_cache.new_cache()
    logits = prefill(model, cache, input_ids, mask)
    assert logits.shape == (4, VOCAB) and logits.dtype == torch.float32
    assert kv_cache.cache_length(cache) == input_ids.shape[1]
    for row, prompt in enumerate(prompts):
        torch.testing.assert_close(logits[row], plain_logits(model, prompt)[-1], atol=ATOL, rtol=0)


def _random_forest(nodes: int, gen: torch.Generator) -> list[int]:
    """Parent of each node (-1: hangs off the prompt); parents come earlier, so the order is topological."""
    return [int(torch.randint(-1, i, (1,), generator=gen)) for i in range(nodes)]


def _path(parents: list[int], node: int) -> list[int]:
    chain = []
    while node >= 0:
        chain.append(node)
        node = parents[node]
    return chain[::-1]


@pytest.mark.parametrize(
    ("family", "seed"), [("llama", 0), ("llama", 1), ("llama", 2), *((f, 0) for f in OTHER_FAMILIES)]
)
@torch.no_grad()
def test_tree_masked_logits_equal_each_paths_sequential_logits(family: str, seed: int) -> None:
    """A random forest of 12 nodes per row (different shapes per row) after a left-padded prefill, in one
    forward; then a second forest hung under the first one's nodes, in a second forward. Each node's logits
    equal the model run without cache on the row's real prompt tokens followed by the node's path."""
    model = target_of(family)
    gen = torch.Generator().manual_seed(seed)
    prompts = random_prompts(VOCAB, [2, 6, 4], seed=seed + 10)
    input_ids, mask = left_pad(prompts)
    b, p = input_ids.shape
    q = 12
    cache = kv_cache.new_cache()
    prefill(model, cache, input_ids, mask)
    forests = [_random_forest(q, gen) for _ in range(b)]
    tokens = torch.randint(3, VOCAB, (b, q), generator=gen)
    anc = torch.zeros(b, q, q, dtype=torch.bool)
    depth = torch.zeros(b, q, dtype=torch.long)
    for row, parents in enumerate(forests):
        for i in range(q):
            chain = _path(parents, i)
            anc[row, i, chain] = True
            depth[row, i] = len(chain)
    lengths = mask.sum(1)
    logits = forward_tree(model, cache, tokens, lengths[:, None] + depth - 1, mask.bool()[:, None].expand(b, q, p), anc)
    assert logits.shape == (b, q, VOCAB)
    for row, parents in enumerate(forests):
        for i in range(q):
            path = tokens[row, _path(parents, i)].tolist()
            ref = plain_logits(model, prompts[row] + path)[-1]
            torch.testing.assert_close(logits[row, i], ref, atol=ATOL, rtol=0, msg=f"row {row} node {i}")
    # second forward: 4 nodes per row, each hangs under a random first-forest node (and maybe a new sibling)
    hang = torch.randint(0, q, (b, 4), generator=gen)
    tokens2 = torch.randint(3, VOCAB, (b, 4), generator=gen)
    inner = torch.tensor([-1, 0, -1, 2])  # nodes 1 and 3 also descend from new nodes 0 and 2
    past = torch.cat([mask.bool()[:, None].expand(b, 4, p).clone(), torch.zeros(b, 4, q, dtype=torch.bool)], dim=2)
    tree = torch.zeros(b, 4, 4, dtype=torch.bool)
    depth2 = torch.zeros(b, 4, dtype=torch.long)
    paths2 = []
    for row in range(b):
        row_paths = []
        for j in range(4):
            base = int(hang[row, j]) if inner[j] < 0 else int(hang[row, int(inner[j])])
            chain = _path(forests[row], base)
            past[row, j, p + torch.tensor(chain)] = True
            own = [j] if inner[j] < 0 else [int(inner[j]), j]
            tree[row, j, own] = True
            depth2[row, j] = len(chain) + len(own)
            row_paths.append(tokens[row, chain].tolist() + tokens2[row, own].tolist())
        paths2.append(row_paths)
    logits2 = forward_tree(model, cache, tokens2, lengths[:, None] + depth2 - 1, past, tree)
    for row in range(b):
        for j in range(4):
            ref = plain_logits(model, prompts[row] + paths2[row][j])[-1]
            torch.testing.assert_close(logits2[row, j], ref, atol=ATOL, rtol=0, msg=f"row {row} node {j}")


@torch.no_grad()
def test_feed_with_two_unfed_tokens_then_one_equals_sequential_runs(model) -> None:
    """feed() of chains of length 2 (depth - fed = 2), then of a third token under permuted parents, gives each
    beam's logits of a plain run of prompt + its own tokens; afterwards every token is fed."""
    prompts = random_prompts(VOCAB, [3, 7, 5], seed=21)
    input_ids, mask = left_pad(prompts)
    b, w = len(prompts), 4
    cache = kv_cache.new_cache()
    prefill(model, cache, input_ids, mask)
    trie = random_trie(VOCAB, 3, seed=0)  # trie states are irrelevant to feed(); extend() needs one
    state = root_state(mask, capacity=3)
    gen = torch.Generator().manual_seed(5)
    t1, t2, t3 = (torch.randint(3, VOCAB, (b, w), generator=gen) for _ in range(3))
    zeros = torch.zeros(b, w)
    state = extend(state, torch.zeros(b, w, dtype=torch.long), t1, zeros, trie)
    state = extend(state, torch.arange(w).expand(b, w), t2, zeros, trie)
    assert (state.depth - state.fed).tolist() == [2, 2, 2]
    logits, state = feed(model, cache, state)
    assert (state.fed == state.depth).all() and state.visible.shape[2] == kv_cache.cache_length(cache)
    for row in range(b):
        for beam in range(w):
            ref = plain_logits(model, prompts[row] + [int(t1[row, beam]), int(t2[row, beam])])[-1]
            torch.testing.assert_close(logits[row, beam], ref, atol=ATOL, rtol=0)
    parents = torch.tensor([[3, 3, 0, 1], [2, 1, 0, 0], [1, 2, 3, 0]])
    state = extend(state, parents, t3, zeros, trie)
    logits, state = feed(model, cache, state)
    for row in range(b):
        for beam in range(w):
            parent = int(parents[row, beam])
            path = [int(t1[row, parent]), int(t2[row, parent]), int(t3[row, beam])]
            assert state.sequences[row, beam].tolist() == path
            ref = plain_logits(model, prompts[row] + path)[-1]
            torch.testing.assert_close(logits[row, beam], ref, atol=ATOL, rtol=0)


@torch.no_grad()
def test_feed_with_rows_at_different_unfed_lengths(model) -> None:
    """Rows with 2, 1 and 2 unfed tokens in one forward: each beam's logits follow its own full sequence."""
    prompts = random_prompts(VOCAB, [4, 2, 6], seed=22)
    input_ids, mask = left_pad(prompts)
    b, w = 3, 2
    cache = kv_cache.new_cache()
    prefill(model, cache, input_ids, mask)
    trie = random_trie(VOCAB, 3, seed=0)
    state = root_state(mask, capacity=3)
    gen = torch.Generator().manual_seed(6)
    first = torch.randint(3, VOCAB, (b, w), generator=gen)
    state = extend(state, torch.zeros(b, w, dtype=torch.long), first, torch.zeros(b, w), trie)
    _, state = feed(model, cache, state)  # every row: depth 1, fed 1
    sequences = state.sequences.clone()
    sequences[:, :, 1:3] = torch.randint(3, VOCAB, (b, w, 2), generator=gen)
    state = dataclasses.replace(state, sequences=sequences, depth=torch.tensor([3, 2, 3]))
    logits, state = feed(model, cache, state)
    for row in range(b):
        depth = [3, 2, 3][row]
        for beam in range(w):
            path = sequences[row, beam, :depth].tolist()
            ref = plain_logits(model, prompts[row] + path)[-1]
            torch.testing.assert_close(logits[row, beam], ref, atol=ATOL, rtol=0, msg=f"row {row} beam {beam}")


@pytest.mark.parametrize(
    ("family", "k", "n", "levels"),
    [("llama", 3, 4, 2), ("llama", 2, 5, 3), ("llama", 1, 1, 1), *((f, 2, 5, 3) for f in OTHER_FAMILIES)],
)
@torch.no_grad()
def test_verification_forward_gives_every_drafted_node_its_sequential_logits(family, k, n, levels) -> None:
    """The draft's token tree (K beams, G levels of N) verified in one target forward: each node's logits equal a
    plain run of prompt + the node's identifier tokens; the node table agrees with the tree's parents/tokens."""
    model, draft = target_of(family), draft_of(family)
    prompts = random_prompts(VOCAB, [5, 2], seed=23)
    input_ids, mask = left_pad(prompts)
    trie = random_trie(VOCAB, 4, seed=1)
    t_cache, d_cache = kv_cache.new_cache(), kv_cache.new_cache()
    logits = prefill(model, t_cache, input_ids, mask)
    prefill(draft, d_cache, input_ids, mask)
    root = root_state(mask, capacity=8)
    beams = extend(root, *select_top(candidates(logits[:, None], root.scores, root.trie_states, trie), k, VOCAB), trie)
    tree, table = draft_tree(draft, d_cache, beams, trie, n, levels, select_top)
    assert tree.parents.shape == tree.tokens.shape == (2, levels, n)
    node_logits, visible = _verify_forward(model, t_cache, beams, tree)
    assert node_logits.shape == (2, tree.num_nodes, VOCAB)
    assert visible.shape == (2, tree.num_nodes, kv_cache.cache_length(t_cache))
    for g in range(1, levels + 1):
        nodes = tree.offset(g) + torch.arange(n)
        parents = tree.parent_nodes(g)
        for row in range(2):
            for j, node in enumerate(nodes.tolist()):
                seq, parent_seq = table.sequences[row, node], table.sequences[row, int(parents[row, j])]
                assert seq[:g].tolist() == parent_seq[:g].tolist()
                assert int(seq[g]) == int(tree.tokens[row, g - 1, j])
    for row in range(2):
        for node in range(tree.num_nodes):
            level = 0 if node < k else 1 + (node - k) // n
            path = table.sequences[row, node, : level + 1].tolist()
            assert trie.states_for(torch.tensor([path]))[0] >= 0, "drafted paths stay inside the trie"
            ref = plain_logits(model, prompts[row] + path)[-1]
            torch.testing.assert_close(node_logits[row, node], ref, atol=ATOL, rtol=0, msg=f"row {row} node {node}")
