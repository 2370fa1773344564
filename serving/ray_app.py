"""Ray Serve deployment of the same HTTP app, for users who outgrow one machine.

    serve run serving.ray_app:build export_dir=exports/batch_ce-s0 replicas=2 max_batch=256
    serve run serving.ray_app:build export_dir=exports default_run=bce-s2 batch_wait_ms=5 token_file=/etc/slc/token

(also graph, cpus_per_replica, request_threads, onnx_threads, public_key: see `BuildArgs`).

Each replica loads (and checks) the exports itself and serves `serving.http.create_app`, so the
routes, errors and answers are those of `slc serve`; Ray's proxy spreads requests over the
replicas (on port 8000 by default). On a cluster every node needs the exports at the same path.
Two things are Ray Serve's own: with `batch_wait_ms`, concurrent requests to a run share one
onnxruntime call through `@serve.batch`; and the series of serving.metrics are Ray Serve metrics,
exported with Ray Serve's (`ray_serve_*`) on each node's Ray metrics port as `ray_slc_*`, tagged
with the replica (a GET /metrics would answer for whichever replica the proxy picked).
The token (SLC_API_TOKEN or `token_file`) is read where the application is built and handed to
the replicas with their arguments, so every replica checks the one the operator set.
`serving/` does not read params.yaml: `make serve`-style callers pass `serving.replicas` and
the other `serving` values as the builder arguments above.
"""
# No `from __future__ import annotations` here: Ray Serve reads the builder's annotation as a class
# to validate the `key=value` arguments with pydantic.
from pathlib import Path
from typing import Literal

import anyio
import numpy as np
from pydantic import BaseModel, ConfigDict, PositiveFloat, PositiveInt
from ray import serve
from ray.serve import Application
from ray.serve.metrics import Histogram

from serving.auth import read_token
from serving.batching import score_together
from serving.http import create_app
from serving.metrics import SERIES, Series
from serving.model import SingleLogitModel
from serving.runs import Runs
from serving.signing import PUBLIC_KEY_ENV, configured_key


class BuildArgs(BaseModel):
    """`serve run serving.ray_app:build key=value ...`; an unknown key is an error, not ignored."""
    model_config = ConfigDict(extra="forbid")

    export_dir: str  # an export, or a directory of them (every run is served)
    default_run: str | None = None
    replicas: PositiveInt = 1
    max_batch: PositiveInt = 256
    graph: Literal["single_logit", "full"] = "single_logit"
    cpus_per_replica: PositiveFloat = 1.0
    request_threads: PositiveInt | None = None
    onnx_threads: PositiveInt | None = None
    batch_wait_ms: PositiveFloat | None = None  # None: no batching
    token_file: str | None = None
    public_key: str | None = None  # exports must carry a signature it verifies (SLC_PUBLIC_KEY wins)


class RayServeMetrics:
    """serving.metrics' series as Ray Serve histograms, which Ray tags with the deployment and replica."""

    def __init__(self):
        self.histograms = {s.name: Histogram(s.name, description=s.doc, boundaries=list(s.buckets), tag_keys=s.labels)
                           for s in SERIES}

    def observe(self, series: Series, value: float, labels: dict[str, str]) -> None:
        self.histograms[series.name].observe(value, tags=labels)


@serve.deployment
@serve.ingress()
class SingleLogitDeployment:
    """One replica: the models are loaded in the replica's own process, then the app is built around them."""

    def __init__(self, args: BuildArgs, token: str | None):
        self.args, self.token = args, token
        self.runs = Runs.load([args.export_dir], args.default_run, graph=args.graph, max_batch=args.max_batch,
                              threads=args.onnx_threads, public_key=args.public_key)
        self.metrics = RayServeMetrics()
        if args.batch_wait_ms is not None:
            self.score_batch.set_batch_wait_timeout_s(args.batch_wait_ms / 1e3)
            self.score_batch.set_max_batch_size(args.max_batch)

    def __serve_build_asgi_app__(self):
        return create_app(self.runs, request_threads=self.args.request_threads, token=self.token, metrics=self.metrics,
                          score=None if self.args.batch_wait_ms is None else self.score)

    async def score(self, model: SingleLogitModel, images: np.ndarray, class_id: int) -> np.ndarray:
        return await self.score_batch(model.run_name, images, class_id)

    @serve.batch  # its size and wait are set per replica in __init__
    async def score_batch(self, runs: list[str], images: list[np.ndarray], class_ids: list[int]) -> list[np.ndarray]:
        """The requests Ray Serve queued together: one onnxruntime call per run (per max_batch images)."""
        logits: list[np.ndarray | None] = [None] * len(runs)
        for run in dict.fromkeys(runs):
            mine = [i for i, name in enumerate(runs) if name == run]
            parts = await anyio.to_thread.run_sync(score_together, self.runs[run], self.metrics,
                                                   [(images[i], class_ids[i]) for i in mine])
            for i, part in zip(mine, parts):
                logits[i] = part
        return logits


def build(args: BuildArgs) -> Application:
    """The Ray Serve application builder: check the exports and the token here, so that a bad path or
    token file fails before any replica starts."""
    key = configured_key(args.public_key, PUBLIC_KEY_ENV)
    args = args.model_copy(update={"export_dir": str(Path(args.export_dir).resolve()),
                                   "public_key": None if key is None else str(key.resolve())})
    Runs.load([args.export_dir], args.default_run, graph=args.graph, public_key=args.public_key)
    token = read_token(args.token_file)
    deployment = SingleLogitDeployment.options(num_replicas=args.replicas,
                                               ray_actor_options={"num_cpus": args.cpus_per_replica})
    return deployment.bind(args, token)
