"""KV-cache operations on real ``DynamicCache`` objects: crop, position gathers, row selection, compaction, states
kept and copied into new caches; on real models of each family."""

from __future__ import annotations

import pytest
import torch
from decoding_helpers import ALL_FAMILIES, left_pad, one_torch_thread, plain_logits, random_prompts, tiny_model
from transformers import DynamicCache, PreTrainedModel

from atspeed.decoding.cache import kv_cache
from atspeed.decoding.cache.tree_attention import forward_tree, prefill

VOCAB = 40


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    yield from one_torch_thread()


def known_cache(rows: int = 3, length: int = 5, layers: int = 2) -> tuple[DynamicCache, list[torch.Tensor]]:
    """A cache filled through ``update`` with known random keys (values = keys + 100, to tell them apart)."""
    cache = kv_cache.new_cache()
    keys = []
    for layer in range(layers):
        k = torch.randn(rows, 2, length, 4)
        cache.update(k, k + 100.0, layer)
        keys.append(k)
    return cache, keys


def assert_layers(cache: DynamicCache, expected_keys: list[torch.Tensor]) -> None:
    assert len(cache.layers) == len(expected_keys)
    for layer, k in zip(cache.layers, expected_keys, strict=True):
        torch.testing.assert_close(layer.keys, k, rtol=0, atol=0)
        torch.testing.assert_close(layer.values, k + 100.0, rtol=0, atol=0)


@pytest.fixture(scope="module")
def models() -> dict[str, PreTrainedModel]:
    return {family: tiny_model(VOCAB, seed=3, family=family) for family in ALL_FAMILIES}


@pytest.fixture(scope="module")
def model(models) -> PreTrainedModel:
    return models["llama"]


def test_cache_length_counts_positions() -> None:
    """An empty cache holds 0 positions; a filled one the number written."""
    assert kv_cache.cache_length(kv_cache.new_cache()) == 0
    cache, _ = known_cache(length=5)
    assert kv_cache.cache_length(cache) == 5


@pytest.mark.parametrize("length", [0, 2, 4, 5])
def test_crop_keeps_the_first_positions_of_every_layer(length: int) -> None:
    """crop(n) leaves exactly positions 0..n-1 of keys and values in every layer (n = S is a no-op)."""
    cache, keys = known_cache(length=5)
    kv_cache.crop(cache, length)
    assert kv_cache.cache_length(cache) == length
    assert_layers(cache, [k[:, :, :length] for k in keys])


@pytest.mark.parametrize("length", [-1, 6, 100])
def test_crop_to_a_bad_length_raises(length: int) -> None:
    """Negative lengths and lengths beyond the cache are refused, and the cache is left untouched."""
    cache, keys = known_cache(length=5)
    with pytest.raises(ValueError, match="cannot crop a cache of 5 positions"):
        kv_cache.crop(cache, length)
    assert_layers(cache, keys)


def test_gather_positions_takes_each_rows_own_positions_in_order() -> None:
    """Row b of the result holds positions index[b] of row b, in that order (repeats and reorders allowed)."""
    cache, keys = known_cache(rows=3, length=5)
    index = torch.tensor([[4, 0, 2], [1, 1, 3], [0, 1, 2]])
    kv_cache.gather_positions(cache, index)
    assert kv_cache.cache_length(cache) == 3
    expected = [torch.stack([k[b, :, index[b]] for b in range(3)]) for k in keys]
    assert_layers(cache, expected)
    assert torch.equal(cache.layers[0].keys[0, :, 0], keys[0][0, :, 4])  # spot check against the source


def test_select_rows_keeps_and_reorders_rows() -> None:
    """select_rows([2, 0]) leaves rows 2 then 0 of every layer, positions unchanged."""
    cache, keys = known_cache(rows=3, length=5)
    kv_cache.select_rows(cache, torch.tensor([2, 0]))
    assert kv_cache.cache_length(cache) == 5
    assert_layers(cache, [k[[2, 0]] for k in keys])


def test_keep_index_on_a_hand_made_example() -> None:
    """Needed positions first in their original order, then fillers; ``kept`` marks the needed ones."""
    needed = torch.tensor(
        [
            [False, True, False, True, True],
            [True, False, False, False, False],
            [False, False, False, False, False],
        ]
    )
    index, kept = kv_cache.keep_index(needed)
    assert index.shape == kept.shape == (3, 3)
    assert index[0].tolist() == [1, 3, 4]
    assert index[1, 0].item() == 0
    assert kept.tolist() == [[True, True, True], [True, False, False], [False, False, False]]
    # fillers are unneeded positions (each row's index is a permutation prefix)
    assert not needed[1, index[1, 1:]].any() and not needed[2, index[2]].any()


@pytest.mark.parametrize("seed", range(4))
def test_keep_index_on_random_masks(seed: int) -> None:
    """For random masks (including empty and full rows) every row lists exactly its needed positions first."""
    gen = torch.Generator().manual_seed(seed)
    needed = torch.rand(6, 11, generator=gen) < 0.4
    needed[0] = False
    needed[1] = True
    index, kept = kv_cache.keep_index(needed)
    counts = needed.sum(1)
    assert index.shape[1] == int(counts.max()) == 11
    for b in range(6):
        n = int(counts[b])
        assert index[b, :n].tolist() == needed[b].nonzero()[:, 0].tolist()
        assert kept[b].tolist() == [True] * n + [False] * (index.shape[1] - n)
        assert len(set(index[b].tolist())) == index.shape[1]  # no position taken twice


