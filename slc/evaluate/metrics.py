"""SLC metrics: each class is scored on its own logit alone, as a one-vs-rest ranking problem.

Single logit classification asks "is this an example of class c?" from z_c(x) only, so every
metric here ranks all examples by one class's logit (positives: that class, negatives: the rest)
and then averages over classes, as in the paper. Definitions follow scikit-learn exactly
(`average_precision_score`, `precision_recall_curve`: a score >= threshold is predicted
positive, ties share one threshold) but all classes are done at once with one sort per chunk of
classes, so 1,000 classes x 50,000 examples take seconds instead of a per-class loop.

Policy for a class without positives in `labels`: its recall (and so AUPRC, precision at recall
and the threshold) is undefined, so its per-class values are NaN, it is left out of every mean,
and its id is listed under `classes_without_positives`. scikit-learn returns 0 with a warning
there, which would silently pull the mean down.
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np

# A non-aligned error below this is too small to divide by: the relative improvement over it is
# mostly noise (10,000 nearly separable synthetic classes gave ce 0.001 against bce 0.889: -36,757%).
MIN_RELATIVE_BASE = 0.005

# Elements per chunk of the (classes, examples) work arrays: ~32 MB per float64 array.
WORK_ELEMENTS = 1 << 22


def recall_key(recall: float) -> str:
    """The suffix every stage uses for a recall target (0.9 -> "0.9"), so names agree."""
    return f"{recall:g}"


def _check_inputs(logits: np.ndarray, labels: np.ndarray,
                  classes: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Checked logits, labels, and the class id of each column (all k classes unless `classes`)."""
    logits = np.asarray(logits)
    labels = np.asarray(labels)
    if logits.ndim != 2 or logits.shape[0] == 0:
        raise ValueError(f"logits must be a non-empty (n, k) array, got shape {logits.shape}")
    if labels.shape != (logits.shape[0],):
        raise ValueError(f"labels must have shape ({logits.shape[0]},) to match logits "
                         f"{logits.shape}, got {labels.shape}")
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be integer class ids, got dtype {labels.dtype}")
    k = logits.shape[1]
    if classes is None:
        classes = np.arange(k)
        if labels.min() < 0 or labels.max() >= k:
            raise ValueError(f"labels must lie in [0, {k}) for {k} logits, got range "
                             f"[{labels.min()}, {labels.max()}]; check that the model and the "
                             f"prepared data have the same classes")
    else:
        classes = np.asarray(classes)
        if classes.shape != (k,) or labels.min() < 0 or (k and classes.min() < 0):
            raise ValueError(f"classes must name the class of each of the {k} logit columns, and "
                             f"labels and classes must be >= 0; got classes of shape {classes.shape}")
    bad = np.count_nonzero(~np.isfinite(logits))
    if bad:
        raise ValueError(f"logits contain {bad} non-finite values (NaN or inf); the model "
                         f"diverged or the export is broken, so no ranking is meaningful")
    return logits, labels, classes


def _positives(labels: np.ndarray, classes: np.ndarray) -> np.ndarray:
    """Examples of each column's class."""
    return np.bincount(labels, minlength=int(classes.max()) + 1)[classes]


def _columns(labels: np.ndarray, classes: np.ndarray) -> np.ndarray:
    """Each example's column (the one of its class), -1 where its class has none."""
    column = np.full(max(int(classes.max()), int(labels.max())) + 1, -1)
    column[classes] = np.arange(len(classes))
    return column[labels]


