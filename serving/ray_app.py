"""Ray Serve deployment of the same HTTP app, for users who outgrow one machine.

    serve run serving.ray_app:build export_dir=exports/batch_ce-s0 replicas=2 max_batch=256

(also graph, cpus_per_replica, request_threads, onnx_threads: see `BuildArgs`).

Each replica loads (and checks) the export itself and serves `serving.http.create_app` unchanged,
so the routes, errors and answers are those of `slc serve`; Ray's proxy spreads requests over the
replicas (on port 8000 by default). On a cluster every node needs the export at the same path.
`serving/` does not read params.yaml: `make serve`-style callers pass `serving.replicas` and
the other `serving` values as the builder arguments above.
"""
# No `from __future__ import annotations` here: Ray Serve reads the builder's annotation as a class
# to validate the `key=value` arguments with pydantic.
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, PositiveFloat, PositiveInt
from ray import serve
from ray.serve import Application

from serving.http import create_app
from serving.model import SingleLogitModel


class BuildArgs(BaseModel):
    """`serve run serving.ray_app:build key=value ...`; an unknown key is an error, not ignored."""
    model_config = ConfigDict(extra="forbid")

    export_dir: str
    replicas: PositiveInt = 1
    max_batch: PositiveInt = 256
    graph: Literal["single_logit", "full"] = "single_logit"
    cpus_per_replica: PositiveFloat = 1.0
    request_threads: PositiveInt | None = None
    onnx_threads: PositiveInt | None = None


@serve.deployment
@serve.ingress()
class SingleLogitDeployment:
    """One replica: the model is loaded in the replica's own process, then the app is built around it."""

    def __init__(self, args: BuildArgs):
        self.model = SingleLogitModel.load(args.export_dir, graph=args.graph, max_batch=args.max_batch,
                                           threads=args.onnx_threads)
        self.request_threads = args.request_threads

    def __serve_build_asgi_app__(self):
        return create_app(self.model, self.request_threads)


def build(args: BuildArgs) -> Application:
    """The Ray Serve application builder: check the export here, so a bad path fails before any replica starts."""
    args = args.model_copy(update={"export_dir": str(Path(args.export_dir).resolve())})
    SingleLogitModel.load(args.export_dir, graph=args.graph)
    deployment = SingleLogitDeployment.options(num_replicas=args.replicas,
                                               ray_actor_options={"num_cpus": args.cpus_per_replica})
    return deployment.bind(args)
