"""Prompts and batches: loss only on the response, left padding for generation, history capped."""

import pytest
import torch

from atspeed.data.batches import IGNORE, EvalCollator, PromptEncoder, TrainCollator
from atspeed.data.prompts import check_template, render_prompt
from atspeed.items.index import ItemIndex
from atspeed.models.tokenizer import build_word_tokenizer, token_ids

TEMPLATE = "History: {history}. Next:"


@pytest.fixture
def encoder() -> PromptEncoder:
    index, _ = ItemIndex.from_mapping({str(i): [f"<a_{i // 3}>", f"<b_{i % 3}>"] for i in range(9)}, "test")
    tok = build_word_tokenizer([TEMPLATE], index.all_tokens())
    ids = torch.tensor([token_ids(tok, c) for c in index.codes])
    return PromptEncoder(tok, index, ids, TEMPLATE, max_history=3)


def test_render_prompt_keeps_the_most_recent_items() -> None:
    codes = [("<a_0>", "<b_0>"), ("<a_0>", "<b_1>"), ("<a_1>", "<b_0>")]
    assert render_prompt(TEMPLATE, codes, 2) == "History: <a_0><b_1>, <a_1><b_0>. Next:"


@pytest.mark.parametrize("bad", ["no field", "{history} {history}", "{history} {user}"])
def test_bad_templates_name_the_key(bad: str) -> None:
    with pytest.raises(ValueError, match=r"data\.prompt"):
        check_template(bad)


def test_train_batch_puts_the_loss_on_identifier_and_eos_only(encoder: PromptEncoder) -> None:
    batch = TrainCollator(encoder)([((1, 2), 4), ((1, 2, 3, 5, 6), 8)])
    tok = encoder.tokenizer
    for row in range(2):
        labels = batch["labels"][row]
        kept = labels[labels != IGNORE].tolist()
        target = [4, 8][row]
        assert kept == [*encoder.item_token_ids[target].tolist(), tok.eos_token_id]
        n = int(batch["attention_mask"][row].sum())
        assert batch["input_ids"][row, 0].item() == tok.bos_token_id
        assert batch["input_ids"][row, n - 3 : n].tolist() == kept  # response at the end, right padding after
    # the second history has 5 items, capped at max_history=3: items 3, 5, 6 only
    text = tok.decode(batch["input_ids"][1], skip_special_tokens=False)
    assert "<a_0> <b_1>" not in text and "<a_2> <b_0>" in text


def test_eval_batch_is_left_padded(encoder: PromptEncoder) -> None:
    batch = EvalCollator(encoder)([(0, (1,), (4,)), (1, (1, 2, 3), (5, 6))])
    mask = batch["attention_mask"]
    assert mask[0, 0] == 0 and mask[0, -1] == 1 and mask[1].all()
    assert batch["request_ids"].tolist() == [0, 1] and batch["targets"] == [[4], [5, 6]]
