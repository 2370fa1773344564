"""Ray's cost on a grid: the same trials through the train stage's Ray path and through a plain loop.

Through Ray is `slc.train.grid.run_grid`, exactly what `dvc repro train` runs (a local Ray, Tune
trials each fitting a Train `TorchTrainer`, a checkpoint reported every epoch, the driver saving each
model and recording the trial in MLflow). The plain loop is what a user without Ray would write:
`train_one` for each (loss, seed), one after another in this process with every CPU, loading as the
Train workers do, each model saved as the stage saves it, no MLflow. Each trial's record says where its seconds went
(`TrialRecord.startup_s`, `spawn_s`, `train_s`, `report_s`, `save_s`). A benchmark, not a test: nothing
asserts a speed.
"""
from __future__ import annotations

import dataclasses
import os
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from slc.core import tracking
from slc.core.config import Params
from slc.core.records import TrialRecord
from slc.data.preparation import prepare
from slc.data.prepared import PreparedData
from slc.nn.trained import save_trained, trained_info
from slc.train.training import run_of, train_one

# The small-data grid, as a new user tried it: scikit-learn's digits as an npz, 40 epochs of batch 64
DIGITS = {"epochs": 40, "batch_size": 64, "test_fraction": 0.2}
GOALS = {"default": 1.3, "digits": 3.0}  # Ray's wall time over the plain loop's, at most


def write_digits(folder: Path, seed: int) -> Path:
    """scikit-learn's bundled 8x8 digits as the `npz` dataset kind reads it (uint8, 80% train)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = np.round(digits.images * 255 / 16).astype(np.uint8)
    x_train, x_test, y_train, y_test = train_test_split(images, digits.target, test_size=DIGITS["test_fraction"],
                                                        random_state=seed)
    folder.mkdir(parents=True, exist_ok=True)
    np.savez(folder / "digits.npz", x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)
    return folder / "digits.npz"


def digits_grid(params: Params, folder: Path) -> tuple[Params, Path]:
    """`params` with the digits data and training settings, and the data prepared in `folder`."""
    data = dataclasses.replace(params.data, name="npz", npz_path=str(write_digits(folder, params.data.seed)))
    prepare(data, folder / "prepared")
    train = dataclasses.replace(params.train, epochs=DIGITS["epochs"], batch_size=DIGITS["batch_size"])
    return dataclasses.replace(params, data=data, train=train), folder / "prepared"


def plain_loop(params: Params, data_root: Path, workdir: Path) -> dict:
    """Every trial of the grid through `train_one`, one after another with all this process's CPUs as
    torch threads, loading in-process as the grid's Train workers do (`train.loader_workers: null` with
    one CPU): a loader process beside training read Fashion-MNIST 5x slower (metrics/dataloading.json)
    and, started every epoch, made a 40-epoch digits trial 14 s instead of 3."""
    data, cpus = PreparedData(data_root), len(os.sched_getaffinity(0))
    train = dataclasses.replace(params.train, loader_workers=0)
    threads = torch.get_num_threads()
    torch.set_num_threads(cpus)
    trials, started = {}, time.perf_counter()
    try:
        for loss in params.grid.losses:
            for seed in params.grid.seeds:
                run, began = run_of(loss, seed, params.model, train), time.perf_counter()
                result = train_one(run, data, workdir / "checkpoints" / run.run_name, cpus=cpus, progress=False)
                saving = time.perf_counter()
                save_trained(result.model, workdir / "models" / run.run_name, trained_info(run, data))
                trials[run.run_name] = {"status": result.status, "wall_s": time.perf_counter() - began,
                                        "train_s": result.wall_s, "save_s": time.perf_counter() - saving}
    finally:
        torch.set_num_threads(threads)
    return {"wall_s": time.perf_counter() - started, "cpus": cpus, "trials": trials}


def through_ray(params: Params, data_root: Path, workdir: Path) -> dict:
    """The grid through the train stage's own `run_grid` on a new local Ray, its MLflow store in
    `workdir` (created before the clock starts: a user's store exists already)."""
    import ray

    from slc.train.grid import run_grid

    uri = f"sqlite:///{workdir / 'mlflow.db'}"
    params = dataclasses.replace(params, mlflow=dataclasses.replace(params.mlflow, tracking_uri=uri))
    tracking.experiment_id(uri, params.mlflow.experiment)
    started = time.perf_counter()
    try:
        records = run_grid(params, data_root, workdir / "models", workdir / "trials.json", workdir / "ray_results")
    finally:
        ray.shutdown()
    return {"wall_s": time.perf_counter() - started, "concurrent_trials": params.ray.max_concurrent_trials,
            "trials": {r.run_name: phases(r) for r in records}}


def phases(record: TrialRecord) -> dict:
    """Where one Ray trial's wall time went; `teardown_s` is what is left after its worker returned."""
    figures = {"status": record.status, "wall_s": record.wall_time_s, "startup_s": record.startup_s,
               "spawn_s": record.spawn_s, "train_s": record.train_s, "report_s": record.report_s, "save_s": record.save_s}
    if None not in (record.wall_time_s, record.startup_s, record.train_s):
        figures["teardown_s"] = record.wall_time_s - record.startup_s - record.train_s
    return figures


def compare(name: str, params: Params, data_root: Path, workdir: Path) -> dict:
    """One grid through both, the plain loop first; the ratio is Ray's wall time over the loop's."""
    plain = plain_loop(params, data_root, workdir / "plain")
    ray_run = through_ray(params, data_root, workdir / "ray")
    data = PreparedData(data_root)
    return {"settings": {"dataset": data.meta["dataset"], "train_images": len(data.split("train")),
                         "model": params.model.name, "epochs": params.train.epochs,
                         "batch_size": params.train.batch_size, "losses": params.grid.losses,
                         "seeds": params.grid.seeds, "max_concurrent_trials": params.ray.max_concurrent_trials,
                         "num_workers": params.ray.num_workers},
            "plain": plain, "ray": ray_run, "ratio": ray_run["wall_s"] / plain["wall_s"],
            "goal": GOALS.get(name)}


def summary(grid: dict) -> dict:
    """Per-trial medians of each phase, Ray's and the loop's, for the report."""
    def median(trials: dict, key: str) -> float | None:
        values = [t[key] for t in trials.values() if t.get(key) is not None]
        return statistics.median(values) if values else None

    ray_trials, plain_trials = grid["ray"]["trials"], grid["plain"]["trials"]
    out = {f"ray_{key}": median(ray_trials, key)
           for key in ("wall_s", "startup_s", "spawn_s", "train_s", "report_s", "teardown_s", "save_s")}
    out |= {f"plain_{key}": median(plain_trials, key) for key in ("wall_s", "train_s", "save_s")}
    return out


