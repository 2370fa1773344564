"""The heads for many classes: the cosine head, rows started at their class means, and rows updated
with a step count of their own."""
import dataclasses
import logging
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from slc.core.config import ModelConfig
from slc.evaluate.scoring import Head, logits_of
from slc.nn.candidates import draw_candidates
from slc.nn.losses import make_loss
from slc.nn.models import build_model, cosine_scale
from slc.train.head_init import class_mean_rows, first_of_each_class
from slc.train.optim import RowAdam, make_optimizers
from tests.conftest import repo_params

LINEAR = ModelConfig("mlp", 8, 4, None, "linear", None)
COSINE = dataclasses.replace(LINEAR, head="cosine")


def test_a_cosine_logit_is_the_scale_times_the_cosine_plus_the_bias():
    model = build_model(dataclasses.replace(COSINE, scale=5.0), (1, 4, 4), 30)
    torch.nn.init.normal_(model.head.bias)
    x = torch.randn(6, 1, 4, 4)
    cosine = F.cosine_similarity(model.backbone(x)[:, None, :], model.head.weight[None], dim=2)
    torch.testing.assert_close(model(x), 5.0 * cosine + model.head.bias)


@pytest.mark.parametrize("k, scale", [(2, 1.0), (10, math.sqrt(2) * math.log(9)), (400_000, 18.24)])
def test_the_default_scale_is_adacos_fixed_scale_and_at_least_one(k, scale):
    assert cosine_scale(COSINE, k) == pytest.approx(scale, abs=5e-3)
    assert cosine_scale(dataclasses.replace(COSINE, scale=30.0), k) == 30.0


def test_a_cosine_head_starts_with_zero_biases_and_a_linear_one_as_before():
    torch.manual_seed(0)
    linear = build_model(LINEAR, (1, 4, 4), 30)
    torch.manual_seed(0)
    cosine = build_model(COSINE, (1, 4, 4), 30)
    assert torch.equal(linear.head.weight, cosine.head.weight) and not cosine.head.bias.any()
    assert linear.head.bias.any() and linear.scale is None


def test_the_mlp_embeds_without_a_relu_under_a_cosine_head_so_its_cosines_can_be_negative():
    torch.manual_seed(0)
    x = torch.randn(64, 1, 4, 4)
    with torch.no_grad():
        assert (build_model(LINEAR, (1, 4, 4), 30).backbone(x) >= 0).all()
        cosine = build_model(COSINE, (1, 4, 4), 30)
        assert (cosine.backbone(x) < 0).any() and (cosine(x) < 0).any()


@pytest.mark.parametrize("cfg", [LINEAR, COSINE], ids=["linear", "cosine"])
def test_features_times_rows_is_the_model_whatever_the_head(cfg):
    """What scoring and the export compute (features once, then the rows) is the model's forward."""
    model = build_model(cfg, (1, 4, 4), 30).eval()
    x = torch.randn(5, 1, 4, 4)
    with torch.no_grad():
        expected = model(x).numpy()
        scored = logits_of(model.features(x), Head.of(model), None)
    np.testing.assert_allclose(scored, expected, rtol=0, atol=1e-5)


def test_the_sampled_cosine_logits_are_the_full_models_columns_and_their_gradient_sparse():
    model = build_model(COSINE, (1, 4, 4), 50)
    x, classes = torch.randn(3, 1, 4, 4), torch.tensor([0, 7, 49])
    torch.testing.assert_close(model(x, classes), model(x)[:, classes])
    model(x, classes).sum().backward()
    assert model.head.weight.grad.is_sparse
    assert model.head.weight.grad._indices()[0].tolist() == [0, 7, 49]


class Labelled(torch.utils.data.Dataset):
    def __init__(self, images, labels):
        self.images, self.labels = images, labels

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return self.images[i], self.labels[i]


@pytest.mark.parametrize("cfg", [LINEAR, COSINE], ids=["linear", "cosine"])
def test_class_mean_rows_are_each_classes_mean_feature_and_an_absent_class_keeps_its_row(cfg, caplog):
    torch.manual_seed(0)
    model = build_model(cfg, (1, 4, 4), 6)
    images, labels = torch.randn(40, 1, 4, 4), torch.tensor([c % 5 for c in range(40)])  # class 5 has none
    random_row = model.head.weight[5].detach().clone()
    with caplog.at_level(logging.WARNING):
        seconds = class_mean_rows(model, Labelled(images, labels))
    assert seconds > 0 and model.training
    with torch.no_grad():
        features = model.features(images)
    for c in range(5):
        torch.testing.assert_close(model.head.weight[c].detach(), features[labels == c].mean(0))
    assert torch.equal(model.head.weight[5].detach(), random_row) and not model.head.bias.any()
    assert "1 of 6 classes have no training image (5); their rows keep their random start" in caplog.text


