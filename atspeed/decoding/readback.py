"""What the host learns of a speculative call: everything the next call and the counters need, in one read-back
per call (``read_back``), and the per-list counters kept from it (``Counters``)."""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch

from atspeed.decoding.search.beam import BeamState
from atspeed.decoding.search.draft_tree import TokenTree
from atspeed.decoding.verification.accept import Verdict


@dataclass(frozen=True)
class Seen:
    """What the host learns after a call, in one read-back, for each row of the batch (in batch order)."""

    depth: list[int]  # tokens generated (>= levels: finished)
    accepted: list[int]
    verified: list[int]  # drafted nodes verified
    target_kept: list[int]  # target-cache positions the row's beams attend (the compaction width is their max)
    draft_kept: list[int]
    draft_unfed: list[int]  # tokens the draft has not fed yet
    needed: torch.Tensor | None  # [B, G] for the budget planner (host)

    levels: int  # L: a row with depth >= L is finished

    @functools.cached_property
    def going(self) -> list[bool]:
        """Per row: still decoding."""
        return [d < self.levels for d in self.depth]

    def widest(self, values: list[int]) -> int:
        """The largest of ``values`` over the rows still decoding."""
        return max((v for v, go in zip(values, self.going, strict=True) if go), default=0)


def read_back(t_beams: BeamState, d_beams: BeamState, verdict: Verdict, tree: TokenTree, need, levels: int) -> Seen:
    """One device-to-host copy of everything the next iteration and the counters need."""
    b = t_beams.depth.shape[0]
    columns = [
        t_beams.depth, verdict.accepted, tree.drafted_count(), t_beams.visible.any(1).sum(1),
        d_beams.visible.any(1).sum(1), d_beams.depth - d_beams.fed,
    ]  # fmt: skip
    flat = torch.cat([c.long() for c in columns] + ([need.reshape(-1)] if need is not None else []))
    values = flat.tolist()  # the call's one host sync
    per_row = [values[i * b : (i + 1) * b] for i in range(len(columns))]
    host_need = torch.tensor(values[len(columns) * b :]).view(b, -1) if need is not None else None
    return Seen(*per_row, needed=host_need, levels=levels)


@dataclass
class Counters:
    """Per list (original batch order): target calls, draft calls, drafted nodes verified; per verification (a call
    that drafted): the accepted depth. Kept on the host from the read-backs."""

    target_calls: list[int]
    draft_calls: list[int]
    verified: list[int]
    accepted: list[int] = field(default_factory=list)

    def record(self, rows: list[int], drafts: int, seen: Seen, drafted: bool) -> None:
        for i, row in enumerate(rows):
            self.target_calls[row] += 1
            self.draft_calls[row] += drafts
            self.verified[row] += seen.verified[i]
        if drafted:
            self.accepted.extend(seen.accepted)

    def tensors(self) -> tuple:
        long = functools.partial(torch.tensor, dtype=torch.long)
        return long(self.target_calls), long(self.draft_calls), [long(self.accepted)], long(self.verified)
