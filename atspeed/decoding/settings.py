"""What every decoder is told: K, L and, for the speculative decoders, N, gamma and the tree budget M."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Budget = int | Literal["auto"] | None


@dataclass(frozen=True)
class DecodeSettings:
    """K, L and, for the speculative decoders, N, gamma and the budget; checked at construction."""

    num_beams: int  # K: list length
    levels: int  # L: identifier tokens per item
    draft_beams: int = 40  # N: draft beams per step
    gamma: int = 3  # draft steps per target call
    pad_token_id: int = 0
    seed: int = 0  # of the sampling decoders (spec_relaxed, beam_sample, ...)
    budget: Budget = None  # M: drafted nodes verified per call (None: all; 0: beam steps; "auto": planned per call)

    def __post_init__(self) -> None:
        if self.num_beams < 1:
            raise ValueError(f"num_beams (K) must be >= 1, got {self.num_beams}")
        if self.levels < 1:
            raise ValueError(f"levels (L) must be >= 1, got {self.levels}")
        if self.gamma < 1:
            raise ValueError(f"gamma must be >= 1, got {self.gamma}")
        if self.draft_beams < 1:
            raise ValueError(f"draft_beams (N) must be >= 1, got {self.draft_beams}")
        ok = self.budget is None or self.budget == "auto" or (type(self.budget) is int and self.budget >= 0)
        if not ok:
            raise ValueError(f"budget (M) must be an integer >= 0, 'auto' or null, got {self.budget!r}")
