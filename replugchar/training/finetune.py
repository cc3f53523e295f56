"""``replugchar finetune-lm``: supervised fine-tuning of the character LM (the frozen teacher / reader of LSR).

Why a separate step: LSR trains the retriever towards the settings under which the LM finds the gold reply most
likely, so the LM must be a good judge of *this* kind of character. Fine-tuning it on the training characters'
replies, with prompts rendered by the frozen LM's own :class:`~replugchar.lm.likelihood.PromptTemplate`, makes it one;
the character split is the hash split of :func:`replugchar.core.data.split_characters`, the one ``fit`` and
``evaluate`` use, so no validation/test character is ever in the teacher's training data.

What makes the fine-tune stable (the failure this module exists to avoid): with ``pad_token == eos_token`` a loss
mask built from ``input_ids != pad_token_id`` hides the eos that ends every reply, so the model never learns to
stop. Here the tokenizer goes through :func:`~replugchar.lm.likelihood.fix_tokenizer` (pad := unk or a new
``<|pad|>``), sequences are tokenised by :meth:`LMLikelihood.encode_many <replugchar.lm.likelihood.LMLikelihood.encode_many>`
(prompt + reply + eos, context dropped first when too long) and the loss mask comes from the number of reply
tokens that method returns, never from token ids.

The output is a plain Hugging Face folder (safetensors, fixed tokenizer, ``replugchar_template.json``,
``train_characters.json``, README.md card) that :func:`replugchar.lm.models.load_causal_lm` loads as ``model.lm``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch

from ..core.atomic import atomic_folder
from ..core.options import as_options, check_ranges
from ..lm.finetuned import TRAIN_CHARACTERS_FILE
from ..lm.likelihood import (
    LMLikelihood,
    LoglikRequest,
    PromptTemplate,
    fix_tokenizer,
    response_token_logprobs,
)
from ..lm.models import LM_FLAT_NAMES, LMOptions, load_causal_lm
from .optim import OptimizerOptions

log = logging.getLogger(__name__)

TEMPLATE_FILE = "replugchar_template.json"
FLAT_NAMES = {
    **LM_FLAT_NAMES,
    "lora_r": ("lora", "r"),
    "lora_alpha": ("lora", "alpha"),
    "lora_dropout": ("lora", "dropout"),
    "lora_target_modules": ("lora", "target_modules"),
    "learning_rate": ("optimizer", "learning_rate"),
    "weight_decay": ("optimizer", "weight_decay"),
    "warmup_steps": ("optimizer", "warmup_steps"),
}
"""Where each ``model`` option of ``finetune-lm`` before the option groups went: ``old -> (group, field)``."""
FINETUNE_OPTIMIZER = OptimizerOptions(learning_rate=2e-4, weight_decay=0.0)
"""``finetune-lm``'s optimiser defaults: LoRA's usual rate, no decay."""


# ----------------------------------------------------------------------------------------------- model
def _rng_state() -> dict[str, Any]:
    """The global torch RNG states (dropout masks); tensors only, so checkpoints load with weights_only."""
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


@dataclass(frozen=True)
class LoraOptions:
    """The low-rank adapters of ``model.method: lora`` (``model.lora``); merged into the weights at export."""

    r: int = 16
    """LoRA rank."""
    alpha: int = 32
    """LoRA scaling numerator (the update is scaled by alpha / r)."""
    dropout: float = 0.05
    """Dropout on the LoRA input."""
    target_modules: str | list[str] = "all-linear"
    """Modules that get adapters: ``all-linear`` (every linear layer but the output head) or a list of module
    names such as ``[q_proj, v_proj]``."""

    def __post_init__(self) -> None:
        checks = {"r": self.r > 0, "alpha": self.alpha > 0, "dropout": 0 <= self.dropout < 1}
        check_ranges("model.lora", self, checks)
        if not self.target_modules:
            raise ValueError("model.lora.target_modules is empty: use 'all-linear' or a list of module names")


class CharacterLMModule(L.LightningModule):
    def __init__(
        self,
        lm: LMOptions = LMOptions(),
        template: PromptTemplate = PromptTemplate(),
        method: Literal["full", "lora"] = "lora",
        lora: LoraOptions = LoraOptions(),
        optimizer: OptimizerOptions = FINETUNE_OPTIMIZER,
    ) -> None:
        """
        Args:
            lm: the causal LM to fine-tune (the same group as ``fit``'s ``model.lm``, less its batching and cache options).
                Its tokenizer is fixed before training (pad := unk, or a new ``<|pad|>``, never eos).
                ``dtype: auto`` = bfloat16 for ``lora`` on a GPU (frozen base), float32 otherwise (full
                fine-tuning keeps float32 master weights; the trainer's precision, ``bf16-mixed`` on GPU by
                default, sets the compute dtype).
            template: the prompt template; must be the one the LSR run's frozen LM reads (``model.template`` of its
                config) so the teacher is tuned on the prompts it will judge. Saved in the output folder.
            method: ``full`` trains every weight; ``lora`` trains low-rank adapters (peft) and merges them into
                the weights when the model is saved, so the output loads without peft.
            lora: rank, scaling, dropout and target modules of the adapters (``method: lora``).
            optimizer: AdamW peak learning rate (linear warmup, then linear decay to 0 at the last step), weight
                decay and warmup steps.
        """
        super().__init__()
        self.lm_options = as_options(LMOptions, lm, "model.lm")
        self.template = as_options(PromptTemplate, template, "model.template")
        self.lora_options = as_options(LoraOptions, lora, "model.lora")
        self.optimizer_options = as_options(OptimizerOptions, optimizer, "model.optimizer")
        if method not in ("full", "lora"):
            raise ValueError(f"model.method must be 'full' or 'lora', got {method!r}")
        if self.lm_options.dtype == "float16":  # no loss scaling here: float16 master weights underflow
            raise ValueError(
                "model.lm.dtype: float16 is not supported by finetune-lm; use bfloat16 or float32"
            )
        # hparams hold plain data only (checkpoints load without pickle)
        self.save_hyperparameters(ignore=["lm", "template", "lora", "optimizer"])
        for name, group in (
            ("lm", self.lm_options),
            ("template", self.template),
            ("lora", self.lora_options),
            ("optimizer", self.optimizer_options),
        ):
            self.hparams[name] = dataclasses.asdict(group)
        # LoRA checkpoints hold the adapters only (the frozen base reloads from `lm`), see on_save_checkpoint
        self.strict_loading = method == "full"
        self.lm: torch.nn.Module | None = None
        self.tokenizer = None
        self.merged = False
        self.metrics_before: dict[str, float] = {}
        """Validation metrics before training (set by the CLI), written into the model card."""
        self.last_val_step = -1

    # ------------------------------------------------------------------------------------------- model
    def configure_model(self) -> None:
        """Load the LM on the trainer's device (idempotent: Lightning calls this for validate and for fit)."""
        if self.lm is not None:
            return
        hp, options = self.hparams, self.lm_options
        device = self.trainer.strategy.root_device if self._trainer is not None else torch.device("cpu")
        dtype = options.resolved_dtype(device.type, frozen=hp.method == "lora")
        model, tok = load_causal_lm(
            options.name, dtype=dtype, revision=options.revision, trust_remote_code=options.trust_remote_code
        )
        fix_tokenizer(tok, model)  # idempotent; explicit because training on pad == eos is the bug we avoid
        if tok.pad_token_id == tok.eos_token_id:
            raise ValueError(
                f"model.lm.name={options.name}: the tokenizer's pad token is still its eos token"
            )
        model.generation_config.pad_token_id = tok.pad_token_id
        model.train()
        if hp.method == "full":
            model.requires_grad_(True)
        else:
            from peft import LoraConfig, get_peft_model

            lora = self.lora_options
            config = LoraConfig(
                task_type="CAUSAL_LM",
                r=lora.r,
                lora_alpha=lora.alpha,
                lora_dropout=lora.dropout,
                target_modules=lora.target_modules,
            )
            model = get_peft_model(model, config)
        self.lm = model
        self.tokenizer = tok
        n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
        n_all = sum(p.numel() for p in model.parameters())
        log.info("%s (%s, %s): %d of %d parameters trainable", options.name, hp.method, dtype, n_train, n_all)

    @property
    def likelihood(self) -> LMLikelihood:
        """An :class:`~replugchar.lm.likelihood.LMLikelihood` over the model being trained, for its tokenisation and
        batch layout (prompt + reply + eos, its truncation policy, left padding): the loss is the
        log-likelihood's negative, laid out by the same code."""
        if self.lm is None:
            self.configure_model()
        return LMLikelihood(
            self.lm, self.tokenizer, self.template, max_length=self.lm_options.max_length, lm_key="finetune"
        )

    def reply_nll(self, requests: Sequence[LoglikRequest]) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-token NLL of each reply and its eos, and the mask of those tokens: both (batch, r_max).

        The batch is laid out and run through the LM by LMLikelihood's own code (:meth:`LMLikelihood.collate` and
        :func:`~replugchar.lm.likelihood.response_token_logprobs`: left padding, positions counted from the first
        real token, only the reply positions through the LM head), so the loss trained here is the negative of
        the log-likelihood LSR reads. The mask comes from the reply lengths that
        :meth:`LMLikelihood.encode_many` returns: padding cannot hide the eos, whatever the pad token is.
        """
        likelihood = self.likelihood
        ids, mask, reply = likelihood.collate(likelihood.encode_many(requests))
        token_logp = response_token_logprobs(self.lm, ids.to(self.device), mask.to(self.device), reply)
        return -token_logp, reply[:, -token_logp.shape[1] :].to(self.device)

    def training_step(self, batch: list[LoglikRequest], batch_idx: int) -> torch.Tensor:
        nll, reply = self.reply_nll(batch)
        loss = nll.sum() / reply.sum()
        self.log("train/loss", loss, prog_bar=True, batch_size=int(reply.sum()))
        return loss

    def validation_step(self, batch: list[LoglikRequest], batch_idx: int) -> None:
        nll, reply = self.reply_nll(batch)
        n_tokens = int(reply.sum())
        self.log("val/loss", nll.sum() / n_tokens, prog_bar=True, batch_size=n_tokens)
        # the eos is the last token of every row: how surely the model stops after the reply
        self.log("val/eos_nll", nll[:, -1].mean(), batch_size=len(batch))

    def on_validation_epoch_end(self) -> None:
        if self.trainer.state.fn == "fit" and not self.trainer.sanity_checking:
            self.last_val_step = self.global_step

    def on_train_start(self) -> None:
        self.lm.train()  # dropout on even if the LM was put in eval mode before fit (Lightning keeps modes)

    def on_fit_start(self) -> None:
        """Fail before the first step if an example cannot fit ``max_length`` even without context."""
        dm = self.trainer.datamodule
        if dm is None or not getattr(dm, "train_examples", None):
            return
        worst = [LoglikRequest(e, dm.characters[e.character_id].settings) for e in dm.train_examples]
        likelihood = self.likelihood
        for i in range(0, len(worst), 512):
            likelihood.encode_many(worst[i : i + 512])

    def configure_optimizers(self):
        from transformers import get_linear_schedule_with_warmup

        total = self.trainer.estimated_stepping_batches
        if not math.isfinite(total) or total <= 0:
            raise ValueError("trainer.max_steps or trainer.max_epochs must bound the training")
        params = [p for p in self.parameters() if p.requires_grad]
        options = self.optimizer_options
        optimizer = torch.optim.AdamW(params, lr=options.learning_rate, weight_decay=options.weight_decay)
        schedule = get_linear_schedule_with_warmup(optimizer, options.warmup_steps, int(total))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    # ------------------------------------------------------------------------------------------- checkpoints
    def _trainable_keys(self) -> set[str]:
        return {name for name, p in self.named_parameters() if p.requires_grad}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["replugchar_rng"] = _rng_state()
        if self.hparams.method == "lora":  # the frozen base is reloaded from `lm`: keep the adapters only
            keep = self._trainable_keys()
            checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in keep}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if "replugchar_rng" in checkpoint:
            _set_rng_state(checkpoint["replugchar_rng"])
        if self.hparams.method == "lora" and self.lm is not None:
            missing = sorted(self._trainable_keys() - set(checkpoint["state_dict"]))
            if missing:
                raise ValueError(
                    f"ckpt_path: the checkpoint lacks {len(missing)} adapter weights ({missing[:2]}): it was "
                    "trained with other model.method / model.lora options"
                )

    # ------------------------------------------------------------------------------------------- export
    def merged_model(self) -> torch.nn.Module:
        """The plain transformers model; LoRA adapters are merged into the weights (in place, once)."""
        if self.lm is None:
            self.configure_model()
        if self.hparams.method == "lora" and not self.merged:
            self.lm = self.lm.merge_and_unload()
            self.merged = True
        return self.lm

    def export(
        self,
        folder: str | Path,
        *,
        train_characters: Sequence[str],
        data_source: str,
        metrics: dict[str, float] | None = None,
    ) -> Path:
        """Write the fine-tuned LM as a Hugging Face folder, atomically (temp folder beside it, then rename).

        Contents: safetensors weights (LoRA merged), the fixed tokenizer, ``replugchar_template.json``,
        ``train_characters.json`` (evaluation excludes them, see
        :func:`~replugchar.lm.finetuned.finetuned_characters`) and a README.md
        card. After this the module holds the merged model, which is what was saved.
        """
        folder = Path(folder)
        model = self.merged_model()
        was_training = model.training
        model.eval()
        hp = self.hparams
        info = {
            "base_model": self.lm_options.name,
            "method": hp.method,
            "data_dir": data_source,
            "train_characters": sorted(train_characters),
            "global_step": self.global_step if self._trainer is not None else 0,
        }
        with atomic_folder(folder) as tmp:
            model.save_pretrained(tmp)
            self.tokenizer.save_pretrained(tmp)
            (tmp / TEMPLATE_FILE).write_text(
                json.dumps(dataclasses.asdict(self.template), indent=2, ensure_ascii=False) + "\n",
                encoding="utf-8",
            )
            (tmp / TRAIN_CHARACTERS_FILE).write_text(
                json.dumps(info, indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
            )
            (tmp / "README.md").write_text(self._card(info, metrics or {}), encoding="utf-8")
            # the temp folder (mkdtemp) and some writers' temp files are private (0700/0600): a model folder is
            # meant to be read by others (a serving process, a teammate)
            tmp.chmod(0o755)
            for path in tmp.iterdir():
                path.chmod(0o644)
        model.train(was_training)
        log.info("fine-tuned LM written to %s", folder)
        return folder

    def _card(self, info: dict[str, Any], metrics: dict[str, float]) -> str:
        hp, tok, lm, lora = self.hparams, self.tokenizer, self.lm_options, self.lora_options
        method = (
            f"LoRA (r={lora.r}, alpha={lora.alpha}, dropout={lora.dropout}, "
            f"target_modules={lora.target_modules}), merged into the weights"
            if hp.method == "lora"
            else "full fine-tuning"
        )
        lines = [
            "---",
            "library_name: transformers",
            "tags: [replugchar, role-play, character-lm]",
            "---",
            "# Character LM fine-tuned by `replugchar finetune-lm`",
            "",
            f"- base model: `{lm.name}`" + (f" (revision {lm.revision})" if lm.revision else ""),
            f"- method: {method}",
            f"- optimisation steps: {info['global_step']}, learning rate {self.optimizer_options.learning_rate}",
            f"- data set: `{info['data_dir']}` (training split of the character hash split)",
            f"- tokenizer: pad `{tok.pad_token}` (id {tok.pad_token_id}) is not eos `{tok.eos_token}` "
            f"(id {tok.eos_token_id}); the loss covered each reply and the eos that ends it",
            f"- prompt template: `{TEMPLATE_FILE}` (use the same `model.template` when LSR judges with this LM)",
            f"- max_length: {lm.max_length}",
        ]
        for key in sorted(set(self.metrics_before) | set(metrics)):
            before = self.metrics_before.get(key)
            after = metrics.get(key)
            b = f"{before:.4f}" if before is not None else "n/a"
            a = f"{after:.4f}" if after is not None else "n/a"
            lines.append(f"- {key}: {b} before -> {a} after training (held-out characters)")
        chars = info["train_characters"]
        lines += [
            "",
            f"## Training characters ({len(chars)})",
            "",
            "Evaluation must exclude them (`replugchar.lm.finetuned.finetuned_characters(folder)`; the list is also in "
            f"`{TRAIN_CHARACTERS_FILE}`):",
            "",
            ", ".join(chars),
            "",
        ]
        return "\n".join(lines)


class ExportCharacterLM(L.Callback):
    """Write the fine-tuned LM folder when ``fit`` ends (rank 0)."""

    def __init__(self, output_dir: str | None = None) -> None:
        """
        Args:
            output_dir: the Hugging Face folder to write (replaced atomically if it exists); null writes nothing.
        """
        self.output_dir = output_dir
        self.written: Path | None = None

    def on_fit_end(self, trainer: L.Trainer, pl_module: CharacterLMModule) -> None:
        if not self.output_dir or trainer.global_rank != 0:
            return
        dm = trainer.datamodule
        metrics = {}
        if pl_module.last_val_step == trainer.global_step:
            metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
        self.written = pl_module.export(
            self.output_dir,
            train_characters=dm.train_characters if dm is not None else [],
            data_source=dm.source if dm is not None else "",
            metrics=metrics,
        )
