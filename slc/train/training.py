"""One training run in plain PyTorch: seeded, resumable, and failing softly.

`train_one` knows nothing of Ray or MLflow. Whoever runs it (a test, a script, a Ray Train
worker) passes hooks instead: `on_epoch` receives each epoch's metrics and checkpoint directory
(to report them), `wrap_model` / `wrap_loader` may wrap the network in DistributedDataParallel and
shard the loader (e.g. `ray.train.torch.prepare_model` / `prepare_data_loader`), and a checkpoint
directory found in `workdir` (or given as `resume_from`) is resumed from.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import psutil
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm  # not tqdm.auto, whose asyncio variant opens a second (unused) DataLoader iterator

from slc.core.config import ModelConfig, RunConfig, TrainConfig
from slc.core.errors import ConfigError
from slc.core.sampling import class_sample
from slc.data.prepared import PreparedData, PreparedSplit, check_augmentation
from slc.evaluate.scoring import Head, score_classes
from slc.nn.candidates import draw_candidates
from slc.nn.losses import NO_SAMPLED_FORM, head_of, make_loss, start_head_bias, train_keys_of
from slc.nn.models import build_model, cosine_scale, predict_features
from slc.nn.pretrained import load_pretrained
from slc.train import checkpoints
from slc.train.head_init import class_mean_rows
from slc.train.optim import make_optimizers, make_schedulers, optimize

log = logging.getLogger(__name__)

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
    head_init_s: float = 0.0  # seconds train.head_init took before the first step (0: the layer's own start)


class NonFiniteLoss(ArithmeticError):
    pass


def loader_workers(cfg: TrainConfig, cpus: float) -> int:
    """The loader processes of a run with `cpus` CPUs: train.loader_workers, or (null) one per CPU
    but the one training runs on. More workers than CPUs would only take time from training."""
    whole = max(1, round(cpus))
    if cfg.loader_workers is None:
        return whole - 1
    if cfg.loader_workers > whole:
        raise ConfigError(f"train.loader_workers = {cfg.loader_workers} is more than the {whole} CPU(s) a Train worker "
                          f"has: use at most {whole}, null (one per CPU less one), or give each worker more CPUs "
                          f"(ray.cpus_per_worker, fewer ray.max_concurrent_trials)")
    return cfg.loader_workers


def train_loader(split: PreparedSplit, batch_size: int, generator: torch.Generator, workers: int,
                 device: str | torch.device) -> DataLoader:
    """Shuffled training batches. With workers, reading, decoding and augmenting run in other processes
    while the model trains; pinned memory lets a GPU copy a batch while it computes. The workers are
    started anew each epoch (not persistent): they are seeded from `generator` then, so a run resumed
    from a checkpoint augments exactly as one that did not stop."""
    return DataLoader(split, batch_size=batch_size, shuffle=True, generator=generator,
                      drop_last=len(split) > batch_size, num_workers=workers,
                      pin_memory=torch.device(device).type == "cuda", prefetch_factor=4 if workers else None)


def run_of(loss: str, seed: int, model: ModelConfig, train: TrainConfig) -> RunConfig:
    """The trial of `loss` and `seed`, with the model its loss trains (`slc.nn.losses.head_of`)."""
    return RunConfig(loss, seed, head_of(loss, model, train), train)


def check_trainable(config: RunConfig, data: PreparedData) -> None:
    """Refuse, before any work, settings that cannot train: a candidate count above k, a loss that
    has no sampled form for them, an augmentation the data cannot take, an unknown schedule, a head
    or a step's logits that will not fit in memory."""
    cfg, k = config.train, data.num_classes
    check_augmentation(cfg.augment, data.meta["dataset"], data.input_shape)
    if cfg.candidates is not None:
        if cfg.candidates > k:
            raise ConfigError(f"train.candidates = {cfg.candidates} is above the {k} classes of {data.root}: "
                              f"use at most {k} (= every class), or null for the exact losses")
        if config.loss == "nce" and cfg.nce_noise != "uniform":
            raise ConfigError("sampled nce draws its noise from the step's uniform candidates: set "
                              "train.nce_noise: uniform, or train.candidates: null for frequency noise")
        if config.loss in NO_SAMPLED_FORM:
            raise ConfigError(f"{config.loss} has no sampled form (its sum over k-subsets of classes has no log-q "
                              f"correction): set train.candidates: null, or leave {config.loss} out of grid.losses")
        if cfg.weight_decay > 0:
            raise ConfigError("sampled training updates head rows lazily with a sparse optimizer, which has no "
                              "weight decay: set train.weight_decay: 0, or train.candidates: null")
    if config.model.head == "cosine" and "margin" in train_keys_of(config.loss):
        scale = cosine_scale(config.model, k)
        if cfg.margin >= 2 * scale:
            raise ConfigError(f"{config.loss} on model.head: cosine: an example's logits lie within 2 x scale = "
                              f"{2 * scale:.3g} of each other (beside the biases), so train.margin = {cfg.margin:g} "
                              f"could be met only by the biases: lower train.margin below {2 * scale:.3g}, or raise "
                              f"model.scale")
    width = build_model(config.model, data.input_shape, 1).head.in_features
    copies = 4 if cfg.optimizer != "sgd" else 3  # weights, gradient, and Adam's two moments or momentum
    head_bytes = copies * 4 * (width + 1) * k
    scored = k if cfg.candidates is None else min(k, cfg.batch_size + cfg.candidates)
    step_bytes = 3 * 4 * cfg.batch_size * scored  # logits, their gradient, one loss temporary
    available = psutil.virtual_memory().available
    if head_bytes + step_bytes > available:
        hint = "set train.candidates (e.g. 1024) to score a sample of classes per step" if cfg.candidates is None \
            else "use fewer classes or a narrower model"
        raise ConfigError(f"{config.run_name}: a {width}-wide head over {k:,} classes needs ~{head_bytes / 2**30:.1f} GiB "
                          f"and each step's logits ~{step_bytes / 2**30:.1f} GiB, but {available / 2**30:.1f} GiB "
                          f"is available: {hint}")


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


