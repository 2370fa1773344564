"""Requests scored together get exactly what each would get alone."""
import asyncio

import numpy as np
import pytest

from serving.batching import Batcher, check_wait, score_together
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


def test_a_call_that_fails_for_one_request_is_tried_again_request_by_request(export_dir, pixels):
    """A request whose images onnxruntime refuses (here: no channel axis) fails alone; the others of
    its batch get the logits they get alone."""
    model = SingleLogitModel.load(export_dir, max_batch=8)
    batcher = Batcher(model, PrometheusMetrics(), wait_ms=50)
    good = [(model.prepare(pixels[:2]), 1), (model.prepare(pixels[2:3]), 4)]
    broken = (np.zeros((1, 8, 8), np.float32), 0)

    async def together():
        return await asyncio.gather(*(batcher(images, c) for images, c in [good[0], broken, good[1]]),
                                    return_exceptions=True)

    first, failure, second = asyncio.run(together())
    np.testing.assert_array_equal(first, model.score(good[0][0], 1))
    np.testing.assert_array_equal(second, model.score(good[1][0], 4))
    assert isinstance(failure, Exception)
