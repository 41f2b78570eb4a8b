"""``DecodeOptions``: what a user says about a decode (one nested ``decoding:`` key of a config), parsed once.

The same type is the ``decoding`` argument of ``Recommender`` (predict) and ``Align`` (its validation decode), the
benchmark's base configuration and the keys of the sweep files (``model.init_args.decoding.<field>``). Its field types
are the schema: jsonargparse refuses a K of 0, a budget of -1 or "all", an unknown decoder at parse time, naming the
key. ``settings(levels, pad_token_id)`` turns it into the frozen ``DecodeSettings`` the decoders take (the two values a
user does not choose: the identifier length of the index and the tokenizer's pad id).
"""

from __future__ import annotations

from argparse import ArgumentTypeError
from dataclasses import dataclass
from typing import Literal

from jsonargparse.typing import NonNegativeInt, PositiveInt

from atspeed.decoding.decoders import DECODERS, DecoderName, DecoderSpec
from atspeed.decoding.settings import DecodeSettings

# M, drafted nodes the target verifies per call: an integer >= 0, "auto" (planned per call) or None (the whole tree)
BudgetOption = NonNegativeInt | Literal["auto"] | None


@dataclass(frozen=True)
class DecodeOptions:
    decoder: DecoderName = "spec_strict"
    num_beams: PositiveInt = 20
    draft_beams: PositiveInt = 40
    gamma: PositiveInt = 3
    budget: BudgetOption = None
    seed: int = 0

    def __post_init__(self) -> None:
        """What the field types cannot say (a known decoder, N >= K for the decoders that draft), raised as a
        ``ValueError`` that names the key; the ranges are checked again, with the levels, by ``DecodeSettings``."""
        if self.decoder not in DECODERS:
            raise ValueError(f"decoding.decoder: unknown decoder {self.decoder!r}; choose one of {sorted(DECODERS)}")
        if self.spec.needs_draft and self.draft_beams < self.num_beams:
            raise ValueError(
                f"decoding.draft_beams (N = {self.draft_beams}) must be >= decoding.num_beams (K = {self.num_beams}) "
                f"for {self.decoder}: a level is accepted only if the target's K beams are among the N drafted"
            )

    @property
    def spec(self) -> DecoderSpec:
        """The decoder's row of ``DECODERS`` (``DecoderSpec``)."""
        return DECODERS[self.decoder]

    def settings(self, levels: int, pad_token_id: int = 0) -> DecodeSettings:
        """The frozen settings the decoders take, for identifiers of ``levels`` tokens."""
        return DecodeSettings(
            num_beams=int(self.num_beams), levels=levels, draft_beams=int(self.draft_beams), gamma=int(self.gamma),
            pad_token_id=pad_token_id, seed=self.seed, budget=None if self.budget is None else _budget(self.budget),
        )  # fmt: skip

    def as_dict(self) -> dict:
        """Plain values (for reports and W&B): ``decoder``, ``num_beams``, ``draft_beams``, ``gamma``, ``budget``,
        ``seed``."""
        budget = None if self.budget is None else _budget(self.budget)
        return {"decoder": self.decoder, "num_beams": int(self.num_beams), "draft_beams": int(self.draft_beams),
                "gamma": int(self.gamma), "budget": budget, "seed": int(self.seed)}  # fmt: skip


def parse_budget(value: object) -> int | str | None:
    """A budget written as text (a benchmark's ``--budgets none 20 auto``) or read from a file: an integer >= 0,
    ``auto``, or ``none`` / ``null`` (the whole tree). A config's ``decoding.budget`` is parsed by its type instead."""
    if value is None or value in ("none", "null"):
        return None
    if value == "auto":
        return "auto"
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return int(value)
    if isinstance(value, str) and value.isdigit():
        return int(value)
    raise ArgumentTypeError(f"a budget is an integer >= 0, auto or none, got {value!r}")


def _budget(value) -> int | str:
    return "auto" if value == "auto" else int(value)


def _doc() -> str:
    rows = "\n".join(f"                {name} ({spec.contract}): {spec.help};" for name, spec in DECODERS.items())
    return f"""How to decode: the decoder and its settings (one ``decoding:`` block; parsed once).

        Args:
            decoder: the decoder, a name of ``atspeed.decoding.decoders.DECODERS`` (its exactness contract):
{rows}
            num_beams: K, the length of each list.
            draft_beams: N, draft beams per step (decoders that draft; at least K).
            gamma: draft steps per target call (decoders that draft).
            budget: M, drafted nodes the target verifies per call, the draft's best (null: all gamma x N; 0: plain
                beam steps; "auto": planned per call from the measured forward costs and the acceptance so far).
                Strict decoding returns beam search's lists whatever M is.
            seed: seed of the sampling decoders' generator.
        """


DecodeOptions.__doc__ = _doc()
DEFAULT_DECODING = DecodeOptions()  # the default of every ``decoding`` argument (frozen: safe to share)
