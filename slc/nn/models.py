"""Network registry: the paper's two small networks and every torchvision classifier, one shape.

Every model is an `SLCNet`: `features(x) -> (N, d)` then `head: nn.Linear(d, k)`. Single logit
classification needs exactly that split, because export keeps the backbone and slices one row of
the head per class. torchvision networks are built with random weights (nothing is downloaded),
their own final linear layer becomes `head`, and a small input adapter in front lets them take
any dataset's images: see `FitInput`. With `model.weights` they take the structure of those
pretrained weights, which `slc.nn.pretrained.load_pretrained` then loads.
"""
from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torch.utils.data import DataLoader
from torchvision.models import MaxVit, VisionTransformer, WeightsEnum, get_model, get_model_weights, list_models
from tqdm import tqdm  # not tqdm.auto, whose asyncio variant opens a second (unused) DataLoader iterator

from slc.core.config import ModelConfig
from slc.core.errors import ConfigError
from slc.nn.candidates import SparseRows

InputShape = tuple[int, int, int]


class SLCNet(nn.Module):
    """backbone -> (N, d) features -> head rows (k, d) and biases: the split single-logit export relies on.

    `features` are what the rows multiply and `rows` the (k, d) weights and (k,) biases that do it, so
    that scoring and export compute `features @ rows.T + bias` whatever the head is. A cosine head
    (`scale` set) normalises both: `features` are unit vectors and `rows` the unit rows times `scale`, so
    a logit is scale x cos(feature, row) + bias (CosFace's head, Wang et al. 2018, without the margin).
    """

    def __init__(self, backbone: nn.Module, head: nn.Linear, scale: float | None = None):
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.scale = scale

    def features(self, x: torch.Tensor) -> torch.Tensor:
        features = self.backbone(x)
        return features if self.scale is None else F.normalize(features, dim=1)

    def rows(self, classes: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The head's (k, d) rows and (k,) biases as the logits use them, or only those of `classes`
        (sorted, distinct: sampled training), whose gradient is then sparse."""
        weight, bias = self.head.weight, self.head.bias
        if classes is not None:
            weight, bias = SparseRows.apply(weight, classes), SparseRows.apply(bias, classes)
        return (weight if self.scale is None else self.scale * F.normalize(weight, dim=1)), bias

    def forward(self, x: torch.Tensor, classes: torch.Tensor | None = None) -> torch.Tensor:
        """All k logits, or only those of `classes`."""
        return F.linear(self.features(x), *self.rows(classes))


HEADS = ("linear", "cosine")


def cosine_scale(cfg: ModelConfig, num_classes: int) -> float:
    """model.scale, or AdaCos' fixed scale sqrt(2) ln(k - 1) (Zhang et al. 2019), at least 1: large
    enough that a softmax over k classes can put most of its mass on one."""
    if cfg.scale is not None:
        return cfg.scale
    return max(1.0, math.sqrt(2) * math.log(max(num_classes - 1, 1)))


class FitInput(nn.Module):
    """Make any dataset's images acceptable to an ImageNet network, inside the graph.

    Grey images are repeated to 3 channels (rather than replacing the first conv, which differs
    per architecture), and images smaller than the network can take are upsampled bilinearly,
    so that, e.g., Fashion-MNIST's 28x28 runs through inception_v3 (75x75 at least) or
    ViT (exactly 224x224). Being part of the model, it is exported with it.

    With `renormalise` (pretrained weights), per-channel `scale` and `shift` buffers turn inputs
    normalised with the dataset's statistics into the normalisation the weights were trained with;
    identity until `load_pretrained` sets them, then saved in the state dict. Without it there are
    no buffers, so models trained from scratch keep their state dict and graph.
    """

    def __init__(self, channels: int, size: int, exact: bool, renormalise: bool = False):
        super().__init__()
        self.repeat = 3 if channels == 1 else 1
        self.size = size
        self.exact = exact
        self.renormalise = renormalise
        if renormalise:
            self.register_buffer("scale", torch.ones(3, 1, 1))
            self.register_buffer("shift", torch.zeros(3, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.repeat > 1:
            x = x.repeat(1, self.repeat, 1, 1)
        if self.renormalise:
            x = x * self.scale + self.shift
        h, w = x.shape[-2:]
        if self.exact and (h, w) != (self.size, self.size):
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False)
        elif not self.exact and min(h, w) < self.size:
            x = F.interpolate(x, size=(max(h, self.size), max(w, self.size)), mode="bilinear",
                              align_corners=False)
        return x

    def extra_repr(self) -> str:
        return f"repeat={self.repeat}, size={self.size}, exact={self.exact}" + (", renormalise" if self.renormalise else "")


def mlp(cfg: ModelConfig, input_shape: InputShape, num_classes: int) -> SLCNet:
    """The paper's MNIST network: two fully connected layers (one hidden layer, then the logits).

    Under a cosine head the hidden layer is an embedding, as face recognition's is: no ReLU, since
    features clipped to one orthant all have positive cosines and crowd together (at 100,000 classes
    dropping it took one epoch's 1-AUPRC from 0.631 to 0.585)."""
    c, h, w = input_shape
    layers = [nn.Flatten(), nn.Linear(c * h * w, cfg.hidden)]
    backbone = nn.Sequential(*layers, nn.ReLU()) if cfg.head == "linear" else nn.Sequential(*layers)
    return SLCNet(backbone, nn.Linear(cfg.hidden, num_classes))


def conv6(cfg: ModelConfig, input_shape: InputShape, num_classes: int) -> SLCNet:
    """The paper's SVHN/CIFAR network: six 3x3 conv layers in three pooled pairs, then one FC layer.

    Widths c, c, 2c, 2c, 4c, 4c; batch norm keeps all seven losses trainable at one learning
    rate; global average pooling makes d = 4c whatever the image size (>= 8 pixels).
    """
    if min(input_shape[1:]) < 8:
        raise ValueError(f"conv6 needs images of at least 8x8 (three 2x2 poolings), got {input_shape}")
    layers: list[nn.Module] = []
    in_channels = input_shape[0]
    for width in (cfg.channels, 2 * cfg.channels, 4 * cfg.channels):
        for _ in range(2):
            layers += [nn.Conv2d(in_channels, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU()]
            in_channels = width
        layers.append(nn.MaxPool2d(2))
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
    return SLCNet(nn.Sequential(*layers), nn.Linear(in_channels, num_classes))


def _final_linear(net: nn.Module, num_classes: int) -> nn.Linear:
    """Take out the network's own last nn.Linear to k outputs (registered last in every torchvision
    classifier) and leave an Identity in its place, so the network now returns its features."""
    found = [(name, m) for name, m in net.named_modules() if isinstance(m, nn.Linear) and m.out_features == num_classes]
    if not found:
        raise ValueError(f"{type(net).__name__} has no final nn.Linear with {num_classes} outputs to use as head")
    name, linear = found[-1]
    net.set_submodule(name, nn.Identity())
    return linear


def _squeezenet_head(net: nn.Module, num_classes: int) -> nn.Linear:
    """SqueezeNet ends in a 1x1 conv + ReLU, not a linear layer: pool its 512 channels instead, and
    put an equivalent (same parameter count) nn.Linear on top, without the ReLU that would clip
    every logit at 0."""
    conv = net.classifier[1]
    net.classifier = nn.Sequential(nn.Dropout(p=0.5), nn.AdaptiveAvgPool2d(1))
    return nn.Linear(conv.in_channels, num_classes)


# Architecture-specific construction: options for the builder, and how to take the head off.
TORCHVISION_MODELS = list_models(module=torchvision.models)
_TORCHVISION_OPTIONS: dict[str, dict] = {
    "inception_v3": {"aux_logits": False, "init_weights": True},
    "googlenet": {"aux_logits": False, "init_weights": True},
}
# What torchvision's builders set themselves when they load weights (`_ovewrite_named_param`), so
# that our network has the pretrained one's structure: inception_v3 and googlenet were trained
# with their `transform_input` on, ViT at the weights' image size (384 or 512 for SWAG_E2E).
_PRETRAINED_OPTIONS: dict[str, Callable[[WeightsEnum], dict]] = {
    "inception_v3": lambda weights: {"transform_input": True},
    "googlenet": lambda weights: {"transform_input": True},
    **{name: lambda weights: {"image_size": weights.meta["min_size"][0]}
       for name in TORCHVISION_MODELS if name.startswith("vit_")},
}
_HEAD_SURGERY: dict[str, Callable[[nn.Module, int], nn.Linear]] = {
    "squeezenet1_0": _squeezenet_head,
    "squeezenet1_1": _squeezenet_head,
}
# Networks that take one input size only; every other one takes anything from its `min_size`
# (torchvision's weights metadata) upwards.
_EXACT_INPUT_SIZE: dict[type, Callable[[nn.Module], int]] = {
    VisionTransformer: lambda net: net.image_size,
    MaxVit: lambda net: 224,  # torchvision's maxvit_t is built for 224x224 (its partition sizes)
}


def pretrained_weights(name: str, weights: str) -> WeightsEnum:
    """The member `weights` of architecture `name`'s torchvision weights enum; only looked up, so
    that a typo fails when the model is built, before any download or training."""
    members = get_model_weights(name).__members__
    if weights not in members:
        raise ConfigError(f"model.weights = {weights!r} is not a weights of {name}: valid: {', '.join(members)}")
    return members[weights]


def torchvision_model(name: str, cfg: ModelConfig, input_shape: InputShape, num_classes: int) -> SLCNet:
    """A torchvision classifier by name, randomly initialised, its final layer as `head`.

    With `cfg.weights` it has the structure of those pretrained weights and a renormalising
    FitInput, but nothing is loaded or downloaded: load_trained, the export and the memory check
    rebuild models this way; training calls `slc.nn.pretrained.load_pretrained` once.
    """
    weights = pretrained_weights(name, cfg.weights) if cfg.weights is not None else None
    if input_shape[0] not in (1, 3):
        rgb = f" ({weights} was trained on 3-channel RGB images)" if weights else ""
        raise ValueError(f"{name} takes 1- or 3-channel images, got input shape {input_shape}{rgb}")
    options = _TORCHVISION_OPTIONS.get(name, {})
    if weights is not None and name in _PRETRAINED_OPTIONS:
        options = options | _PRETRAINED_OPTIONS[name](weights)
    net = get_model(name, weights=None, num_classes=num_classes, **options)
    exact = _EXACT_INPUT_SIZE.get(type(net))
    size = exact(net) if exact else get_model_weights(name).DEFAULT.meta["min_size"][0]
    head = _HEAD_SURGERY.get(name, _final_linear)(net, num_classes)
    fit = FitInput(input_shape[0], size, exact is not None, renormalise=weights is not None)
    return SLCNet(nn.Sequential(fit, net), head)


def _torchvision_builder(name: str) -> Callable[[ModelConfig, InputShape, int], SLCNet]:
    def build(cfg: ModelConfig, input_shape: InputShape, num_classes: int) -> SLCNet:
        return torchvision_model(name, cfg, input_shape, num_classes)
    build.__name__ = name
    return build


MODELS: dict[str, Callable[[ModelConfig, InputShape, int], SLCNet]] = {
    "mlp": mlp,
    "conv6": conv6,
    **{name: _torchvision_builder(name) for name in TORCHVISION_MODELS},
}


def build_model(cfg: ModelConfig, input_shape: InputShape, num_classes: int) -> SLCNet:
    """MODELS[cfg.name] (a name slc.params has checked) for this input shape and k, with its head:
    a cosine head keeps the layer's random rows (only their directions count) and starts its biases at 0."""
    net = MODELS[cfg.name](cfg, tuple(input_shape), num_classes)
    if cfg.head == "cosine":
        net.scale = cosine_scale(cfg, num_classes)
        nn.init.zeros_(net.head.bias)
    return net


def predict_logits(model: nn.Module, dataset, batch_size: int = 1024, device: torch.device | str = "cpu",
                   scale_shift: tuple[torch.Tensor, torch.Tensor] | None = None,
                   desc: str | None = None, workers: int = 0) -> np.ndarray:
    """All logits (n, k) of a dataset, float32, in its order, in eval mode (the model's mode is
    restored afterwards). `scale_shift` renormalises inputs first; `desc` shows a progress bar;
    `workers` read and decode batches in other processes."""
    return _predict(model, model, dataset, batch_size, device, scale_shift, desc, workers).numpy()


def predict_features(model: SLCNet, dataset, batch_size: int = 1024, device: torch.device | str = "cpu",
                     scale_shift: tuple[torch.Tensor, torch.Tensor] | None = None,
                     desc: str | None = None, workers: int = 0) -> torch.Tensor:
    """The backbone's features (n, d) of a dataset, as `predict_logits` computes its logits: what
    many-class scoring computes once and then multiplies by the head in chunks of classes."""
    return _predict(model, model.features, dataset, batch_size, device, scale_shift, desc, workers)


@torch.inference_mode()
def _predict(model: nn.Module, forward: Callable[[torch.Tensor], torch.Tensor], dataset, batch_size: int,
             device: torch.device | str, scale_shift: tuple[torch.Tensor, torch.Tensor] | None,
             desc: str | None, workers: int) -> torch.Tensor:
    """Outputs go straight into one tensor allocated at the first batch: kept per batch, small outputs
    between the large freed inputs fragment the heap, and 400,000 images left ~7 GB resident."""
    scale, shift = scale_shift if scale_shift is not None else (1.0, 0.0)
    was_training = model.training
    model.eval()
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers)
    result, start = None, 0
    for images, _ in tqdm(loader, desc=desc, leave=False, disable=None if desc else True):
        out = forward((images * scale + shift).to(device)).float().cpu()
        if result is None:
            result = torch.empty((len(dataset), *out.shape[1:]), dtype=out.dtype)
        result[start:start + len(out)] = out
        start += len(out)
    model.train(was_training)
    return result
