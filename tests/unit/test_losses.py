"""The seven losses against the paper's definitions, and the properties that make its point.

References are written here from the definitions in plain numpy (float64, loops where that is
clearer); gradients are checked against central finite differences of those references.
"""
import dataclasses
import math

import numpy as np
import pytest
import torch

from slc.nn.losses import LOSSES, POLS_ALIGNED, make_loss
from tests.conftest import repo_params

CFG = dataclasses.replace(repo_params().train, margin=1.0, self_norm_alpha=0.1,
                          nce_noise_samples=7, nce_noise="uniform")
NON_ALIGNED = set(LOSSES) - POLS_ALIGNED


def logsumexp(v: np.ndarray) -> float:
    top = v.max()
    return float(top + np.log(np.exp(v - top).sum()))


def log_sigmoid(s: float) -> float:
    return -float(np.logaddexp(0.0, -s))


def ref_ce(z, y, **_):
    return np.mean([logsumexp(z[i]) - z[i, y[i]] for i in range(len(y))])


def ref_max_margin(z, y, margin, **_):
    terms = []
    for i in range(len(y)):
        rival = max(z[i, j] for j in range(z.shape[1]) if j != y[i])
        terms.append(max(0.0, margin - z[i, y[i]] + rival))
    return np.mean(terms)


def ref_bce(z, y, **_):
    total = 0.0
    for i in range(len(y)):
        for j in range(z.shape[1]):
            total -= log_sigmoid(z[i, j]) if j == y[i] else log_sigmoid(-z[i, j])
    return total / len(y)


def ref_self_norm(z, y, alpha, **_):
    return ref_ce(z, y) + alpha * np.mean([logsumexp(z[i]) ** 2 for i in range(len(y))])


def ref_nce(z, y, noise, log_nq, **_):
    terms = []
    for i in range(len(y)):
        term = -log_sigmoid(z[i, y[i]] - log_nq[y[i]])
        for j in noise[i]:
            term -= log_sigmoid(-(z[i, j] - log_nq[j]))
        terms.append(term)
    return np.mean(terms)


def ref_batch_ce(z, y, **_):
    """KL(P_B || Q_B) straight from its definition: P_B is 1/m on each (i, y_i), Q_B a softmax over all."""
    m = len(y)
    log_q = z - logsumexp(z.ravel())
    return sum((1 / m) * (math.log(1 / m) - log_q[i, y[i]]) for i in range(m))


def ref_batch_max_margin(z, y, margin, **_):
    m, k = z.shape
    min_true = min(z[i, y[i]] for i in range(m))
    max_false = max(z[i, j] for i in range(m) for j in range(k) if j != y[i])
    return ref_max_margin(z, y, margin) + max(0.0, margin - min_true + max_false) / m


REFERENCES = {"ce": ref_ce, "max_margin": ref_max_margin, "bce": ref_bce, "self_norm": ref_self_norm,
              "nce": ref_nce, "batch_ce": ref_batch_ce, "batch_max_margin": ref_batch_max_margin}


def seeded(seed=0):
    return torch.Generator().manual_seed(seed)


def bound(name, cfg=CFG, class_counts=None, seed=0):
    """The loss with a generator seeded the same for every call, so nce draws the same noise."""
    return lambda z, y: make_loss(name, cfg, class_counts, seeded(seed))(z, y)


def nce_noise_like_the_loss(cfg, m, k, class_counts=None, seed=0):
    """The noise nce draws from its generator: uniform randint, or multinomial over smoothed counts."""
    n = cfg.nce_noise_samples
    if class_counts is None:
        return torch.randint(k, (m, n), generator=seeded(seed)).numpy(), np.full(k, math.log(n / k))
    q = (class_counts + 1.0) / (class_counts + 1.0).sum()
    draws = torch.multinomial(torch.tensor(q, dtype=torch.float32), m * n, replacement=True,
                              generator=seeded(seed)).view(m, n)
    return draws.numpy(), np.log(n * q)


def reference(name, z, y, cfg=CFG, class_counts=None):
    noise, log_nq = nce_noise_like_the_loss(cfg, *z.shape, class_counts)
    return REFERENCES[name](z, y, margin=cfg.margin, alpha=cfg.self_norm_alpha, noise=noise, log_nq=log_nq)


