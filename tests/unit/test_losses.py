"""The losses against their papers' definitions, and the properties that make the paper's point.

References are written here from the definitions in plain numpy (float64, loops where that is
clearer); gradients are checked against central finite differences of those references.
"""
import dataclasses
import itertools
import math

import numpy as np
import pytest
import torch

from slc.nn.losses import LOSSES, PAPER_LOSSES, POLS_ALIGNED, make_loss
from tests.conftest import repo_params

CFG = dataclasses.replace(repo_params().train, margin=1.0, self_norm_alpha=0.1,
                          nce_noise_samples=7, nce_noise="uniform")
NON_ALIGNED = set(LOSSES) - POLS_ALIGNED
# ArcFace reads its true logit as s cos(theta), so a shift changes the angle it adds its margin to: it is
# non-aligned (a softmax over one example's logits, ce when m = 0) without being shift-invariant.
SHIFT_INVARIANT = NON_ALIGNED - {"arcface"}


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


def softplus(x):
    return float(np.logaddexp(0.0, x))


def ref_z_loss(z, y, **_):
    a, b = CFG.z_loss.a, CFG.z_loss.b
    standardised = [(z[i, y[i]] - z[i].mean()) / z[i].std() for i in range(len(y))]
    return np.mean([softplus(a * (b - t)) / a for t in standardised])


def ref_smooth_topk(z, y, top):
    """Berrada et al.'s eq. 8 by enumerating every k-subset of the classes."""
    alpha, tau = CFG.smooth_topk.alpha, CFG.smooth_topk.tau
    terms = []
    for i in range(len(y)):
        subsets = list(itertools.combinations(range(z.shape[1]), top))
        every = np.array([(alpha * (y[i] not in s) + z[i, list(s)].mean()) / tau for s in subsets])
        with_y = np.array([z[i, list(s)].mean() / tau for s in subsets if y[i] in s])
        terms.append(tau * logsumexp(every) - tau * logsumexp(with_y))
    return np.mean(terms)


def ref_cosface(z, y, **_):
    shifted = z.copy()
    shifted[np.arange(len(y)), y] -= CFG.cosface.scale * CFG.cosface.margin
    return ref_ce(shifted, y)


def ref_arcface(z, y, **_):
    s, m = CFG.arcface.scale, CFG.arcface.margin
    changed = z.copy()
    for i in range(len(y)):
        theta = math.acos(z[i, y[i]] / s)
        changed[i, y[i]] = s * (math.cos(theta + m) if theta + m < math.pi else math.cos(theta) - m * math.sin(m))
    return ref_ce(changed, y)


def ref_sphereface2(z, y, **_):
    s, m, lam = CFG.sphereface2.scale, CFG.sphereface2.margin, CFG.sphereface2.lam
    return np.mean([lam / s * softplus(-(z[i, y[i]] - s * m))
                    + sum((1 - lam) / s * softplus(z[i, j] + s * m) for j in range(z.shape[1]) if j != y[i])
                    for i in range(len(y))])


def ref_uniface(z, y, **_):
    s, m, lam = CFG.uniface.scale, CFG.uniface.margin, CFG.uniface.lam
    return np.mean([softplus(-(z[i, y[i]] - s * m)) + lam * sum(softplus(z[i, j]) for j in range(z.shape[1]) if j != y[i])
                    for i in range(len(y))])


REFERENCES = {"ce": ref_ce, "max_margin": ref_max_margin, "bce": ref_bce, "self_norm": ref_self_norm,
              "nce": ref_nce, "batch_ce": ref_batch_ce, "batch_max_margin": ref_batch_max_margin,
              "z_loss": ref_z_loss, "smooth_top1": lambda z, y, **_: ref_smooth_topk(z, y, 1),
              "smooth_top5": lambda z, y, **_: ref_smooth_topk(z, y, 5), "cosface": ref_cosface,
              "arcface": ref_arcface, "sphereface2": ref_sphereface2, "uniface": ref_uniface}


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


def random_batch(m=6, k=7, scale=2.0, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(0, scale, size=(m, k)), rng.integers(0, k, size=m)


def finite_difference_grad(f, z, h=1e-6):
    grad = np.zeros_like(z)
    for index in np.ndindex(z.shape):
        step = np.zeros_like(z)
        step[index] = h
        grad[index] = (f(z + step) - f(z - step)) / (2 * h)
    return grad


def test_the_registry_holds_the_papers_seven_losses_and_the_related_works():
    assert PAPER_LOSSES == ("ce", "max_margin", "bce", "self_norm", "nce", "batch_ce", "batch_max_margin")
    assert set(LOSSES) == {*PAPER_LOSSES, "z_loss", "smooth_top1", "smooth_top5", "cosface", "arcface",
                           "sphereface2", "uniface"}
    assert POLS_ALIGNED == {"bce", "self_norm", "nce", "batch_ce", "batch_max_margin", "sphereface2", "uniface"}


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
    counts = np.array([50.0, 5.0, 20.0, 0.0, 10.0, 3.0, 8.0])
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
    """Adding c_i to every logit of example i: ce, max_margin, z_loss, the smooth top-k losses and
    cosface cannot see it (so nothing in them places an example's logits against another's), the
    aligned losses do."""
    z, y = (torch.tensor(a) for a in random_batch())
    shift = torch.tensor(np.random.default_rng(1).normal(0, 3, size=(z.shape[0], 1)))
    loss = bound(name)
    unchanged = torch.isclose(loss(z, y), loss(z + shift, y), rtol=0, atol=1e-9).item()
    assert unchanged == (name in SHIFT_INVARIANT)


def test_z_loss_also_ignores_a_per_example_scale():
    z, y = (torch.tensor(a) for a in random_batch())
    scale = torch.tensor(np.random.default_rng(1).uniform(0.2, 5, size=(z.shape[0], 1)))
    assert torch.isclose(bound("z_loss")(z, y), bound("z_loss")(z * scale, y), rtol=0, atol=1e-9)


def test_arcface_without_its_margin_is_ce_a_softmax_within_each_example():
    z, y = (torch.tensor(a) for a in random_batch())
    cfg = dataclasses.replace(CFG, arcface=dataclasses.replace(CFG.arcface, margin=0.0))
    torch.testing.assert_close(make_loss("arcface", cfg)(z, y), make_loss("ce", CFG)(z, y))


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


@pytest.mark.parametrize("name", sorted(set(LOSSES) - {"arcface"}))  # free logits leave arcface's [-s, s]
def test_aligned_losses_separate_every_true_logit_from_every_false_logit(name):
    z, y = optimise_free_logits(name)
    top = 5 if name == "smooth_top5" else 1
    assert (z.topk(top, dim=1).indices == y[:, None]).any(1).all(), "every example right, whatever the loss"
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
