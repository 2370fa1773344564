"""Preparation: validate a dataset, carve the validation split, compute normalisation, write.

Writes `data/prepared/` atomically (a temp dir renamed into place), so a failed prepare never
leaves a half-written directory that `train` could read.
"""
from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import numpy as np
from sklearn.model_selection import train_test_split
from tqdm import tqdm

from slc.core.config import DataConfig
from slc.core.files import sha256
from slc.data.datasets import DatasetError, RawDataset, Split, compose, load_image, load_raw
from slc.data.storage import storage_of

STATS_SAMPLE = 2000  # images read from disk to estimate normalisation of an indexed dataset


def validate(raw: RawDataset) -> None:
    """Refuse data that would train silently wrong: empty splits, bad labels, mixed shapes."""
    k = len(raw.class_names)
    if k < 2:
        raise DatasetError(f"{k} class found: single-logit classification needs at least 2")
    shapes = set()
    for name, split in (("train", raw.train), ("test", raw.test)):
        if len(split) == 0:
            raise DatasetError(f"the {name} split is empty")
        labels = split.labels
        if labels.min() < 0 or labels.max() >= k:
            bad = labels[(labels < 0) | (labels >= k)][0]
            raise DatasetError(f"{name} label {bad} is out of range: labels must be in 0..{k - 1} "
                               f"for the {k} classes {raw.class_names[:5]}...")
        if split.images is not None:
            if len(split.images) != len(labels):
                raise DatasetError(f"{name}: {len(split.images)} images but {len(labels)} labels")
            shapes.add(split.images.shape[1:])
    if len(shapes) > 1:
        raise DatasetError(f"train and test images have mixed shapes {sorted(shapes)}: resize them to one shape")


def subsample(split: Split, limit: int | None, seed: int) -> Split:
    if limit is None or limit >= len(split):
        return split
    keep = np.sort(np.random.default_rng(seed).permutation(len(split))[:limit])
    return _take(split, keep)


def carve_validation(train: Split, fraction: float, seed: int) -> tuple[Split, Split]:
    """Hold out `fraction` of train, stratified by class when every class can give one example."""
    index = np.arange(len(train))
    try:
        fit, val = train_test_split(index, test_size=fraction, random_state=seed, stratify=train.labels)
    except ValueError:  # a class too rare to stratify (e.g. synthetic data with few images per class)
        fit, val = train_test_split(index, test_size=fraction, random_state=seed)
    if len(fit) == 0 or len(val) == 0:
        raise DatasetError(f"data.val_fraction={fraction} leaves an empty split of {len(train)} images")
    return _take(train, np.sort(fit)), _take(train, np.sort(val))


def _take(split: Split, index: np.ndarray) -> Split:
    return Split(labels=split.labels[index],
                 images=None if split.images is None else split.images[index],
                 paths=None if split.paths is None else [split.paths[i] for i in index],
                 parts=None if split.parts is None else split.parts[index], pool=split.pool)


def normalisation(train: Split, image_size: int, seed: int) -> tuple[list[float], list[float], float]:
    """Per-channel mean and std of the training images on the [0, 1] scale, and that scale."""
    pick = np.random.default_rng(seed).permutation(len(train))[:STATS_SAMPLE]
    if train.images is not None:
        images = train.images
    elif train.parts is not None:
        images = compose(train.pool, train.parts[pick])
    else:
        images = np.stack([load_image(train.paths[i], image_size) for i in tqdm(pick, desc="stats", disable=None)])
    scale = 255.0 if images.dtype == np.uint8 else 1.0
    pixels = images.transpose(1, 0, 2, 3).reshape(images.shape[1], -1)
    mean = pixels.mean(axis=1, dtype=np.float64) / scale
    std = pixels.std(axis=1, dtype=np.float64) / scale
    return mean.round(6).tolist(), np.maximum(std, 1e-6).round(6).tolist(), scale


def prepare(cfg: DataConfig, out: Path) -> dict:
    """Load, check, split and write one dataset; return its meta.json."""
    raw = load_raw(cfg)
    validate(raw)
    train = subsample(raw.train, cfg.train_limit, cfg.seed)
    train, val = carve_validation(train, cfg.val_fraction, cfg.seed) if raw.val is None else (train, raw.val)
    mean, std, scale = normalisation(train, cfg.image_size, cfg.seed)
    splits = {"train": train, "val": val, "test": raw.test}
    storage = storage_of(train)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        written = list(dict.fromkeys(f for name, split in splits.items() for f in storage.write(tmp, name, split)))
        meta = {
            "dataset": cfg.name,
            "class_names": raw.class_names,
            "num_classes": len(raw.class_names),
            "input_shape": storage.input_shape(train, cfg.image_size),
            "storage": storage.name,
            "pixel_scale": scale,
            "normalisation": {"mean": mean, "std": std},
            "splits": {name: len(split) for name, split in splits.items()},
            "val_fraction": cfg.val_fraction if raw.val is None else None,
            "seed": cfg.seed,
            "source": raw.source,
            "source_files": {str(f): sha256(f) for f in raw.files},
            "checksums": {f.name: sha256(f) for f in written},
        }
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
        shutil.rmtree(out, ignore_errors=True)
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return meta
