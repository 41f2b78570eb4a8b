"""Shared builders for the decoding tests: tiny seeded models of each family, random tries, left-padded prompts,
bigram stubs, and the exact K = 1 sampling distribution with its chi-square test."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import AutoModelForCausalLM, DynamicCache, PreTrainedModel

from atspeed.items.trie import PrefixTrie
from atspeed.models.families import FAMILIES, Family, family_config

PAD, BOS, EOS = 0, 1, 2
# every model family atspeed builds: the decoding oracles run over each (the cheapest decisive cases for all but Llama)
ALL_FAMILIES: list[str] = sorted(FAMILIES)
OTHER_FAMILIES: list[str] = [family for family in ALL_FAMILIES if family != "llama"]


def tiny_model(
    vocab: int, seed: int, hidden: int = 32, layers: int = 2, heads: int = 2, family: Family = "llama"
) -> PreTrainedModel:
    """A seeded random model of ``family`` in eval mode; initializer_range 0.2 makes its distributions peaked (few
    near-ties)."""
    cfg = family_config(
        family,
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        max_position_embeddings=128,
        initializer_range=0.2,
        pad_token_id=PAD,
        bos_token_id=BOS,
        eos_token_id=EOS,
    )
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(cfg).eval()


def random_identifiers(vocab: int, levels: int, seed: int, count: int = 400) -> torch.Tensor:
    """Distinct identifiers [I, L] over tokens 4..V-1 (never pad, BOS or EOS)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.unique(torch.randint(4, vocab, (count, levels), generator=gen), dim=0)


def random_trie(vocab: int, levels: int, seed: int, count: int = 400) -> PrefixTrie:
    return PrefixTrie.build(random_identifiers(vocab, levels, seed, count), vocab, eos_token_id=EOS)


def left_pad(prompts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """``input_ids`` [B, P] left-padded with PAD and the matching ``attention_mask``."""
    width = max(map(len, prompts))
    input_ids = torch.tensor([[PAD] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    return input_ids, mask


def random_prompts(vocab: int, lengths: list[int], seed: int) -> list[list[int]]:
    """Prompts of the given lengths over tokens 3..V-1 (no pad, BOS or EOS)."""
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=gen).tolist() for n in lengths]


def speculative_world(
    vocab: int,
    levels: int,
    lengths: list[int],
    seed: int,
    draft_seed: int,
    prompt_seed: int,
    items: int = 400,
    family: Family = "llama",
) -> tuple[PreTrainedModel, PreTrainedModel, PrefixTrie, list[list[int]]]:
    """(target, a smaller draft (1 layer, hidden 16), a random trie, random prompts of ``lengths``)."""
    target = tiny_model(vocab, seed=seed, family=family)
    draft = tiny_model(vocab, seed=draft_seed, hidden=16, layers=1, family=family)
    trie = random_trie(vocab, levels, seed=seed, count=items)
    return target, draft, trie, random_prompts(vocab, lengths, seed=prompt_seed)


def sampling_world(
    vocab: int, levels: int, items: int, seed: int, family: Family = "llama"
) -> tuple[PreTrainedModel, torch.Tensor, PrefixTrie]:
    """(a model, its ``items`` random identifiers [I, L], their trie): the world of the distribution tests."""
    identifiers = random_identifiers(vocab, levels, seed=seed, count=items)
    trie = PrefixTrie.build(identifiers, vocab, eos_token_id=EOS)
    return tiny_model(vocab, seed=seed, family=family), identifiers, trie


@torch.no_grad()
def plain_logits(model: torch.nn.Module, tokens: list[int]) -> torch.Tensor:
    """Float32 logits [n, V] of one unpadded sequence, no cache, no mask: the reference for every cached path."""
    return model(input_ids=torch.tensor([tokens])).logits[0].float()


def true_scores(model: torch.nn.Module, prompt: list[int], sequences: torch.Tensor) -> torch.Tensor:
    """Cumulative log-probabilities [M] of identifier ``sequences`` [M, L] after ``prompt`` (unconstrained softmax)."""
    out = []
    for code in sequences.tolist():
        logits = plain_logits(model, prompt + code)
        logp = torch.log_softmax(logits[len(prompt) - 1 : -1], dim=-1)
        out.append(logp.gather(1, torch.tensor(code)[:, None]).sum())
    return torch.stack(out)


@dataclass
class StubOutput:
    logits: torch.Tensor


class BigramStub(torch.nn.Module):
    """A "language model" whose next-token logits depend only on the input token: ``table[token]``.

    It honours the cache protocol the decoders rely on: each forward appends q dummy positions to the given
    ``DynamicCache`` (so cached lengths, gathers and visibility masks stay consistent), ignores masks and
    positions, and returns only the last ``logits_to_keep`` positions when asked.
    """

    def __init__(self, table: torch.Tensor) -> None:
        super().__init__()
        self.table = torch.nn.Parameter(table.float().clone(), requires_grad=False)
        self.head = torch.nn.Linear(2, table.shape[0], bias=False)
        self.calls = 0

    def get_output_embeddings(self) -> torch.nn.Linear:
        return self.head

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        past_key_values: DynamicCache | None = None,
        use_cache: bool = True,
        logits_to_keep: int = 0,
        **kwargs,
    ) -> StubOutput:
        self.calls += 1
        b, q = input_ids.shape
        if past_key_values is not None:
            kv = input_ids[:, None, :, None].float().expand(b, 1, q, 2).clone()
            past_key_values.update(kv, kv.clone(), 0)
        logits = self.table[input_ids]
        if logits_to_keep:
            logits = logits[:, -logits_to_keep:]
        return StubOutput(logits)


