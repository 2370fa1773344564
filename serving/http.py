"""The HTTP face of the served runs: a FastAPI app, run by uvicorn (`slc serve`) or Ray Serve.

    GET  /healthz                                  open to probes, even with a token
    GET  /metrics                                  Prometheus text format (serving.metrics)
    GET  /v1/runs                                  the served runs and the default one
    GET  /v1/runs/{run}/model                      a run's classes, input, thresholds, graph
    POST /v1/runs/{run}/classes/{class_id}/score   is each uploaded image of class c?
    GET  /v1/model, POST /v1/classes/{class_id}/score: the same for the default run
    GET  /v1/classes/{class_id}/search             with an index (`slc serve --index DIR`): the stored
    POST /v1/index/images                          images of class c; add images to the index

Bad input is the client's to fix, so each library error becomes a 4xx whose `detail` says what
was wrong and what is expected (`STATUS`), and the server goes on serving. A request is checked on
its own, as the network's float32 input, before its images join any batch, and its own logits are
checked for inf and NaN after (422), so no request fails or changes for another's sake. A body is
read only up to what the largest acceptable batch needs, with or without a Content-Length (413
beyond); the head's size and fields and the request's time are bounded first (serving.bounded). Uploads
are read on the event loop; decoding and inference run in worker threads, `request_threads` at
most (one per CPU by default, not FastAPI's 40), so a burst of requests queues instead of holding
40 decoded batches in memory and 40 threads contending for the GIL and the cores.
"""
# No `from __future__ import annotations`: FastAPI must see the dependency of `add_run_routes`, a local, as
# an object, not a string it would look up among the module's globals.
import os
from typing import TYPE_CHECKING, Annotated

import anyio
import numpy as np
from fastapi import Depends, FastAPI, File, Path, Query, Request, Response, UploadFile
from fastapi.responses import JSONResponse
from pydantic import BaseModel

from serving.auth import BearerToken
from serving.batching import Scorer, infer
from serving.bounded import BodyLimit, HeaderCount, RequestTimeout
from serving.errors import BatchTooLargeError, DecodeError, InputError, UnknownClassError, UnknownRunError
from serving.images import check_batch_size, decode
from serving.limits import Limits
from serving.metrics import Metrics, PrometheusMetrics, RequestMetrics, label_request
from serving.model import SingleLogitModel, check_finite
from serving.runs import Runs

if TYPE_CHECKING:  # faiss is imported only by a server started with an index
    from serving.search import SearchIndex

DEFAULT_LIMITS = Limits()

# Library error -> HTTP status; the most specific class in the error's MRO wins.
STATUS: dict[type[Exception], int] = {
    UnknownClassError: 404,
    UnknownRunError: 404,
    BatchTooLargeError: 413,
    DecodeError: 400,
    InputError: 422,
}


class Score(BaseModel):
    """The answer to one scoring request; lists follow the order of the uploaded images. `threshold`
    and `decisions` are null when the class has no calibrated threshold (or the export none at all)."""
    run_name: str
    class_id: int
    class_name: str
    graph: str
    recall: float | None
    threshold: float | None
    logits: list[float]
    decisions: list[bool] | None


