"""`slc index build|add` and `slc search`: the library's answers, and one line with a non-zero exit otherwise."""
import json

import numpy as np
import pytest

from serving.model import SingleLogitModel
from tests.serving.conftest import THRESHOLDS, png
from tests.serving.test_cli import run

N = 12


@pytest.fixture
def images(tmp_path) -> np.ndarray:
    return np.random.default_rng(5).integers(0, 256, size=(N, 8, 8), dtype=np.uint8)


@pytest.fixture
def index_dir(capsys, export_dir, images, tmp_path):
    np.save(tmp_path / "images.npy", images)
    code, out, err = run(capsys, "index", "build", export_dir, tmp_path / "images.npy", "--out", tmp_path / "index",
                         "--batch-size", 5, "--chunk-images", 8)
    assert code == 0, err
    assert f"{N} images of" in out and "(flat, 16 features each) for ce-s0" in out
    return tmp_path / "index"


def test_search_json_lists_what_decide_marks_positive_best_first(capsys, index_dir, export_dir, images):
    code, out, _ = run(capsys, "search", index_dir, "--class", "bee", "--recall", "0.9", "--json")
    report = json.loads(out)
    model = SingleLogitModel.load(export_dir)
    assert code == 0 and report["class_id"] == 1 and report["threshold"] == THRESHOLDS["0.9"][1]
    assert {r["id"] for r in report["results"]} == set(np.flatnonzero(model.decide(images, 1, 0.9)).tolist())
    logits = [r["logit"] for r in report["results"]]
    assert logits == sorted(logits, reverse=True) and report["total"] == len(logits)


def test_search_prints_one_line_per_image_and_pages_with_limit_and_offset(capsys, index_dir):
    _, out, _ = run(capsys, "search", index_dir, "--class", "2", "--limit", "3", "--offset", "2")
    header, *rows = out.splitlines()
    assert header.startswith(f"class 2 (cat) of ce-s0: the best of {N} images; showing 3 from 2") and len(rows) == 3
    _, every, _ = run(capsys, "search", index_dir, "--class", "2", "--limit", N)
    assert [row.split()[0] for row in rows] == [row.split()[0] for row in every.splitlines()[3:6]]


def test_index_add_makes_files_searchable_with_their_paths(capsys, index_dir, images, tmp_path):
    (tmp_path / "new.png").write_bytes(png(images[0]))
    np.save(tmp_path / "two.npy", images[1:3])
    code, out, _ = run(capsys, "index", "add", index_dir, tmp_path / "new.png", tmp_path / "two.npy")
    assert code == 0 and f"ids {N}..{N + 2}; {N + 3} in all" in out
    _, out, _ = run(capsys, "search", index_dir, "--class", "0", "--threshold=-1e9", "--json")
    paths = {r["path"] for r in json.loads(out)["results"]}
    assert {str(tmp_path / "new.png"), f"{tmp_path / 'two.npy'}[1]"} <= paths


@pytest.mark.parametrize(("argv", "code", "message"), [
    (["search", "{index}", "--class", "7", "--recall", "0.9"], 4, "class 7 is not in this model"),
    (["search", "{index}", "--class", "dog", "--recall", "0.99"], 4, "class 3 has no threshold at recall 0.99"),
    (["search", "{index}", "--class", "0", "--threshold", "nan"], 4, "give a finite number"),
    (["search", "{index}", "--class", "0"], 4, "give a recall target, a threshold or a limit"),
    (["search", "{tmp}", "--class", "0", "--limit", "1"], 3, "is not a search index"),
    (["index", "add", "{index}", "{tmp}/bad.png"], 4, "bad.png cannot be read"),
    (["index", "build", "{export}", "{tmp}/missing.npy", "--out", "{tmp}/x"], 4, "missing.npy does not exist"),
    (["index", "build", "{export}", "{tmp}/bad.png", "--out", "{tmp}/x"], 4, "neither a folder nor an .npy/.npz"),
    (["index", "build", "{export}", "{tmp}/broken.npy", "--out", "{tmp}/x"], 4, "broken.npy cannot be read as .npy"),
    (["index", "build", "{export}", "{tmp}/two.npz", "--out", "{tmp}/x"], 4, "name the images `images`"),
])
def test_bad_input_exits_non_zero_with_one_line(capsys, index_dir, export_dir, tmp_path, argv, code, message):
    (tmp_path / "bad.png").write_bytes(b"not an image")
    (tmp_path / "broken.npy").write_bytes(b"\x93NUMPY broken")
    np.savez(tmp_path / "two.npz", a=np.zeros((1, 8, 8), np.uint8), b=np.zeros((1, 8, 8), np.uint8))
    before = (index_dir / "index.json").read_bytes()
    got, _, err = run(capsys, *[a.format(index=index_dir, tmp=tmp_path, export=export_dir) for a in argv])
    assert got == code and message in err and err.count("\n") == 1
    assert (index_dir / "index.json").read_bytes() == before


def test_an_npz_source_gives_its_images_array(capsys, export_dir, images, tmp_path):
    np.savez(tmp_path / "named.npz", labels=np.arange(N), images=images)
    code, out, _ = run(capsys, "index", "build", export_dir, tmp_path / "named.npz", "--out", tmp_path / "npz",
                       "--index", "sq8")
    assert code == 0 and f"{N} images of" in out and "(sq8," in out


def test_a_search_through_another_export_exits_with_3(capsys, index_dir, exports):
    manifest = json.loads((index_dir / "index.json").read_text())
    manifest["export"]["dir"] = str(exports / "bce-s1")
    (index_dir / "index.json").write_text(json.dumps(manifest))
    code, _, err = run(capsys, "search", index_dir, "--class", "0", "--limit", "1")
    assert code == 3 and "whose backbone.onnx differs" in err