def test_class_mean_rows_over_a_few_images_a_class_take_each_classes_first_ones():
    torch.manual_seed(0)
    model = build_model(COSINE, (1, 4, 4), 4)
    labels = torch.tensor([2, 0, 2, 1, 0, 2, 0, 2, 1, 0])
    images = torch.randn(10, 1, 4, 4)
    assert first_of_each_class(labels.numpy(), 2).tolist() == [0, 1, 2, 3, 4, 8]
    class_mean_rows(model, Labelled(images, labels), per_class=2)
    with torch.no_grad():
        features = model.features(images)
    for c, first in [(0, [1, 4]), (1, [3, 8]), (2, [0, 2])]:
        torch.testing.assert_close(model.head.weight[c].detach(), features[first].mean(0))


def test_class_mean_rows_rank_each_class_first_on_well_separated_data():
    """On images that are their class's prototype plus a little noise, the rows alone classify."""
    torch.manual_seed(0)
    model = build_model(COSINE, (1, 4, 4), 20)
    prototypes = torch.randn(20, 1, 4, 4)
    labels = torch.arange(20).repeat(5)
    images = prototypes[labels] + 0.05 * torch.randn(100, 1, 4, 4)
    class_mean_rows(model, Labelled(images, labels))
    with torch.no_grad():
        assert (model(images).argmax(1) == labels).float().mean() > 0.95


def sparse_rows(rows: list[int], values: torch.Tensor, k: int) -> torch.Tensor:
    return torch.sparse_coo_tensor(torch.tensor([rows]), values, (k, values.shape[1]), check_invariants=True)


def test_row_adam_is_adam_when_every_row_is_in_every_step():
    torch.manual_seed(0)
    table = torch.randn(4, 3)
    dense, rowwise = table.clone().requires_grad_(), table.clone().requires_grad_()
    adam, row_adam = torch.optim.Adam([dense], lr=0.01), RowAdam([rowwise], lr=0.01)
    for _ in range(5):
        grad = torch.randn(4, 3)
        dense.grad, rowwise.grad = grad.clone(), sparse_rows([0, 1, 2, 3], grad, 4)
        adam.step()
        row_adam.step()
    torch.testing.assert_close(rowwise, dense)


def test_row_adam_counts_steps_per_row_so_a_late_row_moves_as_far_as_an_early_one():
    """A row first in a gradient at step 100 gets Adam's first step (lr times the gradient's sign), not
    the shrunken or inflated step of a bias correction for 100 steps (torch's SparseAdam)."""
    table = torch.zeros(3, 2, requires_grad=True)
    optimizer = RowAdam([table], lr=0.1)
    for _ in range(100):
        table.grad = sparse_rows([0], torch.tensor([[1.0, -1.0]]), 3)
        optimizer.step()
    table.grad = sparse_rows([2], torch.tensor([[0.3, -2.0]]), 3)
    optimizer.step()
    torch.testing.assert_close(table[2].detach(), torch.tensor([-0.1, 0.1]))
    assert not table[1].any() and optimizer.state[table]["step"].tolist() == [100, 0, 1]


def test_the_head_has_its_own_learning_rate_in_exact_and_sampled_training():
    model = build_model(LINEAR, (1, 4, 4), 10)
    train = dataclasses.replace(repo_params().train, lr=1e-3, head_lr=0.5)
    exact = make_optimizers(model, train)
    assert [group["lr"] for group in exact[0].param_groups] == [1e-3, 0.5]
    assert {id(p) for p in exact[0].param_groups[1]["params"]} == {id(p) for p in model.head.parameters()}
    backbone, head = make_optimizers(model, dataclasses.replace(train, candidates=4))
    assert isinstance(head, RowAdam) and head.param_groups[0]["lr"] == 0.5 and backbone.param_groups[0]["lr"] == 1e-3


@pytest.mark.parametrize("cfg", [LINEAR, COSINE], ids=["linear", "cosine"])
def test_a_sampled_step_moves_only_the_candidate_rows(cfg):
    model = build_model(cfg, (1, 4, 4), 500)
    before = model.head.weight.detach().clone()
    _, head = make_optimizers(model, dataclasses.replace(repo_params().train, candidates=16))
    x, y = torch.randn(6, 1, 4, 4), torch.tensor([1, 2, 3, 4, 5, 6])
    drawn = draw_candidates(y, 500, 16, torch.Generator().manual_seed(0))
    make_loss("ce", repo_params().train)(model(x, drawn.classes), drawn.targets, candidates=drawn).backward()
    assert model.head.weight.grad.is_sparse and model.head.bias.grad.is_sparse
    head.step()
    moved = torch.nonzero((model.head.weight.detach() != before).any(dim=1)).flatten()
    assert moved.tolist() == drawn.classes.tolist()
