"""Every params value that names a registry entry is checked when params.yaml is loaded, before any
work, with the valid names; one case per registry, so a new registry key is tested here too."""
import copy

import pytest
import yaml

from slc.core.errors import ConfigError
from slc.params import REGISTERED, load_params, params_from

RAW = yaml.safe_load(open("params.yaml"))
TYPOS = {  # a plausible typo per registered key, and a name the error must offer instead
    "data.name": ("fashion-mnist", "fashion_mnist"),
    "model.name": ("resnet5O", "mlp, conv6"),
    "model.head": ("cosin", "linear, cosine"),
    "train.optimizer": ("adamm", "adam, adamw, sgd"),
    "train.lr_schedule": ("cosin", "cosine"),
    "train.augment": ("flip", "crop_flip"),
    "train.nce_noise": ("uniforn", "frequency"),
    "train.head_init": ("class_means", "random, class_mean"),
    "grid.losses": (["ce", "cross_entropy"], "batch_ce"),
    "benchmark.architectures": (["resnet50", "resnet51"], "mlp, conv6"),
}


def with_value(path: str, value) -> dict:
    raw = copy.deepcopy(RAW)
    *parents, key = path.split(".")
    node = raw
    for parent in parents:
        node = node[parent]
    node[key] = value
    return raw


def test_every_registered_key_has_a_typo_case():
    assert set(TYPOS) == set(REGISTERED)


@pytest.mark.parametrize("key", sorted(TYPOS))
def test_a_name_no_registry_has_is_refused_with_the_valid_names(key):
    typo, offered = TYPOS[key]
    with pytest.raises(ConfigError, match=f"^{key} = .* is unknown: valid names are .*{offered}"):
        params_from(with_value(key, typo))


def test_load_params_checks_the_names_of_a_file(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(with_value("train.optimizer", "adamm")))
    with pytest.raises(ConfigError, match="train.optimizer = 'adamm'"):
        load_params(path)


@pytest.mark.parametrize("name", ["mlp", "conv6"])
def test_weights_for_the_papers_networks_are_refused(name):
    raw = with_value("model.weights", "IMAGENET1K_V1")
    raw["model"]["name"] = name
    with pytest.raises(ConfigError, match="for torchvision architectures"):
        params_from(raw)


def test_weights_their_architecture_lacks_are_refused_with_the_valid_ones():
    raw = with_value("model.weights", "IMAGENET9K")
    raw["model"]["name"] = "resnet18"
    with pytest.raises(ConfigError, match="IMAGENET1K_V1"):
        params_from(raw)


@pytest.mark.parametrize(("key", "value", "says"), [
    ("model.scale", 0.0, r"model.scale = 0.0 is invalid: expected null \(sqrt.* or a positive number"),
    ("model.scale", 16.0, "only model.head: cosine has a scale"),
    ("train.head_lr", 0.0, r"train.head_lr = 0.0 is invalid: expected null \(train.lr\) or a positive learning rate"),
    ("train.head_lr", -0.5, "train.head_lr = -0.5"),
])
def test_head_settings_out_of_range_are_refused_with_what_to_set(key, value, says):
    with pytest.raises(ConfigError, match=says):
        params_from(with_value(key, value))
