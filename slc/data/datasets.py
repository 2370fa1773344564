"""Dataset registry: find (or download) a dataset and decode it into arrays or a file index.

Each loader returns a `RawDataset` in one shape, so `prepare` splits, normalises and writes them
all the same way. Loaders use torchvision's own readers and download code; a missing or corrupt
file becomes a `DatasetError` that names the file and how to get it.
"""
from __future__ import annotations

import gzip
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torchvision
from PIL import Image
from torchvision.datasets import ImageFolder

from slc.core.config import DataConfig
from slc.core.errors import PipelineError

DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")


class DatasetError(PipelineError, RuntimeError):
    """A dataset that cannot be found, read or trusted."""


@dataclass
class Split:
    """Labels plus one of: the images themselves (N, C, H, W), the image files (indexed, not loaded),
    or `parts` (N, t) indices into a shared `pool` of images that `compose` lays side by side."""
    labels: np.ndarray
    images: np.ndarray | None = None
    paths: list[str] | None = None
    parts: np.ndarray | None = None
    pool: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.labels)


@dataclass
class RawDataset:
    class_names: list[str]
    train: Split
    test: Split
    source: str
    files: list[Path]
    val: Split | None = None  # a dataset's own validation split; else prepare carves one from train


def compose(pool: np.ndarray, parts: np.ndarray) -> np.ndarray:
    """(N, t) pool indices -> (N, C, H, t*W) images: each row's t pool images side by side."""
    items = pool[parts]  # (N, t, C, H, W)
    n, t, c, h, w = items.shape
    return items.transpose(0, 2, 3, 1, 4).reshape(n, c, h, t * w)


def _torchvision_dataset(cls, root: Path, hint: str, **kwargs):
    """Open a torchvision dataset from `root`, downloading only when the files are not there."""
    try:
        return cls(str(root), download=False, **kwargs)
    except RuntimeError:
        pass
    try:
        return cls(str(root), download=True, **kwargs)
    except Exception as error:  # no network, a mirror down, a checksum that does not match
        raise DatasetError(f"{cls.__name__} is missing or corrupt under {root} and could not be "
                           f"downloaded ({error}). {hint}") from None


def _idx_dataset(cls, cfg: DataConfig, extra_dirs: tuple[Path, ...] = ()) -> RawDataset:
    """MNIST-format datasets: use extracted files, else .gz files found locally, else download."""
    root = Path(cfg.root)
    raw = root / cls.__name__ / "raw"
    names = [name for name, _ in cls.resources]
    for name in names:
        extracted = raw / Path(name).stem
        if extracted.exists():
            continue
        found = [d / name for d in (raw, root, *extra_dirs) if (d / name).exists()]
        if found:
            raw.mkdir(parents=True, exist_ok=True)
            try:
                with gzip.open(found[0]) as src, open(extracted, "wb") as dst:
                    shutil.copyfileobj(src, dst)
            except (OSError, EOFError) as error:
                extracted.unlink(missing_ok=True)
                raise DatasetError(f"{found[0]} is corrupt ({error}): delete it and fetch it again") from None
    hint = (f"Put {', '.join(names)} under {root} (or run `apt-get install dataset-fashion-mnist` "
            f"for Fashion-MNIST), or allow torchvision to download them.")
    splits = []
    for train in (True, False):
        try:
            ds = _torchvision_dataset(cls, root, hint, train=train)
        except (AssertionError, ValueError) as error:
            raise DatasetError(f"the {cls.__name__} files under {raw} are corrupt ({error or 'bad size'}): "
                               f"delete them and fetch them again") from None
        splits.append(Split(labels=ds.targets.numpy().astype(np.int64), images=ds.data.numpy()[:, None]))
    files = sorted(p for p in raw.iterdir() if p.suffix != ".gz")
    return RawDataset(list(cls.classes), splits[0], splits[1], f"torchvision.datasets.{cls.__name__}", files)


def fashion_mnist(cfg: DataConfig) -> RawDataset:
    return _idx_dataset(torchvision.datasets.FashionMNIST, cfg, extra_dirs=(DEBIAN_FASHION_MNIST,))


def mnist(cfg: DataConfig) -> RawDataset:
    return _idx_dataset(torchvision.datasets.MNIST, cfg)


def _cifar(cls, cfg: DataConfig, folder: str) -> RawDataset:
    hint = f"Put the extracted {folder}/ under {cfg.root}, or allow torchvision to download it."
    train, test = (_torchvision_dataset(cls, Path(cfg.root), hint, train=t) for t in (True, False))
    as_split = lambda ds: Split(labels=np.asarray(ds.targets, np.int64), images=ds.data.transpose(0, 3, 1, 2))
    files = sorted((Path(cfg.root) / folder).iterdir())
    return RawDataset(list(train.classes), as_split(train), as_split(test), f"torchvision.datasets.{cls.__name__}", files)


