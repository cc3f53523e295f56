"""Training (Lightning): LSR's module, loss, data module, callbacks, calibration and priors; the character LM's
fine-tuning; ``load_run``."""
