"""LightningModule: LM-supervised training of a sentence-transformers bi-encoder and the dialogue-aware scoring
head of :mod:`replugchar.core.scoring` over character settings."""

from __future__ import annotations

import copy
import dataclasses
import logging
import zlib

import lightning as L
import numpy as np
import torch
from torch import Tensor

from ..core.data import Character, Example, QueryText, query_text
from ..core.options import as_options
from ..core.scoring import FEATURES, ScoringRule, dialogue_features, window
from ..lm.likelihood import LoglikRequest, PromptTemplate
from ..lm.loglik_cache import CachedLikelihood, LikelihoodOptions, build_likelihood
from ..lm.models import EMBEDDED_ENCODER, LM_FLAT_NAMES, load_encoder
from ..retrieval.index import SettingIndex, setting_records
from .head import DialogueHead, HeadOptions
from .losses import LossOptions, entropy
from .optim import OptimizerOptions

log = logging.getLogger(__name__)

GROUPS = {
    "lm": "lm_options",
    "template": "template",
    "loss": "loss_options",
    "head": "head_options",
    "optimizer": "optimizer_options",
}
"""The option groups of :class:`LSRModule`: ``__init__`` argument (and hparams key) -> attribute."""

FLAT_NAMES = {
    **LM_FLAT_NAMES,
    "lm_batch_tokens": ("lm", "max_batch_tokens"),
    "score_cache_dir": ("lm", "loglik_cache_dir"),
    "gamma": ("loss", "gamma"),
    "beta": ("loss", "beta"),
    "kl_direction": ("loss", "direction"),
    "lm_score": ("loss", "lm_loglik"),
    "min_margin": ("loss", "min_margin"),
    "top1_weight": ("loss", "top1_weight"),
    "dialogue_features": ("head", "dialogue_features"),
    "history_window": ("head", "history_window"),
    "generality": ("head", "generality"),
    "generality_l2": ("head", "generality_l2"),
    "head_learning_rate": ("head", "learning_rate"),
    "learning_rate": ("optimizer", "learning_rate"),
    "weight_decay": ("optimizer", "weight_decay"),
    "warmup_steps": ("optimizer", "warmup_steps"),
}
"""Where each option of the flat ``model`` section (before the option groups) went: ``old -> (group, field)``.
:func:`grouped_hparams` reads checkpoints written then; README's option table is this one."""

RENAMED_FIELDS = {("lm", "score_cache_dir"): "loglik_cache_dir", ("loss", "lm_score"): "lm_loglik"}
"""(group, old field) -> new field: options renamed inside their group when "score" came to mean only the
retrieval rule's (the LM's are log-likelihoods, ``loglik``)."""


def grouped_hparams(hparams: dict) -> dict:
    """``hparams`` of a checkpoint in today's grouped form: flat ones (written before the option groups)
    regrouped by :data:`FLAT_NAMES`, renamed fields (:data:`RENAMED_FIELDS`) under their new names, the rest
    unchanged, so ``fit --ckpt_path`` of an older run still parses."""
    out: dict = {}
    for key, value in hparams.items():
        if key in FLAT_NAMES and not isinstance(value, dict):
            group, field = FLAT_NAMES[key]
            out.setdefault(group, {})[field] = value
        elif isinstance(value, dict):
            fields = {RENAMED_FIELDS.get((key, name), name): v for name, v in value.items()}
            out[key] = {**out.get(key, {}), **fields}
        else:
            out[key] = value
    return out


