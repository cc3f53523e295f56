"""Evaluation: metrics, ``evaluate`` and the teacher report. Reads exported retrievers, never the training code."""
