"""The Lightning callback that ends ``fit``: fit the dialogue scale α on validation characters, then write the
export folder (the format is :mod:`replugchar.retrieval.export`)."""

from __future__ import annotations

import logging
from pathlib import Path

import lightning as L
import numpy as np

from ..retrieval.export import export_retriever
from .calibration import Calibration

log = logging.getLogger(__name__)


class ExportRetriever(L.Callback):
    """At the end of ``fit``, fit the dialogue scale α on validation characters and export the trained encoder,
    index and scoring rule (see :func:`export_retriever`).

    Why α: the head's weights are learned on training characters; α ∈ {0, …, 2} (see
    :data:`~replugchar.training.calibration.DIALOGUE_SCALES`) picked by the LM's top-1 gain on validation characters
    makes the exported rule never worse there than plain similarity of the trained encoder (α = 0). The module's
    head is scaled in place, so the validation after ``fit`` reports the exported rule.

    Args:
        dirpath: export folder; default ``<trainer.default_root_dir>/retriever``.
        fit_mixing: fit α on the validation split (costs one no-setting LM score per validation example).

    Attributes (read by the ``fit`` report): ``written``, the export folder once written (rank 0); ``mixing``, the
    fitted :class:`~replugchar.training.calibration.Calibration` (None when α was not fitted).
    """

    def __init__(self, dirpath: str | None = None, fit_mixing: bool = True) -> None:
        self.dirpath = dirpath
        self.fit_mixing = fit_mixing
        self.written: Path | None = None
        self.mixing: Calibration | None = None

    def on_fit_end(self, trainer: L.Trainer, pl_module) -> None:
        dm = getattr(trainer, "datamodule", None)
        val = list(getattr(dm, "val_examples", []) or [])
        if self.fit_mixing and getattr(pl_module, "head", None) is not None and val:
            self._fit_mixing(trainer, pl_module, val)
        if trainer.global_rank != 0:
            return
        out = Path(self.dirpath or Path(trainer.default_root_dir) / "retriever")
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
        data_dir = str(dm.hparams.data_dir) if dm is not None and hasattr(dm, "hparams") else None
        train_chars = sorted({e.character_id for e in getattr(dm, "train_examples", [])})
        self.written = export_retriever(
            pl_module, out, metrics=metrics, data_dir=data_dir, train_characters=train_chars
        )

    def _fit_mixing(self, trainer: L.Trainer, module, val) -> None:
        """α on rank 0 (each validation pair scored once), broadcast so every rank holds the same head."""
        import torch

        from .calibration import fit, validation_matrices

        cal = None
        module.flush_scores()
        trainer.strategy.barrier()  # every rank's validation scores are on disk ...
        if trainer.global_rank == 0:
            module.scorer.refresh()  # ... and rank 0 reads them instead of scoring those pairs again
            sims, _, gains, dialogue = validation_matrices(module, val, module.characters)
            cal = fit(sims, np.zeros_like(sims), gains, grid=(0.0,), fit_threshold=False, dialogue=dialogue)
            module.flush_scores()
        cal = trainer.strategy.broadcast(cal, src=0)
        with torch.no_grad():
            module.head.weights.mul_(cal.dialogue_scale)
        self.mixing = cal
        log.info(
            "dialogue scale α = %s fitted on %d validation examples (top-1 gain %+.4f -> %+.4f nats/token)",
            cal.dialogue_scale,
            cal.n_examples,
            cal.gain_at_zero,
            cal.gain_fitted_weight,
        )
