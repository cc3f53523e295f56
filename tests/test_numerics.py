"""Edge-case numbers never turn into NaN: the LSR loss, its gradient, and the weights a training step leaves."""

from __future__ import annotations

import lightning as L
import numpy as np
import pytest
import torch
from conftest import character, write_jsonl
from torch.utils.data import DataLoader

from replugchar.core.data import Character, DataError, Example, load_characters
from replugchar.lm.likelihood import Logliks
from replugchar.lm.loglik_cache import CachedLikelihood, LikelihoodOptions
from replugchar.training.losses import MIN_TEMPERATURE, LossOptions, LSRLoss
from replugchar.training.optim import OptimizerOptions

pytestmark = pytest.mark.usefixtures("rc_cache")

INF = float("inf")
DIRECTIONS = ["lm_to_retriever", "retriever_to_lm"]
SIM = [[0.9, 0.1, -0.3], [0.2, 0.2, 0.2]]  # (batch=2, k=3) cosine similarities


def loss_and_grad(lm, *, gamma=0.05, beta=0.1, direction="lm_to_retriever", sim=SIM, mask=None):
    sim = torch.tensor(sim, requires_grad=True)
    loss = LSRLoss(gamma, beta, direction)(
        sim, torch.tensor(lm), None if mask is None else torch.tensor(mask)
    )
    loss.backward()
    return loss, sim.grad


def assert_finite(loss, grad):
    assert torch.isfinite(loss).all(), loss
    assert torch.isfinite(grad).all(), grad


@pytest.mark.parametrize("direction", DIRECTIONS)
@pytest.mark.parametrize(
    ("lm", "gamma", "beta"),
    [
        ([[-1.0, -1.0, -1.0]] * 2, 0.05, 0.1),  # all-equal LM log-likelihoods: a flat target
        ([[-1.0, -INF, -2.0], [-INF, -3.0, -3.0]], 0.05, 0.1),  # one candidate the LM cannot produce
        ([[-INF, -INF, -INF], [-1.0, -2.0, -3.0]], 0.05, 0.1),  # a row with no finite candidate
        ([[-1.0, -2.0, -3.0]] * 2, 1e-4, 1e-4),  # very sharp temperatures
        ([[-1.0, -2.0, -3.0]] * 2, 1e30, 1e30),  # huge temperatures: both distributions uniform
        ([[-1e4, -2e4, -3e4]] * 2, 0.05, 0.1),  # summed log-likelihoods of long responses
    ],
    ids=["all-equal", "one-neg-inf", "row-all-neg-inf", "tiny-temps", "huge-temps", "large-sums"],
)
def test_loss_and_gradient_stay_finite(lm, gamma, beta, direction):
    loss, grad = loss_and_grad(lm, gamma=gamma, beta=beta, direction=direction)
    assert_finite(loss, grad)
    assert loss >= -1e-6  # a KL divergence


@pytest.mark.parametrize("direction", DIRECTIONS)
def test_all_candidates_neg_inf_gives_zero_loss_and_zero_gradient(direction):
    loss, grad = loss_and_grad([[-INF] * 3] * 2, direction=direction)
    assert loss.item() == 0.0 and torch.count_nonzero(grad) == 0


@pytest.mark.parametrize("direction", DIRECTIONS)
def test_single_candidate_has_nothing_to_learn(direction):
    loss, grad = loss_and_grad([[-2.0], [-5.0]], sim=[[0.3], [-0.9]], direction=direction)
    assert loss.item() == pytest.approx(0.0, abs=1e-6) and grad.abs().max() < 1e-6


@pytest.mark.parametrize("direction", DIRECTIONS)
def test_masked_padding_gets_no_gradient(direction):
    mask = [[True, True, False], [True, False, False]]
    lm = [[-1.0, -2.0, -INF], [-1.0, -INF, -INF]]
    loss, grad = loss_and_grad(lm, mask=mask, direction=direction)
    assert_finite(loss, grad)
    assert grad[0, 2] == 0 and grad[1, 1:].abs().sum() == 0


def test_equal_lm_logliks_pull_the_retriever_to_uniform():
    # a flat LM target is still a target: the gradient pushes the favoured candidate down
    loss, grad = loss_and_grad([[-1.0, -1.0, -1.0]], sim=[[0.9, 0.1, -0.3]])
    assert loss > 0 and grad[0, 0] > 0 and grad[0, 2] < 0


def test_nan_scores_are_a_clear_error():
    with pytest.raises(FloatingPointError, match="NaN"):
        loss_and_grad([[-1.0, float("nan"), -2.0]] * 2)


@pytest.mark.parametrize("direction", DIRECTIONS)
@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("gamma", 1e-45),  # sim / 1e-45 overflows float32 for any similarity above 3.4e-7
        ("beta", 1e-45),
        ("gamma", MIN_TEMPERATURE / 2),  # just under the floor
        ("beta", MIN_TEMPERATURE * (1 - 1e-6)),
        ("gamma", 0.0),
        ("beta", -0.1),
        ("gamma", INF),
        ("beta", float("nan")),
    ],
    ids=["gamma-1e-45", "beta-1e-45", "gamma-half-min", "beta-just-under-min", "gamma-0", "beta-neg", "gamma-inf",
         "beta-nan"],
)  # fmt: skip
def test_temperature_below_the_floor_is_rejected(option, value, direction):
    """LSRLoss refuses a temperature below MIN_TEMPERATURE (or not finite) at construction, naming the option."""
    with pytest.raises(
        ValueError, match=rf"^{option} must be a finite number >= {MIN_TEMPERATURE}, got {value}$"
    ):
        LSRLoss(**{option: value}, direction=direction)


