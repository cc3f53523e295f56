"""The Lightning callback that ends ``fit``: fit the dialogue scale α on validation characters, then write the
export folder (the format is :mod:`replugchar.retrieval.export`)."""

from __future__ import annotations

import logging
import zlib
from pathlib import Path

import lightning as L
import numpy as np

from ..retrieval.export import export_retriever
from .calibration import Calibration, GeneralityFit

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
        fit_mixing: fit α on the validation split (costs one no-setting LM log-likelihood per validation example).

    Attributes (read by the ``fit`` report): ``written``, the export folder once written (rank 0); ``mixing``, the
    fitted :class:`~replugchar.training.calibration.Calibration` (None when α was not fitted).
    """

    def __init__(self, dirpath: str | None = None, fit_mixing: bool = True) -> None:
        self.dirpath = dirpath
        self.fit_mixing = fit_mixing
        self.written: Path | None = None
        self.mixing: Calibration | None = None
        self.generality_fit: GeneralityFit | None = None
        """With ``model.head.generality``: the fitted β and per validation example the top-1 gain without and with
        the learned generality (``generality_groups`` holds their dialogue hashes), for the fit report."""
        self.generality_groups: np.ndarray | None = None

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
        split = dm.split.to_dict() if hasattr(dm, "split") else None
        self.written = export_retriever(
            pl_module, out, metrics=metrics, data_dir=data_dir, train_characters=train_chars, split=split
        )

    def _fit_mixing(self, trainer: L.Trainer, module, val) -> None:
        """α on rank 0 (each validation pair's log-likelihood computed once), broadcast so every rank holds the same head."""
        import torch

        from .calibration import fit, fit_generality, generality_matrix, validation_matrices

        cal, gen_fit = None, None
        module.flush_logliks()
        trainer.strategy.barrier()  # every rank's validation log-likelihoods are on disk ...
        if trainer.global_rank == 0:
            module.likelihood.refresh()  # ... and rank 0 reads them instead of computing those pairs again
            sims, _, gains, dialogue = validation_matrices(module, val, module.characters)
            cal = fit(sims, np.zeros_like(sims), gains, grid=(0.0,), fit_threshold=False, dialogue=dialogue)
            if module.head.generality is not None:
                base = sims + cal.dialogue_scale * np.nan_to_num(dialogue)
                greeting = np.array([e.query_type == "greeting" for e in val])
                gen_fit = fit_generality(
                    base, generality_matrix(module, val, module.characters), gains, greeting
                )
                self.generality_groups = np.array([zlib.crc32(e.dialogue_id.encode()) for e in val])
            module.flush_logliks()
        cal, gen_fit = trainer.strategy.broadcast((cal, gen_fit), src=0)
        with torch.no_grad():
            module.head.weights.mul_(cal.dialogue_scale)
            if gen_fit is not None:
                module.head.generality.mul_(gen_fit.scale)
        self.mixing = cal
        self.generality_fit = gen_fit
        if gen_fit is not None:
            log.info(
                "generality scale β = %s fitted on %d validation examples (all turns / greetings top-1 gain: "
                "%s)",
                gen_fit.scale,
                len(gen_fit.rows),
                ", ".join(f"β={b}: {a:+.4f}/{g:+.4f}" for b, (a, g) in gen_fit.gains.items()),
            )
        log.info(
            "dialogue scale α = %s fitted on %d validation examples (top-1 gain %+.4f -> %+.4f nats/token)",
            cal.dialogue_scale,
            cal.n_examples,
            cal.gain_at_zero,
            cal.gain_fitted_weight,
        )