def random_batch(m=6, k=5, scale=2.0, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(0, scale, size=(m, k)), rng.integers(0, k, size=m)


def finite_difference_grad(f, z, h=1e-6):
    grad = np.zeros_like(z)
    for index in np.ndindex(z.shape):
        step = np.zeros_like(z)
        step[index] = h
        grad[index] = (f(z + step) - f(z - step)) / (2 * h)
    return grad


def test_the_registry_holds_the_seven_losses_of_the_paper():
    assert set(LOSSES) == {"ce", "max_margin", "bce", "self_norm", "nce", "batch_ce", "batch_max_margin"}
    assert POLS_ALIGNED == {"bce", "self_norm", "nce", "batch_ce", "batch_max_margin"}


@pytest.mark.parametrize("name", sorted(LOSSES))
@pytest.mark.parametrize("seed", [0, 1])
def test_value_and_gradient_match_the_definition(name, seed):
    z, y = random_batch(seed=seed)
    logits = torch.tensor(z, requires_grad=True)
    value = bound(name)(logits, torch.tensor(y))
    value.backward()
    assert value.ndim == 0
    assert value.item() == pytest.approx(reference(name, z, y), abs=1e-5)
    expected = finite_difference_grad(lambda v: reference(name, v, y), z)
    np.testing.assert_allclose(logits.grad.numpy(), expected, atol=1e-5)


def test_nce_with_frequency_noise_matches_the_definition():
    cfg = dataclasses.replace(CFG, nce_noise="frequency")
    counts = np.array([50.0, 5.0, 20.0, 0.0, 10.0])
    z, y = random_batch()
    value = bound("nce", cfg, counts)(torch.tensor(z), torch.tensor(y))
    assert value.item() == pytest.approx(reference("nce", z, y, cfg, counts), abs=1e-5)


def test_nce_frequency_noise_without_class_counts_says_how_to_fix_it():
    with pytest.raises(ValueError, match="class_counts"):
        make_loss("nce", dataclasses.replace(CFG, nce_noise="frequency"))


def test_nce_draws_its_noise_from_the_given_generator():
    z, y = (torch.tensor(a) for a in random_batch())
    same = [make_loss("nce", CFG, generator=seeded(3))(z, y) for _ in range(2)]
    other = make_loss("nce", CFG, generator=seeded(4))(z, y)
    assert same[0] == same[1] != other


def test_hyper_parameters_come_from_the_train_config():
    z, y = (torch.tensor(a) for a in random_batch())
    for name, key in [("max_margin", "margin"), ("batch_max_margin", "margin"), ("self_norm", "self_norm_alpha")]:
        changed = dataclasses.replace(CFG, **{key: getattr(CFG, key) * 3})
        assert make_loss(name, CFG)(z, y) != make_loss(name, changed)(z, y)


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_only_the_non_aligned_losses_ignore_a_per_example_shift(name):
    """Adding c_i to every logit of example i: ce and max_margin cannot see it, the aligned losses do."""
    z, y = (torch.tensor(a) for a in random_batch())
    shift = torch.tensor(np.random.default_rng(1).normal(0, 3, size=(z.shape[0], 1)))
    loss = bound(name)
    unchanged = torch.isclose(loss(z, y), loss(z + shift, y), rtol=0, atol=1e-9).item()
    assert unchanged == (name in NON_ALIGNED)


def optimise_free_logits(name, m=40, k=5, steps=1000, lr=0.1):
    """Adam on a table of logits (no network), starting from large per-example shifts.

    A per-example shift does not change ce or max_margin, so nothing in them undoes it and the
    rows stay apart; an aligned loss must pull all true logits above all false logits.
    """
    rng = np.random.default_rng(0)
    y = torch.tensor(rng.integers(0, k, size=m))
    init = rng.normal(0, 1, size=(m, k)) + rng.normal(0, 10, size=(m, 1))
    z = torch.tensor(init, requires_grad=True)
    loss = make_loss(name, CFG, generator=seeded())
    optimiser = torch.optim.Adam([z], lr=lr)
    for _ in range(steps):
        optimiser.zero_grad()
        loss(z, y).backward()
        optimiser.step()
    return z.detach(), y


def logit_separation(z, y) -> float:
    """min over true logits minus max over false logits, across the whole set (> 0: PoLS holds)."""
    true = torch.zeros_like(z, dtype=torch.bool)
    true[torch.arange(len(y)), y] = True
    return (z[true].min() - z[~true].max()).item()


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_aligned_losses_separate_every_true_logit_from_every_false_logit(name):
    z, y = optimise_free_logits(name)
    assert (z.argmax(dim=1) == y).all(), "every example classified correctly, whatever the loss"
    assert (logit_separation(z, y) > 0) == (name in POLS_ALIGNED)


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_huge_logits_give_a_finite_loss_and_gradient(name):
    rng = np.random.default_rng(0)
    z = torch.tensor(rng.choice([-1e4, 1e4], size=(64, 10)) * rng.uniform(0.5, 1, size=(64, 10)),
                     dtype=torch.float32, requires_grad=True)
    value = bound(name)(z, torch.tensor(rng.integers(0, 10, size=64)))
    value.backward()
    assert torch.isfinite(value) and torch.isfinite(z.grad).all()


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_a_batch_of_4096_examples_over_1000_classes_is_finite(name):
    generator = torch.Generator().manual_seed(0)
    z = (torch.randn(4096, 1000, generator=generator) * 30).requires_grad_()
    value = bound(name)(z, torch.randint(1000, (4096,), generator=generator))
    value.backward()
    assert torch.isfinite(value) and torch.isfinite(z.grad).all()
