import dataclasses
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision

from slc.core.errors import ConfigError
from slc.data import datasets as data
from slc.data import storage
from slc.data.datasets import DATASETS, DatasetError
from slc.data.preparation import prepare
from slc.data.prepared import PreparedData
from tests.conftest import repo_params
from tests.formats import write_idx_gz, write_image_folder, write_torchvision_dataset

DEFAULT = repo_params().data


def config(tmp_path, **changes):
    return dataclasses.replace(DEFAULT, root=str(tmp_path / "raw"), **changes)


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """No mirror is reachable and no Debian copy exists: a download fails at once."""
    for cls in (torchvision.datasets.MNIST, torchvision.datasets.FashionMNIST):
        monkeypatch.setattr(cls, "mirrors", ["http://127.0.0.1:9/"])
    monkeypatch.setattr(data, "DEBIAN_FASHION_MNIST", tmp_path / "no-debian-copy")


def check_written(out, meta, k, shape):
    assert json.loads((out / "meta.json").read_text()) == meta
    assert meta["num_classes"] == k == len(meta["class_names"])
    assert meta["input_shape"] == list(shape)
    prepared = PreparedData(out)
    for split, n in meta["splits"].items():
        assert n > 0
        images, label = prepared.split(split)[0]
        assert tuple(images.shape) == shape and 0 <= int(label) < k
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")], "temp dir left behind"


def test_fashion_mnist_is_found_in_the_debian_directory(tmp_path, monkeypatch):
    debian = write_idx_gz(tmp_path / "debian")
    monkeypatch.setattr(data, "DEBIAN_FASHION_MNIST", debian)
    meta = prepare(config(tmp_path), tmp_path / "prepared")
    assert meta["splits"]["test"] == 20


def test_svhn_maps_label_ten_to_digit_zero(tmp_path, monkeypatch):
    write_torchvision_dataset("svhn", tmp_path / "raw", monkeypatch)
    prepare(config(tmp_path, name="svhn"), tmp_path / "prepared")
    labels = PreparedData(tmp_path / "prepared").split("test").labels
    assert labels.min() == 0 and labels.max() == 9


def test_image_folder_is_indexed_and_resized(tmp_path):
    write_image_folder(tmp_path / "raw")
    meta = prepare(config(tmp_path, name="folder", image_size=16), tmp_path / "prepared")
    check_written(tmp_path / "prepared", meta, 3, (3, 16, 16))
    assert meta["storage"] == "index" and meta["class_names"] == ["cat", "dog", "eel"]
    assert not list((tmp_path / "prepared").glob("*.npy")), "an indexed dataset must not be loaded into arrays"


def test_imagenet_layout_uses_val_as_test(tmp_path, monkeypatch):
    write_torchvision_dataset("imagenet", tmp_path / "raw", monkeypatch)
    meta = prepare(config(tmp_path, name="imagenet", image_size=8), tmp_path / "prepared")
    assert meta["class_names"] == ["n01440764", "n01443537"] and meta["splits"]["test"] == 8


@pytest.mark.parametrize("layout", ["NHW", "NHWC", "NCHW"])
def test_npz_arrays_in_any_common_layout(tmp_path, layout):
    rng = np.random.default_rng(0)
    shape = {"NHW": (40, 6, 6), "NHWC": (40, 6, 6, 3), "NCHW": (40, 3, 6, 6)}[layout]
    path = tmp_path / "mine.npz"
    np.savez(path, x_train=rng.random(shape, dtype=np.float32), y_train=np.arange(40) % 4,
             x_test=rng.random(shape, dtype=np.float32)[:8], y_test=np.arange(8) % 4,
             class_names=np.array(["a", "b", "c", "d"]))
    meta = prepare(config(tmp_path, name="npz", npz_path=str(path)), tmp_path / "prepared")
    channels = 1 if layout == "NHW" else 3
    check_written(tmp_path / "prepared", meta, 4, (channels, 6, 6))
    assert meta["pixel_scale"] == 1.0 and meta["class_names"] == ["a", "b", "c", "d"]


