"""The data-loading benchmark: how many images per second training's own loader delivers, per dataset
kind at a preset's settings, with 0 and with n loader workers.

Each kind's source data is written in a scratch folder and made ready by `prepare` itself; the
loader is `slc.train.training.train_loader` over the prepared train split with the preset's augmentation,
which is exactly what a training run reads. A benchmark, not a test: nothing asserts a speed.
"""
from __future__ import annotations

import dataclasses
import logging
import shutil
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader
from tqdm import tqdm

from slc.core.config import DataConfig, Params
from slc.core.errors import ConfigError
from slc.data.preparation import prepare
from slc.data.prepared import PreparedData
from slc.train.training import train_loader

log = logging.getLogger(__name__)

PHOTO_SIZE = (500, 375)  # width, height of each JPEG: the photographs
PHOTO_SCALES = (1.0, 1.2, 1.5)  # the sample photos (640x427) zoomed in, so windows differ in scale too
PHOTO_CLASSES = 4
JPEG_QUALITY = 90
CIFAR_SHAPE = (32, 32, 3)  # as CIFAR-10 and SVHN are stored: (N, H, W, C) uint8


def write_photo_folder(root: Path, train: int, test: int, seed: int) -> Path:
    """An ImageFolder tree (train/, test/, PHOTO_CLASSES class folders) of 500x375 JPEGs: seeded
    random windows of scikit-learn's two bundled photographs, so decoding costs what a real photo's does."""
    from sklearn.datasets import load_sample_images

    rng = np.random.default_rng(seed)
    photos = [Image.fromarray(photo) for photo in load_sample_images().images]
    zoomed = [photo.resize((round(photo.width * s), round(photo.height * s)), Image.Resampling.BICUBIC)
              for photo in photos for s in PHOTO_SCALES]
    width, height = PHOTO_SIZE
    for split, count in (("train", train), ("test", test)):
        for c in range(PHOTO_CLASSES):
            (root / split / f"class_{c}").mkdir(parents=True, exist_ok=True)
        for i in range(count):
            photo = zoomed[rng.integers(len(zoomed))]
            left, top = rng.integers(photo.width - width + 1), rng.integers(photo.height - height + 1)
            window = photo.crop((int(left), int(top), int(left) + width, int(top) + height))
            window.save(root / split / f"class_{i % PHOTO_CLASSES}" / f"{i:05d}.jpg", quality=JPEG_QUALITY)
    return root


def write_cifar_shaped(path: Path, train: int, test: int, seed: int) -> Path:
    """An .npz of CIFAR-10's shape (x_* (N, 32, 32, 3) uint8, y_* 10 classes) of seeded random pixels:
    prepared, it is the (N, 3, 32, 32) uint8 memmap every array dataset becomes, and reading and
    augmenting that costs the same whatever the pixels show."""
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **{array: values for split, n in (("train", train), ("test", test)) for array, values in (
        (f"x_{split}", rng.integers(0, 256, size=(n, *CIFAR_SHAPE), dtype=np.uint8)),
        (f"y_{split}", np.arange(n, dtype=np.int64) % 10))})
    return path


def fashion_mnist_source(data: DataConfig, folder: Path, images: int, seed: int) -> DataConfig:
    return dataclasses.replace(data, name="fashion_mnist", train_limit=images)


