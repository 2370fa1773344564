"""`slc index build`: the features of every image of a source, computed once through the export's
backbone, batch by batch, into a search index (serving.search), a chunk at a time.

A source is a folder of PNG/JPEG images (every one below it, in path order; the paths are kept), or
an .npy/.npz file of images with the image axis first (uint8 (N, H, W[, C]) or (N, C, H, W), or
normalised float32 (N, C, H, W)), such as a prepared split's data/prepared/<split>_images.npy.
Each chunk is committed as a segment (serving.index_store) before the next is read, so a build that
stops keeps what it indexed, and the same command run again goes on from there. The features come
from this process (`in_process`) or from Ray Data (`--ray`, serving.index_ray): only that differs,
the chunks and commits are build()'s either way, so both builds write the same index.
"""
from __future__ import annotations

import os
import zipfile
from collections.abc import Callable, Generator, Iterable, Iterator, Sequence
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np
from tqdm import tqdm

from serving import index_store as store
from serving.errors import IndexFileError, InputError
from serving.features import Backbone, HeadRows, bound_files
from serving.images import decode
from serving.index_store import IndexManifest
from serving.model import SingleLogitModel
from serving.search import check_bound

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


@dataclass(frozen=True)
class Source:
    """Images to index: `read(positions)` gives those images (a list of parts, each one image or a
    batch that SingleLogitModel.prepare takes) and their paths (None for arrays)."""
    path: Path
    count: int
    read: Callable[[Sequence[int]], tuple[list, list[str] | None]]


# From image `start` of a source to its last, features (n, d) and paths (None for arrays) a batch at a
# time, in source order: an image's id in the index is its position in the source.
FeatureBatches = Callable[[Source, int], Generator[tuple[np.ndarray, list[str] | None], None, None]]


def open_source(source: str | Path) -> Source:
    path = Path(source).resolve()
    if not path.exists():
        raise InputError(f"{source} does not exist: give a folder of images or an .npy/.npz file of them")
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        if not files:
            raise InputError(f"{source} holds no {'/'.join(IMAGE_SUFFIXES)} image: give a folder of images, or an "
                             f".npy/.npz file of them")
        return Source(path, len(files), lambda ids: ([_decoded(files[i]) for i in ids], [os.fspath(files[i]) for i in ids]))
    if path.suffix not in (".npy", ".npz"):
        raise InputError(f"{source} is neither a folder nor an .npy/.npz file: give a folder of images or an array file")
    try:
        array = _array(path)
    except (OSError, ValueError, zipfile.BadZipFile) as error:
        raise InputError(f"{source} cannot be read as {path.suffix} ({str(error).splitlines()[0]}); save the images "
                         f"with numpy.save or numpy.savez (no pickled objects)") from None
    if array.ndim < 3:
        raise InputError(f"{source} holds an array of shape {array.shape}: give a batch, images first (N, H, W[, C])")
    return Source(path, len(array), lambda ids: ([array[np.asarray(ids)]], None))


def _array(path: Path) -> np.ndarray:
    """An .npy memory-mapped (a prepared split need not fit in memory), or an .npz's one array or `images`."""
    if path.suffix == ".npy":
        return np.load(path, mmap_mode="r")
    with np.load(path) as arrays:
        if "images" not in arrays and len(arrays.files) != 1:
            raise ValueError(f"it holds the arrays {', '.join(arrays.files)}: name the images `images`")
        return arrays["images" if "images" in arrays else arrays.files[0]]


def _decoded(path: Path) -> np.ndarray:
    try:
        return decode(path.read_bytes(), os.fspath(path))
    except OSError as error:
        raise InputError(f"cannot read {path}: {error.strerror}") from None


def read_features(model: SingleLogitModel, backbone: Backbone, images: Source,
                  ids: Sequence[int]) -> tuple[np.ndarray, list[str] | None]:
    """The images at positions `ids` of a source, prepared and through the backbone: what either build computes."""
    parts, paths = images.read(ids)
    return backbone.features(np.concatenate([model.prepare(part) for part in parts])), paths


def in_process(model: SingleLogitModel, backbone: Backbone, batch_size: int) -> FeatureBatches:
    """Features computed here, `batch_size` images per backbone call."""
    def batches(images: Source, start: int) -> Generator[tuple[np.ndarray, list[str] | None], None, None]:
        for first in range(start, images.count, batch_size):
            yield read_features(model, backbone, images, range(first, min(first + batch_size, images.count)))
    return batches


