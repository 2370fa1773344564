"""One logit per class at any k, in bounded memory: features once, then the head in class chunks.

A test set's whole (n, k) logit matrix takes n*k*4 bytes: 640 GB for 400,000 images and classes.
Here the backbone runs once per split, and the head is applied to a chunk of classes at a time, so
memory holds the features (n, d), the head (k, d) and LOGITS_PER_CHUNK logits, whatever k is. The
paper's metrics rank every example by one class's logit; they are computed for every class, or
for a seeded sample of classes (`evaluate.classes`), each still ranked over every example. A
threshold at recall r needs only the positives' logits, so every class gets one either way.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from slc.evaluate.metrics import logit_histograms, pr_curve_mean, precision_recall_at, recall_key, slc_metrics
from slc.nn.models import SLCNet

LOGITS_PER_CHUNK = 1 << 25  # logits per chunk of classes: 128 MB of float32
ROW_BATCH = 1024          # rows per matmul: the batch predict_logits runs the whole model on


@dataclass(frozen=True)
class Head:
    """The final layer's rows, detached and on the CPU (where features are): what scoring multiplies."""
    weight: Tensor  # (k, d)
    bias: Tensor    # (k,)

    @classmethod
    def of(cls, model: SLCNet) -> Head:
        """The rows as the model's logits use them (a cosine head's scaled unit rows)."""
        weight, bias = model.rows()
        return cls(weight.detach().cpu(), bias.detach().cpu())

    @property
    def num_classes(self) -> int:
        return len(self.bias)


def logits_of(features: Tensor, head: Head, classes: np.ndarray | None) -> np.ndarray:
    """(n, c) float32 logits of `classes` (all k when None), row batch by row batch. For all
    classes this is exactly the model's own forward (F.linear) on the same batches."""
    weight, bias = (head.weight, head.bias) if classes is None else \
        (head.weight[torch.as_tensor(classes)], head.bias[torch.as_tensor(classes)])
    with torch.inference_mode():
        return torch.cat([F.linear(features[i:i + ROW_BATCH], weight, bias)
                          for i in range(0, len(features), ROW_BATCH)]).numpy()


