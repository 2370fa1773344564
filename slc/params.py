"""params.yaml, read and checked whole: the one way a stage or a study gets its settings.

Beyond the types and ranges of each section (slc.core.config), every value that names an entry of
a registry (a dataset, a model, a loss, an optimizer, ...) is checked here against that registry,
so a typo stops the stage before any work, before Ray starts or an MLflow run exists, with the
names that would be valid.
"""
from __future__ import annotations

from collections.abc import Callable, Collection
from pathlib import Path

import yaml

from slc.core.config import Params
from slc.core.errors import ConfigError
from slc.core.strict import from_dict
from slc.data.datasets import DATASETS
from slc.data.prepared import AUGMENTATIONS
from slc.nn.losses import LOSSES, NCE_NOISE
from slc.nn.models import HEADS, MODELS, TORCHVISION_MODELS, pretrained_weights
from slc.train.head_init import HEAD_INITS
from slc.train.optim import LR_SCHEDULES, OPTIMIZERS

PARAMS_FILE = Path("params.yaml")


def _models_hint() -> str:
    return (f"mlp, conv6, or one of {len(TORCHVISION_MODELS)} torchvision architectures "
            f"({', '.join(TORCHVISION_MODELS[:6])}, ...; all: torchvision.models.list_models())")


# params key -> (its value or values, the registry they must name, the valid names as a user reads them)
REGISTERED: dict[str, tuple[Callable[[Params], list[str]], Collection[str], Callable[[], str]]] = {
    "data.name": (lambda p: [p.data.name], DATASETS, lambda: ", ".join(DATASETS)),
    "model.name": (lambda p: [p.model.name], MODELS, _models_hint),
    "model.head": (lambda p: [p.model.head], HEADS, lambda: ", ".join(HEADS)),
    "train.optimizer": (lambda p: [p.train.optimizer], OPTIMIZERS, lambda: ", ".join(OPTIMIZERS)),
    "train.lr_schedule": (lambda p: [p.train.lr_schedule], LR_SCHEDULES, lambda: ", ".join(LR_SCHEDULES)),
    "train.augment": (lambda p: [p.train.augment], AUGMENTATIONS, lambda: ", ".join(AUGMENTATIONS)),
    "train.nce_noise": (lambda p: [p.train.nce_noise], NCE_NOISE, lambda: ", ".join(NCE_NOISE)),
    "train.head_init": (lambda p: [p.train.head_init], HEAD_INITS, lambda: ", ".join(HEAD_INITS)),
    "grid.losses": (lambda p: p.grid.losses, LOSSES, lambda: ", ".join(LOSSES)),
    "benchmark.architectures": (lambda p: p.benchmark.architectures, MODELS, _models_hint),
}


def check_registered(params: Params) -> Params:
    """Refuse a value that names no registry entry (and pretrained weights its model lacks)."""
    for key, (values, registry, valid) in REGISTERED.items():
        unknown = [value for value in values(params) if value not in registry]
        if unknown:
            raise ConfigError(f"{key} = {unknown[0]!r} is unknown: valid names are {valid()}")
    if params.model.weights is not None:
        if params.model.name not in TORCHVISION_MODELS:
            raise ConfigError(f"model.weights = {params.model.weights!r}: pretrained weights are for torchvision "
                              f"architectures, {params.model.name} has none; set model.weights: null, or model.name "
                              f"to one (resnet50, ...)")
        pretrained_weights(params.model.name, params.model.weights)
    return params


def params_from(raw: dict) -> Params:
    """Params from the nested dicts of a params.yaml, types, ranges and registry names checked."""
    return check_registered(from_dict(Params, raw))


def load_params(path: str | Path = PARAMS_FILE) -> Params:
    """Read and check params.yaml (the only way stages get their settings)."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path} not found: run from the repository root, where params.yaml is") from None
    except yaml.YAMLError as error:
        raise ConfigError(f"{path} is not valid YAML: {error}") from None
    return params_from(raw)