# Bigram stub world: prompts end in token 3 or 16; identifier level t (0-based) uses tokens 4 + 3t .. 6 + 3t.
STUB_VOCAB = 20
STUB_PROMPT_A, STUB_PROMPT_B = 3, 16


def stub_trie(levels: int) -> PrefixTrie:
    """The full trie {4,5,6} x {7,8,9} x ... (3 ** levels items), EOS after a complete identifier."""
    grids = torch.meshgrid(*[torch.arange(4 + 3 * t, 7 + 3 * t) for t in range(levels)], indexing="ij")
    identifiers = torch.stack([g.reshape(-1) for g in grids], dim=1)
    return PrefixTrie.build(identifiers, STUB_VOCAB, eos_token_id=EOS)


def stub_table(rows: dict[int, dict[int, float]], default: float = -4.0) -> torch.Tensor:
    """A [V, V] logit table: ``default`` everywhere, ``rows[token][next] = logit`` where given."""
    table = torch.full((STUB_VOCAB, STUB_VOCAB), default)
    for token, row in rows.items():
        for nxt, logit in row.items():
            table[token, nxt] = logit
    return table


# The target's preferences: first choice logit 0, then -1, -2 (or -2, -5: no near-ties between beams).
TARGET_ROWS: dict[int, dict[int, float]] = {
    STUB_PROMPT_A: {4: 0.0, 5: -1.0, 6: -2.5},
    STUB_PROMPT_B: {6: 0.0, 5: -1.0, 4: -2.5},
    4: {7: 0.0, 8: -2.0, 9: -5.0},
    5: {8: 0.0, 9: -1.5, 7: -3.5},
    6: {9: 0.0, 7: -1.0, 8: -3.0},
    7: {10: 0.0, 11: -1.0, 12: -3.0},
    8: {11: 0.0, 12: -2.0, 10: -3.5},
    9: {12: 0.0, 10: -1.5, 11: -4.0},
    10: {13: 0.0, 14: -1.0, 15: -3.0},
    11: {14: 0.0, 15: -2.0, 13: -3.5},
    12: {15: 0.0, 13: -1.5, 14: -4.0},
}


def reversed_row(row: dict[int, float]) -> dict[int, float]:
    """The same logits, assigned in the opposite order of preference."""
    tokens = sorted(row, key=row.get)
    return dict(zip(tokens, sorted(row.values(), reverse=True), strict=True))


