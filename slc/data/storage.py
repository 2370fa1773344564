"""How a prepared split lies on disk: one class per kind, holding both its writer (`write`, for
`prepare`) and its reader (an instance, for training and scoring), so the two agree on the files.

- `arrays`: the images themselves, `<split>_images.npy` (N, C, H, W), memory-mapped when read;
- `tuples`: (N, t) indices into one shared `pool_images.npy`, composed side by side batch by batch;
- `index`: image files left where they are, `<split>_index.json` (path, label), decoded when read.
Every kind also writes `<split>_labels.npy` (int64), except `index`, whose labels are in its rows.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from slc.data.datasets import Split, compose, load_image


class Arrays:
    name = "arrays"

    def __init__(self, root: Path, name: str, image_size: int):
        self.images = np.load(root / f"{name}_images.npy", mmap_mode="r")
        self.labels = np.load(root / f"{name}_labels.npy")

    def fetch(self, index: np.ndarray) -> np.ndarray:
        """The raw images (N, C, H, W) at `index`."""
        return self.images[index]

    @staticmethod
    def holds(split: Split) -> bool:
        return split.images is not None

    @staticmethod
    def input_shape(split: Split, image_size: int) -> list[int]:
        return list(split.images.shape[1:])

    @staticmethod
    def write(out: Path, name: str, split: Split) -> list[Path]:
        np.save(out / f"{name}_images.npy", np.ascontiguousarray(split.images))
        np.save(out / f"{name}_labels.npy", split.labels)
        return [out / f"{name}_images.npy", out / f"{name}_labels.npy"]


class Tuples:
    name = "tuples"

    def __init__(self, root: Path, name: str, image_size: int):
        self.pool = np.load(root / "pool_images.npy", mmap_mode="r")
        self.parts = np.load(root / f"{name}_parts.npy")
        self.labels = np.load(root / f"{name}_labels.npy")

    def fetch(self, index: np.ndarray) -> np.ndarray:
        return compose(self.pool, self.parts[index])

    @staticmethod
    def holds(split: Split) -> bool:
        return split.parts is not None

    @staticmethod
    def input_shape(split: Split, image_size: int) -> list[int]:
        return list(compose(split.pool, split.parts[:1]).shape[1:])

    @staticmethod
    def write(out: Path, name: str, split: Split) -> list[Path]:
        pool = out / "pool_images.npy"
        if not pool.exists():  # shared by every split: written once
            np.save(pool, np.ascontiguousarray(split.pool))
        np.save(out / f"{name}_parts.npy", split.parts)
        np.save(out / f"{name}_labels.npy", split.labels)
        return [pool, out / f"{name}_parts.npy", out / f"{name}_labels.npy"]


class Index:
    name = "index"

    def __init__(self, root: Path, name: str, image_size: int):
        rows = json.loads((root / f"{name}_index.json").read_text())
        self.paths = [row["path"] for row in rows]
        self.labels = np.asarray([row["label"] for row in rows], np.int64)
        self.image_size = image_size

    def fetch(self, index: np.ndarray) -> np.ndarray:
        return np.stack([load_image(self.paths[i], self.image_size) for i in index])

    @staticmethod
    def holds(split: Split) -> bool:
        return split.paths is not None

    @staticmethod
    def input_shape(split: Split, image_size: int) -> list[int]:
        return [3, image_size, image_size]

    @staticmethod
    def write(out: Path, name: str, split: Split) -> list[Path]:
        rows = [{"path": str(Path(p).resolve()), "label": int(y)} for p, y in zip(split.paths, split.labels)]
        (out / f"{name}_index.json").write_text(json.dumps(rows))
        return [out / f"{name}_index.json"]


STORAGES = {kind.name: kind for kind in (Arrays, Tuples, Index)}


def storage_of(split: Split):
    """The storage kind that holds a raw split."""
    return next(kind for kind in STORAGES.values() if kind.holds(split))
