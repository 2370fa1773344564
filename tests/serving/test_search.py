"""Image search (serving.search, serving.index_build, serving.index_store) on the tiny real export:
the logits and sets it returns are SingleLogitModel's, the index is bound to its export, checked
at load, built resumably and added to atomically, also from many threads at once."""
import json
import shutil
import threading

import numpy as np
import pytest

from serving import index_store
from serving.errors import DecodeError, ImageShapeError, IndexFileError, InputError, ThresholdError, UnknownClassError
from serving.index_build import build
from serving.model import SingleLogitModel
from serving.search import SearchIndex
from slc.evaluate.metrics import precision_recall_at
from tests.serving.conftest import CLASSES, THRESHOLDS, failing_at, png

N = 40


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    """Forty raw uint8 grey images (N, H, W), as an .npy source holds them."""
    return np.random.default_rng(7).integers(0, 256, size=(N, 8, 8), dtype=np.uint8)


@pytest.fixture(scope="module")
def model(export_dir) -> SingleLogitModel:
    return SingleLogitModel.load(export_dir)


@pytest.fixture
def source(images, tmp_path):
    path = tmp_path / "images.npy"
    np.save(path, images)
    return path


@pytest.fixture
def index(export_dir, source, tmp_path) -> SearchIndex:
    """A flat index of the forty images, built in chunks of 16."""
    build(export_dir, source, tmp_path / "index", chunk_images=16, batch_size=8)
    return SearchIndex.open(tmp_path / "index")


def test_a_search_logit_is_the_single_logit_models_score(index, model, images):
    for class_id in range(len(CLASSES)):
        hits = index.search(class_id, limit=N)
        assert sorted(hits.ids.tolist()) == list(range(N))
        np.testing.assert_allclose(hits.logits, model.score(images, class_id)[hits.ids], rtol=0, atol=1e-5)


@pytest.mark.parametrize("recall", [0.9, 0.99])
def test_a_recall_search_finds_what_decide_marks_positive_with_evaluates_precision_and_recall(index, model, images,
                                                                                               recall):
    labels = np.random.default_rng(3).integers(0, len(CLASSES), size=N)
    logits = np.stack([model.score(images, c) for c in range(len(CLASSES))], axis=1)
    precision, recall_of = precision_recall_at(logits, labels, np.array(THRESHOLDS[str(recall)], np.float64))
    sizes = []
    for class_id in range(len(CLASSES)):
        if np.isnan(THRESHOLDS[str(recall)][class_id]):
            continue
        found = index.search(class_id, recall=recall).ids
        assert set(found.tolist()) == set(np.flatnonzero(model.decide(images, class_id, recall)).tolist())
        right = np.sum(labels[found] == class_id)
        if len(found):
            assert right / len(found) == pytest.approx(precision[class_id], abs=1e-6)
        assert right / np.sum(labels == class_id) == pytest.approx(recall_of[class_id], abs=1e-6)
        sizes.append(len(found))
    assert any(0 < size < N for size in sizes), "the thresholds split no class: the test would pass on anything"


