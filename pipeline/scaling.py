"""The scaling study (`make scaling`): the many-class preset's settings at k = 1,000 ... 400,000.

The same batch, backbone, candidates and training budget (`--train-images`, 1 million images per loss:
1,000 per class at k = 1,000, 3 at 400,000) at every k.

Each k runs prepare, train, evaluate and export, as dvc.yaml's commands (pipeline.stages), in
scaling_runs/k<k>/ (kept, so a study can be looked into afterwards); then, in one pass over every k,
training steps and the trained export are timed (slc.studies.scaling). Writes metrics/scaling.json
(`dvc metrics show` lists it), results/scaling.md and plots/scaling.png.
"""
from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch
import yaml

from pipeline import stages
from pipeline.presets import MANY_CLASSES, PRESETS, apply
from serving.machine import machine_info
from slc.core.errors import run_stage
from slc.params import params_from
from slc.studies.scaling import Layout, bandwidth_gbps, goals, run_point, time_point, write_outputs

DEFAULT_KS = [1000, 10000, 100000, 400000]
STAGES = ("prepare", "train", "evaluate", "export")  # the benchmark stage's timing is the study's own


def at_k(base: dict, k: int, train_images: int) -> dict:
    """The preset's params at k classes (checked), training on about `train_images` images whatever k
    is (so every k gets the same training budget); below its candidate count every class is a candidate."""
    raw = json.loads(json.dumps(base))
    raw["data"]["tuples"]["num_classes"] = k
    raw["data"]["tuples"]["train_per_class"] = max(1, round(train_images / k))
    raw["data"]["root"] = str(Path(raw["data"]["root"]).resolve())  # the stages run in their own folder
    if raw["train"]["candidates"] is not None:
        raw["train"]["candidates"] = min(raw["train"]["candidates"], k)
    params_from(raw)
    return raw


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--params", default="params.yaml", help="the base params; the preset's changes go on top")
    parser.add_argument("--ks", type=int, nargs="+", default=DEFAULT_KS, help="numbers of classes to run at")
    parser.add_argument("--train-images", type=int, default=1_000_000,
                        help="images each loss trains on at every k (its epochs times k times images per class)")
    parser.add_argument("--workdir", default="scaling_runs", help="one folder per k, replaced at each run")
    parser.add_argument("--metrics", default="metrics/scaling.json")
    parser.add_argument("--table", default="results/scaling.md")
    parser.add_argument("--plot", default="plots/scaling.png")
    args = parser.parse_args(argv)
    base = apply(yaml.safe_load(Path(args.params).read_text()), PRESETS[MANY_CLASSES])
    # every point's settings are checked before the first one starts
    points_params = {k: at_k(base, k, args.train_images) for k in args.ks}
    params = params_from(base)
    workdir = Path(args.workdir)
    commands = {stage: stages.command(stage, "params.yaml") for stage in STAGES}
    layout = Layout(stages.path_of("prepare", "--out"), stages.path_of("evaluate", "--metrics"),
                    stages.path_of("export", "--out"))
    gbps = bandwidth_gbps(params, workdir / "bandwidth_probe")
    points = {}
    for k, raw in points_params.items():
        folder = workdir / f"k{k}"
        shutil.rmtree(folder, ignore_errors=True)
        print(f"k = {k:,}: prepare, train, evaluate, export in {folder}", flush=True)
        points[str(k)] = run_point(raw, folder.resolve(), commands, layout)
        print(json.dumps(points[str(k)]), flush=True)
    for k, raw in points_params.items():
        print(f"k = {k:,}: timing training steps and the trained export", flush=True)
        points[str(k)].update(time_point(raw, (workdir / f"k{k}").resolve(), layout, gbps["gbps"]))
    settings = {key: value for key, value in base.items() if key in ("data", "model", "train", "grid", "evaluate",
                                                                       "export", "benchmark")}
    settings["train_images"] = args.train_images
    study = {"machine": {**machine_info(), "torch": torch.__version__}, "bandwidth": gbps, "settings": settings,
             "points": points, "goals": goals(points)}
    write_outputs(study, Path(args.metrics), Path(args.table), Path(args.plot))
    print(f"wrote {args.metrics}, {args.table} and {args.plot}")


if __name__ == "__main__":
    run_stage(main)
