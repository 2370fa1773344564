"""What an operator relies on, through real uvicorn servers on 127.0.0.1 (`slc serve` in a child
process): the bearer token, the Prometheus metrics, and batching that shares onnxruntime calls
between concurrent requests without mixing up their answers."""
import asyncio

import httpx
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from serving.loadtest import Server
from serving.model import SingleLogitModel
from tests.serving.conftest import png

TOKEN = "s3cret-token"
WAIT_MS = 300  # long enough for requests sent together to join one batch on a busy machine


def samples(text: str, name: str, **labels) -> float:
    """The sum of the samples called `name` whose labels include `labels`."""
    return sum(sample.value for family in text_string_to_metric_families(text) for sample in family.samples
               if sample.name == name and labels.items() <= sample.labels.items())


@pytest.fixture(scope="module")
def plain(exports):
    with Server(exports, max_batch=4, options=["--default-run", "ce-s0"]) as server:
        yield server.url


@pytest.fixture(scope="module")
def guarded(exports, tmp_path_factory):
    """A server with a token (from a file, as params.yaml's serving.token_file gives it) and batching."""
    token_file = tmp_path_factory.mktemp("secrets") / "token"
    token_file.write_text(f"{TOKEN}\n")
    options = ["--default-run", "ce-s0", "--token-file", str(token_file), "--batch-wait-ms", str(WAIT_MS)]
    with Server(exports, max_batch=8, options=options) as server:
        yield server.url


AUTH = {"Authorization": f"Bearer {TOKEN}"}
GUARDED_ROUTES = [("GET", "/v1/model"), ("GET", "/v1/runs"), ("GET", "/v1/runs/bce-s1/model"), ("GET", "/metrics"),
                  ("GET", "/docs"), ("GET", "/openapi.json"), ("POST", "/v1/classes/1/score"),
                  ("POST", "/v1/runs/ce-s9/classes/1/score"), ("GET", "/no/such/route")]


@pytest.mark.parametrize("method, path", GUARDED_ROUTES)
@pytest.mark.parametrize("authorization", [None, "Bearer wrong-token", f"Bearer {TOKEN}x", f"Basic {TOKEN}", TOKEN])
def test_without_the_token_every_route_is_401_and_says_nothing_else(guarded, pixels, method, path, authorization):
    headers = {} if authorization is None else {"Authorization": authorization}
    files = [("files", ("x.png", png(pixels[0])))] if method == "POST" else None
    response = httpx.request(method, guarded + path, headers=headers, files=files, timeout=30)
    assert response.status_code == 401 and response.headers["www-authenticate"] == "Bearer"
    assert response.json() == {"detail": "this server needs a bearer token: send `Authorization: Bearer <token>`"}


def test_healthz_needs_no_token(guarded):
    assert httpx.get(f"{guarded}/healthz").json() == {"status": "ok", "run_name": "ce-s0"}


def test_with_the_token_the_routes_answer(guarded, export_dir, pixels):
    response = httpx.post(f"{guarded}/v1/classes/1/score", headers={"authorization": f"bearer {TOKEN}"},  # any case
                          files=[("files", ("x.png", png(pixels[0])))], timeout=30)
    assert response.status_code == 200, response.text
    np.testing.assert_allclose(response.json()["logits"], SingleLogitModel.load(export_dir).score(pixels[:1], 1), rtol=1e-6)
    assert httpx.get(f"{guarded}/v1/runs/ce-s9/model", headers=AUTH).status_code == 404  # past the token, as usual


def test_concurrent_requests_share_onnxruntime_calls_and_each_gets_its_own_answer(guarded, exports, pixels):
    """Eight requests sent together, to two runs and several classes: each answer is the library's for
    its own run, class and image, and the server made fewer onnxruntime calls than requests."""
    asks = [("ce-s0", 0), ("ce-s0", 1), ("ce-s0", 2), ("ce-s0", 3), ("ce-s0", 4), ("bce-s1", 0), ("bce-s1", 3),
            ("bce-s1", 4)]
    before = httpx.get(f"{guarded}/metrics", headers=AUTH).text

    async def send_together():
        async with httpx.AsyncClient(base_url=guarded, headers=AUTH, timeout=60) as client:
            return await asyncio.gather(*(client.post(f"/v1/runs/{run}/classes/{class_id}/score",
                                                      files=[("files", (f"{i}.png", png(pixels[i % len(pixels)])))])
                                          for i, (run, class_id) in enumerate(asks)))

    responses = asyncio.run(send_together())
    after = httpx.get(f"{guarded}/metrics", headers=AUTH).text
    for i, ((run, class_id), response) in enumerate(zip(asks, responses)):
        assert response.status_code == 200, response.text
        expected = SingleLogitModel.load(exports / run).score(pixels[i % len(pixels)][None], class_id)
        np.testing.assert_allclose(response.json()["logits"], expected, rtol=1e-6)
    for run, requests in (("ce-s0", 5), ("bce-s1", 3)):
        calls = samples(after, "slc_inference_images_count", run=run) - samples(before, "slc_inference_images_count", run=run)
        images = samples(after, "slc_inference_images_sum", run=run) - samples(before, "slc_inference_images_sum", run=run)
        assert images == requests and 1 <= calls < requests, (run, calls, images)


def test_metrics_count_requests_by_route_run_class_and_status(plain, pixels):
    files = [("files", ("x.png", png(pixels[0])))]
    before = httpx.get(f"{plain}/metrics").text
    assert httpx.post(f"{plain}/v1/classes/2/score", files=files).status_code == 200
    assert httpx.post(f"{plain}/v1/runs/bce-s1/classes/2/score", files=files).status_code == 200
    assert httpx.post(f"{plain}/v1/classes/77/score", files=files).status_code == 404
    response = httpx.get(f"{plain}/metrics")
    assert response.headers["content-type"].startswith("text/plain; version=")

    def added(name, **labels):
        return samples(response.text, name, **labels) - samples(before, name, **labels)

    requests = "slc_http_request_duration_seconds_count"
    assert added(requests, route="/v1/classes/{class_id}/score", run="ce-s0", class_id="2", status="200") == 1
    assert added(requests, route="/v1/runs/{run}/classes/{class_id}/score", run="bce-s1", class_id="2", status="200") == 1
    assert added(requests, route="/v1/classes/{class_id}/score", run="ce-s0", class_id="", status="404") == 1
    assert 'class_id="77"' not in response.text  # a made-up id is no label: series cannot grow without bound
    assert added("slc_inference_seconds_count", run="ce-s0", graph="single_logit") == 1
    assert added("slc_inference_images_sum", run="bce-s1", graph="single_logit") == 1
    assert added("slc_http_request_duration_seconds_bucket", route="/v1/classes/{class_id}/score", status="200",
                 le="+Inf") == 1
