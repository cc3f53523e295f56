"""The two LightningCLIs: ``replugchar fit`` / ``validate`` over :class:`~replugchar.training.module.LSRModule` and
:class:`~replugchar.training.datamodule.LSRDataModule`, and ``replugchar finetune-lm`` over
:class:`~replugchar.training.finetune.CharacterLMModule` and
:class:`~replugchar.training.sft_data.CharacterSFTDataModule`. Both end with the same before -> after validation
report (:class:`FitReport`); ``fit`` adds its paired interval and what the export callback fitted and wrote."""

from __future__ import annotations

import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningCLI

from ..core.scoring import FEATURES
from ..evaluation.metrics import bootstrap_ci
from ..training.callbacks import ExportRetriever
from ..training.datamodule import SPLIT_FLAT_NAMES, LSRDataModule
from ..training.finetune import FLAT_NAMES as FINETUNE_FLAT_NAMES
from ..training.finetune import CharacterLMModule, ExportCharacterLM
from ..training.module import LSRModule, grouped_hparams
from ..training.run import FIT_MOVES, check_moved_options, parser_settings
from ..training.sft_data import CharacterSFTDataModule

REPORTED = ("val/top1_agreement", "val/top1_lift", "val/loss", "val/retriever_entropy", "val/lm_entropy")
"""The metrics of the ``fit`` report, in its order."""
FINETUNE_REPORTED = ("val/loss", "val/eos_nll")
"""The metrics of the ``finetune-lm`` report: reply NLL per token, and the NLL of the eos that ends a reply."""


# ----------------------------------------------------------------------------------------------- report
class FitReport:
    """Validation before -> after training, one line per reported metric: the report ``fit`` and ``finetune-lm``
    both print when they end (rank 0), so a run says what training changed on held-out characters.

    The CLI calls :meth:`measure_before` before ``trainer.fit`` (skipped when validation is off or the run
    resumes a checkpoint: its "before" is not this model's), then :meth:`print` with the metrics after and
    its own further lines.
    """

    def __init__(self, command: str, keys: Sequence[str], held_out: str) -> None:
        """
        Args:
            command: the command name in the header (``fit``, ``finetune-lm``).
            keys: the metrics to report, in order; one missing after training is left out.
            held_out: what the validation data is, for the header (e.g. ``character-disjoint split``).
        """
        self.command = command
        self.keys = tuple(keys)
        self.held_out = held_out
        self.before: dict[str, float] = {}

    @staticmethod
    def validate(trainer, model, datamodule) -> dict[str, float]:
        """One validation run's metrics as floats ({} when there was nothing to validate)."""
        results = trainer.validate(model, datamodule=datamodule, verbose=False)
        return {k: float(v) for k, v in results[0].items()} if results else {}

    def measure_before(self, trainer, model, datamodule) -> dict[str, float]:
        self.before = self.validate(trainer, model, datamodule)
        return self.before

    def lines(self, after: dict[str, float], extra: Sequence[str] = ()) -> list[str]:
        lines = ["", f"replugchar {self.command}: validation before -> after training ({self.held_out})"]
        for key in self.keys:
            if key in after:
                b = f"{self.before[key]:.4f}" if key in self.before else "   n/a"
                lines.append(f"  {key:<26} {b} -> {after[key]:.4f}")
        return [*lines, *extra]

    def print(self, after: dict[str, float], extra: Sequence[str] = ()) -> None:
        print("\n".join(self.lines(after, extra)), flush=True)


def paired_change_lines(before: np.ndarray | None, after: np.ndarray | None, n_boot: int = 2000) -> list[str]:
    """Before -> after change of top-1 agreement and LM gain with a 95% interval, so noise is not read as progress.

    Both validations see the same examples in the same order; the interval resamples whole dialogues (turns of one
    dialogue are not independent). Rows are (dialogue hash, agreement, gain) from ``LSRModule.val_per_example``.
    """
    if before is None or after is None or len(before) == 0 or before.shape != after.shape:
        return []
    if not np.array_equal(before[:, 0], after[:, 0]):
        return []
    groups = after[:, 0]
    lines = []
    for col, name in ((1, "top1_agreement"), (2, "top1_lift")):
        diff = after[:, col] - before[:, col]
        lo, hi = bootstrap_ci(diff, groups, n_boot=n_boot, seed=0)
        lines.append(
            f"  change in {name:<16} {diff.mean():+.4f}  95% CI [{lo:+.4f}, {hi:+.4f}]"
            f"  ({len(diff)} examples, {len(np.unique(groups))} dialogues; an interval spanning 0 is noise)"
        )
    return lines


