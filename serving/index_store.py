"""A search index on disk: segments of features and the manifest (index.json) that lists them.

Nothing is ever rewritten in place. A build's chunk or an add becomes a new segment, a FAISS index
of its features (plus a sidecar of their image paths), written to a temp file, fsynced and renamed;
then index.json, which lists every segment with its sha256, is replaced the same way. The rename
of index.json is the commit: a crash or a full disk before it leaves the index as it was (at most
an unlisted segment file, overwritten by the next write), and a reader sees the old list or the new
one. Writers of all processes take turns through an fcntl lock on DIR/.lock. At load each listed
file must match its size and sha256, so a truncated or corrupt segment is refused, not searched.
"""
from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np

from serving.errors import IndexFileError

FORMAT_VERSION = 1
MANIFEST = "index.json"
LOCK = ".lock"
REBUILD = "rebuild it with `slc index build EXPORT SOURCE --out DIR` into a new directory"


def flat(d: int) -> faiss.Index:
    """Exact inner product over float32 features: 4 d bytes an image."""
    return faiss.IndexFlatIP(d)


def sq8(d: int) -> faiss.Index:
    """Each feature as one byte within its range on the first chunk (widened by 10% for later images):
    d bytes an image, logits approximate."""
    index = faiss.IndexScalarQuantizer(d, faiss.ScalarQuantizer.QT_8bit, faiss.METRIC_INNER_PRODUCT)
    index.sq.rangestat_arg = 0.1
    return index


# --index name -> the empty FAISS index of d-dimensional features it stores them in
KINDS = {"flat": flat, "sq8": sq8}


@dataclass(frozen=True)
class IndexManifest:
    """index.json. `export`: the export's directory, run name and the sha256 of each file the features
    and head rows come from; `build`: the source the build indexes and how far it got."""
    format_version: int
    kind: str
    feature_dim: int
    export: dict        # {"dir": str, "run_name": str, "files": {name: sha256}}
    build: dict         # {"source": str, "images": int, "indexed": int}
    segments: list      # [{"start", "count", "max_norm", "index": {file, sha256, bytes}, "paths": {...} | None}]

    @property
    def count(self) -> int:
        return sum(segment["count"] for segment in self.segments)

    def with_segment(self, segment: dict, indexed: int | None = None) -> IndexManifest:
        build = self.build if indexed is None else {**self.build, "indexed": indexed}  # an add leaves it
        return dataclasses.replace(self, segments=[*self.segments, segment], build=build)


def read_manifest(index_dir: Path) -> IndexManifest:
    path = Path(index_dir) / MANIFEST
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise IndexFileError(f"{path} not found: {index_dir} is not a search index; make one with "
                             f"`slc index build EXPORT SOURCE --out {index_dir}`") from None
    except (OSError, ValueError) as error:
        raise IndexFileError(f"{path} cannot be read ({error}); {REBUILD}") from None
    fields = [field.name for field in dataclasses.fields(IndexManifest)]
    if not isinstance(raw, dict) or sorted(raw) != sorted(fields):
        raise IndexFileError(f"{path} is not an index manifest (it should have the keys {', '.join(fields)}); {REBUILD}")
    if raw["format_version"] != FORMAT_VERSION or raw["kind"] not in KINDS:
        raise IndexFileError(f"{path}: format {raw['format_version']!r} of kind {raw['kind']!r}, this version reads "
                             f"format {FORMAT_VERSION} of kinds {', '.join(KINDS)}; {REBUILD}")
    return IndexManifest(**raw)


def write_manifest(index_dir: Path, manifest: IndexManifest) -> None:
    write_atomic(Path(index_dir) / MANIFEST, (json.dumps(dataclasses.asdict(manifest), indent=1) + "\n").encode())


def write_segment(index_dir: Path, manifest: IndexManifest, template: faiss.Index, features: np.ndarray,
                  paths: list[str] | None) -> dict:
    """Segment number len(manifest.segments): `features` in a copy of the (trained, empty) `template`."""
    number = len(manifest.segments)
    index = faiss.clone_index(template)
    index.add(features)
    stored = index.reconstruct_n(0, index.ntotal)  # what search will compute with (sq8: decoded)
    return {"start": manifest.count, "count": len(features),
            "max_norm": float(np.linalg.norm(stored.astype(np.float64), axis=1).max()),
            "index": _write_file(index_dir, f"segment-{number:06d}.faiss", faiss.serialize_index(index).tobytes()),
            "paths": None if paths is None else
            _write_file(index_dir, f"segment-{number:06d}.paths.json", json.dumps(paths).encode())}


def read_segment(index_dir: Path, segment: dict) -> tuple[faiss.Index, list[str | None]]:
    """A listed segment's FAISS index and image paths (None where an image came without one)."""
    data = _read_checked(Path(index_dir), segment["index"])
    try:
        index = faiss.deserialize_index(np.frombuffer(data, np.uint8))
    except RuntimeError as error:
        raise IndexFileError(f"{Path(index_dir) / segment['index']['file']} is not a FAISS index "
                             f"({str(error).splitlines()[0]}); {REBUILD}") from None
    if index.ntotal != segment["count"]:
        raise IndexFileError(f"{Path(index_dir) / segment['index']['file']} holds {index.ntotal} images, "
                             f"index.json says {segment['count']}; {REBUILD}")
    paths = [None] * segment["count"] if segment["paths"] is None else json.loads(_read_checked(Path(index_dir),
                                                                                                 segment["paths"]))
    return index, paths


@contextmanager
def writer_lock(index_dir: Path) -> Iterator[None]:
    """One writer at a time across processes (readers need no lock: they see whole manifests)."""
    with open(Path(index_dir) / LOCK, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def write_atomic(path: Path, data: bytes) -> None:
    """`data` at `path` whole or not at all, and on disk (fsync) before the rename makes it visible."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o644)  # mkstemp's 0600 would hide the index from a serving user
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)  # the rename itself survives a power cut
    finally:
        os.close(directory)


def _write_file(index_dir: Path, name: str, data: bytes) -> dict:
    write_atomic(Path(index_dir) / name, data)
    return {"file": name, "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}


def _read_checked(index_dir: Path, record: dict) -> bytes:
    path = index_dir / record["file"]
    try:
        data = path.read_bytes()
    except OSError as error:
        raise IndexFileError(f"{path} cannot be read ({error.strerror}), index.json lists it; {REBUILD}") from None
    if len(data) != record["bytes"] or hashlib.sha256(data).hexdigest() != record["sha256"]:
        raise IndexFileError(f"{path} has {len(data)} bytes and another sha256 than index.json records "
                             f"({record['bytes']} bytes): it is truncated or corrupt; {REBUILD}")
    return data
