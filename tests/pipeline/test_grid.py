"""The loss grid on real Ray: DDP shards, MLflow structure, outputs, an existing cluster, faults."""
import dataclasses
import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import mlflow
import numpy as np
import psutil
import pytest
import ray
import torch
from mlflow import MlflowClient

from slc.core.errors import ConfigError
from slc.core.records import TrialRecord, read_trials, write_trials
from slc.data.preparation import prepare
from slc.data.prepared import PreparedData
from slc.nn import losses
from slc.nn.trained import load_trained
from slc.train import grid, ray_trial
from tests.conftest import write_params


def test_workers_share_the_cpus_left_after_the_trial_drivers(params):
    two_trials = dataclasses.replace(params.ray, num_workers=1, cpus_per_worker=None, max_concurrent_trials=2)
    assert ray_trial.worker_resources(two_trials, {"CPU": 2.0}) == {"CPU": 0.99}
    ddp = dataclasses.replace(params.ray, num_workers=2, cpus_per_worker=None, max_concurrent_trials=2)
    assert ray_trial.worker_resources(ddp, {"CPU": 2.0}) == {"CPU": 0.49}


def test_a_lone_trial_computes_on_every_core_its_worker_holds(params):
    """Ray would give the lone worker's 1.99 CPUs one thread (their floor): one of two cores idle."""
    lone = dataclasses.replace(params.ray, num_workers=1, cpus_per_worker=None, max_concurrent_trials=1)
    assert ray_trial.compute_threads(ray_trial.worker_resources(lone, {"CPU": 2.0})["CPU"]) == 2
    assert [ray_trial.compute_threads(cpus) for cpus in (0.49, 0.99, 3.98)] == [1, 1, 4]


def test_trials_that_cannot_fit_the_cluster_fail_before_starting(params):
    greedy = dataclasses.replace(params.ray, num_workers=2, cpus_per_worker=1.0, max_concurrent_trials=1)
    with pytest.raises(ConfigError, match=r"need 2.01 CPUs but the Ray cluster has 2.*lower ray"):
        ray_trial.worker_resources(greedy, {"CPU": 2.0})
    with pytest.raises(ConfigError, match="GPU"):
        ray_trial.worker_resources(dataclasses.replace(params.ray, use_gpu=True), {"CPU": 8.0})


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, params) -> Path:
    """2,000 real Fashion-MNIST images (1,800 train, 200 val)."""
    out = tmp_path_factory.mktemp("fashion") / "prepared"
    prepare(dataclasses.replace(params.data, name="fashion_mnist", train_limit=2000), out)
    return out


