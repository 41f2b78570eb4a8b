"""The in-memory dataset every loader produces, whatever the source format."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Interactions:
    """Per-user, time-ordered interaction sequences plus what is known about the items.

    Items are referred to by their position in ``item_ids`` (the *item index*); ``item_ids`` holds the
    source's raw id strings (for the authors' processed layout these are the index-JSON keys).
    """

    name: str
    user_ids: list[str]
    item_ids: list[str]
    sequences: list[list[int]]
    """Per user, item indices in time order."""
    timestamps: list[list[float]] | None = None
    """Per user, one timestamp per interaction (aligned with ``sequences``), where the source has them."""
    periods: list[list[int]] | None = None
    """Per user, 0 / 1 / 2 = train / valid / test period, where the source is already split by time."""
    item_text: list[str] | None = None
    """Per item index, a text description (title, categories), where the source has one."""

    def __post_init__(self) -> None:
        if len(self.user_ids) != len(self.sequences):
            raise ValueError("user_ids and sequences differ in length")
        for name in ("timestamps", "periods"):
            aligned = getattr(self, name)
            if aligned is not None and [len(s) for s in aligned] != [len(s) for s in self.sequences]:
                raise ValueError(f"{name} is not aligned with sequences")
        if self.item_text is not None and len(self.item_text) != len(self.item_ids):
            raise ValueError("item_text is not aligned with item_ids")

    @property
    def num_interactions(self) -> int:
        return sum(len(s) for s in self.sequences)
