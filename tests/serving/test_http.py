"""The HTTP app through a real uvicorn server on 127.0.0.1 (`slc serve` in a child process), serving
two runs with ce-s0 as the default.

Every bad request gets the right 4xx and a message, and the next good request still succeeds with
the library's answer.
"""
import io

import httpx
import numpy as np
import pytest

from serving.http import max_request_bytes
from serving.loadtest import Server
from serving.model import SingleLogitModel
from tests.serving.conftest import CLASSES, THRESHOLDS, png, upload

MAX_BATCH = 4


@pytest.fixture(scope="module")
def url(exports):
    with Server(exports, max_batch=MAX_BATCH, options=["--default-run", "ce-s0"]) as server:
        yield server.url


@pytest.fixture(scope="module")
def client(url):
    with httpx.Client(base_url=url, timeout=30.0) as client:
        yield client


@pytest.fixture(scope="module")
def library(export_dir):
    return SingleLogitModel.load(export_dir, max_batch=MAX_BATCH)


def npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def assert_good_request_succeeds(client, library, pixels):
    response = client.post("/v1/classes/1/score", files=upload(png(pixels[0]), npy(pixels[1:3])))
    assert response.status_code == 200, response.text
    np.testing.assert_allclose(response.json()["logits"], library.score(pixels[:3], 1), rtol=1e-6)


def test_healthz_answers(client):
    assert client.get("/healthz").json() == {"status": "ok", "run_name": "ce-s0"}


def test_model_description_is_the_library_s(client, library):
    assert client.get("/v1/model").json() == library.describe()


def test_openapi_docs_are_served(client):
    assert client.get("/docs").status_code == 200
    paths = client.get("/openapi.json").json()["paths"]
    assert {"/v1/classes/{class_id}/score", "/v1/runs/{run}/classes/{class_id}/score", "/v1/runs"} <= set(paths)


def test_runs_lists_every_served_run_and_the_default(client):
    body = client.get("/v1/runs").json()
    assert body["default"] == "ce-s0"
    assert [(run["run_name"], run["loss"], run["num_classes"]) for run in body["runs"]] == [("bce-s1", "bce", 5),
                                                                                            ("ce-s0", "ce", 5)]


def test_a_named_run_answers_with_its_own_model(client, exports, pixels):
    other = SingleLogitModel.load(exports / "bce-s1", max_batch=MAX_BATCH)
    response = client.post("/v1/runs/bce-s1/classes/2/score", files=upload(png(pixels[0]), png(pixels[1])))
    body = response.json()
    assert response.status_code == 200 and body["run_name"] == "bce-s1" and body["class_name"] == "c2"
    assert body["threshold"] is None and body["decisions"] is None  # bce-s1 was exported without thresholds
    np.testing.assert_allclose(body["logits"], other.score(pixels[:2], 2), rtol=1e-6)
    assert client.get("/v1/runs/bce-s1/model").json() == other.describe()


def test_the_default_run_answers_under_its_name_too(client, pixels):
    files = upload(png(pixels[0]))
    assert client.post("/v1/runs/ce-s0/classes/1/score", files=files).json() == \
        client.post("/v1/classes/1/score", files=files).json()


@pytest.mark.parametrize("method, path", [("GET", "/v1/runs/ce-s9/model"), ("POST", "/v1/runs/ce-s9/classes/1/score")])
def test_an_unknown_run_is_a_404_listing_the_served_runs(client, library, pixels, method, path):
    response = client.request(method, path, files=upload(png(pixels[0])) if method == "POST" else None)
    assert response.status_code == 404
    assert response.json()["detail"] == "run 'ce-s9' is not served here; the runs are bce-s1, ce-s0 (GET /v1/runs)"
    assert_good_request_succeeds(client, library, pixels)


def test_png_uploads_get_the_library_s_logits_and_decisions(client, library, pixels):
    response = client.post("/v1/classes/2/score", files=upload(*(png(p) for p in pixels[:MAX_BATCH])))
    body = response.json()
    assert response.status_code == 200 and body["class_name"] == CLASSES[2] and body["graph"] == "single_logit"
    assert body["recall"] == 0.99 and body["threshold"] == THRESHOLDS["0.99"][2]
    np.testing.assert_allclose(body["logits"], library.score(pixels[:MAX_BATCH], 2), rtol=1e-6)
    assert body["decisions"] == library.decide(pixels[:MAX_BATCH], 2).tolist()


def test_an_npy_batch_and_a_recall_target(client, library, pixels):
    response = client.post("/v1/classes/0/score", params={"recall": 0.9}, files=upload(npy(pixels[:3])))
    body = response.json()
    assert body["recall"] == 0.9 and body["threshold"] == THRESHOLDS["0.9"][0]
    assert body["decisions"] == library.decide(pixels[:3], 0, recall=0.9).tolist()


