"""KD losses against direct formulas: chunked equals unchunked, values and gradients."""

import math

import pytest
import torch
import torch.nn.functional as F

from titans_distil.losses import DenseTeacher, TopKTeacher, distillation_loss

N, H, V = 37, 16, 50


@pytest.fixture
def case():
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(N, H, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(V, H, generator=g, dtype=torch.float64, requires_grad=True)
    teacher_hidden = torch.randn(N, H, generator=g, dtype=torch.float64)
    teacher_weight = torch.randn(V, H, generator=g, dtype=torch.float64)
    labels = torch.randint(0, V, (N,), generator=g)
    labels[[3, 10]] = -100
    return hidden, weight, teacher_hidden, teacher_weight, labels


def direct_loss(hidden, weight, teacher_hidden, teacher_weight, labels, kind, temperature, alpha):
    """Reference: full logits of both models, divergences written out with F.kl_div."""
    s = F.log_softmax(hidden @ weight.T / temperature, -1)
    t = F.log_softmax(teacher_hidden @ teacher_weight.T / temperature, -1)
    if kind == "kl":
        per_token = F.kl_div(s, t, log_target=True, reduction="none").sum(-1)
    elif kind == "rkl":
        per_token = F.kl_div(t, s, log_target=True, reduction="none").sum(-1)
    else:
        m = ((s.exp() + t.exp()) / 2).log()
        per_token = 0.5 * F.kl_div(m, t, log_target=True, reduction="none").sum(-1) + 0.5 * F.kl_div(
            m, s, log_target=True, reduction="none"
        ).sum(-1)
    mask = labels != -100
    kd = per_token[mask].mean()
    ce = F.cross_entropy(hidden @ weight.T, labels, ignore_index=-100)
    return alpha * temperature**2 * kd + (1 - alpha) * ce, kd, ce


@pytest.mark.parametrize("kind", ["kl", "rkl", "jsd"])
@pytest.mark.parametrize("chunk_size", [1, 8, 1000])
def test_chunked_equals_direct_formula(case, kind, chunk_size):
    hidden, weight, th, tw, labels = case
    temperature, alpha = 2.0, 0.7
    ref, ref_kd, ref_ce = direct_loss(hidden, weight, th, tw, labels, kind, temperature, alpha)
    ref_grads = torch.autograd.grad(ref, (hidden, weight))
    loss, kd, ce = distillation_loss(
        hidden,
        weight,
        labels,
        DenseTeacher(th, tw),
        kind=kind,
        temperature=temperature,
        alpha=alpha,
        chunk_size=chunk_size,
    )
    grads = torch.autograd.grad(loss * 3.0, (hidden, weight))  # upstream gradient scales through
    torch.testing.assert_close(loss, ref.float(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(kd, ref_kd.float(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ce, ref_ce.float(), rtol=1e-6, atol=1e-6)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, 3.0 * want, rtol=1e-5, atol=1e-7)


def test_kl_of_identical_models_is_zero_and_ce_only_ignores_teacher(case):
    hidden, weight, _, _, labels = case
    loss, kd, _ = distillation_loss(
        hidden, weight, labels, DenseTeacher(hidden.detach(), weight.detach()), kind="kl", alpha=1.0
    )
    assert abs(kd.item()) < 1e-6 and abs(loss.item()) < 1e-6
    loss, kd, ce = distillation_loss(hidden, weight, labels, None, alpha=0.0)
    assert kd.item() == 0.0
    torch.testing.assert_close(
        loss, F.cross_entropy((hidden @ weight.T).float(), labels, ignore_index=-100).float()
    )


def test_topk_teacher_with_full_k_equals_dense_kl(case):
    hidden, weight, th, tw, labels = case
    teacher_logits = th @ tw.T
    values, indices = teacher_logits.topk(V, dim=-1)
    dense = distillation_loss(hidden, weight, labels, DenseTeacher(th, tw), kind="kl", temperature=1.5)[0]
    topk = distillation_loss(
        hidden, weight, labels, TopKTeacher(values, indices), kind="kl", temperature=1.5, chunk_size=5
    )[0]
    torch.testing.assert_close(topk, dense)
    truncated = distillation_loss(
        hidden, weight, labels, TopKTeacher(*teacher_logits.topk(5, dim=-1)), kind="kl"
    )[0]
    assert math.isfinite(truncated.item()) and truncated.item() != dense.item()


def test_topk_teacher_refuses_other_divergences(case):
    hidden, weight, th, tw, labels = case
    values, indices = (th @ tw.T).topk(4, dim=-1)
    with pytest.raises(ValueError, match="a top-k teacher cache supports only --loss kl"):
        distillation_loss(hidden, weight, labels, TopKTeacher(values, indices), kind="jsd")
    with pytest.raises(ValueError, match="unknown KD loss 'mse'"):
        distillation_loss(hidden, weight, labels, None, kind="mse")


@pytest.mark.parametrize("chunk_size", [1, 8, 1000])
def test_position_weights_weight_the_loss_but_not_the_reported_means(case, chunk_size):
    hidden, weight, th, tw, labels = case
    temperature, alpha = 1.5, 0.8
    w = torch.ones(N, dtype=torch.float64)
    w[[0, 3, 20, 21]] = 10.0  # position 3's label is ignored: its weight must not count
    s = F.log_softmax(hidden @ weight.T / temperature, -1)
    t = F.log_softmax(th @ tw.T / temperature, -1)
    per_kd = F.kl_div(s, t, log_target=True, reduction="none").sum(-1)
    per_ce = F.cross_entropy(hidden @ weight.T, labels, ignore_index=-100, reduction="none")
    mask = labels != -100
    ref = ((alpha * temperature**2 * per_kd + (1 - alpha) * per_ce) * w)[mask].sum() / w[mask].sum()
    ref_grads = torch.autograd.grad(ref, (hidden, weight))
    loss, kd, ce = distillation_loss(
        hidden,
        weight,
        labels,
        DenseTeacher(th, tw),
        kind="kl",
        temperature=temperature,
        alpha=alpha,
        chunk_size=chunk_size,
        weights=w,
    )
    torch.testing.assert_close(loss, ref.float(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(kd, per_kd[mask].mean().float(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ce, per_ce[mask].mean().float(), rtol=1e-6, atol=1e-6)
    for got, want in zip(torch.autograd.grad(loss, (hidden, weight)), ref_grads):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
    ones = distillation_loss(hidden, weight, labels, DenseTeacher(th, tw), weights=torch.ones(N))[0]
    torch.testing.assert_close(ones, distillation_loss(hidden, weight, labels, DenseTeacher(th, tw))[0])
    with pytest.raises(ValueError, match="weights have shape"):
        distillation_loss(hidden, weight, labels, None, weights=torch.ones(N + 1))
