"""The data side of ``replugchar finetune-lm``: which prompts the character LM is fine-tuned on, in which order.

Training requests are (example, settings) pairs of the training characters of the hash split of
:func:`replugchar.core.data.split_characters` (the split ``fit`` and ``evaluate`` use), each shown with all of its
character's settings, a random subset of them or none (:func:`draw_settings`, weighted by ``data.settings_mix``).
They come from :class:`SFTStream`, a seeded stream whose batch ``b`` is a pure function of (seed, b), so a run
killed mid-epoch resumes on exactly the batches it had not trained on. The batches are text
(:class:`~replugchar.lm.likelihood.LoglikRequest` lists): :class:`replugchar.training.finetune.CharacterLMModule` tokenises
them as :class:`~replugchar.lm.likelihood.LMLikelihood` does.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import warnings
from collections.abc import Iterator, Sequence
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, IterableDataset

from ..core.data import Character, Example, SplitSpec
from ..lm.likelihood import LoglikRequest
from .datamodule import LSRDataModule

SETTINGS_MIX_KEYS = ("all", "subset", "none")
DEFAULT_SETTINGS_MIX = {"all": 0.4, "subset": 0.4, "none": 0.2}

# The training stream has a length (so epochs, progress bars and max_epochs mean something) and is an
# IterableDataset (so Lightning never re-samples it); Lightning warns about that pairing because of per-worker
# duplication, which cannot happen here: the loader always runs in the main process (num_workers=0).
warnings.filterwarnings("ignore", message="Your `IterableDataset` has `__len__` defined")


# ----------------------------------------------------------------------------------------------- prompts
def check_settings_mix(mix: dict[str, float] | None) -> dict[str, float]:
    """``{"all", "subset", "none"} -> weight``, missing keys 0; ValueError naming ``data.settings_mix``."""
    mix = dict(DEFAULT_SETTINGS_MIX if mix is None else mix)
    unknown = sorted(set(mix) - set(SETTINGS_MIX_KEYS))
    if unknown:
        raise ValueError(f"data.settings_mix: unknown key(s) {unknown}; use {list(SETTINGS_MIX_KEYS)}")
    weights = {k: float(mix.get(k, 0.0)) for k in SETTINGS_MIX_KEYS}
    if not all(math.isfinite(w) and w >= 0 for w in weights.values()) or sum(weights.values()) <= 0:
        raise ValueError(f"data.settings_mix: weights must be finite, >= 0 and not all 0, got {mix}")
    return weights


def draw_settings(
    settings: Sequence[str], mix: dict[str, float], max_subset: int, rng: random.Random
) -> tuple[str, ...]:
    """The settings one training prompt shows: all of them shuffled, a random subset of 1..max_subset, or none.

    Why a mix: LSR reads the LM's log-likelihood of replies under single settings and under no setting, and generation at inference sees
    the top-k, so the teacher must be fluent in all three prompt shapes, not only the one it was tuned on.
    """
    kind = rng.choices(SETTINGS_MIX_KEYS, weights=[mix[k] for k in SETTINGS_MIX_KEYS])[0]
    if kind == "none" or not settings:
        return ()
    if kind == "all":
        return tuple(rng.sample(list(settings), len(settings)))
    return tuple(rng.sample(list(settings), rng.randint(1, min(max_subset, len(settings)))))


# ----------------------------------------------------------------------------------------------- data
class SFTStream(IterableDataset):
    """Endless seeded stream of training requests, batched; batch ``b`` is a pure function of (seed, b).

    Why not a shuffled DataLoader: a run killed mid-epoch must resume on exactly the batches it had not trained
    on. Position ``p`` of the stream is example ``perm_e[p % n]`` with ``e = p // n`` and ``perm_e`` a seeded
    permutation, and its settings are drawn from ``Random((seed, p))``, so resuming is setting :attr:`cursor`
    to the number of batches already consumed. One "epoch" is ``len(self)`` batches (one pass over the data,
    rounded up); under DDP rank ``r`` of ``w`` takes global batches ``b * w + r``.
    """

    def __init__(
        self,
        examples: Sequence[Example],
        characters: dict[str, Character],
        *,
        batch_size: int,
        mix: dict[str, float],
        max_subset: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if not examples:
            raise ValueError("the SFT stream needs at least one training example")
        self.examples = list(examples)
        self.characters = characters
        self.batch_size = batch_size
        self.mix = mix
        self.max_subset = max_subset
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.cursor = 0
        """Batches of this rank already consumed: the next ``__iter__`` starts there, up to the epoch's end."""
        self._perms: dict[int, list[int]] = {}

    def __len__(self) -> int:
        return math.ceil(len(self.examples) / (self.batch_size * self.world_size))

    @property
    def fingerprint(self) -> str:
        """What the stream's content depends on; a checkpoint only resumes a stream with the same one."""
        h = hashlib.sha1(json.dumps([self.seed, self.batch_size, self.world_size, self.max_subset]).encode())
        h.update(json.dumps(self.mix, sort_keys=True).encode())
        for e in self.examples:
            h.update(e.example_id.encode() + b"\x1f")
        return h.hexdigest()[:16]

    def _perm(self, epoch: int) -> list[int]:
        if epoch not in self._perms:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perms = {epoch: torch.randperm(len(self.examples), generator=g).tolist()}
        return self._perms[epoch]

    def request(self, position: int) -> LoglikRequest:
        n = len(self.examples)
        example = self.examples[self._perm(position // n)[position % n]]
        rng = random.Random(f"{self.seed}:train:{position}")
        settings = draw_settings(
            self.characters[example.character_id].settings, self.mix, self.max_subset, rng
        )
        return LoglikRequest(example, settings)

    def batch(self, b: int) -> list[LoglikRequest]:
        start = (b * self.world_size + self.rank) * self.batch_size
        return [self.request(p) for p in range(start, start + self.batch_size)]

    def __iter__(self) -> Iterator[list[LoglikRequest]]:
        end = (self.cursor // len(self) + 1) * len(self)
        while self.cursor < end:
            b = self.cursor
            self.cursor += 1
            yield self.batch(b)


def _as_list(batch):
    return list(batch)


class _StreamLoader(DataLoader):
    """A DataLoader over :class:`SFTStream` that Lightning treats as resumable.

    The resume position itself comes from ``trainer.global_step`` (see
    :meth:`CharacterSFTDataModule.train_dataloader`); the state saved here is what that position means, so a
    resume with a different batch size, seed, data or device count fails instead of training on other batches.
    """

    def state_dict(self) -> dict[str, Any]:
        return {"stream": self.dataset.fingerprint, "batches_per_epoch": len(self.dataset)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("stream") != self.dataset.fingerprint:
            raise ValueError(
                "ckpt_path: the checkpoint was trained on a different data stream (data.data_dir, batch_size, "
                "seed, settings_mix, max_subset, caps or the number of devices changed); resume with the "
                "data section of the interrupted run"
            )


class CharacterSFTDataModule(L.LightningDataModule):
    def __init__(
        self,
        data_dir: str = "demo",
        split: SplitSpec = SplitSpec(),
        batch_size: int = 8,
        max_train_examples: int | None = None,
        max_val_examples: int | None = None,
        query_types: list[str] | None = None,
        settings_mix: dict[str, float] | None = None,
        max_subset: int = 2,
    ) -> None:
        """
        Args:
            data_dir: folder with characters.jsonl and dialogues.jsonl (shared schema), or "demo".
            split: the character split, hashed per character id exactly as in ``replugchar fit``
                (:class:`~replugchar.core.data.SplitSpec`): keep it equal to the LSR run's ``data.split`` so the
                teacher never trains on a character LSR validates or evaluation tests on. Its seed also seeds
                the caps, the example order and the settings draws.
            batch_size: examples per optimisation step (per device).
            max_train_examples: cap on training examples (random, seeded); null keeps all.
            max_val_examples: cap on validation examples; validation costs one forward pass per example.
            query_types: keep only these query types (greeting/closing/other); null keeps all.
            settings_mix: how often a training prompt shows all the character's settings (shuffled), a random
                subset of 1..max_subset of them, or none: ``{all: 0.4, subset: 0.4, none: 0.2}`` by default;
                weights are normalised, missing keys count 0.
            max_subset: largest subset size of the ``subset`` prompts.
        """
        super().__init__()
        self.mix = check_settings_mix(settings_mix)
        if max_subset < 1:
            raise ValueError(f"data.max_subset must be >= 1, got {max_subset}")
        # the examples are those of the LSR data module, validated with the same messages as fit
        self.pool = LSRDataModule(
            data_dir=data_dir,
            split=split,
            batch_size=batch_size,
            max_train_examples=max_train_examples,
            max_val_examples=max_val_examples,
            query_types=query_types,
        )
        self.split = self.pool.split
        self.save_hyperparameters(ignore=["split"])
        self.hparams["split"] = self.split.to_dict()  # plain data in checkpoints
        self.val_requests: list[LoglikRequest] = []

    def setup(self, stage: str | None = None) -> None:
        self.pool.setup(stage)
        if not self.pool.train_examples and stage in (None, "fit"):
            self.pool._require([], "training")  # raises DataError naming the data folder and split options
        seed = self.split.seed
        # validation prompts are drawn once per example id, so every validation sees the same prompts
        self.val_requests = [
            LoglikRequest(
                e,
                draw_settings(
                    self.characters[e.character_id].settings,
                    self.mix,
                    self.hparams.max_subset,
                    random.Random(f"{seed}:val:{e.example_id}"),
                ),
            )
            for e in self.pool.val_examples
        ]

    @property
    def characters(self) -> dict[str, Character]:
        return self.pool.characters

    @property
    def train_examples(self) -> list[Example]:
        return self.pool.train_examples

    @property
    def val_examples(self) -> list[Example]:
        return self.pool.val_examples

    @property
    def train_characters(self) -> list[str]:
        """Ids of the characters whose replies are in the training pool (sorted)."""
        return sorted({e.character_id for e in self.train_examples})

    @property
    def source(self) -> str:
        corpus = self.pool.corpus
        return corpus.source if corpus is not None else str(self.hparams.data_dir)

    def stream(self) -> SFTStream:
        trainer = self.trainer
        rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        return SFTStream(
            self.train_examples,
            self.characters,
            batch_size=self.hparams.batch_size,
            mix=self.mix,
            max_subset=self.hparams.max_subset,
            seed=self.split.seed,
            rank=rank,
            world_size=world,
        )

    def train_dataloader(self) -> DataLoader:
        if self.pool.corpus is None:
            self.setup("fit")
        stream = self.stream()
        trainer = self.trainer
        if trainer is not None:  # a resumed run restarts the stream after the batches it already trained on
            stream.cursor = trainer.global_step * trainer.accumulate_grad_batches
        # an explicit generator: a DataLoader otherwise draws from the global RNG on every iter(), which would
        # shift the dropout masks of a resumed run against an uninterrupted one
        return _StreamLoader(
            stream,
            batch_size=None,
            collate_fn=_as_list,
            generator=torch.Generator().manual_seed(self.split.seed),
        )

    def transfer_batch_to_device(self, batch: list[LoglikRequest], device, dataloader_idx: int):
        return batch  # text: CharacterLMModule.reply_nll tokenises it and builds the tensors on its device

    def val_dataloader(self) -> DataLoader:
        if self.pool.corpus is None:
            self.setup("validate")
        if self.split.val_fraction > 0:
            self.pool._require(self.pool.val_examples, "validation")
        return DataLoader(
            self.val_requests,
            batch_size=self.hparams.batch_size,
            shuffle=False,
            collate_fn=_as_list,
            generator=torch.Generator().manual_seed(self.split.seed),
        )