def create_app(runs: Runs, *, request_threads: int | None = None, score: Scorer | None = None,
               token: str | None = None, metrics: Metrics | None = None, limits: Limits = DEFAULT_LIMITS,
               index: "SearchIndex | None" = None) -> FastAPI:
    """The app around loaded runs. At most `request_threads` requests (None: one per CPU) are decoded
    at once, the others wait without holding a thread. `score` runs onnxruntime (None: in a worker
    thread too, one call per request; serving.batching shares calls). `metrics` records the series
    of serving.metrics; PrometheusMetrics (the default) are served at GET /metrics. With a `token`,
    every route but /healthz needs it. `limits` bounds header fields and time before the token is
    checked (their bytes are the protocol's: serving.bounded.BoundedH11). With an `index` (of the default
    run's export), its search and add routes are served too."""
    default, limit = runs.default, body_limit(runs)
    app = FastAPI(title="Single logit classification", version="1",
                  summary=f"Is this image of class c? {len(runs.models)} run(s), by default {default.run_name} "
                          f"({default.manifest.dataset}, {default.num_classes} classes), computing only the logit of c.")
    slots = anyio.CapacityLimiter(request_threads or os.cpu_count() or 1)
    metrics = PrometheusMetrics() if metrics is None else metrics
    if isinstance(metrics, PrometheusMetrics):  # Ray Serve's are exported by Ray

        @app.get("/metrics", response_class=Response)
        def prometheus() -> Response:
            """Request, inference and batch histograms in Prometheus' text format."""
            body, content_type = metrics.exposition()
            return Response(body, media_type=content_type)

    if score is None:
        async def score(model: SingleLogitModel, images: np.ndarray, class_id: int) -> np.ndarray:
            return await anyio.to_thread.run_sync(infer, model, metrics, images, class_id, limiter=slots)

    if limit is not None:
        app.add_middleware(BodyLimit, limit=limit)
    if token is not None:
        app.add_middleware(BearerToken, token=token)
    app.add_middleware(HeaderCount, limit=limits.max_headers)
    app.add_middleware(RequestTimeout, seconds=limits.request_timeout_s)
    app.add_middleware(RequestMetrics, metrics=metrics)  # added last, so outermost: it sees the 401s too

    @app.exception_handler(InputError)
    async def input_error(request: Request, error: InputError) -> JSONResponse:
        return _error(status_of(error), str(error))

    @app.get("/healthz")
    def healthz() -> dict:
        return {"status": "ok", "run_name": default.run_name}

    @app.get("/v1/runs")
    def list_runs() -> dict:
        """The served runs; the default one answers the paths without /runs/{run}."""
        return {"default": default.run_name,
                "runs": [{"run_name": m.run_name, "loss": m.manifest.loss, "dataset": m.manifest.dataset,
                          "num_classes": m.num_classes, "graph": m.graph} for m in runs]}

    async def default_run(request: Request) -> SingleLogitModel:
        label_request(request.scope, default.run_name)
        return default

    async def named_run(request: Request, run: Annotated[str, Path(description="a run of GET /v1/runs")]) -> SingleLogitModel:
        model = runs[run]
        label_request(request.scope, run)
        return model

    add_run_routes(app, "/v1", default_run, score, slots)
    add_run_routes(app, "/v1/runs/{run}", named_run, score, slots)
    if index is not None:
        add_search_routes(app, index, slots)
    return app


class Found(BaseModel):
    """A search's answer: the stored images of the class, best first; `total` counts them before paging."""
    run_name: str
    class_id: int
    class_name: str
    recall: float | None
    threshold: float | None
    total: int
    offset: int
    ids: list[int]
    logits: list[float]
    paths: list[str | None]


def add_search_routes(app: FastAPI, index: "SearchIndex", slots: anyio.CapacityLimiter) -> None:
    """Search the index of the default run, and add to it: queries and adds run in worker threads, and
    the index's lock keeps a query from seeing half an add."""
    model = index.model

    @app.get("/v1/classes/{class_id}/search")
    async def search(
        request: Request,
        class_id: int,
        recall: Annotated[float | None, Query(description="the class's threshold calibrated for this recall")] = None,
        threshold: Annotated[float | None, Query(description="a logit threshold of your own")] = None,
        limit: Annotated[int | None, Query(description="at most this many images; alone, the best ones")] = None,
        offset: Annotated[int, Query(description="skip this many of the best first")] = 0,
    ) -> Found:
        """Every stored image whose logit for the class reaches the threshold, or the `limit` best."""
        model.class_ids(class_id, 1)
        label_request(request.scope, model.run_name, class_id)
        hits = await anyio.to_thread.run_sync(lambda: index.search(class_id, recall, threshold, limit, offset),
                                              limiter=slots)
        return Found(run_name=model.run_name, class_id=class_id, class_name=model.class_names[class_id],
                     recall=hits.recall, threshold=hits.threshold, total=hits.total, offset=offset,
                     ids=hits.ids.tolist(), logits=hits.logits.tolist(), paths=hits.paths)

    @app.post("/v1/index/images")
    async def add_images(
        request: Request,
        files: Annotated[list[UploadFile], File(description="PNG/JPEG images (one each) or .npy arrays")],
    ) -> dict:
        """Add the uploaded images to the index, all or none; they are found by the next search."""
        label_request(request.scope, model.run_name)
        check_batch_size(len(files), model.max_batch)
        uploads = [(await upload.read(), upload.filename or f"upload {i}") for i, upload in enumerate(files)]
        ids = await anyio.to_thread.run_sync(lambda: index.add(prepare(model, uploads)), limiter=slots)
        return {"ids": list(ids), "count": len(index)}