class LSRModule(L.LightningModule):
    """LSR training of the bi-encoder and the scoring head against a frozen LM (REPLUG, Shi et al. 2023).

    Options come in groups (``model.lm``, ``model.template``, ``model.loss``, ``model.head``,
    ``model.optimizer``), each a frozen dataclass documented field by field where its concept lives; the
    module keeps them as typed attributes (``lm_options``, ``template``, ``loss_options``, ``head_options``,
    ``optimizer_options``) and as plain dicts in ``hparams`` (checkpoints load without pickle)."""

    def __init__(
        self,
        encoder: str = EMBEDDED_ENCODER,
        lm: LikelihoodOptions = LikelihoodOptions(),
        template: PromptTemplate = PromptTemplate(),
        k: int = 5,
        query_text: QueryText = "query",
        share_encoders: bool = True,
        freeze_encoder: bool = False,
        refresh_every: int = 50,
        loss: LossOptions = LossOptions(),
        head: HeadOptions = HeadOptions(),
        optimizer: OptimizerOptions = OptimizerOptions(),
    ) -> None:
        """
        Args:
            encoder: bi-encoder to fine-tune: hub id, local folder, ``embedded:all-MiniLM-L6-v2`` or ``tiny:bert``.
            lm: the frozen causal LM that supervises retrieval, its batching and log-likelihood cache. Never trained,
                never checkpointed.
            template: LM prompt template (see :class:`~replugchar.lm.likelihood.PromptTemplate`).
            k: candidate settings per query (top-k of the character's settings by the current index);
                a character with at most k settings has all of them as candidates.
            query_text: what the encoder embeds for a query: the query alone (default), or the last context
                turn + query (kept for old runs: it raises already-voiced settings; prefer dialogue features).
            share_encoders: one encoder for queries and settings (default); False trains a separate query
                encoder initialised from the same weights.
            freeze_encoder: train only the scoring head (the encoder stays the base model): seconds per epoch,
                and the encoder cannot drift on a few hundred turns.
            refresh_every: re-encode all settings and rebuild the FAISS index every this many steps (T).
            loss: the LSR loss: temperatures, KL direction, LM target, weak-teacher guards.
            head: the learned scoring head: dialogue features, history window, generality, its learning rate.
            optimizer: AdamW learning rate, weight decay and warmup of the encoder(s).
        """
        super().__init__()
        self.lm_options = as_options(LikelihoodOptions, lm, "model.lm")
        self.template = as_options(PromptTemplate, template, "model.template")
        self.loss_options = as_options(LossOptions, loss, "model.loss")
        self.head_options = as_options(HeadOptions, head, "model.head")
        self.optimizer_options = as_options(OptimizerOptions, optimizer, "model.optimizer")
        for name, value in (("k", k), ("refresh_every", refresh_every)):
            if value <= 0:
                raise ValueError(f"model.{name} is out of range: {value!r}")
        if freeze_encoder and not self.head_options.dialogue_features:
            raise ValueError(
                "model.freeze_encoder: true leaves nothing to train unless model.head.dialogue_features: true"
            )
        # hparams hold plain data only (a dataclass there would make checkpoints need pickle to load)
        self.save_hyperparameters(ignore=list(GROUPS))
        self.hparams.update({name: dataclasses.asdict(getattr(self, attr)) for name, attr in GROUPS.items()})
        self.encoder, self.query_encoder = self._load_encoders(encoder, share_encoders, freeze_encoder)
        dim = self.encoder.get_embedding_dimension() if self.head_options.generality else None
        self.head = DialogueHead(dim) if self.head_options.dialogue_features else None
        self._turn_cache: dict[tuple[bool, str], Tensor] = {}
        self.loss_fn = self.loss_options.build()
        self.characters: dict[str, Character] = {}
        self._likelihood: CachedLikelihood | None = None  # not an nn.Module: the LM stays out of state_dict
        self.index: SettingIndex | None = None
        self._index_step = -1
        self._emb_stats: dict[str, float] = {}
        self._val_rows: list[Tensor] = []
        self.val_per_example: np.ndarray | None = None
        """After a validation epoch: (n, 3) rows of (dialogue hash, top-1 agreement 0/1, top-1 LM gain), in
        dataloader order, so two validations of the same split can be compared example by example."""

    def _load_encoders(
        self, spec: str, share: bool, freeze: bool
    ) -> tuple[torch.nn.Module, torch.nn.Module | None]:
        """(encoder, separate query encoder or None), the pooler frozen and, with ``freeze``, everything."""
        encoder = load_encoder(spec, trust_remote_code=self.lm_options.trust_remote_code)
        # sentence-transformers pools token embeddings itself: the HF model's own pooler (BERT, MPNet, ...) gets
        # no gradient, and DDP fails on parameters that take no part in the loss; freeze it (no effect otherwise)
        for mod in encoder.modules():
            if isinstance(getattr(mod, "pooler", None), torch.nn.Module):
                mod.pooler.requires_grad_(False)
        query_encoder = None if share else copy.deepcopy(encoder)
        if freeze:
            for enc in (encoder, query_encoder):
                if enc is not None:
                    enc.requires_grad_(False)
        return encoder, query_encoder

    # ------------------------------------------------------------------------------------------- setup
    def setup(self, stage: str) -> None:
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if dm is not None:
            dm.setup(stage)
            self.characters = dm.characters

    @property
    def likelihood(self) -> CachedLikelihood:
        """The frozen LM behind its log-likelihood cache, loaded on first use onto this module's device."""
        if self._likelihood is None:
            self._likelihood = build_likelihood(
                self.lm_options, self.template, device=str(self.device), rank=self.global_rank
            )
        return self._likelihood

    def lm_record(self) -> dict:
        """The retriever.json ``"scorer"`` record (:meth:`~replugchar.lm.loglik_cache.LikelihoodOptions.record`):
        export writes it so ``evaluate`` judges with the LM and template that training used."""
        return self.lm_options.record(self.template)

    @property
    def rule(self) -> ScoringRule:
        """The scoring rule as trained so far (λ and τ are fitted later, on validation data)."""
        head = self.head
        weights = tuple(head.weights.detach().cpu().tolist()) if head is not None else None
        rule = ScoringRule(
            weights=weights or ScoringRule().weights, history_window=self.head_options.history_window
        )
        if head is not None and head.generality is not None:
            rule = dataclasses.replace(
                rule,
                generality=tuple(head.generality.detach().cpu().tolist()),
                prior_weight=float(head.prior_weight.detach()),
                gate=tuple(head.gate.detach().cpu().tolist()),
            )
        return rule

    def set_likelihood(self, likelihood: CachedLikelihood) -> None:
        """Share one loaded LM between modules (evaluation, notebooks, tests)."""
        self._likelihood = likelihood

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
            LoglikRequest(e, (self.index.records[i].text,)) for e, row in zip(examples, cands) for i in row
        ]
        logliks = self.likelihood.loglik(requests)
        values = logliks.logp_mean if self.loss_options.lm_loglik == "mean" else logliks.logp_sum
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
        k, hw = self.hparams.k, self.head_options.history_window
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
        """One LSR step: candidates from the index, the rule's scores, the LM's targets, the loss; logged."""
        cands = self.candidates(examples)
        sim, mask = self.similarities(examples, cands)
        lm = self.lm_targets(examples, cands)
        loss = self.loss_fn(sim, lm, mask)
        if self.head is not None and self.head.generality is not None and self.head_options.generality_l2:
            loss = loss + self.head_options.generality_l2 * self.head.generality.pow(2).sum()
        with torch.no_grad():
            metrics, agree, top1_lift, valid = self._metrics(sim, lm, mask)
            if prefix == "val":
                self._keep_val_rows(examples, agree, top1_lift, valid)
        self._log_metrics({"loss": loss, **metrics}, prefix, len(examples))
        return loss

    def _metrics(
        self, sim: Tensor, lm: Tensor, mask: Tensor
    ) -> tuple[dict[str, Tensor], Tensor, Tensor, Tensor]:
        """What explains training (Atlas, LLM-Embedder): both entropies, top-1 agreement with the LM's best
        candidate and the top-1 lift; also the per-query (batch,) agreement, lift and rows the loss counted."""
        log_pr, log_q, valid = self.loss_fn.distributions(sim, lm, mask)
        neg = torch.finfo(sim.dtype).min
        top1 = sim.masked_fill(~mask, neg).argmax(-1)  # (batch,)
        agree = top1 == lm.masked_fill(~torch.isfinite(lm), neg).argmax(-1)
        # lift: LM log-likelihood of the gold reply with the retriever's top-1 setting over the mean of the
        # candidates (what a random candidate gets): > 0 means retrieval helps the LM. (A "gain" elsewhere in
        # the package is over *no setting*.)
        target_ok = torch.isfinite(lm) & mask
        lm_mean = torch.where(target_ok, lm, 0).sum(-1) / target_ok.sum(-1).clamp(min=1)
        top1_lift = lm.gather(1, top1[:, None]).squeeze(1) - lm_mean  # (batch,)
        metrics = {
            "retriever_entropy": entropy(log_pr)[valid].mean(),
            "lm_entropy": entropy(log_q)[valid].mean(),
            "top1_agreement": agree[valid].float().mean(),
            "top1_lift": top1_lift[valid & torch.isfinite(top1_lift)].mean(),
        }
        return metrics, agree, top1_lift, valid

    def _keep_val_rows(
        self, examples: list[Example], agree: Tensor, top1_lift: Tensor, valid: Tensor
    ) -> None:
        """(dialogue hash, agreement, lift) rows of this validation batch, for the paired before/after report."""
        # kept on the CPU in float64: a crc32 group id is exact there (and MPS has no float64)
        groups = torch.tensor([zlib.crc32(e.dialogue_id.encode()) for e in examples], dtype=torch.float64)
        rows = torch.stack([groups, agree.cpu().double(), top1_lift.cpu().double()], dim=1)  # (batch, 3)
        self._val_rows.append(rows[(valid & torch.isfinite(top1_lift)).cpu()])

    def _log_metrics(self, metrics: dict[str, Tensor], prefix: str, batch_size: int) -> None:
        self.log_dict(
            {f"{prefix}/{k}": v for k, v in metrics.items()},
            batch_size=batch_size,
            prog_bar=False,
            on_step=prefix == "train",
            on_epoch=True,
            sync_dist=True,  # DDP: epoch values are the mean over ranks, not rank 0's shard of the data
        )
        self.log(
            f"{prefix}_top1",
            metrics["top1_agreement"],
            batch_size=batch_size,
            prog_bar=True,
            on_epoch=True,
            on_step=False,
            logger=False,
            sync_dist=True,
        )

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
            groups.append({"params": head, "lr": self.head_options.learning_rate, "weight_decay": 0.0})
        opt = torch.optim.AdamW(
            groups, lr=self.optimizer_options.learning_rate, weight_decay=self.optimizer_options.weight_decay
        )
        options = self.optimizer_options
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: options.warmup(step))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def flush_logliks(self) -> None:
        """Write LM log-likelihoods still buffered in memory to the cache (also called at the end of fit/validate)."""
        if self._likelihood is not None:
            self._likelihood.flush()

    def on_train_epoch_end(self) -> None:
        self.flush_logliks()

    def on_validation_epoch_start(self) -> None:
        self._val_rows = []

    def on_validation_epoch_end(self) -> None:
        self.flush_logliks()
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
        self.flush_logliks()

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # the LM is not a registered submodule, so it is not in state_dict; say so in the checkpoint
        checkpoint["replugchar"] = {"lm": self.lm_options.name, "lm_in_checkpoint": False}
