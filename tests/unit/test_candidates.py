"""Sampled training: the candidate set, the corrected losses, and a head that learns sparsely."""
import dataclasses
import math

import numpy as np
import pytest
import torch

from slc.core.config import ModelConfig
from slc.nn.candidates import draw_candidates, draw_uniform
from slc.nn.losses import LOSSES, NO_SAMPLED_FORM, make_loss
from slc.nn.models import build_model
from tests.conftest import repo_params
from tests.unit.test_losses import SHIFT_INVARIANT

CFG = dataclasses.replace(repo_params().train, margin=1.0, self_norm_alpha=0.1, nce_noise_samples=7,
                          nce_noise="uniform")



def batch(m=12, k=40, seed=0):
    rng = np.random.default_rng(seed)
    return torch.tensor(rng.normal(0, 2, (m, k))), torch.tensor(rng.integers(0, k, m))


def test_the_candidates_are_the_batch_classes_plus_n_distinct_uniform_negatives():
    targets = torch.tensor([3, 3, 17, 90])
    drawn = draw_candidates(targets, 100, 10, torch.Generator().manual_seed(0))
    classes = drawn.classes.tolist()
    assert classes == sorted(set(classes)) and {3, 17, 90} <= set(classes)
    assert len(drawn.noise) == 10 and len(set(drawn.noise.tolist())) == 10
    assert torch.equal(drawn.classes[drawn.targets], targets)
    expected = [0.0 if c in (3, 17, 90) else math.log(10 / 100) for c in classes]
    torch.testing.assert_close(drawn.log_inclusion, torch.tensor(expected))


@pytest.mark.parametrize("k, n", [(1000, 10), (50, 40)])  # the rejection path and the permutation path
def test_negatives_are_uniform_over_the_classes(k, n):
    generator = torch.Generator().manual_seed(0)
    counts = torch.zeros(k)
    for _ in range(2000):
        drawn = draw_uniform(k, n, generator)
        assert len(set(drawn.tolist())) == n
        counts[drawn] += 1
    expected = 2000 * n / k  # each class is in a set with probability n/k
    assert abs(counts.mean().item() - expected) < 1e-9 and (counts - expected).abs().max() < 6 * math.sqrt(expected)


@pytest.mark.parametrize("n", [0, 41])
def test_a_candidate_count_outside_1_to_k_is_refused(n):
    with pytest.raises(ValueError, match=r"1\.\.40"):
        draw_candidates(torch.tensor([1]), 40, n, torch.Generator())


def sampled(name, z, y, n, seed=0):
    drawn = draw_candidates(y, z.shape[1], n, torch.Generator().manual_seed(seed))
    loss = make_loss(name, CFG, generator=torch.Generator().manual_seed(seed))
    return loss(z[:, drawn.classes], drawn.targets, candidates=drawn), drawn


@pytest.mark.parametrize("name", sorted(set(LOSSES) - {"nce"} - NO_SAMPLED_FORM))
def test_with_every_class_a_candidate_each_loss_is_its_exact_form(name):
    z, y = batch()
    exact = make_loss(name, CFG)(z, y)
    value, drawn = sampled(name, z, y, n=z.shape[1])
    assert len(drawn.classes) == z.shape[1]
    assert abs(value.item() - exact.item()) < 1e-6


def test_sampled_nce_is_nce_with_the_shared_negatives_as_noise():
    z, y = batch()
    value, drawn = sampled("nce", z, y, n=9)
    log_nq = math.log(9 / z.shape[1])  # n q(j) for uniform q
    noise = drawn.classes[drawn.noise]
    softplus = torch.nn.functional.softplus
    expected = np.mean([softplus(-(z[i, y[i]] - log_nq)).item() + softplus(z[i, noise] - log_nq).sum().item()
                        for i in range(len(y))])
    assert abs(value.item() - expected) < 1e-6


@pytest.mark.parametrize("name", ["ce", "bce", "self_norm", "batch_ce"])
def test_sampled_sums_and_partitions_are_unbiased_log_q_corrected_estimates(name):
    """Over many draws, exp(sampled log-partition) and the sampled bce average their full values."""
    z, y = batch(m=4, k=30)
    if name == "bce":
        estimates = [sampled("bce", z, y, 6, seed)[0].item() for seed in range(3000)]
        assert np.mean(estimates) == pytest.approx(make_loss("bce", CFG)(z, y).item(), rel=0.02)
    else:  # the log-q corrected sum of exp(logits) over the candidates estimates the sum over all k
        totals = []
        for seed in range(3000):
            drawn = draw_candidates(y, 30, 6, torch.Generator().manual_seed(seed))
            totals.append(torch.exp(z[:, drawn.classes] - drawn.log_inclusion).sum(dim=1))
        np.testing.assert_allclose(torch.stack(totals).mean(0), torch.exp(z).sum(dim=1), rtol=0.05)


def test_a_loss_without_a_sampled_form_says_so():
    z, y = batch()
    with pytest.raises(ValueError, match="smooth_top5 has no sampled form: set train.candidates: null"):
        sampled("smooth_top5", z, y, n=3)


@pytest.mark.parametrize("name", sorted(set(LOSSES) - NO_SAMPLED_FORM))
def test_the_sampled_losses_keep_the_per_example_shift_property(name):
    """The shift-invariant losses ignore a per-example shift also when sampled; the aligned ones do not."""
    z, y = batch(k=200)
    shift = torch.tensor(np.random.default_rng(1).normal(0, 3, size=(z.shape[0], 1)))
    drawn = draw_candidates(y, 200, 20, torch.Generator().manual_seed(0))
    loss = lambda logits: make_loss(name, CFG)(logits[:, drawn.classes], drawn.targets, candidates=drawn)
    unchanged = torch.isclose(loss(z), loss(z + shift), rtol=0, atol=1e-9).item()
    assert unchanged == (name in SHIFT_INVARIANT)


def test_the_candidate_logits_are_the_full_models_columns():
    model = build_model(ModelConfig("mlp", 8, 4, None, "linear", None), (1, 4, 4), 50)
    x, classes = torch.randn(3, 1, 4, 4), torch.tensor([0, 7, 49])
    torch.testing.assert_close(model(x, classes), model(x)[:, classes])
