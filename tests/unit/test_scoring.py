"""Scoring at any k: chunks of classes give what the whole logit matrix gives."""
import numpy as np
import pytest
import torch

from slc.core.sampling import class_sample
from slc.evaluate import scoring
from slc.evaluate.metrics import slc_metrics
from slc.evaluate.scoring import Head, score_classes, thresholds_at_recall, top1_accuracy, true_logits

RECALLS = (0.5, 0.9, 0.99)


def problem(n=400, k=60, d=8, seed=0):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, k, n)
    head = Head(torch.tensor(rng.normal(size=(k, d)), dtype=torch.float32), torch.tensor(rng.normal(size=k),
                                                                                          dtype=torch.float32))
    features = torch.tensor(rng.normal(size=(n, d)), dtype=torch.float32) + head.weight[labels] * 0.8
    return features, labels, head


@pytest.fixture
def small_chunks(monkeypatch):
    monkeypatch.setattr(scoring, "LOGITS_PER_CHUNK", 400 * 7)  # 7 classes of 400 examples a chunk
    monkeypatch.setattr(scoring, "ROW_BATCH", 64)


def test_thresholds_from_the_positives_alone_are_those_of_the_whole_ranking():
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 30, 500)
    logits = rng.normal(size=(500, 30)).round(1)  # many ties
    positives = logits[np.arange(500), labels]
    expected = slc_metrics(logits, labels, RECALLS)
    got = thresholds_at_recall(positives, labels, 30, RECALLS)
    for r in RECALLS:
        np.testing.assert_array_equal(got[f"{r:g}"], expected[f"threshold_at_recall_{r:g}"])


def test_a_class_without_positives_has_no_threshold():
    got = thresholds_at_recall(np.array([1.0, 2.0]), np.array([0, 0]), 3, (0.9,))["0.9"]
    assert got[0] == 1.0 and np.isnan(got[1:]).all()


def test_chunked_scores_of_a_class_sample_are_the_whole_matrix_columns(small_chunks):
    features, labels, head = problem()
    whole = scoring.logits_of(features, head, None)
    classes = class_sample(60, 25)
    assert len(scoring.chunks_of(classes, 60, 400)) == 4
    thresholds = thresholds_at_recall(whole[np.arange(400), labels], labels, 60, (0.9,))
    got = score_classes(features, labels, head, classes, (0.9,), 10, thresholds)
    expected = slc_metrics(whole, labels, (0.9,))
    np.testing.assert_allclose(got.metrics["auprc"], expected["auprc"][classes], rtol=1e-12)
    assert got.means["mean_auprc"] == pytest.approx(np.nanmean(expected["auprc"][classes]))
    rows = np.isin(labels, classes)
    assert got.accuracy == np.mean(whole[rows].argmax(axis=1) == labels[rows])
    assert got.histogram["true"].sum() == rows.sum() and got.histogram["false"].sum() == 400 * 25 - rows.sum()


def test_chunked_argmax_accuracy_is_the_whole_matrix_argmax(small_chunks):
    features, labels, head = problem(seed=2)
    whole = scoring.logits_of(features, head, None)
    assert top1_accuracy(features, labels, head) == np.mean(whole.argmax(axis=1) == labels)


def test_true_logits_are_the_matrix_values_when_it_fits_and_close_when_it_does_not(monkeypatch):
    features, labels, head = problem(seed=3)
    whole = scoring.logits_of(features, head, None)
    np.testing.assert_array_equal(true_logits(features, labels, head), whole[np.arange(400), labels])
    monkeypatch.setattr(scoring, "LOGITS_PER_CHUNK", 100)
    np.testing.assert_allclose(true_logits(features, labels, head), whole[np.arange(400), labels], atol=1e-5)


def test_the_class_sample_is_seeded_and_none_means_every_class():
    assert np.array_equal(class_sample(1000, 10), class_sample(1000, 10)) and len(set(class_sample(1000, 10))) == 10
    assert class_sample(10, None) is None and class_sample(10, 10) is None
