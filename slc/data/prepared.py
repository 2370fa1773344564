"""A dataset as `prepare` wrote it, read while training and scoring: normalised batches, and the
training-time augmentations with the data each one may change.
"""
from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torchvision.transforms import v2

from slc.core.errors import ConfigError
from slc.data.datasets import DatasetError
from slc.data.storage import STORAGES

# Training-time augmentations, each built for an image size (H, W); evaluation never augments.
AUGMENTATIONS: dict[str, Callable[[tuple[int, int]], v2.Transform | None]] = {
    "none": lambda size: None,
    "crop": lambda size: v2.RandomCrop(size, padding=4),  # the CIFAR/SVHN shift of up to 4 pixels
    "crop_flip": lambda size: v2.Compose([v2.RandomCrop(size, padding=4), v2.RandomHorizontalFlip()]),
    "resized_crop_flip": lambda size: v2.Compose([v2.RandomResizedCrop(size, antialias=True),
                                                  v2.RandomHorizontalFlip()]),  # ImageNet's
}
# A mirror image is another class here: digits read backwards, a tuple's items in reverse order.
MIRROR_CHANGES_CLASS = ("mnist", "svhn", "tuples")
MIN_CROP_SIZE = 16  # a 4-pixel shift would move a quarter or more of a smaller image out of view


def check_augmentation(name: str, dataset: str, input_shape: tuple[int, int, int]) -> None:
    """Refuse, before training, an augmentation wrong for the data it would change."""
    if "flip" in name and dataset in MIRROR_CHANGES_CLASS:
        raise ConfigError(f"train.augment = {name} flips images, but a mirrored {dataset} image is another class "
                          f"(or none): use crop, or none")
    if "crop" in name and min(input_shape[1:]) < MIN_CROP_SIZE:
        raise ConfigError(f"train.augment = {name} crops, but {dataset} images are {input_shape[1]}x{input_shape[2]} "
                          f"pixels (at least {MIN_CROP_SIZE} needed): use none")


class PreparedData:
    """A dataset as `prepare` wrote it: meta.json plus a normalised torch Dataset per split."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        try:
            self.meta = json.loads((self.root / "meta.json").read_text())
        except FileNotFoundError:
            raise DatasetError(f"{self.root}/meta.json not found: run `dvc repro prepare` first") from None

    @property
    def class_names(self) -> list[str]:
        return self.meta["class_names"]

    @property
    def num_classes(self) -> int:
        return self.meta["num_classes"]

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return tuple(self.meta["input_shape"])

    def split(self, name: str, augment: str = "none") -> PreparedSplit:
        if name not in self.meta["splits"]:
            raise KeyError(f"unknown split {name!r}; {self.root} has {', '.join(self.meta['splits'])}")
        return PreparedSplit(self.root, name, self.meta, augment)


class PreparedSplit(torch.utils.data.Dataset):
    """Normalised float32 images (C, H, W) and int64 labels, read batch by batch as their storage kind
    says (slc.data.storage), each image then augmented by `augment` (AUGMENTATIONS)."""

    def __init__(self, root: Path, name: str, meta: dict, augment: str = "none"):
        check_augmentation(augment, meta["dataset"], meta["input_shape"])
        self.augment = AUGMENTATIONS[augment](tuple(meta["input_shape"][1:]))
        norm = meta["normalisation"]
        self.scale = meta["pixel_scale"]
        self.mean = np.asarray(norm["mean"], np.float32)[:, None, None]
        self.std = np.asarray(norm["std"], np.float32)[:, None, None]
        self.stored = STORAGES[meta["storage"]](root, name, meta["input_shape"][-1])
        self.labels = self.stored.labels

    def __len__(self) -> int:
        return len(self.labels)

    def normalise(self, images: np.ndarray) -> torch.Tensor:
        """(N, C, H, W) raw pixels -> the float32 network input."""
        return torch.from_numpy((images.astype(np.float32) / self.scale - self.mean) / self.std)

    def __getitems__(self, indices: list[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """A whole batch at once (DataLoader's batched fetch): one vectorised normalisation."""
        index = np.asarray(indices)
        raw = self.stored.fetch(index)
        if self.augment is not None:  # torch's RNG: seeded per loader worker, and saved in checkpoints
            raw = np.stack([self.augment(torch.from_numpy(np.ascontiguousarray(image))).numpy() for image in raw])
        return list(zip(self.normalise(raw), torch.from_numpy(self.labels[index])))

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.__getitems__([i])[0]


def renormalisation(data_norm: dict, model_norm: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and shift turning inputs normalised with `data_norm` into the model's normalisation.

    Both are per-channel statistics of pixels on the [0, 1] scale, so pixel = x * s_d + m_d and
    the model wants (pixel - m_m) / s_m. Identity when the data is the one trained on.
    """
    m_d, s_d, m_m, s_m = (torch.tensor(v, dtype=torch.float32)[:, None, None] for v in
                          (data_norm["mean"], data_norm["std"], model_norm["mean"], model_norm["std"]))
    return s_d / s_m, (m_d - m_m) / s_m
