"""Search's quality as a user sees it: a prepared split indexed through a run's export and searched for
every class (a seeded sample at many classes) at each recall target the export has thresholds for.

The precision and recall of what a search finds are compared with evaluate's rule on the same
thresholds: slc.evaluate.metrics.precision_recall_at on the export's own logits of every image
(single_logit.onnx, a pass per class), as tests/serving/test_search.py checks it; and, where the
evaluate stage's thresholds_test.json is given, with the figures it wrote. A value undefined on one
side only (no image found, no positive) counts as a difference of 1. Also the README's example: what
one class's search at one recall returns with each of two runs.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from serving.index_build import build
from serving.model import SingleLogitModel
from serving.search import SearchIndex
from slc.core.sampling import class_sample
from slc.data.prepared import PreparedData
from slc.evaluate.metrics import precision_recall_at, recall_key

CHUNK = 4096  # images read, or scored, at once


def split_source(data_dir: Path, split: str, out: Path) -> tuple[np.ndarray, np.ndarray]:
    """A prepared split's raw images written to `out` as an index source (.npy, (N, C, H, W) as stored,
    memory-mapped back), and its labels: every storage kind, arrays, tuples or image files, becomes one."""
    prepared = PreparedData(data_dir).split(split)
    n = len(prepared)
    first = prepared.stored.fetch(np.arange(1))
    images = np.lib.format.open_memmap(out, mode="w+", dtype=first.dtype, shape=(n, *first.shape[1:]))
    for start in range(0, n, CHUNK):
        images[start:start + CHUNK] = prepared.stored.fetch(np.arange(start, min(start + CHUNK, n)))
    images.flush()
    return np.load(out, mmap_mode="r"), np.asarray(prepared.labels)


def reference_logits(model: SingleLogitModel, images: np.ndarray, classes: np.ndarray) -> np.ndarray:
    """(N, len(classes)) logits of every image through the export's single_logit.onnx, independent of the index."""
    logits = np.empty((len(images), len(classes)), np.float32)
    for start in range(0, len(images), CHUNK):
        batch = images[start:start + CHUNK]
        for column, class_id in enumerate(classes):
            logits[start:start + len(batch), column] = model.score(batch, int(class_id))
    return logits


def searched(index: SearchIndex, labels: np.ndarray, classes: np.ndarray,
             thresholds: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """Precision and recall of each class's search at its threshold (NaN where undefined), and the images found."""
    positives = np.bincount(labels, minlength=index.model.num_classes)
    precision, recall = np.full(len(classes), np.nan), np.full(len(classes), np.nan)
    found = 0
    for column, class_id in enumerate(classes):
        ids = index.search(int(class_id), threshold=float(thresholds[class_id])).ids
        right = np.count_nonzero(labels[ids] == class_id)
        found += len(ids)
        if len(ids):
            precision[column] = right / len(ids)
        if positives[class_id]:
            recall[column] = right / positives[class_id]
    return precision, recall, found


def worst_difference(a: np.ndarray, b: np.ndarray) -> float:
    """The largest |a - b| over classes; NaN on both sides agrees, NaN on one side only counts as 1."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    one = np.isnan(a) ^ np.isnan(b)
    difference = np.where(one, 1.0, np.nan_to_num(np.abs(a - b), nan=0.0))
    return float(difference.max()) if difference.size else 0.0


def run_quality(index: SearchIndex, images: np.ndarray, labels: np.ndarray, classes: np.ndarray,
                stage_figures: dict | None = None, thresholds: dict[str, np.ndarray] | None = None) -> dict:
    """One run's search against evaluate's rule, per recall target: the worst difference of precision and
    recall over `classes`, and against the evaluate stage's `stage_figures` (its thresholds_test.json entry for
    this run) where given. `thresholds` ({recall key: (k,)}) replaces the export's on the search side only."""
    model = index.model
    logits = reference_logits(model, images, classes)
    out = {"loss": model.manifest.loss, "classes": len(classes), "recalls": {}, "precision": {}}
    for recall in model.recalls:
        key = recall_key(recall)
        calibrated = model.thresholds(recall)
        have = np.isfinite(calibrated[classes])  # a class without a threshold cannot be searched at this recall
        chosen = classes[have]
        used = calibrated if thresholds is None else thresholds[key]
        precision, recall_of, found = searched(index, labels, chosen, used)
        row = {"compared": int(have.sum()), "skipped": int((~have).sum()), "found": found, "max_abs_diff": 0.0,
               "max_abs_diff_evaluate_file": None}
        if len(chosen):
            reference = precision_recall_at(logits[:, have], labels, calibrated[chosen], chosen)
            row["max_abs_diff"] = max(worst_difference(precision, reference[0]), worst_difference(recall_of, reference[1]))
        if stage_figures is not None and len(chosen):
            stage = stage_figures[key]
            row["max_abs_diff_evaluate_file"] = max(
                worst_difference(mine, np.asarray(stage[name], np.float64)[chosen])
                for mine, name in ((precision, "precision"), (recall_of, "recall")))
        out["recalls"][key] = row
        out["precision"][key] = dict(zip(chosen.tolist(), precision.tolist()))
    out["max_abs_diff"] = max((row["max_abs_diff"] for row in out["recalls"].values()), default=0.0)
    file_diffs = [row["max_abs_diff_evaluate_file"] for row in out["recalls"].values()
                  if row["max_abs_diff_evaluate_file"] is not None]
    out["max_abs_diff_evaluate_file"] = max(file_diffs) if file_diffs else None
    return out


