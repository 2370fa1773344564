"""The loss grid on Ray: one Tune trial per (loss, seed), each a Ray Train `TorchTrainer` run.

Three kinds of process, each with one job:
- the driver (`run_grid`, the `train` stage's process) owns every output: it creates the MLflow
  runs, logs each reported epoch, and when a trial ends writes `models/<run_name>/` from the
  trial's last checkpoint and rewrites `results/trials.json`, so nothing else touches the
  tracking store or the outputs, and a finished trial's results survive any later failure;
- a Tune trial and its Train workers (`slc.train.ray_trial`) train and report; a failed run becomes a
  "failed" record instead of an exception, so the other trials go on.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import time
from pathlib import Path

import torch
from ray import tune

from slc.core import tracking
from slc.core.closure import code_hashes
from slc.core.config import ModelConfig, Params, TrainConfig, run_name
from slc.core.errors import ConfigError
from slc.core.records import RecordError, TrialRecord, read_trials, write_trials
from slc.core.strict import from_dict
from slc.data.prepared import PreparedData
from slc.nn.losses import LOSS_TRAIN_KEYS, POLS_ALIGNED, head_of, train_keys_of
from slc.nn.models import build_model
from slc.nn.pretrained import fetch_pretrained
from slc.nn.trained import save_trained, trained_info
from slc.train.checkpoints import CHECKPOINT_FILE
from slc.train.ray_trial import DRIVER_CPUS, EPOCH_METRICS, connect, one_line, run_trial, worker_resources
from slc.train.training import check_trainable, loader_workers, run_of

log = logging.getLogger(__name__)
TRAIN_PARAMS = ("model", "train", "grid", "ray", "mlflow")  # the train stage's `params:` in dvc.yaml


class _Recorder(tune.Callback):
    """Runs in the driver: MLflow logging, models/ and trials.json as trials report and end."""

    def __init__(self, uri: str, data: PreparedData, models_dir: Path, results: Path, order: list[str],
                 kept: dict[str, TrialRecord]):
        self.uri, self.data, self.models_dir, self.results, self.order = uri, data, models_dir, results, order
        self.records: dict[str, TrialRecord] = dict(kept)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        spec = trial.config["trial"]
        if "status" not in result and "epoch" in result:
            tracking.log_metrics(self.uri, spec["mlflow_run_id"], {k: result[k] for k in EPOCH_METRICS},
                                 step=result["epoch"])
            log.info("%s epoch %d/%d: %s", spec["run_name"], result["epoch"], trial.config["train"]["epochs"],
                     ", ".join(f"{k} {result[k]:.4f}" for k in EPOCH_METRICS))

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._record(trial.config, trial.last_result)

    def on_trial_error(self, iteration, trials, trial, **info):
        self._record(trial.config, {"status": "failed", "error": str(trial.get_error())})

    def _record(self, config: dict, outcome: dict) -> None:
        spec = config["trial"]
        measured = {key: value for key, value in outcome.items() if key in TrialRecord.model_fields}
        record = TrialRecord(**{"status": "failed", **measured, "run_name": spec["run_name"], "loss": spec["loss"],
                                "seed": spec["seed"], "mlflow_run_id": spec["mlflow_run_id"],
                                "fingerprint": spec["fingerprint"]})
        if record.finished:
            try:
                began = time.perf_counter()
                model_dir = self._save_model(config, outcome["checkpoint_path"])
                record = record.model_copy(update={"model_dir": str(model_dir), "save_s": time.perf_counter() - began})
            except Exception as error:  # a model that cannot be saved is a failed trial, not a failed grid
                log.exception("%s: saving the model failed", spec["run_name"])
                record = record.model_copy(update={"status": "failed",
                                                   "error": f"saving the model failed: {one_line(error)}"})
        if record.head_init_s:
            tracking.log_metrics(self.uri, spec["mlflow_run_id"], {"head_init_s": record.head_init_s}, step=0)
        tracking.end_run(self.uri, spec["mlflow_run_id"], "FINISHED" if record.finished else "FAILED")
        self.records[spec["run_name"]] = record
        write_trials(self.results, [self.records[n] for n in self.order if n in self.records])
        log.info("%s: %s%s", record.run_name, record.status, f" ({record.error})" if record.error else "")

    def _save_model(self, config: dict, checkpoint_path: str) -> Path:
        """models/<run_name>/ from the trial's last checkpoint (written beside, then renamed), and
        the same model logged to the trial's MLflow run."""
        spec = config["trial"]
        run = run_of(spec["loss"], spec["seed"], from_dict(ModelConfig, config["model"], "model"),
                     from_dict(TrainConfig, config["train"], "train"))
        model = build_model(run.model, self.data.input_shape, self.data.num_classes)
        state = torch.load(Path(checkpoint_path) / CHECKPOINT_FILE, map_location="cpu", weights_only=False)
        model.load_state_dict(state["model"])
        target = self.models_dir / run.run_name
        partial = self.models_dir / f".{run.run_name}.partial"
        shutil.rmtree(partial, ignore_errors=True)
        save_trained(model, partial, trained_info(run, self.data))
        shutil.rmtree(target, ignore_errors=True)
        os.replace(partial, target)
        val = self.data.split("val")
        example = torch.stack([val[0][0], val[1][0]]).numpy()  # two images: a batch size of 1 would be traced as fixed
        tracking.log_model(self.uri, spec["mlflow_run_id"], model.eval(), example)
        return target


