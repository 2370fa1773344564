"""Property-based fuzzing (hypothesis) of what a client controls: the bytes of an upload (.npy headers,
shapes and dtypes, PNG/JPEG files, anything else) and whole HTTP requests (paths, queries, multipart
bodies). The parser either decodes or raises an InputError, the HTTP app answers 2xx or 4xx, never
5xx, and a good request afterwards gets the logits it got before.

The examples are derandomised (the same ones on every run, no example database) so that the suite
stays reproducible; SLC_FUZZ_EXAMPLES=<n> runs n per test instead, to search harder.
"""
import io
import os

import numpy as np
import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from PIL import Image

from serving.batching import Batching
from serving.errors import InputError
from serving.http import create_app
from serving.images import decode
from serving.metrics import PrometheusMetrics
from serving.model import SingleLogitModel
from serving.runs import Runs
from tests.serving.conftest import SHAPE, npy_claiming
from tests.serving.test_http import npy


def fuzz_settings(examples: int):
    return settings(max_examples=int(os.environ.get("SLC_FUZZ_EXAMPLES", examples)), deadline=None, derandomize=True,
                    database=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


# Shapes near the model's (8x8 grey), and the axes a hostile header claims: huge, zero, negative.
MODEL_SHAPES = [(8, 8), (1, 8, 8), (2, 8, 8), (8, 8, 1), (8, 8, 3), (8, 8, 4), (1, 1, 8, 8), (3, 1, 8, 8), (1, 8, 8, 3),
                (5, 1, 8, 8), (0, 8, 8), (8, 9)]
AXES = st.one_of(st.integers(0, 9), st.sampled_from([8, 10**5, 10**6, 2**31, 2**40, 2**63 - 1, 10**30]), st.integers(-5, -1))
CLAIMS = [(10**6, 10**6), (2**20, 8, 8), (10**5, 10**5, 3), (2**31, 2**31), (2**24, 1, 8, 8), (8, 8, 2**40)]
SHAPES = st.one_of(st.sampled_from(MODEL_SHAPES), st.sampled_from(CLAIMS), st.sampled_from(CLAIMS),
                   st.lists(AXES, max_size=6).map(tuple))
NUMBERS = st.sampled_from(["|u1", "<f4", "<f8", "|u1", "<f4", "<f8", ">f4", "<f2", "|i1", "|b1", "<i8"])
DESCRS = st.one_of(NUMBERS, NUMBERS, NUMBERS, st.just([("a", "<f4")]),
                   st.sampled_from(["<c8", "|O", "|V4", "<U3", "|S2", "<m8[s]", "garbage", "", "<f4 ", "(2,)u1"]))


@st.composite
def npy_files(draw) -> bytes:
    """An .npy header of a client's choosing (mostly well-formed, claiming any shape and dtype), with a
    body of the size it claims or of any other."""
    shape = draw(SHAPES)
    header = {"descr": draw(DESCRS), "fortran_order": draw(st.sampled_from([False, True, False, 1, "no"])), "shape": shape}
    text = draw(st.one_of(st.just(repr(header)), st.just(repr(header)), st.text(max_size=60)))
    padded = text + " " * (-(len(text) + 11) % 64) + "\n"
    version = draw(st.sampled_from([b"\x01\x00", b"\x01\x00", b"\x02\x00", b"\x03\x00", b"\x09\x09"]))
    length = len(padded).to_bytes(2 if version == b"\x01\x00" else 4, "little")
    if draw(st.integers(0, 4)) == 0:  # a length field that lies
        length = draw(st.binary(min_size=len(length), max_size=len(length)))
    honest = int(np.prod(shape)) * 4 if all(isinstance(a, int) and 0 <= a < 100 for a in shape) else 0
    body = draw(st.one_of(st.binary(max_size=300), st.just(b"\0" * honest), st.just(b"\x7f" * honest)))
    return b"\x93NUMPY" + version + length + padded.encode("latin-1", "replace") + body


@st.composite
def saved_arrays(draw) -> bytes:
    """A well-formed .npy file of a numeric dtype and a shape near the model's, holding extreme values:
    NaN, inf, float32's largest, finite float64s that float32 cannot hold, random signs of them."""
    dtype = draw(st.sampled_from([np.uint8, np.float32, np.float64, np.float16, np.int16, np.bool_]))
    shape = draw(st.one_of(st.sampled_from(MODEL_SHAPES), st.lists(st.integers(0, 9), max_size=5).map(tuple)))
    value = draw(st.sampled_from([0.0, 1.0, 255.0, -1.0, 3e38, -3e38, 1e38, 1e300, np.nan, np.inf]))
    signs = np.random.default_rng(draw(st.integers(0, 2**16))).choice([-1.0, 1.0], size=shape)
    with np.errstate(all="ignore"):
        array = (signs * value if draw(st.booleans()) else np.full(shape, value)).astype(dtype)
    return npy(np.asfortranarray(array) if draw(st.booleans()) else array)


def image_bytes(size: tuple[int, int], fmt: str, mode: str) -> bytes:
    buffer = io.BytesIO()
    channels = {"L": (), "RGB": (3,), "RGBA": (4,)}[mode]
    pixels = np.random.default_rng(0).integers(0, 256, size=(*size, *channels), dtype=np.uint8)
    Image.fromarray(pixels, mode).save(buffer, format=fmt)
    return buffer.getvalue()


@st.composite
def damaged_images(draw) -> bytes:
    """A real PNG or JPEG, of the model's size or not, truncated or with bytes overwritten."""
    fmt = draw(st.sampled_from(["PNG", "JPEG"]))
    mode = draw(st.sampled_from(["L", "RGB"] + (["RGBA"] if fmt == "PNG" else [])))
    data = bytearray(image_bytes(draw(st.sampled_from([(8, 8), (9, 8), (1, 1), (300, 2)])), fmt, mode))
    for _ in range(draw(st.integers(0, 4))):
        data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
    return bytes(data[:draw(st.integers(0, len(data)))] if draw(st.booleans()) else data)


UPLOADS = st.one_of(npy_files(), npy_files(), saved_arrays(), saved_arrays(), damaged_images(), st.binary(max_size=300),
                    st.binary(max_size=200).map(lambda b: b"\x89PNG\r\n\x1a\n" + b),
                    st.binary(max_size=200).map(lambda b: b"\xff\xd8\xff" + b))


@pytest.fixture(scope="module")
def model(export_dir):
    return SingleLogitModel.load(export_dir, max_batch=4)


# issue #23's own uploads, always among the examples: a 144-byte header claiming 10^6 x 10^6 uint8, a finite
# float64 that is inf as float32, and float32's largest value
ISSUE_UPLOADS = [npy_claiming((10**6, 10**6)), npy(np.full((1, 1, 8, 8), 1e300)), npy(np.full((1, 1, 8, 8), 3e38, np.float32))]


@fuzz_settings(400)
@given(data=UPLOADS)
@example(data=ISSUE_UPLOADS[0])
@example(data=ISSUE_UPLOADS[1])
@example(data=ISSUE_UPLOADS[2])
def test_an_upload_is_decoded_or_refused_with_an_input_error(model, data):
    try:
        batch = model.prepare(decode(data, "fuzz", SHAPE[1:]))
    except InputError:
        return
    assert batch.dtype == np.float32 and batch.shape[1:] == SHAPE and np.isfinite(batch).all()


@pytest.fixture(scope="module")
def client(exports):
    runs = Runs.load([exports], "ce-s0", max_batch=4)
    metrics = PrometheusMetrics()
    app = create_app(runs, score=Batching(metrics, 1.0), metrics=metrics)
    with TestClient(app, raise_server_exceptions=False) as client:
        yield client


def good_logits(client, pixels) -> list[float]:
    response = client.post("/v1/classes/1/score", files=[("files", ("good.npy", npy(pixels[:3])))])
    assert response.status_code == 200, response.text
    return response.json()["logits"]


SCORE = "/v1/classes/{c}/score"
PATHS = st.one_of(st.just(SCORE), st.just(SCORE), st.just("/v1/runs/{r}/classes/{c}/score"),
                  st.sampled_from(["/v1/runs/{r}/model", "/v1/model", "/v1/runs", "/metrics", "/healthz"]),
                  st.text(alphabet="/abcv1{}%.", max_size=30).map(lambda t: "/" + t))
CLASS_IDS = st.one_of(st.integers(0, 4), st.integers(0, 4), st.integers(-3, 7),
                      st.sampled_from(["bee", "1.5", "%00", "9" * 30, "", "-0", "0x1"]))
RECALLS = st.one_of(st.none(), st.none(), st.sampled_from(["0.9", "0.99", "nan", "inf", "-1", "1e400", "x", "0.990"]))


@st.composite
def requests(draw) -> dict:
    """A request as a client may shape it, mostly a score request: path, query, and files or a raw
    (multipart or not) body."""
    path = draw(PATHS).replace("{c}", str(draw(CLASS_IDS))).replace("{r}", draw(st.sampled_from(["ce-s0", "bce-s1", "x"])))
    recall = draw(RECALLS)
    request = {"method": draw(st.sampled_from(["POST"] * 6 + ["GET", "PUT", "DELETE"])), "url": path,
               "params": {} if recall is None else {"recall": recall}}
    kind = draw(st.sampled_from(["files"] * 6 + ["raw multipart", "raw"]))
    if kind == "files":
        parts = draw(st.lists(UPLOADS, min_size=draw(st.sampled_from([1, 1, 1, 0])), max_size=6))
        field = draw(st.sampled_from(["files"] * 6 + ["file", "x"]))
        request["files"] = [(field, (draw(st.text(max_size=8)) or "f", part)) for part in parts]
    else:
        boundary = draw(st.sampled_from(["B", "B", "", "x" * 100, "a b"]))
        body = draw(st.one_of(st.binary(max_size=400), UPLOADS.map(lambda u: (
            b'--B\r\nContent-Disposition: form-data; name="files"; filename="x.npy"\r\n\r\n' + u + b"\r\n--B--\r\n"))))
        content_type = f"multipart/form-data; boundary={boundary}" if kind == "raw multipart" else draw(
            st.sampled_from(["application/octet-stream", "text/plain", "multipart/form-data", "image/png"]))
        request.update(content=body, headers={"content-type": content_type})
    return request


@fuzz_settings(250)
@given(request=requests())
@example(request={"method": "POST", "url": SCORE.format(c=1), "files": [("files", ("issue.npy", ISSUE_UPLOADS[0]))]})
@example(request={"method": "POST", "url": SCORE.format(c=1), "files": [("files", ("issue.npy", ISSUE_UPLOADS[1]))]})
def test_every_request_is_answered_2xx_or_4xx_and_a_good_request_keeps_its_logits(client, pixels, request):
    before = good_logits(client, pixels)
    response = client.request(**request)
    assert response.status_code < 500, (request["url"], response.status_code, response.text[:300])
    if response.status_code == 200 and request["url"].endswith("/score"):  # the schema promises numbers, never null
        assert all(isinstance(logit, float) for logit in response.json()["logits"]), response.text[:300]
    assert good_logits(client, pixels) == before
