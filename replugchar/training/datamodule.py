"""The Lightning data module of LSR training: the character-disjoint split of a data folder, capped and batched.

The schema, loaders and the split itself are :mod:`replugchar.core.data` (no Lightning there).
"""

from __future__ import annotations

import random

import lightning as L
from torch.utils.data import DataLoader

from ..core.data import QUERY_TYPES, Character, Corpus, DataError, Example, SplitSpec
from ..core.options import as_options


def _cap(examples: list[Example], limit: int | None, seed: int) -> list[Example]:
    if limit is None or len(examples) <= limit:
        return examples
    picked = random.Random(seed).sample(range(len(examples)), limit)
    return [examples[i] for i in sorted(picked)]


SPLIT_FLAT_NAMES = {name: ("split", name) for name in ("val_fraction", "test_fraction", "seed")}
"""The ``data`` options of before the option groups that moved into ``data.split``."""


def collate_examples(batch: list[Example]) -> list[Example]:
    return list(batch)


class LSRDataModule(L.LightningDataModule):
    def __init__(
        self,
        data_dir: str = "demo",
        split: SplitSpec = SplitSpec(),
        batch_size: int = 8,
        max_train_examples: int | None = None,
        max_val_examples: int | None = None,
        query_types: list[str] | None = None,
        num_workers: int = 0,
        all_greetings: bool = False,
    ) -> None:
        """
        Args:
            data_dir: folder with characters.jsonl and dialogues.jsonl, or "demo" for the bundled subset.
            split: the character-disjoint split (fractions and seed), stored in the export's retriever.json.
            batch_size: queries per optimisation step.
            max_train_examples: cap on training examples (random, seeded by ``split.seed``); None keeps all.
                Sizes the LM budget.
            max_val_examples: cap on validation examples.
            query_types: keep only these query types (greeting/closing/other); None keeps all.
            num_workers: DataLoader workers.
            all_greetings: keep every greeting turn of the training and validation characters and apply the
                caps to the other turns only. Greetings are 7-11% of turns but the case generality exists for:
                a capped sample would hold too few of them to learn or to validate on.
        """
        super().__init__()
        self.split = as_options(SplitSpec, split, "data.split")
        if batch_size <= 0:
            raise ValueError(f"data.batch_size must be positive, got {batch_size}")
        for name, value in (
            ("max_train_examples", max_train_examples),
            ("max_val_examples", max_val_examples),
        ):
            if value is not None and value <= 0:
                raise ValueError(f"data.{name} must be positive or null, got {value}")
        for qt in query_types or []:
            if qt not in QUERY_TYPES:
                raise ValueError(f"data.query_types: unknown query type {qt!r}; use {QUERY_TYPES}")
        self.save_hyperparameters(ignore=["split"])
        self.hparams["split"] = self.split.to_dict()  # plain data in checkpoints
        self.corpus: Corpus | None = None
        self.train_examples: list[Example] = []
        self.val_examples: list[Example] = []
        self.test_examples: list[Example] = []

    def setup(self, stage: str | None = None) -> None:
        if self.corpus is not None:
            return
        hp, seed = self.hparams, self.split.seed
        self.corpus = Corpus.load(hp.data_dir)
        split = self.split.assign(list(self.corpus.characters))
        keep = set(hp.query_types) if hp.query_types else set(QUERY_TYPES)
        examples = [e for e in self.corpus.examples if e.query_type in keep]
        all_greetings = hp.get("all_greetings", False)  # subclasses (the SFT data) may not declare it
        uncapped = [e for e in examples if e.query_type == "greeting"] if all_greetings else []
        capped = [e for e in examples if e.query_type != "greeting"] if all_greetings else examples

        def take(part: str, limit: int | None) -> list[Example]:
            chars = split[part]
            picked = _cap([e for e in capped if e.character_id in chars], limit, seed)
            return picked + [e for e in uncapped if e.character_id in chars]

        self.train_examples = take("train", hp.max_train_examples)
        self.val_examples = take("val", hp.max_val_examples)
        self.test_examples = [e for e in examples if e.character_id in split["test"]]

    @property
    def characters(self) -> dict[str, Character]:
        if self.corpus is None:
            self.setup()
        return self.corpus.characters

    def _require(self, examples: list[Example], split: str) -> None:
        """An empty split would make Lightning skip training or validation with only a warning."""
        if self.corpus is None:
            self.setup()
            examples = self.train_examples if split == "training" else self.val_examples
        if not examples:
            hp = self.hparams
            raise DataError(
                f"{self.corpus.source if self.corpus else hp.data_dir}: no {split} examples after the character "
                f"split ({len(self.corpus.characters) if self.corpus else 0} characters, "
                f"data.split.val_fraction={self.split.val_fraction}, data.query_types={hp.query_types})"
            )

    def train_dataloader(self) -> DataLoader:
        self._require(self.train_examples, "training")
        return DataLoader(
            self.train_examples,
            batch_size=self.hparams.batch_size,
            shuffle=True,
            collate_fn=collate_examples,
            num_workers=self.hparams.num_workers,
        )

    def val_dataloader(self) -> DataLoader:
        if self.split.val_fraction > 0:
            self._require(self.val_examples, "validation")
        return DataLoader(
            self.val_examples,
            batch_size=self.hparams.batch_size,
            shuffle=False,
            collate_fn=collate_examples,
            num_workers=self.hparams.num_workers,
        )
