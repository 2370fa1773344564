"""The scaling study: its measurements, its report, and a whole (tiny) study through the real stages."""
import json
import sys

import pytest
import yaml

from pipeline import scaling as entry
from slc.studies import scaling
from slc.studies.scaling import StudyError, measure
from tests.formats import write_idx_gz


def test_a_commands_peak_memory_counts_its_child_processes(tmp_path, monkeypatch):
    monkeypatch.setattr(scaling, "POLL_S", 0.1)
    child = "import numpy; a = numpy.ones(300_000_000 // 8); import time; time.sleep(1.5)"
    parent = f"import subprocess, sys; subprocess.run([sys.executable, '-c', {child!r}], check=True)"
    cost = measure([sys.executable, "-c", parent], tmp_path, tmp_path / "log")
    assert cost["peak_rss_gb"] > 0.3 and cost["wall_s"] >= 1.5


def test_the_wall_time_ends_when_the_command_does_not_at_the_next_memory_sample(tmp_path, monkeypatch):
    monkeypatch.setattr(scaling, "POLL_S", 60)
    assert measure([sys.executable, "-c", "pass"], tmp_path, tmp_path / "log")["wall_s"] < 30


def test_a_failed_stage_names_its_log(tmp_path):
    with pytest.raises(StudyError, match=r"exit code 3: see .*stage\.log"):
        measure([sys.executable, "-c", "import sys; print('why'); sys.exit(3)"], tmp_path, tmp_path / "stage.log")
    assert "why" in (tmp_path / "stage.log").read_text()


def test_below_the_candidate_count_every_class_is_a_candidate(tmp_path):
    base = entry.apply(yaml.safe_load(open("params.yaml")), entry.PRESETS[entry.MANY_CLASSES])
    assert entry.at_k(base, 500, 1000)["train"]["candidates"] == 500
    assert entry.at_k(base, 400000, 1000)["train"]["candidates"] == base["train"]["candidates"]


def test_every_k_trains_on_the_same_number_of_images(tmp_path):
    base = entry.apply(yaml.safe_load(open("params.yaml")), entry.PRESETS[entry.MANY_CLASSES])
    assert [entry.at_k(base, k, 10**6)["data"]["tuples"]["train_per_class"] for k in (1000, 10**4, 400000)] == [1000, 100, 2]


@pytest.mark.slow
def test_a_tiny_study_runs_every_stage_and_writes_its_figures(tmp_path, monkeypatch):
    write_idx_gz(tmp_path / "raw" / "FashionMNIST" / "raw", n_train=60, n_test=20)
    params = yaml.safe_load(open("params.yaml"))
    params["data"]["root"] = str(tmp_path / "raw")
    params["benchmark"].update(bandwidth_mib=16, repeats=3, warmup=1)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    monkeypatch.setitem(entry.PRESETS, entry.MANY_CLASSES, {**entry.PRESETS[entry.MANY_CLASSES], "train.epochs": 1,
                                                             "model.hidden": 16, "evaluate.classes": 30})
    monkeypatch.setattr(scaling, "step_ms", lambda *args, **kwargs: 1.0)  # timing is not what is tested here
    out = tmp_path / "out"
    entry.main(["--params", str(tmp_path / "params.yaml"), "--ks", "50", "200", "--train-images", "600",
                "--workdir", str(tmp_path / "runs"),
                "--metrics", str(out / "scaling.json"), "--table", str(out / "scaling.md"), "--plot",
                str(out / "scaling.png")])
    study = json.loads((out / "scaling.json").read_text())
    assert list(study["points"]) == ["50", "200"] and study["machine"]["cores"] >= 1
    point = study["points"]["200"]
    assert set(point["stages"]) == {"prepare", "train", "evaluate", "export"}
    assert point["evaluate"]["peak_rss_gb"] > 0 and point["export"]["bytes"] > 0
    assert set(point["train_step_ms"]) == {"ce", "batch_ce"} and point["latency_ms"]["full"] > 0
    assert set(point["summary"]["1-auprc"]) == {"non_pols", "pols", "relative_improvement"}
    table = (out / "scaling.md").read_text()
    assert "| 200 " in table and "Goals, as measured" in table and (out / "scaling.png").stat().st_size > 10_000
