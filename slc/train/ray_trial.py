"""One grid trial on Ray: a Tune trial that fits a Train `TorchTrainer`, and the Train workers under it.

- a Tune trial (`run_trial`, DRIVER_CPUS) builds and fits one `TorchTrainer`; a failed run becomes
  a "failed" outcome instead of an exception, so the other trials go on;
- the Train workers (`_train_worker`, data parallel) run the plain `train_one`, sharded by a
  `DistributedSampler`, reporting each epoch with its checkpoint so a restarted worker group
  resumes from the last epoch (`ray.max_failures`).
What a trial returns is read by the driver (`slc.train.grid`), which alone writes the outputs.
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
import tempfile
import time
import traceback

import psutil
import ray
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, DistributedSampler

from slc.core.config import ModelConfig, RayConfig, TrainConfig
from slc.core.errors import ConfigError
from slc.core.strict import from_dict
from slc.data.prepared import PreparedData
from slc.train.training import EpochReport, run_of, train_one

DRIVER_CPUS = 0.01  # a Tune trial only waits on its TorchTrainer; Ray refuses 0
EPOCH_METRICS = ("train_loss", "val_accuracy", "val_mean_auprc")
# Ray Train's worker logging setup puts the root logger at INFO, so its "Reporting training result ..."
# line (logged under a file path, not `ray.train`, which LoggingConfig filters) fills the log every
# epoch; without that setup it is dropped (as are the ray-train-*-worker-*.log files in Ray's session dir)
QUIET_TRAIN_WORKERS = {"RAY_TRAIN_ENABLE_WORKER_STRUCTURED_LOGGING": "0"}
# On a local cluster no node is ever drained, so Ray Train's preemption watcher has nothing to watch;
# killed with each finished run, it left an `E ... core_worker.cc ... PreemptionWatcher` line per trial
LOCAL_CLUSTER_ENV = {"RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}
# Ray Train's controller collects reports when it polls the workers, every 2 s by default, and a worker's
# report waits while the one before it is uncollected: an epoch shorter than that waited out the rest
# (digits, 40 epochs of 0.1 s: 188 s a trial). Polled every 0.2 s, a report waits at most that long.
TRAIN_CONTROLLER_ENV = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2"}
# Ray's worker processes log from WARNING up, as the driver does ("Setting up process group" once a trial)
QUIET_WORKERS = ray.LoggingConfig(log_level="WARNING")


def connect(cfg: RayConfig) -> dict[str, float]:
    """Join Ray and return the cluster's resources: the session this process already has, else
    the cluster at `RAY_ADDRESS` / `ray.address`, else a new local one with `ray.num_cpus` CPUs."""
    if not ray.is_initialized():
        address = os.environ.get("RAY_ADDRESS") or cfg.address
        if address:
            # Ray's own lines say which cluster, and are the cluster owner's to tune
            ray.init(address=address, runtime_env={"env_vars": TRAIN_CONTROLLER_ENV})
        else:
            # "local": a new instance even when a stale `ray start` left its address behind
            ray.init(address="local", num_cpus=cfg.num_cpus or os.cpu_count(), logging_level=logging.WARNING,
                     logging_config=QUIET_WORKERS,
                     runtime_env={"env_vars": {**LOCAL_CLUSTER_ENV, **TRAIN_CONTROLLER_ENV}})
    return ray.cluster_resources()


def worker_resources(cfg: RayConfig, cluster: dict[str, float]) -> dict[str, float]:
    """Each Train worker's resources, so that `max_concurrent_trials` trials fit the cluster.

    A trial holds DRIVER_CPUS plus its workers; if the concurrent trials ask for more than the
    cluster has, Ray would wait forever ("worker group startup timed out"), so that is refused here.
    """
    cpus, gpus = cluster.get("CPU", 0.0), cluster.get("GPU", 0.0)
    concurrent_workers = cfg.max_concurrent_trials * cfg.num_workers
    per_worker = cfg.cpus_per_worker
    if per_worker is None:
        per_worker = math.floor((cpus - cfg.max_concurrent_trials * DRIVER_CPUS) / concurrent_workers * 100) / 100
    needed = cfg.max_concurrent_trials * DRIVER_CPUS + concurrent_workers * per_worker
    if per_worker <= 0 or needed > cpus + 1e-9:
        raise ConfigError(
            f"ray: {cfg.max_concurrent_trials} concurrent trials x {cfg.num_workers} workers x "
            f"{per_worker} CPUs (+ {DRIVER_CPUS} per trial) need {needed:.2f} CPUs but the Ray cluster "
            f"has {cpus:g}: lower ray.max_concurrent_trials, ray.num_workers or ray.cpus_per_worker "
            f"(null shares the CPUs out)")
    if cfg.use_gpu and concurrent_workers > gpus:
        raise ConfigError(f"ray.use_gpu: {concurrent_workers} concurrent workers need one GPU each but the "
                          f"Ray cluster has {gpus:g}: lower ray.max_concurrent_trials or ray.num_workers, "
                          f"or set ray.use_gpu: false")
    return {"CPU": per_worker, **({"GPU": 1.0} if cfg.use_gpu else {})}


def compute_threads(cpus: float) -> int:
    """torch's threads for a worker holding `cpus`. Ray sets OMP_NUM_THREADS to their floor, so the
    1.99 CPUs a lone trial's worker gets beside its driver's 0.01 ran on one of two cores."""
    return max(1, round(cpus))


def _shard(loader: DataLoader, seed: int, samplers: list) -> DataLoader:
    """This rank's disjoint share of the training set. Each rank keeps `train.batch_size`, since
    the batch losses (batch_ce, batch_max_margin) are defined over the batch one process sees."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return loader
    sampler = DistributedSampler(loader.dataset, shuffle=True, seed=seed, drop_last=True)
    samplers.append(sampler)
    return DataLoader(loader.dataset, batch_size=loader.batch_size, sampler=sampler, drop_last=loader.drop_last,
                      num_workers=loader.num_workers, pin_memory=loader.pin_memory, generator=loader.generator,
                      prefetch_factor=loader.prefetch_factor)


