"""Sampled training: each step scores a candidate set of classes, not all k.

The candidate set of a batch is its true classes plus `n` negatives drawn uniformly without
replacement from all k classes, one set shared by every example of the batch. A class is in the
set with a known probability (1 for the batch's true classes, n/k for any other), which is what
the losses' corrections divide by (see `slc.nn.losses`); with n = k every class is in it and every
loss is exactly its full form. Only the candidate rows of the head are read, and their gradient
is a sparse tensor, so a row optimizer (`slc.train.optim.SPARSE_OPTIMIZERS`) updates those
rows alone: a step costs the same at k = 1,000 and k = 1,000,000.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class Candidates:
    """The classes one step scores, and what the losses need to correct for having sampled them."""
    classes: Tensor        # (s,) sorted class ids: the batch's true classes and the sampled negatives
    targets: Tensor        # (m,) each example's true class as a column of `classes`
    log_inclusion: Tensor  # (s,) log P(class in the set): 0 for the batch's true classes, log(n/k) else
    noise: Tensor          # (n,) columns of the sampled negatives (nce's noise draws; may be true classes)
    log_noise_rate: float  # log(n/k) = log(n q(j)) for the uniform q the negatives are drawn from


def draw_uniform(num_classes: int, n: int, generator: torch.Generator) -> Tensor:
    """n distinct classes, uniformly at random, in O(n log n) for n << k (no k-long permutation)."""
    if 4 * n > num_classes:
        return torch.randperm(num_classes, generator=generator)[:n]
    while True:  # the distinct values of iid uniform draws are a uniform subset of their size
        distinct = torch.unique(torch.randint(num_classes, (2 * n + 16,), generator=generator))
        if len(distinct) >= n:
            return distinct[torch.randperm(len(distinct), generator=generator)[:n]]


def draw_candidates(targets: Tensor, num_classes: int, n: int, generator: torch.Generator) -> Candidates:
    """The batch's true classes plus n uniform negatives (from `generator`, on the CPU)."""
    if not 1 <= n <= num_classes:
        raise ValueError(f"candidates must lie in 1..{num_classes} (the number of classes), got {n}")
    device = targets.device
    negatives = draw_uniform(num_classes, n, generator).to(device)
    classes, inverse = torch.unique(torch.cat([targets, negatives]), return_inverse=True)
    log_rate = math.log(n / num_classes)
    log_inclusion = torch.full((len(classes),), log_rate, device=device)
    log_inclusion[inverse[:len(targets)]] = 0.0
    return Candidates(classes, inverse[:len(targets)], log_inclusion, inverse[len(targets):], log_rate)


class SparseRows(torch.autograd.Function):
    """table[rows] whose gradient is a sparse tensor holding only those rows, for the row optimizers
    of `slc.train.optim`. `rows` must be distinct (as `Candidates.classes` are): those optimizers read
    the gradient's rows as they are, without coalescing (sorting and merging) them."""

    @staticmethod
    def forward(ctx, table: Tensor, rows: Tensor) -> Tensor:
        ctx.save_for_backward(rows)
        ctx.shape = table.shape
        return table[rows]

    @staticmethod
    def backward(ctx, grad: Tensor):
        rows, = ctx.saved_tensors
        return torch.sparse_coo_tensor(rows[None], grad, ctx.shape, check_invariants=False), None
