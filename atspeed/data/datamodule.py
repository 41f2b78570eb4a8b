"""The LightningDataModule: source -> split -> item index -> tokenizer -> batches."""

from __future__ import annotations

import logging
import random
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from jsonargparse.typing import NonNegativeInt, PositiveInt
from torch.utils.data import DataLoader
from transformers import PreTrainedTokenizerBase

from atspeed.data.batches import EvalCollator, PromptEncoder, TrainCollator
from atspeed.data.export_dir import INDEX_FILE, META_FILE, ExportMeta
from atspeed.data.item_index import SemanticIdSpec, align_items, build_index, load_index
from atspeed.data.prompts import PAPER_PROMPT, check_template, render_prompt
from atspeed.data.sampler import resumable_loader
from atspeed.data.schema import Interactions
from atspeed.data.sources import MovieLensOptions, SourceOptions, load_source, source_name
from atspeed.data.splits import EvalSample, Split, SplitName, split_interactions, training_pairs
from atspeed.errors import DataError
from atspeed.items.index import ItemIndex
from atspeed.items.trie import PrefixTrie
from atspeed.models.tokenizer import build_word_tokenizer, load_tokenizer, token_ids

log = logging.getLogger(__name__)

FROM_EXPORT = {"prompt": PAPER_PROMPT, "max_history": 20, "constraint": "exact"}
"""The request settings a model export fixes (its atspeed.json), with their values where there is no export."""
DEFAULT_SOURCE = MovieLensOptions()
"""``data.source`` when none is named: the MovieLens-100k shipped inside the ``recbole`` wheel."""


@dataclass(frozen=True)
class Prepared:
    """Everything ``setup`` derives from the files: shared with the LightningModule through the DataModule."""

    data: Interactions
    split: Split  # in index positions
    index: ItemIndex
    tokenizer: PreTrainedTokenizerBase
    item_token_ids: torch.Tensor  # [I, L]
    trie: PrefixTrie  # on the CPU; the stages decode with ``trie.on(their device)`` (a copy per device, kept)
    encoder: PromptEncoder


@dataclass
class EvalSpec:
    """Which evaluation requests to decode."""

    val_users: PositiveInt | None = 500
    """Validation users decoded for Recall/NDCG each validation (a seeded random subset); None = all."""
    test_users: PositiveInt | None = None
    """Test users decoded by `test`; None = all."""