def _next_logits(
    model: torch.nn.Module, cache: DynamicCache, tokens: torch.Tensor, positions: torch.Tensor, past: torch.Tensor
) -> torch.Tensor:
    """One new token per row ([B]) at ``positions`` [B], attending cached ``past`` [B, S]; logits [B, V]."""
    b = tokens.shape[0]
    tree = torch.zeros(b, 1, 1, dtype=torch.bool)
    return forward_tree(model, cache, tokens[:, None], positions[:, None], past[:, None, :], tree)[:, 0]


@pytest.mark.parametrize("family", ALL_FAMILIES)
@pytest.mark.parametrize("compact", [False, True], ids=["masked", "compacted"])
@torch.no_grad()
def test_junk_positions_masked_or_gathered_away_leave_the_logits_unchanged(models, compact: bool, family) -> None:
    """Prompt + junk nodes, then junk either masked or compacted away (with left padding): continuing decoding
    gives the logits of the prompt alone, for two more tokens."""
    model = models[family]
    prompts = random_prompts(VOCAB, [4, 7, 2], seed=11)
    input_ids, mask = left_pad(prompts)
    b, p = input_ids.shape
    lengths = mask.sum(1)
    cache = kv_cache.new_cache()
    prefill(model, cache, input_ids, mask)
    # three junk nodes that see the prompt and each other
    junk = torch.randint(3, VOCAB, (b, 3))
    junk_pos = lengths[:, None] + torch.arange(3)[None]
    forward_tree(model, cache, junk, junk_pos, mask.bool()[:, None, :].expand(b, 3, p), torch.ones(b, 3, 3).bool())
    assert kv_cache.cache_length(cache) == p + 3
    visible = torch.cat([mask.bool(), torch.zeros(b, 3, dtype=torch.bool)], dim=1)
    if compact:
        index, kept = kv_cache.keep_index(visible)
        kv_cache.gather_positions(cache, index)
        assert kv_cache.cache_length(cache) == int(lengths.max())
        visible = kept
    first, second = torch.tensor([5, 9, 13]), torch.tensor([21, 8, 30])
    got1 = _next_logits(model, cache, first, lengths, visible)
    visible = torch.cat([visible, torch.ones(b, 1, dtype=torch.bool)], dim=1)
    got2 = _next_logits(model, cache, second, lengths + 1, visible)
    for row, prompt in enumerate(prompts):
        ref = plain_logits(model, [*prompt, int(first[row]), int(second[row])])
        torch.testing.assert_close(got1[row], ref[-2], atol=1e-4, rtol=0)
        torch.testing.assert_close(got2[row], ref[-1], atol=1e-4, rtol=0)


@torch.no_grad()
def test_select_rows_then_continuing_decodes_the_chosen_prompts(model) -> None:
    """After dropping and reordering rows of a real cache, each remaining row continues its own prompt."""
    prompts = random_prompts(VOCAB, [5, 3, 6], seed=12)
    input_ids, mask = left_pad(prompts)
    cache = kv_cache.new_cache()
    prefill(model, cache, input_ids, mask)
    rows = torch.tensor([2, 0])
    kv_cache.select_rows(cache, rows)
    tokens = torch.tensor([17, 4])
    got = _next_logits(model, cache, tokens, mask.sum(1)[rows], mask.bool()[rows])
    for i, row in enumerate(rows.tolist()):
        ref = plain_logits(model, prompts[row] + [int(tokens[i])])[-1]
        torch.testing.assert_close(got[i], ref, atol=1e-4, rtol=0)


def test_cache_holding_copies_kept_states_into_every_row() -> None:
    """``layer_states`` of a one-row cache, then ``cache_holding`` for 3 rows: each row holds those keys/values;
    a later gather on the new cache leaves the kept states as they were."""
    one, keys = known_cache(rows=1, length=4)
    states = kv_cache.layer_states(one)
    assert [k for k, _ in states] == [layer.keys for layer in one.layers]
    cache = kv_cache.cache_holding(states, rows=3)
    assert kv_cache.cache_length(cache) == 4
    assert_layers(cache, [k.expand(3, -1, -1, -1) for k in keys])
    kv_cache.gather_positions(cache, torch.tensor([[3, 0], [1, 2], [0, 0]]))
    assert_layers(one, keys)


@pytest.mark.parametrize("family", ALL_FAMILIES)
@torch.no_grad()
def test_a_cache_holding_a_prefills_states_continues_like_the_prefilled_one(models, family: str) -> None:
    """The prompt header's path: prefill one prompt, keep its states, start a cache of 2 rows holding them and run
    a different continuation in each row: each gives the logits of its full sequence run plainly."""
    model = models[family]
    prompt = random_prompts(VOCAB, [5], seed=13)[0]
    one = kv_cache.new_cache()
    prefill(model, one, torch.tensor([prompt]), torch.ones(1, 5, dtype=torch.long))
    cache = kv_cache.cache_holding(kv_cache.layer_states(one), rows=2)
    tokens = torch.tensor([7, 19])
    got = _next_logits(model, cache, tokens, torch.tensor([5, 5]), torch.ones(2, 5, dtype=torch.bool))
    for row in range(2):
        ref = plain_logits(model, [*prompt, int(tokens[row])])[-1]
        torch.testing.assert_close(got[row], ref, atol=1e-4, rtol=0)