def train_one(config: RunConfig, data: PreparedData, workdir: str | Path, *,
              on_epoch: Callable[[EpochReport], None] | None = None,
              wrap_model: Callable[[nn.Module], nn.Module] = lambda model: model,
              wrap_loader: Callable[[DataLoader], DataLoader] = lambda loader: loader,
              resume_from: str | Path | None = None,
              device: str | torch.device = "cpu",
              cpus: float = 1.0,
              progress: bool = True) -> TrainResult:
    """Train `config.model` with `config.loss` on data's train split; validate after every epoch.

    Seeding: the model is initialised from `config.seed`; one generator seeded from it shuffles
    the data and draws nce's noise classes; both RNG states go into each checkpoint, so a resumed
    run continues exactly as if it had not stopped. A non-finite loss ends the run with status
    "failed" and the epoch, step and value in `error`, keeping the last good checkpoint, instead
    of raising and taking a whole grid of runs down with it. `cpus` is what the run may use (a Ray
    Train worker's share): `train.loader_workers: null` follows it.
    """
    started = time.perf_counter()
    workdir = Path(workdir)
    cfg = config.train
    check_trainable(config, data)
    torch.manual_seed(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    model = build_model(config.model, data.input_shape, data.num_classes)
    workers = loader_workers(cfg, cpus)
    train_split, val_split = data.split("train", cfg.augment), data.split("val")
    class_counts = np.bincount(train_split.labels, minlength=data.num_classes)
    loss_fn = make_loss(config.loss, cfg, class_counts, generator)

    resume = Path(resume_from) if resume_from is not None else checkpoints.latest(workdir)
    state = checkpoints.load(resume, config) if resume is not None else None
    if state is not None:
        model.load_state_dict(state["model"])
        generator.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
    elif config.model.weights is not None:
        load_pretrained(model, config.model, data.meta["normalisation"])
    model.to(device)
    head_init_s = state.get("head_init_s", 0.0) if state is not None else \
        class_mean_rows(model, data.split("train"), device, workers, cfg.head_init_per_class) \
        if cfg.head_init == "class_mean" else 0.0
    start_head_bias(model.head, config.loss, cfg, data.num_classes, fresh=state is None)
    optimizers = make_optimizers(model, cfg)
    model = wrap_model(model)
    loader = wrap_loader(train_loader(train_split, cfg.batch_size, generator, workers, device))
    schedulers = make_schedulers(optimizers, cfg, len(loader))
    if state is not None:  # after the schedulers, which would otherwise reset the restored learning rates
        for optimizer, saved in zip(optimizers, state["optimizers"]):
            optimizer.load_state_dict(saved)
        for scheduler, saved in zip(schedulers, state["schedulers"]):
            scheduler.load_state_dict(saved)
    step = make_step(cfg.candidates, data.num_classes, generator)
    val_classes = class_sample(data.num_classes, cfg.val_classes)
    history = [EpochReport(**row) for row in state["history"]] if state is not None else []
    error, samples, train_seconds = None, 0, 0.0
    for epoch in range(len(history) + 1, cfg.epochs + 1):
        if hasattr(loader.sampler, "set_epoch"):
            loader.sampler.set_epoch(epoch)  # DistributedSampler: a new shuffle every epoch
        try:
            epoch_loss, epoch_samples, seconds = _train_epoch(model, loader, step, loss_fn, optimizers, schedulers,
                                                              device, cfg.amp,
                                                              f"{config.run_name} epoch {epoch}/{cfg.epochs}",
                                                              progress and _is_main_process())
        except NonFiniteLoss as failure:
            error = f"epoch {epoch}: {failure}"
            break
        samples, train_seconds = samples + epoch_samples, train_seconds + seconds
        net = getattr(model, "module", model)
        val = score_classes(predict_features(net, val_split, device=device, workers=workers), val_split.labels,
                            Head.of(net),
                            val_classes, recalls=(), hist_bins=1)
        main = _is_main_process()
        saved_to = checkpoints.folder(workdir, epoch) if main else None
        report = EpochReport(epoch, epoch_loss, val.accuracy, val.means["mean_auprc"], seconds,
                             epoch_samples / seconds, str(saved_to) if main else None)
        history.append(report)
        if main:
            checkpoints.save(saved_to, {
                "config": checkpoints.resume_key(config), "model": getattr(model, "module", model).state_dict(),
                "optimizers": [o.state_dict() for o in optimizers],
                "schedulers": [s.state_dict() for s in schedulers], "generator": generator.get_state(),
                "torch_rng": torch.get_rng_state(), "history": [dataclasses.asdict(r) for r in history],
                "head_init_s": head_init_s})
        if progress and main:
            log.info("%s epoch %d/%d: train loss %.4f, val accuracy %.4f, val mean AUPRC %.4f (%.1f s)",
                     config.run_name, epoch, cfg.epochs, epoch_loss, report.val_accuracy, report.val_mean_auprc,
                     seconds)
        if on_epoch is not None:
            on_epoch(report)
    return TrainResult(config.run_name, "failed" if error else "finished", len(history), history, error,
                       time.perf_counter() - started, samples / train_seconds if train_seconds else math.nan,
                       getattr(model, "module", model), head_init_s)


Step = Callable[[nn.Module, torch.Tensor, torch.Tensor, Callable[..., torch.Tensor]], torch.Tensor]


def _exact_step(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, loss_fn) -> torch.Tensor:
    return loss_fn(model(images).float(), labels)  # float: the losses stay in float32 under autocast


def make_step(candidates: int | None, num_classes: int, generator: torch.Generator) -> Step:
    """The loss of one batch: over all k classes, or (`candidates` set) sampled as in slc.nn.candidates."""
    return _exact_step if candidates is None else _sampled_step(candidates, num_classes, generator)


def _sampled_step(candidates: int, num_classes: int, generator: torch.Generator) -> Step:
    """A step on the batch's classes plus `candidates` negatives (slc.nn.candidates), from `generator`."""
    def step(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, loss_fn) -> torch.Tensor:
        drawn = draw_candidates(labels, num_classes, candidates, generator)
        return loss_fn(model(images, drawn.classes).float(), drawn.targets, candidates=drawn)
    return step


def _train_epoch(model, loader, step: Step, loss_fn, optimizers, schedulers, device, amp: bool, description: str,
                 progress: bool) -> tuple[float, int, float]:
    """One pass over the loader: (mean loss across processes, local samples, seconds). `amp` runs the
    forward pass in bfloat16 autocast: float32's range, so no loss scaling is needed."""
    model.train()
    start = time.perf_counter()
    total, count, samples = 0.0, 0, 0
    bar = tqdm(loader, desc=description, disable=None if progress else True, leave=False)
    for number, (images, labels) in enumerate(bar, start=1):
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=amp):
            loss = step(model, images, labels, loss_fn)
        if not _finite_everywhere(loss):
            raise NonFiniteLoss(f"loss became {loss.item()} at step {number} of {len(loader)}")
        optimize(loss, optimizers, schedulers)
        total, count, samples = total + loss.item(), count + 1, samples + len(labels)
        if number % 50 == 0:
            bar.set_postfix(loss=f"{total / count:.4f}")
    return _mean_across_processes(total, count, device), samples, time.perf_counter() - start
