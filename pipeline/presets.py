"""The paper's experiments as presets: named sets of params changes, run as DVC experiments.

`python -m pipeline.presets cifar10_conv6` runs `dvc exp run --name cifar10_conv6 -S ...` with the
preset's changes (`--print` shows the command instead), so every preset is an ordinary DVC
experiment: `dvc exp show` lists it beside the others and `dvc metrics diff` compares it. The
settings are those of a GPU cluster (one GPU per Train worker); on the 2-core CPU machine of the
default run they would take days. The data must be under `data.root` (or downloadable).

`many_classes_400k` is the exception, made for that CPU machine: SLC where it matters, a trained
400,000-class model (tuples of Fashion-MNIST items, sampled training) through every stage in under
an hour and 16 GB (see the README's "Many classes").
"""
from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
from pathlib import Path

import yaml

from slc.core.config import Params
from slc.core.errors import ConfigError
from slc.nn.losses import LOSSES
from slc.params import params_from
from slc.studies.cost import training_cost

MANY_CLASSES = "many_classes_400k"  # also the settings of the scaling study (pipeline.scaling), at each k
RELATED_LOSSES = "related_losses"

# One GPU per Train worker, with 4 CPUs: 3 loader processes decode and augment beside training
# (train.loader_workers: null), and bfloat16 autocast.
_GPU = {"ray.use_gpu": True, "ray.num_workers": 1, "ray.cpus_per_worker": 4.0, "ray.max_concurrent_trials": 8,
        "train.amp": True}
# The paper gives no training recipe; these are the usual ones for its datasets and networks (see the README).
# Small images: AdamW with decoupled weight decay and a cosine schedule to 0, one warm-up epoch.
_SMALL_IMAGES = {"train.epochs": 50, "train.batch_size": 128, "train.optimizer": "adamw", "train.lr": 0.001,
                 "train.weight_decay": 0.05, "train.lr_schedule": "cosine", "train.warmup_epochs": 1,
                 "grid.seeds": [0, 1, 2], **_GPU}

PRESETS: dict[str, dict[str, object]] = {
    # Table 1, MNIST: two fully connected layers; no augmentation (a shifted or mirrored digit is another digit)
    "mnist_mlp": {"data.name": "mnist", "model.name": "mlp", "model.hidden": 1024, **_SMALL_IMAGES,
                  "train.epochs": 30, "train.optimizer": "adam", "train.weight_decay": 0.0, "train.augment": "none",
                  "train.loader_workers": 0},  # unaugmented arrays: a batch is made faster than passed between processes
    # Table 1, SVHN / CIFAR-10 / CIFAR-100: six conv layers and one fully connected layer. SVHN's digits
    # are shifted but never mirrored; CIFAR's objects are both.
    "svhn_conv6": {"data.name": "svhn", "model.name": "conv6", "model.channels": 64, **_SMALL_IMAGES,
                   "train.epochs": 30, "train.augment": "crop"},
    "cifar10_conv6": {"data.name": "cifar10", "model.name": "conv6", "model.channels": 64, **_SMALL_IMAGES,
                      "train.augment": "crop_flip"},
    "cifar100_conv6": {"data.name": "cifar100", "model.name": "conv6", "model.channels": 64, **_SMALL_IMAGES,
                       "train.epochs": 100, "train.augment": "crop_flip"},
    # Table 1, ImageNet: Inception-v3, cross-entropy against batch cross-entropy; 8 GPUs per trial (12 CPUs each:
    # 11 loader processes decode ~200 JPEGs/s apiece, results/dataloading.md, short of the ~2,900/s), 64 images
    # each. torchvision's ImageNet recipe: SGD (Nesterov momentum 0.9) at 0.1 per 256 images (so 0.2 for 512),
    # weight decay 1e-4, x0.1 at epochs 30 and 60 of 90, 5 warm-up epochs for the large batch, random-resized
    # crops and flips. Per-class ONNX files are skipped for 1,000 classes (single_logit.onnx covers them all).
    "imagenet_inception_v3": {"data.name": "imagenet", "data.image_size": 299, "model.name": "inception_v3",
                              "train.epochs": 90, "train.batch_size": 64, "train.optimizer": "sgd",
                              "train.lr": 0.2, "train.weight_decay": 0.0001, "train.lr_schedule": "step",
                              "train.warmup_epochs": 5, "train.augment": "resized_crop_flip",
                              "grid.losses": ["ce", "batch_ce"], "grid.seeds": [0], **_GPU, "ray.num_workers": 8,
                              "ray.cpus_per_worker": 12.0,
                              "ray.max_concurrent_trials": 1, "evaluate.batch_size": 256, "export.classes": "none",
                              "benchmark.architectures": ["inception_v3"]},
    # 400,000 classes on 2 CPU cores in under an hour: cross-entropy against batch cross-entropy (the paper's
    # ImageNet pair), sampled training (1,024 negatives a step), one epoch of 20 images per class (8 million),
    # one trial at a time on both cores, metrics over a seeded sample of 1,000 classes. A cosine head (on the
    # mlp's unclipped hidden layer) whose rows start at their class's mean feature over 5 images, per-row Adam
    # at a head rate 33x the backbone's: tuned at 100,000 classes (the README's "Many classes"), where fresh
    # images beat a second epoch of the same ones.
    MANY_CLASSES: {
        "data.name": "tuples", "data.tuples.num_classes": 400000, "data.tuples.train_per_class": 20,
        "model.name": "mlp", "model.hidden": 256, "model.head": "cosine", "train.head_init": "class_mean",
        "train.head_init_per_class": 5,
        "train.epochs": 1, "train.batch_size": 256, "train.lr": 0.0003, "train.head_lr": 0.01,
        "train.candidates": 1024, "train.val_classes": 100, "train.loader_workers": 0,  # composed in-process: x2-3 faster
        "grid.losses": ["ce", "batch_ce"], "grid.seeds": [0],
        "ray.max_concurrent_trials": 1, "evaluate.classes": 1000},
    # The related work's losses beside the paper's seven, on the default run (Fashion-MNIST, the paper's mlp,
    # 3 seeds, on this CPU machine): Table 1's means stay over the seven, each new loss's row says whether
    # it is aligned (slc/nn/losses.py). The four head losses train a cosine head at their papers' scales.
    RELATED_LOSSES: {"grid.losses": list(LOSSES)},
}


