"""``replugchar teacher-report``: the numbers on hand-made LM tables, and the command on the tiny models."""

from __future__ import annotations

import json
import logging
import sys

import lightning as L
import numpy as np
import pytest
import yaml

from replugchar.cli.commands import run
from replugchar.core.data import SplitSpec
from replugchar.evaluation.teacher_report import teacher_report
from replugchar.lm.finetuned import finetuned_characters
from replugchar.lm.gains import LMTable
from replugchar.lm.models import LMOptions
from replugchar.training.datamodule import LSRDataModule
from replugchar.training.finetune import CharacterLMModule
from replugchar.training.optim import OptimizerOptions
from replugchar.training.sft_data import CharacterSFTDataModule


def main(argv: list[str]) -> dict[str, float]:
    """``replugchar teacher-report ARGV`` (its parser and function), returning the numbers."""
    return run("teacher-report", argv)


def table(none: list[float], per_setting: list[list[float]]) -> LMTable:
    per = [np.asarray(s, dtype=float) for s in per_setting]
    return LMTable(np.asarray(none, dtype=float), per, [p * 10 for p in per], np.full(len(per), 10))


def test_the_numbers_on_a_hand_made_table():
    lm = table(
        none=[-2.0, -1.0, -3.0, -1.5],
        per_setting=[[-1.5, -1.9, -1.8], [-1.2, -1.1], [-2.5, -2.0, -2.9, -3.1], [-1.6]],
    )
    similarity = [
        np.array([0.9, 0.1, 0.2]),
        np.array([0.7, 0.3]),
        np.array([0.1, 0.8, 0.0, 0.2]),
        np.array([1.0]),
    ]
    other = table([0, 0, 0, 0], [[0.0, 1.0, 0.0], [0.0, 1.0], [0.0, 2.0, 0.0, 0.0], [5.0]])
    got = teacher_report(lm, similarity, other)
    # best settings: 0, 1, 1, 0; second best: -1.8, -1.2, -2.5; the single-setting example has no margin
    assert got["n_examples"] == 4
    assert got["median_margin"] == pytest.approx(np.median([0.3, 0.1, 0.5]))
    assert got["best_beats_none"] == pytest.approx(2 / 4)  # -1.1 < -1.0 and -1.6 < -1.5: no setting wins
    assert got["mean_best_gain"] == pytest.approx(np.mean([0.5, -0.1, 1.0, -0.1]))
    # similarity's top-1: 0, 0, 1, 0 -> misses only the second example, by -1.1 - -1.2
    assert got["similarity_top1_is_lm_best"] == pytest.approx(3 / 4)
    assert got["oracle_minus_similarity"] == pytest.approx(0.1 / 4)
    # the other LM's best: 1, 1, 1, 0
    assert got["agreement_with_other"] == pytest.approx(3 / 4)
    assert set(teacher_report(lm)) == {"n_examples", "median_margin", "best_beats_none", "mean_best_gain"}


def test_mismatched_inputs_are_refused():
    lm = table([-1.0, -1.0], [[-1.0, -2.0], [-1.0, -2.0]])
    with pytest.raises(ValueError, match="similarity"):
        teacher_report(lm, [np.zeros(2)])
    with pytest.raises(ValueError, match="same examples"):
        teacher_report(lm, None, table([-1.0, -1.0], [[-1.0], [-1.0, -2.0]]))


