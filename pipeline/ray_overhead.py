"""The Ray overhead benchmark (`make ray-overhead`): the same grid through the train stage's Ray path and
through a plain `train_one` loop, with where each Ray trial's seconds go (see slc.studies.ray_overhead).

Grids: `default` (params.yaml's grid on the prepared data, `make data`) and `digits` (the same losses and
seeds on scikit-learn's digits, 40 epochs of batch 64: short trials, where Ray's fixed costs show). Writes
metrics/ray_overhead.json (its `ratio`: the default grid's Ray time over the plain loop's),
results/ray_overhead.md and plots/ray_overhead.png.
"""
from __future__ import annotations

import argparse
import dataclasses
import tempfile
from pathlib import Path

import psutil
import torch

from serving.machine import machine_info
from slc.core.config import GridConfig
from slc.core.errors import ConfigError, run_stage
from slc.params import load_params
from slc.studies.ray_overhead import compare, digits_grid
from slc.studies.ray_overhead_report import write_outputs

GRIDS = ("default", "digits")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--data", type=Path, default=Path("data/prepared"), help="the default grid's prepared data")
    parser.add_argument("--grids", nargs="+", default=list(GRIDS), choices=GRIDS)
    parser.add_argument("--losses", nargs="+", default=None, help="instead of grid.losses (for quick runs)")
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="instead of grid.seeds (for quick runs)")
    parser.add_argument("--epochs", type=int, default=None, help="instead of each grid's epochs (for quick runs)")
    parser.add_argument("--metrics", type=Path, default=Path("metrics/ray_overhead.json"))
    parser.add_argument("--table", type=Path, default=Path("results/ray_overhead.md"))
    parser.add_argument("--plot", type=Path, default=Path("plots/ray_overhead.png"))
    args = parser.parse_args(argv)
    params = load_params(args.params)
    grid = GridConfig(losses=args.losses or params.grid.losses, seeds=args.seeds or params.grid.seeds)
    params = dataclasses.replace(params, grid=grid)
    if "default" in args.grids and not (args.data / "meta.json").is_file():
        raise ConfigError(f"{args.data} holds no prepared data: run `make data` and "
                          f"`python -m pipeline.prepare --out {args.data}` first, or pass --grids digits")
    if args.epochs is not None and args.epochs < 1:
        raise ConfigError(f"--epochs {args.epochs} is below 1")
    study = {"machine": {**machine_info(), "torch": torch.__version__}, "grids": {}}
    with tempfile.TemporaryDirectory(prefix="slc-ray-overhead-") as scratch:
        for name in args.grids:
            grid_params, data = (params, args.data) if name == "default" else \
                digits_grid(params, Path(scratch) / "digits_data")
            if args.epochs is not None:
                grid_params = dataclasses.replace(grid_params,
                                                  train=dataclasses.replace(grid_params.train, epochs=args.epochs))
            print(f"{name}: {len(grid.losses) * len(grid.seeds)} trials through a plain loop, then through Ray",
                  flush=True)
            study["grids"][name] = compare(name, grid_params, data, Path(scratch) / name)
            print(f"{name}: Ray {study['grids'][name]['ray']['wall_s']:.0f} s, plain loop "
                  f"{study['grids'][name]['plain']['wall_s']:.0f} s, x{study['grids'][name]['ratio']:.2f}", flush=True)
    study["machine"]["load_average_end"] = list(psutil.getloadavg())
    write_outputs(study, args.metrics, args.table, args.plot)
    print(f"wrote {args.metrics}, {args.table} and {args.plot}")
    return study


if __name__ == "__main__":
    run_stage(main)
