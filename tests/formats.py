"""Writers of small datasets in their real on-disk formats (there is no internet to fetch the real ones)."""
from __future__ import annotations

import gzip
import hashlib
import pickle
import struct
from pathlib import Path

import numpy as np
import scipy.io
from PIL import Image


def md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def idx_bytes(array: np.ndarray) -> bytes:
    """The IDX format of MNIST: magic (0, 0, uint8 type 0x08, ndim), big-endian sizes, data."""
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(np.uint8).tobytes()


def write_idx_gz(folder: Path, n_train: int = 60, n_test: int = 20, seed: int = 0) -> Path:
    """MNIST / Fashion-MNIST's four .gz files, labels cycling over the 10 classes."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        labels = np.arange(n) % 10
        (folder / f"{prefix}-images-idx3-ubyte.gz").write_bytes(gzip.compress(idx_bytes(images)))
        (folder / f"{prefix}-labels-idx1-ubyte.gz").write_bytes(gzip.compress(idx_bytes(labels)))
    return folder


def write_cifar(root: Path, classes: int, per_batch: int = 20, seed: int = 0) -> Path:
    """CIFAR-10 (5 train batches + test_batch + batches.meta) or CIFAR-100 (train, test, meta) pickles."""
    rng = np.random.default_rng(seed)
    ten = classes == 10
    folder = root / ("cifar-10-batches-py" if ten else "cifar-100-python")
    folder.mkdir(parents=True, exist_ok=True)
    label_key = "labels" if ten else "fine_labels"
    names = ["data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5", "test_batch"] if ten \
        else ["train", "test"]
    for name in names:
        batch = {"data": rng.integers(0, 256, size=(per_batch, 3072), dtype=np.uint8),
                 label_key: [int(i % classes) for i in range(per_batch)]}
        (folder / name).write_bytes(pickle.dumps(batch))
    meta_name, meta_key = ("batches.meta", "label_names") if ten else ("meta", "fine_label_names")
    (folder / meta_name).write_bytes(pickle.dumps({meta_key: [f"c{i}" for i in range(classes)]}))
    return folder


def write_svhn(root: Path, n: int = 30, seed: int = 0) -> Path:
    """SVHN's MATLAB files: X (32, 32, 3, N) uint8 and y (N, 1) with digit 0 stored as 10."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    for split in ("train", "test"):
        labels = (np.arange(n) % 10)
        labels[labels == 0] = 10
        scipy.io.savemat(root / f"{split}_32x32.mat", {
            "X": rng.integers(0, 256, size=(32, 32, 3, n), dtype=np.uint8), "y": labels[:, None]})
    return root


def write_image_folder(root: Path, classes=("cat", "dog", "eel"), per_class: int = 4, size=(12, 10),
                       seed: int = 0) -> Path:
    """An ImageFolder tree of PNGs: root/{train,test}/<class>/<i>.png, sizes that differ on purpose."""
    rng = np.random.default_rng(seed)
    for split in ("train", "test"):
        for c in classes:
            (root / split / c).mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                h, w = size[0] + i, size[1] + 2 * i
                pixels = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / c / f"{i}.png")
    return root


def write_torchvision_dataset(name: str, root: Path, monkeypatch) -> None:
    """Files of dataset `name` under `root` (what `data.root` names) as torchvision finds them,
    with torchvision's md5 lists pointed at them so that its own integrity check runs on them."""
    import torchvision.datasets as tv

    if name in ("mnist", "fashion_mnist", "tuples"):  # tuples are made of Fashion-MNIST items
        write_idx_gz(root / {"mnist": "MNIST", "fashion_mnist": "FashionMNIST", "tuples": "FashionMNIST"}[name] / "raw")
    elif name in ("cifar10", "cifar100"):
        ten = name == "cifar10"
        folder = write_cifar(root, classes=10 if ten else 100, per_batch=20 if ten else 200)
        cls = tv.CIFAR10 if ten else tv.CIFAR100
        monkeypatch.setattr(cls, "train_list", [[f, md5(folder / f)] for f, _ in cls.train_list])
        monkeypatch.setattr(cls, "test_list", [[f, md5(folder / f)] for f, _ in cls.test_list])
        monkeypatch.setattr(cls, "meta", {**cls.meta, "md5": md5(folder / cls.meta["filename"])})
    elif name == "svhn":
        write_svhn(root)
        monkeypatch.setattr(tv.SVHN, "split_list", {s: [url, file, md5(root / file)] for s, (url, file, _)
                                                     in tv.SVHN.split_list.items() if s != "extra"})
    elif name == "imagenet":
        write_image_folder(root / "imagenet", classes=("n01440764", "n01443537"))
        (root / "imagenet" / "test").rename(root / "imagenet" / "val")
    else:
        raise ValueError(f"no real-format writer for {name}")