def test_an_image_whose_logit_equals_the_threshold_is_found_and_one_ulp_above_is_not(index):
    best = index.search(2, limit=N)
    for i in (0, N // 2, N - 1):  # the best, a middle and the worst image
        image, logit = int(best.ids[i]), float(best.logits[i])
        assert image in index.search(2, threshold=logit).ids
        assert image not in index.search(2, threshold=float(np.nextafter(logit, np.inf))).ids


def test_results_are_best_first_and_offset_and_limit_page_through_them(index):
    every = index.search(1, threshold=-1e9)
    assert every.total == N and np.all(np.diff(every.logits) <= 0)
    pages = [index.search(1, threshold=-1e9, limit=7, offset=start) for start in range(0, N, 7)]
    assert np.concatenate([page.ids for page in pages]).tolist() == every.ids.tolist()
    assert all(page.total == N for page in pages)
    assert index.search(1, limit=5).ids.tolist() == every.ids[:5].tolist()


@pytest.mark.parametrize(("query", "error", "words"), [
    ({"class_id": 5, "recall": 0.9}, UnknownClassError, "class 5 is not in this model"),
    ({"class_id": 3, "recall": 0.99}, ThresholdError, "class 3 has no threshold at recall 0.99"),
    ({"class_id": 0, "recall": 0.5}, ThresholdError, "no thresholds for recall 0.5"),
    ({"class_id": 0, "threshold": float("inf")}, ThresholdError, "finite"),
    ({"class_id": 0, "threshold": float("nan")}, ThresholdError, "finite"),
    ({"class_id": 0, "recall": 0.9, "threshold": 0.0}, InputError, "not both"),
    ({"class_id": 0}, InputError, "a recall target, a threshold or a limit"),
    ({"class_id": 0, "limit": 0}, InputError, "limit = 0"),
    ({"class_id": 0, "limit": 3, "offset": -1}, InputError, "offset = -1"),
])
def test_a_bad_query_is_refused_in_one_line(index, query, error, words):
    with pytest.raises(error, match=words) as raised:
        index.search(**query)
    assert "\n" not in str(raised.value)


def test_a_query_through_another_export_is_refused(index, exports):
    other = SingleLogitModel.load(exports / "bce-s1")
    with pytest.raises(IndexFileError, match="was built with the export .*ce-s0.* differs from"):
        SearchIndex.open(index.index_dir, other)


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete"])
def test_a_corrupt_truncated_or_missing_segment_is_refused_at_load(index, damage):
    segment = index.index_dir / index.manifest.segments[1]["index"]["file"]
    data = segment.read_bytes()
    if damage == "delete":
        segment.unlink()
    else:
        segment.write_bytes(data[:-1] + bytes([data[-1] ^ 1]) if damage == "flip" else data[:len(data) // 2])
    with pytest.raises(IndexFileError, match=f"{segment.name}.*(truncated or corrupt|cannot be read)"):
        SearchIndex.open(index.index_dir)


def test_a_truncated_index_manifest_or_a_directory_without_one_is_refused(index, tmp_path):
    manifest = index.index_dir / index_store.MANIFEST
    manifest.write_text(manifest.read_text()[:100])
    with pytest.raises(IndexFileError, match="index.json cannot be read"):
        SearchIndex.open(index.index_dir)
    with pytest.raises(IndexFileError, match="is not a search index"):
        SearchIndex.open(tmp_path)


def test_a_build_that_stops_keeps_what_it_indexed_and_the_same_command_resumes_it(export_dir, source, tmp_path,
                                                                                   monkeypatch, index):
    disk_full_at_the_third_chunk = failing_at(3, index_store.write_segment, OSError(28, "No space left on device"))
    monkeypatch.setattr(index_store, "write_segment", disk_full_at_the_third_chunk)
    out = tmp_path / "stopped"
    with pytest.raises(OSError, match="No space left"):
        build(export_dir, source, out, chunk_images=8, batch_size=4)
    stopped = SearchIndex.open(out)
    assert len(stopped) == 16 and stopped.manifest.build["indexed"] == 16
    with pytest.raises(InputError, match="still being built"):
        stopped.add(np.zeros((1, 8, 8), np.uint8))
    build(export_dir, source, out, chunk_images=8, batch_size=4)
    assert disk_full_at_the_third_chunk.calls == 3 + 3  # the three chunks left, not five again
    resumed = SearchIndex.open(out)
    assert len(resumed) == N
    for class_id in (0, 4):
        whole, again = index.search(class_id, limit=N), resumed.search(class_id, limit=N)
        assert whole.ids.tolist() == again.ids.tolist() and whole.logits.tolist() == again.logits.tolist()


def test_a_crash_between_a_segment_and_the_manifest_loses_nothing_and_resumes(export_dir, source, tmp_path,
                                                                            monkeypatch):
    write = index_store.write_manifest
    # the third manifest: after the empty one and the first chunk's
    monkeypatch.setattr(index_store, "write_manifest", failing_at(3, write, KeyboardInterrupt()))
    out = tmp_path / "crashed"
    with pytest.raises(KeyboardInterrupt):
        build(export_dir, source, out, chunk_images=16)
    assert (out / "segment-000001.faiss").exists()  # written, never listed
    assert len(SearchIndex.open(out)) == 16
    monkeypatch.setattr(index_store, "write_manifest", write)
    assert build(export_dir, source, out, chunk_images=16).count == N


def test_resuming_with_another_source_or_kind_is_refused(export_dir, source, index, tmp_path):
    np.save(tmp_path / "other.npy", np.zeros((3, 8, 8), np.uint8))
    with pytest.raises(IndexFileError, match="holds a flat index of .*images.npy"):
        build(export_dir, tmp_path / "other.npy", index.index_dir)
    with pytest.raises(IndexFileError, match="not a sq8 index"):
        build(export_dir, source, index.index_dir, index="sq8")


def test_a_folder_source_keeps_each_images_path_and_an_undecodable_file_stops_the_build(export_dir, images, tmp_path):
    folder = tmp_path / "photos"
    (folder / "sub").mkdir(parents=True)
    for i in range(3):
        (folder / ("sub" if i else "") / f"{i}.png").write_bytes(png(images[i]))
    build(export_dir, folder, tmp_path / "index")
    hits = SearchIndex.open(tmp_path / "index").search(0, limit=3)
    assert sorted(hits.paths) == sorted(str(p) for p in folder.rglob("*.png"))
    (folder / "broken.png").write_bytes(b"not a png")
    with pytest.raises(DecodeError, match="broken.png cannot be read"):
        build(export_dir, folder, tmp_path / "index2")


def test_an_added_image_is_found_as_soon_as_add_returns_and_after_a_reopen(index, model, images):
    added = index.add(images[:2], paths=["a.png", "b.png"])
    assert list(added) == [N, N + 1]
    hits = index.search(0, limit=N + 2)
    assert {N, N + 1} <= set(hits.ids.tolist())
    np.testing.assert_allclose(hits.logits[np.isin(hits.ids, [N, N + 1])],
                               model.score(images[:2], 0)[hits.ids[np.isin(hits.ids, [N, N + 1])] - N], atol=1e-5)
    reopened = SearchIndex.open(index.index_dir)
    assert len(reopened) == N + 2 and reopened.search(0, limit=N + 2).paths.count("a.png") == 1


@pytest.mark.parametrize(("bad", "error"), [
    (np.zeros((2, 9, 9), np.uint8), ImageShapeError),
    (np.full((1, 1, 8, 8), np.nan, np.float32), ImageShapeError),
])
def test_a_failed_add_adds_nothing_and_loses_nothing(index, bad, error):
    before = (index.index_dir / index_store.MANIFEST).read_bytes()
    with pytest.raises(error):
        index.add(bad)
    assert len(index) == N and (index.index_dir / index_store.MANIFEST).read_bytes() == before


def test_an_add_that_cannot_be_written_leaves_the_index_as_it_was(index, images, monkeypatch):
    def disk_full(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(index_store, "write_manifest", disk_full)
    with pytest.raises(OSError):
        index.add(images[:4])
    assert len(index) == N and len(index.search(0, threshold=-1e9).ids) == N
    monkeypatch.undo()
    assert len(SearchIndex.open(index.index_dir)) == N


def test_concurrent_adds_and_queries_never_see_half_an_add(index, images):
    """Two handles on one directory (as two processes have: they share only the file lock) add batches
    of four while others query: every query sees whole batches, and every add lands."""
    handles = [index, SearchIndex.open(index.index_dir)]
    seen, errors = [], []

    def adding(handle):
        for _ in range(5):
            handle.add(images[:4])

    def querying():
        for _ in range(30):
            hits = index.search(2, threshold=-1e9)
            seen.append(hits.total)
            if not np.isfinite(hits.logits).all():
                errors.append(hits)

    threads = [threading.Thread(target=adding, args=(h,)) for h in handles] + [threading.Thread(target=querying)
                                                                              for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors and all((total - N) % 4 == 0 for total in seen)
    for handle in handles:
        assert len(handle.search(2, threshold=-1e9).ids) == N + 40
    starts = [segment["start"] for segment in SearchIndex.open(index.index_dir).manifest.segments]
    assert starts == sorted(set(starts))


def test_a_compressed_index_agrees_with_the_exact_one(export_dir, source, index, tmp_path, images):
    """Its feature ranges are learned on the first chunk (here all forty images): a later image outside
    them is clipped, which a first chunk of 16 of these showed as a logit 0.12 off."""
    build(export_dir, source, tmp_path / "sq8", index="sq8", chunk_images=N)
    compressed = SearchIndex.open(tmp_path / "sq8")
    compressed.add(images[:2])
    assert len(compressed) == N + 2
    exact, approximate = index.search(1, limit=N), compressed.search(1, limit=N + 2)
    approximate_of = dict(zip(approximate.ids.tolist(), approximate.logits.tolist()))
    errors = [abs(approximate_of[i] - logit) for i, logit in zip(exact.ids.tolist(), exact.logits.tolist())]
    assert max(errors) < 0.01 * np.ptp(exact.logits)
    assert len(set(exact.ids[:10].tolist()) & set(approximate.ids[:10].tolist())) >= 8


def test_an_index_moved_with_its_export_is_opened_through_the_export_given(index, export_dir, tmp_path):
    moved = shutil.copytree(export_dir, tmp_path / "moved" / "ce-s0")
    reopened = SearchIndex.open(index.index_dir, SingleLogitModel.load(moved))
    assert len(reopened) == N and json.loads((index.index_dir / "index.json").read_text())["export"]["run_name"] == "ce-s0"


@pytest.mark.parametrize("kind", ["flat", "sq8"])
def test_a_query_over_any_number_of_shards_finds_the_same_images_and_logits(export_dir, source, images, tmp_path, kind):
    """The images are dealt into one shard per query thread, segment by segment (here 16 + 16 + 8, then
    adds of 1 and 5): however many shards, every query returns what one shard does, and they stay even."""
    build(export_dir, source, tmp_path / kind, index=kind, chunk_images=16)
    SearchIndex.open(tmp_path / kind).add(images[:1])
    SearchIndex.open(tmp_path / kind).add(images[1:6])
    one, three = SearchIndex.open(tmp_path / kind, threads=1), SearchIndex.open(tmp_path / kind, threads=3)
    assert len(one) == len(three) == N + 6
    sizes = [shard.index.ntotal for shard in three._shards]
    assert sum(sizes) == N + 6 and max(sizes) - min(sizes) <= 2, sizes
    for class_id in range(len(CLASSES)):
        median = float(np.median(one.search(class_id, limit=N + 6).logits))
        for query in ({"threshold": median}, {"limit": 7, "offset": 3}, {"threshold": -1e9, "limit": 5, "offset": 40}):
            a, b = one.search(class_id, **query), three.search(class_id, **query)
            assert a.total == b.total and a.ids.tolist() == b.ids.tolist() and a.paths == b.paths
            np.testing.assert_array_equal(a.logits, b.logits)
        assert 0 < one.search(class_id, threshold=median).total < N + 6  # a threshold that splits them