def cifar10(cfg: DataConfig) -> RawDataset:
    return _cifar(torchvision.datasets.CIFAR10, cfg, "cifar-10-batches-py")


def cifar100(cfg: DataConfig) -> RawDataset:
    return _cifar(torchvision.datasets.CIFAR100, cfg, "cifar-100-python")


def svhn(cfg: DataConfig) -> RawDataset:
    hint = f"Put train_32x32.mat and test_32x32.mat under {cfg.root}, or allow torchvision to download them."
    train, test = (_torchvision_dataset(torchvision.datasets.SVHN, Path(cfg.root), hint, split=s)
                   for s in ("train", "test"))
    as_split = lambda ds: Split(labels=ds.labels.astype(np.int64), images=ds.data)
    files = [Path(cfg.root) / f"{s}_32x32.mat" for s in ("train", "test")]
    return RawDataset([str(d) for d in range(10)], as_split(train), as_split(test), "torchvision.datasets.SVHN", files)


def load_image(path: str, size: int) -> np.ndarray:
    """One image file as uint8 (3, size, size): how indexed datasets are decoded everywhere."""
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB").resize((size, size)), dtype=np.uint8).transpose(2, 0, 1)


def _image_folders(train_dir: Path, test_dir: Path, source: str) -> RawDataset:
    """Index two ImageFolder trees with the same classes; images stay on disk."""
    for folder in (train_dir, test_dir):
        if not folder.is_dir():
            raise DatasetError(f"{folder} not found: expected one sub-folder of images per class there")
    train, test = ImageFolder(str(train_dir)), ImageFolder(str(test_dir))
    if train.classes != test.classes:
        raise DatasetError(f"{train_dir} and {test_dir} have different class folders: "
                           f"{sorted(set(train.classes) ^ set(test.classes))[:10]}")
    as_split = lambda ds: Split(labels=np.asarray(ds.targets, np.int64), paths=[p for p, _ in ds.samples])
    return RawDataset(list(train.classes), as_split(train), as_split(test), source, [])


def folder(cfg: DataConfig) -> RawDataset:
    root = Path(cfg.root)
    return _image_folders(root / "train", root / "test", f"ImageFolder {root.resolve()}")


def imagenet(cfg: DataConfig) -> RawDataset:
    """ILSVRC-2012 in the usual extracted layout: imagenet/{train,val}/<wnid>/*.JPEG (val is the test split)."""
    root = Path(cfg.root) / "imagenet"
    return _image_folders(root / "train", root / "val", f"ImageNet (ImageFolder) {root.resolve()}")


def npz(cfg: DataConfig) -> RawDataset:
    """A user's own arrays: x_train, y_train, x_test, y_test (images uint8 or float), class_names optional."""
    if cfg.npz_path is None:
        raise DatasetError("data.name is npz but data.npz_path is null: set it to your .npz file")
    path = Path(cfg.npz_path)
    try:
        arrays = np.load(path, allow_pickle=False)
        x_train, y_train, x_test, y_test = (arrays[k] for k in ("x_train", "y_train", "x_test", "y_test"))
    except FileNotFoundError:
        raise DatasetError(f"{path} not found: set data.npz_path to your .npz file") from None
    except KeyError as error:
        raise DatasetError(f"{path} lacks array {error}: it needs x_train, y_train, x_test, y_test") from None
    except (OSError, ValueError) as error:
        raise DatasetError(f"{path} is not a readable .npz file ({error})") from None
    k = int(max(y_train.max(initial=0), y_test.max(initial=0))) + 1
    names = [str(n) for n in arrays["class_names"]] if "class_names" in arrays else [str(c) for c in range(k)]
    split = lambda x, y: Split(labels=y.astype(np.int64), images=_channels_first(x, path))
    return RawDataset(names, split(x_train, y_train), split(x_test, y_test), f"npz {path.resolve()}", [path])


def _channels_first(images: np.ndarray, path: Path) -> np.ndarray:
    if images.ndim == 3:
        return images[:, None]
    if images.ndim == 4 and images.shape[-1] in (1, 3) and images.shape[1] not in (1, 3):
        return images.transpose(0, 3, 1, 2)
    if images.ndim == 4 and images.shape[1] in (1, 3):
        return images
    raise DatasetError(f"{path}: images of shape {images.shape} are not (N, H, W), (N, H, W, C) or "
                       f"(N, C, H, W) with 1 or 3 channels")


