"""`slc index build --ray` (serving.index_ray): Ray Data computes the features, build() commits them, so
the index equals the single-process build's, resumes the same way and keeps a folder's paths."""
import sys

import numpy as np
import pytest

from serving import index_store
from serving.errors import InputError, SetupError
from serving.index_build import build
from serving.index_ray import pool_size
from serving.search import SearchIndex
from tests.serving.conftest import CLASSES, failing_at, png
from tests.serving.test_cli import run

ray = pytest.importorskip("ray")
N = 40


@pytest.fixture(scope="module")
def local_ray():
    """One fresh local Ray for the module (never a cluster already running here): two CPUs, one for the
    actor and one for Ray Data's range-reading task, which it does not fuse into the actor (one CPU hangs)."""
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture
def source(tmp_path):
    """Forty raw uint8 grey images in an .npy."""
    path = tmp_path / "images.npy"
    np.save(path, np.random.default_rng(11).integers(0, 256, size=(N, 8, 8), dtype=np.uint8))
    return path


@pytest.fixture
def single(export_dir, source, tmp_path) -> SearchIndex:
    build(export_dir, source, tmp_path / "single", chunk_images=16, batch_size=8)
    return SearchIndex.open(tmp_path / "single")


def stored(index: SearchIndex) -> np.ndarray:
    """Every stored feature vector, in id order, as the segments on disk hold them."""
    segments = [index_store.read_segment(index.index_dir, segment)[0] for segment in index.manifest.segments]
    return np.concatenate([segment.reconstruct_n(0, segment.ntotal) for segment in segments])


def assert_same_index(ray_built: SearchIndex, single: SearchIndex) -> None:
    np.testing.assert_allclose(stored(ray_built), stored(single), rtol=0, atol=1e-6)
    for class_id in range(len(CLASSES)):
        a, b = ray_built.search(class_id, limit=N), single.search(class_id, limit=N)
        assert a.ids.tolist() == b.ids.tolist() and a.paths == b.paths
        np.testing.assert_allclose(a.logits, b.logits, rtol=0, atol=1e-6)
        assert ray_built.search(class_id, threshold=0.0).ids.tolist() == single.search(class_id, threshold=0.0).ids.tolist()
    assert [(segment["start"], segment["count"]) for segment in ray_built.manifest.segments] == [(0, 16), (16, 16), (32, 8)]
    assert ray_built.manifest == single.manifest  # the same files, byte for byte: nothing records how it was built


def test_a_ray_build_through_the_cli_equals_the_single_process_build(capsys, local_ray, export_dir, source, single,
                                                                     tmp_path):
    code, out, err = run(capsys, "index", "build", export_dir, source, "--out", tmp_path / "ray", "--ray",
                         "--batch-size", 8, "--chunk-images", 16, "--actors", 1)
    assert code == 0, err
    assert f"{N} images of" in out
    assert_same_index(SearchIndex.open(tmp_path / "ray"), single)


def test_an_interrupted_ray_build_resumes_from_its_last_commit(local_ray, export_dir, source, single, tmp_path,
                                                               monkeypatch):
    disk_full_at_the_second_chunk = failing_at(2, index_store.write_segment, OSError(28, "No space left on device"))
    monkeypatch.setattr(index_store, "write_segment", disk_full_at_the_second_chunk)
    out = tmp_path / "ray"
    with pytest.raises(OSError, match="No space left"):
        build(export_dir, source, out, chunk_images=16, batch_size=8, on_ray=True)
    assert SearchIndex.open(out).manifest.build["indexed"] == 16
    build(export_dir, source, out, chunk_images=16, batch_size=8, on_ray=True)
    assert disk_full_at_the_second_chunk.calls == 2 + 2  # the two chunks left, not three again
    assert_same_index(SearchIndex.open(out), single)


def test_a_ray_build_of_a_folder_keeps_each_images_path_in_source_order(local_ray, export_dir, tmp_path):
    pixels = np.random.default_rng(12).integers(0, 256, size=(7, 8, 8), dtype=np.uint8)
    folder = tmp_path / "photos"
    (folder / "sub").mkdir(parents=True)
    for i, image in enumerate(pixels):
        (folder / ("sub" if i % 2 else "") / f"{i}.png").write_bytes(png(image))
    build(export_dir, folder, tmp_path / "single", chunk_images=3, batch_size=2)
    build(export_dir, folder, tmp_path / "ray", chunk_images=3, batch_size=2, on_ray=True)
    ray_built, single = SearchIndex.open(tmp_path / "ray"), SearchIndex.open(tmp_path / "single")
    hits = ray_built.search(0, limit=7)
    in_order = sorted(str(p) for p in folder.rglob("*.png"))
    assert hits.paths == [in_order[i] for i in hits.ids] and sorted(hits.paths) == in_order
    assert hits.paths == single.search(0, limit=7).paths
    np.testing.assert_allclose(stored(ray_built), stored(single), rtol=0, atol=1e-6)


def test_without_ray_the_ray_build_says_which_extra_brings_it(capsys, export_dir, source, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    with pytest.raises(SetupError, match=r"pip install '\.\[ray-serve\]'"):
        build(export_dir, source, tmp_path / "index", on_ray=True)
    code, _, err = run(capsys, "index", "build", export_dir, source, "--out", tmp_path / "index", "--ray")
    assert code == 2 and err.count("\n") == 1 and "ray-serve" in err


def test_actors_without_ray_are_refused(export_dir, source, tmp_path):
    with pytest.raises(InputError, match="actors = 2: .* --ray"):
        build(export_dir, source, tmp_path / "index", actors=2)


@pytest.mark.parametrize("cpus, threads, actors, size", [(2, 1, None, 1), (8, 1, None, 7), (8, 2, None, 3),
                                                        (8, 1, 3, 3), (8, 1, 20, 7)])
def test_the_actor_pool_leaves_one_cpu_for_ray_datas_reads(cpus, threads, actors, size):
    assert pool_size(cpus, threads, actors) == size


@pytest.mark.parametrize("cpus, threads", [(1, 1), (2, 2), (0, 1)])
def test_a_cluster_without_a_cpu_for_the_reads_is_refused_before_it_hangs(cpus, threads):
    with pytest.raises(SetupError, match=f"has {cpus} CPUs, and a build needs {threads + 1}: .* without --ray"):
        pool_size(cpus, threads, None)
