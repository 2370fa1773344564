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
    assert entry.at_k(base, 500, 1000, "cosine")["train"]["candidates"] == 500
    assert entry.at_k(base, 400000, 1000, "linear")["train"]["candidates"] == base["train"]["candidates"]


def test_each_head_runs_with_its_own_scale(tmp_path):
    base = entry.apply(yaml.safe_load(open("params.yaml")), {**entry.PRESETS[entry.MANY_CLASSES], "model.head": "cosine",
                                                              "model.scale": 7.0})
    assert entry.at_k(base, 1000, 1000, "linear")["model"] == {**base["model"], "head": "linear", "scale": None}
    assert entry.at_k(base, 1000, 1000, "cosine")["model"]["scale"] is None, "the default scale for each k"


def test_every_k_trains_on_the_same_number_of_images(tmp_path):
    base = entry.apply(yaml.safe_load(open("params.yaml")), entry.PRESETS[entry.MANY_CLASSES])
    per_class = [entry.at_k(base, k, 10**6, "cosine")["data"]["tuples"]["train_per_class"] for k in (1000, 10**4, 400000)]
    assert per_class == [1000, 100, 2]


def fake_point(k: int, head: str, step: float, errors: tuple[float, float]) -> dict:
    """A point as run_point and time_point make it, with chosen figures."""
    losses = {"ce": {"1-auprc": errors[0], "train_loss": 5.0}, "batch_ce": {"1-auprc": errors[1], "train_loss": 5.5}}
    cost = {"wall_s": 10.0, "peak_rss_gb": 1.5}
    return {"k": k, "head": head, "stages": {}, "evaluate": cost, "export": {**cost, "bytes": 10**8},
            "summary": {"1-auprc": {"non_pols": errors[0], "pols": errors[1],
                                    "relative_improvement": (errors[0] - errors[1]) / errors[0]}},
            "losses": losses, "head_gb": 0.5,
            "train_step_ms": {loss: {"sampled": step, "exact": 10 * step} for loss in losses},
            "latency_ms": {"full": 4.0, "single_logit": 0.3, "backbone": 0.25, "single_vs_backbone": 1.2}}


def test_the_report_reads_each_head_at_each_k(tmp_path):
    points = {str(k): {"k": k, "heads": {"linear": fake_point(k, "linear", step, (0.9, 0.8)),
                                         "cosine": fake_point(k, "cosine", 2 * step, (0.6, 0.5))}}
              for k, step in ((1000, 10.0), (400000, 15.0))}
    measured = scaling.goals(points)
    assert measured["linear"]["sampled_step_ratio_largest_vs_smallest_k"] == {"ce": 1.5, "batch_ce": 1.5}
    assert measured["cosine"]["relative_improvement_1-auprc"]["400000"] == pytest.approx(1 / 6)
    study = {"machine": {"cpu": "test", "cores": 2}, "settings": {
        "train": {"batch_size": 256, "candidates": 1024, "epochs": 1, "head_init": "class_mean", "head_lr": 0.01},
        "model": {"name": "mlp", "hidden": 256}, "grid": {"losses": ["ce", "batch_ce"]}, "evaluate": {"classes": 1000},
        "train_images": 10**6, "heads": ["linear", "cosine"]}, "points": points, "goals": measured}
    scaling.write_outputs(study, tmp_path / "s.json", tmp_path / "s.md", tmp_path / "s.png")
    table = (tmp_path / "s.md").read_text()
    assert "| 400,000 | cosine | 30.0 " in table and "| 1,000   | linear | 10.0 " in table
    assert "| 400,000 | cosine | 12.90   | 0.600 (5.00) " in table, "log k beside each loss's error (train loss)"
    assert "cosine head, relative improvement of 1-AUPRC, PoLS-aligned over not (goal >= 20%): k=1,000: 16.7%" in table
    assert json.loads((tmp_path / "s.json").read_text())["points"] == points
    assert (tmp_path / "s.png").stat().st_size > 10_000


@pytest.mark.slow
def test_a_tiny_study_runs_every_stage_with_each_head(tmp_path, monkeypatch):
    """One k (the report over several is tested above): each stage of each head, through Ray."""
    write_idx_gz(tmp_path / "raw" / "FashionMNIST" / "raw", n_train=60, n_test=20)
    params = yaml.safe_load(open("params.yaml"))
    params["data"]["root"] = str(tmp_path / "raw")
    params["benchmark"].update(bandwidth_mib=16, repeats=3, rounds=3, warmup=1)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    monkeypatch.setitem(entry.PRESETS, entry.MANY_CLASSES, {**entry.PRESETS[entry.MANY_CLASSES], "train.epochs": 1,
                                                             "model.hidden": 16, "evaluate.classes": 30,
                                                             "ray.max_concurrent_trials": 2})
    monkeypatch.setattr(scaling, "step_ms", lambda *args, **kwargs: 1.0)  # timing is not what is tested here
    out = tmp_path / "out"
    entry.main(["--params", str(tmp_path / "params.yaml"), "--ks", "200", "--train-images", "600",
                "--losses", "ce", "batch_ce", "--workdir", str(tmp_path / "runs"), "--metrics", str(out / "scaling.json"),
                "--table", str(out / "scaling.md"), "--plot", str(out / "scaling.png")])
    study = json.loads((out / "scaling.json").read_text())
    assert list(study["points"]) == ["200"] and study["machine"]["cores"] >= 1
    heads = study["points"]["200"]["heads"]
    assert list(heads) == ["linear", "cosine"]
    for head, point in heads.items():
        assert point["head"] == head and set(point["stages"]) == {"prepare", "train", "evaluate", "export"}
        assert point["evaluate"]["peak_rss_gb"] > 0 and point["export"]["bytes"] > 0
        assert set(point["train_step_ms"]) == {"ce", "batch_ce"} and point["latency_ms"]["full"] > 0
        assert set(point["summary"]["1-auprc"]) == {"non_pols", "pols", "relative_improvement"}
        assert set(point["losses"]) == {"ce", "batch_ce"}
        assert all(0 <= v["1-auprc"] <= 1 and v["train_loss"] > 0 for v in point["losses"].values())
        trained = yaml.safe_load((tmp_path / "runs" / "k200" / head / "params.yaml").read_text())
        assert trained["model"]["head"] == head and trained["grid"]["losses"] == ["ce", "batch_ce"]
    table = (out / "scaling.md").read_text()
    assert "| 200 | cosine " in table and "| 200 | linear " in table and "Goals, as measured" in table
