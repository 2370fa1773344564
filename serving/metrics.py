"""What a server did, as Prometheus series: its requests by route, run, class and status with
their latency, and each onnxruntime call's time and images (which shows what batching shares).

The series are declared once (`SERIES`) and recorded through `Metrics.observe`, which has two back
ends: `PrometheusMetrics` (prometheus-client; `slc serve` exposes it at GET /metrics) and Ray
Serve's own metrics in serving.ray_app (exported with the rest of Ray's on each node's metrics port).
All are histograms: a histogram's `_count` is the number of requests (or calls), so no counter is
kept beside it.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from http import HTTPMethod, HTTPStatus
from typing import Protocol

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Histogram, generate_latest

SECONDS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
IMAGES = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
LABELS = "slc.metric_labels"  # ASGI scope key: the run and class a handler found the request to be about
# The label values a client cannot invent: any other method or status is "other", any path no route matches
# "unmatched", a run or class not served "" (label_request), so the number of series is bounded by the server.
METHODS = frozenset(method.value for method in HTTPMethod)
STATUSES = frozenset(str(status.value) for status in HTTPStatus)
OTHER = "other"


@dataclass(frozen=True)
class Series:
    name: str
    doc: str
    labels: tuple[str, ...]
    buckets: tuple[float, ...]


REQUESTS = Series("slc_http_request_duration_seconds", "HTTP requests: latency until the response is sent "
                  "(_count: requests)", ("route", "method", "status", "run", "class_id"), SECONDS)
INFERENCE = Series("slc_inference_seconds", "onnxruntime calls: time of each (_count: calls)", ("run", "graph"), SECONDS)
BATCH = Series("slc_inference_images", "onnxruntime calls: images in each; above the images per request when "
               "batching shares calls", ("run", "graph"), IMAGES)
SERIES = (REQUESTS, INFERENCE, BATCH)


class Metrics(Protocol):
    def observe(self, series: Series, value: float, labels: dict[str, str]) -> None: ...


class PrometheusMetrics:
    """The series in a registry of their own, so that two apps in one process keep separate figures."""

    def __init__(self):
        self.registry = CollectorRegistry()
        self.histograms = {s.name: Histogram(s.name, s.doc, s.labels, buckets=s.buckets, registry=self.registry)
                           for s in SERIES}

    def observe(self, series: Series, value: float, labels: dict[str, str]) -> None:
        self.histograms[series.name].labels(**labels).observe(value)

    def exposition(self) -> tuple[bytes, str]:
        """The text format Prometheus scrapes, and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


def label_request(scope: dict, run: str, class_id: int | None = None) -> None:
    """Called by a handler once the run (and class) a request names are known to exist: only those
    become labels, so that made-up names and ids cannot grow the number of series without bound."""
    scope[LABELS] = {"run": run, "class_id": "" if class_id is None else str(class_id)}


class RequestMetrics:
    """ASGI middleware timing every HTTP request until its response is sent, labelled with the
    route's template (/v1/runs/{run}/..., not the raw path) and what `label_request` recorded."""

    def __init__(self, app, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start, status = time.perf_counter(), 500  # an exception that escapes every handler is a 500

        async def send_and_note_status(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_note_status)
        finally:
            route = scope.get("route")
            method = scope["method"] if scope["method"] in METHODS else OTHER
            labels = {"route": getattr(route, "path", "unmatched"), "method": method,
                      "status": str(status) if str(status) in STATUSES else OTHER,
                      **scope.get(LABELS, {"run": "", "class_id": ""})}
            self.metrics.observe(REQUESTS, time.perf_counter() - start, labels)
