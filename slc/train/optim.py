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


class RowAdam(torch.optim.Optimizer):
    """Lazy Adam for a gradient of some rows (`slc.nn.candidates.SparseRows`), with a step count per row.

    Only the rows in the gradient move, and their moments with them. torch.optim.SparseAdam keeps one
    step count per tensor, so a row first touched at step 1,000 was bias-corrected as if it had moved
    1,000 times (FBGEMM keeps counters per row for this reason), and it coalesced and masked the sparse
    gradient every step: 15-20 ms of a 45 ms step at 1,280 rows. Here a step is three gathers and
    three index_copy_ calls on the rows alone, which must be distinct (SparseRows' are).
    """

    def __init__(self, params, lr: float, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8):
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps})

    @torch.no_grad()
    def step(self, closure=None) -> None:
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for param in group["params"]:
                if param.grad is None:
                    continue
                rows, grad = param.grad._indices()[0], param.grad._values()
                state = self.state[param]
                if not state:
                    state.update(step=torch.zeros(param.shape[0], device=param.device),
                                 exp_avg=torch.zeros_like(param), exp_avg_sq=torch.zeros_like(param))
                count = state["step"][rows] + 1
                exp_avg = state["exp_avg"][rows].lerp_(grad, 1 - beta1)
                exp_avg_sq = state["exp_avg_sq"][rows].mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                for key, value in (("step", count), ("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq)):
                    state[key].index_copy_(0, rows, value)
                per_row = (-1,) + (1,) * (param.dim() - 1)
                corrected_sq = exp_avg_sq / (1 - beta2 ** count).view(per_row)
                update = exp_avg / (1 - beta1 ** count).view(per_row) / (corrected_sq.sqrt_() + group["eps"])
                param.index_add_(0, rows, update, alpha=-group["lr"])


# What updates the head's rows in sampled training, by train.optimizer: Adam with a step count per row
# (weight decay would touch every row, so sampled training refuses it); SGD without momentum, which is
# the same lazy or not.
SPARSE_OPTIMIZERS: dict[str, Callable[..., torch.optim.Optimizer]] = {
    "adam": RowAdam,
    "adamw": RowAdam,
    "sgd": torch.optim.SGD,
}


def make_optimizers(model: SLCNet, cfg: TrainConfig) -> list[torch.optim.Optimizer]:
    """One optimizer, the head's rows at `train.head_lr` (null: `train.lr`); in sampled training, one
    for the backbone and one for the head's sparse gradient, which touches only the candidate rows."""
    head = list(model.head.parameters())
    backbone = [p for p in model.parameters() if all(p is not h for h in head)]
    head_lr = cfg.lr if cfg.head_lr is None else cfg.head_lr
    dense = OPTIMIZERS[cfg.optimizer]
    if cfg.candidates is None:
        return [dense([{"params": backbone}, {"params": head, "lr": head_lr}], lr=cfg.lr,
                      weight_decay=cfg.weight_decay)]
    return [dense(backbone, lr=cfg.lr, weight_decay=cfg.weight_decay), SPARSE_OPTIMIZERS[cfg.optimizer](head, lr=head_lr)]


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
