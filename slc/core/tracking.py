"""The MLflow conventions of the project, in one place.

One experiment (`mlflow.experiment`); per `train` run of the grid one parent run, and under it one
child run per trial (loss x seed), named `<loss>-s<seed>` like its `models/` directory. Child runs
carry the tags a person filters on in the UI (`tags.pols_aligned = 'true'`, `dataset`, `model`),
and their params say what produced them (every train hyper-parameter, the git commit, a hash of
the stage's params). Later stages (evaluate, export, benchmark) log into the same child runs, by
the run id that `results/trials.json` records, through `resumed_run`.

Runs are created and closed with `MlflowClient` and explicit run ids rather than MLflow's global
"active run", because the code that logs (Ray trials, Train workers) lives in other processes
than the code that creates the runs.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from slc.core.closure import ROOT
from slc.core.config import MlflowConfig

TRACKING_URI_ENV = "MLFLOW_TRACKING_URI"
SQLITE = "sqlite:///"
PARENT_RUN_TAG = "mlflow.parentRunId"  # what the MLflow UI nests child runs by
# MLflow 3 sorts experiments into GenAI apps and model training; ours trains models. The tag is the
# experiment's kind for MLflow's clients, but MLflow 3.17's UI opens an experiment on its sidebar toggle
# (GenAI, the default, or Model training) instead, so links to the runs carry RUNS_VIEW (`runs_url`).
EXPERIMENT_KIND_TAG, MODEL_TRAINING = "mlflow.experimentKind", "custom_model_development"
RUNS_VIEW = "workflowType=machine_learning"
MAX_PARAM_CHARS = 6000  # MLflow's limit on a param value


def tracking_uri(cfg: MlflowConfig, root: Path = ROOT) -> str:
    """`MLFLOW_TRACKING_URI`, else `mlflow.tracking_uri`, else `sqlite:///<root>/mlflow.db`.

    A relative sqlite or file path is made absolute against `root`, because Ray runs trials and
    workers in other working directories, where a relative path would open another database.
    """
    uri = os.environ.get(TRACKING_URI_ENV) or cfg.tracking_uri or f"{SQLITE}mlflow.db"
    if uri.startswith(SQLITE):
        return SQLITE + str((root / uri[len(SQLITE):]).resolve())
    if "://" not in uri and not uri.startswith("file:"):
        return str((root / uri).resolve())
    return uri


def artifact_location(uri: str) -> str | None:
    """Artifacts of a sqlite store sit beside the database in `mlruns/` (not in the cwd)."""
    if uri.startswith(SQLITE):
        return (Path(uri[len(SQLITE):]).parent / "mlruns").resolve().as_uri()
    return None  # a server or a file store has its own default


def experiment_id(uri: str, name: str) -> str:
    """The experiment's id, creating it (with artifacts beside a sqlite db) on first use. It is tagged
    as model training every time, so that an experiment an earlier version created is too."""
    client = mlflow_client(uri)
    found = client.get_experiment_by_name(name)
    experiment = (found.experiment_id if found is not None
                  else client.create_experiment(name, artifact_location=artifact_location(uri)))
    client.set_experiment_tag(experiment, EXPERIMENT_KIND_TAG, MODEL_TRAINING)
    return experiment


def runs_url(server: str, experiment: str) -> str:
    """The UI page of the experiment's runs table, in the UI's model training view."""
    return f"{server.rstrip('/')}/#/experiments/{experiment}/runs?{RUNS_VIEW}"


def git_commit(root: Path = ROOT) -> str:
    """HEAD's commit, with `-dirty` when tracked files differ from it; `unknown` outside git."""
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True,
                              check=True).stdout.strip()
    try:
        commit = git("rev-parse", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return commit + ("-dirty" if dirty else "")


def params_hash(sections: dict) -> str:
    """md5 of the stage's params sections as canonical JSON: equal hashes, equal settings
    (the same values `dvc.lock` records for the stage)."""
    return hashlib.md5(json.dumps(sections, sort_keys=True).encode()).hexdigest()


def flatten(params: dict, prefix: str = "") -> dict[str, str]:
    """Nested dicts as MLflow params: `{"train": {"lr": 0.1}}` -> `{"train.lr": "0.1"}`."""
    flat: dict[str, str] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = json.dumps(value) if isinstance(value, (list, bool, type(None))) else str(value)
    return flat


def start_grid(uri: str, experiment: str, name: str, params: dict, tags: dict[str, str]) -> str:
    """Create the parent run of one grid; returns its id."""
    client = mlflow_client(uri)
    run = client.create_run(experiment_id(uri, experiment), run_name=name, tags=tags)
    write_run_log(uri, run.info.run_id, RunLog(params=params))
    return run.info.run_id


def start_trial(uri: str, parent_id: str, name: str, params: dict, tags: dict[str, str]) -> str:
    """Create one trial's run under the grid's parent run; returns its id."""
    client = mlflow_client(uri)
    parent = client.get_run(parent_id)
    run = client.create_run(parent.info.experiment_id, run_name=name,
                            tags={**tags, PARENT_RUN_TAG: parent_id})
    write_run_log(uri, run.info.run_id, RunLog(params=params))
    return run.info.run_id


def trial_tags(loss: str, pols_aligned: bool, dataset: str, model: str) -> dict[str, str]:
    return {"loss": loss, "pols_aligned": str(pols_aligned).lower(), "dataset": dataset, "model": model}


def log_prepared_data(uri: str, run_ids: list[str], meta: dict, root: Path) -> None:
    """The prepared data (`prepare`'s meta.json and its directory) as the runs' training input: the
    runs table's Dataset column. Its digest hashes meta.json, which holds every prepared file's
    sha256, so runs trained on the same data show the same digest and different data a different one."""
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.data.sources import LocalArtifactDatasetSource
    from mlflow.entities import Dataset, DatasetInput, InputTag
    from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

    digest = hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()[:8]  # 8 hex digits, as MLflow's
    dataset = MetaDataset(LocalArtifactDatasetSource(str(Path(root).resolve())), name=meta["dataset"], digest=digest)
    training = DatasetInput(Dataset(**dataset.to_dict()), tags=[InputTag(MLFLOW_DATASET_CONTEXT, "training")])
    client = mlflow_client(uri)
    for run_id in run_ids:
        client.log_inputs(run_id, datasets=[training])


def log_metrics(uri: str, run_id: str, metrics: dict[str, float], step: int) -> None:
    """Log numbers to a run from any process (a Ray worker, say) without making it active."""
    write_run_log(uri, run_id, RunLog(metrics=[(key, value, step) for key, value in metrics.items()]))


@dataclass(frozen=True)
class RunLog:
    """What a stage adds to one MLflow run: how each stage's results look in the UI, said as data."""
    metrics: list[tuple[str, float, int]] = field(default_factory=list)  # (key, value, step)
    params: dict = field(default_factory=dict)  # nested, flattened to `a.b` keys
    documents: dict[str, object] = field(default_factory=dict)  # artifact path -> JSON value
    files: list[tuple[Path, str | None]] = field(default_factory=list)  # (file, artifact folder)
    onnx_models: list[tuple[str, Path, dict]] = field(default_factory=list)  # (model name, file, input example)


def write_run_log(uri: str, run_id: str, entry: RunLog) -> None:
    from mlflow.entities import Metric, Param
    from mlflow.utils.time import get_current_time_millis

    client, now = mlflow_client(uri), get_current_time_millis()
    client.log_batch(run_id, metrics=[Metric(key, float(value), now, step) for key, value, step in entry.metrics],
                     params=[Param(key, value[:MAX_PARAM_CHARS]) for key, value in flatten(entry.params).items()])
    for path, document in entry.documents.items():
        client.log_dict(run_id, document, path)
    for file, folder in entry.files:
        client.log_artifact(run_id, str(file), folder)
    for name, file, example in entry.onnx_models:
        log_onnx(uri, run_id, name, file, example)


def log_to_trials(uri: str, trials: list, logs: dict[str, RunLog], stage: str) -> None:
    """Each run's log into its trial's MLflow run (the train stage's). MLflow mirrors the DVC outputs
    for the UI: a run that cannot be reached is a warning, never a reason to lose the stage's outputs."""
    import warnings

    for run, run_id in trial_runs(uri, trials, logs).items():
        try:
            write_run_log(uri, run_id, logs[run])
        except Exception as error:  # a missing run, an unreachable server: report, keep going
            warnings.warn(f"could not log the {stage} of {run} to MLflow run {run_id} at {uri}: {error}", stacklevel=2)


def log_stage_run(uri: str, experiment: str, stage: str, entry: RunLog) -> str:
    """A stage's own run (named and tagged after the stage, not a trial's), logged and closed; its id."""
    run = mlflow_client(uri).create_run(experiment_id(uri, experiment), run_name=stage,
                                        tags={"stage": stage, "git_commit": git_commit()})
    write_run_log(uri, run.info.run_id, entry)
    end_run(uri, run.info.run_id, "FINISHED")
    return run.info.run_id


def end_run(uri: str, run_id: str, status: str) -> None:
    """Close a run as FINISHED, FAILED or KILLED (stopped before it ended)."""
    mlflow_client(uri).set_terminated(run_id, status)


def trial_runs(uri: str, trials: list, names) -> dict[str, str]:
    """Run ids, by run name, of the `trials` (trials.json's TrialRecords) named in `names` that the store
    at `uri` still has. The others get one warning that says why and how to recover, since a later
    stage logs into the train stage's runs and must not fail because the store was lost."""
    import warnings

    from mlflow.exceptions import MlflowException

    client, found, lost = mlflow_client(uri), {}, []
    for trial in trials:
        if trial.run_name in names and trial.mlflow_run_id:
            try:
                client.get_run(trial.mlflow_run_id)
                found[trial.run_name] = trial.mlflow_run_id
            except MlflowException:
                lost.append(trial.run_name)
    if lost:
        warnings.warn(f"the MLflow store {uri} has no run for {', '.join(lost)} (was mlflow.db deleted, or "
                      f"MLFLOW_TRACKING_URI changed?): this stage's files are written but not logged there; "
                      f"`dvc repro --force train` trains and records them anew", stacklevel=2)
    return found


@contextlib.contextmanager
def resumed_run(run_id: str, uri: str) -> Iterator:
    """Make an existing run active for `mlflow.log_*` calls (e.g. `mlflow.pytorch.log_model`),
    leaving its status alone: resuming a finished trial run must not mark it running again."""
    import mlflow

    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)
    try:
        client = mlflow_client(uri)
        status = client.get_run(run_id).info.status
        with mlflow.start_run(run_id=run_id, log_system_metrics=False) as run:
            yield run
        if status != "RUNNING":
            client.set_terminated(run_id, status)
    finally:  # MLflow's setting is process-wide: leave it as it was found
        mlflow.set_tracking_uri(previous)