def synthetic(cfg: DataConfig) -> RawDataset:
    """Seeded many-class data: each class is a random prototype image plus noise."""
    s = cfg.synthetic
    rng = np.random.default_rng(cfg.seed)
    prototypes = rng.uniform(0, 255, size=(s.num_classes, 1, s.image_size, s.image_size))

    def draw(per_class: int) -> Split:
        labels = np.repeat(np.arange(s.num_classes, dtype=np.int64), per_class)
        noise = rng.normal(0, 40, size=(len(labels), 1, s.image_size, s.image_size))
        return Split(labels=labels, images=np.clip(prototypes[labels] + noise, 0, 255).astype(np.uint8))

    names = [f"class_{c}" for c in range(s.num_classes)]
    return RawDataset(names, draw(s.train_per_class), draw(s.test_per_class), f"synthetic seed={cfg.seed}", [])


def tuple_length(num_classes: int) -> int:
    """t, the items of a class of `tuples` over k classes: the digits of k - 1."""
    return len(str(num_classes - 1))


def tuple_digits(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Class c -> its t base-10 digits, most significant first: the Fashion-MNIST class at each place."""
    t = tuple_length(num_classes)
    return (labels[:, None] // 10 ** np.arange(t - 1, -1, -1)) % 10


def tuples(cfg: DataConfig) -> RawDataset:
    """Many classes of real pictures, generated on the fly from Fashion-MNIST.

    Class c is the ordered tuple of Fashion-MNIST classes spelled by the t digits of c (t digits of
    num_classes - 1), and an example of it is one random Fashion-MNIST image of each of those
    classes laid side by side: 10^t classes from real pictures, whose hardest negatives differ in
    one item. Only (N, t) indices into Fashion-MNIST are stored, never the composed images. Train
    and validation items come from Fashion-MNIST's train images, test items from its test images
    only. With `long_tail` a > 0 training class c has frequency ~ 1 / rank(c)^a (ranks a seeded
    permutation, at least one example per class); validation and test stay balanced.
    """
    s = cfg.tuples
    base = fashion_mnist(cfg)
    rng = np.random.default_rng(cfg.seed)
    k = s.num_classes
    pool = np.concatenate([base.train.images, base.test.images])
    offset = {"train": 0, "test": len(base.train)}

    def draw(per_class: np.ndarray, source: str) -> Split:
        labels = np.repeat(np.arange(k, dtype=np.int64), per_class)
        base_labels = (base.train if source == "train" else base.test).labels
        by_class = np.argsort(base_labels, kind="stable")
        starts = np.searchsorted(base_labels[by_class], np.arange(10))
        counts = np.bincount(base_labels, minlength=10)
        digits = tuple_digits(labels, k)
        if (counts[digits] == 0).any():
            raise DatasetError(f"Fashion-MNIST's {source} images lack class {int(digits[counts[digits] == 0][0])}")
        pick = (rng.random(digits.shape) * counts[digits]).astype(np.int64)
        parts = (offset[source] + by_class[starts[digits] + pick]).astype(np.int32)
        return Split(labels=labels, parts=parts, pool=pool)

    train_counts = np.full(k, s.train_per_class)
    if s.long_tail > 0:
        weight = 1.0 / (rng.permutation(k) + 1.0) ** s.long_tail
        train_counts = np.maximum(1, np.round(s.train_per_class * k * weight / weight.sum())).astype(np.int64)
    t = tuple_length(k)
    return RawDataset([f"{c:0{t}d}" for c in range(k)], draw(train_counts, "train"),
                      draw(np.full(k, s.test_per_class), "test"),
                      f"tuples of {t} Fashion-MNIST items, {k} classes, seed={cfg.seed}", base.files,
                      val=draw(np.full(k, s.val_per_class), "train"))


@dataclass(frozen=True)
class Dataset:
    """A registered dataset: its loader and, for a public one, its size on record (what a preset's
    cost is counted from before any file is there)."""
    load: Callable[[DataConfig], RawDataset]
    train_images: int | None = None  # before data.val_fraction is carved off
    classes: int | None = None
    input_shape: tuple[int, int, int] | None = None  # None: data.image_size square RGB


DATASETS: dict[str, Dataset] = {
    "fashion_mnist": Dataset(fashion_mnist, 60_000, 10, (1, 28, 28)),
    "mnist": Dataset(mnist, 60_000, 10, (1, 28, 28)),
    "svhn": Dataset(svhn, 73_257, 10, (3, 32, 32)),
    "cifar10": Dataset(cifar10, 50_000, 10, (3, 32, 32)),
    "cifar100": Dataset(cifar100, 50_000, 100, (3, 32, 32)),
    "imagenet": Dataset(imagenet, 1_281_167, 1000),
    "folder": Dataset(folder),
    "npz": Dataset(npz),
    "tuples": Dataset(tuples),
    "synthetic": Dataset(synthetic),
}


def load_raw(cfg: DataConfig) -> RawDataset:
    return DATASETS[cfg.name].load(cfg)
