"""The data-loading benchmark (`make dataloading`): images/s of training's loader per dataset kind, at
each kind's preset settings, with 0, 1, ... n loader workers (n = the CPUs this process may use).

Kinds: fashion_mnist (mnist_mlp), cifar10 and svhn (CIFAR-shaped arrays; cifar10_conv6, svhn_conv6),
folder (500x375 JPEGs; imagenet_inception_v3) and tuples (many_classes_400k); see slc.studies.dataloading.
The presets are read when it runs, so the figures follow them. Writes metrics/dataloading.json
(`dvc metrics show` lists it), results/dataloading.md and plots/dataloading.png.
"""
from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

import psutil
import torch

from pipeline.presets import preset_params
from serving.machine import machine_info
from slc.core.errors import ConfigError, run_stage
from slc.studies.dataloading import KINDS, benchmark_kind, kinds_named
from slc.studies.dataloading_report import write_outputs


def default_workers() -> list[int]:
    """0 up to the CPUs this process may use (its affinity, as serving.machine counts cores)."""
    return list(range(len(os.sched_getaffinity(0)) + 1))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--params", default="params.yaml", help="the base params; each preset's changes go on top")
    parser.add_argument("--kinds", nargs="+", default=list(KINDS), help=f"dataset kinds, of {', '.join(KINDS)}")
    parser.add_argument("--workers", type=int, nargs="+", default=None,
                        help="loader worker counts (default: 0 up to this machine's CPUs)")
    parser.add_argument("--images", type=int, default=None,
                        help="source training images of every kind (default: each kind's own; for quick runs)")
    parser.add_argument("--batch-size", type=int, default=None, help="instead of the presets' (for quick runs)")
    parser.add_argument("--repeats", type=int, default=3, help="passes per worker count; the median is reported")
    parser.add_argument("--budget-s", type=float, default=3.0, help="seconds each pass is timed for at least, "
                                                                    "unless the split ends first")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads of in-process loading (0 workers): a Ray Train worker's CPUs (1 on the "
                             "default grid); loader workers use 1 each whatever this is")
    parser.add_argument("--metrics", default="metrics/dataloading.json")
    parser.add_argument("--table", default="results/dataloading.md")
    parser.add_argument("--plot", default="plots/dataloading.png")
    args = parser.parse_args(argv)
    kinds = kinds_named(args.kinds)
    workers = default_workers() if args.workers is None else sorted(set(args.workers))
    for name, value, least in (("--workers", min(workers), 0), ("--images", args.images, 1),
                               ("--batch-size", args.batch_size, 1), ("--repeats", args.repeats, 1),
                               ("--threads", args.threads, 1)):
        if value is not None and value < least:
            raise ConfigError(f"{name} {value} is below {least}")
    if args.budget_s <= 0:
        raise ConfigError(f"--budget-s {args.budget_s} is not a positive number of seconds")
    # every preset is read (and checked) before the first kind starts
    params = {name: preset_params(kind.preset, Path(args.params)) for name, kind in kinds.items()}
    machine = {**machine_info(), "torch": torch.__version__, "torch_threads_default": torch.get_num_threads()}
    study = {}
    with tempfile.TemporaryDirectory(prefix="slc-dataloading-") as scratch:
        for name in kinds:
            print(f"{name}: writing and preparing its data, then timing the loader at {workers} workers", flush=True)
            study[name] = benchmark_kind(name, params[name], Path(scratch) / name, workers, images=args.images,
                                         batch_size=args.batch_size, repeats=args.repeats, budget_s=args.budget_s,
                                         threads=args.threads)
    study["machine"] = {**machine, "load_average_end": list(psutil.getloadavg())}
    write_outputs(study, Path(args.metrics), Path(args.table), Path(args.plot))
    print(f"wrote {args.metrics}, {args.table} and {args.plot}")


if __name__ == "__main__":
    run_stage(main)