def _train_worker(config: dict) -> dict | None:
    """One Train worker: `train_one` on this rank's shard, resumed from Ray's checkpoint if any. Says
    how long it took to start (since its trial began; until its process existed, then its own start),
    to train, and how much of that it spent in Ray's report: where a trial's seconds go besides
    training (`pipeline.ray_overhead`)."""
    startup_s = time.time() - config["started_at"]  # one machine's clock on a local cluster
    # 0 where Ray gave the worker a process it had started before the trial
    spawn_s = max(0.0, psutil.Process().create_time() - config["started_at"])
    from ray.train import Checkpoint, get_checkpoint, report
    from ray.train.torch import get_device, prepare_model

    # Ray's worker logging passes ray.train's INFO lines on ("Checkpoint successfully created at: ..."
    # every epoch of every trial); the driver logs each epoch itself
    logging.getLogger("ray.train").setLevel(logging.WARNING)
    torch.set_num_threads(compute_threads(config["cpus"]))

    run = run_of(config["loss"], config["seed"], from_dict(ModelConfig, config["model"], "model"),
                 from_dict(TrainConfig, config["train"], "train"))
    data, checkpoint, samplers, trained, reporting = PreparedData(config["data"]), get_checkpoint(), [], [], []

    def on_epoch(epoch: EpochReport) -> None:
        trained.append(epoch.epoch)
        saved = Checkpoint.from_directory(epoch.checkpoint_dir) if epoch.checkpoint_dir else None
        began = time.perf_counter()
        report({"epoch": epoch.epoch, **{key: getattr(epoch, key) for key in EPOCH_METRICS}}, checkpoint=saved)
        reporting.append(time.perf_counter() - began)

    with tempfile.TemporaryDirectory() as workdir, \
            (checkpoint.as_directory() if checkpoint else contextlib.nullcontext()) as resume:
        result = train_one(run, data, workdir, on_epoch=on_epoch,
                           wrap_model=prepare_model, wrap_loader=lambda loader: _shard(loader, run.seed, samplers),
                           resume_from=resume, device=get_device(), cpus=config["cpus"], progress=False)
    shard = sorted(samplers[0]) if samplers else list(range(len(data.split("train"))))
    shards, speeds = [shard], [result.samples_per_s]
    if dist.is_initialized() and dist.get_world_size() > 1:
        shards, speeds = [None] * dist.get_world_size(), [None] * dist.get_world_size()
        dist.all_gather_object(shards, shard)
        dist.all_gather_object(speeds, result.samples_per_s)
    if dist.is_initialized() and dist.get_rank() != 0:
        return None
    last = result.history[-1] if result.history else None
    return {"status": result.status, "error": result.error, "epochs": result.epochs_completed,
            **{key: getattr(last, key) if last else None for key in EPOCH_METRICS},
            "samples_per_s": _finite(sum(speeds)), "head_init_s": result.head_init_s,
            "startup_s": startup_s, "spawn_s": spawn_s, "train_s": result.wall_s, "report_s": sum(reporting),
            "resumed_from_epoch": result.epochs_completed - len(trained),
            "world_size": len(shards), "shard_sizes": [len(s) for s in shards],
            "distinct_samples": len(set().union(*map(set, shards)))}


def run_trial(config: dict) -> dict:
    """A Tune trial: fit one TorchTrainer; any failure is returned as a failed record."""
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, ScalingConfig
    from ray.train import RunConfig as TrainRunConfig
    from ray.train.torch import TorchConfig, TorchTrainer
    from ray.train.v2.api.exceptions import TrainingFailedError
    from ray.tune.integration.ray_train import TuneReportCallback

    trial, ray_cfg = config["trial"], from_dict(RayConfig, config["ray"], "ray")
    started = time.perf_counter()
    trainer = TorchTrainer(
        _train_worker, train_loop_config={**trial, **{k: config[k] for k in ("model", "train", "data")},
                                          "cpus": config["worker_resources"]["CPU"],
                                          "started_at": time.time()},
        scaling_config=ScalingConfig(num_workers=ray_cfg.num_workers, use_gpu=ray_cfg.use_gpu,
                                     resources_per_worker=config["worker_resources"]),
        torch_config=TorchConfig(backend="nccl" if ray_cfg.use_gpu else "gloo"),
        run_config=TrainRunConfig(name=trial["run_name"], storage_path=config["storage"],
                                  failure_config=FailureConfig(max_failures=ray_cfg.max_failures),
                                  checkpoint_config=CheckpointConfig(num_to_keep=1),
                                  callbacks=[TuneReportCallback()],
                                  # the driver logs each epoch; Ray's per-report lines would bury it
                                  logging_config=LoggingConfig(log_level="WARNING"),
                                  worker_runtime_env={"env_vars": QUIET_TRAIN_WORKERS}))
    try:
        result = trainer.fit()
        summary, checkpoint = result.return_value, result.checkpoint
    except TrainingFailedError as error:
        summary, checkpoint = {"status": "failed", "error": one_line(error)}, None
    return {**summary, "wall_time_s": time.perf_counter() - started,
            "checkpoint_path": checkpoint.path if checkpoint else None}


def one_line(error: BaseException) -> str:
    return traceback.format_exception_only(error)[-1].strip()


def _finite(value: float) -> float | None:
    return value if value is not None and math.isfinite(value) else None
