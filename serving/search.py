"""Image search with a single logit: which stored images are of class c?

An image's backbone features are computed once, when it is indexed; a query for class c is then
a FAISS range search of the stored features with the head's row w_c, keeping every image whose logit
z_c(x) = features(x) . w_c + b_c is at or above the threshold (the class's calibrated one for a
recall target: the rule `SingleLogitModel.decide` applies), or the top N. A query costs d
multiply-adds an image, whatever the number of classes.

FAISS keeps inner products strictly above the radius and computes them in float32, so the radius
is lowered by a bound on that error and the candidates' logits are computed again from their stored
vectors in float64 (the same numbers whichever query finds an image); `logit >= threshold` then
decides exactly. With the sq8 index the stored vectors, hence the logits, are quantised.

FAISS searches one query on one core, so the stored images are dealt into one shard per thread, each
searched by its own thread (FAISS lets go of the GIL): a query at a million images reads the features
with every core, as close to the memory's speed as a single read gets.
"""
from __future__ import annotations

import math
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import faiss
import numpy as np

from serving import index_store as store
from serving.errors import IndexFileError, InputError, ThresholdError
from serving.features import Backbone, HeadRows, bound_files
from serving.index_store import IndexManifest
from serving.model import SingleLogitModel

LOGIT_ROWS = 65536  # candidates whose logits are computed at once: bounded memory for a range that matches millions


@dataclass(frozen=True)
class Hits:
    """The images a query found, best first; `total` counts them all, before `offset` and `limit`."""
    class_id: int
    recall: float | None
    threshold: float | None
    total: int
    ids: np.ndarray          # int64 positions in the index
    logits: np.ndarray       # float64 z_c
    paths: list[str | None]  # the file each image came from, None for images given as arrays


@dataclass
class Shard:
    """Some of the stored images in one FAISS index, searched by one thread. Its images are runs of
    consecutive ids: run r holds ids global_starts[r]... from position local_starts[r] on."""
    index: faiss.Index
    local_starts: list[int] = field(default_factory=list)
    global_starts: list[int] = field(default_factory=list)

    def append(self, codes: np.ndarray, first_id: int) -> None:
        """Images with ids first_id, first_id + 1, ... given as their FAISS codes."""
        self.local_starts.append(self.index.ntotal)
        self.global_starts.append(first_id)
        self.index.add_sa_codes(codes)

    def ids(self, local: np.ndarray) -> np.ndarray:
        run = np.searchsorted(self.local_starts, local, side="right") - 1
        return local - np.asarray(self.local_starts, np.int64)[run] + np.asarray(self.global_starts, np.int64)[run]


