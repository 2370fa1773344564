"""Evaluation: how well does one logit alone answer "is this class c?", per trained model.

Each finished trial's validation and test logits are computed once; from them come the paper's
errors (1-AUPRC, 1-P@r on test), per-class thresholds for each recall target (chosen on
validation, the split a deployment calibrates on) and what those thresholds really give on test,
the PoLS-aligned vs non-aligned comparison of Table 1, and the plots. Logits are dropped after
each run, so memory stays at one run's logits whatever the grid size.

The data may be another prepared dataset than the one trained on (`--data`), as long as it has
the same classes in the same order and the same input shape; its images are re-normalised with
the statistics the model was trained with, so the model sees what it saw in training.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from torch import Tensor
from tqdm import tqdm

from slc.core import tracking
from slc.core.config import EvaluateConfig
from slc.core.errors import PipelineError
from slc.core.files import finite_or_none, write_json, write_text_atomic
from slc.core.records import read_trials
from slc.core.sampling import class_sample
from slc.data.prepared import PreparedData, renormalisation
from slc.evaluate.metrics import pols_summary, recall_key
from slc.evaluate.scoring import Head, score_classes, thresholds_at_recall, true_logits
from slc.evaluate.table1 import error_names, paper_means, table1_markdown, write_plot_data, write_plot_pngs
from slc.nn.losses import POLS_ALIGNED
from slc.nn.models import predict_features
from slc.nn.trained import load_trained


class EvaluateError(PipelineError, RuntimeError):
    """Inputs that cannot be evaluated: a malformed trials.json, data with other classes."""


@dataclass
class RunResult:
    """Everything kept of one run once its logits are dropped."""
    class_means: dict[str, float]            # slc_metrics' mean_* on test, for pols_summary
    metrics: dict[str, float]                # flat numbers: slc.json `runs` and MLflow
    thresholds: dict[str, list[float]]       # recall_key -> per-class threshold from val
    thresholds_test: dict[str, dict]         # recall_key -> per-class test precision, recall
    pr_curve: tuple[np.ndarray, np.ndarray]  # recall grid, mean precision over classes
    histogram: dict[str, np.ndarray]         # edges, true, false (test logits)


def check_same_classes(info: dict, data: PreparedData) -> None:
    """A logit means a class only through its position: other names or order would be misread."""
    run = info.get("run_name", "?")
    if list(info["class_names"]) != list(data.class_names):
        diff = next((i for i, (a, b) in enumerate(zip(info["class_names"], data.class_names)) if a != b),
                    min(len(info["class_names"]), len(data.class_names)))
        raise EvaluateError(
            f"{run} was trained on {len(info['class_names'])} classes {info['class_names'][:5]}... but "
            f"{data.root} has {len(data.class_names)} classes {data.class_names[:5]}... (first "
            f"difference at class {diff}); evaluate on data prepared with the same classes in the "
            f"same order")
    if tuple(info["input_shape"]) != tuple(data.input_shape):
        raise EvaluateError(f"{run} takes images of shape {tuple(info['input_shape'])} but {data.root} "
                            f"has {tuple(data.input_shape)}; prepare the data at the model's image size")


def _nan_stat(fn, values: np.ndarray) -> float:
    """mean/min over classes that have a value; NaN (JSON null) when none has."""
    values = values[np.isfinite(values)]
    return float(fn(values)) if len(values) else float("nan")


def evaluate_features(val_features: Tensor, val_labels: np.ndarray, test_features: Tensor, test_labels: np.ndarray,
                      head: Head, classes: np.ndarray | None, recalls: list[float], hist_bins: int) -> RunResult:
    """One run's results from its features and head (so it is tested without a backbone).

    Errors and accuracy are over `classes` (every class when None); thresholds, and the recall
    they give on test, are for every class (they need only the positives' logits); the precision a
    threshold gives on test needs every example's logit of that class, so it is NaN for a class
    outside `classes`.
    """
    num_classes = head.num_classes
    thresholds = thresholds_at_recall(true_logits(val_features, val_labels, head), val_labels, num_classes, recalls)
    test = score_classes(test_features, test_labels, head, classes, recalls, hist_bins, thresholds)
    test_true = true_logits(test_features, test_labels, head)
    names = error_names(recalls)
    keys = ["auprc", *(f"precision_at_recall_{recall_key(r)}" for r in recalls)]
    class_means = {f"mean_{key}": test.means[f"mean_{key}"] for key in keys}
    metrics = {name: 1.0 - class_means[f"mean_{key}"] for name, key in zip(names, keys)}
    metrics["accuracy"] = test.accuracy
    thresholds_test = {}
    for r in recalls:
        key = recall_key(r)
        precision = np.full(num_classes, np.nan)
        precision[test.classes] = test.precision_at[key]
        recall = _recall_of_positives(test_true, test_labels, thresholds[key], num_classes)
        recall[test.classes] = test.recall_at[key]  # the scored classes' own, from their logits
        thresholds_test[key] = {"threshold": thresholds[key].tolist(), "precision": precision.tolist(),
                                "recall": recall.tolist()}
        metrics[f"test_precision_at_val_threshold_{key}"] = _nan_stat(np.mean, precision)
        metrics[f"test_recall_at_val_threshold_{key}"] = _nan_stat(np.mean, recall)
        metrics[f"test_recall_at_val_threshold_{key}_min"] = _nan_stat(np.min, recall)
    return RunResult(class_means, metrics, {key: value.tolist() for key, value in thresholds.items()},
                     thresholds_test, test.pr_curve, test.histogram)


def _recall_of_positives(positives_logits: np.ndarray, labels: np.ndarray, threshold: np.ndarray,
                         num_classes: int) -> np.ndarray:
    """Per class, the share of its positives whose logit reaches its threshold (NaN without any)."""
    hits = np.bincount(labels, weights=positives_logits >= threshold[labels], minlength=num_classes)
    with np.errstate(invalid="ignore", divide="ignore"):
        return hits / np.bincount(labels, minlength=num_classes)


def summarise_runs(results: dict[str, RunResult], losses: dict[str, list[str]], recalls: list[float]) -> dict:
    """metrics/slc.json: the PoLS summary, per loss (mean, std over seeds), per run.

    `losses` maps each loss to its evaluated run names. Per loss only the paper's errors and
    accuracy, so `dvc metrics show` stays readable; the threshold figures are per run. The std is
    the sample std (ddof=1) over seeds, 0 with a single seed. `summary` is empty unless both
    kinds of loss were evaluated.
    """
    per_loss, per_loss_means = {}, {}
    for loss, runs in losses.items():
        row: dict[str, float] = {"seeds": len(runs)}
        for name in [*error_names(recalls), "accuracy"]:
            values = np.array([results[run].metrics[name] for run in runs])
            row[f"{name}_mean"] = float(np.mean(values))
            row[f"{name}_std"] = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
        per_loss[loss] = row
        per_loss_means[loss] = {key: float(np.mean([results[run].class_means[key] for run in runs]))
                                for key in results[runs[0]].class_means}
    summary = {}
    compared = paper_means(per_loss_means, POLS_ALIGNED)
    if any(loss in POLS_ALIGNED for loss in compared) and any(loss not in POLS_ALIGNED for loss in compared):
        errors = pols_summary(compared, POLS_ALIGNED)["error"]
        keys = ["auprc", *(f"precision_at_recall_{recall_key(r)}" for r in recalls)]
        summary = {name: errors[key] for name, key in zip(error_names(recalls), keys)}
    return {"summary": summary, "losses": per_loss,
            "runs": {run: result.metrics for run, result in results.items()}}


def mlflow_logs(results: dict[str, RunResult], files: list[Path]) -> dict[str, tracking.RunLog]:
    """Per run, what its trial's MLflow run gets: its own metrics and thresholds, the shared table and plots."""
    return {run: tracking.RunLog(
        metrics=[(f"evaluate/{name}", value, 0) for name, value in result.metrics.items() if np.isfinite(value)],
        documents={"evaluate/thresholds.json": finite_or_none({"thresholds": result.thresholds,
                                                               "test": result.thresholds_test})},
        files=[(path, "evaluate") for path in files]) for run, result in results.items()}


@dataclass(frozen=True)
class Outputs:
    """Where the stage writes: the paths dvc.yaml declares, passed in, named nowhere else."""
    metrics: Path
    table: Path
    thresholds: Path
    thresholds_test: Path
    plots: Path


def evaluate(trials_path: Path, models_dir: Path, data_dir: Path, cfg: EvaluateConfig,
             out: Outputs, val_split: str = "val", test_split: str = "test") -> dict:
    """Evaluate every finished trial and write all outputs.

    A trial's model is read from `models_dir/<run_name>` (not the record's `model_dir`), so the
    models directory dvc.yaml declares as a dependency is the one really read. Returns the
    slc.json content (`slc`), the per-run `results`, the `trials` and the `files` worth logging.
    """
    trials = read_trials(trials_path)
    finished = [t for t in trials if t.finished]
    failed = [t for t in trials if not t.finished]
    if not finished:
        errors = "; ".join(f"{t.run_name}: {t.error}" for t in failed) or "no trials at all"
        raise EvaluateError(f"no finished trial in {trials_path} to evaluate ({errors})")
    data = PreparedData(data_dir)
    val, test = data.split(val_split), data.split(test_split)
    classes = class_sample(data.num_classes, cfg.classes)
    results: dict[str, RunResult] = {}
    losses: dict[str, list[str]] = {}
    first_info = None
    for trial in tqdm(finished, desc="evaluate", disable=None):
        run = trial.run_name
        model, info = load_trained(models_dir / run)
        check_same_classes(info, data)
        first_info = first_info or info
        shift = renormalisation(data.meta["normalisation"], info["normalisation"])
        features = {name: predict_features(model, split, cfg.batch_size, scale_shift=shift, desc=f"{run} {name}")
                    for name, split in ((val_split, val), (test_split, test))}
        results[run] = evaluate_features(features[val_split], val.labels, features[test_split], test.labels,
                                         Head.of(model), classes, cfg.recalls, cfg.hist_bins)
        losses.setdefault(trial.loss, []).append(run)
    slc = summarise_runs(results, losses, cfg.recalls)

    settings = {"dataset": first_info["dataset"], "model": first_info["model"]["name"],
                "epochs": first_info["train"]["epochs"],
                "seeds": sorted({t.seed for t in trials}), "recalls": cfg.recalls,
                "test_size": len(test), "num_classes": data.num_classes,
                "scored_classes": data.num_classes if classes is None else len(classes),
                "evaluated_on": f"{data_dir} ({data.meta['dataset']}): thresholds from split "
                                f"'{val_split}', errors on split '{test_split}'"}
    pr_curves = {loss: (results[runs[0]].pr_curve[0],
                        np.mean([results[run].pr_curve[1] for run in runs], axis=0))
                 for loss, runs in losses.items()}
    # One model's histogram per loss (its first seed): PoLS is a property of one model.
    histograms = {loss: results[runs[0]].histogram for loss, runs in losses.items()}

    slc["settings"] = settings  # what the README and report say the figures came from
    write_json(out.metrics, slc)
    write_text_atomic(out.table, table1_markdown(slc, settings, failed, POLS_ALIGNED))
    write_json(out.thresholds, {run: r.thresholds for run, r in results.items()})
    write_json(out.thresholds_test, {run: r.thresholds_test for run, r in results.items()})
    write_plot_data(out.plots, pr_curves, histograms)
    pngs = write_plot_pngs(out.plots, pr_curves, histograms, POLS_ALIGNED)
    return {"slc": slc, "results": results, "trials": trials, "files": [out.metrics, out.table, *pngs]}