@pytest.fixture
def ray_session(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    yield
    ray.shutdown()


def run(params, prepared, tmp_path):
    return grid.run_grid(params, prepared, tmp_path / "models", tmp_path / "results" / "trials.json",
                         tmp_path / "ray_results")


@pytest.mark.slow
def test_grid_trains_each_loss_with_two_ddp_ranks_and_records_it(prepared, tmp_path, ray_session, tiny_params):
    params = tiny_params(num_workers=2, max_concurrent_trials=1)
    params = dataclasses.replace(params, model=dataclasses.replace(params.model, head="cosine"),
                                 train=dataclasses.replace(params.train, head_init="class_mean"))
    records = run(params, prepared, tmp_path)

    assert read_trials(tmp_path / "results" / "trials.json") == records
    assert [(r.run_name, r.status, r.epochs) for r in records] == [("ce-s0", "finished", 1),
                                                                           ("bce-s0", "finished", 1)]
    for r in records:  # two ranks, each on its own half of the 1,800 training images
        assert r.world_size == 2 and r.shard_sizes == [900, 900] and r.distinct_samples == 1800
        assert r.error is None and r.wall_time_s > 0 and r.samples_per_s > 0 and r.head_init_s > 0
        # where its seconds went (pipeline.ray_overhead): each phase measured, none beyond the trial's wall
        assert 0 < r.startup_s and 0 < r.report_s < r.train_s and r.startup_s + r.train_s < r.wall_time_s
        assert r.save_s > 0
        model, info = load_trained(r.model_dir)
        assert info["run_name"] == r.run_name and info["loss"] == r.loss

    client = MlflowClient(params.mlflow.tracking_uri)
    experiment = client.get_experiment_by_name(params.mlflow.experiment)
    (parent,) = client.search_runs([experiment.experiment_id], "tags.mlflow.runName LIKE 'grid-%'")
    children = client.search_runs([experiment.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert {c.info.run_id for c in children} == {r.mlflow_run_id for r in records}
    assert parent.info.status == "FINISHED"
    aligned = client.search_runs([experiment.experiment_id], "tags.pols_aligned = 'true'")
    assert [run.info.run_name for run in aligned] == ["bce-s0"]
    for child in children:
        assert child.info.status == "FINISHED"
        assert child.data.params["train.epochs"] == "1" and child.data.params["model.hidden"] == "32"
        assert {"git_commit", "params_hash", "loss", "seed", "dataset"} <= child.data.params.keys()
        assert [m.step for m in client.get_metric_history(child.info.run_id, "val_accuracy")] == [1]
        assert {"train_loss", "val_mean_auprc", "head_init_s"} <= child.data.metrics.keys()
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"  # opens on runs, not GenAI
    inputs = [[(d.dataset.name, d.dataset.digest) for d in run.inputs.dataset_inputs] for run in [parent, *children]]
    assert inputs == [inputs[0]] * 3 and inputs[0][0][0] == "fashion_mnist"  # the prepared data, every run's one input

    ce = records[0]
    images = torch.stack([PreparedData(prepared).split("test")[i][0] for i in range(3)])
    mlflow.set_tracking_uri(params.mlflow.tracking_uri)  # the grid leaves MLflow's process-wide setting alone
    logged = mlflow.pytorch.load_model(f"runs:/{ce.mlflow_run_id}/model")
    model, _ = load_trained(ce.model_dir)
    with torch.no_grad():
        np.testing.assert_allclose(logged(images).numpy(), model(images).numpy(), atol=1e-5)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, process: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and process.poll() is None:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.5)
    raise RuntimeError(f"`ray start --head` did not listen on port {port} (exit status {process.poll()})")


def forget_cluster(port: int) -> None:
    """`ray start` leaves its address in /tmp/ray/ray_current_cluster after it stops; a later
    `ray.init()` (and Ray's state API inside any later cluster) would try to reach it."""
    current = Path("/tmp/ray/ray_current_cluster")
    if current.exists() and current.read_text().strip().endswith(f":{port}"):
        current.unlink()


@pytest.mark.slow
def test_stage_runs_on_an_existing_cluster_named_by_ray_address(prepared, tmp_path, tiny_params):
    write_params(tiny_params(losses=("batch_ce",), num_workers=1, max_concurrent_trials=1), tmp_path / "params.yaml")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    env["RAY_AUTH_MODE"] = "disabled"  # a throwaway local cluster: no token to hand to the stage
    ray_bin = Path(sys.executable).with_name("ray")
    head = subprocess.Popen([str(ray_bin), "start", "--head", "--block", "--node-ip-address=127.0.0.1",
                             f"--port={port}", "--num-cpus=2", f"--dashboard-port={free_port()}"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_port(port, head)
        stage = subprocess.run(
            [sys.executable, "-m", "pipeline.train", "--params", str(tmp_path / "params.yaml"), "--data", str(prepared),
             "--models", str(tmp_path / "models"), "--results", str(tmp_path / "trials.json"),
             "--ray-results", str(tmp_path / "ray_results")],
            env={**env, "RAY_ADDRESS": f"127.0.0.1:{port}"}, capture_output=True, text=True, timeout=600)
    finally:
        head.terminate()
        head.wait(timeout=60)
        forget_cluster(port)
    assert stage.returncode == 0, stage.stdout[-3000:] + stage.stderr[-3000:]
    assert "Connecting to existing Ray cluster at address: " in stage.stderr  # not a new local one
    assert f":{port}..." in stage.stderr
    assert "Checkpoint successfully created" not in stage.stdout + stage.stderr  # one line an epoch, not Ray's too
    (record,) = json.loads((tmp_path / "trials.json").read_text())
    assert record["status"] == "finished" and (tmp_path / "models" / "batch_ce-s0" / "model.pt").exists()


class KillTrainWorkersAfterSecondEpoch(logging.Handler):
    """On the driver's log line for ce-s0's second epoch (or a later one, should no worker be
    found at first) -- so Ray has surely registered the first epoch's checkpoint -- SIGKILL the
    Train worker processes of this test's Ray. It runs inside the Tune callback that logs the
    line, so the kill lands on the event itself, with no polling."""

    def __init__(self):
        super().__init__(level=logging.INFO)
        self.killed: list[int] = []

    def emit(self, record: logging.LogRecord) -> None:
        epoch = re.match(r"ce-s0 epoch (\d+)/", record.getMessage())
        if self.killed or not epoch or int(epoch[1]) < 2:
            return
        for worker in psutil.Process().children(recursive=True):
            try:  # Ray starts and reaps processes all the while: one may be gone by now
                if "RayTrainWorker" in " ".join(worker.cmdline() or [worker.name()]):
                    worker.kill()
                    self.killed.append(worker.pid)
            except psutil.Error:
                continue


EPOCHS = 20  # enough that the kill lands while ce-s0 is still training


@pytest.mark.slow
def test_killed_worker_resumes_from_its_checkpoint_and_a_nan_loss_fails_alone(prepared, tmp_path, ray_session,
                                                                              monkeypatch, caplog, tiny_params):
    def nan(logits, targets):
        return logits.sum() * float("nan")

    def register_nan_loss():  # run in every Ray worker process; nested, so Ray ships it by value
        from slc.nn import losses as registry
        registry.LOSSES["nan"] = nan

    monkeypatch.setitem(losses.LOSSES, "nan", nan)
    ray.init(num_cpus=2, runtime_env={"worker_process_setup_hook": register_nan_loss})
    params = tiny_params(losses=("ce", "nan"), epochs=EPOCHS, num_workers=1, max_concurrent_trials=1,
                         max_failures=1)
    caplog.set_level(logging.INFO, logger=grid.log.name)  # the driver's per-epoch lines
    killer = KillTrainWorkersAfterSecondEpoch()
    grid.log.addHandler(killer)
    try:
        ce, nan = run(params, prepared, tmp_path)
    finally:
        grid.log.removeHandler(killer)
    assert killer.killed, f"no Train worker was found to kill before ce-s0 ended: {ce}"
    assert ce.status == "finished" and ce.epochs == EPOCHS
    assert 1 <= ce.resumed_from_epoch < EPOCHS, f"the restarted worker did not resume: {ce}"
    assert nan.status == "failed" and "nan" in nan.error and nan.model_dir is None
    assert grid.print_outcome([ce, nan]) == 0
    assert grid.print_outcome([nan]) == 1
    status = MlflowClient(params.mlflow.tracking_uri).get_run(nan.mlflow_run_id).info.status
    assert status == "FAILED"


# ---------- re-runs: finished trials are kept ----------

def fingerprints(params, data, loss="max_margin", seed=0):
    sections = {name: dataclasses.asdict(getattr(params, name)) for name in grid.TRAIN_PARAMS}
    return grid.trial_fingerprint(loss, seed, sections, data)


def test_a_trials_fingerprint_follows_only_what_decides_its_model(prepared, tiny_params):
    params, data = tiny_params(), PreparedData(prepared)
    base = fingerprints(params, data)
    def changed(section, loss="max_margin", **values):
        return fingerprints(dataclasses.replace(params, **{section: dataclasses.replace(
            getattr(params, section), **values)}), data, loss)
    assert changed("train", margin=3.0) != base  # max_margin reads the margin ...
    assert changed("train", loss="ce", margin=3.0) == fingerprints(params, data, "ce")  # ... ce does not
    assert changed("train", self_norm_alpha=0.9) == base and changed("train", lr=0.1) != base
    assert changed("ray", max_concurrent_trials=7) == base and changed("ray", num_workers=2) != base
    assert changed("mlflow", experiment="other") == base
    assert fingerprints(params, data, seed=1) != base


def test_finished_trials_with_the_same_fingerprint_are_kept_without_starting_ray(prepared, tmp_path, ray_session,
                                                                                  tiny_params):
    params, data = tiny_params(losses=("ce", "bce")), PreparedData(prepared)
    results, models = tmp_path / "results" / "trials.json", tmp_path / "models"
    earlier = []
    for loss in ("ce", "bce", "nce"):
        (models / f"{loss}-s0").mkdir(parents=True)
        (models / f"{loss}-s0" / "model.pt").write_bytes(b"weights")
        earlier.append(TrialRecord(run_name=f"{loss}-s0", loss=loss, seed=0, status="finished",
                                   fingerprint=fingerprints(params, data, loss)))
    results.parent.mkdir()
    write_trials(results, earlier)
    assert run(params, prepared, tmp_path) == earlier[:2]
    assert not ray.is_initialized(), "nothing to train, yet Ray was started"
    assert sorted(p.name for p in models.iterdir()) == ["bce-s0", "ce-s0"], "a model outside the grid was left"


def read_lines(stream, lines: list[str], wanted: re.Pattern, seen: threading.Event) -> None:
    """Collect a process's output line by line (so its pipe never fills); set `seen` on the first
    line that `wanted` matches, or at the end of the output, whichever comes first."""
    for line in stream:
        lines.append(line)
        if wanted.match(line):
            seen.set()
    seen.set()


@pytest.mark.slow
def test_ctrl_c_during_train_keeps_finished_trials_and_the_rerun_trains_only_the_rest(prepared, tmp_path,
                                                                                        tiny_params):
    # one trial at a time: Ctrl-C comes as soon as ce-s0 has ended, while bce-s0 starts or trains
    params = tiny_params(losses=("ce", "bce"), epochs=4, num_workers=1, max_concurrent_trials=1)
    write_params(params, tmp_path / "params.yaml")
    results = tmp_path / "results" / "trials.json"
    command = [sys.executable, "-m", "pipeline.train", "--params", str(tmp_path / "params.yaml"),
               "--data", str(prepared), "--models", str(tmp_path / "models"), "--results", str(results),
               "--ray-results", str(tmp_path / "ray_results")]
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    stage = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines, ce_ended = [], threading.Event()
    ce_recorded = re.compile(r"ce-s0: (finished|failed)\b")  # logged once trials.json holds ce-s0's record
    reader = threading.Thread(target=read_lines, args=(stage.stdout, lines, ce_recorded, ce_ended), daemon=True)
    reader.start()
    try:
        ce_ended.wait(timeout=600)
        stage.send_signal(signal.SIGINT)  # what Ctrl-C sends to `dvc repro` and its stage
        stage.wait(timeout=300)
        reader.join(timeout=60)  # the rest of the output, up to the stage's exit
    finally:
        stage.kill()
    output = "".join(lines)
    assert stage.returncode != 0, output[-3000:]
    assert "train interrupted" in output and "`dvc repro` trains only the others" in output, output[-3000:]
    (first,) = json.loads(results.read_text())
    assert first["run_name"] == "ce-s0" and first["status"] == "finished"
    load_trained(tmp_path / "models" / "ce-s0")  # complete, not half-written
    kept_model = (tmp_path / "models" / "ce-s0" / "model.pt").stat().st_mtime_ns
    client = MlflowClient(params.mlflow.tracking_uri)
    experiment = client.get_experiment_by_name(params.mlflow.experiment).experiment_id
    (stopped,) = client.search_runs([experiment], "tags.mlflow.runName = 'bce-s0'")
    assert stopped.info.status == "KILLED"

    again = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "ce-s0: finished earlier with the same settings, data and code; kept" in again.stdout
    records = json.loads(results.read_text())
    assert [(r["run_name"], r["status"]) for r in records] == [("ce-s0", "finished"), ("bce-s0", "finished")]
    assert records[0] == first  # the kept trial's record (and MLflow run) is the first run's
    assert (tmp_path / "models" / "ce-s0" / "model.pt").stat().st_mtime_ns == kept_model
    load_trained(tmp_path / "models" / "bce-s0")


def test_sampled_training_on_several_ddp_workers_is_refused_before_ray_starts(prepared, tmp_path, tiny_params):
    params = tiny_params()
    params = dataclasses.replace(params, train=dataclasses.replace(params.train, candidates=5),
                                 ray=dataclasses.replace(params.ray, num_workers=2))
    with pytest.raises(ConfigError, match="set ray.num_workers: 1"):
        grid.run_grid(params, prepared, tmp_path / "models", tmp_path / "trials.json")
    assert not (tmp_path / "trials.json").exists() and not ray.is_initialized()


@pytest.mark.slow
def test_more_loader_workers_than_a_train_worker_has_cpus_are_refused_before_any_trial(prepared, tmp_path, ray_session,
                                                                                      tiny_params):
    params = tiny_params()  # a local Ray of 2 CPUs, 2 trials at a time: 0.99 CPUs each
    params = dataclasses.replace(params, train=dataclasses.replace(params.train, loader_workers=2))
    with pytest.raises(ConfigError, match=r"train.loader_workers = 2 is more than the 1 CPU\(s\) a Train worker has"):
        run(params, prepared, tmp_path)
    assert not (tmp_path / "results" / "trials.json").exists() and not (tmp_path / "models").exists()
