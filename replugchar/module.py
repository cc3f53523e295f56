"""LightningModule: LM-supervised fine-tuning of a sentence-transformers bi-encoder over character settings."""

from __future__ import annotations

import copy
import dataclasses
import logging
import zlib
from pathlib import Path
from typing import Literal

import lightning as L
import numpy as np
import torch
from torch import Tensor

from .data import Character, Example
from .index import SettingIndex, setting_records
from .lm_scoring import LMScorer, PromptTemplate, ScoreRequest
from .losses import Direction, LSRLoss, entropy
from .models import EMBEDDED_ENCODER, EMBEDDED_LM, cache_dir, load_causal_lm, load_encoder
from .score_cache import CachedScorer

log = logging.getLogger(__name__)
QueryText = Literal["query", "context_and_query"]


def resolve_cache_dir(option: str | None) -> Path | None:
    """``"auto"`` -> ``$REPLUGCHAR_CACHE/scores``; a path -> that path; None -> no persistent cache."""
    if option is None:
        return None
    return cache_dir() / "scores" if option == "auto" else Path(option).expanduser()


class LSRModule(L.LightningModule):
    def __init__(
        self,
        encoder: str = EMBEDDED_ENCODER,
        lm: str = EMBEDDED_LM,
        k: int = 5,
        gamma: float = 0.1,
        beta: float = 0.05,
        kl_direction: Direction = "lm_to_retriever",
        lm_score: Literal["mean", "sum"] = "mean",
        query_text: QueryText = "query",
        share_encoders: bool = True,
        learning_rate: float = 1e-4,
        weight_decay: float = 0.01,
        warmup_steps: int = 0,
        refresh_every: int = 50,
        template: PromptTemplate | dict | None = None,
        lm_dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto",
        lm_revision: str | None = None,
        max_length: int = 512,
        lm_batch_tokens: int = 4096,
        score_cache_dir: str | None = "auto",
        trust_remote_code: bool = False,
    ) -> None:
        """
        Args:
            encoder: bi-encoder to fine-tune: hub id, local folder, ``embedded:all-MiniLM-L6-v2`` or ``tiny:bert``.
            lm: frozen causal LM that supervises retrieval: hub id, local folder,
                ``embedded:SmolLM2-135M-Instruct`` or ``tiny:gpt2``. Never trained, never checkpointed.
            k: candidate settings per query (top-k of the character's settings by the current index);
                a character with at most k settings has all of them as candidates.
            gamma: retriever temperature γ in softmax(sim/γ).
            beta: LM temperature β in softmax(log P_LM/β).
            kl_direction: ``lm_to_retriever`` = KL(Q‖P_R) (default, see :class:`~replugchar.losses.LSRLoss`)
                or ``retriever_to_lm`` = KL(P_R‖Q) as written in REPLUG.
            lm_score: LM target per candidate: mean per-token log-likelihood of the response, or the sum.
            query_text: what the encoder embeds for a query: the query alone, or the last context turn + query.
            share_encoders: one encoder for queries and settings (default); False trains a separate query
                encoder initialised from the same weights.
            learning_rate: AdamW learning rate.
            weight_decay: AdamW weight decay.
            warmup_steps: linear learning-rate warmup.
            refresh_every: re-encode all settings and rebuild the FAISS index every this many steps (T).
            template: LM prompt template (see :class:`~replugchar.lm_scoring.PromptTemplate`).
            lm_dtype: ``auto`` = bfloat16 on GPU, float32 on CPU.
            lm_revision: hub revision of ``lm`` (part of the score-cache key).
            max_length: token limit of prompt + response; old context is cut first, the response never.
            lm_batch_tokens: token budget of one LM forward pass (padded tokens counted).
            score_cache_dir: persistent LM-score cache folder; "auto" = $REPLUGCHAR_CACHE/scores (default
                ~/.cache/replugchar/scores); null keeps scores in memory for this run only.
            trust_remote_code: allow model repositories to run their own code (off unless you trust them).
        """
        super().__init__()
        checks = {
            "k": k > 0,
            "gamma": 0 < gamma < float("inf"),
            "beta": 0 < beta < float("inf"),
            "refresh_every": refresh_every > 0,
            "learning_rate": learning_rate > 0,
            "max_length": max_length > 0,
            "lm_batch_tokens": lm_batch_tokens > 0,
            "warmup_steps": warmup_steps >= 0,
        }
        for name, ok in checks.items():
            if not ok:
                raise ValueError(f"model.{name} is out of range: {locals()[name]!r}")
        self.template = (
            PromptTemplate(**template) if isinstance(template, dict) else (template or PromptTemplate())
        )
        # hparams hold plain data only (a dataclass there would make checkpoints need pickle to load)
        self.save_hyperparameters(ignore=["template"])
        self.hparams["template"] = dataclasses.asdict(self.template)
        self.encoder = load_encoder(encoder, trust_remote_code=trust_remote_code)
        # sentence-transformers pools token embeddings itself: the HF model's own pooler (BERT, MPNet, ...) gets
        # no gradient, and DDP fails on parameters that take no part in the loss; freeze it (no effect otherwise)
        for mod in self.encoder.modules():
            if isinstance(getattr(mod, "pooler", None), torch.nn.Module):
                mod.pooler.requires_grad_(False)
        self.query_encoder = None if share_encoders else copy.deepcopy(self.encoder)
        self.loss_fn = LSRLoss(gamma=gamma, beta=beta, direction=kl_direction)
        self.characters: dict[str, Character] = {}
        self._scorer: CachedScorer | None = None  # not an nn.Module: the LM stays out of state_dict
        self.index: SettingIndex | None = None
        self._index_step = -1
        self._emb_stats: dict[str, float] = {}
        self._val_rows: list[Tensor] = []
        self.val_per_example: np.ndarray | None = None
        """After a validation epoch: (n, 3) rows of (dialogue hash, top-1 agreement 0/1, top-1 LM gain), in
        dataloader order, so two validations of the same split can be compared example by example."""

    # ------------------------------------------------------------------------------------------- setup
    def setup(self, stage: str) -> None:
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if dm is not None:
            dm.setup(stage)
            self.characters = dm.characters

    @property
    def scorer(self) -> CachedScorer:
        """The frozen LM behind its score cache, loaded on first use onto this module's device."""
        if self._scorer is None:
            hp = self.hparams
            dtype = hp.lm_dtype
            if dtype == "auto":
                dtype = "bfloat16" if self.device.type == "cuda" else "float32"
            model, tok = load_causal_lm(
                hp.lm,
                dtype=dtype,
                revision=hp.lm_revision,
                trust_remote_code=hp.trust_remote_code,
                device=str(self.device),
            )
            lm_key = f"{hp.lm}@{hp.lm_revision or 'main'}"
            scorer = LMScorer(
                model,
                tok,
                self.template,
                max_length=hp.max_length,
                max_batch_tokens=hp.lm_batch_tokens,
                lm_key=lm_key,
            )
            cache = resolve_cache_dir(hp.score_cache_dir)
            self._scorer = CachedScorer(scorer, cache, rank=self.global_rank)
        return self._scorer

    def set_scorer(self, scorer: CachedScorer) -> None:
        """Share one loaded LM between modules (evaluation, notebooks, tests)."""
        self._scorer = scorer

    # ------------------------------------------------------------------------------------------- encoding
    def query_strings(self, examples: list[Example]) -> list[str]:
        if self.hparams.query_text == "query":
            return [e.query for e in examples]
        return [(e.context[-1].text + "\n" if e.context else "") + e.query for e in examples]

    def encode(self, texts: list[str], *, queries: bool = False) -> Tensor:
        """(n, d) L2-normalised embeddings, with gradient when called in training mode."""
        model = self.query_encoder if (queries and self.query_encoder is not None) else self.encoder
        features = model.preprocess(texts)
        features = {k: v.to(self.device) if isinstance(v, Tensor) else v for k, v in features.items()}
        emb = model(features)["sentence_embedding"]
        return torch.nn.functional.normalize(emb, dim=-1)

    @torch.no_grad()
    def encode_all(self, texts: list[str], *, queries: bool = False, batch_size: int = 128) -> np.ndarray:
        was_training = self.training
        self.eval()
        try:
            out = [
                self.encode(texts[i : i + batch_size], queries=queries).float().cpu().numpy()
                for i in range(0, len(texts), batch_size)
            ]
        finally:
            self.train(was_training)
        return (
            np.concatenate(out) if out else np.zeros((0, self.encoder.get_embedding_dimension()), np.float32)
        )

    def refresh_index(self) -> SettingIndex:
        """Re-encode every setting with the current encoder and rebuild the index (same builder as export)."""
        if not self.characters:
            raise RuntimeError("no characters: attach a datamodule or set module.characters first")
        records = setting_records(self.characters)
        emb = self.encode_all([r.text for r in records])  # (n_settings, d), unit norm
        self.index = SettingIndex.build(emb, records)
        self._index_step = self.global_step if self._trainer is not None else 0
        mean = emb.mean(0)
        # collapse shows as a per-dimension std -> 0 and the mean vector's norm (≈ mean pairwise cos) -> 1
        self._emb_stats = {"emb_std": float(emb.std(0).mean()), "emb_mean_cos": float(mean @ mean)}
        return self.index

    # ------------------------------------------------------------------------------------------- LSR step
    def candidates(self, examples: list[Example]) -> list[list[int]]:
        """Top-k setting ids per query from the (possibly stale) index of the character's settings."""
        if self.index is None:
            self.refresh_index()
        q = self.encode_all(self.query_strings(examples), queries=True)
        _, ids = self.index.search(q, self.hparams.k, character_ids=[e.character_id for e in examples])
        return [[int(i) for i in row if i >= 0] for row in ids]

    def lm_targets(self, examples: list[Example], cands: list[list[int]]) -> Tensor:
        """(batch, k) LM log-likelihood of the gold response with each candidate setting; -inf = no candidate."""
        k = self.hparams.k
        requests = [
            ScoreRequest(e, (self.index.records[i].text,)) for e, row in zip(examples, cands) for i in row
        ]
        scores = self.scorer.score(requests)
        values = scores.logp_mean if self.hparams.lm_score == "mean" else scores.logp_sum
        out = torch.full((len(examples), k), float("-inf"))
        pos = 0
        for row, ids in enumerate(cands):
            out[row, : len(ids)] = torch.as_tensor(values[pos : pos + len(ids)], dtype=torch.float32)
            pos += len(ids)
        return out.to(self.device)

    def similarities(self, examples: list[Example], cands: list[list[int]]) -> tuple[Tensor, Tensor]:
        """(batch, k) cosine similarities with gradient, and the (batch, k) mask of real candidates."""
        k = self.hparams.k
        uniq = sorted({i for row in cands for i in row})
        pos = {sid: j for j, sid in enumerate(uniq)}
        q = self.encode(self.query_strings(examples), queries=True)  # (batch, d)
        s = self.encode([self.index.records[i].text for i in uniq])  # (unique, d)
        gather = torch.zeros((len(examples), k), dtype=torch.long, device=self.device)
        mask = torch.zeros((len(examples), k), dtype=torch.bool, device=self.device)
        for row, ids in enumerate(cands):
            gather[row, : len(ids)] = torch.as_tensor([pos[i] for i in ids])
            mask[row, : len(ids)] = True
        sim = torch.einsum("bd,bkd->bk", q, s[gather])  # (batch, k)
        return sim, mask

    def _step(self, examples: list[Example], prefix: str) -> Tensor:
        cands = self.candidates(examples)
        sim, mask = self.similarities(examples, cands)
        lm = self.lm_targets(examples, cands)
        loss = self.loss_fn(sim, lm, mask)
        with torch.no_grad():
            log_pr, log_q, valid = self.loss_fn.distributions(sim, lm, mask)
            neg = torch.finfo(sim.dtype).min
            top1 = sim.masked_fill(~mask, neg).argmax(-1)  # (batch,)
            agree = top1 == lm.masked_fill(~torch.isfinite(lm), neg).argmax(-1)
            # LM log-likelihood of the gold reply with the retriever's top-1 setting, relative to the mean over
            # candidates (what a random candidate gets): > 0 means retrieval helps the LM
            lm_mean = torch.where(target_ok := torch.isfinite(lm) & mask, lm, 0).sum(-1) / target_ok.sum(
                -1
            ).clamp(min=1)
            top1_gain = lm.gather(1, top1[:, None]).squeeze(1) - lm_mean
            if prefix == "val":
                # kept on the CPU in float64: a crc32 group id is exact there (and MPS has no float64)
                groups = torch.tensor(
                    [zlib.crc32(e.dialogue_id.encode()) for e in examples], dtype=torch.float64
                )
                rows = torch.stack(
                    [groups, agree.cpu().double(), top1_gain.cpu().double()], dim=1
                )  # (batch, 3)
                self._val_rows.append(rows[(valid & torch.isfinite(top1_gain)).cpu()])
            metrics = {
                "loss": loss,
                "retriever_entropy": entropy(log_pr)[valid].mean(),
                "lm_entropy": entropy(log_q)[valid].mean(),
                "top1_agreement": agree[valid].float().mean(),
                "top1_lm_gain": top1_gain[valid & torch.isfinite(top1_gain)].mean(),
            }
        bs = len(examples)
        self.log_dict(
            {f"{prefix}/{k}": v for k, v in metrics.items()},
            batch_size=bs,
            prog_bar=False,
            on_step=prefix == "train",
            on_epoch=True,
            sync_dist=True,  # DDP: epoch values are the mean over ranks, not rank 0's shard of the data
        )
        self.log(
            f"{prefix}_top1",
            metrics["top1_agreement"],
            batch_size=bs,
            prog_bar=True,
            on_epoch=True,
            on_step=False,
            logger=False,
            sync_dist=True,
        )
        return loss

    def on_train_epoch_start(self) -> None:
        # sentence-transformers loads in eval mode and Lightning keeps submodule modes: train with dropout on
        self.encoder.train()
        if self.query_encoder is not None:
            self.query_encoder.train()

    def transfer_batch_to_device(self, batch: list[Example], device, dataloader_idx: int) -> list[Example]:
        return batch  # plain text; tensors are made on the right device where they are built

    def training_step(self, batch: list[Example], batch_idx: int) -> Tensor:
        if self.index is None or self.global_step - self._index_step >= self.hparams.refresh_every:
            self.refresh_index()
            self.log_dict({f"train/{k}": v for k, v in self._emb_stats.items()})
        self.log("train/index_age", float(self.global_step - self._index_step))
        return self._step(batch, "train")

    def validation_step(self, batch: list[Example], batch_idx: int) -> None:
        if batch_idx == 0 or self.index is None:
            self.refresh_index()  # validation always sees the current encoder
        self._step(batch, "val")

    def configure_optimizers(self):
        params = [p for p in self.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=self.hparams.learning_rate, weight_decay=self.hparams.weight_decay)
        warm = self.hparams.warmup_steps
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda step: min(1.0, (step + 1) / warm) if warm else 1.0
        )
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def flush_scores(self) -> None:
        """Write LM scores still buffered in memory to the cache (also called at the end of fit/validate)."""
        if self._scorer is not None:
            self._scorer.flush()

    def on_train_epoch_end(self) -> None:
        self.flush_scores()

    def on_validation_epoch_start(self) -> None:
        self._val_rows = []

    def on_validation_epoch_end(self) -> None:
        self.flush_scores()
        rows = torch.cat(self._val_rows) if self._val_rows else torch.zeros((0, 3), dtype=torch.float64)
        if self.trainer.world_size > 1:
            # every rank holds as many rows as the others only if no row was dropped; pad to be safe
            n = self.all_gather(torch.tensor([len(rows)], device=self.device)).max()
            padded = torch.full((int(n), 3), float("nan"), dtype=torch.float64, device=self.device)
            padded[: len(rows)] = rows.to(self.device)
            rows = self.all_gather(padded).reshape(-1, 3)
            rows = rows[~torch.isnan(rows[:, 0])]
        self.val_per_example = rows.cpu().numpy()
        self._val_rows = []
        if self.trainer.state.fn == "fit":
            self.index = None  # force a refresh at the next training step (val rebuilt it)

    def teardown(self, stage: str) -> None:
        self.flush_scores()

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # the LM is not a registered submodule, so it is not in state_dict; say so in the checkpoint
        checkpoint["replugchar"] = {"lm": self.hparams.lm, "lm_in_checkpoint": False}
