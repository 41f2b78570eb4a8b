"""The LightningDataModule: source -> split -> item index -> tokenizer -> batches."""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import lightning.pytorch as pl
import torch
from jsonargparse.typing import NonNegativeInt, PositiveInt
from torch.utils.data import DataLoader
from transformers import PreTrainedTokenizerBase

from atspeed.data.batches import EvalCollator, PromptEncoder, TrainCollator
from atspeed.data.export_dir import INDEX_FILE, ExportMeta
from atspeed.data.item_index import SemanticIdSpec, align_items, build_index, load_index
from atspeed.data.prompts import PAPER_PROMPT, check_template, render_prompt
from atspeed.data.sampler import resumable_loader
from atspeed.data.schema import Interactions
from atspeed.data.sources import LoadOptions, SourceName, embedded_dataset_path, load_source
from atspeed.data.sources.common import require_dir, require_file
from atspeed.data.splits import EvalSample, Split, SplitName, split_interactions, training_pairs
from atspeed.errors import DataError
from atspeed.items.index import ItemIndex
from atspeed.items.trie import PrefixTrie
from atspeed.models.tokenizer import build_word_tokenizer, load_tokenizer, token_ids

log = logging.getLogger(__name__)


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
    """Sequential recommendation data as prompts and identifier responses."""

    def __init__(
        self,
        source: SourceName = "recbole",
        path: str | None = None,
        meta_path: str | None = None,
        name: str | None = None,
        min_rating: float | None = None,
        kcore: NonNegativeInt = 0,
        index_file: str | None = None,
        on_duplicate_ids: Literal["error", "resolve"] = "error",
        index_key_offset: int = 0,
        semantic_ids: SemanticIdSpec | None = None,
        cache_dir: str = "runs/cache",
        split: SplitName = "global_time",
        train_samples: Literal["last", "sliding"] = "sliding",
        max_history: PositiveInt = 20,
        prompt: str = PAPER_PROMPT,
        tokenizer: str | None = None,
        extend_tokenizer: bool = True,
        constraint: Literal["exact", "per_position"] = "exact",
        batch_size: PositiveInt = 64,
        eval_batch_size: PositiveInt = 32,
        eval: EvalSpec | None = None,
        num_workers: NonNegativeInt = 0,
        seed: int = 0,
        model_dir: str | None = None,
        predict_set: Literal["test", "train"] = "test",
        train_batches: Literal["pairs", "requests"] = "pairs",
    ) -> None:
        """
        Args:
            source: data format: processed (authors' sequential_*.txt), recbole (atomic files), amazon2014, amazon2018.
            path: dataset directory (processed, recbole) or reviews file (amazon*); None = embedded MovieLens-100k.
            meta_path: Amazon metadata file (item titles and categories), optional.
            name: dataset name (RecBole file stem); default: the directory name.
            min_rating: keep interactions rated at least this (the paper: 4 on Amazon); None keeps all.
            kcore: keep users and items with at least this many interactions (iteratively); 0 = off.
            index_file: item index JSON (item id -> code tokens); None builds semantic ids from item text.
            on_duplicate_ids: what to do when items of the index share an identifier: fail, or give them distinct ones.
            index_key_offset: index key = integer item id + this (the Beauty release: files count items from 1, the
                index JSON from 0, so -1).
            semantic_ids: how to build identifiers when there is no index file.
            cache_dir: where built indices are cached.
            split: global_time (the paper, 8:1:1 by timestamp) or leave_one_out.
            train_samples: last (one sample per user) or sliding (every prefix of the training sequence).
            max_history: most recent items shown in the prompt.
            prompt: prompt template with one {history} field.
            tokenizer: local Hugging Face tokenizer to extend with identifier tokens; None builds a word-level one.
            extend_tokenizer: add missing identifier tokens to ``tokenizer``; false requires it to have them all.
            constraint: decoding constraint: exact prefix trie, or the looser per-position rule.
            batch_size: training batch size.
            eval_batch_size: requests per generation batch.
            eval: which validation and test users to decode.
            num_workers: DataLoader workers.
            seed: seed of the validation subset.
            model_dir: a model exported by the SFT stage: its tokenizer, index.json and the prompt, max_history and
                constraint of its atspeed.json replace the fields above, so requests match what it was trained on. On
                the command line it is linked to ``model.init_args.target`` (set there, never twice).
            predict_set: what ``predict`` decodes: the test users, or every training sample (teacher data; request id =
                the sample's position in ``training_requests``).
            train_batches: pairs (prompt + response, teacher-forced: SFT) or requests (left-padded prompts with the
                sample id and target: alignment, which looks up the sample's teacher data).
        """
        super().__init__()
        self.save_hyperparameters()
        if model_dir is not None:
            meta = ExportMeta.load(model_dir)
            for key in ("prompt", "max_history", "constraint"):
                self.hparams[key] = getattr(meta, key)
            prompt = meta.prompt
            index_file, tokenizer = str(Path(model_dir) / INDEX_FILE), model_dir
            self.hparams.update(index_file=index_file, tokenizer=tokenizer, extend_tokenizer=False)
        self.hparams.semantic_ids = semantic_ids or SemanticIdSpec()
        self.hparams.eval = eval or EvalSpec()
        check_template(prompt)
        if path is not None:
            (require_dir if source in ("processed", "recbole") else require_file)(Path(path), "data.path")
        if meta_path is not None:
            require_file(Path(meta_path), "data.meta_path")
        if path is None and source != "recbole":
            raise DataError(f"data.path is required for source {source!r} (only recbole has an embedded default)")
        for key, value in (("index_file", index_file), ("tokenizer", tokenizer)):
            if value is not None and not Path(value).exists():
                raise DataError(f"data.{key}: not found: {value}")
        self.prepared: Prepared | None = None

    # -- loading ----------------------------------------------------------------------------------

    def _load_interactions(self) -> Interactions:
        hp = self.hparams
        path = Path(hp.path) if hp.path is not None else embedded_dataset_path()
        options = LoadOptions(
            path=path,
            meta_path=Path(hp.meta_path) if hp.meta_path else None,
            min_rating=hp.min_rating,
            kcore=hp.kcore,
            name=hp.name,
        )
        return load_source(hp.source, options)

    def _index_file(self, data: Interactions) -> Path:
        hp = self.hparams
        if hp.index_file is not None:
            return Path(hp.index_file)
        if hp.source == "processed":
            found = sorted(Path(hp.path).glob("*.json"))
            if len(found) == 1:
                return found[0]
            if len(found) > 1:
                raise DataError(f"data.index_file: {hp.path} holds several index JSON files; name one")
        return build_index(data, hp.semantic_ids, hp.cache_dir)

    def prepare_data(self) -> None:
        """Build and cache the item index once (rank 0) when none is given."""
        if self.hparams.index_file is None and self.hparams.source != "processed":
            self._index_file(self._load_interactions())

    def setup(self, stage: str | None = None) -> None:
        if self.prepared is None:
            self.prepared = self._prepare()

    def _prepare(self) -> Prepared:
        hp = self.hparams
        data = self._load_interactions()
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
