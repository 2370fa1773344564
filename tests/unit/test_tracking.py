import re

import mlflow
import pytest
from mlflow import MlflowClient

from slc.core import tracking
from slc.core.config import MlflowConfig, run_name
from slc.core.records import TrialRecord


def test_run_name_is_loss_and_seed():
    assert run_name("batch_ce", 3) == "batch_ce-s3"


def test_tracking_uri_defaults_to_an_absolute_sqlite_db_at_the_root(tmp_path, monkeypatch):
    monkeypatch.delenv(tracking.TRACKING_URI_ENV, raising=False)
    assert tracking.tracking_uri(MlflowConfig("slc", None), tmp_path) == f"sqlite:///{tmp_path}/mlflow.db"


def test_tracking_uri_makes_relative_paths_absolute(tmp_path, monkeypatch):
    monkeypatch.delenv(tracking.TRACKING_URI_ENV, raising=False)
    assert tracking.tracking_uri(MlflowConfig("slc", "sqlite:///db/x.db"), tmp_path) == f"sqlite:///{tmp_path}/db/x.db"
    assert tracking.tracking_uri(MlflowConfig("slc", "mlruns"), tmp_path) == str(tmp_path / "mlruns")
    assert tracking.tracking_uri(MlflowConfig("slc", "http://host:5000"), tmp_path) == "http://host:5000"


def test_environment_tracking_uri_wins_over_params(tmp_path, monkeypatch):
    monkeypatch.setenv(tracking.TRACKING_URI_ENV, "http://tracking:5000")
    assert tracking.tracking_uri(MlflowConfig("slc", "sqlite:///mine.db"), tmp_path) == "http://tracking:5000"


def test_params_hash_changes_with_any_value_and_not_with_key_order():
    a = {"train": {"lr": 0.1, "epochs": 2}, "grid": {"seeds": [0]}}
    b = {"grid": {"seeds": [0]}, "train": {"epochs": 2, "lr": 0.1}}
    assert tracking.params_hash(a) == tracking.params_hash(b)
    assert tracking.params_hash(a) != tracking.params_hash({**a, "grid": {"seeds": [1]}})


def test_flatten_names_nested_params_by_dotted_path():
    assert tracking.flatten({"train": {"lr": 0.1, "nce_noise": "uniform"}, "seeds": [0, 1], "x": None}) == {
        "train.lr": "0.1", "train.nce_noise": "uniform", "seeds": "[0, 1]", "x": "null"}


def test_git_commit_names_the_checked_out_commit():
    assert re.fullmatch(r"[0-9a-f]{40}(-dirty)?", tracking.git_commit())


def test_git_commit_outside_a_repository_is_unknown(tmp_path):
    assert tracking.git_commit(tmp_path) == "unknown"


@pytest.fixture
def uri(tmp_path):
    return f"sqlite:///{tmp_path}/mlflow.db"


def test_trial_runs_are_children_of_the_grid_run_with_filterable_tags(uri):
    parent = tracking.start_grid(uri, "slc", "grid", {"grid": {"losses": ["ce", "bce"]}}, {"dataset": "d"})
    ce = tracking.start_trial(uri, parent, "ce-s0", {"loss": "ce", "train": {"lr": 0.1}},
                              tracking.trial_tags("ce", False, "d", "mlp"))
    bce = tracking.start_trial(uri, parent, "bce-s0", {"loss": "bce"}, tracking.trial_tags("bce", True, "d", "mlp"))
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("slc")
    children = client.search_runs([experiment.experiment_id], f"tags.mlflow.parentRunId = '{parent}'")
    assert {run.info.run_id for run in children} == {ce, bce}
    aligned = client.search_runs([experiment.experiment_id], "tags.pols_aligned = 'true'")
    assert [run.info.run_name for run in aligned] == ["bce-s0"]
    assert client.get_run(ce).data.params["train.lr"] == "0.1"
    assert experiment.artifact_location.endswith("/mlruns")


