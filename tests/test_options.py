"""The option groups: each a frozen dataclass that validates itself, read back from plain dicts (hparams), parsed
by LightningCLI as a nested section; a checkpoint with the flat options of before the groups still resumes."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import pytest
import torch

from replugchar.cli.lightning_cli import LSRCLI
from replugchar.core.data import SplitSpec
from replugchar.core.options import as_options
from replugchar.lm.loglik_cache import LikelihoodOptions
from replugchar.lm.models import LMOptions
from replugchar.training.datamodule import LSRDataModule
from replugchar.training.head import HeadOptions
from replugchar.training.losses import LossOptions
from replugchar.training.module import FLAT_NAMES, GROUPS, LSRModule, grouped_hparams
from replugchar.training.optim import OptimizerOptions

REPO = Path(__file__).resolve().parents[1]
GROUP_CLASSES = {
    "lm": LikelihoodOptions,
    "loss": LossOptions,
    "head": HeadOptions,
    "optimizer": OptimizerOptions,
}

# the flat ``model`` hparams a checkpoint of the release before the option groups holds (configs/debug.yaml's run)
OLD_FLAT_HPARAMS = {
    "encoder": "tiny:bert",
    "lm": "tiny:gpt2",
    "k": 4,
    "gamma": 0.2,
    "beta": 0.5,
    "kl_direction": "retriever_to_lm",
    "lm_score": "sum",
    "query_text": "query",
    "share_encoders": True,
    "learning_rate": 1e-3,
    "weight_decay": 0.0,
    "warmup_steps": 3,
    "refresh_every": 2,
    "lm_dtype": "float32",
    "lm_revision": None,
    "max_length": 384,
    "lm_batch_tokens": 8192,
    "score_cache_dir": None,
    "trust_remote_code": False,
    "dialogue_features": True,
    "history_window": 8,
    "freeze_encoder": False,
    "head_learning_rate": 0.1,
    "min_margin": 0.01,
    "top1_weight": 0.5,
    "generality": True,
    "generality_l2": 0.02,
    "template": {"setting_line": "Trait: {setting}\n"},
}


def test_every_flat_name_has_a_home_in_a_group():
    """FLAT_NAMES (README's rename table, and what old checkpoints are read with) names only real fields."""
    for old, (group, field) in FLAT_NAMES.items():
        assert field in {f.name for f in dataclasses.fields(GROUP_CLASSES[group])}, old
    assert set(GROUPS) == {*GROUP_CLASSES, "template"}
    # every field of every group is reachable from a flat name: nothing was added without its old name
    for group, cls in GROUP_CLASSES.items():
        moved = {field for g, field in FLAT_NAMES.values() if g == group}
        assert moved == {f.name for f in dataclasses.fields(cls)}, group


def test_old_flat_hparams_regroup_to_the_same_module():
    grouped = grouped_hparams(OLD_FLAT_HPARAMS)
    assert grouped_hparams(grouped) == grouped  # grouped hparams pass through unchanged
    module = LSRModule(**grouped)
    assert module.lm_options == LikelihoodOptions(
        name="tiny:gpt2", dtype="float32", max_length=384, max_batch_tokens=8192, loglik_cache_dir=None
    )
    assert module.loss_options == LossOptions(0.2, 0.5, "retriever_to_lm", "sum", 0.01, 0.5)
    assert module.head_options == HeadOptions(True, 8, True, 0.02, 0.1)
    assert module.optimizer_options == OptimizerOptions(1e-3, 0.0, 3)
    assert module.template.setting_line == "Trait: {setting}\n"
    assert (module.hparams.k, module.hparams.refresh_every) == (4, 2)
    # the module's own hparams are plain dicts that rebuild the same module (checkpoints need no pickle)
    again = LSRModule(**dict(module.hparams))
    assert again.lm_options == module.lm_options and again.head_options == module.head_options
    assert all(isinstance(module.hparams[name], dict) for name in GROUPS)


class ParseOnlyFitCLI(LSRCLI):
    """``replugchar fit`` up to its config (with ``--ckpt_path`` read as LightningCLI reads it), nothing built."""

    def instantiate_classes(self) -> None:
        pass

    def _run_subcommand(self, subcommand: str) -> None:
        pass


def test_fit_resumes_a_checkpoint_with_flat_hparams(tmp_path, monkeypatch):
    """LightningCLI takes the model options of ``--ckpt_path`` over the config's; flat ones are regrouped first."""
    ckpt = tmp_path / "old.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": OLD_FLAT_HPARAMS}, ckpt)
    monkeypatch.setattr(sys, "argv", ["replugchar"])
    args = ["fit", "--config", str(REPO / "configs" / "debug.yaml"), "--ckpt_path", str(ckpt)]
    cfg = ParseOnlyFitCLI(LSRModule, LSRDataModule, args=args).config.fit
    assert cfg.model.lm.max_batch_tokens == 8192 and cfg.model.lm.dtype == "float32"
    assert cfg.model.loss.direction == "retriever_to_lm" and cfg.model.head.learning_rate == 0.1
    assert cfg.model.optimizer.warmup_steps == 3 and cfg.model.template.setting_line == "Trait: {setting}\n"


