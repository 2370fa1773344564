"""One training run in plain PyTorch: seeded, resumable, and failing softly.

`train_one` knows nothing of Ray or MLflow. Whoever runs it (a test, a script, a Ray Train
worker) passes hooks instead: `on_epoch` receives each epoch's metrics and checkpoint directory
(to report them), `wrap_model` / `wrap_loader` may wrap the network in DistributedDataParallel and
shard the loader (e.g. `ray.train.torch.prepare_model` / `prepare_data_loader`), and a checkpoint
directory found in `workdir` (or given as `resume_from`) is resumed from.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import math
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from slc.config import ConfigError, ModelConfig, TrainConfig
from slc.data import PreparedData
from slc.losses import make_loss
from slc.metrics import slc_metrics
from slc.models import build_model, predict_logits

log = logging.getLogger(__name__)

CHECKPOINT_FILE = "checkpoint.pt"

OPTIMIZERS: dict[str, Callable[..., torch.optim.Optimizer]] = {
    "adam": torch.optim.Adam,
    "adamw": torch.optim.AdamW,
    "sgd": functools.partial(torch.optim.SGD, momentum=0.9, nesterov=True),
}


@dataclass(frozen=True)
class RunConfig:
    """What makes one trial: the loss, the seed, and the model and train settings."""
    loss: str
    seed: int
    model: ModelConfig
    train: TrainConfig

    @property
    def run_name(self) -> str:
        return f"{self.loss}-s{self.seed}"


@dataclass(frozen=True)
class EpochReport:
    epoch: int  # 1-based count of completed epochs
    train_loss: float
    val_accuracy: float
    val_mean_auprc: float
    seconds: float
    samples_per_s: float
    checkpoint_dir: str | None  # this epoch's checkpoint (None on ranks other than 0)


@dataclass
class TrainResult:
    run_name: str
    status: str  # "finished" or "failed"
    epochs_completed: int
    history: list[EpochReport]
    error: str | None
    wall_s: float
    samples_per_s: float
    model: nn.Module = field(repr=False)


class NonFiniteLoss(ArithmeticError):
    pass


def make_optimizer(params, cfg: TrainConfig) -> torch.optim.Optimizer:
    if cfg.optimizer not in OPTIMIZERS:
        raise ConfigError(f"unknown train.optimizer {cfg.optimizer!r}; known: {', '.join(OPTIMIZERS)}")
    return OPTIMIZERS[cfg.optimizer](params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def _is_main_process() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def _mean_across_processes(total: float, count: int, device) -> float:
    """The epoch's mean loss over every process's batches (just the local mean without DDP)."""
    if dist.is_initialized():
        both = torch.tensor([total, float(count)], dtype=torch.float64, device=device)
        dist.all_reduce(both)
        total, count = both.tolist()
    return total / count


def _finite_everywhere(loss: torch.Tensor) -> bool:
    """Whether the loss is finite on every process: all of them must stop together, or DDP hangs."""
    finite = torch.isfinite(loss.detach()).to(torch.int32)
    if dist.is_initialized():
        dist.all_reduce(finite, op=dist.ReduceOp.MIN)
    return bool(finite.item())


def _latest_checkpoint(workdir: Path) -> Path | None:
    done = sorted(workdir.glob(f"epoch-*/{CHECKPOINT_FILE}"))
    return done[-1].parent if done else None


def _checkpoint_dir(workdir: Path, epoch: int) -> Path:
    return workdir / f"epoch-{epoch:04d}"


def _save_checkpoint(target: Path, state: dict) -> None:
    """target/checkpoint.pt, written atomically; the other epochs' directories are removed after."""
    target.mkdir(parents=True, exist_ok=True)
    torch.save(state, target / f"{CHECKPOINT_FILE}.tmp")
    os.replace(target / f"{CHECKPOINT_FILE}.tmp", target / CHECKPOINT_FILE)
    for old in target.parent.glob("epoch-*"):
        if old != target:
            shutil.rmtree(old, ignore_errors=True)


def _fingerprint(config: RunConfig) -> dict:
    """What a checkpoint must agree on to be resumed; not `epochs`, so a finished run can be extended."""
    return dataclasses.asdict(dataclasses.replace(config, train=dataclasses.replace(config.train, epochs=1)))


def _load_checkpoint(directory: Path, config: RunConfig) -> dict:
    state = torch.load(directory / CHECKPOINT_FILE, map_location="cpu", weights_only=False)
    if state["config"] != _fingerprint(config):
        raise ValueError(f"{directory} holds a checkpoint of another configuration ({state['config']}), "
                         f"not {_fingerprint(config)}: delete it or train in another directory")
    return state


