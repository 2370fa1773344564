"""What a hostile client tried against `slc serve` (issue #23), each through a real server on 127.0.0.1
(a child process) with a token, batching and a short request timeout: every attempt is a 4xx that
says why, costs the server what its limits allow, and changes no other client's answer."""
import asyncio
import select
import socket
import time

import anyio
import httpx
import numpy as np
import psutil
import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from serving.bounded import RequestTimeout
from serving.loadtest import Server
from serving.model import SingleLogitModel
from tests.serving.conftest import npy_claiming, overflowing_input
from tests.serving.test_http import npy, png, upload

TOKEN = "h0stile-test-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
TIMEOUT_S = 2
WAIT_MS = 300  # long enough for requests sent together to join one batch on a busy machine


@pytest.fixture(scope="module")
def server(exports, tmp_path_factory):
    token_file = tmp_path_factory.mktemp("secrets") / "token"
    token_file.write_text(TOKEN)
    options = ["--default-run", "ce-s0", "--token-file", str(token_file), "--batch-wait-ms", str(WAIT_MS),
               "--request-timeout-s", str(TIMEOUT_S)]
    with Server(exports, max_batch=8, options=options) as server:
        yield server


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server.url, headers=AUTH, timeout=30.0) as client:
        yield client


@pytest.fixture(scope="module")
def library(export_dir):
    return SingleLogitModel.load(export_dir)


def assert_good_request_succeeds(client, library, pixels):
    response = client.post("/v1/classes/1/score", files=upload(png(pixels[0]), npy(pixels[1:3])))
    assert response.status_code == 200, response.text
    np.testing.assert_allclose(response.json()["logits"], library.score(pixels[:3], 1), rtol=1e-6)


def test_an_npy_header_claiming_a_terabyte_is_a_400_not_a_500(client, library, pixels):
    data = npy_claiming((10**6, 10**6))
    response = client.post("/v1/classes/1/score", files=upload(data))
    assert len(data) == 144 and response.status_code == 400, response.text
    assert "header claims shape (1000000, 1000000) of uint8" in response.json()["detail"]
    assert_good_request_succeeds(client, library, pixels)


def test_input_that_overflows_the_network_is_a_422_with_the_reason_not_null_logits(client, trained):
    response = client.post("/v1/classes/2/score", files=upload(npy(overflowing_input(trained))))
    assert response.status_code == 422, response.text
    assert "image 0 gives the logit" in response.json()["detail"] and "overflow the network" in response.json()["detail"]


def test_a_request_that_fails_fails_no_other_request_of_its_batch(server, library, trained, pixels):
    """Good requests sent with a float64 of 1e300 (inf as float32) and an input that overflows the
    network get exactly their answers alone, in shared onnxruntime calls; the two bad ones get 422."""
    goods = [(png(pixels[i]), i % 5) for i in range(4)]
    bads = [npy(np.full((1, 1, 8, 8), 1e300)), npy(overflowing_input(trained))]

    async def send_together():
        async with httpx.AsyncClient(base_url=server.url, headers=AUTH, timeout=30.0) as own:
            posts = [own.post(f"/v1/classes/{c}/score", files=upload(data)) for data, c in goods]
            posts += [own.post("/v1/classes/2/score", files=upload(data)) for data in bads]
            return await asyncio.gather(*posts)

    answers = asyncio.run(send_together())
    for (_, class_id), answer, image in zip(goods, answers, pixels):
        assert answer.status_code == 200, answer.text
        np.testing.assert_allclose(answer.json()["logits"], library.score(image, class_id), rtol=1e-6)
    assert [answer.status_code for answer in answers[4:]] == [422, 422]
    assert "NaN or infinite values as float32" in answers[4].json()["detail"]
    metrics = httpx.get(f"{server.url}/metrics", headers=AUTH).text
    images = {sample.name: sample.value for family in text_string_to_metric_families(metrics)
              for sample in family.samples if sample.name.startswith("slc_inference_images_")
              and sample.labels.get("run") == "ce-s0"}
    assert images["slc_inference_images_sum"] > images["slc_inference_images_count"]  # some calls were shared


