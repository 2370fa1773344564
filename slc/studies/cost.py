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

from slc.core.config import Params
from slc.data.datasets import DATASETS, tuple_length
from slc.nn.models import build_model

TRAIN_STEP_FORWARDS = 3  # forward + backward (activation and weight gradients, each about one forward)

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
    """(training images, classes, input shape) of the preset's data, from the sizes on record."""
    data = params.data
    if data.name == "tuples":
        k = data.tuples.num_classes
        return k * data.tuples.train_per_class, k, (1, 28, 28 * tuple_length(k))
    known = DATASETS[data.name]
    if known.train_images is None:
        sized = ", ".join(name for name, d in DATASETS.items() if d.train_images is not None)
        raise ValueError(f"no size on record for data.name {data.name!r}; known: tuples, {sized}")
    shape = known.input_shape or (3, data.image_size, data.image_size)
    return round(known.train_images * (1 - data.val_fraction)), known.classes, shape


def training_cost(params: Params, tflops: float) -> TrainingCost:
    """The cost of every run of the preset's grid, at `tflops` sustained per GPU."""
    images, classes, shape = dataset_facts(params)
    forward = forward_flops(params, shape, classes)
    runs = len(params.grid.losses) * len(params.grid.seeds)
    total = TRAIN_STEP_FORWARDS * forward * images * params.train.epochs * runs
    per_gpu = tflops * 1e12
    return TrainingCost(forward / 1e9, images, params.train.epochs, runs, params.ray.num_workers, total / 1e15,
                        total / per_gpu / 3600, per_gpu / (TRAIN_STEP_FORWARDS * forward))
