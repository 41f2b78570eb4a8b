"""The recommendation prompt: a user's recent items as identifier strings, then a response marker."""

from __future__ import annotations

from collections.abc import Sequence

# Our wording of the instruction-style prompt used by the paper (Alpaca layout, LC-Rec lineage).
PAPER_PROMPT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\nHere are the items a user interacted with, in time order: {history}. "
    "Which item will the user want next?\n\n### Response:\n"
)


def check_template(template: str) -> None:
    """Raise unless ``template`` has exactly one ``{history}`` field and no other field."""
    if template.count("{history}") != 1:
        raise ValueError("data.prompt must contain the field {history} exactly once")
    try:
        template.format(history="")
    except (KeyError, IndexError, ValueError) as err:
        raise ValueError(f"data.prompt has a field other than {{history}}: {err}") from err


def render_prompt(template: str, history_codes: Sequence[Sequence[str]], max_history: int) -> str:
    """The prompt for one request: the last ``max_history`` items, each as its concatenated code tokens."""
    recent = history_codes[-max_history:] if max_history else []
    return template.format(history=", ".join("".join(codes) for codes in recent))