def cifar_shaped_source(data: DataConfig, folder: Path, images: int, seed: int) -> DataConfig:
    path = write_cifar_shaped(folder / "cifar_shaped.npz", images, max(10, images // 10), seed)
    return dataclasses.replace(data, name="npz", npz_path=str(path), train_limit=None)


def photo_folder_source(data: DataConfig, folder: Path, images: int, seed: int) -> DataConfig:
    write_photo_folder(folder / "photos", images, max(PHOTO_CLASSES, images // 20), seed)
    return dataclasses.replace(data, name="folder", root=str(folder / "photos"), train_limit=None)


def tuples_source(data: DataConfig, folder: Path, images: int, seed: int) -> DataConfig:
    """The preset's k where `images` allows (one image per class): a tuple's length t, the digits of
    k - 1, sets an image's width (28 t pixels) and so its cost; k itself does not."""
    k = min(data.tuples.num_classes, images)
    tuples = dataclasses.replace(data.tuples, num_classes=k, train_per_class=max(1, images // k), val_per_class=1,
                                 test_per_class=1, long_tail=0.0)
    return dataclasses.replace(data, name="tuples", tuples=tuples, train_limit=None)


@dataclass(frozen=True)
class Kind:
    preset: str  # whose batch size, augmentation and image size the kind is loaded at
    source: Callable[[DataConfig, Path, int, int], DataConfig]  # writes the data; the config that prepares it
    default_images: Callable[[Params], int | None]  # source training images (None: all there are)
    about: str  # what the data is, for the report


KINDS: dict[str, Kind] = {
    "fashion_mnist": Kind("mnist_mlp", fashion_mnist_source, lambda p: None,
                          "Fashion-MNIST's real files (Debian's dataset-fashion-mnist), 28x28 grey like MNIST"),
    "cifar10": Kind("cifar10_conv6", cifar_shaped_source, lambda p: 10_000,
                    "CIFAR-shaped, not CIFAR-10 (not on this machine): seeded random uint8 32x32x3 pixels in an "
                    ".npz, prepared as `data.name: npz` into the same uint8 memmap as CIFAR-10"),
    "svhn": Kind("svhn_conv6", cifar_shaped_source, lambda p: 10_000,
                 "SVHN-shaped, not SVHN: the cifar10 kind's data at svhn_conv6's settings (another augmentation)"),
    "folder": Kind("imagenet_inception_v3", photo_folder_source, lambda p: 1_000,
                   "an ImageFolder of 500x375 JPEGs (quality 90), seeded windows of scikit-learn's two sample "
                   "photographs, prepared as `data.name: folder` at the preset's image size"),
    "tuples": Kind("many_classes_400k", tuples_source, lambda p: p.data.tuples.num_classes,
                   "tuples of Fashion-MNIST items at the preset's k, one image per class: the tuple length "
                   "(digits of k - 1) sets the per-image cost, not k"),
}


def kinds_named(names: list[str]) -> dict[str, Kind]:
    unknown = [name for name in names if name not in KINDS]
    if unknown:
        raise ConfigError(f"unknown data-loading kind {', '.join(map(repr, unknown))}; known: {', '.join(KINDS)}")
    return {name: KINDS[name] for name in names}


def time_pass(loader: DataLoader, warmup: int, budget_s: float) -> dict[str, float]:
    """One pass over the loader: seconds to the first batch (start-up: workers forked, first batch
    made), then, from the `warmup`-th batch on, images delivered per second until `budget_s`
    seconds or the end of the split. With w workers the first w batches are made at once, so the
    clock starts after them, when deliveries are steady."""
    started = time.perf_counter()
    batches = iter(loader)
    startup = clock = None
    images = 0
    for number, (batch, _) in enumerate(batches, 1):
        now = time.perf_counter()
        if number == 1:
            startup = now - started
        if number == warmup:
            clock = now
        elif number > warmup:
            images += len(batch)
            if now - clock >= budget_s:
                break
    del batches  # its workers end here, outside the clock
    if images == 0:
        raise ConfigError(f"the loader gave {len(loader)} batches, but {warmup} are untimed: use more images "
                          f"or a smaller batch size (at least {warmup + 1} batches)")
    seconds = now - clock
    return {"images": images, "seconds": seconds, "images_per_s": images / seconds, "startup_s": startup}


def measure(split, batch_size: int, workers: list[int], repeats: int, budget_s: float, threads: int = 1,
            progress: tqdm | None = None) -> dict[int, list[dict[str, float]]]:
    """`repeats` passes at each worker count, interleaved (so load from other work falls on all
    of them alike); each pass a fresh loader, shuffled by a seeded generator. With 0 workers the
    batches are made here, on `threads` torch threads: what a training process has (Ray sets
    OMP_NUM_THREADS to a Train worker's CPUs); loader workers set 1 themselves."""
    passes: dict[int, list[dict[str, float]]] = {w: [] for w in workers}
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for repeat in range(repeats):
            for w in workers:
                loader = train_loader(split, batch_size, torch.Generator().manual_seed(repeat), w, device="cpu")
                passes[w].append(time_pass(loader, max(1, w), budget_s))
                if progress is not None:
                    progress.update()
    finally:
        torch.set_num_threads(previous)
    return passes


def summarise(passes: dict[int, list[dict[str, float]]]) -> dict[str, dict[str, float]]:
    """Per worker count (keys as strings, as JSON has them): median, min and max images/s, median
    start-up (to the microsecond: a loader without workers starts in well under a millisecond)."""
    rates = {str(w): [p["images_per_s"] for p in ps] for w, ps in passes.items()}
    return {"images_per_s": {w: round(statistics.median(r), 1) for w, r in rates.items()},
            "images_per_s_min": {w: round(min(r), 1) for w, r in rates.items()},
            "images_per_s_max": {w: round(max(r), 1) for w, r in rates.items()},
            "startup_s": {str(w): round(statistics.median(p["startup_s"] for p in ps), 6) for w, ps in passes.items()}}


def benchmark_kind(name: str, params: Params, folder: Path, workers: list[int], *, images: int | None = None,
                   batch_size: int | None = None, repeats: int = 3, budget_s: float = 3.0, threads: int = 1) -> dict:
    """One kind at `params` (its preset's): write and prepare its data in `folder` (removed after),
    time the loader at each worker count. `images` and `batch_size` override the kind's defaults;
    `threads` are the torch threads of in-process loading (0 workers)."""
    kind = KINDS[name]
    images = kind.default_images(params) if images is None else images
    batch_size = params.train.batch_size if batch_size is None else batch_size
    shutil.rmtree(folder, ignore_errors=True)
    try:
        cfg = kind.source(params.data, folder, images, params.data.seed)
        prepare(cfg, folder / "prepared")
        data = PreparedData(folder / "prepared")
        split = data.split("train", params.train.augment)
        with tqdm(total=repeats * len(workers), desc=name, unit="pass", disable=None) as progress:
            figures = summarise(measure(split, batch_size, workers, repeats, budget_s, threads, progress))
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    settings = {"preset": kind.preset, "dataset": cfg.name, "batch_size": batch_size, "augment": params.train.augment,
                "input_shape": list(data.input_shape), "images": len(split), "repeats": repeats, "budget_s": budget_s,
                "threads": threads}
    log.info("%s: %s images/s at %s workers", name, list(figures["images_per_s"].values()), list(figures["images_per_s"]))
    return {**figures, "settings": settings}