def test_a_file_that_is_no_checkpoint_is_one_line(tmp_path, monkeypatch):
    from replugchar.core.data import DataError

    bad = tmp_path / "bad.ckpt"
    bad.write_text("not a checkpoint")
    monkeypatch.setattr(sys, "argv", ["replugchar"])
    args = ["fit", "--config", str(REPO / "configs" / "debug.yaml"), "--ckpt_path", str(bad)]
    with pytest.raises(DataError, match="not a readable checkpoint"):
        ParseOnlyFitCLI(LSRModule, LSRDataModule, args=args)


@pytest.mark.parametrize(
    ("dtype", "device", "frozen", "expected"),
    [
        ("auto", "cpu", True, "float32"),
        ("auto", "cuda", True, "bfloat16"),  # the frozen LM, the frozen base of a LoRA fine-tune
        ("auto", "cuda:1", False, "float32"),  # full fine-tuning keeps float32 master weights
        ("float16", "cpu", True, "float16"),
    ],
)
def test_auto_dtype_is_resolved_in_one_place(dtype, device, frozen, expected):
    assert LMOptions(dtype=dtype).resolved_dtype(device, frozen=frozen) == expected


def test_options_renamed_off_score_name_their_new_key_and_old_checkpoints_resume(tmp_path, monkeypatch):
    """0.1's ``model.lm.score_cache_dir`` / ``model.loss.lm_score`` ("score" now means only the rule's): one line
    naming the new key in a config file or a flag; a checkpoint holding them in its groups resumes."""
    from replugchar.cli.lightning_cli import run_lightning
    from replugchar.training.run import load_run

    debug = str(REPO / "configs" / "debug.yaml")
    old = tmp_path / "old.yaml"
    old.write_text("model:\n  lm: {score_cache_dir: null}\n  loss: {lm_score: sum}\n")
    monkeypatch.setattr(sys, "argv", ["replugchar"])
    with pytest.raises(ValueError) as err:
        run_lightning(["fit", "--config", debug, "--config", str(old)])
    assert "model.lm.score_cache_dir is now model.lm.loglik_cache_dir" in str(err.value)
    assert "model.loss.lm_score is now model.loss.lm_loglik" in str(err.value)
    for flag in (
        ["--model.lm.score_cache_dir", "/x"],
        ["--model.loss.lm_score=sum"],
        ["--model.lm", "{score_cache_dir: null}"],  # a group given whole
        ["--model.loss", '{"lm_score": "sum"}'],
    ):
        with pytest.raises(ValueError, match=r"--model\.(lm\.score_cache_dir|loss\.lm_score) is now"):
            load_run(["--config", debug, *flag])

    cache = str(tmp_path / "cache")  # debug.yaml has null: the checkpoint's value must win
    grouped_01 = {**grouped_hparams(OLD_FLAT_HPARAMS), "lm": {"name": "tiny:gpt2", "score_cache_dir": cache}}
    grouped_01["loss"] = {"gamma": 0.2, "lm_score": "sum"}
    ckpt = tmp_path / "v01.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": grouped_01}, ckpt)
    cfg = ParseOnlyFitCLI(LSRModule, LSRDataModule, args=["fit", "--config", debug, "--ckpt_path", str(ckpt)])
    assert cfg.config.fit.model.lm.loglik_cache_dir == cache and cfg.config.fit.model.loss.lm_loglik == "sum"
    module = LSRModule(**grouped_hparams(grouped_01))
    assert module.lm_options.loglik_cache_dir == cache and module.loss_options.lm_loglik == "sum"


