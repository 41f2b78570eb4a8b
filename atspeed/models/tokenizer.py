"""Tokenizers that know the item-identifier tokens.

Two ways in: a local Hugging Face tokenizer extended with the identifier tokens, or, for models
trained from scratch, a small word-level ``PreTrainedTokenizerFast`` built for the prompt template.
Either way the tokenizer is saved beside every exported checkpoint.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from pathlib import Path

from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from atspeed.errors import DataError

SPECIAL_TOKENS = {"pad_token": "<pad>", "unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>"}
_WORD = re.compile(r"\w+|[^\w\s]")


def build_word_tokenizer(texts: Iterable[str], item_tokens: Sequence[str]) -> PreTrainedTokenizerFast:
    """A word-level tokenizer whose vocabulary is the words of ``texts`` plus the identifier tokens.

    Identifier tokens are added tokens, so ``<a_1><b_2>`` splits into exactly two ids whatever surrounds it.
    """
    words = sorted({w for text in texts for w in _WORD.findall(text)})
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS.values())}
    for word in words:
        vocab.setdefault(word, len(vocab))
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=SPECIAL_TOKENS["unk_token"]))
    core.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, **SPECIAL_TOKENS)
    tokenizer.add_tokens(list(item_tokens))
    return tokenizer


def load_tokenizer(path: str | Path, item_tokens: Sequence[str], extend: bool = True) -> PreTrainedTokenizerBase:
    """Load a local tokenizer; add the identifier tokens (``extend``) or check that it already has them."""
    if not Path(path).exists():
        raise DataError(f"tokenizer path not found: {path}")
    tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True, trust_remote_code=False)
    if extend:
        tokenizer.add_tokens(list(item_tokens))
    else:
        check_item_tokens(tokenizer, item_tokens, str(path))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def check_item_tokens(tokenizer: PreTrainedTokenizerBase, item_tokens: Sequence[str], source: str) -> None:
    """Raise if any identifier token is not one single known token of ``tokenizer``."""
    vocab = tokenizer.get_vocab()
    missing = [tok for tok in item_tokens if tok not in vocab]
    if missing:
        raise DataError(
            f"tokenizer {source} lacks {len(missing)} of {len(item_tokens)} item identifier tokens "
            f"(first: {missing[:5]}); use a tokenizer saved with this index, or let atspeed extend it"
        )


def token_ids(tokenizer: PreTrainedTokenizerBase, tokens: Sequence[str]) -> list[int]:
    """Ids of single tokens (identifier tokens), in order."""
    return tokenizer.convert_tokens_to_ids(list(tokens))
