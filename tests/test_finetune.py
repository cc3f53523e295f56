"""``replugchar finetune-lm``: the pad/eos failure it avoids, learning to stop, LoRA and full fine-tuning, the saved
folder, resuming after a kill, the shipped configs and the Japanese path, all with the byte-level tiny GPT-2.

The tiny model (2 layers, 32-d, 260 byte tokens) learns short replies in a few hundred milliseconds, which is
enough to see the difference between a loss mask that hides the eos and one that does not.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

from replugchar.cli.lightning_cli import FinetuneCLI
from replugchar.cli.lightning_cli import run_finetune as main
from replugchar.core.data import Character, Example, SplitSpec, Turn
from replugchar.lm.finetuned import finetuned_characters
from replugchar.lm.likelihood import LMLikelihood, LoglikRequest, PromptTemplate
from replugchar.lm.models import LMOptions, load_causal_lm
from replugchar.training.finetune import (
    TEMPLATE_FILE,
    TRAIN_CHARACTERS_FILE,
    CharacterLMModule,
    LoraOptions,
)
from replugchar.training.optim import OptimizerOptions
from replugchar.training.sft_data import CharacterSFTDataModule, SFTStream, check_settings_mix, draw_settings

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "configs").glob("finetune_*.yaml"))
TEMPLATE = PromptTemplate()


# ----------------------------------------------------------------------------------------------- helpers
def trainer(max_steps: int, **kwargs) -> L.Trainer:
    options = {
        "accelerator": "cpu",
        "devices": 1,
        "max_steps": max_steps,
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "num_sanity_val_steps": 0,
    }
    options.update(kwargs)
    return L.Trainer(**options)


def val_loss(module: CharacterLMModule, dm: CharacterSFTDataModule) -> float:
    return float(trainer(1).validate(module, datamodule=dm, verbose=False)[0]["val/loss"])


def p_stop(model, tok, example: Example) -> float:
    """P(eos | prompt + the gold reply): how surely the model ends the reply where it ends."""
    ids = tok(
        TEMPLATE.render((), example.context, example.query) + TEMPLATE.response.format(text=example.response)
    )
    with torch.no_grad():
        logits = model(torch.tensor([ids.input_ids])).logits[0, -1].float()
    return float(torch.softmax(logits, -1)[tok.eos_token_id])


def greedy(model, tok, example: Example, limit: int = 40) -> list[int]:
    ids = tok(TEMPLATE.render((), example.context, example.query), return_tensors="pt").input_ids
    out = model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=limit,
        do_sample=False,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    return out[0, ids.shape[1] :].tolist()


TOY_CHARACTER = Character("toy", ("I love tea.", "I am a pilot."))
TOY_EXAMPLES = [
    Example(f"toy-{i}", "toy", f"toy-d{i}", query, reply)
    for i, (query, reply) in enumerate(
        [("Hi!", "Hello."), ("Tea?", "Yes, please."), ("Job?", "I fly."), ("Bye!", "See you.")]
    )
]
TOY_STEPS, TOY_LR = 150, 3e-3


@pytest.fixture
def toy_data(write_data) -> Path:
    return write_data([TOY_CHARACTER], TOY_EXAMPLES, name="toy")


def make_corpus(n_characters: int = 8, per_character: int = 4) -> tuple[list[Character], list[Example]]:
    """Characters whose replies share a style, so held-out characters' replies get likelier with training."""
    foods, places = ["tea", "rice", "soup", "cake"], ["the sea", "a farm", "the city", "the hills"]
    characters, examples = [], []
    for c in range(n_characters):
        cid = f"char-{c:02d}"
        food, place = foods[c % 4], places[(c // 2) % 4]
        characters.append(
            Character(cid, (f"I love {food}.", f"I live by {place}.", f"I am {20 + c} years old."))
        )
        rows = [
            ("Hello!", f"Hi! I was just having some {food}."),
            ("Where do you live?", f"I live by {place}, it is lovely."),
            ("How old are you?", f"I am {20 + c}, and you?"),
            ("What do you like?", f"Mostly {food}, and walks by {place}."),
        ][:per_character]
        for i, (query, reply) in enumerate(rows):
            context = (Turn("user", "Nice to meet you."), Turn("character", "Likewise!")) if i % 2 else ()
            examples.append(Example(f"{cid}-{i}", cid, f"{cid}-d{i // 2}", query, reply, context))
    return characters, examples


@pytest.fixture
def corpus_dir(write_data) -> Path:
    characters, examples = make_corpus()
    return write_data(characters, examples, name="corpus")


# ----------------------------------------------------------------------------------------------- options
@pytest.mark.parametrize(
    "mix", [{"al": 1.0}, {"all": -1.0}, {"all": 0.0, "none": 0.0}, {"subset": float("nan")}]
)
def test_a_bad_settings_mix_names_the_option(mix):
    with pytest.raises(ValueError, match=r"data\.settings_mix"):
        CharacterSFTDataModule(settings_mix=mix)


@pytest.mark.parametrize(
    ("kwargs", "option"),
    [
        ({"lora": {"r": 0}}, "model.lora.r"),
        ({"lora": {"dropout": 1.0}}, "model.lora.dropout"),
        ({"optimizer": {"learning_rate": 0.0}}, "model.optimizer.learning_rate"),
        ({"lm": {"name": "tiny:gpt2", "max_length": 0}}, "model.lm.max_length"),
        ({"lm": {"name": "tiny:gpt2", "dtype": "float16"}}, "model.lm.dtype"),
        ({"method": "qlora"}, "model.method"),
        ({"lora": {"target_modules": []}}, "model.lora.target_modules"),
    ],
)
def test_a_bad_model_option_fails_before_any_model_loads(kwargs, option):
    with pytest.raises(ValueError, match=option.replace(".", r"\.")):
        CharacterLMModule(**{"lm": LMOptions(name="tiny:gpt2"), **kwargs})


def test_the_settings_mix_draws_each_prompt_shape_with_its_weight():
    import random

    settings = tuple(f"setting {i}" for i in range(5))
    mix = check_settings_mix({"all": 0.5, "subset": 0.3, "none": 0.2})
    rng = random.Random(0)
    draws = [draw_settings(settings, mix, 2, rng) for _ in range(4000)]
    full = [d for d in draws if len(d) == len(settings)]
    subsets = [d for d in draws if 1 <= len(d) <= 2]
    assert len(full) + len(subsets) + draws.count(()) == len(draws)
    assert abs(len(full) / len(draws) - 0.5) < 0.03 and abs(draws.count(()) / len(draws) - 0.2) < 0.03
    assert all(sorted(d) == sorted(settings) for d in full)
    assert len({d for d in full}) > 50  # "all" is shuffled, not one fixed order
    assert {len(d) for d in subsets} == {1, 2} and all(set(d) <= set(settings) for d in subsets)
    assert draws == [draw_settings(settings, mix, 2, r) for r in [random.Random(0)] for _ in range(4000)]


def test_the_stream_is_a_function_of_its_position_so_a_cursor_resumes_it(characters, examples):
    mix = check_settings_mix(None)
    fresh = SFTStream(examples, characters, batch_size=5, mix=mix, max_subset=2, seed=3)
    assert len(fresh) == 3  # ceil(12 / 5)
    first_epoch = list(fresh)
    second_epoch = list(fresh)
    assert len(first_epoch) == len(second_epoch) == 3
    ids = [r.example.example_id for batch in first_epoch + second_epoch for r in batch]
    everyone = sorted(e.example_id for e in examples)
    assert sorted(ids[:12]) == sorted(ids[12:24]) == everyone  # one seeded permutation per pass ...
    assert ids[:12] != ids[12:24]  # ... a new one each pass
    resumed = SFTStream(examples, characters, batch_size=5, mix=mix, max_subset=2, seed=3)
    resumed.cursor = 2  # two batches of the first epoch were trained on
    assert list(resumed) == first_epoch[2:]
    assert list(resumed) == second_epoch
    other_seed = SFTStream(examples, characters, batch_size=5, mix=mix, max_subset=2, seed=4)
    assert list(other_seed) != first_epoch
    ranks = [
        SFTStream(examples, characters, batch_size=2, mix=mix, max_subset=2, seed=3, rank=r, world_size=2)
        for r in (0, 1)
    ]
    seen = [r.example.example_id for stream in ranks for batch in stream for r in batch]
    assert sorted(seen) == sorted(e.example_id for e in examples)  # ranks split the pass, no overlap


# ----------------------------------------------------------------------------------------------- the failure
def test_pad_equal_to_eos_with_a_mask_from_ids_never_learns_to_stop():
    """The original failure: pad == eos and labels masked where ``ids == pad`` hide every reply's eos."""
    model, tok = load_causal_lm("tiny:gpt2")
    model, tok = copy.deepcopy(model), copy.deepcopy(tok)
    tok.pad_token = tok.eos_token
    model.config.pad_token_id = tok.eos_token_id
    tok.padding_side = "right"
    before = [p_stop(model, tok, e) for e in TOY_EXAMPLES]
    prompts = [TEMPLATE.render((), e.context, e.query) for e in TOY_EXAMPLES]
    texts = [
        p + TEMPLATE.response.format(text=e.response) + tok.eos_token for p, e in zip(prompts, TOY_EXAMPLES)
    ]
    batch = tok(texts, padding=True, return_tensors="pt")
    labels = batch.input_ids.clone()
    for row, prompt in enumerate(prompts):
        labels[row, : len(tok(prompt).input_ids)] = -100  # the reply only, as a careful recipe does
    labels[batch.input_ids == tok.pad_token_id] = -100  # ... and this hides the eos too
    model.train().requires_grad_(True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=TOY_LR)
    for _ in range(TOY_STEPS):
        loss = model(
            input_ids=batch.input_ids,
            attention_mask=(batch.input_ids != tok.pad_token_id).long(),
            labels=labels,
        ).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    assert loss.item() < 0.5  # the replies were learnt ...
    after = [p_stop(model, tok, e) for e in TOY_EXAMPLES]
    assert max(after) < 0.01 and np.mean(after) <= np.mean(before)  # ... but never where they end
    for example in TOY_EXAMPLES:
        generated = greedy(model, tok, example)
        assert len(generated) == 40 and tok.eos_token_id not in generated  # runs to the length limit
        assert tok.decode(generated).startswith(" " + example.response)


def test_the_package_path_learns_to_stop(toy_data):
    dm = CharacterSFTDataModule(
        data_dir=str(toy_data), batch_size=4, settings_mix={"none": 1}, split=SplitSpec(val_fraction=0.0)
    )
    module = CharacterLMModule(
        method="full", lm=LMOptions(name="tiny:gpt2"), optimizer=OptimizerOptions(learning_rate=TOY_LR)
    )
    module.configure_model()
    before = [p_stop(module.lm.eval(), module.tokenizer, e) for e in TOY_EXAMPLES]
    trainer(TOY_STEPS, limit_val_batches=0).fit(module, datamodule=dm)
    model, tok = module.lm.eval(), module.tokenizer
    assert tok.pad_token_id != tok.eos_token_id
    after = [p_stop(model, tok, e) for e in TOY_EXAMPLES]
    assert min(after) > 0.5 and min(after) > 10 * max(before)
    for example in TOY_EXAMPLES:
        generated = greedy(model, tok, example)
        assert generated[-1] == tok.eos_token_id and len(generated) < 40  # stops by itself
        assert tok.decode(generated[:-1]) == " " + example.response


def test_the_training_loss_is_the_negative_of_the_lm_loglik(corpus_dir):
    """Training sees sequences exactly as LSR scores them: same tokens, layout, reply mask and eos."""
    dm = CharacterSFTDataModule(data_dir=str(corpus_dir), batch_size=4, split=SplitSpec(val_fraction=0.3))
    dm.setup("validate")
    module = CharacterLMModule(method="full", lm=LMOptions(name="tiny:gpt2", max_length=256))
    module.configure_model()
    model = module.lm.eval()
    requests = dm.val_requests
    assert any(r.settings for r in requests) and any(e.context for e in dm.val_examples)
    with torch.no_grad():
        nll, reply = module.reply_nll(requests)
    scores = LMLikelihood(model, module.tokenizer, TEMPLATE, max_length=256).loglik(requests)
    np.testing.assert_array_equal(reply.sum(1).numpy(), scores.n_tokens)
    np.testing.assert_allclose(-nll.sum(1).double().numpy(), scores.logp_sum, rtol=1e-5, atol=1e-4)


# ----------------------------------------------------------------------------------------------- methods
# LoRA leaves the (tied) embeddings and output head of the random tiny model alone, so it gains less than full
@pytest.mark.parametrize(("method", "lr", "min_gain"), [("full", 3e-3, 0.3), ("lora", 1e-2, 0.1)])
def test_lora_and_full_fine_tuning_lower_the_held_out_loss(corpus_dir, method, lr, min_gain):
    dm = CharacterSFTDataModule(data_dir=str(corpus_dir), batch_size=4, split=SplitSpec(val_fraction=0.3))
    module = CharacterLMModule(
        method=method,
        lm=LMOptions(name="tiny:gpt2"),
        optimizer=OptimizerOptions(learning_rate=lr),
        lora=LoraOptions(r=8, alpha=16),
    )
    before = val_loss(module, dm)
    frozen = {k: v.clone() for k, v in module.lm.state_dict().items() if "lora_" not in k}
    trainer(60, limit_val_batches=0).fit(module, datamodule=dm)
    after = val_loss(module, dm)
    assert dm.train_characters and not set(dm.train_characters) & {e.character_id for e in dm.val_examples}
    assert after < before - min_gain, (before, after)
    changed = [k for k, v in module.lm.state_dict().items() if k in frozen and not torch.equal(v, frozen[k])]
    if method == "lora":
        assert changed == []  # only the adapters trained
    else:
        assert changed


def test_the_saved_folder_has_the_logliks_of_the_in_memory_model(corpus_dir, tmp_path):
    """An LM whose pad is its eos and that has no unk gets a new ``<|pad|>``; the folder keeps it."""
    base, tok = load_causal_lm("tiny:gpt2")
    tok = copy.deepcopy(tok)
    tok.pad_token, tok.unk_token = tok.eos_token, None
    base.config.pad_token_id = tok.eos_token_id
    source = tmp_path / "pad-is-eos"
    base.save_pretrained(source)
    tok.save_pretrained(source)

    dm = CharacterSFTDataModule(data_dir=str(corpus_dir), batch_size=4, split=SplitSpec(val_fraction=0.3))
    module = CharacterLMModule(
        method="lora",
        lm=LMOptions(name=str(source)),
        optimizer=OptimizerOptions(learning_rate=1e-2),
        lora=LoraOptions(r=4, alpha=8),
    )
    trainer(10, limit_val_batches=0).fit(module, datamodule=dm)
    folder = module.export(tmp_path / "lm", train_characters=dm.train_characters, data_source=str(corpus_dir))

    assert (
        module.tokenizer.pad_token == "<|pad|>"
        and module.tokenizer.pad_token_id != module.tokenizer.eos_token_id
    )
    loaded, loaded_tok = load_causal_lm(str(folder))
    assert loaded_tok.pad_token == "<|pad|>" and loaded_tok.pad_token_id == module.tokenizer.pad_token_id
    assert not any(n.endswith((".bin", ".pt")) for n in os.listdir(folder))
    assert folder.stat().st_mode & 0o055 == 0o055  # others may read the folder ...
    assert all(p.stat().st_mode & 0o044 == 0o044 for p in folder.iterdir())  # ... and its files
    assert (folder / "model.safetensors").exists() and not any(
        "lora" in k for k in load_file(folder / "model.safetensors")
    )
    template = PromptTemplate(**json.loads((folder / TEMPLATE_FILE).read_text()))
    assert template == module.template
    requests = [LoglikRequest(e, dm.characters[e.character_id].settings[:2]) for e in dm.val_examples]
    requests += [LoglikRequest(e) for e in dm.val_examples]
    in_memory = LMLikelihood(module.lm.eval(), module.tokenizer, module.template).loglik(requests)
    reloaded = LMLikelihood(loaded, loaded_tok, template).loglik(requests)
    np.testing.assert_array_equal(reloaded.n_tokens, in_memory.n_tokens)
    np.testing.assert_array_equal(reloaded.logp_sum, in_memory.logp_sum)
    trained = finetuned_characters(folder)
    assert trained == set(dm.train_characters) and trained.isdisjoint(e.character_id for e in dm.val_examples)
    card = (folder / "README.md").read_text()
    assert all(cid in card for cid in trained) and str(corpus_dir) in card
    assert json.loads((folder / TRAIN_CHARACTERS_FILE).read_text())["data_dir"] == str(corpus_dir)
    assert finetuned_characters("tiny:gpt2") == set() and finetuned_characters(source) == set()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp folder left


# ----------------------------------------------------------------------------------------------- CLI
def run_config(tmp_path: Path, name: str, overrides: dict, killer_step: int | None = None) -> dict:
    """A finetune-lm config for the tiny GPT-2 on a demo subset, written under ``tmp_path/name``."""
    root = tmp_path / name
    callbacks = [
        {
            "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
            "init_args": {"dirpath": str(root / "checkpoints"), "every_n_train_steps": 3, "save_last": True},
        }
    ]
    if killer_step is not None:
        callbacks.append({"class_path": "killer_callback.KillAtStep", "init_args": {"step": killer_step}})
    config = {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "cpu",
            "devices": 1,
            "max_steps": 6,
            "val_check_interval": 2,
            "check_val_every_n_epoch": None,
            "num_sanity_val_steps": 0,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "default_root_dir": str(root),
            "logger": False,
            "callbacks": callbacks,
        },
        "model": {
            "lm": {"name": "tiny:gpt2"},
            "method": "lora",
            "lora": {"r": 4, "alpha": 8, "dropout": 0.1},
        },
        "data": {
            "data_dir": "demo",
            "split": {"val_fraction": 0.25},
            "batch_size": 4,
            "max_train_examples": 16,
            "max_val_examples": 4,
        },
        "export": {"output_dir": str(root / "lm")},
    }
    for section, values in overrides.items():
        config[section].update(values)
    root.mkdir(parents=True, exist_ok=True)
    (root / "config.yaml").write_text(yaml.safe_dump(config))
    return config


KILLER = """
import os
import signal

import lightning as L


class KillAtStep(L.Callback):
    \"\"\"SIGKILL this process (no cleanup, as a preemption or OOM kill) when training reaches ``step``.\"\"\"

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)
"""


def run_main(monkeypatch, args: list[str]) -> FinetuneCLI:
    monkeypatch.setattr(sys, "argv", ["replugchar"])  # pytest's own arguments are not ours
    return main(args)


@pytest.mark.slow
def test_a_run_killed_after_a_checkpoint_resumes_to_the_uninterrupted_result(tmp_path, monkeypatch):
    run_config(tmp_path, "whole", {})
    run_main(monkeypatch, ["--config", str(tmp_path / "whole" / "config.yaml")])

    run_config(tmp_path, "killed", {}, killer_step=4)
    (tmp_path / "killer_callback.py").write_text(textwrap.dedent(KILLER))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(REPO)]), "OMP_NUM_THREADS": "1"}
    code = f"from replugchar.cli.lightning_cli import run_finetune; run_finetune(['--config', {str(tmp_path / 'killed' / 'config.yaml')!r}])"
    proc = subprocess.run(
        [sys.executable, "-c", code], env=env, cwd=tmp_path, capture_output=True, timeout=300
    )
    assert proc.returncode == -9, proc.stderr.decode()[-2000:]
    last = tmp_path / "killed" / "checkpoints" / "last.ckpt"
    assert torch.load(last, map_location="cpu", weights_only=False)["global_step"] == 3  # step 4 is lost
    assert not (tmp_path / "killed" / "lm").exists()
    run_config(tmp_path, "killed", {})  # same run without the killer
    run_main(monkeypatch, ["--config", str(tmp_path / "killed" / "config.yaml"), "--ckpt_path", str(last)])

    whole = load_file(tmp_path / "whole" / "lm" / "model.safetensors")
    resumed = load_file(tmp_path / "killed" / "lm" / "model.safetensors")
    base = load_causal_lm("tiny:gpt2")[0].state_dict()
    assert whole.keys() == resumed.keys()
    assert any(not torch.equal(whole[k], base[k]) for k in whole if k in base)  # it trained at all
    for key in whole:
        assert torch.equal(whole[key], resumed[key]), key


