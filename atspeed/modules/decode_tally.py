"""What the predict stage tallies per batch (requests, decode statistics, wall seconds), and its merge over processes.

Under DDP each process decodes its share of the requests; ``gather_batches`` collects every process's batches, and
``merged_stats`` / ``speed_summary`` turn them into the numbers of one run:

- every request counts once: the first batch (in rank order) that holds it; a batch whose requests were all counted
  before is dropped whole. (Lightning's predict sampler gives each request to one process; repeats appear only with a
  sampler that pads, or without a distributed sampler.)
- per-list counters (target and draft calls, verified nodes) are put in request order, as one process decodes them,
  so their means are the single-process run's to the last bit; the accepted depths and stage seconds are summed.
- speed is the user's view of the whole job: the slowest process's wall time over all timed lists
  (``DecodeResult``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.distributed as dist

from atspeed.decoding.output import DecodeStats
from atspeed.decoding.result import DecodeResult

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BatchTally:
    """One predict batch of one process."""

    request_ids: torch.Tensor  # [B] on the CPU
    stats: DecodeStats  # per-list tensors [B], rows as in request_ids
    seconds: dict[str, float]  # wall seconds of "decoder" (and "beam" with compare_beam)


class DecodeTally:
    """The batches this process decoded, in order."""

    def __init__(self) -> None:
        self.batches: list[BatchTally] = []

    def order(self, names: list[str]) -> list[str]:
        """The run order of the next batch: as given on even batches, reversed on odd ones."""
        return names[::-1] if len(self.batches) % 2 else names

    def add(self, request_ids: torch.Tensor, stats: DecodeStats, seconds: dict[str, float]) -> None:
        self.batches.append(BatchTally(request_ids.detach().cpu(), stats, seconds))

    def local_stats(self) -> DecodeStats | None:
        """This process's statistics so far (the progress bar's running numbers)."""
        return DecodeStats.merge(b.stats for b in self.batches) if self.batches else None


def gather_batches(batches: list[BatchTally]) -> list[list[BatchTally]]:
    """Every process's batches, by rank (``[batches]`` in a single process). Every process must call it."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [batches]
    out: list = [None] * dist.get_world_size()
    dist.all_gather_object(out, batches)
    return out


def _first_seen(ranks: list[list[BatchTally]]) -> list[tuple[BatchTally, torch.Tensor]]:
    """The batches that bring a request not counted before, each with its mask [B] of those requests."""
    seen: set[int] = set()
    kept, partial = [], 0
    for batch in (batch for batches in ranks for batch in batches):
        ids = batch.request_ids.tolist()
        new = torch.tensor([i not in seen for i in ids], dtype=torch.bool)
        seen.update(ids)
        if new.any():
            kept.append((batch, new))
            partial += not bool(new.all())
    if partial:
        log.warning("%d batches repeat some requests: their accepted depths and seconds count whole", partial)
    return kept


def merged_stats(ranks: list[list[BatchTally]]) -> DecodeStats | None:
    """The decode statistics of all processes, each request once, per-list counters in request order (None: no
    batch)."""
    kept = _first_seen(ranks)
    if not kept:
        return None
    order = torch.argsort(torch.cat([batch.request_ids[new] for batch, new in kept]), stable=True)

    def per_list(name: str) -> torch.Tensor:
        return torch.cat([getattr(batch.stats, name)[new] for batch, new in kept])[order]

    stats = [batch.stats for batch, _ in kept]
    return DecodeStats(
        target_calls=per_list("target_calls"),
        draft_calls=per_list("draft_calls"),
        accepted=torch.cat([s.accepted for s in stats]),
        draft_seconds=sum(s.draft_seconds for s in stats),
        verify_seconds=sum(s.verify_seconds for s in stats),
        other_seconds=sum(s.other_seconds for s in stats),
        verified_nodes=None if any(s.verified_nodes is None for s in stats) else per_list("verified_nodes"),
    )


def timed_results(ranks: list[list[BatchTally]]) -> dict[str, DecodeResult]:
    """Per timed decoder ("decoder", and "beam" with compare_beam): its ``DecodeResult`` over all processes, the
    slowest process's wall seconds over the distinct lists timed on all of them.

    Each process's first batch is a warm-up kept apart: it alone pays each decoder's one-time work (the shared prompt
    header's keys and values, the cost model of budget="auto", lazy kernel and allocator set-up), which would
    otherwise weigh on short runs. It counts only when it was the process's only batch (``warmup_excluded`` False).
    """
    timed = [batches[1:] if len(batches) > 1 else batches for batches in ranks if batches]
    if not timed:
        return {}
    lists = len({i for batches in timed for b in batches for i in b.request_ids.tolist()})
    warmup_excluded = all(len(batches) > 1 for batches in ranks if batches)
    return {
        name: DecodeResult(lists, max(sum(b.seconds[name] for b in batches) for batches in timed), warmup_excluded)
        for name in timed[0][0].seconds
    }


def speed_summary(ranks: list[list[BatchTally]]) -> dict[str, float | int | bool]:
    """The report's ``speed``: ``DecodeResult.speed`` of the decoder (with beam search's when compare_beam timed it)
    and the ``processes`` that decoded."""
    results = timed_results(ranks)
    if not results:
        return {}
    return results["decoder"].speed(results.get("beam")) | {"processes": sum(1 for batches in ranks if batches)}
