"""``DecodeResult``: a decoder's wall time over the lists it timed, and the speed ratio of two decoders, defined once.

Every report reads these definitions: the predict stage's ``report.json`` (``speed``), the pipeline summary, the
benchmark's rows and W&B (which logs the predict report's numbers and the benchmark's rows).

- ``ms_per_list`` = 1000 x the decoder's wall seconds / the distinct lists timed. The seconds are whole decoder calls
  (checking the prompts, drafting, verifying, the output) on a clock synced with the device. The warm-up is left
  out: the predict stage does not time each process's first batch (unless it is the process's only one:
  ``warmup_excluded`` says which), the benchmark its ``--warmup`` decodes. Under several processes the seconds are
  the slowest process's (the job's throughput).
- ``speedup_over(reference)`` = the reference's ms per list / this one's: above 1 when faster than the reference
  (``ratio_over_beam`` with beam search as the reference, ``x_hf`` / ``speedup_vs_hf`` with HF generate).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class DecodeResult:
    """The wall time of one decoder over ``lists`` distinct lists."""

    lists: int  # distinct lists timed
    seconds: float  # the decoder's wall seconds over them (the warm-up left out)
    warmup_excluded: bool = True  # False: a run of one batch per process, which timed its warm-up

    @property
    def ms_per_list(self) -> float | None:
        return 1e3 * self.seconds / self.lists if self.lists > 0 else None

    def speedup_over(self, reference: DecodeResult | None) -> float | None:
        """``reference``'s ms per list / this one's (> 1: faster); None without a reference or a measured time."""
        mine = self.ms_per_list
        theirs = reference.ms_per_list if reference is not None else None
        if mine is None or theirs is None or mine <= 0:
            return None
        return theirs / mine

    def speed(self, beam: DecodeResult | None = None) -> dict[str, Any]:
        """The predict report's ``speed`` entry (``beam``: beam search timed on the same batches, compare_beam)."""
        out: dict[str, Any] = {"ms_per_list": self.ms_per_list, "seconds": self.seconds}
        if beam is not None:
            out |= {"beam_ms_per_list": beam.ms_per_list, "beam_seconds": beam.seconds,
                    "ratio_over_beam": self.speedup_over(beam)}  # fmt: skip
        return out | {"timed_lists": self.lists, "warmup_excluded": self.warmup_excluded}

    @classmethod
    def from_speed(cls, speed: dict[str, Any], prefix: str = "") -> DecodeResult | None:
        """Read back what ``speed`` wrote (``prefix="beam_"``: the beam search's); None when it is not there."""
        seconds, lists = speed.get(f"{prefix}seconds"), speed.get("timed_lists")
        if not isinstance(seconds, int | float) or not isinstance(lists, int):
            return None
        return cls(lists, float(seconds), bool(speed.get("warmup_excluded", True)))
