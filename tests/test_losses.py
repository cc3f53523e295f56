"""LSRLoss: values by hand in both KL directions, batchmean, the pin against sentence-transformers, gradients,
masks, -inf LM log-likelihoods and argument validation."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from replugchar.training.losses import LSRLoss, entropy

GAMMA, BETA = 0.5, 0.8
SIM = [[0.9, 0.1, -0.3], [0.2, 0.5, 0.4]]  # (batch=2, k=3) retriever similarities
LM = [[-1.0, -2.5, -0.7], [-3.0, -1.0, -1.2]]  # (2, 3) LM log-likelihoods of the gold response


def softmax(xs: list[float], t: float) -> list[float]:
    z = [x / t for x in xs]
    m = max(z)
    e = [math.exp(v - m) for v in z]
    return [v / sum(e) for v in e]


def kl(p: list[float], q: list[float]) -> float:
    """KL(p || q) = sum_i p_i log(p_i / q_i), with 0 log 0 = 0."""
    return sum(pi * (math.log(pi) - math.log(qi)) for pi, qi in zip(p, q) if pi > 0)


def expected(sim_rows, lm_rows, direction: str, gamma: float = GAMMA, beta: float = BETA) -> float:
    per_query = []
    for sim, lm in zip(sim_rows, lm_rows):
        p_r, q = softmax(sim, gamma), softmax(lm, beta)
        per_query.append(kl(q, p_r) if direction == "lm_to_retriever" else kl(p_r, q))
    return sum(per_query) / len(per_query)  # sum over candidates, mean over queries


@pytest.mark.parametrize("direction", ["lm_to_retriever", "retriever_to_lm"])
def test_value_matches_hand_computed_kl(direction):
    loss = LSRLoss(gamma=GAMMA, beta=BETA, direction=direction)(torch.tensor(SIM), torch.tensor(LM))
    assert loss.item() == pytest.approx(expected(SIM, LM, direction), rel=1e-5)
    other = "retriever_to_lm" if direction == "lm_to_retriever" else "lm_to_retriever"
    assert abs(loss.item() - expected(SIM, LM, other)) > 1e-3  # the two directions really differ here


def test_default_direction_is_kl_of_lm_target_to_retriever():
    assert LSRLoss().direction == "lm_to_retriever"
    loss = LSRLoss(gamma=GAMMA, beta=BETA)(torch.tensor(SIM), torch.tensor(LM))
    assert loss.item() == pytest.approx(expected(SIM, LM, "lm_to_retriever"), rel=1e-5)


def test_reduction_is_batchmean_not_elementwise_mean():
    sim, lm = torch.tensor(SIM), torch.tensor(LM)
    loss = LSRLoss(gamma=GAMMA, beta=BETA)(sim, lm)
    log_pr = torch.log_softmax(sim / GAMMA, -1)
    q = torch.softmax(lm / BETA, -1)
    batchmean = F.kl_div(log_pr, q, reduction="batchmean")
    elementwise = (q * (q.log() - log_pr)).mean()  # reduction="mean": divides by batch * k
    assert loss.item() == pytest.approx(batchmean.item(), rel=1e-5)
    assert loss.item() == pytest.approx(3 * elementwise.item(), rel=1e-5)
    # one query alone gives its own KL, not KL/k, and duplicating the batch leaves the value unchanged
    one = LSRLoss(gamma=GAMMA, beta=BETA)(sim[:1], lm[:1])
    assert one.item() == pytest.approx(expected(SIM[:1], LM[:1], "lm_to_retriever"), rel=1e-5)
    doubled = LSRLoss(gamma=GAMMA, beta=BETA)(sim.repeat(2, 1), lm.repeat(2, 1))
    assert doubled.item() == pytest.approx(loss.item(), rel=1e-5)


def test_default_direction_equals_sentence_transformers_distill_kl_div_over_gamma_squared():
    from sentence_transformers.sentence_transformer.losses import DistillKLDivLoss

    gamma, beta, batch, k, dim = 0.05, 0.1, 4, 5, 8
    gen = torch.Generator().manual_seed(0)
    query = F.normalize(torch.randn(batch, dim, generator=gen), dim=-1)
    cands = [F.normalize(torch.randn(batch, dim, generator=gen), dim=-1) for _ in range(k)]
    labels = -torch.rand(batch, k, generator=gen) * 0.5 - 1.0  # mean log-likelihoods, spread 0.5 nats

    def cosine(a, b):
        return (F.normalize(a, dim=-1) * F.normalize(b, dim=-1)).sum(-1)

    theirs_q = query.clone().requires_grad_(True)
    theirs = DistillKLDivLoss(
        None, similarity_fct=cosine, student_temperature=gamma, teacher_temperature=beta
    ).compute_loss_from_embeddings([theirs_q, *cands], labels)
    theirs.backward()

    ours_q = query.clone().requires_grad_(True)
    sim = torch.stack([cosine(ours_q, c) for c in cands], dim=1)  # (batch, k)
    ours = LSRLoss(gamma=gamma, beta=beta)(sim, labels)
    ours.backward()

    assert ours.item() > 1e-3  # a non-trivial value, not 0 == 0
    assert theirs.item() == pytest.approx(ours.item() * gamma**2, rel=1e-4)
    torch.testing.assert_close(theirs_q.grad, ours_q.grad * gamma**2, rtol=1e-4, atol=1e-7)


def test_gradient_reaches_sim_only_and_equals_p_r_minus_q_over_gamma_per_query():
    sim = torch.tensor(SIM, requires_grad=True)
    lm = torch.tensor(LM, requires_grad=True)
    LSRLoss(gamma=GAMMA, beta=BETA)(sim, lm).backward()
    assert lm.grad is None or torch.count_nonzero(lm.grad) == 0  # Q is a constant: the LM gets nothing
    p_r = torch.tensor([softmax(row, GAMMA) for row in SIM])
    q = torch.tensor([softmax(row, BETA) for row in LM])
    torch.testing.assert_close(sim.grad, (p_r - q) / GAMMA / len(SIM), rtol=1e-4, atol=1e-6)


def test_mask_drops_padding_candidates():
    # row 0 has only 2 real candidates; the padded slot holds a huge similarity that must not matter
    sim = torch.tensor([[0.9, 0.1, 50.0], [0.2, 0.5, 0.4]], requires_grad=True)
    lm = torch.tensor([[-1.0, -2.5, 3.0], [-3.0, -1.0, -1.2]])
    mask = torch.tensor([[True, True, False], [True, True, True]])
    want = expected([[0.9, 0.1], SIM[1]], [[-1.0, -2.5], LM[1]], "lm_to_retriever")
    loss = LSRLoss(gamma=GAMMA, beta=BETA)(sim, lm, mask)
    assert loss.item() == pytest.approx(want, rel=1e-5)
    loss.backward()
    assert sim.grad[0, 2].item() == 0.0
    assert torch.isfinite(sim.grad).all()

    back = LSRLoss(gamma=GAMMA, beta=BETA, direction="retriever_to_lm")(sim.detach(), lm, mask)
    want_back = expected([[0.9, 0.1], SIM[1]], [[-1.0, -2.5], LM[1]], "retriever_to_lm")
    assert back.item() == pytest.approx(want_back, rel=1e-5)


def test_minus_inf_lm_loglik_gets_zero_target_mass():
    lm = torch.tensor([[-1.0, float("-inf"), -0.7], LM[1]])
    sim = torch.tensor(SIM, requires_grad=True)
    # KL(Q||P_R): Q = 0 on the impossible candidate, P_R still spreads over all three
    q0 = softmax([-1.0, -0.7], BETA)
    p0 = softmax(SIM[0], GAMMA)
    row0 = q0[0] * math.log(q0[0] / p0[0]) + q0[1] * math.log(q0[1] / p0[2])
    row1 = kl(softmax(LM[1], BETA), softmax(SIM[1], GAMMA))
    loss = LSRLoss(gamma=GAMMA, beta=BETA)(sim, lm)
    assert loss.item() == pytest.approx((row0 + row1) / 2, rel=1e-5)
    loss.backward()
    assert torch.isfinite(sim.grad).all()
    assert sim.grad[0, 1].item() == pytest.approx(p0[1] / GAMMA / 2, rel=1e-4)  # pushed down by P_R alone

    # KL(P_R||Q): the candidate leaves both distributions
    back = LSRLoss(gamma=GAMMA, beta=BETA, direction="retriever_to_lm")(sim.detach(), lm)
    row0_back = kl(softmax([0.9, -0.3], GAMMA), q0)
    assert back.item() == pytest.approx(
        (row0_back + kl(softmax(SIM[1], GAMMA), softmax(LM[1], BETA))) / 2, rel=1e-5
    )


@pytest.mark.parametrize("direction", ["lm_to_retriever", "retriever_to_lm"])
def test_row_without_finite_lm_loglik_is_left_out_of_the_mean(direction):
    inf = float("-inf")
    sim = torch.tensor(SIM, requires_grad=True)
    lm = torch.tensor([[inf, inf, inf], LM[1]])
    loss = LSRLoss(gamma=GAMMA, beta=BETA, direction=direction)(sim, lm)
    assert loss.item() == pytest.approx(expected(SIM[1:], LM[1:], direction), rel=1e-5)  # divided by 1, not 2
    loss.backward()
    assert torch.isfinite(sim.grad).all() and torch.count_nonzero(sim.grad[0]) == 0

    none_valid = LSRLoss(direction=direction)(sim, torch.full((2, 3), inf))
    assert none_valid.item() == 0.0 and none_valid.requires_grad


@pytest.mark.parametrize("direction", ["lm_to_retriever", "retriever_to_lm"])
def test_all_equal_scores_give_zero_and_finite_gradients(direction):
    sim = torch.full((2, 4), 0.3, requires_grad=True)
    lm = torch.full((2, 4), -700.0)  # very negative but equal: softmax must not underflow to NaN
    loss = LSRLoss(gamma=0.01, beta=0.01, direction=direction)(sim, lm)
    assert torch.isfinite(loss) and loss.item() == pytest.approx(0.0, abs=1e-6)
    loss.backward()
    assert torch.isfinite(sim.grad).all()
    assert sim.grad.abs().max().item() < 1e-5


def test_nan_scores_raise():
    loss = LSRLoss()
    with pytest.raises(FloatingPointError, match="NaN"):
        loss(torch.tensor(SIM), torch.tensor([[-1.0, float("nan"), -0.7], LM[1]]))
    with pytest.raises(FloatingPointError, match="NaN"):
        loss(torch.tensor([[0.9, float("nan"), -0.3], SIM[1]]), torch.tensor(LM))


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"gamma": 0.0}, "gamma"),
        ({"gamma": -0.1}, "gamma"),
        ({"gamma": float("inf")}, "gamma"),
        ({"gamma": float("nan")}, "gamma"),
        ({"beta": 0.0}, "beta"),
        ({"beta": float("inf")}, "beta"),
        ({"direction": "forward"}, "direction"),
    ],
)
def test_invalid_arguments_raise_value_error_naming_them(kwargs, name):
    with pytest.raises(ValueError, match=name):
        LSRLoss(**kwargs)


def test_entropy_of_distributions_with_impossible_candidates():
    log_p = torch.log(torch.tensor([[0.5, 0.5, 0.0], [1 / 3, 1 / 3, 1 / 3]]))
    torch.testing.assert_close(entropy(log_p), torch.tensor([math.log(2), math.log(3)]))
