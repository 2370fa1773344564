"""`slc index build --ray`: a source's features computed by Ray Data, on this machine or on the cluster
at RAY_ADDRESS, for serving.index_build.build to commit as it commits its own.

The dataset is the range of image positions still to index. A pool of actors (`map_batches` with a
callable class) each loads the export once and maps a batch of positions to their features, reading
the images itself, so pixels never cross the object store; on a cluster the export and the source
must be at the same path on every node (a shared file system), and each actor checks that its export
is the driver's. Ray Data keeps the batches in source order (preserve_order): an image's id is its
position, as in the single-process build.
"""
from __future__ import annotations

import os
import socket
from collections.abc import Generator

import numpy as np

from serving.errors import ExportError, InputError, SetupError
from serving.features import Backbone, HeadRows, bound_files
from serving.index_build import FeatureBatches, Source, open_source, read_features
from serving.model import SingleLogitModel


class BackboneActor:
    """One map_batches actor: the export loaded and checked, and the source opened, once per actor."""

    def __init__(self, export_dir: str, files: dict[str, str], source: str, count: int, start: int,
                 threads: int, load: dict):
        self.model = SingleLogitModel.load(export_dir, **load)
        self.backbone = Backbone(self.model.export_dir, self.model.manifest, self.model.providers, threads)
        head = HeadRows(self.model.export_dir, self.model.manifest)
        if bound_files(self.model.manifest, self.backbone, head, self.model.export_dir) != files:
            raise ExportError(f"{export_dir} on {socket.gethostname()} is not the export the build started with: "
                              f"give every Ray node the same export at the same path")
        self.images = open_source(source)
        if self.images.count != count:
            raise InputError(f"{source} holds {self.images.count} images on {socket.gethostname()}, {count} where the "
                             f"build started: give every Ray node the same source at the same path")
        self.start = start

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ids = batch["id"] + self.start
        features, paths = read_features(self.model, self.backbone, self.images, ids)
        return {"id": ids, "features": features, **({} if paths is None else {"path": np.array(paths)})}


def pool_size(cluster_cpus: float, cpus: int, actors: int | None) -> int:
    """How many feature actors of `cpus` CPUs the cluster holds beside the one CPU that Ray Data's read
    tasks need: actors on every CPU leave the reads none and the build waits forever (ray-project/ray#44687)."""
    room = int((cluster_cpus - 1) // cpus)
    if room < 1:
        raise SetupError(f"--ray: the Ray cluster has {cluster_cpus:g} CPUs, and a build needs {cpus + 1}: {cpus} for "
                         f"a feature actor and 1 for Ray Data's reads; build without --ray, or on a bigger cluster")
    return room if actors is None else min(actors, room)


def ray_batches(model: SingleLogitModel, files: dict[str, str], batch_size: int, actors: int | None,
                threads: int | None, load: dict) -> FeatureBatches:
    """Features from `batch_size`-image batches on up to `actors` actors (default: as many as the
    cluster's CPUs allow, `pool_size`), each reserving `threads` CPUs (default 1) and running onnxruntime
    on as many threads."""
    try:
        import ray
        import ray.data
    except ImportError as error:
        raise SetupError(f"--ray needs Ray Data ({error}): pip install '.[ray-serve]'") from None
    cpus = threads or 1

    def batches(images: Source, start: int) -> Generator[tuple[np.ndarray, list[str] | None], None, None]:
        if images.count == start:
            return
        if not ray.is_initialized():
            # RAY_ADDRESS's cluster; without it a new local one, never one a stale `ray start` left behind
            ray.init(address=os.environ.get("RAY_ADDRESS") or "local", include_dashboard=False)
        size = pool_size(ray.cluster_resources().get("CPU", 0), cpus, actors)
        context = ray.data.DataContext.get_current()
        ordered, context.execution_options.preserve_order = context.execution_options.preserve_order, True
        try:  # a dataset keeps the context it was created with
            dataset = ray.data.range(images.count - start).map_batches(
                BackboneActor, batch_size=batch_size, batch_format="numpy", num_cpus=cpus,
                compute=ray.data.ActorPoolStrategy(min_size=1, max_size=size),
                fn_constructor_args=(os.fspath(model.export_dir), files, os.fspath(images.path), images.count, start,
                                     cpus, load))
        finally:
            context.execution_options.preserve_order = ordered
        position = start
        for batch in dataset.iter_batches(batch_size=batch_size, batch_format="numpy"):
            ids = batch["id"]
            if not np.array_equal(ids, np.arange(position, position + len(ids))):
                raise RuntimeError(f"Ray Data returned images {ids[0]}..{ids[-1]} where {position} was due: "
                                   f"its order is not the source's")
            position += len(ids)
            yield np.ascontiguousarray(batch["features"], np.float32), batch["path"].tolist() if "path" in batch else None

    return batches