def check_spec_stats(stats, lists: int, levels: int, gamma: int) -> list[list[int]]:
    """Replay the speculative loop's bookkeeping from ``stats.accepted`` and check every counter.

    There is no target prefill call: the first call takes the prompt with the first tree. Each call of a list still
    decoding drafts G = min(gamma, most levels left in the batch) (the first time: the draft's prefill and G - 1
    steps), accepts m in [0, min(G, left)] levels and gains m + 1 tokens (m when the accepted nodes already complete
    the identifier). Returns the accepted depths of each list.
    """
    left = [levels] * lists
    target_calls, draft_calls = [0] * lists, [0] * lists
    per_list: list[list[int]] = [[] for _ in range(lists)]
    accepted = stats.accepted.tolist()
    pos = 0
    active = [i for i in range(lists) if left[i] > 0]
    while active:
        g = min(gamma, max(left[i] for i in active))
        for i in active:
            assert pos < len(accepted), "fewer accepted entries than verification calls"
            m = accepted[pos]
            pos += 1
            assert 0 <= m <= min(g, left[i]), (i, m, g, left[i])
            left[i] -= min(m + 1, left[i])
            target_calls[i] += 1
            draft_calls[i] += g
            per_list[i].append(m)
        active = [i for i in active if left[i] > 0]
    assert pos == len(accepted), "more accepted entries than verification calls"
    assert stats.target_calls.tolist() == target_calls
    assert stats.draft_calls.tolist() == draft_calls
    return per_list


def one_torch_thread():
    """Generator for a module-scoped fixture: run torch single-threaded, then restore the thread count.

    The models here are tiny, so intra-op threads only add synchronisation; on a small shared machine, busy-waiting
    OpenMP threads slow these tests down several times over when another process holds a core."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def exact_distribution(model, prompt: list[int], identifiers: torch.Tensor, trie: PrefixTrie) -> torch.Tensor:
    """P(identifier) [I] of ``identifiers`` [I, L] after ``prompt``, under level-by-level renormalisation over the
    trie's allowed codes (what sampling at K = 1 must follow)."""
    probs = torch.ones(len(identifiers))
    with torch.no_grad():
        for t in range(identifiers.shape[1]):
            ids = torch.tensor([prompt + row[:t] for row in identifiers.tolist()])
            logits = model(input_ids=ids).logits[:, -1].float()  # [I, V]
            states = trie.states_for(identifiers[:, :t]) if t else torch.zeros(len(identifiers), dtype=torch.long)
            allowed = trie.mask(states)
            step = torch.softmax(logits.masked_fill(~allowed, float("-inf")), dim=-1)
            probs *= step.gather(1, identifiers[:, t : t + 1])[:, 0]
    return probs


def chi_square_p(counts: torch.Tensor, expected: torch.Tensor) -> float:
    """Pearson's chi-square p-value; cells expecting fewer than 5 draws are pooled into one."""
    small = expected < 5
    counts = torch.cat([counts[~small], counts[small].sum(0, keepdim=True)])
    expected = torch.cat([expected[~small], expected[small].sum(0, keepdim=True)])
    keep = expected > 0
    stat = float(((counts[keep] - expected[keep]) ** 2 / expected[keep]).sum())
    dof = int(keep.sum()) - 1
    return float(torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64), torch.tensor(stat / 2)))


@dataclass(frozen=True)
class ElsewhereTrie(PrefixTrie):
    """``home`` with its tensors on the meta device, which holds no data: decoding CPU prompts with it fails as CUDA
    prompts fail with a CPU trie, unless the decoder moves it. ``to(device)`` gives ``home`` there (meta tensors
    cannot be copied out) and records the move in ``moves``."""

    home: PrefixTrie | None = None
    moves: list = None

    @classmethod
    def of(cls, home: PrefixTrie) -> ElsewhereTrie:
        meta = home.to("meta")
        fields = {name: getattr(meta, name) for name in ("vocab_size", "levels", "rule", "eos_token_id", "graph")}
        return cls(**fields, exact=meta.exact, home=home, moves=[])

    def to(self, device: str | torch.device) -> PrefixTrie:
        self.moves.append(torch.device(device))
        return self.home.to(device)