def chunks_of(classes: np.ndarray | None, num_classes: int, n: int) -> list[np.ndarray | None]:
    """The classes in chunks of at most LOGITS_PER_CHUNK logits; [None] when all k fit in one."""
    if classes is None and n * num_classes <= LOGITS_PER_CHUNK:
        return [None]
    ids = np.arange(num_classes) if classes is None else classes
    return np.array_split(ids, -(-len(ids) * n // LOGITS_PER_CHUNK))


def true_logits(features: Tensor, labels: np.ndarray, head: Head) -> np.ndarray:
    """Each example's logit of its own class: O(n d) whatever k is, and where all k logits fit in
    one chunk, read from them, so that thresholds are exactly values of the logit matrix."""
    if chunks_of(None, head.num_classes, len(labels)) == [None]:
        return logits_of(features, head, None)[np.arange(len(labels)), labels]
    rows = torch.as_tensor(labels)
    with torch.inference_mode():
        return ((features * head.weight[rows]).sum(dim=1) + head.bias[rows]).numpy()


def top1_accuracy(features: Tensor, labels: np.ndarray, head: Head) -> float:
    """Argmax over all k classes, a chunk of classes at a time (a running best, first index on ties)."""
    best = np.full(len(labels), -np.inf, dtype=np.float32)
    best_class = np.zeros(len(labels), dtype=np.int64)
    num_classes = head.num_classes
    for chunk in chunks_of(None, num_classes, len(labels)):
        ids = np.arange(num_classes) if chunk is None else chunk
        logits = logits_of(features, head, chunk)
        top = logits.argmax(axis=1)
        value = logits[np.arange(len(labels)), top]
        better = value > best
        best[better], best_class[better] = value[better], ids[top[better]]
    return float(np.mean(best_class == labels))


def thresholds_at_recall(positives_logits: np.ndarray, labels: np.ndarray, num_classes: int,
                         recalls: Sequence[float]) -> dict[str, np.ndarray]:
    """Per class and recall target r, the largest threshold whose recall is >= r: the ceil(r P)-th
    largest logit of the class's P positives (as `slc_metrics`; NaN for a class without any)."""
    order = np.lexsort((-positives_logits, labels))  # by class, then logit descending
    counts = np.bincount(labels, minlength=num_classes)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    result = {}
    for r in recalls:
        threshold = np.full(num_classes, np.nan)
        has = counts > 0
        # the smallest number of positives p with p / P >= r, with the same division slc_metrics does
        needed = np.ceil(r * counts[has]).astype(np.int64)
        needed += (needed / counts[has] < r)
        needed -= (needed > 1) & ((needed - 1) / counts[has] >= r)
        threshold[has] = positives_logits[order[starts[has] + needed - 1]]
        result[recall_key(r)] = threshold
    return result


@dataclass
class ClassScores:
    """What evaluation keeps of one split's logits: per-class figures of the scored classes."""
    classes: np.ndarray                     # the scored classes (every class, or a sample)
    metrics: dict[str, np.ndarray]          # slc_metrics' per-class arrays, over `classes`
    precision_at: dict[str, np.ndarray]     # recall_key -> test precision at the given thresholds
    recall_at: dict[str, np.ndarray]        # recall_key -> test recall at the given thresholds
    accuracy: float                         # argmax over all k, on the scored classes' examples
    pr_curve: tuple[np.ndarray, np.ndarray]
    histogram: dict[str, np.ndarray]
    means: dict[str, float]                 # slc_metrics' mean_* over `classes`


def score_classes(features: Tensor, labels: np.ndarray, head: Head, classes: np.ndarray | None,
                  recalls: Sequence[float], hist_bins: int,
                  thresholds: dict[str, np.ndarray] | None = None) -> ClassScores:
    """The paper's metrics for `classes` (all when None), each ranked over every example, in chunks.

    The histogram's edges span the first chunk's logits (all of them when there is one chunk);
    a logit outside falls into the end bins, so no count is lost. `thresholds` (per class, all k)
    give the precision each one really delivers here.
    """
    num_classes = head.num_classes
    chunks = chunks_of(classes, num_classes, len(labels))
    per_class: dict[str, list[np.ndarray]] = {}
    precision_at: dict[str, list[np.ndarray]] = {key: [] for key in (thresholds or {})}
    recall_at: dict[str, list[np.ndarray]] = {key: [] for key in (thresholds or {})}
    curves, histogram, edges = [], None, hist_bins
    for chunk in chunks:
        logits = logits_of(features, head, chunk)
        m = slc_metrics(logits, labels, recalls, classes=chunk)
        for key, value in m.items():
            if isinstance(value, np.ndarray):
                per_class.setdefault(key, []).append(value)
        ids = np.arange(num_classes) if chunk is None else chunk
        for key, threshold in (thresholds or {}).items():
            precision, recall = precision_recall_at(logits, labels, threshold[ids], classes=chunk)
            precision_at[key].append(precision)
            recall_at[key].append(recall)
        with_positives = len(ids) - len(m["classes_without_positives"])
        if with_positives:
            curves.append((pr_curve_mean(logits, labels, classes=chunk), with_positives))
        if histogram is None:
            histogram = logit_histograms(logits, labels, hist_bins, classes=chunk)
            edges = histogram["edges"]
        else:
            part = logit_histograms(np.clip(logits, edges[0], edges[-1]), labels, edges, classes=chunk)
            histogram["true"] += part["true"]
            histogram["false"] += part["false"]
    scored = np.arange(num_classes) if classes is None else classes
    metrics = {key: np.concatenate(arrays) for key, arrays in per_class.items()}
    examples = np.flatnonzero(np.isin(labels, scored))
    accuracy = top1_accuracy(features[examples], labels[examples], head) if len(examples) else float("nan")
    means = {f"mean_{key}": float(np.mean(value[np.isfinite(value)])) if np.isfinite(value).any() else float("nan")
             for key, value in metrics.items() if not key.startswith("threshold")}
    joined = lambda parts: {key: np.concatenate(arrays) for key, arrays in parts.items()}
    return ClassScores(scored, metrics, joined(precision_at), joined(recall_at), accuracy, _mean_curve(curves),
                       histogram, means)


def _mean_curve(curves: list[tuple[tuple[np.ndarray, np.ndarray], int]]) -> tuple[np.ndarray, np.ndarray]:
    """The chunks' mean PR curves, weighted by their classes with positives (one chunk: as it is)."""
    if len(curves) == 1:
        return curves[0][0]
    grid = np.linspace(0.0, 1.0, 101)
    counted = sum(count for _, count in curves)
    return grid, sum(mean * count for (_, mean), count in curves) / max(counted, 1)