def test_resuming_with_another_data_stream_fails(tmp_path, monkeypatch):
    run_config(tmp_path, "first", {"trainer": {"max_steps": 3, "val_check_interval": 3}})
    run_main(monkeypatch, ["--config", str(tmp_path / "first" / "config.yaml")])
    last = tmp_path / "first" / "checkpoints" / "last.ckpt"
    run_config(tmp_path, "first", {"data": {"batch_size": 2}})
    with pytest.raises(ValueError, match="ckpt_path"):
        run_main(monkeypatch, ["--config", str(tmp_path / "first" / "config.yaml"), "--ckpt_path", str(last)])


def test_the_debug_config_runs_end_to_end(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # the config writes under runs/
    cli = run_main(monkeypatch, ["--config", str(REPO / "configs" / "finetune_debug.yaml")])
    report = capsys.readouterr().out
    folder = tmp_path / "runs" / "finetune_debug" / "lm"
    assert (folder / "model.safetensors").exists() and (
        tmp_path / "runs/finetune_debug/checkpoints/last.ckpt"
    ).exists()
    assert list((tmp_path / "runs" / "finetune_debug").rglob("metrics.csv"))
    assert finetuned_characters(folder) == set(cli.datamodule.train_characters)
    assert cli.trainer.precision == "32-true"  # chosen automatically on CPU
    # the before -> after report `fit` prints too (cli.lightning_cli.FitReport), with the folder written
    assert "replugchar finetune-lm: validation before -> after training (held-out characters)" in report
    (loss_line,) = [line for line in report.splitlines() if line.strip().startswith("val/loss")]
    assert "n/a" not in loss_line and "->" in loss_line, loss_line  # measured before and after
    assert f"fine-tuned LM: {Path('runs/finetune_debug/lm')}" in report
    model, tok = load_causal_lm(str(folder))
    assert LMLikelihood(model, tok).loglik(cli.datamodule.val_requests[:2]).n_tokens.min() > 1


# ----------------------------------------------------------------------------------------------- configs
def instantiate(path: Path, monkeypatch) -> FinetuneCLI:
    monkeypatch.setattr(sys, "argv", ["replugchar"])
    return FinetuneCLI(CharacterLMModule, CharacterSFTDataModule, run=False, args=["--config", str(path)])


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_config_instantiates_and_keeps_every_value(path, tmp_path, monkeypatch):
    """Parsed and instantiated (model, data, trainer, callbacks) without loading any weights or data."""
    monkeypatch.chdir(tmp_path)
    text = path.read_text()
    assert f"replugchar finetune-lm --config configs/{path.name}" in text  # the usage line
    raw = yaml.safe_load(text)
    cli = instantiate(path, monkeypatch)
    assert cli.model.lm is None  # the LM loads only when training starts
    for section, hparams in (("model", cli.model.hparams), ("data", cli.datamodule.hparams)):
        for key, value in raw[section].items():
            if (
                isinstance(value, dict) and key != "settings_mix"
            ):  # a group: fields left out keep their defaults
                assert {k: hparams[key][k] for k in value} == value, f"{section}.{key}"
            else:
                assert hparams[key] == value, f"{section}.{key}"
    # the groups are the instantiated ones, not only their hparams
    assert cli.model.lm_options.name == raw["model"]["lm"]["name"]
    assert cli.datamodule.split.val_fraction == raw["data"]["split"]["val_fraction"]
    assert cli.config.export.output_dir == raw["export"]["output_dir"]
    for key, value in raw["trainer"].items():
        if not isinstance(value, dict | list):
            assert cli.config.trainer[key] == value, key
    cuda_bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    assert cli.trainer.precision == raw["trainer"].get("precision", "bf16-mixed" if cuda_bf16 else "32-true")
    callbacks = [type(cb).__name__ for cb in cli.trainer.callbacks]
    assert "ExportCharacterLM" in callbacks and "ModelCheckpoint" in callbacks


@pytest.mark.parametrize(
    ("finetune", "lsr"),
    [
        ("finetune_demo.yaml", "demo.yaml"),
        ("finetune_shared.yaml", "spc.yaml"),
        ("finetune_ja.yaml", "ja_example.yaml"),
    ],
)
def test_the_teacher_config_uses_the_split_and_template_of_its_lsr_run(finetune, lsr):
    """The teacher must never train on a character the LSR run validates on, and must see its prompts."""
    ft = yaml.safe_load((REPO / "configs" / finetune).read_text())
    fit = yaml.safe_load((REPO / "configs" / lsr).read_text())
    assert ft["data"]["data_dir"] == fit["data"]["data_dir"]
    # data.split as each command builds it (fields the YAML leaves out at their defaults): the same split
    assert SplitSpec(**ft["data"].get("split", {})) == SplitSpec(**fit["data"].get("split", {}))
    assert "split" in ft["data"] and "split" in fit["data"]  # both state it, so neither relies on a default
    assert ft["model"].get("template") == fit["model"].get("template")
    assert ft["model"]["lm"].get("max_length", 512) == fit["model"]["lm"].get("max_length", 512)


def test_a_bad_config_value_names_the_option(tmp_path, monkeypatch, capsys):
    raw = yaml.safe_load((REPO / "configs" / "finetune_debug.yaml").read_text())
    raw["model"]["method"] = "adapters"
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(SystemExit):
        instantiate(path, monkeypatch)
    assert "method" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------- Japanese
JA_SETTINGS = {
    "rpc-JA": ("私はパン屋で働いている。", "猫を二匹飼っている。", "北海道で生まれ育った。"),
    "rpc-JB": ("看護師として働いている。", "コーヒーが大好きだ。", "大阪出身である。"),
    "rpc-JC": ("大学で天文学を学んでいる。", "バイオリンを弾く。", "雪を見たことがない。"),
    "rpc-JD": ("小学校の先生をしている。", "週末は山に登る。", "辛い料理が苦手だ。"),
    "rpc-JE": ("ｶﾒﾗが趣味である。", "ＳＦ小説をよく読む。", "東京で一人暮らしをしている。"),
    "rpc-JF": ("料理教室に通っている。", "犬を飼うのが夢だ。", "朝は弱い。"),
}
JA_TURNS = [
    ("こんにちは！", "こんにちは、よろしくお願いします。"),
    ("お仕事は何をされていますか？", "{s0}"),
    ("趣味はありますか？", "そうですね、{s1}"),
    ("ご出身はどちらですか？", "{s2} よろしくね😊"),
]


def japanese_records() -> tuple[list[dict], list[dict]]:
    """RealPersonaChat-schema records (language ja, turn_index, query_type) built in code."""
    characters = [
        {
            "character_id": cid,
            "source": "real_persona_chat",
            "name": None,
            "language": "ja",
            "settings": list(s),
        }
        for cid, s in JA_SETTINGS.items()
    ]
    dialogues = []
    for cid, settings in JA_SETTINGS.items():
        context: list[dict] = []
        for t, (query, reply) in enumerate(JA_TURNS, start=1):
            dialogues.append(
                {
                    "example_id": f"{cid}-t{t:02d}",
                    "character_id": cid,
                    "dialogue_id": f"{cid}-d",
                    "turn_index": t,
                    "context": list(context[-4:]),
                    "query": query,
                    "response": reply.format(s0=settings[0], s1=settings[1], s2=settings[2]),
                    "query_type": "greeting" if t == 1 else "other",
                }
            )
            context += [
                {"role": "user", "text": query},
                {"role": "character", "text": dialogues[-1]["response"]},
            ]
    return characters, dialogues


@pytest.mark.slow
def test_japanese_end_to_end_with_lora(write_data, tmp_path):
    characters, dialogues = japanese_records()
    data = write_data(characters, dialogues, name="rpc")
    ja = yaml.safe_load((REPO / "configs" / "finetune_ja.yaml").read_text())
    dm = CharacterSFTDataModule(data_dir=str(data), batch_size=4, split=SplitSpec(val_fraction=0.34))
    module = CharacterLMModule(
        method="lora",
        template=ja["model"]["template"],
        lm=LMOptions(name="tiny:gpt2", max_length=1024),
        lora=LoraOptions(r=8, alpha=16),
        optimizer=OptimizerOptions(learning_rate=1e-2),
    )
    before = val_loss(module, dm)
    trainer(40, limit_val_batches=0).fit(module, datamodule=dm)
    folder = module.export(tmp_path / "ja-lm", train_characters=dm.train_characters, data_source=str(data))
    after = val_loss(module, dm)
    assert after < before - 0.1, (before, after)  # LoRA on the random tiny model: see the test above

    loaded, tok = load_causal_lm(str(folder))
    template = PromptTemplate(**json.loads((folder / TEMPLATE_FILE).read_text(encoding="utf-8")))
    assert template.setting_line == ja["model"]["template"]["setting_line"]
    requests = [LoglikRequest(e, dm.characters[e.character_id].settings) for e in dm.val_examples]
    assert "人物設定" in template.render(requests[0].settings, (), requests[0].example.query)
    expected = LMLikelihood(module.lm.eval(), module.tokenizer, module.template, max_length=1024).loglik(
        requests
    )
    got = LMLikelihood(loaded, tok, template, max_length=1024).loglik(requests)
    np.testing.assert_array_equal(got.logp_sum, expected.logp_sum)
    text = dialogues[-1]["response"]
    assert (
        tok.decode(tok(text, add_special_tokens=False).input_ids) == text
    )  # bytes round-trip, emoji included
    trained = finetuned_characters(folder)
    assert trained == set(dm.train_characters) and trained.isdisjoint(e.character_id for e in dm.val_examples)


@pytest.mark.slow
def test_the_finetuned_folder_is_the_teacher_of_fit_and_the_reader_of_chat(tmp_path, monkeypatch, capsys):
    """finetune-lm -> fit (model.lm = the folder) -> chat and evaluate with it, all through the one CLI."""
    from replugchar.cli import main as cli_main
    from replugchar.evaluation.evaluate import select_examples

    monkeypatch.chdir(tmp_path)
    run_main(monkeypatch, ["--config", str(REPO / "configs" / "finetune_debug.yaml")])
    folder = str(tmp_path / "runs" / "finetune_debug" / "lm")
    root = tmp_path / "lsr"
    cli_main(["fit", "--config", str(REPO / "configs" / "debug.yaml"), "--model.lm.name", folder,
              f"--trainer.default_root_dir={root}", f"--trainer.logger.init_args.save_dir={root}"])  # fmt: skip
    config = json.loads((root / "retriever" / "retriever.json").read_text())
    assert config["scorer"]["lm"] == folder
    cid = sorted(set(config["train_characters"]))[0]
    capsys.readouterr()
    cli_main(["chat", "--retriever", str(root / "retriever"), "--character", cid, "--query", "Hello!"])
    out = capsys.readouterr().out
    assert "Character [" in out and folder in out  # the reply line, and the LM named in the header
    trained_on = finetuned_characters(folder)
    examples, _ = select_examples("demo", "all", 0.25, 0.0, 0, None, trained_on)
    assert examples and not {e.character_id for e in examples} & trained_on
