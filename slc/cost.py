"""What a preset's training would cost on GPUs: counted FLOPs, and hours at an assumed throughput.

Nothing here is measured on a GPU (none is on the machines this project is tested on): the
forward pass's FLOPs are counted by torch's FlopCounterMode on the preset's own network and
input size, a training step costs about three forward passes (forward, and the backward's
gradients for the activations and for the weights), and hours follow from a sustained per-GPU
throughput the caller assumes. The images a GPU would then consume each second are what the
data loader has to deliver (compare `make dataloading`).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils.flop_counter import FlopCounterMode

from slc.config import Params
from slc.models import build_model

TRAIN_STEP_FORWARDS = 3  # forward + backward (activation and weight gradients, each about one forward)

# The public datasets' training images, classes and network input (before `data.val_fraction` is carved off).
DATASET_FACTS: dict[str, tuple[int, int, tuple[int, int, int] | None]] = {
    "mnist": (60_000, 10, (1, 28, 28)),
    "fashion_mnist": (60_000, 10, (1, 28, 28)),
    "svhn": (73_257, 10, (3, 32, 32)),
    "cifar10": (50_000, 10, (3, 32, 32)),
    "cifar100": (50_000, 100, (3, 32, 32)),
    "imagenet": (1_281_167, 1000, None),  # None: data.image_size square RGB
}


@dataclass(frozen=True)
class TrainingCost:
    forward_gflop: float  # one image's forward pass
    images_per_epoch: int
    epochs: int
    runs: int  # losses x seeds
    gpus_per_run: int
    total_pflop: float
    gpu_hours: float  # at the assumed throughput, every run
    images_per_s_per_gpu: float  # what the loader must deliver to each GPU at that throughput


def forward_flops(params: Params, input_shape: tuple[int, int, int], num_classes: int) -> float:
    """FLOPs (multiply and add counted apart) of one image through the preset's network."""
    model = build_model(params.model, input_shape, num_classes).eval()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.zeros(1, *input_shape))
    return float(counter.get_total_flops())


def dataset_facts(params: Params) -> tuple[int, int, tuple[int, int, int]]:
    """(training images, classes, input shape) of the preset's data."""
    data = params.data
    if data.name == "tuples":
        t = len(str(data.tuples.num_classes - 1))
        return data.tuples.num_classes * data.tuples.train_per_class, data.tuples.num_classes, (1, 28, 28 * t)
    if data.name not in DATASET_FACTS:
        raise ValueError(f"no size on record for data.name {data.name!r}; known: tuples, {', '.join(DATASET_FACTS)}")
    images, classes, shape = DATASET_FACTS[data.name]
    return round(images * (1 - data.val_fraction)), classes, shape or (3, data.image_size, data.image_size)


def training_cost(params: Params, tflops: float) -> TrainingCost:
    """The cost of every run of the preset's grid, at `tflops` sustained per GPU."""
    images, classes, shape = dataset_facts(params)
    forward = forward_flops(params, shape, classes)
    runs = len(params.grid.losses) * len(params.grid.seeds)
    total = TRAIN_STEP_FORWARDS * forward * images * params.train.epochs * runs
    per_gpu = tflops * 1e12
    return TrainingCost(forward / 1e9, images, params.train.epochs, runs, params.ray.num_workers, total / 1e15,
                        total / per_gpu / 3600, per_gpu / (TRAIN_STEP_FORWARDS * forward))
