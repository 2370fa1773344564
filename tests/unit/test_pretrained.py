"""model.weights: torchvision architectures start from pretrained weights, offline.

Each test gets its own empty torch cache (TORCH_HOME) and no network: the "pretrained" files are
randomly initialised torchvision networks with their native 1000 classes, saved where torch.hub
looks for the real ones.
"""
import dataclasses
import re
from urllib.error import URLError

import pytest
import torch
from torch import nn
from torchvision.models import get_model

from slc.core.config import RunConfig
from slc.core.errors import ConfigError
from slc.nn.models import build_model, pretrained_weights
from slc.nn.pretrained import PretrainedWeightsError, cached_weights_path, load_pretrained
from slc.nn.trained import load_trained, save_trained
from slc.train.training import train_one
from tests.conftest import prepared_synthetic, repo_params

K = 7
DATA_RGB = {"mean": [0.3, 0.4, 0.5], "std": [0.2, 0.25, 0.3]}  # a dataset's own statistics, not ImageNet's
DATA_GREY = {"mean": [0.29], "std": [0.35]}
# Where each network's own final layer is, to compare features with the unmodified torchvision network.
FINAL_LAYER = {"mobilenet_v3_small": "classifier.3", "resnet18": "fc", "googlenet": "fc", "inception_v3": "fc"}
SIZE = {"inception_v3": 75}  # its smallest input; 32x32 for the others


@pytest.fixture(autouse=True)
def offline(monkeypatch, tmp_path):
    """An empty cache, and a download that fails at once as it would without a network."""
    downloads = []

    def no_network(url, dst, *args, **kwargs):
        downloads.append(url)
        raise URLError("no network in the tests")

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    return downloads


def cfg(name, weights="DEFAULT"):
    return dataclasses.replace(repo_params().model, name=name, weights=weights)


def cache_pretrained(name, edit=lambda state: state):
    """A random `name` with torchvision's pretrained layout (1000 classes, auxiliary classifiers),
    saved as its DEFAULT weights' file in the cache; returns the state dict saved."""
    torch.manual_seed(1)
    aux = {"aux_logits": True, "init_weights": True} if name in ("googlenet", "inception_v3") else {}
    state = edit(get_model(name, weights=None, **aux).state_dict())
    path = cached_weights_path(pretrained_weights(name, "DEFAULT"))
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)
    return state


def pretrained_model(name, shape=(3, 32, 32), data=DATA_RGB):
    torch.manual_seed(0)
    model = build_model(cfg(name), shape, K)
    load_pretrained(model, cfg(name), data)
    return model.eval()


@pytest.mark.parametrize("name", ["mobilenet_v3_small", "squeezenet1_1", "resnet18", "googlenet", "inception_v3"])
def test_the_backbone_starts_from_the_pretrained_values_and_the_head_stays_new(name):
    saved = cache_pretrained(name)
    torch.manual_seed(0)
    model = build_model(cfg(name), (3, 32, 32), K)
    head = {key: value.clone() for key, value in model.head.state_dict().items()}
    load_pretrained(model, cfg(name), DATA_RGB)
    for key, value in model.backbone[1].state_dict().items():
        torch.testing.assert_close(value, saved[key], rtol=0, atol=0, msg=key)
    assert model.head.out_features == K
    for key, value in model.head.state_dict().items():
        torch.testing.assert_close(value, head[key], rtol=0, atol=0)


@pytest.mark.parametrize(("name", "data"), [("mobilenet_v3_small", DATA_RGB), ("resnet18", DATA_GREY),
                                            ("googlenet", DATA_RGB), ("inception_v3", DATA_GREY)])
def test_data_normalised_with_its_own_statistics_gives_the_pretrained_networks_features(name, data):
    """FitInput renormalises inside the graph: our input is normalised as the dataset is, torchvision's
    own pretrained network (loaded from the same file) gets the same pixels normalised its way.
    In float64 and to 0.1%: a random inception_v3 turns the float32 rounding of the scale and
    shift (1e-7) into 1e-5 of its output; a wrong normalisation would be off by far more."""
    cache_pretrained(name)
    channels, size = len(data["mean"]), SIZE.get(name, 32)
    model = pretrained_model(name, (channels, size, size), data).double()
    original = get_model(name, weights="DEFAULT").eval().double()
    original.set_submodule(FINAL_LAYER[name], nn.Identity())
    transform = pretrained_weights(name, "DEFAULT").transforms()
    pixels = torch.rand(2, channels, size, size, dtype=torch.float64)

    def normalised(x, stats):
        mean, std = (torch.tensor(stats[key], dtype=x.dtype)[:, None, None] for key in ("mean", "std"))
        return (x - mean) / std

    with torch.no_grad():
        ours = model.features(normalised(pixels, data))
        theirs = original(normalised(pixels.expand(-1, 3, -1, -1), {"mean": transform.mean, "std": transform.std}))
    torch.testing.assert_close(ours, theirs, rtol=1e-3, atol=1e-6 * theirs.abs().max().item())


@pytest.mark.parametrize("name", ["googlenet", "inception_v3"])
def test_inception_networks_transform_their_input_only_when_pretrained(name):
    """torchvision's pretrained builders switch transform_input on: the weights were trained so."""
    assert build_model(cfg(name), (3, 75, 75), K).backbone[1].transform_input
    assert not build_model(cfg(name, weights=None), (3, 75, 75), K).backbone[1].transform_input


def test_vit_takes_the_image_size_of_its_weights():
    model = build_model(cfg("vit_b_16", "IMAGENET1K_SWAG_E2E_V1"), (3, 32, 32), K)
    assert model.backbone[0].size == model.backbone[1].image_size == 384


