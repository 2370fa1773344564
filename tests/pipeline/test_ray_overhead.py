"""The Ray overhead benchmark: the same trials through Ray and a plain loop, and where Ray's seconds go.
A benchmark, so nothing here asserts a speed: the figures' layout, that each is measured and adds up."""
from __future__ import annotations

import json

import numpy as np
import pytest
import ray

from pipeline import ray_overhead as entry
from slc.core.errors import ConfigError
from slc.core.records import TrialRecord
from slc.data.prepared import PreparedData
from slc.studies import ray_overhead, ray_overhead_report
from tests.conftest import PARAMS_YAML


def test_the_digits_grid_is_sklearns_digits_prepared_as_an_npz(tmp_path, params):
    params, data_root = ray_overhead.digits_grid(params, tmp_path)
    data = PreparedData(data_root)
    assert data.meta["dataset"] == "npz" and data.num_classes == 10 and tuple(data.input_shape) == (1, 8, 8)
    assert len(data.split("train")) + len(data.split("val")) == 1437 and len(data.split("test")) == 360
    assert (params.train.epochs, params.train.batch_size) == (40, 64)
    with np.load(tmp_path / "digits.npz") as arrays:
        assert arrays["x_train"].dtype == np.uint8 and arrays["x_train"].max() == 255


def test_a_ray_trials_phases_leave_the_teardown_as_the_rest_of_its_wall():
    record = TrialRecord(run_name="ce-s0", loss="ce", seed=0, status="finished", wall_time_s=20.0, startup_s=6.0,
                         train_s=11.5, report_s=0.5, save_s=1.0)
    assert ray_overhead.phases(record)["teardown_s"] == pytest.approx(2.5)
    failed = TrialRecord(run_name="ce-s0", loss="ce", seed=0, status="failed", error="boom")
    assert "teardown_s" not in ray_overhead.phases(failed)  # nothing measured, nothing made up


def study(ray_wall: float, plain_wall: float, goal: float | None = 1.3) -> dict:
    trial = {"status": "finished", "wall_s": 10.0, "startup_s": 4.0, "spawn_s": 1.5, "train_s": 5.0, "report_s": 1.0,
             "teardown_s": 1.0, "save_s": 0.5}
    return {"settings": {"dataset": "fashion_mnist", "train_images": 54000, "model": "mlp", "epochs": 5,
                         "batch_size": 128, "losses": ["ce", "bce"], "seeds": [0], "max_concurrent_trials": 2,
                         "num_workers": 1},
            "plain": {"wall_s": plain_wall, "cpus": 2, "trials": {
                "ce-s0": {"status": "finished", "wall_s": 3.0, "train_s": 2.9, "save_s": 0.1},
                "bce-s0": {"status": "finished", "wall_s": 5.0, "train_s": 4.9, "save_s": 0.1}}},
            "ray": {"wall_s": ray_wall, "concurrent_trials": 2, "trials": {"ce-s0": trial, "bce-s0": {
                **trial, "wall_s": 14.0, "startup_s": None}}},
            "ratio": ray_wall / plain_wall, "goal": goal}


def test_the_metrics_hold_the_default_grids_ratio_at_the_top_and_each_goal():
    figures = ray_overhead_report.metrics({"machine": {}, "grids": {"default": study(13.0, 10.0),
                                                                    "digits": study(40.0, 10.0, goal=3.0)}})
    assert figures["ratio"] == pytest.approx(1.3)
    assert figures["goals"] == {"default_within_1.3x": True, "digits_within_3x": False}
    summary = figures["grids"]["default"]["summary"]
    assert summary["ray_wall_s"] == 12.0 and summary["plain_wall_s"] == 4.0
    assert summary["ray_startup_s"] == 4.0  # the median of what was measured; a missing figure is left out
    only_digits = ray_overhead_report.metrics({"machine": {}, "grids": {"digits": study(20.0, 10.0, goal=3.0)}})
    assert "ratio" not in only_digits  # the top-level ratio is the default grid's, never another's


def test_the_report_shows_each_grid_its_ratio_against_its_goal_and_the_phases(tmp_path):
    machine = {"cpu": "AMD EPYC", "cores": 2, "torch": "2.14.1", "load_average_end": [1.0, 1.0, 1.0]}
    ray_overhead_report.write_outputs({"machine": machine, "grids": {"default": study(15.0, 10.0)}},
                                      tmp_path / "m.json", tmp_path / "r.md", tmp_path / "p.png")
    report = " ".join((tmp_path / "r.md").read_text().split())  # the table's padding aside
    assert "| default | fashion_mnist, 54,000 images, mlp | 2 x 1 | 5 x batch 128 | 2 | 10.0 | 15.0 | x1.50 | " \
           "≤ 1.3: missed |" in report
    # the worker's 4.0 s start: 1.5 s until its process existed, 2.5 s its own
    assert "| default | 12.0 | 1.5 | 2.5 | 4.0 | 1.0 | 1.0 | 0.5 | 4.0 | 3.9 | 0.1 |" in report
    assert json.loads((tmp_path / "m.json").read_text())["ratio"] == pytest.approx(1.5)
    assert (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"


def test_the_default_grid_without_prepared_data_is_refused_before_anything_runs(tmp_path):
    with pytest.raises(ConfigError, match="make data"):
        entry.main(["--params", str(PARAMS_YAML), "--data", str(tmp_path / "nothing"), "--metrics", str(tmp_path / "m.json")])
    assert not (tmp_path / "m.json").exists()


@pytest.mark.slow
def test_one_trial_through_both_paths_end_to_end(tmp_path, monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    try:
        study = entry.main(["--params", str(PARAMS_YAML), "--grids", "digits", "--losses", "bce", "--seeds", "0", "--epochs", "2",
                            "--metrics", str(tmp_path / "m.json"), "--table", str(tmp_path / "r.md"),
                            "--plot", str(tmp_path / "p.png")])
    finally:
        ray.shutdown()
    grid = study["grids"]["digits"]
    plain, through = grid["plain"]["trials"]["bce-s0"], grid["ray"]["trials"]["bce-s0"]
    assert plain["status"] == through["status"] == "finished"
    assert grid["ratio"] == pytest.approx(grid["ray"]["wall_s"] / grid["plain"]["wall_s"])
    assert 0 < plain["train_s"] <= plain["wall_s"] <= grid["plain"]["wall_s"]
    assert 0 <= through["spawn_s"] < through["startup_s"]
    assert 0 < through["report_s"] < through["train_s"] and through["teardown_s"] > 0
    assert through["wall_s"] <= grid["ray"]["wall_s"]
    figures = json.loads((tmp_path / "m.json").read_text())
    assert figures["goals"] == {"digits_within_3x": grid["ratio"] <= 3.0} and "ratio" not in figures
    assert "| digits |" in (tmp_path / "r.md").read_text()