def generality_lines(fit, groups: np.ndarray | None, n_boot: int = 2000) -> list[str]:
    """The learned generality on validation characters: the change in top-1 gain it brings over today's rule,
    greetings and all turns side by side, each with a 95% interval over dialogues."""
    if fit is None or groups is None or len(fit.rows) == 0:
        return []
    diff, greeting = fit.rows[:, 1] - fit.rows[:, 0], fit.rows[:, 2] > 0
    parts = []
    for name, keep in (("greetings", greeting), ("all turns", np.ones_like(greeting))):
        if keep.any():
            lo, hi = bootstrap_ci(diff[keep], groups[keep], n_boot=n_boot, seed=0)
            parts.append(f"{name} {diff[keep].mean():+.4f} [{lo:+.4f}, {hi:+.4f}] ({int(keep.sum())} turns)")
    return [
        f"  generality scale β = {fit.scale} (validation): top-1 gain over the rule without it: "
        + "; ".join(parts),
        "  (β is chosen on these validation characters among those not worse on all turns and on greetings)",
    ]


def export_lines(cb: ExportRetriever, rule_weights: Sequence[float]) -> list[str]:
    """What the export callback fitted (α, β) and where it wrote the retriever."""
    lines = []
    cal = cb.mixing
    if cal is not None:
        weights = ", ".join(f"{f} {w:+.3f}" for f, w in zip(FEATURES, rule_weights))
        lines.append(
            f"  dialogue scale α = {cal.dialogue_scale} fitted on {cal.n_examples} validation examples: "
            f"top-1 gain over no setting {cal.gain_at_zero:+.4f} (similarity) -> "
            f"{cal.gain_fitted_weight:+.4f} nats/token"
        )
        lines.append(f"  exported dialogue weights: {weights}")
        lines += generality_lines(cb.generality_fit, cb.generality_groups)
        lines.append(
            "  (α is chosen on these validation characters, so 'after' is optimistic for them; "
            "`replugchar evaluate` on a test split is the measurement)"
        )
    if cb.written:
        lines.append(
            f"  exported retriever: {cb.written}  (encoder/ is a plain sentence-transformers folder)"
        )
    return lines