def apply(raw: dict, changes: dict[str, object]) -> dict:
    """params.yaml's content with `changes` (dotted keys) set; a key params.yaml lacks is an error."""
    result = json.loads(json.dumps(raw))
    for dotted, value in changes.items():
        *parents, leaf = dotted.split(".")
        section = result
        for key in parents:
            section = section.get(key) if isinstance(section, dict) else None
        if not isinstance(section, dict) or leaf not in section:
            raise ConfigError(f"preset key {dotted} is not in params.yaml")
        section[leaf] = value
    return result


def preset_params(name: str, params_path: Path = Path("params.yaml")) -> Params:
    """The checked settings a preset runs with (what `dvc exp run` will write into params.yaml)."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; presets: {', '.join(PRESETS)}")
    return params_from(apply(yaml.safe_load(Path(params_path).read_text()), PRESETS[name]))


def dvc_command(name: str) -> list[str]:
    """`dvc exp run --name <name> -S key=value ...`; values in YAML flow style, as `-S` parses them."""
    sets = [f"{key}={yaml.safe_dump(value, default_flow_style=True, width=math.inf).strip().removesuffix('...').strip()}"
            for key, value in PRESETS[name].items()]
    return ["dvc", "exp", "run", "--name", name, *[arg for s in sets for arg in ("-S", s)]]


RECIPE_KEYS = {"data": "data.name", "network": "model.name", "epochs": "train.epochs", "batch / GPU": "train.batch_size",
               "optimizer": "train.optimizer", "lr": "train.lr", "schedule": "train.lr_schedule",
               "warm-up epochs": "train.warmup_epochs", "weight decay": "train.weight_decay",
               "augment": "train.augment", "head": "model.head", "head init": "train.head_init",
               "head lr": "train.head_lr", "amp": "train.amp", "GPUs / run": "ray.num_workers",
               "CPUs / GPU": "ray.cpus_per_worker", "loader workers": "train.loader_workers"}


def recipe_table() -> str:
    """Markdown: each preset's training recipe, as it runs (the README shows this table)."""
    rows = ["| preset | " + " | ".join(RECIPE_KEYS) + " |", "| --- " * (len(RECIPE_KEYS) + 1) + "|"]
    for name in PRESETS:
        params = preset_params(name)
        values = [_dotted(params, key) for key in RECIPE_KEYS.values()]
        rows.append(f"| {name} | " + " | ".join("null" if v is None else str(v) for v in values) + " |")
    return "\n".join(rows)


def _dotted(params: Params, key: str):
    value = params
    for part in key.split("."):
        value = getattr(value, part)
    return value


def cost_table(names: list[str], tflops: float) -> str:
    """Markdown: what each preset's grid would cost on GPUs at `tflops` sustained (slc.studies.cost)."""
    rows = [f"| preset | forward GFLOP / image | images x epochs x runs | PFLOP | GPU-hours at {tflops:g} TFLOP/s "
            f"| images/s each GPU takes |", "| --- | ---: | --- | ---: | ---: | ---: |"]
    for name in names:
        c = training_cost(preset_params(name), tflops)
        rows.append(f"| {name} | {c.forward_gflop:.3g} | {c.images_per_epoch:,} x {c.epochs} x {c.runs} | "
                    f"{_figure(c.total_pflop)} | {_figure(c.gpu_hours)} | {c.images_per_s_per_gpu:,.0f} |")
    return "\n".join(rows)


def _figure(value: float) -> str:
    return f"{value:,.0f}" if value >= 100 else f"{value:.2g}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("preset", nargs="?", choices=sorted(PRESETS))
    parser.add_argument("--print", action="store_true", help="print the dvc command instead of running it")
    parser.add_argument("--recipes", action="store_true", help="print every preset's training recipe")
    parser.add_argument("--cost", action="store_true", help="print what the preset (or every preset) would cost on "
                        "GPUs: counted FLOPs, and GPU-hours at --tflops sustained per GPU")
    parser.add_argument("--tflops", type=float, default=100.0, help="assumed sustained training throughput of one "
                        "GPU, in TFLOP/s (default 100: about a tenth of an H100's dense bfloat16 peak)")
    args, extra = parser.parse_known_args(argv)  # extra arguments go to `dvc exp run`, e.g. --queue
    if args.recipes:
        print(recipe_table())
        return 0
    if args.cost:
        print(cost_table([args.preset] if args.preset else list(PRESETS), args.tflops))
        return 0
    if args.preset is None:
        parser.error("name a preset (or --cost for all of them)")
    preset_params(args.preset)  # a preset that no longer fits params.yaml fails here, not mid-pipeline
    command = dvc_command(args.preset) + extra
    if args.print:
        print(" ".join(f"'{arg}'" if any(c in arg for c in " [],") else arg for arg in command))
        return 0
    return subprocess.call(command)


if __name__ == "__main__":
    sys.exit(main())
