"""LightningModule: LM-supervised training of a sentence-transformers bi-encoder and the dialogue-aware scoring
head of :mod:`replugchar.core.scoring` over character settings."""

from __future__ import annotations

import copy
import dataclasses
import logging
import zlib
from typing import Literal

import lightning as L
import numpy as np
import torch
from torch import Tensor

from ..core.data import Character, Example, QueryText, query_text
from ..core.scoring import (
    FEATURES,
    ScoringRule,
    dialogue_features,
    generality_of,
    query_weight,
    score_settings,
    window,
)
from ..lm.models import EMBEDDED_ENCODER, EMBEDDED_LM, load_encoder
from ..lm.score_cache import SCORER_OPTIONS, CachedScorer, build_scorer
from ..lm.scoring import PromptTemplate, ScoreRequest
from ..retrieval.index import SettingIndex, setting_records
from .losses import Direction, LSRLoss, entropy

log = logging.getLogger(__name__)


class DialogueHead(torch.nn.Module):
    """The learned numbers of the scoring rule: the dialogue-evidence weights w (one per
    :data:`~replugchar.core.scoring.FEATURES`) and, with ``dim``, the generality vector v of g(s) = v·e_s with
    its per-query weight λ + gate·(best cosine, empty history).

    w and v start at zero, so training begins from plain similarity; λ starts at 1 so that v gets a gradient
    (with v = 0 the score does not depend on λ or the gate, so this changes nothing at the start)."""

    def __init__(self, dim: int | None = None) -> None:
        super().__init__()
        self.weights = torch.nn.Parameter(torch.zeros(len(FEATURES)))
        self.generality = torch.nn.Parameter(torch.zeros(dim)) if dim else None
        self.prior_weight = torch.nn.Parameter(torch.tensor(1.0)) if dim else None
        self.gate = torch.nn.Parameter(torch.zeros(2)) if dim else None

    def forward(
        self,
        sim: Tensor,
        features: Tensor,
        settings: Tensor | None = None,
        mask: Tensor | None = None,
        history_empty: Tensor | None = None,
    ) -> Tensor:
        """(batch, k) scores from cosines (batch, k), features (batch, k, F) and, for the generality term, the
        candidates' embeddings (batch, k, d), their mask (batch, k) and (batch,) bools: no history yet."""
        if self.generality is None or settings is None:
            return score_settings(sim, features, self.weights)  # (batch, k)
        g = generality_of(settings, self.generality)  # (batch, k)
        best = sim.detach().masked_fill(~mask, float("-inf")).max(-1).values  # (batch,)
        weight = query_weight(best, history_empty, self.prior_weight, self.gate)  # (batch,)
        return score_settings(sim, features, self.weights, g, weight)


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
        dialogue_features: bool = True,
        history_window: int = 16,
        freeze_encoder: bool = False,
        head_learning_rate: float = 0.05,
        min_margin: float = 0.0,
        top1_weight: float = 0.0,
        generality: bool = False,
        generality_l2: float = 0.05,
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
            kl_direction: ``lm_to_retriever`` = KL(Q‖P_R) (default, see :class:`~replugchar.training.losses.LSRLoss`)
                or ``retriever_to_lm`` = KL(P_R‖Q) as written in REPLUG.
            lm_score: LM target per candidate: mean per-token log-likelihood of the response, or the sum.
            query_text: what the encoder embeds for a query: the query alone (default), or the last context
                turn + query (kept for old runs: it raises already-voiced settings; prefer dialogue features).
            share_encoders: one encoder for queries and settings (default); False trains a separate query
                encoder initialised from the same weights.
            learning_rate: AdamW learning rate.
            weight_decay: AdamW weight decay.
            warmup_steps: linear learning-rate warmup.
            refresh_every: re-encode all settings and rebuild the FAISS index every this many steps (T).
            template: LM prompt template (see :class:`~replugchar.lm.scoring.PromptTemplate`).
            lm_dtype: ``auto`` = bfloat16 on GPU, float32 on CPU.
            lm_revision: hub revision of ``lm`` (part of the score-cache key).
            max_length: token limit of prompt + response; old context is cut first, the response never.
            lm_batch_tokens: token budget of one LM forward pass (padded tokens counted).
            score_cache_dir: persistent LM-score cache folder; "auto" = $REPLUGCHAR_CACHE/scores (default
                ~/.cache/replugchar/scores); null keeps scores in memory for this run only.
            trust_remote_code: allow model repositories to run their own code (off unless you trust them).
            dialogue_features: learn the dialogue-evidence weights of :mod:`replugchar.core.scoring` (similarity of
                each setting to the character's own and the partner's earlier turns) beside the encoder.
            history_window: turns of the session before the query that the dialogue features read.
            freeze_encoder: train only the scoring head (the encoder stays the base model): seconds per epoch,
                and the encoder cannot drift on a few hundred turns.
            head_learning_rate: AdamW learning rate of the scoring head (its few weights need a large one).
            min_margin: LSR trains only on turns whose LM best-vs-second margin (log-likelihood per token for
                ``lm_score: mean``) is at least this (LLM-Embedder's filter against a weak teacher); 0 keeps all.
            top1_weight: weight of a hard cross-entropy term on the LM's best candidate beside the KL.
            generality: also learn the generality g(s) = v·e_s of each setting from its embedding (one weight per
                dimension, so it carries to characters never seen) and its per-query weight (a gate on the
                query's best similarity and on an empty history): the term that can lift "cheerful with
                everyone" for "Hello!". Needs ``dialogue_features``.
            generality_l2: penalty on ||v||² added to the loss: v has as many weights as the embedding has
                dimensions and learns from a few hundred greetings.
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
            "history_window": history_window >= 0,
            "head_learning_rate": head_learning_rate > 0,
            "min_margin": min_margin >= 0,
            "top1_weight": top1_weight >= 0,
            "generality_l2": generality_l2 >= 0,
        }
        for name, ok in checks.items():
            if not ok:
                raise ValueError(f"model.{name} is out of range: {locals()[name]!r}")
        if freeze_encoder and not dialogue_features:
            raise ValueError(
                "model.freeze_encoder: true leaves nothing to train unless model.dialogue_features: true"
            )
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
        if freeze_encoder:
            for enc in (self.encoder, self.query_encoder):
                if enc is not None:
                    enc.requires_grad_(False)
        if generality and not dialogue_features:
            raise ValueError("model.generality: true needs model.dialogue_features: true (the head holds it)")
        dim = self.encoder.get_embedding_dimension() if generality else None
        self.head = DialogueHead(dim) if dialogue_features else None
        self._turn_cache: dict[tuple[bool, str], Tensor] = {}
        self.loss_fn = LSRLoss(
            gamma=gamma, beta=beta, direction=kl_direction, min_margin=min_margin, top1_weight=top1_weight
        )
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
            self._scorer = build_scorer(
                **self.scorer_config(),
                score_cache_dir=self.hparams.score_cache_dir,
                device=str(self.device),
                rank=self.global_rank,
            )
        return self._scorer

    def scorer_config(self) -> dict:
        """The scorer options (:data:`~replugchar.lm.score_cache.SCORER_OPTIONS`): export writes them to
        retriever.json so ``evaluate`` scores with the LM and template that training used."""
        return {
            k: (dataclasses.asdict(self.template) if k == "template" else self.hparams[k])
            for k in SCORER_OPTIONS
        }

    @property
    def rule(self) -> ScoringRule:
        """The scoring rule as trained so far (λ and τ are fitted later, on validation data)."""
        head = self.head
        weights = tuple(head.weights.detach().cpu().tolist()) if head is not None else None
        rule = ScoringRule(
            weights=weights or ScoringRule().weights, history_window=self.hparams.history_window
        )
        if head is not None and head.generality is not None:
            rule = dataclasses.replace(
                rule,
                generality=tuple(head.generality.detach().cpu().tolist()),
                prior_weight=float(head.prior_weight.detach()),
                gate=tuple(head.gate.detach().cpu().tolist()),
            )
        return rule

    def set_scorer(self, scorer: CachedScorer) -> None:
        """Share one loaded LM between modules (evaluation, notebooks, tests)."""
        self._scorer = scorer

    # ------------------------------------------------------------------------------------------- encoding
    def as_retriever(self, rule: ScoringRule | None = None):
        """A :class:`~replugchar.retrieval.retriever.Retriever` over this module's encoder(s) and ``rule`` (default: as
        trained), without an index: calibration scores validation turns through the same path as inference."""
        from ..retrieval.retriever import Retriever

        config = {"scoring": (rule or self.rule).to_dict(), "query_text": self.hparams.query_text}
        return Retriever(self.encoder, None, config, self.query_encoder)

    def query_strings(self, examples: list[Example]) -> list[str]:
        return [query_text(e, self.hparams.query_text) for e in examples]

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
        texts = self.query_strings(examples)
        if self.hparams.freeze_encoder:
            q = self.embed_fixed(texts, queries=True).float().cpu().numpy()
        else:
            q = self.encode_all(texts, queries=True)
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

    @torch.no_grad()
    def embed_fixed(self, texts: list[str], *, queries: bool = True) -> Tensor:
        """(n, d) embeddings without gradient, as :class:`~replugchar.retrieval.retriever.Retriever` makes them (eval mode,
        normalised): history turns always (the features are inputs of the head), and everything while the
        encoder is frozen. Cached by text while frozen: a session's turns come back at every later turn, and an
        epoch over cached embeddings costs only the head."""
        frozen = self.hparams.freeze_encoder
        cache = self._turn_cache
        todo = [t for t in dict.fromkeys(texts) if not (frozen and (queries, t) in cache)]
        fresh: dict = {}
        if todo:
            was_training = self.training
            self.eval()
            try:
                fresh = dict(zip(((queries, t) for t in todo), self.encode(todo, queries=queries)))
            finally:
                self.train(was_training)
            if frozen:
                cache.update(fresh)
        return torch.stack([fresh.get((queries, t), cache.get((queries, t))) for t in texts])

    def features(
        self, examples: list[Example], cands: list[list[int]], setting_emb: Tensor, pos: dict
    ) -> Tensor:
        """(batch, k, F) dialogue features of each candidate, from the session before each query."""
        k, hw = self.hparams.k, self.hparams.history_window
        out = torch.zeros((len(examples), k, len(FEATURES)), device=self.device)
        turns = [window(e.dialogue, hw) for e in examples]
        texts = [t.text for ts in turns for t in ts]
        emb = self.embed_fixed(texts) if texts else None
        start = 0
        for row, (ts, ids) in enumerate(zip(turns, cands)):
            h = emb[start : start + len(ts)] if ts else setting_emb.new_zeros((0, setting_emb.shape[1]))
            start += len(ts)
            own = torch.tensor([t.role == "character" for t in ts], dtype=torch.bool, device=self.device)
            s = setting_emb[[pos[i] for i in ids]].detach()  # (n_cand, d)
            out[row, : len(ids)] = dialogue_features(s, h, own)
        return out

    def similarities(self, examples: list[Example], cands: list[list[int]]) -> tuple[Tensor, Tensor]:
        """(batch, k) scores of the rule (cosine + learned dialogue evidence) with gradient, and the (batch, k)
        mask of real candidates."""
        k = self.hparams.k
        uniq = sorted({i for row in cands for i in row})
        pos = {sid: j for j, sid in enumerate(uniq)}
        encode = self.embed_fixed if self.hparams.freeze_encoder else self.encode
        q = encode(self.query_strings(examples), queries=True)  # (batch, d)
        s = encode([self.index.records[i].text for i in uniq], queries=False)  # (unique, d)
        gather = torch.zeros((len(examples), k), dtype=torch.long, device=self.device)
        mask = torch.zeros((len(examples), k), dtype=torch.bool, device=self.device)
        for row, ids in enumerate(cands):
            gather[row, : len(ids)] = torch.as_tensor([pos[i] for i in ids])
            mask[row, : len(ids)] = True
        sim = torch.einsum("bd,bkd->bk", q, s[gather])  # (batch, k)
        if self.head is not None:
            empty = torch.tensor([len(e.dialogue) == 0 for e in examples], device=self.device)
            sim = self.head(sim, self.features(examples, cands, s, pos), s[gather], mask, empty)
        return sim, mask

    def _step(self, examples: list[Example], prefix: str) -> Tensor:
        cands = self.candidates(examples)
        sim, mask = self.similarities(examples, cands)
        lm = self.lm_targets(examples, cands)
        loss = self.loss_fn(sim, lm, mask)
        if self.head is not None and self.head.generality is not None and self.hparams.generality_l2:
            loss = loss + self.hparams.generality_l2 * self.head.generality.pow(2).sum()
        with torch.no_grad():
            log_pr, log_q, valid = self.loss_fn.distributions(sim, lm, mask)
            neg = torch.finfo(sim.dtype).min
            top1 = sim.masked_fill(~mask, neg).argmax(-1)  # (batch,)
            agree = top1 == lm.masked_fill(~torch.isfinite(lm), neg).argmax(-1)
            # lift: LM log-likelihood of the gold reply with the retriever's top-1 setting over the mean of the
            # candidates (what a random candidate gets): > 0 means retrieval helps the LM. (A "gain" elsewhere in
            # the package is over *no setting*.)
            lm_mean = torch.where(target_ok := torch.isfinite(lm) & mask, lm, 0).sum(-1) / target_ok.sum(
                -1
            ).clamp(min=1)
            top1_lift = lm.gather(1, top1[:, None]).squeeze(1) - lm_mean
            if prefix == "val":
                # kept on the CPU in float64: a crc32 group id is exact there (and MPS has no float64)
                groups = torch.tensor(
                    [zlib.crc32(e.dialogue_id.encode()) for e in examples], dtype=torch.float64
                )
                rows = torch.stack(
                    [groups, agree.cpu().double(), top1_lift.cpu().double()], dim=1
                )  # (batch, 3)
                self._val_rows.append(rows[(valid & torch.isfinite(top1_lift)).cpu()])
            metrics = {
                "loss": loss,
                "retriever_entropy": entropy(log_pr)[valid].mean(),
                "lm_entropy": entropy(log_q)[valid].mean(),
                "top1_agreement": agree[valid].float().mean(),
                "top1_lift": top1_lift[valid & torch.isfinite(top1_lift)].mean(),
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
        if self.head is not None:  # the learned evidence weights are a finding in themselves: watch them move
            self.log_dict({f"train/w_{f}": w for f, w in zip(FEATURES, self.head.weights.detach())})
            if self.head.generality is not None:  # how far g has moved, and how much the query decides
                gate = self.head.gate.detach()
                self.log_dict(
                    {
                        "train/generality_norm": self.head.generality.detach().norm(),
                        "train/prior_weight": self.head.prior_weight.detach(),
                        "train/gate_best_sim": gate[0],
                        "train/gate_empty_history": gate[1],
                    }
                )
        return self._step(batch, "train")

    def validation_step(self, batch: list[Example], batch_idx: int) -> None:
        if batch_idx == 0 or self.index is None:
            self.refresh_index()  # validation always sees the current encoder
        self._step(batch, "val")

    def configure_optimizers(self):
        head = list(self.head.parameters()) if self.head is not None else []
        ids = {id(p) for p in head}
        rest = [p for p in self.parameters() if p.requires_grad and id(p) not in ids]
        groups = [{"params": rest}] if rest else []
        if head:  # no weight decay: zero weights mean "plain similarity", not a prior to shrink towards
            groups.append({"params": head, "lr": self.hparams.head_learning_rate, "weight_decay": 0.0})
        opt = torch.optim.AdamW(groups, lr=self.hparams.learning_rate, weight_decay=self.hparams.weight_decay)
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
