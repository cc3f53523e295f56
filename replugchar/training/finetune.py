"""``replugchar finetune-lm``: supervised fine-tuning of the character LM (the frozen teacher / reader of LSR).

Why a separate step: LSR trains the retriever towards the settings under which the LM finds the gold reply most
likely, so the LM must be a good judge of *this* kind of character. Fine-tuning it on the training characters'
replies, with prompts rendered by the scorer's own :class:`~replugchar.lm.scoring.PromptTemplate`, makes it one;
the character split is the hash split of :func:`replugchar.core.data.split_characters`, the one ``fit`` and
``evaluate`` use, so no validation/test character is ever in the teacher's training data.

What makes the fine-tune stable (the failure this module exists to avoid): with ``pad_token == eos_token`` a loss
mask built from ``input_ids != pad_token_id`` hides the eos that ends every reply, so the model never learns to
stop. Here the tokenizer goes through :func:`~replugchar.lm.scoring.fix_tokenizer` (pad := unk or a new
``<|pad|>``), sequences are tokenised by :meth:`LMScorer.encode_many <replugchar.lm.scoring.LMScorer.encode_many>`
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
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningCLI

from ..core.atomic import atomic_folder
from ..lm.finetuned import TRAIN_CHARACTERS_FILE
from ..lm.models import EMBEDDED_LM, load_causal_lm
from ..lm.scoring import LMScorer, PromptTemplate, ScoreRequest, fix_tokenizer, response_token_logprobs
from .sft_data import CharacterSFTDataModule

log = logging.getLogger(__name__)

TEMPLATE_FILE = "replugchar_template.json"


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


class CharacterLMModule(L.LightningModule):
    def __init__(
        self,
        lm: str = EMBEDDED_LM,
        method: Literal["full", "lora"] = "lora",
        lora_r: int = 16,
        lora_alpha: int = 32,
        lora_dropout: float = 0.05,
        lora_target_modules: str | list[str] = "all-linear",
        learning_rate: float = 2e-4,
        weight_decay: float = 0.0,
        warmup_steps: int = 0,
        template: PromptTemplate | dict | None = None,
        max_length: int = 512,
        lm_dtype: Literal["auto", "float32", "bfloat16"] = "auto",
        lm_revision: str | None = None,
        trust_remote_code: bool = False,
    ) -> None:
        """
        Args:
            lm: causal LM to fine-tune: hub id, local folder, ``embedded:SmolLM2-135M-Instruct`` or ``tiny:gpt2``.
                Its tokenizer is fixed before training (pad := unk, or a new ``<|pad|>``, never eos).
            method: ``full`` trains every weight; ``lora`` trains low-rank adapters (peft) and merges them into
                the weights when the model is saved, so the output loads without peft.
            lora_r: LoRA rank.
            lora_alpha: LoRA scaling numerator (the update is scaled by alpha / r).
            lora_dropout: dropout on the LoRA input.
            lora_target_modules: modules that get adapters: ``all-linear`` (every linear layer but the output
                head) or a list of module names such as ``[q_proj, v_proj]``.
            learning_rate: AdamW peak learning rate (linear warmup, then linear decay to 0 at the last step).
            weight_decay: AdamW weight decay.
            warmup_steps: linear warmup steps.
            template: the prompt template; must be the one the LSR run scores with (``model.template`` of its
                config) so the teacher is tuned on the prompts it will judge. Saved in the output folder.
            max_length: token limit of prompt + reply; the oldest context turns are dropped first, the reply and
                its eos are never cut (the scorer's policy).
            lm_dtype: dtype of the loaded weights: ``auto`` = bfloat16 for ``lora`` on a GPU (frozen base),
                float32 otherwise (full fine-tuning keeps float32 master weights; the trainer's precision,
                ``bf16-mixed`` on GPU by default, sets the compute dtype).
            lm_revision: hub revision of ``lm``.
            trust_remote_code: allow the model repository to run its own code (off unless you trust it).
        """
        super().__init__()
        checks = {
            "lora_r": lora_r > 0,
            "lora_alpha": lora_alpha > 0,
            "lora_dropout": 0 <= lora_dropout < 1,
            "learning_rate": 0 < learning_rate < float("inf"),
            "weight_decay": weight_decay >= 0,
            "warmup_steps": warmup_steps >= 0,
            "max_length": max_length > 0,
        }
        for name, ok in checks.items():
            if not ok:
                raise ValueError(f"model.{name} is out of range: {locals()[name]!r}")
        if method not in ("full", "lora"):
            raise ValueError(f"model.method must be 'full' or 'lora', got {method!r}")
        if not lora_target_modules:
            raise ValueError("model.lora_target_modules is empty: use 'all-linear' or a list of module names")
        self.template = (
            PromptTemplate(**template) if isinstance(template, dict) else (template or PromptTemplate())
        )
        self.save_hyperparameters(ignore=["template"])
        self.hparams["template"] = dataclasses.asdict(self.template)
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
        hp = self.hparams
        device = self.trainer.strategy.root_device if self._trainer is not None else torch.device("cpu")
        dtype = hp.lm_dtype
        if dtype == "auto":
            dtype = "bfloat16" if device.type == "cuda" and hp.method == "lora" else "float32"
        model, tok = load_causal_lm(
            hp.lm, dtype=dtype, revision=hp.lm_revision, trust_remote_code=hp.trust_remote_code
        )
        fix_tokenizer(tok, model)  # idempotent; explicit because training on pad == eos is the bug we avoid
        if tok.pad_token_id == tok.eos_token_id:
            raise ValueError(f"model.lm={hp.lm}: the tokenizer's pad token is still its eos token")
        model.generation_config.pad_token_id = tok.pad_token_id
        model.train()
        if hp.method == "full":
            model.requires_grad_(True)
        else:
            from peft import LoraConfig, get_peft_model

            config = LoraConfig(
                task_type="CAUSAL_LM",
                r=hp.lora_r,
                lora_alpha=hp.lora_alpha,
                lora_dropout=hp.lora_dropout,
                target_modules=hp.lora_target_modules,
            )
            model = get_peft_model(model, config)
        self.lm = model
        self.tokenizer = tok
        n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
        n_all = sum(p.numel() for p in model.parameters())
        log.info("%s (%s, %s): %d of %d parameters trainable", hp.lm, hp.method, dtype, n_train, n_all)

    @property
    def encoder(self) -> LMScorer:
        """The scorer's tokenisation (prompt + reply + eos, its truncation policy, left padding)."""
        if self.lm is None:
            self.configure_model()
        return LMScorer(
            self.lm, self.tokenizer, self.template, max_length=self.hparams.max_length, lm_key="finetune"
        )

    def reply_nll(self, requests: Sequence[ScoreRequest]) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-token NLL of each reply and its eos, and the mask of those tokens: both (batch, r_max).

        The batch is laid out and run through the LM by the scorer's own code (:meth:`LMScorer.collate` and
        :func:`~replugchar.lm.scoring.response_token_logprobs`: left padding, positions counted from the first
        real token, only the reply positions through the LM head), so the loss trained here is the negative of
        the score LSR reads. The mask comes from the reply lengths that
        :meth:`LMScorer.encode_many` returns: padding cannot hide the eos, whatever the pad token is.
        """
        encoder = self.encoder
        ids, mask, reply = encoder.collate(encoder.encode_many(requests))
        token_logp = response_token_logprobs(self.lm, ids.to(self.device), mask.to(self.device), reply)
        return -token_logp, reply[:, -token_logp.shape[1] :].to(self.device)

    def training_step(self, batch: list[ScoreRequest], batch_idx: int) -> torch.Tensor:
        nll, reply = self.reply_nll(batch)
        loss = nll.sum() / reply.sum()
        self.log("train/loss", loss, prog_bar=True, batch_size=int(reply.sum()))
        return loss

    def validation_step(self, batch: list[ScoreRequest], batch_idx: int) -> None:
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
        worst = [ScoreRequest(e, dm.characters[e.character_id].settings) for e in dm.train_examples]
        encoder = self.encoder
        for i in range(0, len(worst), 512):
            encoder.encode_many(worst[i : i + 512])

    def configure_optimizers(self):
        from transformers import get_linear_schedule_with_warmup

        total = self.trainer.estimated_stepping_batches
        if not math.isfinite(total) or total <= 0:
            raise ValueError("trainer.max_steps or trainer.max_epochs must bound the training")
        params = [p for p in self.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(
            params, lr=self.hparams.learning_rate, weight_decay=self.hparams.weight_decay
        )
        schedule = get_linear_schedule_with_warmup(optimizer, self.hparams.warmup_steps, int(total))
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
                    "trained with other model.method / lora_* options"
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
            "base_model": hp.lm,
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
        hp, tok = self.hparams, self.tokenizer
        method = (
            f"LoRA (r={hp.lora_r}, alpha={hp.lora_alpha}, dropout={hp.lora_dropout}, "
            f"target_modules={hp.lora_target_modules}), merged into the weights"
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
            f"- base model: `{hp.lm}`" + (f" (revision {hp.lm_revision})" if hp.lm_revision else ""),
            f"- method: {method}",
            f"- optimisation steps: {info['global_step']}, learning rate {hp.learning_rate}",
            f"- data set: `{info['data_dir']}` (training split of the character hash split)",
            f"- tokenizer: pad `{tok.pad_token}` (id {tok.pad_token_id}) is not eos `{tok.eos_token}` "
            f"(id {tok.eos_token_id}); the loss covered each reply and the eos that ends it",
            f"- prompt template: `{TEMPLATE_FILE}` (use the same `model.template` when LSR scores with this LM)",
            f"- max_length: {hp.max_length}",
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


# ----------------------------------------------------------------------------------------------- CLI
def _cuda_bf16(accelerator: Any) -> bool:
    if str(accelerator) not in ("auto", "gpu", "cuda"):
        return False
    return torch.cuda.is_available() and torch.cuda.is_bf16_supported()


class FinetuneCLI(LightningCLI):
    """``replugchar finetune-lm --config ...``: validate, fit, export, validate; one command, no subcommands.

    The optimiser and its schedule are the module's (AdamW over the trainable weights, warmup then linear decay),
    so the CLI's generic ``--optimizer`` / ``--lr_scheduler`` options are off.
    """

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("auto_configure_optimizers", False)
        super().__init__(*args, **kwargs)

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_lightning_class_args(ExportCharacterLM, "export")
        parser.add_argument(
            "--ckpt_path",
            type=str | None,
            default=None,
            help="resume from this Lightning checkpoint (e.g. <checkpoint dirpath>/last.ckpt) after a kill",
        )

    def before_instantiate_classes(self) -> None:
        trainer = self.config.trainer
        if trainer.precision is None:  # bf16 on GPU, fp32 on CPU unless the config says otherwise
            trainer.precision = "bf16-mixed" if _cuda_bf16(trainer.accelerator) else "32-true"

    def _set_seed(self) -> None:
        """Refuse a reused checkpoint folder before anything else prints (LightningCLI seeds first)."""
        self._check_checkpoint_folders(self.config.get("ckpt_path"))
        super()._set_seed()

    def _check_checkpoint_folders(self, ckpt_path: str | None) -> None:
        """A checkpoint folder belongs to one run. Reusing one without resuming it would add ``last-v1.ckpt``
        beside the old ``last.ckpt``, and a later resume from ``last.ckpt`` would pick the older run's step."""
        from .checkpoint import load_checkpoint

        if ckpt_path and ckpt_path not in ("last", "best"):
            load_checkpoint(ckpt_path)
        for cb in self.config.trainer.get("callbacks") or []:
            dirpath = (cb.get("init_args") or {}).get("dirpath") if hasattr(cb, "get") else None
            if not str(cb.get("class_path", "")).endswith("ModelCheckpoint") or not dirpath:
                continue
            old = sorted(Path(dirpath).glob("*.ckpt")) if Path(dirpath).is_dir() else []
            if old and not ckpt_path:
                raise ValueError(
                    f"{dirpath}: holds checkpoints of an earlier run ({old[0].name}, ...): resume it with "
                    f"--ckpt_path {Path(dirpath) / 'last.ckpt'}, or give this run another checkpoint dirpath"
                )

    def run_fit(self) -> dict[str, float]:
        """Validation before -> fit (the export callback writes the LM) -> validation after; returns after."""
        trainer, model, dm = self.trainer, self.model, self.datamodule
        ckpt_path = self.config.get("ckpt_path")
        for cb in trainer.callbacks:  # a resumed run overwrites its own last.ckpt, never writes last-v1.ckpt
            if isinstance(cb, ModelCheckpoint):
                cb._enable_version_counter = False
        validate = trainer.limit_val_batches != 0 and dm.hparams.val_fraction > 0
        if validate and not ckpt_path:
            results = trainer.validate(model, datamodule=dm, verbose=False)
            model.metrics_before = {k: float(v) for k, v in results[0].items()} if results else {}
        trainer.fit(model, datamodule=dm, ckpt_path=ckpt_path)
        after: dict[str, float] = {}
        if validate:
            if model.last_val_step == trainer.global_step:
                after = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
            else:
                results = trainer.validate(model, datamodule=dm, verbose=False)
                after = {k: float(v) for k, v in results[0].items()} if results else {}
        if trainer.global_rank == 0:
            for key in ("val/loss", "val/eos_nll"):
                if key in after:
                    before = model.metrics_before.get(key)
                    b = f"{before:.4f}" if before is not None else "n/a"
                    log.info("finetune-lm: %s %s -> %s (held-out characters)", key, b, f"{after[key]:.4f}")
            for cb in trainer.callbacks:
                if isinstance(cb, ExportCharacterLM) and cb.written:
                    log.info("finetune-lm: fine-tuned LM in %s (model.lm for LSR)", cb.written)
        return after


def main(argv: list[str] | None = None) -> FinetuneCLI:
    """``replugchar finetune-lm [--config finetune.yaml] [--section.option value ...]``."""
    with warnings.catch_warnings():
        # `replugchar finetune-lm ...` hands over the arguments after the command name; sys.argv still holds
        # the command, which LightningCLI would otherwise warn about
        warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
        cli = FinetuneCLI(
            CharacterLMModule,
            CharacterSFTDataModule,
            args=list(sys.argv[1:] if argv is None else argv),
            run=False,
            save_config_kwargs={"overwrite": True},
            seed_everything_default=0,
            parser_kwargs={"prog": "replugchar finetune-lm"},
        )
    cli.run_fit()
    return cli


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    main()