class SearchIndex:
    """An index directory opened through the export it was built with (checked), safe to query and add
    to from many threads: a query never sees half an add. Adds by other processes are seen at the next query."""

    def __init__(self, index_dir: Path, model: SingleLogitModel, backbone: Backbone, head: HeadRows,
                 shards: int | None = None):
        self.index_dir, self.model, self.backbone, self.head = Path(index_dir), model, backbone, head
        self._lock = threading.RLock()
        self._seen: tuple | None = None  # index.json's identity when last read
        self.manifest: IndexManifest | None = None
        self._shard_count = shards or faiss.omp_get_max_threads()
        self._shards: list[Shard] = []
        # one FAISS thread each: a worker's FAISS call must not start an OpenMP team of its own
        self._pool = ThreadPoolExecutor(self._shard_count, thread_name_prefix="search-shard",
                                        initializer=faiss.omp_set_num_threads, initargs=(1,))
        self._count = 0
        self._template: faiss.Index | None = None  # empty (sq8: trained) index that new segments copy
        self._paths: list[str | None] = []
        self._max_norm = 0.0

    @classmethod
    def open(cls, index_dir: str | Path, model: SingleLogitModel | None = None, threads: int | None = None,
             **load) -> SearchIndex:
        """The index at `index_dir`, through `model` (default: the export it records, loaded with `load`'s
        options of SingleLogitModel.load); refused if that export's backbone or head is not the index's.
        `threads`: the backbone's and a query's (default: onnxruntime's and OpenMP's, every core)."""
        index_dir = Path(index_dir)
        manifest = store.read_manifest(index_dir)
        model = model or SingleLogitModel.load(manifest.export["dir"], **load)
        backbone = Backbone(model.export_dir, model.manifest, model.providers, threads)
        head = HeadRows(model.export_dir, model.manifest)
        check_bound(manifest, bound_files(model.manifest, backbone, head, model.export_dir), model.export_dir, index_dir)
        index = cls(index_dir, model, backbone, head, threads)
        index.refresh()
        return index

    def __len__(self) -> int:
        with self._lock:
            return self._count

    def refresh(self) -> None:
        """Load the segments listed since the last look at index.json (one stat when there are none)."""
        with self._lock:
            stat = (self.index_dir / store.MANIFEST).stat()
            seen = (stat.st_ino, stat.st_mtime_ns, stat.st_size)
            if seen == self._seen:
                return
            manifest = store.read_manifest(self.index_dir)
            have = self.manifest.segments if self.manifest else []
            if manifest.segments[:len(have)] != have:
                raise IndexFileError(f"{self.index_dir / store.MANIFEST} no longer lists the segments it listed: the index "
                                     f"was replaced while open; open it again")
            for segment in manifest.segments[len(have):]:
                part, paths = store.read_segment(self.index_dir, segment)
                if self._template is None:
                    self._template = faiss.clone_index(part)
                    self._template.reset()
                    self._shards = [Shard(faiss.clone_index(self._template)) for _ in range(self._shard_count)]
                self._deal(part, segment["start"])
                self._paths += paths
                self._max_norm = max(self._max_norm, segment["max_norm"])
            self.manifest, self._seen = manifest, seen

    def _deal(self, part: faiss.Index, first_id: int) -> None:
        """A segment's images into the shards in consecutive runs, the largest run to the smallest shard."""
        codes = faiss.vector_to_array(part.codes).reshape(part.ntotal, part.code_size)
        runs = np.linspace(0, len(codes), self._shard_count + 1).round().astype(int)
        runs = sorted(zip(runs[:-1], runs[1:]), key=lambda run: run[0] - run[1])
        for (start, stop), shard in zip(runs, sorted(self._shards, key=lambda shard: shard.index.ntotal)):
            if stop > start:
                shard.append(codes[start:stop], first_id + int(start))
        self._count += len(codes)

    def add(self, images, paths: list[str] | None = None) -> range:
        """Index images (any form SingleLogitModel.prepare takes), all or none; their ids are returned
        and they are found by the queries that start after this returns."""
        batch = self.model.prepare(images)
        if paths is not None and len(paths) != len(batch):
            raise InputError(f"{len(paths)} paths for {len(batch)} images: give one path per image, or none")
        features = self.backbone.features(batch)
        with self._lock, store.writer_lock(self.index_dir):
            self.refresh()
            build = self.manifest.build
            if build["indexed"] < build["images"]:
                raise InputError(f"{self.index_dir} is still being built ({build['indexed']} of {build['images']} images of "
                                 f"{build['source']}): finish the build (run it again) before adding images")
            segment = store.write_segment(self.index_dir, self.manifest, self._template, features, paths)
            store.write_manifest(self.index_dir, self.manifest.with_segment(segment))
            self.refresh()
        return range(segment["start"], segment["start"] + segment["count"])

    def search(self, class_id: int, recall: float | None = None, threshold: float | None = None,
               limit: int | None = None, offset: int = 0) -> Hits:
        """Every image with z_c >= the threshold (given, or calibrated for `recall`), or with neither the
        `limit` best; best first, then `offset` skipped and at most `limit` returned."""
        class_id = int(self.model.class_ids(class_id, 1)[0])
        threshold = self._threshold(class_id, recall, threshold)
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
            raise InputError(f"limit = {limit!r}: give a positive number of images, or none for all")
        if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0:
            raise InputError(f"offset = {offset!r}: give the number of best images to skip, 0 or more")
        if threshold is None and limit is None:
            raise InputError("give a recall target, a threshold or a limit (the best N images)")
        row, bias = self.head.row(class_id)
        with self._lock:
            self.refresh()
            radius = None if threshold is None else self._radius(row, bias, threshold)
            found = list(self._pool.map(lambda shard: self._shard_hits(shard, row, bias, radius, offset + (limit or 0)),
                                        self._shards))
            ids = np.concatenate([np.zeros(0, np.int64), *(shard_ids for shard_ids, _ in found)])
            logits = np.concatenate([np.zeros(0), *(shard_logits for _, shard_logits in found)])
            keep = np.ones(len(ids), bool) if threshold is None else logits >= threshold
            ids, logits = ids[keep], logits[keep]
            order = np.lexsort((ids, -logits))[offset:None if limit is None else offset + limit]
            paths = [self._paths[i] for i in ids[order]]
            total = self._count if threshold is None else len(ids)
        return Hits(class_id, None if threshold is None else recall, threshold, total, ids[order], logits[order], paths)

    def _threshold(self, class_id: int, recall, threshold) -> float | None:
        if recall is not None and threshold is not None:
            raise InputError("give a recall target or a threshold, not both")
        if threshold is not None:
            if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not math.isfinite(threshold):
                raise ThresholdError(f"threshold = {threshold!r}: give a finite number (a logit)")
            return float(threshold)
        if recall is None:
            return None
        value = float(self.model.thresholds(recall)[class_id])
        if math.isnan(value):
            raise ThresholdError(f"class {class_id} has no threshold at recall {recall:g} (the validation split had "
                                 f"no example of it); give --threshold or --limit instead")
        return value

    def _radius(self, row: np.ndarray, bias: float, threshold: float) -> float:
        """An inner product below every stored image's with z_c >= threshold, float32 error included."""
        # float32 inner products err by at most d u |w| |x| (u = 2^-24): four times that, below the radius
        error = 4 * len(row) * 2.0 ** -24 * float(np.linalg.norm(row.astype(np.float64))) * self._max_norm
        return float(np.nextafter(np.float32(threshold - bias - error - abs(threshold - bias) * 2.0 ** -22),
                                  np.float32(-np.inf)))

    @staticmethod
    def _shard_hits(shard: Shard, row: np.ndarray, bias: float, radius: float | None,
                    top: int) -> tuple[np.ndarray, np.ndarray]:
        """Ids and logits of a shard's images that may reach the threshold (inner product above `radius`,
        a superset), or with no radius of its `top` best."""
        if shard.index.ntotal == 0:
            return np.zeros(0, np.int64), np.zeros(0)
        if radius is None:
            local = shard.index.search(row[None], min(top, shard.index.ntotal))[1][0]
        else:
            local = shard.index.range_search(row[None], radius)[2]
        return shard.ids(local), logits(shard.index, local, row, bias)


def logits(index: faiss.Index, ids: np.ndarray, row: np.ndarray, bias: float) -> np.ndarray:
    """z_c of stored images in float64, row by row, so an image has one logit whichever query finds it."""
    row64 = row.astype(np.float64)
    out = [(index.reconstruct_batch(ids[i:i + LOGIT_ROWS]).astype(np.float64) * row64).sum(axis=1) + bias
           for i in range(0, len(ids), LOGIT_ROWS)]
    return np.concatenate(out) if out else np.zeros(0)


def check_bound(manifest: IndexManifest, files: dict[str, str], export_dir: Path, index_dir: Path) -> None:
    """The export's backbone and head are the ones the index was built with, file by file (sha256)."""
    if files != manifest.export["files"]:
        bound = manifest.export["files"]
        name = next(n for n in sorted({*files, *bound}) if files.get(n) != bound.get(n))
        raise IndexFileError(f"{index_dir} was built with the export {manifest.export['dir']} "
                             f"({manifest.export['run_name']}), whose {name} differs from {export_dir}'s: its features "
                             f"and rows are another model's; search through that export, or build an index for this one")