def test_a_trained_model_rebuilds_without_the_pretrained_file(tmp_path):
    """load_trained (and the export) rebuild the structure from the config; nothing is downloaded."""
    cache_pretrained("resnet18")
    model = pretrained_model("resnet18", (1, 32, 32), DATA_GREY)
    info = {"run_name": "ce-s0", "loss": "ce", "seed": 0, "model": dataclasses.asdict(cfg("resnet18")),
            "train": {}, "dataset": "fashion_mnist", "input_shape": [1, 32, 32], "num_classes": K,
            "class_names": [str(c) for c in range(K)], "normalisation": DATA_GREY}
    save_trained(model, tmp_path / "ce-s0", info)
    cached_weights_path(pretrained_weights("resnet18", "DEFAULT")).unlink()
    loaded, _ = load_trained(tmp_path / "ce-s0")  # strict load: FitInput's scale and shift included
    x = torch.randn(3, 1, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x))


def test_without_weights_fit_input_has_no_state():
    """Models trained from scratch keep the state dict (and ONNX graph) they had before model.weights."""
    assert build_model(cfg("resnet18", weights=None), (3, 32, 32), K).backbone[0].state_dict() == {}
    assert set(build_model(cfg("resnet18"), (3, 32, 32), K).backbone[0].state_dict()) == {"scale", "shift"}


def test_an_unknown_weights_name_lists_the_valid_ones():
    with pytest.raises(ConfigError, match="'IMAGENET1K_V3' is not a weights of resnet50: valid: "
                                          "IMAGENET1K_V1, IMAGENET1K_V2, DEFAULT"):
        build_model(cfg("resnet50", "IMAGENET1K_V3"), (3, 32, 32), K)


def test_images_with_four_channels_are_refused_saying_the_weights_are_rgb():
    with pytest.raises(ValueError, match="trained on 3-channel RGB images"):
        build_model(cfg("resnet18"), (4, 32, 32), K)


def test_without_the_file_or_a_network_the_error_says_where_to_put_it(offline):
    weights = pretrained_weights("resnet18", "DEFAULT")
    model = build_model(cfg("resnet18"), (3, 32, 32), K)
    with pytest.raises(PretrainedWeightsError) as error:
        load_pretrained(model, cfg("resnet18"), DATA_RGB)
    assert offline == [weights.url]  # torchvision tried the download, which failed at once
    for part in (str(cached_weights_path(weights)), weights.url, "TORCH_HOME"):
        assert part in str(error.value)
    assert cached_weights_path(weights).name == "resnet18-f37072fd.pth"


@pytest.mark.parametrize(("edit", "complaint"), [
    (lambda state: {k: v for k, v in state.items() if k != "layer1.0.conv1.weight"}, "without pretrained values"),
    (lambda state: {**state, "layer5.0.conv1.weight": torch.zeros(3, 3)}, "the network lacks: .'layer5"),
    (lambda state: {**state, "layer1.0.conv1.weight": torch.zeros(3, 3)}, "size mismatch"),
], ids=["a layer missing", "a layer too many", "a layer of another shape"])
def test_a_pretrained_file_that_does_not_fit_the_network_is_refused(edit, complaint):
    cache_pretrained("resnet18", edit)
    model = build_model(cfg("resnet18"), (3, 32, 32), K)
    with pytest.raises(PretrainedWeightsError, match=f"does not fit.*{complaint}"):
        load_pretrained(model, cfg("resnet18"), DATA_RGB)


def test_loading_into_a_model_built_without_weights_is_refused():
    with pytest.raises(ValueError, match=re.escape("with model.weights set")):
        load_pretrained(build_model(cfg("resnet18", None), (3, 32, 32), K), cfg("resnet18"), DATA_RGB)


@pytest.fixture
def grey16(tmp_path):
    """A small prepared dataset: 3 classes of 16x16 grey images."""
    return prepared_synthetic(repo_params(), tmp_path, num_classes=3, train_per_class=12, test_per_class=4,
                              image_size=16)


def pretrained_run(epochs=1, lr=1e-9):
    params = repo_params()
    return RunConfig("ce", 0, cfg("mobilenet_v3_small"),
                     dataclasses.replace(params.train, epochs=epochs, batch_size=8, lr=lr))


def test_training_starts_from_the_pretrained_backbone(grey16, tmp_path):
    """At a learning rate of 1e-9 the trained backbone is still the pretrained one; its input
    renormalisation is the one for the data's own statistics."""
    saved = cache_pretrained("mobilenet_v3_small")
    result = train_one(pretrained_run(), grey16, tmp_path / "work", progress=False)
    assert result.status == "finished"
    net = result.model.backbone[1]
    for name, value in net.named_parameters():
        torch.testing.assert_close(value, saved[name], rtol=0, atol=1e-6, msg=name)
    assert not torch.equal(result.model.backbone[0].scale, torch.ones(3, 1, 1))


def test_a_resumed_run_keeps_its_trained_weights_instead_of_the_pretrained_ones(grey16, tmp_path):
    cache_pretrained("mobilenet_v3_small")
    first = train_one(pretrained_run(epochs=1, lr=0.01), grey16, tmp_path / "work", progress=False)
    cached_weights_path(pretrained_weights("mobilenet_v3_small", "DEFAULT")).unlink()
    extended = train_one(pretrained_run(epochs=2, lr=0.01), grey16, tmp_path / "work", progress=False)
    assert extended.epochs_completed == 2 and extended.history[0] == first.history[0]


def test_a_missing_pretrained_file_stops_training_before_any_epoch(grey16, tmp_path):
    with pytest.raises(PretrainedWeightsError, match="is not in torch's cache"):
        train_one(pretrained_run(), grey16, tmp_path / "work", progress=False)
    assert not list((tmp_path / "work").glob("epoch-*"))
