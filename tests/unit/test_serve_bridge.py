import dataclasses
import json

import pytest
import yaml

from pipeline.serve import main
from serving import cli
from slc.core.errors import run_stage
from slc.export.model_registry import NothingToServeError, best_run
from slc.params import load_params
from tests.conftest import PARAMS_YAML


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


@pytest.fixture
def bridged(tmp_path, monkeypatch):
    """`bridged(**serving)`: run `make serve` on two exports (bce-s0 the best) with params.yaml's
    serving section changed so, and return its config and the `slc serve` arguments as serving.cli parses them."""
    def run(**serving):
        metrics = write_metrics(tmp_path, {"ce-s0": 0.2, "bce-s0": 0.1})
        for run_name in ("ce-s0", "bce-s0"):
            (tmp_path / "exports" / run_name).mkdir(parents=True, exist_ok=True)
            (tmp_path / "exports" / run_name / "manifest.json").write_text("{}")
        params = yaml.safe_load(PARAMS_YAML.read_text())
        params["serving"] |= serving
        (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
        calls = []
        monkeypatch.setattr(cli, "main", lambda argv: calls.append(argv) or 0)
        assert main(["--params", str(tmp_path / "params.yaml"), "--metrics", str(metrics), "--exports",
                     str(tmp_path / "exports")]) == 0
        assert len(calls) == 1
        return load_params(tmp_path / "params.yaml").serving, cli.parser().parse_args(calls[0])
    return run


# Ray Serve's alone (serving.ray_app); `slc serve` is one process.
NOT_SLC_SERVE_OPTIONS = {"replicas"}


def test_make_serve_serves_every_export_with_the_best_as_default(bridged, tmp_path):
    _, args = bridged()
    assert (args.command, args.sources, args.default_run) == ("serve", [str(tmp_path / "exports")], "bce-s0")


def test_make_serve_hands_every_serving_setting_to_slc_serve(bridged):
    cfg, args = bridged(host="0.0.0.0", port=8123, max_batch=64, request_threads=3, onnx_threads=2, batch_wait_ms=4,
                        token_file="/etc/slc/token", public_key="/etc/slc/exports.pub", max_header_bytes=8192,
                        max_headers=50, request_timeout_s=30)
    settings = {f.name for f in dataclasses.fields(cfg)} - NOT_SLC_SERVE_OPTIONS
    assert {key: getattr(args, key) for key in settings} == {key: getattr(cfg, key) for key in settings}
    assert (args.port, args.batch_wait_ms, args.token_file) == (8123, 4.0, "/etc/slc/token")  # not cli's defaults


def test_a_null_serving_setting_is_left_to_slc_serves_own_default(bridged, tmp_path):
    _, args = bridged(request_threads=None, onnx_threads=None, batch_wait_ms=None, token_file=None, public_key=None)
    defaults = cli.parser().parse_args(["serve", str(tmp_path / "exports")])
    for key in ("request_threads", "onnx_threads", "batch_wait_ms", "token_file", "public_key"):
        assert getattr(args, key) == getattr(defaults, key), key
