"""Requests scored together get exactly what each would get alone."""
import numpy as np
import pytest

from serving.batching import check_wait, score_together
from serving.metrics import PrometheusMetrics
from serving.model import SingleLogitModel


@pytest.mark.parametrize("wait", [0, -5, float("nan")])
def test_a_batch_wait_of_zero_or_less_is_refused(wait):
    with pytest.raises(ValueError, match="positive number of milliseconds, or no batch wait"):
        check_wait(wait)


def test_each_request_gets_its_own_logits_in_calls_of_at_most_max_batch_images(export_dir, pixels):
    model = SingleLogitModel.load(export_dir, max_batch=4)
    metrics = PrometheusMetrics()
    parts = [(model.prepare(pixels[:3]), 1), (model.prepare(pixels[3:4]), 4), (model.prepare(pixels[4:]), 0)]
    logits = score_together(model, metrics, parts)
    for (images, class_id), got in zip(parts, logits):
        np.testing.assert_allclose(got, model.score(images, class_id), rtol=1e-6)
    calls = metrics.registry.get_sample_value("slc_inference_images_count", {"run": "ce-s0", "graph": "single_logit"})
    assert [len(part) for part in logits] == [3, 1, 2] and calls == 2  # 6 images, at most 4 a call
