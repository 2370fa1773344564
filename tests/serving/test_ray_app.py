"""The Ray Serve deployment serves the same app: every run of an export directory, behind the token,
with requests sharing onnxruntime calls through `@serve.batch`, and its series among Ray's metrics."""
import asyncio
import io
import time

import httpx
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families
from pydantic import ValidationError

from serving.auth import ENV
from serving.errors import ExportError, SetupError, UnknownRunError
from serving.loadtest import free_port
from serving.model import SingleLogitModel
from serving.ray_app import BuildArgs, build


def test_builder_arguments_are_checked():
    with pytest.raises(ValidationError, match="replicas"):
        BuildArgs.model_validate({"export_dir": "x", "replicas": "0"})
    with pytest.raises(ValidationError, match="replica"):  # a typo is an error, not ignored
        BuildArgs.model_validate({"export_dir": "x", "replica": "2"})
    for wait in ("0", "-1"):
        with pytest.raises(ValidationError, match="batch_wait_ms\n  Input should be greater than 0"):
            BuildArgs.model_validate({"export_dir": "x", "batch_wait_ms": wait})


def test_an_unknown_default_run_or_an_empty_token_file_fails_the_build(exports, tmp_path, monkeypatch):
    monkeypatch.delenv(ENV, raising=False)
    with pytest.raises(UnknownRunError, match="the runs are bce-s1, ce-s0"):
        build(BuildArgs(export_dir=str(exports), default_run="ce-s9"))
    (tmp_path / "token").write_text("")
    with pytest.raises(SetupError, match="is empty"):
        build(BuildArgs(export_dir=str(exports), token_file=str(tmp_path / "token")))


def test_a_tampered_export_fails_the_build_before_any_replica_starts(export_copy):
    (export_copy / "model.onnx").unlink()
    with pytest.raises(ExportError, match="model.onnx is missing"):
        build(BuildArgs(export_dir=str(export_copy)))


def test_an_export_the_public_key_does_not_verify_fails_the_build(export_dir, signed_exports, keys, tmp_path):
    with pytest.raises(ExportError, match=r"is not signed \(no model.sig\) but a public key is given"):
        build(BuildArgs(export_dir=str(export_dir), public_key=str(keys[1])))
    build(BuildArgs(export_dir=str(signed_exports), public_key=str(keys[1])))  # its own key: builds


def npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def scrape(port: int, name: str, timeout: float = 60.0) -> str:
    """Ray's metrics endpoint once it exports `name` (Ray reports metrics every few seconds)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
        except httpx.TransportError:
            text = ""
        if name in text or time.monotonic() > deadline:
            return text
        time.sleep(1.0)


@pytest.mark.slow
def test_ray_serve_answers_like_the_library_behind_the_token_with_batching_and_metrics(exports, pixels, tmp_path,
                                                                                       monkeypatch):
    ray = pytest.importorskip("ray")
    from ray import serve
    monkeypatch.delenv(ENV, raising=False)
    (tmp_path / "token").write_text("t0ken\n")
    port, metrics_port = free_port(), free_port()
    # a fresh cluster, never one already running here, reporting its metrics every half second
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
             _metrics_export_port=metrics_port, _system_config={"metrics_report_interval_ms": 500})
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        args = {"export_dir": str(exports), "default_run": "ce-s0", "replicas": "1", "batch_wait_ms": "300",
                "token_file": str(tmp_path / "token")}
        serve.run(build(BuildArgs.model_validate(args)), name="slc", route_prefix="/")
        url, auth = f"http://127.0.0.1:{port}", {"Authorization": "Bearer t0ken"}
        asks = [("ce-s0", 2), ("ce-s0", 4), ("bce-s1", 2), ("ce-s0", 0)]

        async def send_together():
            async with httpx.AsyncClient(base_url=url, headers=auth, timeout=60) as client:
                return await asyncio.gather(*(client.post(f"/v1/runs/{run}/classes/{class_id}/score",
                                                          files=[("files", ("x.npy", npy(pixels[i:i + 2])))])
                                              for i, (run, class_id) in enumerate(asks)))

        together = asyncio.run(send_together())
        default = httpx.post(f"{url}/v1/classes/2/score", headers=auth, files=[("files", ("x.npy", npy(pixels)))],
                             timeout=60)
        no_token = httpx.post(f"{url}/v1/classes/2/score", files=[("files", ("x.npy", npy(pixels)))], timeout=60)
        bad_class = httpx.post(f"{url}/v1/classes/7/score", headers=auth, files=[("files", ("x.npy", npy(pixels)))],
                               timeout=60)
        unknown_run = httpx.get(f"{url}/v1/runs/ce-s9/model", headers=auth, timeout=60)
        healthz = httpx.get(f"{url}/healthz", timeout=60)
        metrics = scrape(metrics_port, "ray_slc_inference_images_count")
    finally:
        serve.shutdown()
        ray.shutdown()
    for i, ((run, class_id), response) in enumerate(zip(asks, together)):
        assert response.status_code == 200, response.text
        expected = SingleLogitModel.load(exports / run).score(pixels[i:i + 2], class_id)
        np.testing.assert_allclose(response.json()["logits"], expected, rtol=1e-6)
    assert default.status_code == 200 and default.json()["run_name"] == "ce-s0"
    np.testing.assert_allclose(default.json()["logits"], SingleLogitModel.load(exports / "ce-s0").score(pixels, 2),
                               rtol=1e-6)
    assert no_token.status_code == 401 and no_token.headers["www-authenticate"] == "Bearer"
    assert bad_class.status_code == 404 and "class 7" in bad_class.json()["detail"]
    assert unknown_run.status_code == 404 and "the runs are bce-s1, ce-s0" in unknown_run.json()["detail"]
    assert healthz.json() == {"status": "ok", "run_name": "ce-s0"}
    calls = {run: sum(s.value for f in text_string_to_metric_families(metrics) for s in f.samples
                      if s.name == "ray_slc_inference_images_count" and s.labels.get("run") == run)
             for run in ("ce-s0", "bce-s1")}
    # ce-s0 scored four requests, three of them sent together: fewer calls than requests means they shared
    assert 1 <= calls["ce-s0"] < 4 and calls["bce-s1"] == 1, calls
    assert 'route="/v1/runs/{run}/classes/{class_id}/score"' in metrics and "ray_serve_" in metrics