# ----------------------------------------------------------------------------------------------- fit
class LSRCLI(LightningCLI):
    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        return {
            "fit": {"model", "train_dataloaders", "val_dataloaders", "datamodule"},
            "validate": {"model", "dataloaders", "datamodule"},
        }

    def parse_arguments(self, parser, args) -> None:
        check_moved_options(sys.argv[1:] if args is None else args, FIT_MOVES)
        super().parse_arguments(parser, args)

    def _parse_ckpt_path(self) -> None:
        """LightningCLI reads the model options back from ``--ckpt_path`` (they override the config's). A
        checkpoint written before the option groups holds them flat: regroup them
        (:func:`~replugchar.training.module.grouped_hparams`) so an older run still resumes. A file that is no
        checkpoint is one line naming it (:func:`~replugchar.training.checkpoint.load_checkpoint`)."""
        from ..training.checkpoint import load_checkpoint

        subcommand = self.config.get("subcommand")
        path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if not path or not Path(path).is_file():
            return
        hparams = dict(load_checkpoint(path).get("hyper_parameters") or {})
        hparams.pop("_instantiator", None)
        if not hparams:
            return
        try:
            self.config = self.parser.parse_object(
                {subcommand: {"model": grouped_hparams(hparams)}}, self.config
            )
        except SystemExit:
            sys.stderr.write("Parsing of ckpt_path hyperparameters failed!\n")
            raise

    def _set_seed(self) -> None:
        """Validate the data before anything else (LightningCLI seeds, then instantiates): a bad record fails in a
        second with one line, not after the LM loaded or below a "Seed set" banner."""
        if self.subcommand and self.config[self.subcommand].get("data") is not None:  # run=False only parses
            LSRDataModule(**self.config[self.subcommand]["data"].as_dict()).setup("fit")
        super()._set_seed()

    def before_fit(self) -> None:
        self._check_ckpt()
        self.report = FitReport("fit", REPORTED, "character-disjoint split")
        self._before_rows = None
        if self.trainer.limit_val_batches == 0 or self.config_init[self.subcommand].get("ckpt_path"):
            return
        self.report.measure_before(self.trainer, self.model, self.datamodule)
        self._before_rows = self.model.val_per_example

    def before_validate(self) -> None:
        self._check_ckpt()

    def _check_ckpt(self) -> None:
        """A bad --ckpt_path is one line naming it, before Lightning loads it (see replugchar.checkpoint)."""
        from ..training.checkpoint import load_checkpoint

        path = self.config_init[self.subcommand].get("ckpt_path")
        if path and path not in ("last", "best", "hpc", "registry"):
            load_checkpoint(path)

    def after_fit(self) -> None:
        after = {}
        if self.trainer.limit_val_batches != 0:
            after = FitReport.validate(self.trainer, self.model, self.datamodule)
        # trainer.log_dir is a collective under DDP (rank 0 broadcasts it): every rank must ask, before rank > 0 leaves
        log_dir = self.trainer.log_dir if self.trainer.logger is not None else None
        if self.trainer.global_rank != 0:
            return
        report = getattr(self, "report", None) or FitReport("fit", REPORTED, "character-disjoint split")
        report.print(after, self._after_lines(log_dir))

    def _after_lines(self, log_dir: str | None) -> list[str]:
        """The lines of the fit report below the metrics: the paired change, the checkpoint, the export."""
        lines = paired_change_lines(getattr(self, "_before_rows", None), self.model.val_per_example)
        lines.append(
            "  (val/loss = KL(LM target || retriever) per query, lower is better; val/top1_lift = LM"
        )
        lines.append(
            "   log-likelihood/token of the gold reply with the top-1 setting minus the candidates' mean)"
        )
        ckpt = self.trainer.checkpoint_callback
        if ckpt is not None and ckpt.best_model_path:
            lines.append(f"  checkpoint: {ckpt.best_model_path}")
        for cb in self.trainer.callbacks:
            if isinstance(cb, ExportRetriever):
                lines += export_lines(cb, self.model.rule.weights)
        if log_dir:
            lines.append(f"  logs: {log_dir}")
        return lines


def run_lightning(args: list[str] | None = None) -> LSRCLI:
    parser_settings()
    return LSRCLI(
        LSRModule,
        LSRDataModule,
        args=args,
        save_config_kwargs={"overwrite": True},
        seed_everything_default=0,
    )


# ----------------------------------------------------------------------------------------------- finetune-lm
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

    def parse_arguments(self, parser, args) -> None:
        check_moved_options(args, {"model": FINETUNE_FLAT_NAMES, "data": SPLIT_FLAT_NAMES})
        super().parse_arguments(parser, args)

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
        from ..training.checkpoint import load_checkpoint

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
        report = FitReport("finetune-lm", FINETUNE_REPORTED, "held-out characters")
        validate = trainer.limit_val_batches != 0 and dm.split.val_fraction > 0
        if validate and not ckpt_path:
            model.metrics_before = report.measure_before(
                trainer, model, dm
            )  # also written into the model card
        trainer.fit(model, datamodule=dm, ckpt_path=ckpt_path)
        after: dict[str, float] = {}
        if validate and model.last_val_step == trainer.global_step:  # the last step validated already
            after = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
        elif validate:
            after = report.validate(trainer, model, dm)
        if trainer.global_rank == 0:
            written = [
                cb.written for cb in trainer.callbacks if isinstance(cb, ExportCharacterLM) and cb.written
            ]
            report.print(after, [f"  fine-tuned LM: {w}  (model.lm.name of an LSR run)" for w in written])
        return after


def run_finetune(argv: list[str] | None = None) -> FinetuneCLI:
    """``replugchar finetune-lm [--config finetune.yaml] [--section.option value ...]``."""
    parser_settings()
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