@pytest.mark.slow
def test_the_command_on_a_base_lm_and_its_fine_tune(tmp_path, monkeypatch, capsys, caplog):
    """Log-likelihoods through the shared cache, excludes the fine-tune's training characters, compares two LMs."""
    dm = CharacterSFTDataModule(
        data_dir="demo", batch_size=4, max_train_examples=16, split=SplitSpec(val_fraction=0.25)
    )
    module = CharacterLMModule(
        method="full",
        lm=LMOptions(name="tiny:gpt2", max_length=1024),
        optimizer=OptimizerOptions(learning_rate=3e-3),
    )
    L.Trainer(
        accelerator="cpu",
        max_steps=8,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
    ).fit(module, datamodule=dm)
    folder = module.export(tmp_path / "lm", train_characters=dm.train_characters, data_source="demo")
    trained = finetuned_characters(folder)
    assert trained

    config = tmp_path / "report.yaml"
    cache = tmp_path / "scores"
    options = {
        "lm": "tiny:gpt2",
        "other_lm": str(folder),
        "data_dir": "demo",
        "split": "all",
        "max_examples": None,
        "base_encoder": "tiny:bert",
        "max_length": 1024,
        "loglik_cache_dir": str(cache),
        "out": str(tmp_path / "report.json"),
    }
    config.write_text(yaml.safe_dump(options))
    monkeypatch.setattr(sys, "argv", ["replugchar"])
    numbers = main(["--config", str(config)])

    everything = LSRDataModule(data_dir="demo", split=SplitSpec(val_fraction=0.0))
    everything.setup()
    kept = [e for e in everything.train_examples if e.character_id not in trained]
    assert numbers["n_examples"] == len(kept) < len(everything.train_examples)
    for key in ("median_margin", "oracle_minus_similarity", "best_beats_none", "similarity_top1_is_lm_best"):
        assert np.isfinite(numbers[key]), key
    assert numbers["median_margin"] >= 0 and numbers["oracle_minus_similarity"] >= 0
    assert 0 <= numbers["agreement_with_other"] <= 1
    saved = json.loads((tmp_path / "report.json").read_text())
    assert saved["excluded"] == sorted(trained) and saved["n_examples"] == numbers["n_examples"]
    assert "median_margin" in capsys.readouterr().out

    # a second run reads every score from the cache: the same numbers, no pair scored again
    logger = logging.getLogger("replugchar.evaluation.teacher_report")
    caplog.set_level(logging.INFO, logger=logger.name)
    logger.addHandler(caplog.handler)  # direct: `replugchar` may not propagate to the root
    caplog.clear()  # only the second run's records (an earlier CLI run may have set the logger's level)
    try:
        assert main(["--config", str(config)]) == numbers
    finally:
        logger.removeHandler(caplog.handler)
    cache_lines = {r.getMessage() for r in caplog.records if "computed now" in r.getMessage()}
    assert len(cache_lines) == 2 and all(line.endswith(" 0 computed now") for line in cache_lines), (
        cache_lines
    )


def test_an_unknown_option_fails(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("lm: tiny:gpt2\nsplitt: val\n")
    with pytest.raises(ValueError, match=r"teacher-report: .*'splitt'"):
        main(["--config", str(path)])


def test_the_split_comes_from_an_export_when_given(tmp_path, monkeypatch):
    """With --retriever the report judges the characters of the export's stored split, as evaluate does."""
    import os
    import shutil

    from replugchar.evaluation import teacher_report as tr
    from replugchar.evaluation.evaluate import select_examples

    folder = tmp_path / "export"
    shutil.copytree(os.path.join(os.path.dirname(__file__), "fixtures", "export_v1"), folder)
    config = json.loads((folder / "retriever.json").read_text(encoding="utf-8"))
    config["split"] = {"val_fraction": 0.5, "test_fraction": 0.25, "seed": 3}
    (folder / "retriever.json").write_text(json.dumps(config), encoding="utf-8")
    seen = []
    monkeypatch.setattr(
        tr, "_table_of", lambda spec, examples, *a: seen.append(examples) or _no_table(examples)
    )
    monkeypatch.setattr(tr, "teacher_report", lambda *a, **k: {"n_examples": float(len(seen[-1]))})
    options = dict(lm="tiny:gpt2", data_dir="demo", split="test", max_examples=None, base_encoder="tiny:bert")
    tr.report(retriever=str(folder), **options)
    stored, _ = select_examples("demo", "test", 0.5, 0.25, 3, None)
    assert [e.example_id for e in seen[-1]] == [e.example_id for e in stored]
    tr.report(retriever=str(folder), val_fraction=0.2, test_fraction=0.1, **options)  # flags override it
    assert {e.example_id for e in seen[-1]} != {e.example_id for e in stored}


def _no_table(examples) -> LMTable:
    return table([0.0] * len(examples), [[0.0]] * len(examples))
