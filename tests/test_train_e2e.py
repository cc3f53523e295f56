"""End to end: LSR training moves the retriever towards the setting the LM needs, and ``replugchar fit`` on
configs/debug.yaml trains, reports, exports a plain sentence-transformers folder and checkpoints no LM weight."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import types
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from replugchar.core.data import Character, Example
from replugchar.lm.likelihood import LMLikelihood, PromptTemplate
from replugchar.lm.loglik_cache import CachedLikelihood, LikelihoodOptions
from replugchar.lm.models import byte_tokenizer, load_encoder
from replugchar.training.datamodule import collate_examples
from replugchar.training.losses import LossOptions
from replugchar.training.module import LSRModule
from replugchar.training.optim import OptimizerOptions

pytestmark = pytest.mark.slow
REPO = Path(__file__).parents[1]


class CopyLM(torch.nn.Module):
    """A hand-built induction "LM" over the byte tokenizer: at each position it predicts the token that followed
    the latest earlier occurrence of the current bigram (logit +``boost``), and is uniform otherwise.

    It stands in for the in-context copying of a pretrained LM. ``tiny:gpt2`` has random weights: its
    log-likelihoods are near-uniform (settings differ by ~0.01 nats, in no useful order), so it cannot tell
    which setting helps; this model can, in code, in microseconds.
    """

    def __init__(self, vocab_size: int, boost: float = 8.0) -> None:
        super().__init__()
        self.config = types.SimpleNamespace(n_positions=1024, vocab_size=vocab_size, _name_or_path="copy-lm")
        self.anchor = torch.nn.Parameter(torch.zeros(1), requires_grad=False)  # dtype/device for LMLikelihood
        self.boost = boost

    def forward(self, input_ids, attention_mask=None, position_ids=None, logits_to_keep=0, use_cache=False):
        batch, t = input_ids.shape
        real = (
            torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
        )
        pos = torch.arange(t)
        same = input_ids[:, :, None] == input_ids[:, None, :]  # (batch, i, j): token i == token j
        prev = torch.zeros_like(same)
        prev[:, 1:, 1:] = input_ids[:, :-1, None] == input_ids[:, None, :-1]  # token i-1 == token j-1
        earlier = (pos[None, :] < pos[:, None]) & (pos[None, :] >= 1)  # (i, j): 1 <= j < i
        match = same & prev & earlier & real[:, None, :] & real[:, :, None]
        last = torch.where(match, pos, -1).amax(-1)  # (batch, i): latest matching j, -1 if none
        nxt = input_ids.gather(1, (last + 1).clamp(max=t - 1))  # the token that followed it
        logits = torch.zeros(batch, t, self.config.vocab_size)
        logits.scatter_(-1, nxt.unsqueeze(-1), torch.where(last >= 0, self.boost, 0.0).unsqueeze(-1))
        return types.SimpleNamespace(logits=logits[:, -logits_to_keep:] if logits_to_keep else logits)


PHRASES = (
    "the quick brown fox jumps over the lazy dog.",
    "every cloud has a silver lining, my friend.",
    "a penny saved is a penny earned, always.",
    "fortune favours the bold and the brave.",
    "early to bed and early to rise.",
    "practice makes perfect, they tell me.",
)
DISTRACTORS = (
    ("I like hiking in the mountains.", "My favourite colour is blue.", "I work as a baker."),
    ("I have two cats.", "I play chess on Sundays.", "I grew up in Lisbon."),
    ("I am a nurse.", "I hate cold weather.", "I drive an old red truck."),
    ("I collect stamps.", "I love spicy food.", "My sister is a pilot."),
    ("I study physics.", "I sing in a choir.", "I never drink coffee."),
    ("I am a retired teacher.", "I grow tomatoes.", "I have a pet parrot."),
)
QUERIES = (
    "Hello! How are you today?",
    "What would you say about that?",
    "Any words of wisdom?",
    "Tell me more.",
)


@pytest.fixture(scope="module")
def toy():
    """6 characters x 4 settings; every response is the character's motto, which one setting (the gold) holds."""
    characters, examples, gold = {}, [], {}
    for c, (phrase, (a, b, d)) in enumerate(zip(PHRASES, DISTRACTORS)):
        cid = f"toy{c}"
        motto = f"My motto: {phrase}"
        settings = (a, b, motto, d) if c % 2 else (motto, a, b, d)
        characters[cid] = Character(cid, settings)
        gold[cid] = settings.index(motto)
        for q, query in enumerate(QUERIES):
            response = phrase[0].upper() + phrase[1:]
            examples.append(Example(f"{cid}-{q}", cid, f"{cid}-{q}", query, response))
    return characters, examples, gold


