import numpy as np
import pytest
from sklearn.metrics import average_precision_score, precision_recall_curve

from slc.evaluate import metrics
from slc.evaluate.metrics import (
    MIN_RELATIVE_BASE,
    logit_histograms,
    pols_summary,
    pr_curve_mean,
    precision_recall_at,
    recall_key,
    slc_metrics,
)

RECALLS = (0.5, 0.9, 0.99)


def tied_data(n=400, k=6, seed=0):
    """Scores rounded to one decimal, so many examples share a score within each class."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, k, n)
    logits = rng.normal(size=(n, k))
    logits[np.arange(n), labels] += 1.0
    return np.round(logits, 1).astype(np.float32), labels


def sklearn_at_recall(y_true, scores, target):
    """Precision and threshold at the largest threshold whose recall is >= target."""
    precision, recall, thresholds = precision_recall_curve(y_true, scores)
    reaches = recall[:-1] >= target
    best = np.flatnonzero(reaches)[np.argmax(thresholds[reaches])]
    return precision[best], thresholds[best]


@pytest.fixture(params=["one chunk", "two classes per chunk"])
def chunking(request, monkeypatch):
    """Run each agreement test with all classes in one sort and with many small chunks."""
    if request.param != "one chunk":
        monkeypatch.setattr(metrics, "WORK_ELEMENTS", 2 * 400)


def test_auprc_agrees_with_sklearn_average_precision_with_ties(chunking):
    logits, labels = tied_data()
    result = slc_metrics(logits, labels, RECALLS)
    expected = [average_precision_score(labels == c, logits[:, c]) for c in range(6)]
    np.testing.assert_allclose(result["auprc"], expected, rtol=0, atol=1e-6)
    assert result["mean_auprc"] == pytest.approx(np.mean(expected), abs=1e-6)


def test_precision_and_threshold_at_recall_agree_with_sklearn_curve(chunking):
    logits, labels = tied_data()
    result = slc_metrics(logits, labels, RECALLS)
    for target in RECALLS:
        expected = np.array([sklearn_at_recall(labels == c, logits[:, c], target) for c in range(6)])
        key = recall_key(target)
        np.testing.assert_allclose(result[f"precision_at_recall_{key}"], expected[:, 0], atol=1e-6)
        np.testing.assert_allclose(result[f"threshold_at_recall_{key}"], expected[:, 1], atol=1e-6)
        assert result[f"mean_precision_at_recall_{key}"] == pytest.approx(expected[:, 0].mean(),
                                                                          abs=1e-6)


def test_untied_continuous_scores_also_agree_with_sklearn():
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 4, 300)
    logits = rng.normal(size=(300, 4))
    result = slc_metrics(logits, labels, (0.9,))
    expected = [average_precision_score(labels == c, logits[:, c]) for c in range(4)]
    np.testing.assert_allclose(result["auprc"], expected, atol=1e-6)


def test_perfect_separation_gives_auprc_and_precision_exactly_one():
    labels = np.array([0, 1, 2, 0, 1, 2])
    logits = np.where(np.eye(3)[labels] == 1, 5.0, -5.0) + np.arange(6)[:, None] * 0.1
    result = slc_metrics(logits, labels, (0.9, 0.99))
    assert np.all(result["auprc"] == 1.0)
    assert result["mean_auprc"] == 1.0
    assert result["mean_precision_at_recall_0.99"] == 1.0
    assert result["accuracy"] == 1.0


def test_class_without_positives_is_nan_listed_and_left_out_of_means():
    logits, labels = tied_data()
    labels = np.where(labels == 2, 3, labels)
    result = slc_metrics(logits, labels, (0.9,))
    assert result["classes_without_positives"] == [2]
    assert np.isnan(result["auprc"][2])
    assert np.isnan(result["precision_at_recall_0.9"][2])
    assert np.isnan(result["threshold_at_recall_0.9"][2])
    others = [average_precision_score(labels == c, logits[:, c]) for c in (0, 1, 3, 4, 5)]
    assert result["mean_auprc"] == pytest.approx(np.mean(others), abs=1e-6)


def test_accuracy_is_argmax_accuracy_for_reference():
    logits = np.array([[2.0, 1.0], [0.0, 3.0], [4.0, 1.0]])
    assert slc_metrics(logits, np.array([0, 1, 1]))["accuracy"] == pytest.approx(2 / 3)


def test_recall_key_names_targets_like_params_write_them():
    assert [recall_key(r) for r in (0.9, 0.99, 1.0)] == ["0.9", "0.99", "1"]


@pytest.mark.parametrize("logits, labels, message", [
    (np.zeros((3, 2)), np.array([0, 1, 2]), "labels must lie in"),
    (np.array([[0.0, np.nan]]), np.array([0]), "non-finite"),
    (np.zeros((3, 2)), np.array([0, 1]), "labels must have shape"),
    (np.zeros((2, 2)), np.array([0.0, 1.0]), "integer class ids"),
    (np.zeros((0, 2)), np.zeros(0, dtype=int), "non-empty"),
])
def test_bad_inputs_fail_with_a_message(logits, labels, message):
    with pytest.raises(ValueError, match=message):
        slc_metrics(logits, labels)


def test_threshold_from_slc_metrics_reproduces_its_precision_and_recall():
    logits, labels = tied_data()
    result = slc_metrics(logits, labels, (0.9,))
    precision, recall = precision_recall_at(logits, labels, result["threshold_at_recall_0.9"])
    np.testing.assert_allclose(precision, result["precision_at_recall_0.9"], atol=1e-12)
    assert np.all(recall >= 0.9)


def test_precision_recall_at_counts_scores_at_the_threshold_as_positive():
    scores = np.array([3.0, 2.0, 2.0, 1.0])
    logits = np.stack([scores, -scores], axis=1)
    labels = np.array([0, 0, 1, 0])
    precision, recall = precision_recall_at(logits, labels, np.array([2.0, 10.0]))
    assert precision[0] == pytest.approx(2 / 3)  # rows 0, 1 and 2 (exactly at 2.0) predicted
    assert recall[0] == pytest.approx(2 / 3)
    assert np.isnan(precision[1])  # nothing predicted positive: undefined, not 0
    assert recall[1] == 0.0


def test_precision_recall_at_nan_threshold_predicts_nothing():
    precision, recall = precision_recall_at(np.array([[1.0, 0.0]]), np.array([0]),
                                            np.array([np.nan, 0.0]))
    assert np.isnan(precision[0]) and recall[0] == 0.0


def test_pr_curve_mean_is_the_mean_of_sklearn_interpolated_curves():
    logits, labels = tied_data()
    grid, mean_precision = pr_curve_mean(logits, labels, points=11)
    curves = []
    for c in range(6):
        precision, recall, _ = precision_recall_curve(labels == c, logits[:, c])
        precision, recall = precision[:-1], recall[:-1]  # drop sklearn's (recall 0, precision 1) end
        curves.append([precision[recall >= g].max() for g in grid])
    np.testing.assert_allclose(grid, np.linspace(0, 1, 11))
    np.testing.assert_allclose(mean_precision, np.mean(curves, axis=0), atol=1e-9)


def test_pr_curve_mean_is_non_increasing_and_a_precision():
    logits, labels = tied_data(seed=3)
    grid, mean_precision = pr_curve_mean(logits, labels, points=101)
    assert grid.shape == mean_precision.shape == (101,)
    assert np.all(np.diff(mean_precision) <= 1e-12)
    assert np.all((mean_precision > 0) & (mean_precision <= 1))


def test_logit_histograms_split_true_from_false_logits():
    logits, labels = tied_data()
    hist = logit_histograms(logits, labels, bins=20)
    assert hist["edges"].shape == (21,)
    assert hist["true"].sum() == len(labels)
    assert hist["false"].sum() == logits.size - len(labels)


def test_logit_histograms_of_pols_aligned_logits_do_not_overlap():
    labels = np.array([0, 1, 2, 1])
    logits = np.where(np.eye(3)[labels] == 1, 1.0, -1.0) + np.arange(4)[:, None] * 0.1
    hist = logit_histograms(logits, labels, bins=np.array([-2.0, 0.0, 2.0]))
    assert hist["true"].tolist() == [0, 4]
    assert hist["false"].tolist() == [8, 0]


def per_loss_from_logits():
    """Two hand-made models: one whose logits satisfy PoLS, one that only ranks within rows."""
    labels = np.array([0, 1, 0, 1])
    aligned = np.array([[3.0, -1.0], [-2.0, 2.0], [4.0, 0.0], [-1.0, 1.0]])
    argmax_only = np.array([[9.0, 8.0], [0.0, 1.0], [4.0, 3.0], [-5.0, -4.0]])
    return {
        "bce": slc_metrics(aligned, labels, (0.9,)),
        "ce": slc_metrics(argmax_only, labels, (0.9,)),
    }


def test_pols_aligned_logits_give_zero_error_and_full_improvement():
    per_loss = per_loss_from_logits()
    assert per_loss["ce"]["accuracy"] == 1.0  # a perfect classifier, yet not a perfect SLC
    summary = pols_summary(per_loss, aligned={"bce"})
    auprc = summary["error"]["auprc"]
    assert auprc["pols"] == 0.0
    assert auprc["non_pols"] > 0.0
    assert auprc["relative_improvement"] == 1.0
    assert summary["pols_losses"] == ["bce"] and summary["non_pols_losses"] == ["ce"]
    assert set(summary["error"]) == {"auprc", "precision_at_recall_0.9"}


def test_relative_improvement_is_non_minus_pols_over_non():
    per_loss = {
        "ce": {"mean_auprc": 0.8}, "max_margin": {"mean_auprc": 0.6},
        "bce": {"mean_auprc": 0.9}, "nce": {"mean_auprc": 0.7},
    }
    error = pols_summary(per_loss, aligned={"bce", "nce"})["error"]["auprc"]
    assert error["non_pols"] == pytest.approx(0.3)
    assert error["pols"] == pytest.approx(0.2)
    assert error["relative_improvement"] == pytest.approx((0.3 - 0.2) / 0.3)


@pytest.mark.parametrize("ce_auprc", [1.0, 0.999])
def test_relative_improvement_is_none_when_non_aligned_errors_are_too_small_to_divide_by(ce_auprc):
    summary = pols_summary({"ce": {"mean_auprc": ce_auprc}, "bce": {"mean_auprc": 0.111}}, {"bce"})
    assert summary["error"]["auprc"]["relative_improvement"] is None
    assert summary["error"]["auprc"]["non_pols"] < MIN_RELATIVE_BASE


def test_pols_summary_needs_both_kinds_of_loss():
    with pytest.raises(ValueError, match="at least one PoLS-aligned and one non-aligned"):
        pols_summary({"bce": {"mean_auprc": 0.9}}, aligned={"bce"})


def test_metrics_over_a_subset_of_columns_are_those_columns_of_the_full_metrics():
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 12, 300)
    logits = rng.normal(size=(300, 12)).round(1)  # ties
    logits[np.arange(300), labels] += 1.5
    classes = np.array([0, 4, 5, 11])
    full, part = slc_metrics(logits, labels, (0.9,)), slc_metrics(logits[:, classes], labels, (0.9,), classes=classes)
    for key in ("auprc", "precision_at_recall_0.9", "threshold_at_recall_0.9"):
        np.testing.assert_array_equal(part[key], full[key][classes])
    assert "accuracy" not in part
    thresholds = full["threshold_at_recall_0.9"]
    full_pr = precision_recall_at(logits, labels, thresholds)
    part_pr = precision_recall_at(logits[:, classes], labels, thresholds[classes], classes=classes)
    for whole, sub in zip(full_pr, part_pr):
        np.testing.assert_array_equal(sub, whole[classes])
    hist = logit_histograms(logits[:, classes], labels, 10, classes=classes)
    assert hist["true"].sum() == np.isin(labels, classes).sum() and hist["true"].sum() + hist["false"].sum() == 300 * 4
