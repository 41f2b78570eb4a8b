"""What a decoder returns: the top-K identifiers with scores, and how the work went (``DecodeStats``)."""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class DecodeStats:
    """Counters of one decoder call (or of several, merged)."""

    target_calls: torch.Tensor  # [B] target forwards per list (prefill included)
    draft_calls: torch.Tensor  # [B] draft forwards per list (prefill included)
    accepted: torch.Tensor  # [n] accepted draft depth of every (list, verification call) pair
    draft_seconds: float
    verify_seconds: float
    other_seconds: float

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
        )

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
    """Accumulates wall time per stage (draft / verify / other); waits for the GPU before reading the clock."""

    STAGES = ("draft", "verify", "other")

    def __init__(self, device: torch.device) -> None:
        self.sync = device.type == "cuda"
        self.seconds = dict.fromkeys(self.STAGES, 0.0)
        self.stage = "other"
        self.mark = self._now()

    def _now(self) -> float:
        if self.sync:
            torch.cuda.synchronize()
        return time.perf_counter()

    def switch(self, stage: str) -> None:
        """Charge the time since the last switch to the current stage, then start ``stage``."""
        now = self._now()
        self.seconds[self.stage] += now - self.mark
        self.stage, self.mark = stage, now

    def stats(self, target_calls: torch.Tensor, draft_calls: torch.Tensor, accepted: list[torch.Tensor]) -> DecodeStats:
        self.switch("other")
        return DecodeStats(
            target_calls=target_calls.cpu(),
            draft_calls=draft_calls.cpu(),
            accepted=torch.cat(accepted).cpu() if accepted else torch.zeros(0, dtype=torch.long),
            draft_seconds=self.seconds["draft"],
            verify_seconds=self.seconds["verify"],
            other_seconds=self.seconds["other"],
        )