def toy_module(characters, **kwargs) -> LSRModule:
    L.seed_everything(0, verbose=False)
    options = {
        "k": 4,
        "refresh_every": 5,
        "lm": LikelihoodOptions(name="tiny:gpt2", loglik_cache_dir=None),
        "loss": LossOptions(gamma=0.1, beta=0.5),
        "optimizer": OptimizerOptions(learning_rate=1e-3, weight_decay=0.0),
    }
    module = LSRModule(encoder="tiny:bert", **{**options, **kwargs})
    module.characters = characters
    tok = byte_tokenizer(1024)
    module.set_likelihood(
        CachedLikelihood(LMLikelihood(CopyLM(len(tok)), tok, module.template, lm_key="copy-lm"))
    )
    return module


def toy_trainer(max_steps: int) -> L.Trainer:
    return L.Trainer(
        max_steps=max_steps,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )


def gold_rank1_fraction(module: LSRModule, characters, examples, gold) -> float:
    hits = []
    for e in examples:
        q = module.encode_all([e.query], queries=True)[0]
        s = module.encode_all(list(characters[e.character_id].settings))  # (n_settings, d)
        hits.append(int(np.argmax(s @ q)) == gold[e.character_id])
    return float(np.mean(hits))


def full_loss(module: LSRModule, examples) -> float:
    module.eval()
    with torch.no_grad():
        cands = module.candidates(examples)
        sim, mask = module.similarities(examples, cands)
        return float(module.loss_fn(sim, module.lm_targets(examples, cands), mask))


