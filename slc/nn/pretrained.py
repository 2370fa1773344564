"""Start a torchvision architecture from pretrained weights (`model.weights`), before training.

`build_model` already gave the model the pretrained network's structure; this loads the weights
through torchvision's own code and cache ($TORCH_HOME/hub/checkpoints), so a file put there by
hand works offline, and checks that every layer of the backbone got its pretrained value. The
head stays new: its k classes are not ImageNet's.
"""
from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import urlparse

import torch
from torchvision.models import WeightsEnum

from slc.core.config import ModelConfig
from slc.core.errors import PipelineError
from slc.data.prepared import renormalisation
from slc.nn.models import FitInput, SLCNet, pretrained_weights

# Layers of the pretrained file that our network leaves out on purpose: inception_v3's and
# googlenet's auxiliary classifiers (built with aux_logits=False), besides the final layer.
_AUXILIARY = ("AuxLogits.", "aux1.", "aux2.")


class PretrainedWeightsError(PipelineError):
    """The pretrained weights cannot be had, or do not fit the network built for them."""


def cached_weights_path(weights: WeightsEnum) -> Path:
    """Where torch.hub keeps (and looks for) the weights' file, as `load_state_dict_from_url` names it."""
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(weights.url).path)


def load_pretrained(model: SLCNet, cfg: ModelConfig, data_normalisation: dict, progress: bool = False) -> None:
    """Load `cfg.weights` into the backbone of `model` (built by `build_model(cfg, ...)`), and set its
    FitInput to turn inputs normalised with `data_normalisation` ({"mean", "std"} per channel) into
    the normalisation the weights were trained with. Downloads the file if it is not cached."""
    fit, net = model.backbone[0], model.backbone[1]
    if cfg.weights is None or not (isinstance(fit, FitInput) and fit.renormalise):
        raise ValueError(f"load_pretrained: the model must be built by build_model with model.weights set "
                         f"(got weights={cfg.weights!r}, {type(fit).__name__} first in the backbone)")
    weights = pretrained_weights(cfg.name, cfg.weights)
    state = _state_dict(weights, progress)
    try:
        result = net.load_state_dict(state, strict=False)
    except RuntimeError as error:  # same names, other shapes
        raise _mismatch(weights, " ".join(str(error).split())) from None
    # The pretrained final layer is the one with an output per category (as _final_linear finds it):
    # the head took its place, so its keys are the only ones expected to be left over.
    categories = len(weights.meta["categories"])
    unexpected = [key for key in result.unexpected_keys
                  if not key.startswith(_AUXILIARY) and not (state[key].ndim and len(state[key]) == categories)]
    if result.missing_keys or unexpected:
        raise _mismatch(weights, f"layers without pretrained values: {result.missing_keys or 'none'}; "
                                 f"pretrained layers the network lacks: {unexpected or 'none'}")
    transform = weights.transforms()
    scale, shift = renormalisation(data_normalisation, {"mean": transform.mean, "std": transform.std})
    with torch.no_grad():
        fit.scale.copy_(scale.expand_as(fit.scale))
        fit.shift.copy_(shift.expand_as(fit.shift))


def fetch_pretrained(cfg: ModelConfig) -> None:
    """Put `cfg.weights` in torch's cache now, once: before a grid's trials start, so that a missing
    file stops the stage at once and parallel workers never download the same file side by side."""
    if cfg.weights is not None:
        _state_dict(pretrained_weights(cfg.name, cfg.weights), progress=True)


def _state_dict(weights: WeightsEnum, progress: bool) -> dict[str, torch.Tensor]:
    """The weights' state dict from the cache, or downloaded into it (its hash checked)."""
    try:
        return weights.get_state_dict(progress=progress, check_hash=True)
    except OSError as error:  # URLError, timeouts, a cache directory that cannot be written
        path = cached_weights_path(weights)
        raise PretrainedWeightsError(
            f"model.weights {weights}: {path} is not in torch's cache and could not be downloaded from "
            f"{weights.url} ({error}); download it elsewhere and put it at that path, or set TORCH_HOME to a "
            f"directory whose hub/checkpoints/ holds it, or allow the download") from None


def _mismatch(weights: WeightsEnum, detail: str) -> PretrainedWeightsError:
    """Either the cached file is not the one at the weights' URL, or build_model does not build what
    torchvision builds for these weights (a builder option missing from _PRETRAINED_OPTIONS)."""
    return PretrainedWeightsError(
        f"model.weights {weights} does not fit the network built for it ({detail}); check that "
        f"{cached_weights_path(weights)} is the file from {weights.url} (delete it to download it again)")