def test_normalised_float_input_is_accepted(client, library, pixels):
    floats = library.prepare(pixels[:2])
    response = client.post("/v1/classes/4/score", files=upload(npy(floats)))
    np.testing.assert_allclose(response.json()["logits"], library.score(pixels[:2], 4), rtol=1e-6)


def test_a_class_without_threshold_answers_logits_and_null_decisions(client, pixels):
    body = client.post("/v1/classes/3/score", files=upload(png(pixels[0]))).json()
    assert body["threshold"] is None and body["decisions"] is None and len(body["logits"]) == 1


def rgba(pixels):
    return np.repeat(pixels[0][..., None], 4, axis=-1)


BAD_REQUESTS = {
    "unknown class": ("/v1/classes/99/score", lambda p: upload(png(p[0])), 404, "class 99 is not in this model"),
    "negative class": ("/v1/classes/-1/score", lambda p: upload(png(p[0])), 404, "class -1"),
    "class not a number": ("/v1/classes/bee/score", lambda p: upload(png(p[0])), 422, "class_id"),
    "wrong size": ("/v1/classes/1/score", lambda p: upload(png(np.zeros((9, 8), np.uint8))), 422, "takes 8x8"),
    "alpha channel array": ("/v1/classes/1/score", lambda p: upload(npy(rgba(p))), 422, "drop the alpha"),
    "corrupt png": ("/v1/classes/1/score", lambda p: upload(png(p[0])[:40]), 400, "cannot be read"),
    "not an image": ("/v1/classes/1/score", lambda p: upload(b"%PDF-1.4 hello"), 400, "not a PNG, JPEG or .npy"),
    "pickled npy": ("/v1/classes/1/score", lambda p: upload(npy_pickled()), 400, "no pickled objects"),
    "empty batch": ("/v1/classes/1/score", lambda p: upload(npy(p[:0])), 422, "empty"),
    "too many images": ("/v1/classes/1/score", lambda p: upload(*[png(p[0])] * (MAX_BATCH + 1)), 413, "at most 4"),
    "too large npy": ("/v1/classes/1/score", lambda p: upload(npy(p[:MAX_BATCH + 1])), 413, "at most 4"),
    "npy plus image over the limit": ("/v1/classes/1/score", lambda p: upload(npy(p[:4]), png(p[0])), 413, "5 images"),
    "no files": ("/v1/classes/1/score", lambda p: None, 422, "files"),
    "int64 pixels": ("/v1/classes/1/score", lambda p: upload(npy(p[:2].astype(np.int64))), 422, "dtype int64"),
    "float of wrong shape": ("/v1/classes/1/score", lambda p: upload(npy(np.zeros((2, 3, 8, 8), np.float32))),
                             422, r"must be (1, 8, 8)"),
    "NaN floats": ("/v1/classes/1/score", lambda p: upload(npy(np.full((1, 1, 8, 8), np.nan, np.float32))), 422, "NaN"),
    "unknown recall": ("/v1/classes/1/score?recall=0.5", lambda p: upload(png(p[0])), 422, "0.9, 0.99"),
}


def npy_pickled() -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.array([{"x": 1}], dtype=object), allow_pickle=True)
    return buffer.getvalue()


@pytest.mark.parametrize("case", BAD_REQUESTS)
def test_bad_request_gets_a_4xx_and_the_server_keeps_serving(client, library, pixels, case):
    path, files, status, message = BAD_REQUESTS[case]
    response = client.post(path, files=files(pixels))
    assert response.status_code == status, response.text
    assert message in str(response.json()["detail"])
    assert_good_request_succeeds(client, library, pixels)


def test_a_body_too_large_for_any_batch_is_refused_before_it_is_read(client, library, pixels):
    limit = max_request_bytes(library)
    response = client.post("/v1/classes/1/score", files=upload(b"\0" * limit))
    assert response.status_code == 413 and f"at most {limit} are read" in response.json()["detail"]
    assert_good_request_succeeds(client, library, pixels)


def test_a_chunked_body_is_refused_while_it_streams_once_it_passes_the_limit(url, client, library, pixels):
    """No Content-Length to refuse by: the server counts what arrives, answers 413 at the limit and
    closes the connection, so the client stops sending long before its 100 MiB."""
    sent = 0

    def body():
        nonlocal sent
        yield b'--B\r\nContent-Disposition: form-data; name="files"; filename="x.npy"\r\n\r\n'
        for _ in range(1600):
            sent += 1 << 16
            yield b"\0" * (1 << 16)
        yield b"\r\n--B--\r\n"

    with httpx.Client(base_url=url, timeout=60.0) as own:  # its connection gets closed
        response = own.post("/v1/classes/1/score", content=body(), headers={"content-type": "multipart/form-data; boundary=B"})
    assert response.status_code == 413 and "more than" in response.json()["detail"]
    assert response.headers["connection"] == "close" and sent < 20 * 2**20 < 100 * 2**20 == 1600 * (1 << 16)
    assert_good_request_succeeds(client, library, pixels)
