"""Decoding of the alignment study, one row at a time and resumable.

The references (``beam``, ``beam_sample``, and ``beam_sample_keyed`` where the decoder table has it) run once per K;
then every draft is swapped into the workload and decoded with every studied decoder at every K (N, gamma fixed).
Each row is appended to a partial JSON file (written atomically) as soon as it is decoded; a rerun reads it and skips
the rows it holds, so a killed study loses at most the row in progress. Recall/NDCG are computed per request at
cutoff min(10, K) against the ground truth, with their standard error over the decoded requests.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from atspeed.bench.alignment_study import Draft
from atspeed.bench.decode_bench import BenchConfig, Runner, make_row, time_group
from atspeed.bench.report import write_json
from atspeed.bench.workload import Workload, parameters
from atspeed.data.export_dir import check_same_identifiers
from atspeed.decoding.decoders import DECODERS
from atspeed.models.build import load_model

log = logging.getLogger("atspeed.study")

CUTOFF = 10  # Recall/NDCG@10, the paper's (at min(10, K) for shorter lists)
Z95 = 1.959964  # two-sided 95 % normal quantile


def default_decoders() -> tuple[str, ...]:
    """spec_strict, spec_relaxed (the paper's rule), spec_relaxed_exact, and spec_keyed where the table has it."""
    return tuple(d for d in ("spec_strict", "spec_relaxed", "spec_relaxed_exact", "spec_keyed") if d in DECODERS)


def default_references() -> tuple[str, ...]:
    return tuple(d for d in ("beam", "beam_sample", "beam_sample_keyed") if d in DECODERS)


@dataclass(frozen=True)
class DecodePlan:
    """What every draft is decoded with; ``requests`` test requests at batch size 1."""

    decoders: tuple[str, ...]
    references: tuple[str, ...]
    ks: tuple[int, ...]
    draft_beams: int
    gamma: int
    requests: int
    seed: int = 0
    repeats: int = 1
    warmup: int = 1
    dtype: str = "float32"

    def configs(self, draft: Draft | None) -> list[BenchConfig]:
        if draft is None:
            return [BenchConfig(d, k, 1) for k in self.ks for d in self.references]
        return [BenchConfig(d, k, 1, self.draft_beams, self.gamma) for k in self.ks for d in self.decoders]


def row_key(row: dict) -> tuple:
    """Identifies a decoded row across reruns."""
    return (row["draft"], row["decoder"], row["K"], row["N"], row["gamma"], row["requests"], row["decode_seed"])


def per_request(items: torch.Tensor, targets: Sequence[Sequence[int]], cutoff: int) -> tuple[list[float], list[float]]:
    """Recall@c and NDCG@c (binary relevance, IDCG over min(|truth|, c)) of each list: items [R, K] item ids."""
    recall, ndcg = [], []
    for row, truth in zip(items[:, :cutoff].tolist(), targets, strict=True):
        wanted = set(truth)
        hits = [i for i, item in enumerate(row) if item in wanted]
        recall.append(len(hits) / len(wanted) if wanted else 0.0)
        ideal = sum(1.0 / math.log2(i + 2) for i in range(min(len(wanted), cutoff)))
        ndcg.append(sum(1.0 / math.log2(i + 2) for i in hits) / ideal if ideal else 0.0)
    return recall, ndcg


def mean_se(values: Sequence[float]) -> tuple[float, float | None]:
    """Mean and standard error of the mean (None for fewer than two values)."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, None
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1) / n)


def decode_row(config: BenchConfig, work: Workload, batches: list, plan: DecodePlan, draft: Draft | None) -> dict:
    """Decode the plan's requests with one configuration -> a study row."""
    runner = Runner(config, work, batches, plan.seed)
    ((seconds, outputs),) = time_group([runner], plan.repeats, plan.warmup)
    raw = make_row(config, seconds, outputs, work)
    sequences = torch.cat([o.sequences for o in outputs]).cpu()
    items = work.trie.lookup(sequences).cpu()  # [R, K]
    cutoff = min(CUTOFF, config.k)
    recall, ndcg = per_request(items, work.targets[: items.shape[0]], cutoff)
    (recall_mean, recall_se), (ndcg_mean, ndcg_se) = mean_se(recall), mean_se(ndcg)
    return {
        "loss": draft.loss if draft else None,
        "group": draft.group if draft else None,
        "draft": draft.label if draft else None,
        "seed": draft.seed if draft else None,
        "data": draft.data if draft else None,
        "on_policy": draft.on_policy if draft else None,
        "size": draft.size if draft else None,
        "draft_parameters": parameters(work.draft) if draft else None,
        "decoder": config.decoder,
        "K": config.k,
        "N": config.draft_beams,
        "gamma": config.gamma,
        "requests": items.shape[0],
        "decode_seed": plan.seed,
        "target_calls_per_list": raw["target_calls_per_list"],
        "accepted_depth": raw["mean_accepted_depth"],
        "accepted_histogram": raw["accepted_histogram"],
        "ms_per_list": 1e3 * raw["seconds_per_list"],
        "metric_at": cutoff,
        "recall": recall_mean,
        "recall_se": recall_se,
        "ndcg": ndcg_mean,
        "ndcg_se": ndcg_se,
        "recall_ci95": None if recall_se is None else [recall_mean - Z95 * recall_se, recall_mean + Z95 * recall_se],
        "lists_sha1": lists_fingerprint(items),
    }


def lists_fingerprint(items: torch.Tensor) -> str:
    """SHA-1 of the decoded lists (item ids [R, K], in order): equal fingerprints, identical lists."""
    return hashlib.sha1(items.to(torch.int64).contiguous().numpy().tobytes()).hexdigest()


class PartialRows:
    """The rows decoded so far, kept in ``path`` (JSON, rewritten atomically after every row)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.rows: list[dict] = json.loads(path.read_text())["rows"] if path.exists() else []
        self.done = {row_key(r) for r in self.rows}
        self.decoded = 0  # rows decoded by this run

    def has(self, key: tuple) -> bool:
        return key in self.done

    def add(self, row: dict) -> None:
        self.rows.append(row)
        self.done.add(row_key(row))
        self.decoded += 1
        write_json(self.path, {"rows": self.rows})


def with_draft(work: Workload, path: Path, dtype: str, device: torch.device) -> Workload:
    """The workload with the draft exported at ``path`` (same identifiers and tokenizer as the target)."""
    check_same_identifiers(work.info["target"], str(path), f"draft {path}")
    return dataclasses.replace(work, draft=load_model(path, dtype).to(device))


def decode_study(
    work: Workload, runs: Path, drafts: Sequence[Draft], plan: DecodePlan, partial: PartialRows, device: torch.device
) -> list[dict]:
    """References, then every draft: rows of this plan (from ``partial`` or decoded now), in plan order."""
    batches = work.batches(1, plan.requests, device)
    wanted: list[tuple] = []
    started = time.perf_counter()
    for draft in [None, *drafts]:
        configs = plan.configs(draft)
        label = draft.label if draft else None
        keys = [(label, c.decoder, c.k, c.draft_beams, c.gamma, plan.requests, plan.seed) for c in configs]
        wanted += keys
        todo = [(c, key) for c, key in zip(configs, keys, strict=True) if not partial.has(key)]
        if not todo:
            continue
        here = work if draft is None else with_draft(work, draft.path(runs), plan.dtype, device)
        with torch.inference_mode():
            for config, _ in todo:
                torch.manual_seed(plan.seed)
                row = decode_row(config, here, batches, plan, draft)
                partial.add(row)
                log.info(
                    "[%.0fs] %s %s K=%d: %.2f calls/list, %.2f ms/list",
                    time.perf_counter() - started,
                    label or "reference",
                    config.decoder,
                    config.k,
                    row["target_calls_per_list"],
                    row["ms_per_list"],
                )
    found = {row_key(r): r for r in partial.rows}
    return [found[key] for key in wanted]
