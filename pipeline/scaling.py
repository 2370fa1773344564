"""The scaling study (`make scaling`): the many-class preset's settings at k = 1,000 ... 400,000, with each head.

The same batch, backbone, candidates and training budget (`--train-images`, half a million images per
loss: 500 per class at k = 1,000, 1 at 400,000) at every k, and both heads (`model.head`: linear and
cosine, each with rows started at its class's mean feature), so that PoLS can be read with and without
a normalised head. About 80 min on 2 cores.

Each k and head runs prepare, train, evaluate and export, as dvc.yaml's commands (pipeline.stages), in
scaling_runs/k<k>/<head>/ (kept, so a study can be looked into afterwards); then, in one pass over every
point, training steps and the trained export are timed (slc.studies.scaling). Writes metrics/scaling.json
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
from slc.bench.benchmarking import bandwidth_summary
from slc.core.errors import run_stage
from slc.nn.models import HEADS
from slc.params import params_from
from slc.studies.scaling import Layout, bandwidth_reads, goals, run_point, time_point, write_outputs

DEFAULT_KS = [1000, 10000, 100000, 400000]
STAGES = ("prepare", "train", "evaluate", "export")  # the benchmark stage's timing is the study's own


def at_k(base: dict, k: int, train_images: int, head: str) -> dict:
    """The preset's params at k classes with `head` (checked), training on about `train_images` images
    whatever k is (so every k gets the same training budget); below its candidate count every class is
    a candidate. The scale (cosine only) is the default one for k."""
    raw = json.loads(json.dumps(base))
    raw["model"].update(head=head, scale=None)
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
    parser.add_argument("--train-images", type=int, default=500_000,
                        help="images each loss trains on at every k (its epochs times k times images per class)")
    parser.add_argument("--heads", nargs="+", choices=HEADS, default=list(HEADS), help="model.head values to run")
    parser.add_argument("--losses", nargs="+", default=["ce", "batch_ce", "self_norm"],
                        help="the grid's losses at every point (the preset's own are for its one hour)")
    parser.add_argument("--workdir", default="scaling_runs", help="one folder per k and head, replaced at each run")
    parser.add_argument("--metrics", default="metrics/scaling.json")
    parser.add_argument("--table", default="results/scaling.md")
    parser.add_argument("--plot", default="plots/scaling.png")
    args = parser.parse_args(argv)
    base = apply(yaml.safe_load(Path(args.params).read_text()), {**PRESETS[MANY_CLASSES], "grid.losses": args.losses})
    # every point's settings are checked before the first one starts
    points_params = {(k, head): at_k(base, k, args.train_images, head) for k in args.ks for head in args.heads}
    params = params_from(base)
    workdir = Path(args.workdir)
    commands = {stage: stages.command(stage, "params.yaml") for stage in STAGES}
    layout = Layout(stages.path_of("prepare", "--out"), stages.path_of("train", "--results"),
                    stages.path_of("evaluate", "--metrics"), stages.path_of("export", "--out"))
    points = {str(k): {"k": k, "heads": {}} for k in args.ks}
    folders = {(k, head): (workdir / f"k{k}" / head).resolve() for k, head in points_params}
    for (k, head), raw in points_params.items():
        shutil.rmtree(folders[k, head], ignore_errors=True)
        print(f"k = {k:,}, {head} head: prepare, train, evaluate, export in {folders[k, head]}", flush=True)
        points[str(k)]["heads"][head] = run_point(raw, folders[k, head], commands, layout)
        print(json.dumps(points[str(k)]["heads"][head]), flush=True)
    with bandwidth_reads(params, workdir / "bandwidth_probe") as reads:
        for (k, head), raw in points_params.items():
            print(f"k = {k:,}, {head} head: timing training steps and the trained export", flush=True)
            points[str(k)]["heads"][head].update(time_point(raw, folders[k, head], layout, reads))
    settings = {key: value for key, value in base.items() if key in ("data", "model", "train", "grid", "evaluate",
                                                                       "export", "benchmark")}
    settings.update(train_images=args.train_images, heads=args.heads)
    bandwidth = bandwidth_summary([p["latency_ms"]["gbps"] for point in points.values() for p in point["heads"].values()],
                                  reads[0], params.benchmark.threads)
    study = {"machine": {**machine_info(), "torch": torch.__version__}, "bandwidth": bandwidth, "settings": settings,
             "points": points, "goals": goals(points)}
    write_outputs(study, Path(args.metrics), Path(args.table), Path(args.plot))
    print(f"wrote {args.metrics}, {args.table} and {args.plot}")


if __name__ == "__main__":
    run_stage(main)