def _sorted_curves(logits: np.ndarray, labels: np.ndarray, classes: np.ndarray
                   ) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]]:
    """Yield, per chunk of classes, what every PR quantity is built from.

    For columns `ids` (c,): scores sorted descending (c, n), cumulative true positives (c, n),
    a mask of the last index of each run of equal scores (the real thresholds, as in
    scikit-learn's `_binary_clf_curve`) (c, n), and the number of positives (c,).
    Rows are classes so each sort runs over contiguous memory.
    """
    n, k = logits.shape
    step = max(1, WORK_ELEMENTS // n)
    for start in range(0, k, step):
        ids = np.arange(start, min(start + step, k))
        scores = np.ascontiguousarray(logits[:, ids].T, dtype=np.float64)
        order = np.argsort(-scores, axis=1)  # order within ties is irrelevant: see last_of_run
        scores = np.take_along_axis(scores, order, axis=1)
        tps = np.cumsum(labels[order] == classes[ids, None], axis=1, dtype=np.float64)
        last_of_run = np.ones_like(scores, dtype=bool)
        last_of_run[:, :-1] = scores[:, :-1] != scores[:, 1:]
        yield ids, scores, tps, last_of_run, tps[:, -1].copy()


def _average_precision(tps: np.ndarray, last_of_run: np.ndarray, positives: np.ndarray) -> np.ndarray:
    """AP = sum over thresholds of (R_i - R_{i-1}) * P_i, i.e. scikit-learn's step integral.

    tps is non-decreasing along a row, so a running max of tps at thresholds gives the tps at
    the previous threshold; the gain in recall since then is what the precision here weighs.
    """
    at_thresholds = np.where(last_of_run, tps, 0.0)
    before = np.zeros_like(tps)
    before[:, 1:] = np.maximum.accumulate(at_thresholds, axis=1)[:, :-1]
    precision = tps / np.arange(1, tps.shape[1] + 1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.sum(np.where(last_of_run, (tps - before) * precision, 0.0), axis=1) / positives


def slc_metrics(logits: np.ndarray, labels: np.ndarray, recalls: Sequence[float] = (0.9, 0.99),
                classes: np.ndarray | None = None) -> dict:
    """Per-class and class-mean AUPRC and precision at each recall target, plus argmax accuracy.

    With `classes`, the columns of `logits` are those classes only (a sample of a many-class
    model's, every example still a negative of each); argmax accuracy needs all k and is omitted.

    Returns per-class float64 numpy arrays of length k under `auprc`,
    `precision_at_recall_<r>` and `threshold_at_recall_<r>` (the largest threshold whose recall
    is >= r, the one a deployment would calibrate), Python floats under `mean_auprc`,
    `mean_precision_at_recall_<r>` and `accuracy`, and `classes_without_positives` (list of
    ids, see the module docstring). `<r>` is `recall_key(r)`.
    """
    logits, labels, columns = _check_inputs(logits, labels, classes)
    for r in recalls:
        if not 0.0 < r <= 1.0:
            raise ValueError(f"recall targets must lie in (0, 1], got {r}")
    k = logits.shape[1]
    auprc = np.empty(k)
    precision_at = {r: np.empty(k) for r in recalls}
    threshold_at = {r: np.empty(k) for r in recalls}
    for ids, scores, tps, last_of_run, positives in _sorted_curves(logits, labels, columns):
        auprc[ids] = _average_precision(tps, last_of_run, positives)
        with np.errstate(invalid="ignore", divide="ignore"):
            recall = tps / positives[:, None]  # same expression as scikit-learn, same rounding
        rows = np.arange(len(ids))
        for r in recalls:
            first = np.argmax(last_of_run & (recall >= r), axis=1)
            precision_at[r][ids] = tps[rows, first] / (first + 1)
            threshold_at[r][ids] = scores[rows, first]
    missing = np.flatnonzero(_positives(labels, columns) == 0)
    auprc[missing] = np.nan
    result: dict = {"auprc": auprc, "mean_auprc": _mean(auprc, missing)}
    for r in recalls:
        precision_at[r][missing] = np.nan
        threshold_at[r][missing] = np.nan
        key = recall_key(r)
        result[f"precision_at_recall_{key}"] = precision_at[r]
        result[f"mean_precision_at_recall_{key}"] = _mean(precision_at[r], missing)
        result[f"threshold_at_recall_{key}"] = threshold_at[r]
    if classes is None:
        result["accuracy"] = float(np.mean(np.argmax(logits, axis=1) == labels))
    result["classes_without_positives"] = columns[missing].tolist()
    return result


def _mean(per_class: np.ndarray, missing: np.ndarray) -> float:
    keep = np.ones(len(per_class), dtype=bool)
    keep[missing] = False
    return float(np.mean(per_class[keep]))


def precision_recall_at(logits: np.ndarray, labels: np.ndarray, thresholds: np.ndarray,
                        classes: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Per-class precision and recall of the rule `z_c(x) >= thresholds[c]`.

    This is what a threshold calibrated on the validation split really delivers on the test
    split. Undefined values are NaN, not 0: precision when nothing is predicted positive
    (including a NaN threshold), recall when the class has no positives.
    """
    logits, labels, columns = _check_inputs(logits, labels, classes)
    thresholds = np.asarray(thresholds, dtype=np.float64)
    k = logits.shape[1]
    if thresholds.shape != (k,):
        raise ValueError(f"thresholds must have one value per class, shape ({k},), "
                         f"got {thresholds.shape}")
    predicted = np.zeros(k)
    true_positives = np.zeros(k)
    own = _columns(labels, columns)
    step = max(1, WORK_ELEMENTS // k)
    for start in range(0, len(labels), step):
        chunk = logits[start:start + step] >= thresholds
        predicted += chunk.sum(axis=0)
        rows = np.flatnonzero(own[start:start + step] >= 0)
        hits = chunk[rows, own[start + rows]].astype(np.float64)
        true_positives += np.bincount(own[start + rows], weights=hits, minlength=k)
    positives = _positives(labels, columns).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        precision = np.where(predicted > 0, true_positives / predicted, np.nan)
        recall = np.where(positives > 0, true_positives / positives, np.nan)
    return precision, recall


def pr_curve_mean(logits: np.ndarray, labels: np.ndarray, points: int = 101,
                  classes: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Mean over classes of the interpolated precision on a fixed recall grid, for plots.

    Interpolated precision at recall r is the best precision at any threshold whose recall is
    >= r, so each class's curve is non-increasing and curves of different classes (different
    thresholds) can be averaged point by point. Classes without positives are left out.
    Returns (recall grid, mean precision), both of length `points`.
    """
    if points < 2:
        raise ValueError(f"points must be >= 2 to span recall 0..1, got {points}")
    logits, labels, columns = _check_inputs(logits, labels, classes)
    grid = np.linspace(0.0, 1.0, points)
    total = np.zeros(points)
    counted = 0
    for _, _, tps, last_of_run, positives in _sorted_curves(logits, labels, columns):
        has = positives > 0
        tps, last_of_run, positives = tps[has], last_of_run[has], positives[has]
        precision = np.where(last_of_run, tps / np.arange(1, tps.shape[1] + 1), 0.0)
        best_from_here = np.maximum.accumulate(precision[:, ::-1], axis=1)[:, ::-1]
        recall = tps / positives[:, None]
        for row in range(len(recall)):  # a loop over classes only; searchsorted is per row
            first = np.searchsorted(recall[row], grid, side="left")
            total += best_from_here[row, first]
        counted += len(recall)
    return grid, total / counted


def logit_histograms(logits: np.ndarray, labels: np.ndarray, bins: int | np.ndarray = 100,
                     classes: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Counts of true-class logits and of all other logits on shared bin edges.

    PoLS holds when the two histograms do not overlap: then one threshold per model separates
    every true logit from every false one. Counts, not densities, so the totals can be
    checked; divide by `counts.sum() * np.diff(edges)` to plot densities.
    Returns `edges` (bins + 1,), `true` and `false` (bins,).
    """
    logits, labels, columns = _check_inputs(logits, labels, classes)
    own = _columns(labels, columns)
    rows = np.flatnonzero(own >= 0)
    true_logits = logits[rows, own[rows]]
    if np.ndim(bins) == 0:
        low, high = float(logits.min()), float(logits.max())
        edges = np.linspace(low, high if high > low else low + 1.0, int(bins) + 1)
    else:
        edges = np.asarray(bins, dtype=np.float64)
    everything, _ = np.histogram(logits, bins=edges)
    true_counts, _ = np.histogram(true_logits, bins=edges)
    return {"edges": edges, "true": true_counts, "false": everything - true_counts}


def pols_summary(per_loss: dict[str, dict[str, float]], aligned: set[str]) -> dict:
    """The paper's Table 1 row: mean errors of PoLS-aligned vs other losses, and the gain.

    `per_loss` maps a loss name to its class-mean metrics (the `mean_*` keys of
    `slc_metrics`, already averaged over seeds if there are several). Every `mean_<m>` key
    common to all losses becomes the error 1 - x under `<m>`, with `non_pols`, `pols` and
    `relative_improvement` = (non - pols) / non. When non < MIN_RELATIVE_BASE the ratio is not
    meaningful (non-aligned losses are already near perfect) and is None, which JSON writes as null.
    """
    pols = sorted(name for name in per_loss if name in aligned)
    non = sorted(name for name in per_loss if name not in aligned)
    if not pols or not non:
        raise ValueError(f"need at least one PoLS-aligned and one non-aligned loss to compare, "
                         f"got aligned {pols} and non-aligned {non}; add both kinds to "
                         f"grid.losses (aligned ones are {sorted(aligned)})")
    common = set.intersection(*(set(metrics) for metrics in per_loss.values()))
    names = sorted(key[len("mean_"):] for key in common if key.startswith("mean_"))
    if not names:
        raise ValueError(f"no 'mean_*' metric shared by all losses; got keys "
                         f"{sorted(set().union(*per_loss.values()))}")
    errors = {}
    for name in names:
        non_error = float(np.mean([1.0 - per_loss[loss][f"mean_{name}"] for loss in non]))
        pols_error = float(np.mean([1.0 - per_loss[loss][f"mean_{name}"] for loss in pols]))
        improvement = None if non_error < MIN_RELATIVE_BASE else (non_error - pols_error) / non_error
        errors[name] = {"non_pols": non_error, "pols": pols_error,
                        "relative_improvement": improvement}
    return {"pols_losses": pols, "non_pols_losses": non, "error": errors}