def test_a_0_1_lm_name_says_its_new_spelling():
    """``from replugchar import LMScorer`` (0.1) names what replaced it, methods included, instead of Python's
    bare "cannot import name"."""
    import replugchar

    with pytest.raises(
        ImportError,
        match=r"LMScorer was renamed in 0\.2: it is replugchar\.LMLikelihood \(its \.score is \.loglik",
    ):
        exec("from replugchar import LMScorer", {})
    with pytest.raises(ImportError, match=r"replugchar\.CachedLikelihood"):
        replugchar.CachedScorer  # noqa: B018
    assert callable(replugchar.LMLikelihood.loglik) and callable(replugchar.CachedLikelihood.loglik)


def test_the_scorer_record_keeps_the_export_format_names():
    """retriever.json's "scorer" record is export format 1: its key names did not move with the options."""
    from replugchar.lm.likelihood import PromptTemplate
    from replugchar.retrieval.export_schema import _LM_RECORD_SPEC

    record = LikelihoodOptions(name="tiny:gpt2", max_batch_tokens=123).record(PromptTemplate())
    assert set(record) == set(_LM_RECORD_SPEC)
    assert record["lm"] == "tiny:gpt2" and record["lm_batch_tokens"] == 123


def test_the_split_is_one_group_for_fit_finetune_and_the_export():
    from replugchar.training.sft_data import CharacterSFTDataModule

    spec = SplitSpec(val_fraction=0.25, test_fraction=0.1, seed=3)
    fit = LSRDataModule(
        data_dir="demo", split=spec.to_dict()
    )  # as hparams / Namespace.as_dict() hand it over
    sft = CharacterSFTDataModule(data_dir="demo", split=spec)
    assert fit.split == sft.split == spec
    assert (
        fit.hparams["split"]
        == sft.hparams["split"]
        == {"val_fraction": 0.25, "test_fraction": 0.1, "seed": 3}
    )
    fit.setup()
    sft.setup("fit")
    assert {e.example_id for e in fit.val_examples} == {e.example_id for e in sft.val_examples}
    with pytest.raises(ValueError, match=r"data\.split\.test_fraction must be in"):
        SplitSpec(val_fraction=0.5, test_fraction=0.5)
    with pytest.raises(ValueError, match=r"data\.split: unknown option\(s\) \['val_fractoin'\]"):
        as_options(SplitSpec, {"val_fractoin": 0.1}, "data.split")


def test_a_config_or_flag_of_before_the_groups_names_where_each_option_went(tmp_path, monkeypatch):
    from replugchar.cli.lightning_cli import run_finetune, run_lightning
    from replugchar.training.run import load_run

    old = tmp_path / "old.yaml"
    old.write_text(
        "model:\n  lm: tiny:gpt2\n  lm_batch_tokens: 9\n  kl_direction: retriever_to_lm\ndata:\n  seed: 3\n"
    )
    monkeypatch.setattr(sys, "argv", ["replugchar"])
    with pytest.raises(ValueError) as err:
        run_lightning(["fit", "--config", str(REPO / "configs" / "debug.yaml"), "--config", str(old)])
    message = str(err.value)
    for moved in (
        "model.lm is now model.lm.name",
        "model.lm_batch_tokens is now model.lm.max_batch_tokens",
        "model.kl_direction is now model.loss.direction",
        "data.seed is now data.split.seed",
    ):
        assert moved in message
    with pytest.raises(ValueError, match=r"--model\.head_learning_rate is now --model\.head\.learning_rate"):
        load_run(["--config", str(REPO / "configs" / "debug.yaml"), "--model.head_learning_rate=0.1"])
    with pytest.raises(ValueError, match=r"--model\.lora_r is now --model\.lora\.r"):
        run_finetune(["--config", str(REPO / "configs" / "finetune_debug.yaml"), "--model.lora_r", "4"])
    # the grouped spellings pass this check (a group given whole, as a mapping, too)
    module, _ = load_run(
        ["--config", str(REPO / "configs" / "debug.yaml"), "--model.lm", '{"max_batch_tokens": 9}']
    )
    assert module.lm_options.max_batch_tokens == 9 and module.lm_options.name == "tiny:gpt2"