def add_run_routes(app: FastAPI, prefix: str, run, score: Scorer, slots: anyio.CapacityLimiter) -> None:
    """The routes of one run, the one the dependency `run` picks (the default, or the path's). Added to
    the app itself, not through a router, so that a request's route (its metrics label) is the whole path."""
    Model = Annotated[SingleLogitModel, Depends(run)]

    @app.get(f"{prefix}/model")
    def describe(model: Model) -> dict:
        """The exported run: class names and ids, input shape and normalisation, thresholds, graph."""
        return model.describe()

    @app.post(f"{prefix}/classes/{{class_id}}/score")
    async def classify(
        request: Request,
        model: Model,
        class_id: int,
        files: Annotated[list[UploadFile], File(description="PNG/JPEG images (one each) or .npy arrays "
                                                            "(uint8 pixels or normalised float32 batches)")],
        recall: Annotated[float | None, Query(description="recall target whose calibrated threshold decides; "
                                                          "default 0.99 (GET /v1/model lists the targets)")] = None,
    ) -> Score:
        """Score every uploaded image for one class; decide with the threshold calibrated for `recall`."""
        # an unknown class, too many files or an unknown recall is refused before any upload is decoded
        model.class_ids(class_id, 1)
        label_request(request.scope, model.run_name, class_id)
        check_batch_size(len(files), model.max_batch)
        recall = model.default_recall if recall is None else recall
        thresholds = None if recall is None else model.thresholds(recall)
        uploads = [(await upload.read(), upload.filename or f"upload {i}") for i, upload in enumerate(files)]
        images = await anyio.to_thread.run_sync(prepare, model, uploads, limiter=slots)
        # this request's own logits checked, after a call it may have shared: an overflow fails it alone
        logits = check_finite(await score(model, images, class_id), class_id)
        threshold = None if thresholds is None or np.isnan(thresholds[class_id]) else float(thresholds[class_id])
        return Score(run_name=model.run_name, class_id=class_id, class_name=model.class_names[class_id],
                     graph=model.graph, recall=recall, threshold=threshold, logits=logits.tolist(),
                     decisions=None if threshold is None else (logits >= threshold).tolist())


def prepare(model: SingleLogitModel, uploads: list[tuple[bytes, str]]) -> np.ndarray:
    """Uploads -> the network's input batch (CPU work, run in a worker thread)."""
    size = model.input_shape[1:]
    batch = np.concatenate([model.prepare(decode(data, name, size)) for data, name in uploads])
    check_batch_size(len(batch), model.max_batch)
    return batch


def max_request_bytes(model: SingleLogitModel) -> int | None:
    """The largest body worth reading: max_batch float64 images plus 1 MiB of headers and encoding
    (None: the model takes batches of any size)."""
    return None if model.max_batch is None else model.max_batch * int(np.prod(model.input_shape)) * 8 + (1 << 20)


def body_limit(runs: Runs) -> int | None:
    """One limit for every run: the largest any of them may need."""
    limits = [max_request_bytes(model) for model in runs]
    return None if None in limits else max(limits)


def status_of(error: Exception) -> int:
    return next(STATUS[cls] for cls in type(error).__mro__ if cls in STATUS)


def _error(status: int, detail: str) -> JSONResponse:
    return JSONResponse(status_code=status, content={"detail": detail})
