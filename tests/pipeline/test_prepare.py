import dataclasses
import json
import os

import numpy as np
import pytest
import torchvision

from slc import data
from slc import preparation as prepare_module
from slc.config import ConfigError
from slc.data import DatasetError, PreparedData
from slc.preparation import prepare
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


@pytest.mark.parametrize("name", ["mnist", "fashion_mnist"])
def test_idx_gz_files_under_root_are_prepared(tmp_path, offline, name):
    cls = {"mnist": "MNIST", "fashion_mnist": "FashionMNIST"}[name]
    write_idx_gz(tmp_path / "raw" / cls / "raw", n_train=60, n_test=20)
    meta = prepare(config(tmp_path, name=name), tmp_path / "prepared")
    check_written(tmp_path / "prepared", meta, 10, (1, 28, 28))
    assert meta["splits"] == {"train": 54, "val": 6, "test": 20}


def test_fashion_mnist_is_found_in_the_debian_directory(tmp_path, monkeypatch):
    debian = write_idx_gz(tmp_path / "debian")
    monkeypatch.setattr(data, "DEBIAN_FASHION_MNIST", debian)
    meta = prepare(config(tmp_path), tmp_path / "prepared")
    assert meta["splits"]["test"] == 20


@pytest.mark.parametrize("name, k, train_and_val", [("cifar10", 10, 100), ("cifar100", 100, 200), ("svhn", 10, 30)])
def test_torchvision_files_pass_its_integrity_check(tmp_path, monkeypatch, name, k, train_and_val):
    write_torchvision_dataset(name, tmp_path / "raw", monkeypatch)
    meta = prepare(config(tmp_path, name=name), tmp_path / "prepared")
    check_written(tmp_path / "prepared", meta, k, (3, 32, 32))
    assert meta["splits"]["train"] + meta["splits"]["val"] == train_and_val


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


def test_normalisation_is_computed_on_train(tmp_path, offline):
    write_idx_gz(tmp_path / "raw" / "MNIST" / "raw")
    meta = prepare(config(tmp_path, name="mnist"), tmp_path / "prepared")
    train = PreparedData(tmp_path / "prepared").split("train")
    x = np.stack([train[i][0].numpy() for i in range(len(train))])
    assert abs(x.mean()) < 1e-4 and abs(x.std() - 1) < 1e-3
    assert meta["normalisation"]["std"][0] > 0


# ---- bad input: a clear error, and nothing written ----

def test_unknown_dataset_lists_the_known_ones(tmp_path):
    with pytest.raises(ConfigError, match="unknown dataset.*fashion_mnist, mnist"):
        prepare(config(tmp_path, name="fashion"), tmp_path / "prepared")


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

    monkeypatch.setattr(prepare_module, "write_split", fail)
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