def test_lsr_training_ranks_the_setting_the_lm_needs_first(toy, tmp_path):
    characters, examples, gold = toy
    module = toy_module(characters)

    # the LM target favours the gold setting for every example ...
    module.refresh_index()
    cands = module.candidates(examples)
    assert all(len(row) == 4 for row in cands)  # k = all 4 settings
    lm = module.lm_targets(examples, cands)  # (24, 4)
    best = [module.index.records[cands[i][int(lm[i].argmax())]] for i in range(len(examples))]
    assert all(r.index_in_character == gold[e.character_id] for r, e in zip(best, examples))
    # ... while the untrained retriever does not
    before = gold_rank1_fraction(module, characters, examples, gold)
    assert before <= 0.5
    loss_before = full_loss(module, examples)
    weights_before = {k: v.clone() for k, v in module.encoder.state_dict().items()}

    module.index = None
    trainer = toy_trainer(max_steps=40)
    loader = DataLoader(examples, batch_size=8, shuffle=True, collate_fn=collate_examples)
    trainer.fit(module, train_dataloaders=loader)
    assert trainer.global_step == 40

    after = gold_rank1_fraction(module, characters, examples, gold)
    assert after >= 0.8 and after > before
    assert full_loss(module, examples) < 0.5 * loss_before
    weights_after = module.encoder.state_dict()
    assert any(not torch.equal(weights_before[k], weights_after[k]) for k in weights_before)
    assert all(torch.isfinite(v).all() for v in weights_after.values() if v.is_floating_point())
    # each (example, setting) pair went through the LM once, however many epochs
    assert module.likelihood.uncached.pairs_computed == len(examples) * 4

    trainer.save_checkpoint(tmp_path / "toy.ckpt")
    ckpt = torch.load(tmp_path / "toy.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["state_dict"] and all(k.startswith(("encoder.", "head.")) for k in ckpt["state_dict"])
    assert ckpt["replugchar"]["lm_in_checkpoint"] is False


def test_checkpoint_with_custom_template_loads_weights_only(toy, tmp_path):
    characters, examples, _ = toy
    module = toy_module(characters, template=PromptTemplate(setting_line="Trait: {setting}\n"))
    trainer = toy_trainer(max_steps=1)
    trainer.fit(module, train_dataloaders=DataLoader(examples[:4], batch_size=4, collate_fn=collate_examples))
    trainer.save_checkpoint(tmp_path / "t.ckpt")
    torch.load(tmp_path / "t.ckpt", map_location="cpu", weights_only=True)
    assert LSRModule.load_from_checkpoint(tmp_path / "t.ckpt").template.setting_line == "Trait: {setting}\n"


def test_fit_persists_the_lm_logliks_it_computed(toy, tmp_path):
    characters, examples, _ = toy
    L.seed_everything(0, verbose=False)
    module = LSRModule(
        encoder="tiny:bert",
        k=4,
        lm=LikelihoodOptions(name="tiny:gpt2", loglik_cache_dir=str(tmp_path / "scores")),
    )
    module.characters = characters
    trainer = toy_trainer(max_steps=2)
    trainer.fit(module, train_dataloaders=DataLoader(examples, batch_size=8, collate_fn=collate_examples))
    scored = module.likelihood.uncached.pairs_computed
    assert scored == 2 * 8 * 4
    on_disk = CachedLikelihood(None, tmp_path / "scores", fingerprint=module.likelihood.fingerprint)
    assert len(on_disk) == scored


def test_cli_fit_debug_config_trains_reports_and_exports(tmp_path):
    from sentence_transformers import SentenceTransformer

    from replugchar.retrieval.index import SettingIndex

    run_dir = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}  # cache: set by conftest
    cmd = [
        sys.executable, "-m", "replugchar.cli", "fit", "--config", "configs/debug.yaml",
        "--trainer.default_root_dir", str(run_dir), "--trainer.logger.init_args.save_dir", str(run_dir),
    ]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]

    # the before -> after report
    out = proc.stdout
    assert "validation before -> after training" in out
    for key in ("val/top1_agreement", "val/loss", "val/retriever_entropy", "val/lm_entropy"):
        assert re.search(rf"{re.escape(key)}\s+-?\d+\.\d{{4}} -> -?\d+\.\d{{4}}", out), out
    # ... with the paired change and its interval, so a move within noise reads as such
    for key in ("top1_agreement", "top1_lift"):
        assert re.search(
            rf"change in {key}\s+[+-]\d\.\d{{4}}  95% CI \[[+-]\d\.\d{{4}}, [+-]\d\.\d{{4}}\]", out
        ), out
    export = run_dir / "retriever"
    assert f"exported retriever: {export}" in out
    stored = json.loads((export / "retriever.json").read_text())
    assert stored["split"] == {
        "val_fraction": 0.2,
        "test_fraction": 0.0,
        "seed": 0,
    }  # debug.yaml's data split

    # the export is a plain sentence-transformers folder + an index that belongs to it
    encoder = SentenceTransformer(str(export / "encoder"), device="cpu")
    texts = ["Hello! How are you?", "I love pink floyd."]
    emb = encoder.encode(texts, normalize_embeddings=True, convert_to_numpy=True)
    assert emb.shape == (2, 32)
    index = SettingIndex.load(export, expected_dim=32)
    assert len(index.records) == 80  # 16 demo characters x 5 settings
    setting = index.records[7]
    _, ids = index.search(encoder.encode([setting.text], normalize_embeddings=True), 1)
    assert ids[0, 0] == setting.setting_id
    untrained = load_encoder("tiny:bert").encode(texts, normalize_embeddings=True, convert_to_numpy=True)
    assert not np.allclose(emb, untrained, atol=1e-4)  # training changed the encoder

    # the checkpoint: encoder weights only (no LM), loadable without pickle, same embeddings as the export
    ckpts = list(run_dir.rglob("*.ckpt"))
    assert len(ckpts) == 1
    ckpt = torch.load(ckpts[0], map_location="cpu", weights_only=True)
    state = ckpt["state_dict"]
    assert state and all(k.startswith(("encoder.", "head.")) for k in state)
    assert not any(part in k for k in state for part in ("lm_head", "wte", "scorer", "query_encoder"))
    assert ckpt["replugchar"] == {"lm": "tiny:gpt2", "lm_in_checkpoint": False}
    fresh = LSRModule(encoder="tiny:bert", lm=LikelihoodOptions(name="tiny:gpt2", loglik_cache_dir=None))
    assert sum(v.numel() for v in state.values()) == sum(v.numel() for v in fresh.state_dict().values())
    fresh.load_state_dict(state, strict=True)
    np.testing.assert_allclose(fresh.encode_all(texts), emb, atol=1e-5)

    metrics = next(run_dir.rglob("metrics.csv")).read_text().splitlines()[0].split(",")
    assert {"train/loss_step", "val/loss", "val/top1_agreement", "train/lm_entropy_step"} <= set(metrics)


def test_validation_keeps_per_example_rows_that_match_the_logged_means(toy):
    characters, examples, _ = toy
    module = toy_module(characters)
    trainer = toy_trainer(max_steps=1)
    loader = DataLoader(examples, batch_size=8, collate_fn=collate_examples)
    logged = trainer.validate(module, dataloaders=loader, verbose=False)[0]
    rows = module.val_per_example
    assert rows.shape == (len(examples), 3)
    assert rows[:, 1].mean() == pytest.approx(logged["val/top1_agreement"], abs=1e-6)
    assert rows[:, 2].mean() == pytest.approx(logged["val/top1_lift"], abs=1e-5)
    assert len(np.unique(rows[:, 0])) == len({e.dialogue_id for e in examples})
    first = rows.copy()
    trainer.validate(module, dataloaders=loader, verbose=False)
    np.testing.assert_array_equal(module.val_per_example, first)  # reset per epoch, same order every time
