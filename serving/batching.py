"""Dynamic batching: concurrent requests for one model share one onnxruntime call.

On an idle model a request waits `wait_ms` for others to it; then one call (one per `max_batch`
images) scores them all, each image with its own request's class (the graphs pair image i with
class id i), and each request gets its slice of the logits back. A model runs one batch at a time,
and the requests that arrive meanwhile form the next, so the busier the model the larger its
batches, with no more waiting. It pays when a call on 8 images costs about what a call on one
does: a large head (many classes, the full graph) or a GPU; the README's load test says what it
does where decoding the uploads is most of the work.
"""
from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

import anyio
import numpy as np

from serving.metrics import BATCH, INFERENCE, Metrics
from serving.model import SingleLogitModel

# (model, prepared float32 images, class id) -> their logits; how a request's images reach onnxruntime
Scorer = Callable[[SingleLogitModel, np.ndarray, int], Awaitable[np.ndarray]]


def check_wait(wait_ms: float) -> float:
    """A batch wait must be a positive time: no wait at all is no batching (leave the setting out)."""
    if not wait_ms > 0:
        raise ValueError(f"batch wait {wait_ms!r} ms is invalid: expected a positive number of milliseconds, "
                         f"or no batch wait (null) to serve without batching")
    return wait_ms


def infer(model: SingleLogitModel, metrics: Metrics, images: np.ndarray, class_ids) -> np.ndarray:
    """One onnxruntime call on prepared images, timed and counted; its logits as they come (each
    request checks its own for non-finite values: serving.model.check_finite)."""
    start = time.perf_counter()
    logits = model.logits(images, model.class_ids(class_ids, len(images)))
    labels = {"run": model.run_name, "graph": model.graph}
    metrics.observe(INFERENCE, time.perf_counter() - start, labels)
    metrics.observe(BATCH, len(images), labels)
    return logits


def score_together(model: SingleLogitModel, metrics: Metrics, parts: list[tuple[np.ndarray, int]]) -> list[np.ndarray]:
    """Several requests' (images, class id) in one call per `max_batch` images; their logits, request by request."""
    images = np.concatenate([images for images, _ in parts])
    class_ids = np.concatenate([np.full(len(images), class_id, np.int64) for images, class_id in parts])
    step = model.max_batch or len(images)
    logits = np.concatenate([infer(model, metrics, images[i:i + step], class_ids[i:i + step])
                             for i in range(0, len(images), step)])
    return np.split(logits, np.cumsum([len(images) for images, _ in parts])[:-1])


class Batcher:
    """The queue of one model and the one task that empties it: on an idle model the first request
    waits `wait_ms` for others; while a call runs, arriving requests queue for the next one."""

    def __init__(self, model: SingleLogitModel, metrics: Metrics, wait_ms: float):
        self.model, self.metrics, self.wait_s = model, metrics, check_wait(wait_ms) / 1e3
        self.queue: list[tuple[np.ndarray, int, asyncio.Future]] = []
        self.worker: asyncio.Task | None = None  # referenced while it runs, as asyncio holds tasks weakly

    async def __call__(self, images: np.ndarray, class_id: int) -> np.ndarray:
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self.queue.append((images, class_id, future))
        if self.worker is None:
            self.worker = loop.create_task(self.work())
        return await future

    async def work(self) -> None:
        try:
            await asyncio.sleep(self.wait_s)
            while self.queue:
                batch, self.queue = self.queue, []
                await self.run(batch)
        finally:
            self.worker = None

    async def run(self, batch: list[tuple[np.ndarray, int, asyncio.Future]]) -> None:
        requests = [(images, class_id) for images, class_id, _ in batch]
        try:
            parts = await anyio.to_thread.run_sync(score_together, self.model, self.metrics, requests)
        except Exception:  # a call must not fail for a request that would succeed alone: each is tried alone
            parts = [await self.alone(request) for request in requests]
        for (_, _, future), part in zip(batch, parts):
            if future.done():  # its client went away
                continue
            if isinstance(part, Exception):
                future.set_exception(part)
            else:
                future.set_result(part)


    async def alone(self, request: tuple[np.ndarray, int]) -> np.ndarray | Exception:
        try:
            return (await anyio.to_thread.run_sync(score_together, self.model, self.metrics, [request]))[0]
        except Exception as error:  # its own failure, the request's answer (a 500 unless it is an InputError)
            return error


class Batching:
    """The Scorer of `slc serve --batch-wait-ms`: one Batcher per model."""

    def __init__(self, metrics: Metrics, wait_ms: float):
        self.metrics, self.wait_ms = metrics, check_wait(wait_ms)
        self.batchers: dict[str, Batcher] = {}

    async def __call__(self, model: SingleLogitModel, images: np.ndarray, class_id: int) -> np.ndarray:
        if model.run_name not in self.batchers:
            self.batchers[model.run_name] = Batcher(model, self.metrics, self.wait_ms)
        return await self.batchers[model.run_name](images, class_id)
