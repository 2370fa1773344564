"""Where the head's rows start: the layer's random initialisation, or each class's mean feature.

With many classes a row is a positive only a few times an epoch, so a random row learns little
before training ends, and its class is never ranked first. Starting each row at its class's mean
feature ("imprinting", Qi, Brown & Lowe, CVPR 2018; label centroids in extreme classification,
PECOS's PIFA and NGAME) makes every row useful from the first step, and gives the backbone a
meaningful target. One pass of the backbone over the training images, in eval mode, unaugmented.
"""
from __future__ import annotations

import logging
import time

import numpy as np
import torch
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm  # not tqdm.auto, whose asyncio variant opens a second (unused) DataLoader iterator

from slc.data.prepared import PreparedSplit
from slc.nn.models import SLCNet

log = logging.getLogger(__name__)

HEAD_INITS = ("random", "class_mean")
BATCH = 1024  # images per forward pass


@torch.inference_mode()
def class_mean_rows(model: SLCNet, split: PreparedSplit, device: torch.device | str = "cpu",
                    workers: int = 0, per_class: int | None = None) -> float:
    """Set each row to the mean of its class's `model.features` over `split` (its first `per_class`
    images of each class, or all) and every bias to 0; returns the seconds it took. The features are
    summed batch by batch (k x d, never n x d: 4 M images would be 4 GB). A cosine head's features are
    unit vectors, so its row points at their mean direction. A class with no image in `split` keeps its
    random row, and a warning names it. A few images a class give most of the mean: at 400,000 classes,
    5 of the 20 take a quarter of the pass."""
    started = time.perf_counter()
    if per_class is not None:
        split = Subset(split, first_of_each_class(split.labels, per_class).tolist())
    was_training = model.training
    model.eval()
    weight = model.head.weight
    sums = torch.zeros_like(weight)
    counts = torch.zeros(weight.shape[0], dtype=torch.long, device=weight.device)
    loader = DataLoader(split, batch_size=BATCH, shuffle=False, num_workers=workers)
    for images, labels in tqdm(loader, desc="head rows from class means", leave=False, disable=None):
        labels = labels.to(weight.device)
        sums.index_add_(0, labels, model.features(images.to(device)).to(sums.dtype))
        counts.index_add_(0, labels, torch.ones_like(labels))
    seen = counts > 0
    weight[seen] = sums[seen] / counts[seen, None].to(sums.dtype)
    model.head.bias.zero_()
    unseen = (~seen).nonzero().flatten().tolist()
    if unseen:
        log.warning("train.head_init: class_mean: %d of %d classes have no training image (%s%s); their rows keep "
                    "their random start", len(unseen), len(seen), ", ".join(map(str, unseen[:10])),
                    ", ..." if len(unseen) > 10 else "")
    model.train(was_training)
    return time.perf_counter() - started


def first_of_each_class(labels: np.ndarray, per_class: int) -> np.ndarray:
    """The positions of each class's first `per_class` images (all of a class that has fewer), in order."""
    order = np.argsort(np.asarray(labels), kind="stable")
    ordered = np.asarray(labels)[order]
    starts = np.searchsorted(ordered, ordered, side="left")  # where each image's class begins in `order`
    return np.sort(order[np.arange(len(order)) - starts < per_class])
