"""Prefix trie: vectorised masks and transitions against a slow pure-Python reference."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from atspeed.data.index_file import read_index
from atspeed.items.index import ItemIndex
from atspeed.items.trie import PrefixTrie

BEAUTY_INDEX = Path(__file__).resolve().parents[3] / "shared/data/amazon-beauty/beauty.LCRec-1e-3lr.json"


class ReferenceTrie:
    """Dict-of-dicts trie (exact rule) or per-level token sets (per-position rule): the slow oracle."""

    def __init__(self, identifiers: list[list[int]], rule: str, eos: int | None) -> None:
        self.levels, self.rule, self.eos = len(identifiers[0]), rule, eos
        self.root: dict = {}
        for identifier in identifiers:
            node = self.root
            for token in identifier:
                node = node.setdefault(token, {})
        self.per_level = [{identifier[t] for identifier in identifiers} for t in range(self.levels)]
        self.items = {tuple(identifier): i for i, identifier in enumerate(identifiers)}

    def allowed(self, prefix: list[int]) -> set[int]:
        """Allowed next tokens after ``prefix``, or the empty set if the prefix is invalid."""
        node = self.root
        for t, token in enumerate(prefix):
            if t >= self.levels:
                if token != self.eos:  # only EOS padding may follow a complete identifier
                    return set()
                continue
            if self.rule == "exact":
                if token not in node:
                    return set()
                node = node[token]
            elif token not in self.per_level[t]:
                return set()
        if len(prefix) >= self.levels:
            return {self.eos} if self.eos is not None else set()
        return set(node) if self.rule == "exact" else set(self.per_level[len(prefix)])


def _random_identifiers(rng: random.Random, num: int, levels: int, per_level: int, base: int) -> list[list[int]]:
    """Distinct identifiers; level t uses token ids base + t * per_level + [0, per_level)."""
    seen: set[tuple[int, ...]] = set()
    while len(seen) < num:
        seen.add(tuple(base + t * per_level + rng.randrange(per_level) for t in range(levels)))
    return [list(identifier) for identifier in sorted(seen, key=lambda _: rng.random())]


def _random_prefixes(rng: random.Random, identifiers: list[list[int]], vocab: int, count: int) -> list[list[int]]:
    """Prefixes of lengths 0..L: true prefixes, and ones with a random (mostly invalid) token somewhere."""
    levels = len(identifiers[0])
    prefixes = []
    for _ in range(count):
        prefix = list(rng.choice(identifiers)[: rng.randint(0, levels)])
        if prefix and rng.random() < 0.5:
            prefix[rng.randrange(len(prefix))] = rng.randrange(vocab)
        prefixes.append(prefix)
    return prefixes


def _mask_row(allowed: set[int], vocab: int) -> torch.Tensor:
    row = torch.zeros(vocab, dtype=torch.bool)
    row[list(allowed)] = True
    return row


@pytest.mark.parametrize("dense", [True, False], ids=["table", "sparse"])
@pytest.mark.parametrize("rule", ["exact", "per_position"])
@pytest.mark.parametrize("eos", [None, 1])
@pytest.mark.parametrize("levels", [1, 3, 4])
def test_masks_match_reference_on_random_prefixes(rule: str, eos: int | None, levels: int, dense: bool,
                                                  monkeypatch) -> None:  # fmt: skip
    """Masks from the precomputed table (small tries) and computed per call (above DENSE_MASK_LIMIT) alike."""
    if not dense:
        monkeypatch.setattr("atspeed.items.trie.DENSE_MASK_LIMIT", 0)
    rng = random.Random(levels * 10 + (eos or 0))
    per_level, base = 6, 5
    vocab = base + levels * per_level + 3
    identifiers = _random_identifiers(rng, min(40, per_level**levels), levels, per_level, base)
    trie = PrefixTrie.build(torch.tensor(identifiers), vocab, rule=rule, eos_token_id=eos)
    reference = ReferenceTrie(identifiers, rule, eos)
    prefixes = _random_prefixes(rng, identifiers, vocab, 400)
    for length in range(levels + 1):  # states_for takes equal-length prefixes
        batch = [p for p in prefixes if len(p) == length]
        states = trie.states_for(torch.tensor(batch, dtype=torch.long).reshape(len(batch), length))
        expected = torch.stack([_mask_row(reference.allowed(p), vocab) for p in batch])
        assert torch.equal(trie.mask(states), expected)
        assert [sorted(trie.allowed_tokens(p)) for p in batch] == [sorted(reference.allowed(p)) for p in batch]


def test_per_position_is_looser_than_exact() -> None:
    identifiers = torch.tensor([[0, 2], [1, 3]])
    exact = PrefixTrie.build(identifiers, 4)
    loose = PrefixTrie.build(identifiers, 4, rule="per_position")
    assert exact.allowed_tokens([0]) == [2]
    assert loose.allowed_tokens([0]) == [2, 3]
    assert int(exact.states_for(torch.tensor([[0, 3]]))[0]) == -1
    assert int(loose.states_for(torch.tensor([[0, 3]]))[0]) >= 0
    assert loose.lookup(torch.tensor([[0, 3], [1, 3]])).tolist() == [-1, 1]  # lookup stays exact


def test_advance_dead_stays_dead_and_rejects_out_of_range_tokens() -> None:
    trie = PrefixTrie.build(torch.tensor([[2, 4], [3, 5]]), 6, eos_token_id=0)
    states = trie.advance(trie.start(5), torch.tensor([2, 4, -1, 6, 3 + 6]))  # 3 + V would alias key (1, 3)
    assert states[0] > 0 and (states[1:] == -1).all()
    assert (trie.advance(torch.tensor([-1]), torch.tensor([2])) == -1).all()
    assert not trie.mask(torch.tensor([-1])).any()


def test_eos_after_a_complete_identifier_keeps_the_state() -> None:
    trie = PrefixTrie.build(torch.tensor([[2, 4], [3, 5]]), 6, eos_token_id=0)
    leaf = trie.states_for(torch.tensor([[2, 4]]))
    assert torch.equal(trie.advance(leaf, torch.tensor([0])), leaf)
    assert trie.mask(leaf)[0].nonzero().flatten().tolist() == [0]
    assert (trie.advance(leaf, torch.tensor([4])) == -1).all()
    assert (trie.advance(trie.start(1), torch.tensor([0])) == -1).all()  # EOS is not allowed mid-identifier
    no_eos = PrefixTrie.build(torch.tensor([[2, 4], [3, 5]]), 6)
    assert not no_eos.mask(no_eos.states_for(torch.tensor([[2, 4]]))).any()


def test_lookup_returns_row_or_minus_one() -> None:
    identifiers = torch.tensor([[1, 2, 3], [1, 2, 4], [5, 2, 3]])
    trie = PrefixTrie.build(identifiers, 8)
    queries = torch.tensor([[5, 2, 3], [1, 2, 4], [1, 2, 3], [1, 2, 5], [5, 2, 4], [9, 9, 9], [-1, 2, 3]])
    assert trie.lookup(queries).tolist() == [2, 1, 0, -1, -1, -1, -1]
    lists = torch.stack([queries[:3], queries[3:6]])  # decoded lists [B=2, K=3, L=3]
    assert trie.lookup(lists).tolist() == [[2, 1, 0], [-1, -1, -1]]
    with pytest.raises(ValueError, match=r"\[\.\.\., 3\]"):
        trie.lookup(torch.tensor([[1, 2]]))


@pytest.mark.parametrize(
    ("identifiers", "kwargs", "match"),
    [
        ([[1, 2], [3, 4], [1, 2]], {}, "distinct"),
        ([[1, 2], [3, 9]], {}, "vocab_size"),
        ([[1, 2], [3, 4]], {"eos_token_id": 4}, "eos_token_id 4 is also an identifier token"),
        ([[1, 2], [3, 4]], {"eos_token_id": 10}, "eos_token_id must lie"),
        ([[1, 2], [3, 4]], {"rule": "loose"}, "rule must be one of"),
    ],
)
def test_build_rejects_bad_identifiers(identifiers: list, kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        PrefixTrie.build(torch.tensor(identifiers), 5, **kwargs)


def test_to_moves_every_tensor_and_keeps_behaviour() -> None:
    trie = PrefixTrie.build(torch.tensor([[1, 2], [1, 3]]), 5, eos_token_id=0)
    moved = trie.to("meta")
    assert moved.device.type == "meta" and moved.exact is moved.graph
    assert trie.to("cpu").allowed_tokens([1]) == [2, 3]


@pytest.mark.skipif(not BEAUTY_INDEX.is_file(), reason="shared Beauty data not available")
@pytest.mark.parametrize("base_vocab", [1_000, 32_000])
def test_beauty_index(base_vocab: int) -> None:
    index, _ = ItemIndex.from_mapping(read_index(BEAUTY_INDEX), str(BEAUTY_INDEX), on_duplicate="resolve")
    token_id = {token: base_vocab + i for i, token in enumerate(index.all_tokens())}
    vocab = base_vocab + len(token_id)
    identifiers = [[token_id[token] for token in code] for code in index.codes]
    trie = PrefixTrie.build(torch.tensor(identifiers), vocab, eos_token_id=2)
    assert torch.equal(trie.lookup(torch.tensor(identifiers)), torch.arange(len(index)))

    rng = random.Random(0)
    reference = ReferenceTrie(identifiers, "exact", 2)
    prefixes = _random_prefixes(rng, identifiers, vocab, 300)
    for length in range(5):
        batch = [p for p in prefixes if len(p) == length]
        states = trie.states_for(torch.tensor(batch, dtype=torch.long).reshape(len(batch), length))
        expected = torch.stack([_mask_row(reference.allowed(p), vocab) for p in batch])
        assert torch.equal(trie.mask(states), expected)
    root_allowed = trie.mask(trie.start(1))[0].nonzero().flatten()
    assert root_allowed.numel() == 91  # level-a tokens in use
    loose = PrefixTrie.build(torch.tensor(identifiers), vocab, rule="per_position")
    assert loose.mask(loose.states_for(torch.tensor([identifiers[0][:3]]))).sum() == 256
