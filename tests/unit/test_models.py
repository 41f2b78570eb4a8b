"""Model building, tokenizers, and both beam searches (ours and Hugging Face generate) against brute force."""

from __future__ import annotations

import itertools

import pytest
import torch

from atspeed.decoding.search.beam_search import beam_search
from atspeed.decoding.search.hf_generate import hf_generate
from atspeed.errors import DataError
from atspeed.items.trie import PrefixTrie
from atspeed.models.build import ModelSpec, build_causal_lm, load_model
from atspeed.models.tokenizer import build_word_tokenizer, load_tokenizer, token_ids

ITEM_TOKENS = [f"<a_{i}>" for i in range(3)] + [f"<b_{i}>" for i in range(3)]


@pytest.fixture
def tokenizer():
    return build_word_tokenizer(["pick one : ."], ITEM_TOKENS)


@pytest.mark.parametrize(("key", "value"), [("hidden_size", 0), ("num_layers", -1), ("num_heads", 0)])
def test_model_spec_rejects_bad_sizes_naming_the_key(key: str, value: int) -> None:
    with pytest.raises(ValueError, match=f"model.{key}"):
        ModelSpec(**{key: value})


def test_model_spec_rejects_a_missing_path() -> None:
    with pytest.raises(ValueError, match=r"model\.path"):
        ModelSpec(path="/no/such/model")


def test_load_from_a_local_checkpoint_resizes_for_new_tokens(tokenizer, tmp_path) -> None:
    small = build_word_tokenizer(["pick one : ."], [])
    build_causal_lm(ModelSpec(hidden_size=16, num_heads=2), small).save_pretrained(tmp_path / "m")
    small.save_pretrained(tmp_path / "m")
    extended = load_tokenizer(tmp_path / "m", ITEM_TOKENS)
    assert len(extended) == len(small) + len(ITEM_TOKENS)
    model = build_causal_lm(ModelSpec(path=str(tmp_path / "m")), extended)
    assert model.get_input_embeddings().num_embeddings == len(extended)
    with pytest.raises(DataError, match="lacks 6 of 6"):
        load_tokenizer(tmp_path / "m", ITEM_TOKENS, extend=False)


@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
def test_models_are_built_and_loaded_with_the_attention_asked_for(tokenizer, tmp_path, implementation: str) -> None:
    spec = ModelSpec(hidden_size=16, num_heads=2, attn_implementation=implementation)
    built = build_causal_lm(spec, tokenizer)
    assert built.config._attn_implementation == implementation
    built.save_pretrained(tmp_path / "m")
    loaded = build_causal_lm(ModelSpec(path=str(tmp_path / "m"), attn_implementation=implementation), tokenizer)
    assert loaded.config._attn_implementation == implementation
    assert load_model(tmp_path / "m", attn_implementation=implementation).config._attn_implementation == implementation


def test_identifier_tokens_are_single_tokens(tokenizer) -> None:
    ids = tokenizer("pick <a_1><b_2> .", add_special_tokens=False)["input_ids"]
    assert tokenizer.convert_ids_to_tokens(ids) == ["pick", "<a_1>", "<b_2>", "."]


@pytest.mark.parametrize("decoder", ["ours", "hf"])
def test_beam_search_equals_exhaustive_search_when_beams_cover_every_prefix(tokenizer, decoder: str) -> None:
    """With K >= the number of identifiers, beam search keeps every prefix: it must equal brute force."""
    model = build_causal_lm(ModelSpec(hidden_size=32, num_heads=2), tokenizer, seed=1).eval()
    items = [(a, b) for a in range(3) for b in range(3) if (a, b) != (2, 1)]  # 8 items, an incomplete trie
    ids = torch.tensor([token_ids(tokenizer, [f"<a_{a}>", f"<b_{b}>"]) for a, b in items])
    trie = PrefixTrie.build(ids, vocab_size=len(tokenizer))
    prompts = [
        tokenizer("pick one :", add_special_tokens=False)["input_ids"],
        tokenizer("one", add_special_tokens=False)["input_ids"],
    ]
    width = max(map(len, prompts))
    input_ids = torch.tensor([[tokenizer.pad_token_id] * (width - len(p)) + p for p in prompts])
    mask = (torch.arange(width) >= torch.tensor([[width - len(p)] for p in prompts])).long()
    with torch.no_grad():
        if decoder == "hf":
            out = hf_generate(model, input_ids, mask, trie, 8, 2, tokenizer.pad_token_id)
        else:
            out = beam_search(model, input_ids, mask, trie, 8, 2)
    got_items, got_scores = trie.lookup(out.sequences.reshape(-1, 2)).view(2, 8), out.scores
    for row, prompt in enumerate(prompts):
        scores = []
        for item, code in enumerate(ids.tolist()):
            seq = torch.tensor([prompt + code])
            with torch.no_grad():
                logits = model(seq).logits
            logp = torch.log_softmax(logits[0, len(prompt) - 1 : -1].float(), -1)
            scores.append((float(logp[0, code[0]] + logp[1, code[1]]), item))
        scores.sort(key=lambda s: -s[0])
        assert got_items[row].tolist() == [item for _, item in scores]
        torch.testing.assert_close(got_scores[row], torch.tensor([s for s, _ in scores]), atol=1e-4, rtol=0)
    assert all(i >= 0 for i in itertools.chain.from_iterable(got_items.tolist()))
