"""What updates the weights: the optimizers (dense, and sparse for the head's sampled rows), the
per-step learning-rate schedule, and one optimisation step, the same for training and the studies.
"""
from __future__ import annotations

import functools
import math
from collections.abc import Callable

import torch

from slc.core.config import TrainConfig
from slc.nn.models import SLCNet

OPTIMIZERS: dict[str, Callable[..., torch.optim.Optimizer]] = {
    "adam": torch.optim.Adam,
    "adamw": torch.optim.AdamW,
    "sgd": functools.partial(torch.optim.SGD, momentum=0.9, nesterov=True),
}


# What updates the head's sparse gradient in sampled training: lazy Adam (the moments of a row move
# only when the row is a candidate); SGD without momentum, which is the same lazy or not.
SPARSE_OPTIMIZERS: dict[str, Callable[..., torch.optim.Optimizer]] = {
    "adam": torch.optim.SparseAdam,
    "adamw": torch.optim.SparseAdam,
    "sgd": torch.optim.SGD,
}


def make_optimizers(model: SLCNet, cfg: TrainConfig) -> list[torch.optim.Optimizer]:
    """One optimizer for all parameters; in sampled training, one for the backbone and one for the
    head's sparse gradient, which touches only the candidate rows."""
    if cfg.candidates is None:
        return [OPTIMIZERS[cfg.optimizer](model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)]
    head = list(model.head.parameters())
    backbone = [p for p in model.parameters() if all(p is not h for h in head)]
    return [OPTIMIZERS[cfg.optimizer](backbone, lr=cfg.lr, weight_decay=cfg.weight_decay),
            SPARSE_OPTIMIZERS[cfg.optimizer](head, lr=cfg.lr)]


# The learning rate's factor at a fraction of the steps after warm-up (0 at the first, ->1 at the last).
LR_SCHEDULES: dict[str, Callable[[float], float]] = {
    "constant": lambda progress: 1.0,
    "cosine": lambda progress: 0.5 * (1.0 + math.cos(math.pi * progress)),
    "step": lambda progress: 0.1 ** int(3 * progress),  # torchvision's ImageNet recipe: x0.1 at epochs 30 and 60 of 90
}


def make_schedulers(optimizers: list[torch.optim.Optimizer], cfg: TrainConfig,
                    steps_per_epoch: int) -> list[torch.optim.lr_scheduler.LRScheduler]:
    """A per-step learning rate: linear warm-up over `warmup_epochs`, then `lr_schedule`."""
    warmup, total = cfg.warmup_epochs * steps_per_epoch, cfg.epochs * steps_per_epoch

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return LR_SCHEDULES[cfg.lr_schedule]((step - warmup) / max(1, total - warmup))
    return [torch.optim.lr_scheduler.LambdaLR(optimizer, factor) for optimizer in optimizers]


def optimize(loss: torch.Tensor, optimizers: list[torch.optim.Optimizer],
             schedulers: list[torch.optim.lr_scheduler.LRScheduler] = ()) -> None:
    """One step: gradients of `loss`, then every optimizer, then every per-step schedule."""
    for optimizer in optimizers:
        optimizer.zero_grad(set_to_none=True)
    loss.backward()
    for optimizer in optimizers:
        optimizer.step()
    for scheduler in schedulers:
        scheduler.step()
