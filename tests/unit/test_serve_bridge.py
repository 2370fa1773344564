import json

import pytest

from pipeline.serve import NothingToServeError, best_run, main
from slc.errors import run_stage


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
