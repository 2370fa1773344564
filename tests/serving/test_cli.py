"""The `slc` command: same answers as the library, a non-zero exit code with a message otherwise."""
import json
import re

import numpy as np
import pytest
import uvicorn
from PIL import Image

from serving.auth import ENV
from serving.cli import main
from serving.model import SingleLogitModel
from tests.serving.conftest import THRESHOLDS


@pytest.fixture
def files(tmp_path, pixels):
    """Two PNGs and an .npy batch of the other four images."""
    paths = []
    for i in range(2):
        Image.fromarray(pixels[i]).save(tmp_path / f"img{i}.png")
        paths.append(tmp_path / f"img{i}.png")
    np.save(tmp_path / "rest.npy", pixels[2:])
    return [*map(str, paths), str(tmp_path / "rest.npy")]


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_score_json_equals_the_library(capsys, export_dir, files, pixels):
    code, out, _ = run(capsys, "score", export_dir, "--class", 1, *files, "--json")
    report = json.loads(out)
    model = SingleLogitModel.load(export_dir)
    assert code == 0 and report["class_name"] == "bee" and report["threshold"] == THRESHOLDS["0.99"][1]
    assert [r["image"].rsplit("/", 1)[-1] for r in report["results"]] == \
        ["img0.png", "img1.png", "rest.npy[0]", "rest.npy[1]", "rest.npy[2]", "rest.npy[3]"]
    np.testing.assert_allclose([r["logit"] for r in report["results"]], model.score(pixels, 1), rtol=1e-6)
    assert [r["decision"] for r in report["results"]] == model.decide(pixels, 1).tolist()


def test_score_prints_a_line_per_image_with_the_rule_used(capsys, export_dir, files):
    code, out, _ = run(capsys, "score", export_dir, "--class", "cat", files[0], "--recall", 0.9, "--graph", "full")
    lines = out.splitlines()
    assert code == 0 and len(lines) == 2
    assert lines[0].startswith("class 2 (cat) of ce-s0; decision: logit >= 0 (recall 0.9")
    assert lines[1].split()[0] == files[0] and lines[1].split()[-1] in ("yes", "no")


def test_a_class_without_threshold_prints_logits_only(capsys, export_dir, files):
    code, out, _ = run(capsys, "score", export_dir, "--class", 3, files[0], "--json")
    report = json.loads(out)
    assert code == 0 and report["threshold"] is None and report["results"][0]["decision"] is None


def test_info_names_the_run_and_the_verified_files(capsys, export_dir):
    code, out, _ = run(capsys, "info", export_dir)
    assert code == 0 and "ce-s0 (loss ce" in out and "files match their sha256" in out
    code, out, _ = run(capsys, "info", export_dir, "--json")
    assert json.loads(out)["class_names"] == ["ant", "bee", "cat", "dog", "eel"]


@pytest.mark.parametrize("argv, code, message", [
    (["--class", 7, "{png}"], 4, "class 7 is not in this model"),
    (["--class", "yak", "{png}"], 4, "no class named 'yak'"),
    (["--class", 1, "{missing}"], 4, "cannot read .*nothing.png"),
    (["--class", 1, "{text}"], 4, "not a PNG, JPEG or .npy"),
    (["--class", 1, "{big}"], 4, "9x9 pixels"),
    (["--class", 1, "--recall", 0.5, "{png}"], 4, "no thresholds for recall 0.5"),
])
def test_bad_input_exits_with_4_and_says_why(capsys, export_dir, files, tmp_path, argv, code, message):
    (tmp_path / "notes.txt").write_text("not an image")
    Image.fromarray(np.zeros((9, 9), np.uint8)).save(tmp_path / "big.png")
    paths = {"png": files[0], "missing": tmp_path / "nothing.png", "text": tmp_path / "notes.txt",
             "big": tmp_path / "big.png"}
    argv = [str(a).format(**paths) for a in argv]
    got, out, err = run(capsys, "score", export_dir, *argv)
    assert got == code and out == ""
    assert re.search(message, err), err


@pytest.mark.parametrize("command", [["info"], ["score", "--class", 0, "x.png"], ["serve"]])
def test_a_tampered_export_exits_with_3_before_serving(capsys, export_copy, command):
    (export_copy / "head.weights").write_bytes(b"\0" * (export_copy / "head.weights").stat().st_size)
    code, _, err = run(capsys, command[0], export_copy, *command[1:])
    assert code == 3 and "head.weights has sha256" in err


@pytest.mark.parametrize("argv, flag", [
    (["score", "{export}", "x.png"], "--class"),
    (["serve", "{export}", "--max-batch", "0"], "--max-batch"),
    (["serve", "{export}", "--onnx-threads", "two"], "--onnx-threads"),
    (["serve", "{export}", "--batch-wait-ms", "0"], "--batch-wait-ms: '0' is not a positive number of milliseconds"),
    (["serve", "{export}", "--batch-wait-ms", "-2.5"], "--batch-wait-ms"),
])
def test_bad_arguments_are_a_usage_error_naming_the_flag(capsys, export_dir, argv, flag):
    with pytest.raises(SystemExit) as exit_info:
        main([a.format(export=export_dir) for a in argv])
    assert exit_info.value.code == 2 and flag in capsys.readouterr().err


@pytest.fixture
def served(monkeypatch):
    """`slc serve` up to the point where uvicorn would take over: what it would have served."""
    monkeypatch.delenv(ENV, raising=False)
    calls = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **options: calls.append((app, options)))
    return calls


@pytest.mark.parametrize("host, token, warns", [("0.0.0.0", False, True), ("192.168.1.7", False, True),
                                                ("0.0.0.0", True, False), ("127.0.0.1", False, False),
                                                ("localhost", False, False), ("::1", False, False)])
def test_serve_on_a_reachable_host_without_a_token_warns_loudly(capsys, served, export_dir, tmp_path, host, token, warns):
    (tmp_path / "token").write_text("t0ken\n")
    code, _, err = run(capsys, "serve", export_dir, "--host", host, *(["--token-file", tmp_path / "token"] if token else []))
    assert code == 0 and served[0][1]["host"] == host
    assert ("WARNING: serving on" in err and "without a token" in err and ENV in err) == warns, err


def test_serve_takes_a_directory_of_exports_and_a_default_run(capsys, served, exports):
    code, _, err = run(capsys, "serve", exports, "--default-run", "ce-s0")
    paths = {route.path for route in served[0][0].routes}
    assert code == 0 and "serving ce-s0 (single_logit) and 1 more run(s)" in err
    assert {"/v1/runs/{run}/classes/{class_id}/score", "/v1/classes/{class_id}/score", "/metrics"} <= paths


@pytest.mark.parametrize("argv, code, message", [
    (["--default-run", "ce-s9"], 4, "run 'ce-s9' is not served here; the runs are bce-s1, ce-s0"),
    (["--token-file", "{empty}"], 2, "the token file .*empty is empty"),
    (["--token-file", "{absent}"], 2, "cannot read the token file"),
])
def test_serve_refuses_a_bad_setting_before_serving(capsys, served, exports, tmp_path, argv, code, message):
    (tmp_path / "empty").write_text("")
    argv = [a.format(empty=tmp_path / "empty", absent=tmp_path / "absent") for a in argv]
    got, _, err = run(capsys, "serve", exports, *argv)
    assert got == code and not served and re.search(message, err), err
