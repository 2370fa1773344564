"""The HTTP face of a SingleLogitModel: a FastAPI app, run by uvicorn (`slc serve`) or Ray Serve.

Bad input is the client's to fix, so each library error becomes a 4xx whose `detail` says what
was wrong and what is expected (`STATUS`), and the server goes on serving. Uploads are read on
the event loop; decoding and inference run in worker threads, `request_threads` at most (one per
CPU by default, not FastAPI's 40), so a burst of requests queues instead of holding 40 decoded
batches in memory and 40 threads contending for the GIL and the cores.
"""
from __future__ import annotations

import os
from functools import partial
from typing import Annotated

import anyio
import numpy as np
from fastapi import FastAPI, File, Query, Request, UploadFile
from fastapi.responses import JSONResponse
from pydantic import BaseModel

from serving.errors import BatchTooLargeError, DecodeError, InputError, UnknownClassError
from serving.images import check_batch_size, decode
from serving.model import SingleLogitModel

# Library error -> HTTP status; the most specific class in the error's MRO wins.
STATUS: dict[type[Exception], int] = {
    UnknownClassError: 404,
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


def create_app(model: SingleLogitModel, request_threads: int | None = None) -> FastAPI:
    """The app around a loaded model: at most `request_threads` requests (None: one per CPU) are
    decoded and scored at once; the others wait their turn without holding a thread."""
    app = FastAPI(
        title="Single logit classification",
        summary=f"Is this image of class c? Run {model.run_name} ({model.manifest.dataset}, "
                f"{model.num_classes} classes), computing only the logit of c.",
        version="1",
    )
    inference_slots = anyio.CapacityLimiter(request_threads or os.cpu_count() or 1)
    if model.max_batch is not None:
        app.add_middleware(BodyLimit, limit=max_request_bytes(model), max_batch=model.max_batch)

    @app.exception_handler(InputError)
    async def input_error(request: Request, error: InputError) -> JSONResponse:
        return _error(status_of(error), str(error))

    @app.get("/healthz")
    def healthz() -> dict:
        return {"status": "ok", "run_name": model.run_name}

    @app.get("/v1/model")
    def describe() -> dict:
        """The exported run: class names and ids, input shape and normalisation, thresholds, graph."""
        return model.describe()

    @app.post("/v1/classes/{class_id}/score")
    async def score(
        class_id: int,
        files: Annotated[list[UploadFile], File(description="PNG/JPEG images (one each) or .npy arrays "
                                                            "(uint8 pixels or normalised float32 batches)")],
        recall: Annotated[float | None, Query(description="recall target whose calibrated threshold decides; "
                                                          "default 0.99 (GET /v1/model lists the targets)")] = None,
    ) -> Score:
        """Score every uploaded image for one class; decide with the threshold calibrated for `recall`."""
        model.class_ids(class_id, 1)  # an unknown class is refused before any upload is decoded
        check_batch_size(len(files), model.max_batch)
        uploads = [(await upload.read(), upload.filename or f"upload {i}") for i, upload in enumerate(files)]
        work = partial(answer, model, class_id, uploads, recall)
        return await anyio.to_thread.run_sync(work, limiter=inference_slots)

    return app


def answer(model: SingleLogitModel, class_id: int, uploads: list[tuple[bytes, str]], recall: float | None) -> Score:
    """Decode, score and decide (CPU work, run in a worker thread)."""
    size = model.input_shape[1:]
    batch = np.concatenate([model.prepare(decode(data, name, size)) for data, name in uploads])
    check_batch_size(len(batch), model.max_batch)
    result = model.classify(batch, class_id, model.default_recall if recall is None else recall)
    threshold = None if np.isnan(result.thresholds[0]) else float(result.thresholds[0])
    return Score(run_name=model.run_name, class_id=class_id, class_name=model.class_names[class_id],
                 graph=model.graph, recall=result.recall, threshold=threshold, logits=result.logits.tolist(),
                 decisions=None if threshold is None else result.decisions.tolist())


class BodyLimit:
    """Refuse a body that cannot hold an acceptable batch before it is read into memory. Plain ASGI,
    as Starlette's BaseHTTPMiddleware would pass every request and response through extra tasks
    and streams for a check of one header."""

    def __init__(self, app, limit: int, max_batch: int):
        self.app, self.limit, self.max_batch = app, limit, max_batch

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            length = dict(scope["headers"]).get(b"content-length", b"")
            if length.isdigit() and int(length) > self.limit:
                response = _error(413, f"the request has {int(length)} bytes, at most {self.limit} are taken "
                                       f"(serving.max_batch = {self.max_batch} images); send fewer images per request")
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


def max_request_bytes(model: SingleLogitModel) -> int:
    """The largest body worth reading: max_batch float64 images plus 1 MiB of headers and encoding."""
    return model.max_batch * int(np.prod(model.input_shape)) * 8 + (1 << 20)


def status_of(error: Exception) -> int:
    return next(STATUS[cls] for cls in type(error).__mro__ if cls in STATUS)


def _error(status: int, detail: str) -> JSONResponse:
    return JSONResponse(status_code=status, content={"detail": detail})

