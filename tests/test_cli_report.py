"""The before -> after report of ``replugchar fit``: a paired change with an interval, not two bare numbers."""

from __future__ import annotations

import numpy as np

from replugchar.cli.lightning_cli import paired_change_lines


def test_paired_change_reports_the_shift_and_an_interval_that_covers_it():
    groups = np.repeat(np.arange(10), 4).astype(float)  # 10 dialogues x 4 turns
    before = np.stack([groups, np.zeros(40), np.full(40, 0.01)], 1)
    after = before.copy()
    after[:, 1] = 1.0  # every example now agrees
    after[:, 2] = np.linspace(0, 0.1, 40)
    lines = paired_change_lines(before, after)
    assert "change in top1_agreement   +1.0000  95% CI [+1.0000, +1.0000]" in lines[0]
    lo, hi = (float(x) for x in lines[1].split("[")[1].split("]")[0].split(","))
    assert lo < 0.04 < hi  # mean gain change is 0.05 - 0.01 = 0.04
    assert "40 examples, 10 dialogues" in lines[1]
    assert paired_change_lines(before, after[:20]) == []  # different validation sets: nothing to pair
    shuffled = after.copy()
    shuffled[:, 0] = groups[::-1]
    assert paired_change_lines(before, shuffled) == []
    assert paired_change_lines(None, after) == []


def test_fit_and_finetune_share_one_before_after_report():
    """One FitReport for both commands: a metric measured before reads "b -> a", one not measured "n/a -> a", one
    missing after training is left out; the command's own lines follow."""
    from replugchar.cli.lightning_cli import FINETUNE_REPORTED, REPORTED, FitReport

    report = FitReport("finetune-lm", FINETUNE_REPORTED, "held-out characters")
    report.before = {"val/loss": 2.5}
    lines = report.lines({"val/loss": 2.0, "val/eos_nll": 0.25, "val/other": 1.0}, ["  fine-tuned LM: out"])
    assert lines[1] == "replugchar finetune-lm: validation before -> after training (held-out characters)"
    assert lines[2].split() == ["val/loss", "2.5000", "->", "2.0000"]
    assert lines[3].split() == ["val/eos_nll", "n/a", "->", "0.2500"]
    assert lines[4:] == ["  fine-tuned LM: out"] and len(lines) == 5  # val/other is not a reported metric
    fit = FitReport("fit", REPORTED, "character-disjoint split")
    assert fit.lines({})[1:] == [
        "replugchar fit: validation before -> after training (character-disjoint split)"
    ]