def _trial_name(trial) -> str:
    return trial.config["trial"]["run_name"]


def trial_fingerprint(loss: str, seed: int, sections: dict, data: PreparedData) -> str:
    """What decides a trial's model: its loss and seed, the model and the train settings its loss
    reads (not the other losses' hyper-parameters), the DDP layout, the prepared data and the
    training code: every project file a Train worker runs (slc.train.ray_trial's import closure),
    not the driver's MLflow or Tune code. An unchanged fingerprint lets a re-run keep the trial
    instead of retraining it."""
    unread = LOSS_TRAIN_KEYS - train_keys_of(loss)
    return tracking.params_hash({
        "loss": loss, "seed": seed, "model": sections["model"],
        "train": {key: value for key, value in sections["train"].items() if key not in unread},
        "ray": {key: sections["ray"][key] for key in ("num_workers", "use_gpu")},
        "data": data.meta, "code": code_hashes(run_trial.__module__)})


def _kept_trials(results: Path, models_dir: Path, fingerprints: dict[str, str]) -> dict[str, TrialRecord]:
    """Finished trials of an earlier run (say, one interrupted by Ctrl-C) whose fingerprint is
    unchanged and whose model is still on disk: these are not trained again."""
    try:
        earlier = read_trials(results)
    except RecordError:
        return {}
    return {r.run_name: r for r in earlier if r.finished and r.fingerprint == fingerprints.get(r.run_name)
            and (models_dir / r.run_name / "model.pt").is_file()}


def _prune(models_dir: Path, names: list[str]) -> None:
    """Leave in models/ only the grid's models: later stages export whatever is there."""
    for path in models_dir.glob("*") if models_dir.is_dir() else []:
        if path.is_dir() and path.name not in names:
            shutil.rmtree(path)


def run_grid(params: Params, data_root: str | Path, models_dir: str | Path, results: str | Path,
             storage: str | Path = "ray_results") -> list[TrialRecord]:
    """Train every loss x seed of `params.grid` on Ray; returns the trials.json records, in grid
    order. Trials that an earlier run finished with the same fingerprint are kept, not retrained;
    a grid interrupted before every trial ended raises `GridInterrupted`."""
    data, models_dir, results = PreparedData(data_root), Path(models_dir), Path(results)
    for loss in params.grid.losses:  # refused here, before Ray starts, not in every trial
        check_trainable(run_of(loss, params.grid.seeds[0], params.model, params.train), data)
    fetch_pretrained(params.model)
    if params.train.candidates is not None and params.ray.num_workers > 1:
        raise ConfigError(f"train.candidates (sampled training) runs one Train worker a trial, but ray.num_workers = "
                          f"{params.ray.num_workers}: DDP cannot all-reduce the head's sparse gradient; set "
                          f"ray.num_workers: 1 (run trials side by side with ray.max_concurrent_trials instead)")
    sections = {name: dataclasses.asdict(getattr(params, name)) for name in TRAIN_PARAMS}
    grid = [(loss, seed, run_name(loss, seed)) for loss in params.grid.losses for seed in params.grid.seeds]
    fingerprints = {name: trial_fingerprint(loss, seed, sections, data) for loss, seed, name in grid}
    kept = _kept_trials(results, models_dir, fingerprints)
    _prune(models_dir, [name for _, _, name in grid])
    recorder = _Recorder(tracking.tracking_uri(params.mlflow), data, models_dir, results,
                         [name for _, _, name in grid], kept)
    for name in kept:
        log.info("%s: finished earlier with the same settings, data and code; kept", name)
    if len(kept) < len(grid):
        _fit(params, data_root, sections, [(loss, seed, name, fingerprints[name]) for loss, seed, name in grid
                                           if name not in kept], data, recorder, Path(storage).resolve())
    records = [recorder.records[name] for _, _, name in grid if name in recorder.records]
    if len(records) < len(grid):
        missing = [name for _, _, name in grid if name not in recorder.records]
        raise GridInterrupted(f"the grid stopped before {', '.join(missing)} ended ({len(records)} of {len(grid)} "
                              f"trials recorded in {results}); run `dvc repro` again: finished trials are kept")
    return records