def summary(runs: dict[str, dict]) -> dict:
    """The worst difference per loss (over its seeds) and over everything: what metrics/search.json's `quality` leads with."""
    losses: dict[str, dict] = {}
    for run, result in runs.items():
        at = losses.setdefault(result["loss"], {"runs": [], "max_abs_diff": 0.0, "max_abs_diff_evaluate_file": None})
        at["runs"].append(run)
        at["max_abs_diff"] = max(at["max_abs_diff"], result["max_abs_diff"])
        if result["max_abs_diff_evaluate_file"] is not None:
            at["max_abs_diff_evaluate_file"] = max(at["max_abs_diff_evaluate_file"] or 0.0,
                                                   result["max_abs_diff_evaluate_file"])
    file_diffs = [at["max_abs_diff_evaluate_file"] for at in losses.values() if at["max_abs_diff_evaluate_file"] is not None]
    return {"max_abs_diff": max((at["max_abs_diff"] for at in losses.values()), default=0.0),
            "max_abs_diff_evaluate_file": max(file_diffs) if file_diffs else None, "losses": losses}


def hardest_class(runs: list[dict], key: str) -> int:
    """The class whose search is least precise at recall `key`, on average over `runs`: where a loss shows most."""
    precision: dict[int, list[float]] = {}
    for result in runs:
        for class_id, value in result["precision"][key].items():
            precision.setdefault(class_id, []).append(value)
    def mean(class_id: int) -> float:  # a class no run found anything of has no precision: never the hardest
        values = np.asarray(precision[class_id], np.float64)
        return float(values[np.isfinite(values)].mean()) if np.isfinite(values).any() else np.inf

    return min(precision, key=lambda class_id: (mean(class_id), class_id))


def example(index: SearchIndex, labels: np.ndarray, class_id: int, recall: float, shown: int) -> dict:
    """What one class's search at `recall` returns: how many images, how many of the class, and the ids of
    the `shown` best and the `shown` last found (those nearest the threshold), each marked right or not."""
    hits = index.search(class_id, recall=recall)
    right = labels[hits.ids] == class_id
    best, last = slice(0, shown), slice(max(shown, len(hits.ids) - shown), len(hits.ids))
    return {"run": index.model.run_name, "loss": index.model.manifest.loss, "class_id": class_id,
            "class_name": index.model.class_names[class_id], "recall_target": recall, "threshold": hits.threshold,
            "found": hits.total, "right": int(right.sum()), "positives": int(np.count_nonzero(labels == class_id)),
            "best": hits.ids[best].tolist(), "best_right": right[best].tolist(),
            "last": hits.ids[last].tolist(), "last_right": right[last].tolist()}


def quality_of_runs(exports: dict[str, Path], source: Path, images: np.ndarray, labels: np.ndarray, folder: Path,
                    most_classes: int, threads: int, stage: dict | None) -> dict[str, dict]:
    """Each run's `run_quality`, its index of `source` (the split `images` were written to) built in `folder`/<run>;
    every class up to `most_classes`, else the seeded sample of that many."""
    runs = {}
    for name, export in exports.items():
        print(f"quality: {name}: indexing {source.name}, searching each class", flush=True)
        build(export, source, folder / name, threads=threads)
        index = SearchIndex.open(folder / name, threads=threads)
        k = index.model.num_classes
        classes = class_sample(k, most_classes)
        runs[name] = run_quality(index, images, labels, np.arange(k) if classes is None else classes,
                                 None if stage is None else stage.get(name))
    return runs


def examples_of(runs: dict[str, dict], folder: Path, labels: np.ndarray, names: list[str], class_id: int | None,
                recall: float, shown: int) -> list[dict]:
    """The README example with each of the runs `names` (indexed in `folder` by quality_of_runs); the class by
    default the one they find least precisely."""
    if class_id is None:
        class_id = hardest_class([runs[name] for name in names], recall_key(recall))
    return [example(SearchIndex.open(folder / name), labels, class_id, recall, shown) for name in names]