class RecDataModule(pl.LightningDataModule):
    """Sequential recommendation data as prompts and identifier responses.

    Args:
        source: where the interactions come from: one options object per source (``class_path``: MovieLensOptions,
            RecBoleOptions, ProcessedOptions, Amazon2014Options, Amazon2018Options; ``init_args``: its fields).
        index_file: item index JSON (item id -> code tokens); None: the one shipped with the data (the processed
            layout's ``*.json``), else semantic ids built from item text.
        on_duplicate_ids: what to do when items of the index share an identifier: fail, or give them distinct ones.
        index_key_offset: index key = integer item id + this (the Beauty release: files count items from 1, the
            index JSON from 0, so -1).
        semantic_ids: how to build identifiers when there is no index file.
        cache_dir: where built indices are cached.
        split: global_time (the paper, 8:1:1 by timestamp) or leave_one_out.
        train_samples: last (one sample per user) or sliding (every prefix of the training sequence).
        max_history: most recent items shown in the prompt; None: the model export's (``model_dir``), else 20.
        prompt: prompt template with one {history} field; None: the model export's, else the paper's.
        tokenizer: local Hugging Face tokenizer to extend with identifier tokens; None builds a word-level one.
        extend_tokenizer: add missing identifier tokens to ``tokenizer``; false requires it to have them all.
        constraint: decoding constraint: exact prefix trie, or the looser per-position rule; None: the model
            export's, else exact.
        batch_size: training batch size.
        eval_batch_size: requests per generation batch.
        eval: which validation and test users to decode.
        num_workers: DataLoader workers.
        seed: seed of the validation subset.
        model_dir: a model exported by the SFT stage: requests are built as it was trained, with its tokenizer and
            index.json and the prompt, max_history and constraint of its atspeed.json. Each of those keys left unset
            here is taken from it (one logged line names the values that differ from the defaults); set to another
            value, it is an error naming the key. On the command line it is linked to ``model.init_args.target``.
        predict_set: what ``predict`` decodes: the test users, or every training sample (teacher data; request id =
            the sample's position in ``training_requests``).
        train_batches: pairs (prompt + response, teacher-forced: SFT) or requests (left-padded prompts with the
            sample id and target: alignment, which looks up the sample's teacher data).
    """

    def __init__(
        self,
        source: SourceOptions = DEFAULT_SOURCE,
        index_file: str | None = None,
        on_duplicate_ids: Literal["error", "resolve"] = "error",
        index_key_offset: int = 0,
        semantic_ids: SemanticIdSpec | None = None,
        cache_dir: str = "runs/cache",
        split: SplitName = "global_time",
        train_samples: Literal["last", "sliding"] = "sliding",
        max_history: PositiveInt | None = None,
        prompt: str | None = None,
        tokenizer: str | None = None,
        extend_tokenizer: bool = True,
        constraint: Literal["exact", "per_position"] | None = None,
        batch_size: PositiveInt = 64,
        eval_batch_size: PositiveInt = 32,
        eval: EvalSpec | None = None,
        num_workers: NonNegativeInt = 0,
        seed: int = 0,
        model_dir: str | None = None,
        predict_set: Literal["test", "train"] = "test",
        train_batches: Literal["pairs", "requests"] = "pairs",
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.hparams.update(exported_settings(self.hparams, model_dir))
        self.hparams.source = source  # the options object (LightningCLI hands save_hyperparameters its config dict)
        self.hparams.semantic_ids = semantic_ids or SemanticIdSpec()
        self.hparams.eval = eval or EvalSpec()
        check_template(self.hparams.prompt)
        source_name(source)  # an options class without a row in SOURCES fails here, before any file is read
        source.check()
        for key in ("index_file", "tokenizer"):
            if self.hparams[key] is not None and not Path(self.hparams[key]).exists():
                raise DataError(f"data.{key}: not found: {self.hparams[key]}")
        self.prepared: Prepared | None = None

    # -- loading ----------------------------------------------------------------------------------

    def _index_file(self, data: Interactions) -> Path:
        hp = self.hparams
        given = hp.index_file or hp.source.bundled_index()
        return Path(given) if given is not None else build_index(data, hp.semantic_ids, hp.cache_dir)

    def prepare_data(self) -> None:
        """Build and cache the item index once (rank 0) when none is given or shipped with the data."""
        if self.hparams.index_file is None and self.hparams.source.bundled_index() is None:
            build_index(load_source(self.hparams.source), self.hparams.semantic_ids, self.hparams.cache_dir)

    def setup(self, stage: str | None = None) -> None:
        if self.prepared is None:
            self.prepared = self._prepare()

    def _prepare(self) -> Prepared:
        hp = self.hparams
        data = load_source(hp.source)
        index_path = self._index_file(data)
        index = load_index(index_path, hp.on_duplicate_ids)
        split = _remap(
            split_interactions(data, hp.split), align_items(data, index, str(index_path), hp.index_key_offset)
        )
        if not split.valid and not split.test:
            raise DataError(f"dataset {data.name}: the {hp.split} split leaves no validation or test user")
        item_tokens = index.all_tokens()
        if hp.tokenizer is not None:
            tokenizer = load_tokenizer(hp.tokenizer, item_tokens, extend=hp.extend_tokenizer)
        else:
            tokenizer = build_word_tokenizer([hp.prompt.format(history="")], item_tokens)
        ids = torch.tensor([token_ids(tokenizer, codes) for codes in index.codes], dtype=torch.long)
        eos = tokenizer.eos_token_id
        trie = PrefixTrie.build(ids, vocab_size=len(tokenizer), rule=hp.constraint, eos_token_id=eos)
        encoder = PromptEncoder(tokenizer, index, ids, hp.prompt, hp.max_history)
        log.info(
            "%s: %d users, %d items, %d interactions", data.name, len(data.user_ids), len(index), data.num_interactions
        )
        return Prepared(data, split, index, tokenizer, ids, trie, encoder)

    # -- what the model needs -----------------------------------------------------------------

    def longest_prompt(self) -> int:
        """Token length of a prompt with a full ``max_history`` of the longest identifiers."""
        p = self.prepared
        history = [p.index.codes[0]] * self.hparams.max_history
        text = render_prompt(self.hparams.prompt, history, self.hparams.max_history)
        return len(p.tokenizer(text, add_special_tokens=False)["input_ids"]) + 1

    # -- loaders ----------------------------------------------------------------------------------

    def eval_requests(self, stage: Literal["val", "test"]) -> list[tuple[int, tuple[int, ...], tuple[int, ...]]]:
        """(request id, history, targets) of the users decoded at ``stage``; ids are unique across stages."""
        p = self.prepared
        if stage == "val":
            return self._eval_requests(p.split.valid, self.hparams.eval.val_users, 0)
        return self._eval_requests(p.split.test, self.hparams.eval.test_users, len(p.split.valid))

    def _eval_requests(self, samples: list[EvalSample], limit: int | None, offset: int) -> list[tuple]:
        chosen = list(range(len(samples)))
        if limit is not None and limit < len(chosen):
            chosen = sorted(random.Random(self.hparams.seed).sample(chosen, limit))
        return [(offset + i, samples[i].history, samples[i].targets) for i in chosen]

    def _eval_pairs(self, requests: list[tuple]) -> list[tuple]:
        return [(history, t) for _, history, targets in requests for t in targets]

    def _loader(self, items: list, collate, batch_size: int) -> DataLoader:
        return DataLoader(items, batch_size=batch_size, collate_fn=collate, num_workers=self.hparams.num_workers)

    def train_dataloader(self) -> DataLoader:
        """Shuffled training samples; Lightning checkpoints the loader's position, so a resumed epoch continues."""
        hp, trainer = self.hparams, self.trainer
        rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        if hp.train_batches == "requests":
            items, collate = self.training_requests(), EvalCollator(self.prepared.encoder)
        else:
            items, collate = self._training_pairs(), TrainCollator(self.prepared.encoder)
        return resumable_loader(items, hp.batch_size, collate, hp.seed, hp.num_workers, rank, world)

    def _training_pairs(self) -> list[tuple[tuple[int, ...], int]]:
        pairs = training_pairs(self.prepared.split.train, self.hparams.train_samples, self.hparams.max_history)
        if not pairs:
            raise DataError(f"dataset {self.prepared.data.name}: no training samples (data.train_samples)")
        return pairs

    def _eval_loaders(self, requests: list[tuple]) -> list[DataLoader]:
        enc = self.prepared.encoder
        return [
            self._loader(self._eval_pairs(requests), TrainCollator(enc), self.hparams.batch_size),
            self._loader(requests, EvalCollator(enc), self.hparams.eval_batch_size),
        ]

    def val_dataloader(self) -> list[DataLoader]:
        """Two loaders: teacher-forced loss pairs, then generation requests (same users)."""
        return self._eval_loaders(self.eval_requests("val"))

    def test_dataloader(self) -> list[DataLoader]:
        return self._eval_loaders(self.eval_requests("test"))

    def training_requests(self) -> list[tuple[int, tuple[int, ...], tuple[int, ...]]]:
        """Every training sample as a request (sample id, history, (target,)), in a fixed order."""
        return [(i, history, (target,)) for i, (history, target) in enumerate(self._training_pairs())]

    def predict_dataloader(self) -> DataLoader:
        hp = self.hparams
        requests = self.training_requests() if hp.predict_set == "train" else self.eval_requests("test")
        return self._loader(requests, EvalCollator(self.prepared.encoder), hp.eval_batch_size)


def _remap(split: Split, positions: list[int]) -> Split:
    """Re-express a split over the dataset's items in index positions."""

    def sample(s: EvalSample) -> EvalSample:
        return EvalSample(s.user, tuple(positions[i] for i in s.history), tuple(positions[i] for i in s.targets))

    return Split(
        train=[[positions[i] for i in seq] for seq in split.train],
        valid=[sample(s) for s in split.valid],
        test=[sample(s) for s in split.test],
    )


def exported_settings(given: Mapping[str, Any], model_dir: str | None) -> dict[str, Any]:
    """``FROM_EXPORT``'s keys, plus the index and tokenizer, as the requests will use them: without ``model_dir`` the
    ``given`` value or the default; with it, the export's. A key ``given`` another value than the export's is an
    error naming it; the export's values taken where a key was unset and they differ from the default are logged."""
    if model_dir is None:
        return {key: default if given[key] is None else given[key] for key, default in FROM_EXPORT.items()}
    meta = ExportMeta.load(model_dir)
    export = {key: getattr(meta, key) for key in FROM_EXPORT}
    export.update(index_file=str(Path(model_dir) / INDEX_FILE), tokenizer=str(model_dir), extend_tokenizer=False)
    for key, value in export.items():
        mine = None if key == "extend_tokenizer" else given[key]
        if mine is not None and mine != value and not _same_path(key, mine, value):
            raise DataError(
                f"data.{key}: {mine!r} differs from {value!r}, what the model at {model_dir} was trained with "
                f"({META_FILE}, {INDEX_FILE} and tokenizer); leave data.{key} unset to use the model's"
            )
    taken = [
        f"{key}={export[key]!r}"
        for key, default in FROM_EXPORT.items()
        if given[key] is None and export[key] != default
    ]
    if taken:
        log.info("data: %s, from the model at %s (%s)", ", ".join(taken), model_dir, META_FILE)
    return export


def _same_path(key: str, mine: str, theirs: str) -> bool:
    return key in ("index_file", "tokenizer") and Path(mine).resolve() == Path(theirs).resolve()