def build(export_dir: str | Path, source: str | Path, out_dir: str | Path, *, index: str = "flat",
          batch_size: int = 256, chunk_images: int = 8192, threads: int | None = None, on_ray: bool = False,
          actors: int | None = None, **load) -> IndexManifest:
    """Index every image of `source` into `out_dir` (`index`: "flat", exact, or "sq8", a byte a feature),
    `batch_size` images per backbone call, a segment every `chunk_images`; resumes a build of the same
    source through the same export. `on_ray`: features from Ray Data (serving.index_ray), up to `actors`
    actors of `threads` onnxruntime threads each. `load`: SingleLogitModel.load's options (providers, public_key)."""
    if index not in store.KINDS:
        raise InputError(f"unknown index {index!r}: choose one of {', '.join(store.KINDS)}")
    for name, value in (("batch_size", batch_size), ("chunk_images", chunk_images)):
        if value < 1:
            raise InputError(f"{name} = {value}: give a positive number of images")
    if actors is not None and (not on_ray or actors < 1):
        raise InputError(f"actors = {actors}: give a positive number of Ray actors, and --ray")
    model = SingleLogitModel.load(export_dir, **load)
    backbone = Backbone(model.export_dir, model.manifest, model.providers, threads)
    files = bound_files(model.manifest, backbone, HeadRows(model.export_dir, model.manifest), model.export_dir)
    if on_ray:
        from serving.index_ray import ray_batches

        batches = ray_batches(model, files, batch_size, actors, threads, load)
    else:
        batches = in_process(model, backbone, batch_size)
    images = open_source(source)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with store.writer_lock(out_dir):
        manifest = _begin(out_dir, index, model, files, images)
        template = _template(out_dir, manifest)
        done = manifest.build["indexed"]
        # closed as soon as the build stops, not when its traceback goes: Ray's actors hold CPUs till then
        with (tqdm(total=images.count, initial=done, unit="image", desc=f"index {out_dir.name}", disable=None) as bar,
              closing(batches(images, done)) as stream):
            for features, paths in _chunks(stream, chunk_images, bar):
                if template is None:  # sq8 learns each feature's range on the first chunk
                    template = store.KINDS[index](len(features[0]))
                    template.train(features)
                segment = store.write_segment(out_dir, manifest, template, features, paths)
                manifest = manifest.with_segment(segment, indexed=manifest.build["indexed"] + len(features))
                store.write_manifest(out_dir, manifest)
    return manifest


def _chunks(batches: Iterable[tuple[np.ndarray, list[str] | None]], size: int,
            bar: tqdm) -> Iterator[tuple[np.ndarray, list[str] | None]]:
    """Batches regrouped into chunks of `size` images (the last one shorter): the segments, whatever
    batch sizes computed them."""
    held: list[np.ndarray] = []
    names: list[str] | None = []
    for features, paths in batches:
        bar.update(len(features))
        held.append(features)
        names = None if paths is None else names + paths
        while sum(map(len, held)) >= size:
            joined = np.concatenate(held)
            yield joined[:size], None if names is None else names[:size]
            held, names = [joined[size:]], None if names is None else names[size:]
    if sum(map(len, held)):
        yield np.concatenate(held), names


def _begin(out_dir: Path, kind: str, model: SingleLogitModel, files: dict[str, str], images: Source) -> IndexManifest:
    """The manifest of a new build, or of the one to resume, which must be of the same source, kind and export."""
    if not (out_dir / store.MANIFEST).exists():
        manifest = IndexManifest(store.FORMAT_VERSION, kind, model.manifest.feature_dim,
                                 {"dir": os.fspath(model.export_dir.resolve()), "run_name": model.run_name, "files": files},
                                 {"source": os.fspath(images.path), "images": images.count, "indexed": 0}, [])
        store.write_manifest(out_dir, manifest)
        return manifest
    manifest = store.read_manifest(out_dir)
    check_bound(manifest, files, model.export_dir, out_dir)
    if (manifest.kind, manifest.build["source"], manifest.build["images"]) != (kind, os.fspath(images.path), images.count):
        raise IndexFileError(f"{out_dir} holds a {manifest.kind} index of {manifest.build['source']} "
                             f"({manifest.build['images']} images), not a {kind} index of {images.path} ({images.count}): "
                             f"run that build again to resume it, or build into another --out")
    return manifest


def _template(out_dir: Path, manifest: IndexManifest) -> faiss.Index | None:
    """The empty index new segments copy: sq8's, trained, from the first segment; None until there is one."""
    if manifest.segments:
        template = store.read_segment(out_dir, manifest.segments[0])[0]
        template.reset()
        return template
    return None if manifest.kind == "sq8" else store.KINDS[manifest.kind](manifest.feature_dim)