def test_metrics_are_logged_per_step_and_a_finished_run_stays_finished(uri):
    run = tracking.start_grid(uri, "slc", "grid", {}, {})
    tracking.log_metrics(uri, run, {"val_accuracy": 0.5}, step=1)
    tracking.log_metrics(uri, run, {"val_accuracy": 0.7}, step=2)
    tracking.end_run(uri, run, "FINISHED")
    with tracking.resumed_run(run, uri):
        mlflow.log_metric("test_accuracy", 0.6)
    client = MlflowClient(uri)
    history = client.get_metric_history(run, "val_accuracy")
    assert [(m.step, m.value) for m in history] == [(1, 0.5), (2, 0.7)]
    assert client.get_run(run).data.metrics["test_accuracy"] == 0.6
    assert client.get_run(run).info.status == "FINISHED"


def test_runs_lost_with_a_deleted_store_are_one_warning_that_says_how_to_recover(tmp_path, uri):
    kept = tracking.start_grid(uri, "slc", "grid", {}, {})
    trials = [TrialRecord(run_name=name, loss=name[:-3], seed=0, status="finished", mlflow_run_id=run_id)
              for name, run_id in (("ce-s0", kept), ("bce-s0", kept), ("nce-s0", None))]
    assert tracking.trial_runs(uri, trials, {"ce-s0", "nce-s0"}) == {"ce-s0": kept}

    emptied = f"sqlite:///{tmp_path}/new.db"  # what the next stage finds after `rm mlflow.db`: an empty store
    with pytest.warns(UserWarning, match=r"has no run for ce-s0, bce-s0 \(was mlflow.db deleted.*"
                                         r"`dvc repro --force train`"):
        assert tracking.trial_runs(emptied, trials, {"ce-s0", "bce-s0"}) == {}


def test_the_experiment_is_tagged_as_model_training_when_created_and_when_found_untagged(uri):
    client = MlflowClient(uri)
    older = client.create_experiment("older")  # as an earlier version of the pipeline left it
    assert tracking.experiment_id(uri, "older") == older
    for name in ("older", "slc"):
        tags = client.get_experiment(tracking.experiment_id(uri, name)).tags
        assert tags[tracking.EXPERIMENT_KIND_TAG] == "custom_model_development"


def test_the_ui_link_opens_the_runs_in_the_model_training_view():
    assert tracking.runs_url("http://127.0.0.1:5000/", "7") == (
        "http://127.0.0.1:5000/#/experiments/7/runs?workflowType=machine_learning")


META = {"dataset": "fashion_mnist", "splits": {"train": 9, "val": 1, "test": 2}, "checksums": {"train_images.npy": "ab"}}


def test_the_prepared_data_is_each_runs_training_input_with_a_digest_of_its_meta(uri, tmp_path):
    parent = tracking.start_grid(uri, "slc", "grid", {}, {})
    child = tracking.start_trial(uri, parent, "ce-s0", {}, {})
    other_data = tracking.start_grid(uri, "slc", "grid", {}, {})
    tracking.log_prepared_data(uri, [parent, child], META, tmp_path / "prepared")
    tracking.log_prepared_data(uri, [other_data], {**META, "checksums": {"train_images.npy": "cd"}}, tmp_path / "prepared")

    client = MlflowClient(uri)
    inputs = {run: client.get_run(run).inputs.dataset_inputs for run in (parent, child, other_data)}
    assert all(len(found) == 1 for found in inputs.values())
    first = inputs[child][0]
    assert first.dataset.name == "fashion_mnist" and re.fullmatch(r"[0-9a-f]{8}", first.dataset.digest)
    assert {(tag.key, tag.value) for tag in first.tags} == {("mlflow.data.context", "training")}
    assert mlflow.data.get_source(first).uri == str(tmp_path / "prepared")
    assert inputs[parent][0].dataset.digest == first.dataset.digest  # the same data, the same digest
    assert inputs[other_data][0].dataset.digest != first.dataset.digest  # one file changed, another digest
