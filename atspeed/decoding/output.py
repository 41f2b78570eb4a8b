"""What a decoder returns: the top-K identifiers with scores, and how the work went (``DecodeStats``)."""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass

import torch

# the keys of DecodeStats.summary(), in its order
SUMMARY_KEYS = (
    "lists", "target_calls_per_list", "draft_calls_per_list", "tokens_per_target_call", "mean_accepted_depth",
    "verified_nodes_per_call", "draft_seconds", "verify_seconds", "other_seconds",
)  # fmt: skip


def synced_now(device: torch.device) -> float:
    """``time.perf_counter()`` once the GPU's queued work on ``device`` is done (kernels run asynchronously)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def _cat_or_none(parts: list[torch.Tensor | None]) -> torch.Tensor | None:
    return None if any(p is None for p in parts) else torch.cat(parts)


@dataclass(frozen=True)
class DecodeStats:
    """Counters of one decoder call (or of several, merged)."""

    target_calls: torch.Tensor  # [B] target forwards per list (prefill included)
    draft_calls: torch.Tensor  # [B] draft forwards per list (prefill included)
    accepted: torch.Tensor  # [n] accepted draft depth of every (list, verification call) pair
    draft_seconds: float
    verify_seconds: float
    other_seconds: float
    verified_nodes: torch.Tensor | None = None  # [B] drafted nodes the target verified per list (speculative only)

    @property
    def lists(self) -> int:
        return self.target_calls.numel()

    @property
    def seconds(self) -> float:
        return self.draft_seconds + self.verify_seconds + self.other_seconds

    @classmethod
    def merge(cls, parts: Iterable[DecodeStats]) -> DecodeStats:
        parts = list(parts)
        if not parts:
            raise ValueError("nothing to merge")
        return cls(
            target_calls=torch.cat([p.target_calls for p in parts]),
            draft_calls=torch.cat([p.draft_calls for p in parts]),
            accepted=torch.cat([p.accepted for p in parts]),
            draft_seconds=sum(p.draft_seconds for p in parts),
            verify_seconds=sum(p.verify_seconds for p in parts),
            other_seconds=sum(p.other_seconds for p in parts),
            verified_nodes=_cat_or_none([p.verified_nodes for p in parts]),
        )

    @property
    def verified_per_call(self) -> float:
        """Drafted nodes the target verified per call (0 for decoders that verify none)."""
        if self.verified_nodes is None:
            return 0.0
        return float(self.verified_nodes.sum() / self.target_calls.sum().clamp(min=1))

    def histogram(self, gamma: int) -> list[int]:
        """How many verification calls accepted 0, 1, ..., gamma draft levels."""
        return torch.bincount(self.accepted, minlength=gamma + 1)[: gamma + 1].tolist()

    def summary(self, levels: int) -> dict[str, float]:
        """Means per list: target calls, tokens per target call, acceptance; seconds split by stage."""
        calls = self.target_calls.float()
        return {
            "lists": float(self.lists),
            "target_calls_per_list": float(calls.mean()),
            "draft_calls_per_list": float(self.draft_calls.float().mean()),
            "tokens_per_target_call": float((levels / calls).mean()),
            "mean_accepted_depth": float(self.accepted.float().mean()) if self.accepted.numel() else 0.0,
            "verified_nodes_per_call": self.verified_per_call,
            "draft_seconds": self.draft_seconds,
            "verify_seconds": self.verify_seconds,
            "other_seconds": self.other_seconds,
        }


@dataclass(frozen=True)
class DecodeOutput:
    """Top-K per request: identifier token ids [B, K, L] and cumulative target log-probabilities [B, K], best first."""

    sequences: torch.Tensor
    scores: torch.Tensor
    stats: DecodeStats


class StageClock:
    """Accumulates wall time per stage (draft / verify / other) without stopping the host.

    On a GPU each switch records a CUDA event (no wait); the stage times are read in ``stats``, once the decoder's
    last read-back has waited for the device anyway. ``sync=True`` (the benchmark's choice) waits for the device at
    every switch instead, so that each stage's host time is charged to it as well.
    """

    STAGES = ("draft", "verify", "other")

    def __init__(self, device: torch.device, sync: bool = False) -> None:
        self.device = torch.device(device)
        self.events = self.device.type == "cuda" and not sync
        self.seconds = dict.fromkeys(self.STAGES, 0.0)
        self.spans: list[tuple[str, object, object]] = []
        self.stage = "other"
        self.mark = self._now()

    def _now(self):
        if self.events:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return synced_now(self.device)

    def switch(self, stage: str) -> None:
        """Charge the time since the last switch to the current stage, then start ``stage``."""
        now = self._now()
        if self.events:
            self.spans.append((self.stage, self.mark, now))
        else:
            self.seconds[self.stage] += now - self.mark
        self.stage, self.mark = stage, now

    def _settle(self) -> None:
        """Event spans -> seconds (waits for the last event: free after the decoder's final read-back)."""
        if self.spans:
            self.spans[-1][2].synchronize()
            for stage, start, end in self.spans:
                self.seconds[stage] += start.elapsed_time(end) / 1000.0
            self.spans = []

    def stats(
        self,
        target_calls: torch.Tensor,
        draft_calls: torch.Tensor,
        accepted: list[torch.Tensor],
        verified_nodes: torch.Tensor | None = None,
    ) -> DecodeStats:
        """The counters (host tensors: the decoders keep them on the host) with the stage times."""
        self.switch("other")
        self._settle()
        return DecodeStats(
            target_calls=target_calls,
            draft_calls=draft_calls,
            accepted=torch.cat(accepted) if accepted else torch.zeros(0, dtype=torch.long),
            draft_seconds=self.seconds["draft"],
            verify_seconds=self.seconds["verify"],
            other_seconds=self.seconds["other"],
            verified_nodes=verified_nodes,
        )
