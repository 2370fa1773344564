"""Search over HTTP (`slc serve EXPORT --index DIR`): the library's answers, behind the same token, body
limit and /metrics as the score routes; a bad upload is a 4xx that adds nothing."""
import numpy as np
import pytest
import uvicorn
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from serving.http import create_app
from serving.index_build import build
from serving.metrics import PrometheusMetrics
from serving.model import SingleLogitModel
from serving.runs import Runs
from serving.search import SearchIndex
from tests.serving.conftest import png, upload
from tests.serving.test_cli import run

N, MAX_BATCH, TOKEN = 10, 4, "search-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture
def images() -> np.ndarray:
    return np.random.default_rng(11).integers(0, 256, size=(N, 8, 8), dtype=np.uint8)


@pytest.fixture
def served(export_dir, images, tmp_path):
    np.save(tmp_path / "images.npy", images)
    build(export_dir, tmp_path / "images.npy", tmp_path / "index")
    model = SingleLogitModel.load(export_dir, max_batch=MAX_BATCH)
    index = SearchIndex.open(tmp_path / "index", model)
    app = create_app(Runs([model]), token=TOKEN, metrics=PrometheusMetrics(), index=index)
    with TestClient(app) as client:
        yield client, index


def test_search_answers_what_the_library_does(served):
    client, index = served
    response = client.get("/v1/classes/1/search", params={"recall": 0.9}, headers=AUTH)
    assert response.status_code == 200, response.text
    hits = index.search(1, recall=0.9)
    body = response.json()
    assert body["ids"] == hits.ids.tolist() and body["logits"] == hits.logits.tolist() and body["total"] == hits.total
    paged = client.get("/v1/classes/1/search", params={"threshold": -1e9, "limit": 3, "offset": 2}, headers=AUTH).json()
    assert paged["ids"] == index.search(1, threshold=-1e9).ids[2:5].tolist() and paged["total"] == N


def test_uploaded_images_are_found_by_the_next_search(served, images):
    client, index = served
    response = client.post("/v1/index/images", files=upload(png(images[0]), png(images[1])), headers=AUTH)
    assert response.status_code == 200, response.text
    assert response.json() == {"ids": [N, N + 1], "count": N + 2}
    found = client.get("/v1/classes/0/search", params={"limit": N + 2}, headers=AUTH).json()["ids"]
    assert {N, N + 1} <= set(found)


@pytest.mark.parametrize(("files", "status", "words"), [
    (upload(b"not an image"), 400, "cannot be read"),
    (upload(png(np.zeros((9, 9), np.uint8))), 422, "9x9 pixels"),
    (upload(*[png(np.zeros((8, 8), np.uint8))] * (MAX_BATCH + 1)), 413, "at most 4"),
])
def test_a_bad_upload_is_a_4xx_and_adds_nothing(served, files, status, words):
    client, index = served
    response = client.post("/v1/index/images", files=files, headers=AUTH)
    assert response.status_code == status and words in response.json()["detail"]
    assert len(index) == N and len(SearchIndex.open(index.index_dir)) == N


@pytest.mark.parametrize(("path", "params", "status", "words"), [
    ("/v1/classes/9/search", {"recall": 0.9}, 404, "class 9 is not in this model"),
    ("/v1/classes/3/search", {"recall": 0.99}, 422, "class 3 has no threshold"),
    ("/v1/classes/0/search", {"recall": 0.5}, 422, "no thresholds for recall 0.5"),
    ("/v1/classes/0/search", {"recall": 0.9, "threshold": 1}, 422, "not both"),
    ("/v1/classes/0/search", {}, 422, "a recall target, a threshold or a limit"),
    ("/v1/classes/0/search", {"limit": 0}, 422, "limit = 0"),
])
def test_a_bad_query_is_a_4xx_with_a_message(served, path, params, status, words):
    response = served[0].get(path, params=params, headers=AUTH)
    assert response.status_code == status and words in response.json()["detail"]


def test_the_search_routes_need_the_token_and_are_counted_in_metrics(served, images):
    client, _ = served
    assert client.get("/v1/classes/1/search", params={"limit": 1}).status_code == 401
    assert client.post("/v1/index/images", files=upload(png(images[0]))).status_code == 401
    assert client.get("/v1/classes/1/search", params={"limit": 1}, headers=AUTH).status_code == 200
    text = client.get("/metrics", headers=AUTH).text
    counted = sum(sample.value for family in text_string_to_metric_families(text) for sample in family.samples
                  if sample.name == "slc_http_request_duration_seconds_count"
                  and sample.labels["route"] == "/v1/classes/{class_id}/search" and sample.labels["status"] == "200"
                  and sample.labels["class_id"] == "1")
    assert counted == 1


@pytest.fixture
def started(monkeypatch):
    """What `slc serve` would have handed uvicorn."""
    calls = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **options: calls.append((app, options)))
    return calls


def test_slc_serve_serves_the_index_of_its_default_run_and_refuses_another_exports(capsys, served, started, exports):
    index_dir = served[1].index_dir
    code, _, _ = run(capsys, "serve", exports, "--default-run", "ce-s0", "--index", index_dir)
    assert code == 0 and {"/v1/classes/{class_id}/search", "/v1/index/images"} <= {r.path for r in started[0][0].routes}
    code, _, err = run(capsys, "serve", exports, "--default-run", "bce-s1", "--index", index_dir)
    assert code == 3 and "differs from" in err and len(started) == 1