def raw_request(server, head: bytes, *, chunks=(), then_wait: float = 0.0) -> tuple[bytes, int]:
    """Send `head` and then `chunks` on a raw connection until the server answers; its answer and the
    bytes sent (the server may close while we still send)."""
    host, port = server.url.removeprefix("http://").split(":")
    sent = 0
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        try:
            for chunk in [head, *chunks]:
                sock.sendall(chunk)
                sent += len(chunk)
                if select.select([sock], [], [], 0)[0]:
                    break
        except (BrokenPipeError, ConnectionResetError):
            pass
        time.sleep(then_wait)
        try:
            return sock.recv(65536), sent
        except ConnectionResetError:
            return b"", sent


def test_a_64_mib_header_is_refused_unread_before_the_token_check(server, client, library, pixels):
    process = psutil.Process(server.process.pid)
    before, start = process.memory_info().rss, time.perf_counter()
    answer, sent = raw_request(server, b"GET /v1/model HTTP/1.1\r\nHost: x\r\nX-Big: ",
                               chunks=[b"a" * (1 << 16)] * 1024)  # 64 MiB, if the server took it all
    elapsed, grown = time.perf_counter() - start, process.memory_info().rss - before
    assert answer.startswith(b"HTTP/1.1 431 "), answer[:200]
    assert b"longer than 16384 bytes" in answer and sent < 4 << 20
    assert elapsed < 1.0 and grown < 8 << 20, (elapsed, grown)
    assert_good_request_succeeds(client, library, pixels)


def test_too_many_header_fields_are_a_431_before_the_token_check(client):
    headers = [(f"x-h{i}", "1") for i in range(101)]
    response = httpx.get(f"{client.base_url}/v1/model", headers=headers)
    assert response.status_code == 431 and "at most 100 are taken" in response.json()["detail"]


def test_a_head_that_does_not_arrive_in_time_is_a_408(server):
    answer, _ = raw_request(server, b"GET /v1/model HTTP/1.1\r\nHost: x\r\n", then_wait=TIMEOUT_S + 1.0)
    assert answer.startswith(b"HTTP/1.1 408 ") and b"did not arrive within 2 s" in answer, answer[:300]


def test_a_body_that_stalls_is_a_408(server):
    head = (f"POST /v1/classes/1/score HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n"
            f"Content-Type: multipart/form-data; boundary=B\r\nContent-Length: 1000\r\n\r\n--B\r\n").encode()
    answer, _ = raw_request(server, head, then_wait=TIMEOUT_S + 1.0)
    assert answer.startswith(b"HTTP/1.1 408 ") and b"request body did not arrive within 2 s" in answer, answer[:300]


def series(text: str) -> set:
    return {(sample.name, tuple(sorted(sample.labels.items())))
            for family in text_string_to_metric_families(text) for sample in family.samples}


def test_made_up_methods_without_a_token_add_no_metric_series(client):
    httpx.request("BREW", f"{client.base_url}/v1/model")  # the first such request makes the "other" series
    before = series(client.get("/metrics").text)
    for i in range(74):
        assert httpx.request(f"M{i}X", f"{client.base_url}/v1/runs/made-up-{i}/model").status_code == 401
    after = series(client.get("/metrics").text)
    assert {labels for _, labels in after - before} <= {labels for _, labels in before}  # only counts moved
    assert ("method", "other") in next(labels for _, labels in after if ("status", "401") in labels)


def test_an_answer_slower_than_the_timeout_is_a_503_that_says_so():
    async def slow(scope, receive, send):
        await receive()  # the whole (empty) body arrived: the server is the slow one
        await anyio.sleep(10)

    response = TestClient(RequestTimeout(slow, seconds=0.2)).get("/v1/model")
    assert response.status_code == 503 and "did not answer within 0.2 s" in response.json()["detail"]