def log_model(uri: str, run_id: str, model, example) -> None:
    """The trained network as the run's MLflow model "model". `example` (a float32 batch
    (N, C, H, W), N > 1) is what MLflow 3 traces the model with (its default `pt2` format, which loads
    without this project's code) and infers the signature from. Requirements are given, not
    inferred: inference reloads the model in a subprocess, which takes seconds per trial."""
    import mlflow
    import torch

    with resumed_run(run_id, uri):
        mlflow.pytorch.log_model(model, name="model", input_example=example,
                                 pip_requirements=[f"torch=={torch.__version__.split('+')[0]}"])


def log_onnx(uri: str, run_id: str, name: str, path: Path, example: dict) -> None:
    """An exported ONNX file as the run's MLflow model `name` (flavour `mlflow.onnx`), with `example`
    (input name -> array) as input example and the signature of what onnxruntime answers for it.
    Its weights are stored as external data beside it, as in the export."""
    import mlflow
    import onnx
    import onnxruntime as ort
    from mlflow.models import infer_signature

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (output,) = session.run(None, example)
    with resumed_run(run_id, uri):
        mlflow.onnx.log_model(onnx.load(str(path)), name=name, input_example=example,
                              signature=infer_signature(example, output),
                              onnx_execution_providers=["CPUExecutionProvider"],
                              pip_requirements=[f"onnxruntime=={ort.__version__}", f"onnx=={onnx.__version__}"])


def mlflow_client(uri: str):
    """The MlflowClient of the store at `uri`: every stage's one way into MLflow."""
    from mlflow import MlflowClient  # imported late: mlflow takes seconds to import

    return MlflowClient(tracking_uri=uri)