class GridInterrupted(RuntimeError):
    """Ray stopped the grid (Ctrl-C, a lost cluster) before every trial ended."""


def _fit(params: Params, data_root, sections: dict, todo: list[tuple], data: PreparedData,
         recorder: _Recorder, storage: Path) -> None:
    """One Tune run over the `todo` trials, under a new MLflow parent run."""
    resources = worker_resources(params.ray, connect(params.ray))
    loader_workers(params.train, resources["CPU"])  # too many for a worker's CPUs: refused before any trial
    uri = recorder.uri
    grid_name = f"grid-{time.strftime('%Y%m%d-%H%M%S')}"
    common = {"dataset": data.meta["dataset"], "model": sections["model"], "train": sections["train"],
              "git_commit": tracking.git_commit(), "params_hash": tracking.params_hash(sections)}
    parent = tracking.start_grid(uri, params.mlflow.experiment, grid_name,
                                 {**common, "grid": sections["grid"], "ray": sections["ray"]},
                                 {"dataset": data.meta["dataset"], "model": params.model.name})
    trials = []
    for loss, seed, name, fingerprint in todo:
        model = dataclasses.asdict(head_of(loss, params.model, params.train))
        run_id = tracking.start_trial(uri, parent, name, {"loss": loss, "seed": seed, **common, "model": model},
                                      tracking.trial_tags(loss, loss in POLS_ALIGNED, data.meta["dataset"],
                                                          params.model.name))
        trials.append({"loss": loss, "seed": seed, "run_name": name, "mlflow_run_id": run_id,
                       "fingerprint": fingerprint})
    tracking.log_prepared_data(uri, [parent, *(trial["mlflow_run_id"] for trial in trials)], data.meta, data.root)
    tuner = tune.Tuner(
        tune.with_resources(run_trial, {"CPU": DRIVER_CPUS}),
        param_space={"trial": tune.grid_search(trials), "model": sections["model"], "train": sections["train"],
                     "ray": sections["ray"], "data": str(Path(data_root).resolve()),
                     "storage": str(storage / grid_name / "train"), "worker_resources": resources},
        # reuse_actors: a trial runs in the process of one that ended, which has imported torch and the
        # project already (seconds of each short trial on a small machine)
        tune_config=tune.TuneConfig(max_concurrent_trials=params.ray.max_concurrent_trials, reuse_actors=True,
                                    trial_name_creator=_trial_name, trial_dirname_creator=_trial_name),
        run_config=tune.RunConfig(name=grid_name, storage_path=str(storage), callbacks=[recorder], verbose=0))
    try:
        tuner.fit()
    finally:
        for trial in trials:  # stopped before it ended: not left "running" in the UI forever
            if trial["run_name"] not in recorder.records:
                tracking.end_run(uri, trial["mlflow_run_id"], "KILLED")
        done = [recorder.records[t["run_name"]].status if t["run_name"] in recorder.records else None
                for t in trials]
        tracking.end_run(uri, parent, "FINISHED" if "finished" in done else
                         "FAILED" if all(done) else "KILLED")


def print_outcome(records: list[TrialRecord]) -> int:
    """Print one line per trial and every failure's reason; the exit status: 0 if any finished."""
    for r in records:
        accuracy = f"{r.val_accuracy:.4f}" if r.val_accuracy is not None else "-"
        wall = f"{r.wall_time_s:.0f} s" if r.wall_time_s is not None else "-"
        print(f"{r.run_name:<24} {r.status:<9} val accuracy {accuracy}  {wall}")
    failed = [r for r in records if not r.finished]
    for r in failed:
        print(f"FAILED {r.run_name}: {r.error}")
    if len(failed) == len(records):
        print(f"no trial finished ({len(records)} failed or none ran): see the errors above")
        return 1
    return 0
