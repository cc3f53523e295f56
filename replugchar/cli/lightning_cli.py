"""``replugchar fit`` / ``validate``: LightningCLI over :class:`~replugchar.training.module.LSRModule` and
:class:`~replugchar.training.datamodule.LSRDataModule`, with a before -> after validation report and its paired interval."""

from __future__ import annotations

import numpy as np
from lightning.pytorch.cli import LightningCLI

from ..core.scoring import FEATURES
from ..evaluation.metrics import bootstrap_ci
from ..training.callbacks import ExportRetriever
from ..training.datamodule import LSRDataModule
from ..training.module import LSRModule

REPORTED = ("val/top1_agreement", "val/top1_lift", "val/loss", "val/retriever_entropy", "val/lm_entropy")


class LSRCLI(LightningCLI):
    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        return {
            "fit": {"model", "train_dataloaders", "val_dataloaders", "datamodule"},
            "validate": {"model", "dataloaders", "datamodule"},
        }

    def _set_seed(self) -> None:
        """Validate the data before anything else (LightningCLI seeds, then instantiates): a bad record fails in a
        second with one line, not after the LM loaded or below a "Seed set" banner."""
        if self.subcommand and self.config[self.subcommand].get("data") is not None:  # run=False only parses
            LSRDataModule(**self.config[self.subcommand]["data"].as_dict()).setup("fit")
        super()._set_seed()

    def before_fit(self) -> None:
        self._check_ckpt()
        if self.trainer.limit_val_batches == 0 or self.config_init[self.subcommand].get("ckpt_path"):
            self._before = None
            return
        results = self.trainer.validate(self.model, datamodule=self.datamodule, verbose=False)
        self._before = {k: float(v) for k, v in results[0].items()} if results else None
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
            results = self.trainer.validate(self.model, datamodule=self.datamodule, verbose=False)
            after = {k: float(v) for k, v in results[0].items()} if results else {}
        # trainer.log_dir is a collective under DDP (rank 0 broadcasts it): every rank must ask, before rank > 0 leaves
        log_dir = self.trainer.log_dir if self.trainer.logger is not None else None
        if self.trainer.global_rank != 0:
            return
        before = getattr(self, "_before", None) or {}
        lines = ["", "replugchar fit: validation before -> after training (character-disjoint split)"]
        for key in REPORTED:
            if key in after:
                b = f"{before[key]:.4f}" if key in before else "   n/a"
                lines.append(f"  {key:<26} {b} -> {after[key]:.4f}")
        lines += paired_change_lines(getattr(self, "_before_rows", None), self.model.val_per_example)
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
            if not isinstance(cb, ExportRetriever):
                continue
            cal = cb.mixing
            if cal is not None:
                weights = ", ".join(f"{f} {w:+.3f}" for f, w in zip(FEATURES, self.model.rule.weights))
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
        if log_dir:
            lines.append(f"  logs: {log_dir}")
        print("\n".join(lines), flush=True)


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


def run_lightning(args: list[str] | None = None) -> LSRCLI:
    return LSRCLI(
        LSRModule,
        LSRDataModule,
        args=args,
        save_config_kwargs={"overwrite": True},
        seed_everything_default=0,
    )
