"""The GPU proof (`make gpu-smoke`): the pipeline's GPU path end to end, in one command, in minutes.

On a machine with a CUDA GPU, with nothing but this repository and the lock's packages (no network,
no dataset), in a temporary folder of its own (its data, models, exports, Ray storage and MLflow
store; never the repository's): prints the device; trains a one-epoch grid of `ce` and `batch_ce`
(conv6 at cifar10_conv6's recipe, `ray.use_gpu: true`, `train.amp: true`) on CIFAR-shaped data it
writes itself, and one sampled many-class run (many_classes_400k's recipe at 100,000 `tuples`
classes, a short epoch); evaluates and exports the three runs; checks that the exports' logits on
the CUDA provider agree with the CPU's; times ResNet-50's model, backbone and single_logit graphs
with the CUDA provider (and TensorRT's where it loads) at k = 1 to 400,000, batch 1 and 64. Writes
metrics/gpu_smoke.json and results/gpu_smoke.md with every figure and the device beside it.

Without a GPU it stops at once. `--allow-cpu` runs the same steps on tiny data on the CPU (CPU
provider against PyTorch stands in for CUDA against CPU), which is what the test suite runs.
"""
from __future__ import annotations

import argparse
import dataclasses
import gzip
import os
import struct
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import psutil
import yaml

from pipeline.presets import MANY_CLASSES, PRESETS, apply
from slc.core.config import Params
from slc.core.errors import PipelineError, run_stage
from slc.data.preparation import prepare
from slc.evaluate.evaluation import Outputs, evaluate
from slc.export.exporting import export_runs
from slc.params import params_from
from slc.studies import gpu_checks
from slc.studies.dataloading import write_cifar_shaped
from slc.studies.gpu_smoke_report import device_line, write_outputs
from slc.train.grid import run_grid

BUDGET_S = 480  # the 8 minutes; printed and recorded beside each step, not enforced
GRID_PRESET = "cifar10_conv6"
EXPERIMENT = "slc-gpu-smoke"
IGNORED_ENV = ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")  # the smoke runs its own local Ray and MLflow store


@dataclass(frozen=True)
class Scale:
    """The sizes of one smoke run; None keeps the preset's value."""
    cifar_images: tuple[int, int]      # CIFAR-shaped train and test images (random pixels)
    conv6_channels: int | None
    batch_size: int | None             # the conv6 grid's
    tuples_classes: int
    tuples_train_per_class: int
    candidates: int | None             # the many-class run's sampled negatives
    hidden: int | None                 # the many-class run's mlp width
    val_classes: int | None
    evaluate_classes: int
    fashion_items: tuple[int, int]     # Fashion-MNIST-format train and test items the tuples are made of
    architecture: str                  # timed at every k of `ks` (None: params.yaml's benchmark.num_classes)
    ks: tuple[int, ...] | None
    batches: tuple[int, ...]
    warmup: int
    repeats: int
    agreement_images: int


GPU = Scale(cifar_images=(20_000, 2_000), conv6_channels=None, batch_size=None, tuples_classes=100_000,
            tuples_train_per_class=2, candidates=None, hidden=None, val_classes=None, evaluate_classes=100,
            fashion_items=(600, 100), architecture="resnet50", ks=None, batches=(1, 64), warmup=5, repeats=30,
            agreement_images=64)
TINY = Scale(cifar_images=(200, 40), conv6_channels=8, batch_size=32, tuples_classes=200, tuples_train_per_class=1,
             candidates=32, hidden=32, val_classes=10, evaluate_classes=20, fashion_items=(60, 20),
             architecture="mlp", ks=(1, 1000), batches=(1, 4), warmup=1, repeats=3, agreement_images=8)


class SmokeError(PipelineError, RuntimeError):
    """A step of the smoke that did not do what it must (a failed trial, logits that disagree)."""


class Steps:
    """Each step's wall seconds, printed as it ends with the total against BUDGET_S. The clock starts
    when the process did: the imports (torch, Ray, MLflow) are the first step."""

    def __init__(self):
        started_ago = max(0.0, time.time() - psutil.Process().create_time())
        self.started, self.seconds = time.perf_counter() - started_ago, {"start-up (imports)": round(started_ago, 2)}

    @property
    def total_s(self) -> float:
        return time.perf_counter() - self.started

    @contextmanager
    def step(self, name: str):
        print(f"[{self.total_s:6.1f} s] {name} ...", flush=True)
        began = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = round(time.perf_counter() - began, 2)
            print(f"[{self.total_s:6.1f} s] {name}: {self.seconds[name]:.1f} s (budget {BUDGET_S} s)", flush=True)


