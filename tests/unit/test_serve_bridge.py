import json

import pytest
import yaml

from pipeline.serve import main
from serving import cli
from slc.errors import run_stage
from slc.registry import NothingToServeError, best_run


def write_metrics(tmp_path, runs):
    path = tmp_path / "slc.json"
    path.write_text(json.dumps({"runs": {run: {"1-auprc": v} for run, v in runs.items()}}))
    return path


def test_best_run_is_the_exported_one_with_lowest_error(tmp_path):
    metrics = write_metrics(tmp_path, {"ce-s0": 0.2, "bce-s0": 0.1, "nce-s0": 0.05})
    for run in ("ce-s0", "bce-s0"):  # nce-s0 was not exported
        (tmp_path / "exports" / run).mkdir(parents=True)
        (tmp_path / "exports" / run / "manifest.json").write_text("{}")
    assert best_run(metrics, tmp_path / "exports") == "bce-s0"


def test_nothing_to_serve_says_which_stage_to_run(tmp_path):
    with pytest.raises(NothingToServeError, match="absent.json not found.*dvc repro"):
        best_run(tmp_path / "absent.json", tmp_path / "exports")
    with pytest.raises(NothingToServeError, match="no exported run .*dvc repro export"):
        best_run(write_metrics(tmp_path, {"ce-s0": 0.2}), tmp_path / "exports")


def test_make_serve_before_the_pipeline_ran_is_one_error_line_and_exit_2(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit:
        run_stage(lambda: main(["--metrics", str(tmp_path / "absent.json"), "--exports", str(tmp_path)]))
    err = capsys.readouterr().err
    assert exit.value.code == 2
    assert err.startswith("error: ") and err.count("\n") == 1 and "dvc repro" in err


def test_make_serve_serves_every_export_with_the_best_as_default_and_the_serving_settings(tmp_path, monkeypatch):
    metrics = write_metrics(tmp_path, {"ce-s0": 0.2, "bce-s0": 0.1})
    for run in ("ce-s0", "bce-s0"):
        (tmp_path / "exports" / run).mkdir(parents=True)
        (tmp_path / "exports" / run / "manifest.json").write_text("{}")
    params = yaml.safe_load(open("params.yaml"))
    params["serving"] |= {"batch_wait_ms": 4, "token_file": "/etc/slc/token", "onnx_threads": 1,
                          "public_key": "/etc/slc/exports.pub", "request_timeout_s": 30}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    calls = []
    monkeypatch.setattr(cli, "main", lambda argv: calls.append(argv) or 0)
    assert main(["--params", str(tmp_path / "params.yaml"), "--metrics", str(metrics), "--exports",
                 str(tmp_path / "exports")]) == 0
    assert calls == [["serve", str(tmp_path / "exports"), "--default-run", "bce-s0", "--host", "127.0.0.1", "--port",
                      "8000", "--max-batch", "256", "--max-header-bytes", "16384", "--max-headers", "100",
                      "--request-timeout-s", "30.0", "--onnx-threads", "1", "--batch-wait-ms", "4.0", "--token-file",
                      "/etc/slc/token", "--public-key", "/etc/slc/exports.pub"]]
