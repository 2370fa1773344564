"""The network registry: every entry builds, runs, and splits into features + a linear head."""
import dataclasses

import pytest
import torch
from torch import nn
from torchvision.models import get_model

from slc.nn.models import MODELS, SLCNet, build_model
from slc.nn.trained import load_trained, save_trained
from tests.conftest import HEAVY, repo_params

CFG = dataclasses.replace(repo_params().model, hidden=32, channels=8)
K = 7
GREY_28 = (1, 28, 28)  # Fashion-MNIST: grey and smaller than most ImageNet networks accept

# One light member of each torchvision family, checked against the unmodified torchvision network.
FAMILIES = ["alexnet", "convnext_tiny", "densenet121", "efficientnet_b0", "efficientnet_v2_s", "googlenet",
            "inception_v3", "maxvit_t", "mnasnet0_5", "mobilenet_v3_small", "regnet_x_400mf", "resnet18",
            "resnext50_32x4d", "shufflenet_v2_x0_5", "swin_t", "swin_v2_t", "vgg11", "vit_b_32"]


def weight(name):
    return pytest.param(name, marks=pytest.mark.slow) if name in HEAVY else name


def build_cfg(name):
    return dataclasses.replace(CFG, name=name)


def build(name, shape=GREY_28):
    torch.manual_seed(0)
    return build_model(build_cfg(name), shape, K).eval()


def test_the_registry_has_the_papers_networks_and_torchvision_ones():
    assert {"mlp", "conv6", "alexnet", "vgg16", "inception_v3", "resnet50", "resnet101"} <= set(MODELS)
    assert len(MODELS) > 70


@pytest.mark.parametrize("name", [weight(n) for n in MODELS])
def test_every_model_splits_into_features_and_a_linear_head(name):
    model = build(name)
    assert isinstance(model, SLCNet) and isinstance(model.head, nn.Linear)
    x = torch.randn(2, *GREY_28)
    with torch.no_grad():
        features, logits = model.features(x), model(x)
    d = model.head.in_features
    assert features.shape == (2, d) and model.head.out_features == K
    assert logits.shape == (2, K)
    torch.testing.assert_close(logits, model.head(features))


@pytest.mark.parametrize("name", [weight(n) for n in FAMILIES])
def test_a_torchvision_model_computes_what_torchvision_computes(name):
    """features + head is the original network cut before its last layer, not a different one."""
    ours = build(name, shape=(3, 224, 224))
    torch.manual_seed(0)
    options = {"aux_logits": False, "init_weights": True} if name in ("inception_v3", "googlenet") else {}
    original = get_model(name, weights=None, num_classes=K, **options).eval()
    size = max(ours.backbone[0].size, 32)  # an input the network takes as it is (no resizing)
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), original(x))


def test_the_mlp_is_two_fully_connected_layers():
    model = build("mlp")
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(28 * 28, 32), (32, K)]


def test_conv6_is_six_convolutions_and_one_fully_connected_layer():
    model = build("conv6", shape=(3, 32, 32))
    assert sum(isinstance(m, nn.Conv2d) for m in model.modules()) == 6
    assert [m for m in model.modules() if isinstance(m, nn.Linear)] == [model.head]
    assert model.head.in_features == 4 * CFG.channels


def test_images_with_other_than_one_or_three_channels_are_refused():
    with pytest.raises(ValueError, match="1- or 3-channel"):
        build("resnet18", shape=(4, 32, 32))


def test_a_saved_model_loads_back_identical_in_eval_mode(tmp_path):
    model = build("conv6", shape=(1, 16, 16)).train()
    info = {"run_name": "ce-s0", "loss": "ce", "seed": 0, "model": dataclasses.asdict(build_cfg("conv6")),
            "train": {}, "dataset": "fashion_mnist", "input_shape": [1, 16, 16], "num_classes": K,
            "class_names": [str(c) for c in range(K)], "normalisation": {"mean": [0.5], "std": [0.5]}}
    save_trained(model, tmp_path / "ce-s0", info)
    loaded, loaded_info = load_trained(tmp_path / "ce-s0")
    assert loaded_info == info and not loaded.training
    x = torch.randn(3, 1, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model.eval()(x))


def test_saving_without_the_rebuild_information_is_refused(tmp_path):
    with pytest.raises(ValueError, match="input_shape"):
        save_trained(build("mlp"), tmp_path, {"run_name": "ce-s0"})


def test_loading_a_missing_model_says_how_to_make_one(tmp_path):
    with pytest.raises(FileNotFoundError, match="dvc repro train"):
        load_trained(tmp_path / "nothing-here")