def test_synthetic_many_classes_is_seeded(tmp_path):
    cfg = config(tmp_path, name="synthetic")
    cfg = dataclasses.replace(cfg, synthetic=dataclasses.replace(cfg.synthetic, num_classes=500))
    first = prepare(cfg, tmp_path / "a")
    second = prepare(cfg, tmp_path / "b")
    assert first["num_classes"] == 500 and first["checksums"] == second["checksums"]


# ---- every registered dataset, from tiny files in its real format ----

@dataclass(frozen=True)
class RealFiles:
    """How a registered dataset's files are written under data.root, and what prepare must make of them."""
    write: Callable[[Path, pytest.MonkeyPatch], dict]  # writes the files; returns the data.* changes they need
    classes: int
    shape: tuple[int, int, int]
    storage: str  # slc.data.storage's kind
    train_and_val: int  # the images the training files hold (or, for tuples, the train and val drawn)


def torchvision_files(name, **changes):
    def write(root, monkeypatch):
        write_torchvision_dataset(name, root, monkeypatch)
        return changes
    return write


def npz_file(root, monkeypatch):
    rng = np.random.default_rng(0)
    root.mkdir(parents=True)
    np.savez(root / "mine.npz", x_train=rng.integers(0, 256, (40, 6, 6, 3), np.uint8), y_train=np.arange(40) % 4,
             x_test=rng.integers(0, 256, (8, 6, 6, 3), np.uint8), y_test=np.arange(8) % 4)
    return {"npz_path": str(root / "mine.npz")}


def image_folder(root, monkeypatch):
    write_image_folder(root)  # 3 classes of 4 PNGs of differing sizes
    return {"image_size": 16}


def no_files(**changes):
    return lambda root, monkeypatch: changes


REAL_FILES = {
    "mnist": RealFiles(torchvision_files("mnist"), 10, (1, 28, 28), "arrays", 60),
    "fashion_mnist": RealFiles(torchvision_files("fashion_mnist"), 10, (1, 28, 28), "arrays", 60),
    "svhn": RealFiles(torchvision_files("svhn"), 10, (3, 32, 32), "arrays", 30),
    "cifar10": RealFiles(torchvision_files("cifar10"), 10, (3, 32, 32), "arrays", 100),
    "cifar100": RealFiles(torchvision_files("cifar100"), 100, (3, 32, 32), "arrays", 200),
    "imagenet": RealFiles(torchvision_files("imagenet", image_size=16), 2, (3, 16, 16), "index", 8),
    "folder": RealFiles(image_folder, 3, (3, 16, 16), "index", 12),
    "npz": RealFiles(npz_file, 4, (3, 6, 6), "arrays", 40),
    # 100 classes: tuples of t = 2 Fashion-MNIST items, 28 x 56 pixels
    "tuples": RealFiles(torchvision_files("tuples", tuples=dataclasses.replace(DEFAULT.tuples, num_classes=100)),
                        100, (1, 28, 56), "tuples", 100 * (DEFAULT.tuples.train_per_class + DEFAULT.tuples.val_per_class)),
    "synthetic": RealFiles(no_files(synthetic=dataclasses.replace(DEFAULT.synthetic, num_classes=5, image_size=8)),
                           5, (1, 8, 8), "arrays", 5 * DEFAULT.synthetic.train_per_class),
}


@pytest.mark.parametrize("name", sorted(DATASETS))
def test_a_registered_dataset_is_prepared_from_its_real_files_into_normalised_images(name, tmp_path, monkeypatch,
                                                                                     offline):
    if name not in REAL_FILES:
        pytest.fail(f"{name} is in slc.data.datasets.DATASETS but not in this module's REAL_FILES: add how its "
                    f"files are written and what prepare makes of them")
    files = REAL_FILES[name]
    changes = files.write(tmp_path / "raw", monkeypatch)
    prepare(config(tmp_path, name=name, **changes), tmp_path / "prepared")
    meta = json.loads((tmp_path / "prepared" / "meta.json").read_text())
    assert (meta["dataset"], meta["num_classes"], len(meta["class_names"])) == (name, files.classes, files.classes)
    assert (meta["input_shape"], meta["storage"]) == (list(files.shape), files.storage)
    assert meta["splits"]["train"] + meta["splits"]["val"] == files.train_and_val
    train = PreparedData(tmp_path / "prepared").split("train")
    image, label = train[0]
    assert image.dtype == torch.float32 and tuple(image.shape) == files.shape and 0 <= int(label) < files.classes
    pixels = torch.stack([train[i][0] for i in range(len(train))]).transpose(0, 1).flatten(1)  # (C, all pixels)
    torch.testing.assert_close(pixels.mean(1), torch.zeros(files.shape[0]), atol=1e-4, rtol=0)
    torch.testing.assert_close(pixels.std(1, correction=0), torch.ones(files.shape[0]), atol=1e-3, rtol=0)