@pytest.mark.parametrize("direction", DIRECTIONS)
@pytest.mark.parametrize(
    ("lm", "gamma", "beta"),
    [
        ([[-1.0, -2.0, -3.0]] * 2, MIN_TEMPERATURE, MIN_TEMPERATURE),  # the floor itself is accepted
        ([[-1e38] * 3] * 2, 0.05, 0.1),  # float32-scale log-likelihoods: row-centring keeps them finite
        ([[-1.0, -3e38, -2.0]] * 2, 0.05, 0.1),  # one float32-scale score next to ordinary ones
        ([[-1.0, -3e38, -2.0]] * 2, MIN_TEMPERATURE, MIN_TEMPERATURE),
    ],
    ids=["at-floor", "logp-1e38", "one-logp-3e38", "one-logp-3e38-at-floor"],
)
def test_temperatures_at_or_above_the_floor_give_finite_loss_and_gradient(lm, gamma, beta, direction):
    """At or above MIN_TEMPERATURE, and for any finite (or -inf) LM log-likelihoods, loss and gradient are finite."""
    loss, grad = loss_and_grad(lm, gamma=gamma, beta=beta, direction=direction)
    assert_finite(loss, grad)
    assert loss >= -1e-6  # a KL divergence


def test_positive_inf_lm_loglik_is_an_error():
    with pytest.raises(FloatingPointError):
        loss_and_grad([[INF, -1.0, -2.0]] * 2)


# ----------------------------------------------------------------------------------------------- data
def test_character_whose_settings_are_all_duplicates_is_rejected(tmp_path):
    path = write_jsonl(
        tmp_path / "characters.jsonl",
        [character("ok"), character("echo", settings=["I sing.", "I sing.", "I  sing. "])],
    )
    with pytest.raises(
        DataError,
        match=r"characters\.jsonl:2: character 'echo' has duplicate settings: "
        r"'settings\[1\]' repeats 'settings\[0\]'",
    ):
        load_characters(path)


# ----------------------------------------------------------------------------------------------- training
class RuleLM:
    """A stand-in frozen LM whose score depends on the response text, to build edge-case targets."""

    fingerprint = "rule-lm"

    def loglik(self, requests) -> Logliks:
        out = []
        for r in requests:
            mode, setting = r.example.response, r.settings[0] if r.settings else ""
            if mode == "equal":
                out.append(-1.0)
            elif mode == "all-neg-inf":
                out.append(-INF)
            elif mode == "one-neg-inf":
                out.append(-INF if setting.endswith("0.") else -2.0)
            elif mode == "huge":
                out.append(-3e4 if setting.endswith("1.") else -1e4)
            else:
                out.append(-float(len(setting) % 7))
        return Logliks(np.array(out, dtype=np.float64), np.full(len(out), 5, dtype=np.int64))


def _examples() -> list[list[Example]]:
    def ex(i, cid, mode, query="Hello there, how are you?"):
        return Example(f"e{i}", cid, f"d{i}", query=query, response=mode)

    return [
        [ex(0, "solo", "normal"), ex(1, "solo", "equal")],  # one setting: a single candidate
        [ex(2, "many", "equal"), ex(3, "many", "equal")],  # flat target
        [ex(4, "many", "all-neg-inf"), ex(5, "many", "all-neg-inf")],  # nothing finite in the batch
        [ex(6, "many", "one-neg-inf"), ex(7, "pair", "huge")],
        [ex(8, "many", "normal", query="I am trait 0."), ex(8, "many", "normal", query="I am trait 0.")],
        [ex(9, "pair", "normal", query="x")],  # a one-byte query and a batch of one
    ]


class Record(L.Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(outputs["loss"]))


@pytest.mark.parametrize("direction", DIRECTIONS)
def test_training_on_edge_batches_never_makes_nan_weights(direction):
    from replugchar.training.module import LSRModule

    module = LSRModule(
        encoder="tiny:bert",
        k=3,
        refresh_every=1,
        lm=LikelihoodOptions(name="tiny:gpt2", loglik_cache_dir=None),
        loss=LossOptions(gamma=0.01, beta=0.05, direction=direction),
        optimizer=OptimizerOptions(learning_rate=5e-2),
    )
    module.characters = {
        "solo": Character("solo", ("I am trait 0.",)),
        "pair": Character("pair", ("I am trait 0.", "I am trait 1.")),
        "many": Character("many", tuple(f"I am trait {i}." for i in range(5))),
    }
    module.set_likelihood(CachedLikelihood(RuleLM(), fingerprint=RuleLM.fingerprint))
    before = {k: v.clone() for k, v in module.state_dict().items()}
    batches = _examples()
    record = Record()
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=len(batches),
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        callbacks=[record],
    )
    trainer.fit(module, train_dataloaders=DataLoader(batches, batch_size=None, collate_fn=list))
    assert trainer.global_step == len(batches)
    assert len(record.losses) == len(batches) and all(np.isfinite(record.losses))
    assert record.losses[2] == 0.0  # the all -inf batch contributes nothing
    after = module.state_dict()
    assert all(torch.isfinite(v).all() for v in after.values() if v.is_floating_point())
    assert any(not torch.equal(before[k], after[k]) for k in after)  # it did train
    emb = module.encode_all(["hello", "I am trait 0."])
    assert np.isfinite(emb).all() and np.allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-4)
