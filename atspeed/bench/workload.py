"""What the benchmark decodes: a target, a draft, the trie and the prompts of a fixed set of test requests.

``load_workload`` reads exported model directories and the test requests of a dataset (through ``RecDataModule``
with ``model_dir``, so prompts match training); ``smoke_workload`` builds tiny random models (Llama unless another
family is asked) and prompts in memory.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from atspeed.data.datamodule import EvalSpec, RecDataModule
from atspeed.data.export_dir import ExportMeta, check_same_identifiers
from atspeed.data.sources import source_options
from atspeed.errors import DataError
from atspeed.items.trie import PrefixTrie
from atspeed.models.build import load_model
from atspeed.models.families import Family, family_config, random_model


@dataclass(frozen=True)
class Workload:
    """Models, constraint and requests; request i is ``prompts[i]`` (token ids, unpadded) with ``targets[i]``."""

    target: torch.nn.Module
    draft: torch.nn.Module
    trie: PrefixTrie
    levels: int
    pad_token_id: int
    prompts: list[list[int]]
    targets: list[list[int]]  # ground-truth item positions (index rows) of each request
    info: dict = field(default_factory=dict)  # where the models and requests came from, for the report

    def to(self, device: torch.device) -> Workload:
        """The models on ``device``; the trie stays on the CPU (each decoder copies it to its prompts' device)."""
        return Workload(
            self.target.to(device), self.draft.to(device), self.trie, self.levels, self.pad_token_id, self.prompts,
            self.targets, self.info,
        )  # fmt: skip

    def batches(self, batch_size: int, count: int, device: torch.device) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The first ``count`` requests as left-padded ``(input_ids [b, P], attention_mask [b, P])`` batches."""
        out = []
        for start in range(0, count, batch_size):
            rows = self.prompts[start : min(start + batch_size, count)]
            width = max(map(len, rows))
            ids = torch.tensor([[self.pad_token_id] * (width - len(r)) + r for r in rows], dtype=torch.long)
            mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], dtype=torch.long)
            out.append((ids.to(device), mask.to(device)))
        return out


def parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def load_workload(
    target_dir: str,
    draft_dir: str,
    requests: int,
    source: str = "processed",
    path: str | None = None,
    index_key_offset: int = 0,
    split: str = "global_time",
    dtype: str = "float32",
    seed: int = 0,
) -> Workload:
    """The exported target and draft, and ``requests`` test requests (a seeded random subset) of the dataset."""
    meta = ExportMeta.load(target_dir)
    check_same_identifiers(target_dir, draft_dir, "--draft")
    dm = RecDataModule(
        source=source_options(source, path=path), index_key_offset=index_key_offset, split=split, model_dir=target_dir,
        eval=EvalSpec(test_users=requests), seed=seed,
    )  # fmt: skip
    dm.setup()
    prepared = dm.prepared
    chosen = dm.eval_requests("test")
    if len(chosen) < requests:
        raise DataError(f"--requests: the test split has only {len(chosen)} requests, {requests} asked")
    prompts = prepared.encoder.prompts([history for _, history, _ in chosen])
    info = {
        "target": str(target_dir),
        "draft": str(draft_dir),
        "data": {"source": source, "path": path, "index_key_offset": index_key_offset, "split": split},
        "items": len(prepared.index),
        "dataset": meta.dataset,
    }
    return Workload(
        target=load_model(target_dir, dtype),
        draft=load_model(draft_dir, dtype),
        trie=prepared.trie,
        levels=meta.levels,
        pad_token_id=int(prepared.tokenizer.pad_token_id),
        prompts=prompts,
        targets=[list(t) for _, _, t in chosen],
        info=info,
    )


# -- the smoke preset: tiny random models --------------------------------------------------------------------

PAD, BOS, EOS = 0, 1, 2
SMOKE_VOCAB, SMOKE_LEVELS, SMOKE_ITEMS = 60, 4, 300


def _tiny_model(family: Family, hidden: int, layers: int, seed: int, dtype: str) -> torch.nn.Module:
    """A seeded random model; initializer_range 0.2 makes its distributions peaked (few near-ties)."""
    config = family_config(
        family, vocab_size=SMOKE_VOCAB, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=2, max_position_embeddings=128, initializer_range=0.2, pad_token_id=PAD,
        bos_token_id=BOS, eos_token_id=EOS,
    )  # fmt: skip
    return random_model(config, seed).to(getattr(torch, dtype))


def smoke_workload(requests: int, dtype: str = "float32", seed: int = 0, family: Family = "llama") -> Workload:
    """A 2-layer target (hidden 32) and a 1-layer draft (hidden 16), random L = 4 identifiers, prompts of 20-40."""
    gen = torch.Generator().manual_seed(seed)
    identifiers = torch.unique(torch.randint(4, SMOKE_VOCAB, (SMOKE_ITEMS, SMOKE_LEVELS), generator=gen), dim=0)
    lengths = torch.randint(20, 41, (requests,), generator=gen).tolist()
    prompts = [[BOS, *torch.randint(3, SMOKE_VOCAB, (n - 1,), generator=gen).tolist()] for n in lengths]
    targets = torch.randint(0, identifiers.shape[0], (requests, 1), generator=gen).tolist()
    return Workload(
        target=_tiny_model(family, 32, 2, seed, dtype),
        draft=_tiny_model(family, 16, 1, seed + 1, dtype),
        trie=PrefixTrie.build(identifiers, SMOKE_VOCAB, eos_token_id=EOS),
        levels=SMOKE_LEVELS,
        pad_token_id=PAD,
        prompts=prompts,
        targets=targets,
        info={"target": f"random tiny {family} (hidden 32, 2 layers)",
              "draft": f"random tiny {family} (hidden 16, 1 layer)", "data": "random prompts of 20-40 tokens",
              "items": int(identifiers.shape[0])},
    )  # fmt: skip