@pytest.mark.parametrize("name", sorted(name for name, dataset in DATASETS.items() if dataset.input_shape))
def test_an_input_shape_on_record_is_the_shape_its_files_prepare_to(name):
    """The record is what a preset's cost is counted at before any file is there."""
    assert DATASETS[name].input_shape == REAL_FILES[name].shape


# ---- bad input: a clear error, and nothing written ----


def test_missing_files_say_which_and_how_to_get_them(tmp_path, offline):
    with pytest.raises(DatasetError, match=r"MNIST is missing or corrupt under .*raw.*train-images-idx3-ubyte.gz"):
        prepare(config(tmp_path, name="mnist"), tmp_path / "prepared")
    assert not (tmp_path / "prepared").exists()


def test_truncated_gz_is_named(tmp_path, offline):
    folder = write_idx_gz(tmp_path / "raw" / "MNIST" / "raw")
    gz = folder / "train-images-idx3-ubyte.gz"
    gz.write_bytes(gz.read_bytes()[:200])
    with pytest.raises(DatasetError, match="train-images-idx3-ubyte.gz is corrupt"):
        prepare(config(tmp_path, name="mnist"), tmp_path / "prepared")
    assert not (tmp_path / "prepared").exists()


def test_idx_file_with_wrong_size_is_corrupt(tmp_path, offline):
    folder = write_idx_gz(tmp_path / "raw" / "MNIST" / "raw")
    prepare(config(tmp_path, name="mnist"), tmp_path / "first")
    extracted = folder / "t10k-images-idx3-ubyte"
    extracted.write_bytes(extracted.read_bytes()[:-100])
    with pytest.raises(DatasetError, match="corrupt"):
        prepare(config(tmp_path, name="mnist"), tmp_path / "prepared")


def write_npz(path, x_train, y_train, x_test, y_test):
    np.savez(path, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test,
             class_names=np.array(["a", "b"]))
    return str(path)


@pytest.mark.parametrize("case, message", [
    ("label_out_of_range", "label 2 is out of range"),
    ("mixed_shapes", "mixed shapes"),
    ("empty_test", "test split is empty"),
])
def test_bad_arrays_are_refused_before_writing(tmp_path, case, message):
    x, y = np.zeros((10, 4, 4), np.uint8), np.arange(10) % 2
    arrays = {
        "label_out_of_range": (x, np.where(y == 1, 2, 0), x, y),
        "mixed_shapes": (x, y, np.zeros((10, 5, 5), np.uint8), y),
        "empty_test": (x, y, x[:0], y[:0]),
    }[case]
    path = write_npz(tmp_path / "bad.npz", *arrays)
    with pytest.raises(DatasetError, match=message):
        prepare(config(tmp_path, name="npz", npz_path=path), tmp_path / "prepared")
    assert not (tmp_path / "prepared").exists()


def test_a_failed_write_leaves_the_previous_output_intact(tmp_path, monkeypatch):
    cfg = config(tmp_path, name="synthetic")
    cfg = dataclasses.replace(cfg, synthetic=dataclasses.replace(cfg.synthetic, num_classes=20))
    out = tmp_path / "prepared"
    before = prepare(cfg, out)

    def fail(*args):
        raise OSError("disk full")

    monkeypatch.setattr(storage.Arrays, "write", fail)
    with pytest.raises(OSError, match="disk full"):
        prepare(cfg, out)
    assert json.loads((out / "meta.json").read_text()) == before
    assert sorted(os.listdir(tmp_path)) == ["prepared"]


