"""Shared builders for the decoding tests: tiny seeded Llamas, random tries, left-padded prompts, bigram stubs."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

from atspeed.items.trie import PrefixTrie

PAD, BOS, EOS = 0, 1, 2


def tiny_llama(vocab: int, seed: int, hidden: int = 32, layers: int = 2, heads: int = 2) -> LlamaForCausalLM:
    """A seeded random Llama in eval mode; initializer_range 0.2 makes its distributions peaked (few near-ties)."""
    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=128,
        initializer_range=0.2,
        pad_token_id=PAD,
        bos_token_id=BOS,
        eos_token_id=EOS,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg).eval()


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
