"""The Ray Serve deployment serves the same app: one replica, one good and one bad request."""
import io

import httpx
import numpy as np
import pytest
from pydantic import ValidationError

from serving.errors import ExportError
from serving.loadtest import free_port
from serving.model import SingleLogitModel
from serving.ray_app import BuildArgs, build


def test_builder_arguments_are_checked():
    with pytest.raises(ValidationError, match="replicas"):
        BuildArgs.model_validate({"export_dir": "x", "replicas": "0"})
    with pytest.raises(ValidationError, match="replica"):  # a typo is an error, not ignored
        BuildArgs.model_validate({"export_dir": "x", "replica": "2"})


def test_a_tampered_export_fails_the_build_before_any_replica_starts(export_copy):
    (export_copy / "model.onnx").unlink()
    with pytest.raises(ExportError, match="model.onnx is missing"):
        build(BuildArgs(export_dir=str(export_copy)))


@pytest.mark.slow
def test_ray_serve_answers_like_the_library(export_dir, pixels):
    ray = pytest.importorskip("ray")
    from ray import serve
    port = free_port()
    # a fresh cluster, never one already running here
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build(BuildArgs.model_validate({"export_dir": str(export_dir), "replicas": "1"})),
                  name="slc", route_prefix="/")
        buffer = io.BytesIO()
        np.save(buffer, pixels)
        good = httpx.post(f"http://127.0.0.1:{port}/v1/classes/2/score", files=[("files", ("x.npy", buffer.getvalue()))],
                          timeout=60)
        bad = httpx.post(f"http://127.0.0.1:{port}/v1/classes/7/score", files=[("files", ("x.npy", buffer.getvalue()))],
                         timeout=60)
    finally:
        serve.shutdown()
        ray.shutdown()
    assert good.status_code == 200, good.text
    np.testing.assert_allclose(good.json()["logits"], SingleLogitModel.load(export_dir).score(pixels, 2), rtol=1e-6)
    assert bad.status_code == 404 and "class 7" in bad.json()["detail"]