# ---- the real Fashion-MNIST of the Debian package ----

@pytest.mark.slow
def test_real_fashion_mnist_end_to_end(tmp_path):
    cfg = config(tmp_path)
    first = prepare(cfg, tmp_path / "a")
    second = prepare(cfg, tmp_path / "b")
    assert first["splits"]["train"] + first["splits"]["val"] == 60_000
    assert first["splits"]["test"] == 10_000
    assert first["num_classes"] == 10 and first["input_shape"] == [1, 28, 28]
    assert first["checksums"] == second["checksums"]
    assert first["source_files"] == second["source_files"] and len(first["source_files"]) == 4


# ---- tuples: many classes of real pictures ----

def tuples_config(tmp_path, **changes):
    cfg = config(tmp_path, name="tuples")
    return dataclasses.replace(cfg, tuples=dataclasses.replace(cfg.tuples, **changes))


def test_a_tuple_class_is_its_fashion_mnist_items_side_by_side(tmp_path, offline):
    write_idx_gz(tmp_path / "raw" / "FashionMNIST" / "raw", n_train=60, n_test=20)
    meta = prepare(tuples_config(tmp_path, num_classes=1000, train_per_class=2), tmp_path / "prepared")
    assert meta["num_classes"] == 1000 and meta["input_shape"] == [1, 28, 84] and meta["storage"] == "tuples"
    assert meta["splits"] == {"train": 2000, "val": 1000, "test": 1000} and meta["class_names"][307] == "307"
    prepared = PreparedData(tmp_path / "prepared")
    pool = np.load(tmp_path / "prepared" / "pool_images.npy")
    items = torchvision.datasets.FashionMNIST(str(tmp_path / "raw"), train=False)
    for split, first_item in (("train", 0), ("test", 60)):  # test items come from Fashion-MNIST's test images
        s = prepared.split(split)
        parts = np.load(tmp_path / "prepared" / f"{split}_parts.npy")
        i = int(np.flatnonzero(s.labels == 307)[0])
        image, label = s[i]
        assert int(label) == 307 and image.shape == (1, 28, 84)
        pixels = np.concatenate([pool[p][0] for p in parts[i]], axis=1)
        expected = (pixels / 255.0 - meta["normalisation"]["mean"][0]) / meta["normalisation"]["std"][0]
        np.testing.assert_allclose(image[0].numpy(), expected, atol=1e-5)
        assert [int(p) >= first_item for p in parts[i]] == [True] * 3
        if split == "test":
            assert [int(items.targets[p - 60]) for p in parts[i]] == [3, 0, 7]  # the digits of class 307


def test_tuples_are_seeded_and_a_long_tail_skews_training_only(tmp_path, offline):
    write_idx_gz(tmp_path / "raw" / "FashionMNIST" / "raw", n_train=60, n_test=20)
    cfg = tuples_config(tmp_path, num_classes=100, train_per_class=4, long_tail=1.0)
    first, second = prepare(cfg, tmp_path / "a"), prepare(cfg, tmp_path / "b")
    assert first["checksums"] == second["checksums"]
    counts = np.bincount(np.load(tmp_path / "a" / "train_labels.npy"), minlength=100)
    assert counts.min() >= 1 and counts.max() > 10 * np.median(counts) and abs(counts.sum() - 400) < 60
    assert (np.bincount(np.load(tmp_path / "a" / "test_labels.npy")) == 1).all()


def test_tuples_need_the_fashion_mnist_files(tmp_path, offline):
    with pytest.raises(DatasetError, match="FashionMNIST is missing"):
        prepare(tuples_config(tmp_path, num_classes=100), tmp_path / "prepared")
    assert not (tmp_path / "prepared").exists()


def test_a_tuples_setting_out_of_range_names_its_key(tmp_path):
    with pytest.raises(ConfigError, match=r"data\.tuples\.long_tail = -1\.0 is invalid"):
        tuples_config(tmp_path, long_tail=-1.0)