def write_fashion_mnist(folder: Path, n_train: int, n_test: int, seed: int = 0) -> Path:
    """Fashion-MNIST's four .gz IDX files (random pixels, labels cycling over the 10 classes), which the
    `tuples` data is composed of: the smoke needs no dataset on the machine."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        for kind, array in (("images-idx3", rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)),
                            ("labels-idx1", (np.arange(n) % 10).astype(np.uint8))):
            header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
            (folder / f"{prefix}-{kind}-ubyte.gz").write_bytes(gzip.compress(header + array.tobytes()))
    return folder


def run_params(base: dict, changes: dict) -> Params:
    """params.yaml with a preset's changes and the smoke's on top, checked (an unknown key is an error)."""
    return params_from(apply(base, changes))


def grid_changes(scale: Scale, gpu: dict | None, work: Path) -> dict:
    """The conv6 grid: cifar10_conv6's recipe, one epoch, ce and batch_ce, on the GPUs there are (two DDP
    workers over NCCL when there are two or more), bfloat16 autocast."""
    preset = PRESETS[GRID_PRESET]
    gpus = gpu["count"] if gpu else 0
    workers = 2 if gpus >= 2 else 1
    concurrent = max(1, min(2, gpus // workers)) if gpu else 2
    cpus = os.cpu_count() or 1
    per_worker = preset["ray.cpus_per_worker"] if gpu and cpus >= concurrent * workers * preset["ray.cpus_per_worker"] + 1 \
        else None  # the recipe's CPUs where the machine has them; else shared out
    return {**preset, "data.name": "npz", "data.npz_path": str(work / "cifar_shaped.npz"),
            "model.channels": scale.conv6_channels or preset["model.channels"],
            "train.batch_size": scale.batch_size or preset["train.batch_size"], "train.epochs": 1,
            "train.warmup_epochs": 0, "train.amp": True, "grid.losses": ["ce", "batch_ce"], "grid.seeds": [0],
            "ray.use_gpu": gpu is not None, "ray.num_workers": workers, "ray.max_concurrent_trials": concurrent,
            "ray.cpus_per_worker": per_worker}


def many_classes_changes(scale: Scale, gpu: dict | None) -> dict:
    """many_classes_400k's recipe (sampled training, a cosine head from class-mean rows, per-row Adam,
    in-process loading) at `scale.tuples_classes` classes and a short epoch, one loss, on one GPU."""
    preset = PRESETS[MANY_CLASSES]
    return {**preset, "data.tuples.num_classes": scale.tuples_classes,
            "data.tuples.train_per_class": scale.tuples_train_per_class,
            "model.hidden": scale.hidden or preset["model.hidden"],
            "train.candidates": scale.candidates or preset["train.candidates"],
            "train.val_classes": scale.val_classes or preset["train.val_classes"],
            "evaluate.classes": scale.evaluate_classes, "grid.losses": ["batch_ce"], "grid.seeds": [0],
            "ray.use_gpu": gpu is not None, "ray.num_workers": 1, "ray.max_concurrent_trials": 1,
            "ray.cpus_per_worker": None}


def common_changes(work: Path) -> dict:
    """Every run: a new local Ray, MLflow in the work folder, nothing registered, a few class files."""
    return {"data.root": str(work / "raw"), "ray.address": None, "ray.num_cpus": None,
            "mlflow.experiment": EXPERIMENT, "mlflow.tracking_uri": f"sqlite:///{work / 'mlflow.db'}",
            "export.registered_model": None, "export.classes": 4}


def train_evaluate_export(params: Params, folder: Path, steps: Steps, name: str) -> dict:
    """prepare, train (Ray), evaluate and export one set of runs in `folder`, each a timed step."""
    data, models, trials = folder / "prepared", folder / "models", folder / "trials.json"
    with steps.step(f"{name}: prepare"):
        meta = prepare(params.data, data)
    with steps.step(f"{name}: train"):
        records = run_grid(params, data, models, trials, folder.parent / "ray_results")
    failed = [f"{r.run_name}: {r.error}" for r in records if not r.finished]
    if failed:
        raise SmokeError(f"{name}: {len(failed)} trial(s) failed: {'; '.join(failed)}")
    out = Outputs(folder / "slc.json", folder / "table1.md", folder / "thresholds.json",
                  folder / "thresholds_test.json", folder / "plots")
    with steps.step(f"{name}: evaluate"):
        evaluated = evaluate(trials, models, data, params.evaluate, out)["slc"]
    with steps.step(f"{name}: export"):
        manifests = export_runs(params.export, models, out.thresholds, data, folder / "exports", folder / "export.json")
    return {"dataset": meta["dataset"], "num_classes": meta["num_classes"], "splits": meta["splits"],
            "model": params.model.name, "train": {"epochs": params.train.epochs, "batch_size": params.train.batch_size,
                                                  "amp": params.train.amp, "candidates": params.train.candidates},
            "ray": {"use_gpu": params.ray.use_gpu, "num_workers": params.ray.num_workers,
                    "max_concurrent_trials": params.ray.max_concurrent_trials},
            "trials": [r.model_dump(exclude={"fingerprint", "model_dir", "mlflow_run_id"}) for r in records],
            "evaluate": evaluated["runs"],
            "export": {run: {"max_abs_diff_vs_pytorch": max(m.max_abs_diff.values()), "files": len(m.files)}
                       for run, m in manifests.items()},
            "exports": str(folder / "exports"), "data": str(data), "models": str(models)}


def run_smoke(base: dict, scale: Scale, gpu: dict | None, work: Path, figures: dict, steps: Steps) -> None:
    """Every step, filling `figures` as it goes (so a failure still leaves what was measured)."""
    import ray

    with steps.step("data: write the fixtures"):
        write_cifar_shaped(work / "cifar_shaped.npz", *scale.cifar_images, seed=0)
        write_fashion_mnist(work / "raw" / "FashionMNIST" / "raw", *scale.fashion_items)
    common = common_changes(work)
    runs = {"conv6_grid": run_params(base, {**grid_changes(scale, gpu, work), **common}),
            "many_classes": run_params(base, {**many_classes_changes(scale, gpu), **common})}
    figures["runs"] = {}
    try:
        for name, params in runs.items():
            figures["runs"][name] = train_evaluate_export(params, work / name, steps, name)
        figures["ray_resources"] = {key: value for key, value in ray.cluster_resources().items()
                                    if key in ("CPU", "GPU", "memory")}
    finally:
        ray.shutdown()
    with steps.step("agreement: CUDA against CPU logits" if gpu else "agreement: CPU provider against PyTorch"):
        figures["agreement"] = gpu_checks.agreement(
            {run: (Path(done["exports"]) / run, Path(done["data"]), Path(done["models"]) / run)
             for done in figures["runs"].values() for run in done["export"]}, gpu is not None, scale.agreement_images)
    with steps.step(f"timing: {scale.architecture} graphs"):
        params = runs["conv6_grid"]
        figures["timing"] = gpu_checks.time_graphs(
            scale.architecture, list(scale.ks or params.benchmark.num_classes), list(scale.batches), params,
            gpu is not None, scale.warmup, scale.repeats, work / "timing", budget_left_s=BUDGET_S - steps.total_s)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--allow-cpu", action="store_true",
                        help="without a GPU, run the same steps on tiny data on the CPU (what the tests run)")
    parser.add_argument("--params", type=Path, default=Path("params.yaml"), help="the base params")
    parser.add_argument("--metrics", type=Path, default=Path("metrics/gpu_smoke.json"))
    parser.add_argument("--table", type=Path, default=Path("results/gpu_smoke.md"))
    parser.add_argument("--cpu-speedup", type=Path, default=Path("metrics/speedup.json"),
                        help="the benchmark stage's figures on the CPU machine, shown beside the GPU's")
    parser.add_argument("--workdir", type=Path, default=None, help="where the temporary folder is made")
    args = parser.parse_args(argv)
    steps = Steps()
    gpu = gpu_checks.require_gpu(args.allow_cpu)  # no GPU and no --allow-cpu: one line, at once
    steps.seconds["device check"] = round(steps.total_s - sum(steps.seconds.values()), 2)
    base = yaml.safe_load(args.params.read_text())
    for key in IGNORED_ENV:
        if os.environ.pop(key, None):
            print(f"note: {key} is ignored: the smoke runs its own local Ray and MLflow store")
    scale = GPU if gpu else TINY
    figures = {"mode": "gpu" if gpu else "cpu (--allow-cpu, tiny data)", "budget_s": BUDGET_S,
               "scale": dataclasses.asdict(scale)}
    error = None
    try:
        with steps.step("device"):
            figures["device"] = gpu_checks.device_info(gpu)
            print(device_line(figures["device"]), flush=True)
        with tempfile.TemporaryDirectory(prefix="slc-gpu-smoke-", dir=args.workdir) as work:
            run_smoke(base, scale, gpu, Path(work), figures, steps)
    except BaseException as failure:  # Ctrl-C too: the report says the run stopped
        error = failure
        figures["error"] = f"{type(failure).__name__}: {failure}"
        raise
    finally:
        figures["steps_s"], figures["total_s"] = steps.seconds, round(steps.total_s, 2)
        figures["within_budget"] = figures["total_s"] <= BUDGET_S
        write_outputs(figures, args.metrics, args.table, args.cpu_speedup)
        print(f"{'stopped' if error else 'done'} in {figures['total_s']:.1f} s (budget {BUDGET_S} s): "
              f"wrote {args.metrics} and {args.table}")
    if not figures["agreement"]["ok"]:
        print(f"error: logits disagree beyond the tolerance: see {args.table}")
        return 1
    return 0


if __name__ == "__main__":
    run_stage(main)