def train_one(config: RunConfig, data: PreparedData, workdir: str | Path, *,
              on_epoch: Callable[[EpochReport], None] | None = None,
              wrap_model: Callable[[nn.Module], nn.Module] = lambda model: model,
              wrap_loader: Callable[[DataLoader], DataLoader] = lambda loader: loader,
              resume_from: str | Path | None = None,
              device: str | torch.device = "cpu",
              progress: bool = True) -> TrainResult:
    """Train `config.model` with `config.loss` on data's train split; validate after every epoch.

    Seeding: the model is initialised from `config.seed`; one generator seeded from it shuffles
    the data and draws nce's noise classes; both RNG states go into each checkpoint, so a resumed
    run continues exactly as if it had not stopped. A non-finite loss ends the run with status
    "failed" and the epoch, step and value in `error`, keeping the last good checkpoint, instead
    of raising and taking a whole grid of runs down with it.
    """
    started = time.perf_counter()
    workdir = Path(workdir)
    cfg = config.train
    torch.manual_seed(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    model = build_model(config.model, data.input_shape, data.num_classes)
    train_split, val_split = data.split("train"), data.split("val")
    class_counts = np.bincount(train_split.labels, minlength=data.num_classes)
    loss_fn = make_loss(config.loss, cfg, class_counts, generator)

    resume = Path(resume_from) if resume_from is not None else _latest_checkpoint(workdir)
    state = _load_checkpoint(resume, config) if resume is not None else None
    if state is not None:
        model.load_state_dict(state["model"])
        generator.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
    model = wrap_model(model.to(device))
    optimizer = make_optimizer(model.parameters(), cfg)
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
    history = [EpochReport(**row) for row in state["history"]] if state is not None else []
    loader = wrap_loader(DataLoader(train_split, batch_size=cfg.batch_size, shuffle=True, generator=generator,
                                    drop_last=len(train_split) > cfg.batch_size))
    error, samples, train_seconds = None, 0, 0.0
    for epoch in range(len(history) + 1, cfg.epochs + 1):
        if hasattr(loader.sampler, "set_epoch"):
            loader.sampler.set_epoch(epoch)  # DistributedSampler: a new shuffle every epoch
        try:
            epoch_loss, epoch_samples, seconds = _train_epoch(model, loader, loss_fn, optimizer, device,
                                                              f"{config.run_name} epoch {epoch}/{cfg.epochs}",
                                                              progress and _is_main_process())
        except NonFiniteLoss as failure:
            error = f"epoch {epoch}: {failure}"
            break
        samples, train_seconds = samples + epoch_samples, train_seconds + seconds
        val = slc_metrics(predict_logits(model, val_split, device=device), val_split.labels)
        main = _is_main_process()
        checkpoint_dir = _checkpoint_dir(workdir, epoch) if main else None
        report = EpochReport(epoch, epoch_loss, val["accuracy"], val["mean_auprc"], seconds,
                             epoch_samples / seconds, str(checkpoint_dir) if main else None)
        history.append(report)
        if main:
            _save_checkpoint(checkpoint_dir, {
                "config": _fingerprint(config), "model": getattr(model, "module", model).state_dict(),
                "optimizer": optimizer.state_dict(), "generator": generator.get_state(),
                "torch_rng": torch.get_rng_state(), "history": [dataclasses.asdict(r) for r in history]})
        if progress and main:
            log.info("%s epoch %d/%d: train loss %.4f, val accuracy %.4f, val mean AUPRC %.4f (%.1f s)",
                     config.run_name, epoch, cfg.epochs, epoch_loss, report.val_accuracy, report.val_mean_auprc,
                     seconds)
        if on_epoch is not None:
            on_epoch(report)
    return TrainResult(config.run_name, "failed" if error else "finished", len(history), history, error,
                       time.perf_counter() - started, samples / train_seconds if train_seconds else math.nan,
                       getattr(model, "module", model))


def _train_epoch(model, loader, loss_fn, optimizer, device, description: str,
                 progress: bool) -> tuple[float, int, float]:
    """One pass over the loader: (mean loss across processes, local samples, seconds)."""
    model.train()
    start = time.perf_counter()
    total, count, samples = 0.0, 0, 0
    bar = tqdm(loader, desc=description, disable=None if progress else True, leave=False)
    for step, (images, labels) in enumerate(bar, start=1):
        images, labels = images.to(device), labels.to(device)
        loss = loss_fn(model(images), labels)
        if not _finite_everywhere(loss):
            raise NonFiniteLoss(f"loss became {loss.item()} at step {step} of {len(loader)}")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total, count, samples = total + loss.item(), count + 1, samples + len(labels)
        if step % 50 == 0:
            bar.set_postfix(loss=f"{total / count:.4f}")
    return _mean_across_processes(total, count, device), samples, time.perf_counter() - start


def trained_info(config: RunConfig, data: PreparedData) -> dict:
    """The config.json of a trained model (see `slc.models.save_trained`)."""
    return {"run_name": config.run_name, "loss": config.loss, "seed": config.seed,
            "model": dataclasses.asdict(config.model), "train": dataclasses.asdict(config.train),
            "dataset": data.meta["dataset"], "input_shape": list(data.input_shape),
            "num_classes": data.num_classes, "class_names": data.class_names,
            "normalisation": data.meta["normalisation"]}
