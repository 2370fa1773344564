"""The search benchmark (`make search-bench`): a class query at N = 10^4, 10^5, 10^6 stored images against
its memory-bandwidth limit and against the full head, index build rates, and search's quality per loss.

Needs the pipeline's exports and prepared data (`make run`; --exports and --data name others). Queries are
timed on random features of the export's feature dim (slc.bench.search), quality on the test split indexed
through every run's export (slc.bench.search_quality). Writes metrics/search.json, results/search.md,
plots/search.png and the README's example picture docs/search_example.png (slc.bench.search_report).
N = 10^6 at d = 1,024 holds about 10 GB in memory and writes 5 GB under --workdir.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import tempfile
from pathlib import Path

import faiss
import numpy as np

from serving.machine import machine_info
from serving.manifest import MANIFEST
from serving.model import SingleLogitModel
from slc.bench.search import QuerySettings, bandwidth, goals, time_builds, time_queries
from slc.bench.search_quality import examples_of, quality_of_runs, split_source, summary
from slc.bench.search_report import write_example, write_outputs
from slc.core.errors import ConfigError, run_stage
from slc.params import load_params
from slc.studies.scaling import bandwidth_reads


def positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not a positive number")
    return value


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--params", default="params.yaml", help="benchmark.threads, warmup, repeats, rounds, "
                                                                 "bandwidth_mib, providers are read from it")
    parser.add_argument("--exports", default="exports", help="the export stage's folder: one <run>/ per run")
    parser.add_argument("--data", default="data/prepared", help="the prepared data the runs were evaluated on")
    parser.add_argument("--split", default="test", help="the split indexed for quality and the build rate")
    parser.add_argument("--thresholds-test", default="results/thresholds_test.json",
                        help="the evaluate stage's figures to compare with as well (skipped, and said so, if absent)")
    parser.add_argument("--run", default=None, help="the export whose d and rows the queries use (default: the first)")
    parser.add_argument("--sizes", type=positive, nargs="+", default=[10**4, 10**5, 10**6], help="stored images N")
    parser.add_argument("--ks", type=positive, nargs="+", default=[10, 400_000],
                        help="head sizes of the full-logit alternative (400,000: the many-class preset's k)")
    parser.add_argument("--found", type=float, default=0.001, help="share of the images each query's threshold keeps")
    parser.add_argument("--full-rows", type=positive, default=4096, help="largest k whose logits are computed whole")
    parser.add_argument("--slice-rows", type=positive, default=2048, help="head rows of the timed GEMM slice")
    parser.add_argument("--slice-images", type=positive, default=2048, help="images of the timed GEMM slice")
    parser.add_argument("--chunk-images", type=positive, default=1 << 17, help="images per index segment")
    parser.add_argument("--repeats", type=positive, default=None, help="instead of benchmark.repeats (quick runs)")
    parser.add_argument("--rounds", type=positive, default=None, help="instead of benchmark.rounds")
    parser.add_argument("--warmup", type=int, default=None, help="instead of benchmark.warmup")
    parser.add_argument("--build-images", type=positive, default=10_000, help="images of the split each build indexes")
    parser.add_argument("--batch-size", type=positive, default=256, help="images per backbone call of a build")
    parser.add_argument("--no-ray", action="store_true", help="leave out the Ray Data build")
    parser.add_argument("--quality-classes", type=positive, default=1000,
                        help="classes searched per run: every class up to this many, else a seeded sample")
    parser.add_argument("--example-runs", nargs="+", default=["ce-s0", "batch_ce-s0"], help="the README example's runs")
    parser.add_argument("--example-class", type=int, default=None,
                        help="its class id (default: the class the example runs' searches find least precisely)")
    parser.add_argument("--example-recall", type=float, default=0.9)
    parser.add_argument("--example-shown", type=positive, default=6, help="best and last results shown per run")
    parser.add_argument("--workdir", default=None, help="where the indexes are written (default: the temp folder)")
    parser.add_argument("--metrics", default="metrics/search.json")
    parser.add_argument("--table", default="results/search.md")
    parser.add_argument("--plot", default="plots/search.png")
    parser.add_argument("--example-plot", default="docs/search_example.png")
    args = parser.parse_args(argv)
    if not 0 < args.found <= 1:
        raise ConfigError(f"--found {args.found} is not a share of the stored images in (0, 1]")
    return args


def exports_in(folder: Path, run: str | None, example_runs: list[str]) -> dict[str, Path]:
    """Every run's export under `folder`, by name; the named runs must be among them."""
    exports = {path.parent.name: path.parent for path in sorted(folder.glob(f"*/{MANIFEST}"))}
    if not exports:
        raise ConfigError(f"{folder} holds no export (<run>/{MANIFEST}): run `make run` first, or give --exports")
    for name in [run, *example_runs]:
        if name is not None and name not in exports:
            raise ConfigError(f"no export {name!r} in {folder}: it has {', '.join(exports)}")
    return exports


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    params = load_params(args.params)
    cfg = params.benchmark
    exports = exports_in(Path(args.exports), args.run, args.example_runs)
    run = args.run or next(iter(exports))
    model = SingleLogitModel.load(exports[run])
    faiss.omp_set_num_threads(cfg.threads)
    machine = {**machine_info(), "faiss": faiss.__version__, "numpy": np.__version__}
    stage_file = Path(args.thresholds_test)
    stage = json.loads(stage_file.read_text()) if stage_file.is_file() else None
    settings = QuerySettings(args.found, args.ks, args.full_rows, args.slice_rows, args.slice_images, args.chunk_images,
                             cfg.warmup if args.warmup is None else args.warmup, args.repeats or cfg.repeats,
                             args.rounds or cfg.rounds)
    queries: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="slc-search-bench-", dir=args.workdir) as scratch:
        scratch = Path(scratch)
        images, labels = split_source(Path(args.data), args.split, scratch / "split.npy")
        runs = quality_of_runs(exports, scratch / "split.npy", images, labels, scratch / "quality", args.quality_classes,
                               cfg.threads, stage)
        examples = examples_of(runs, scratch / "quality", labels, args.example_runs, args.example_class,
                               args.example_recall, args.example_shown)
        write_example(examples, images, Path(args.example_plot))
        print(f"build: {args.build_images} images in this process{'' if args.no_ray else ' and through Ray Data'}",
              flush=True)
        np.save(scratch / "build.npy", images[:args.build_images])
        builds = time_builds(exports[run], scratch / "build.npy", scratch / "build", cfg.threads, args.batch_size,
                             ray=not args.no_ray)
        with bandwidth_reads(params, scratch / "bandwidth_probe") as reads:
            for n in args.sizes:
                print(f"queries: N = {n:,}", flush=True)
                queries[str(n)] = time_queries(model, n, settings, reads, scratch / f"n{n}")
                shutil.rmtree(scratch / f"n{n}")
    quality = summary(runs)
    for result in runs.values():
        del result["precision"]  # per class, only for choosing the example's class
    compared = args.thresholds_test if stage is not None else f"{args.thresholds_test} (not found: not compared)"
    study = {"machine": machine, "bandwidth": bandwidth(queries, reads[0], cfg.threads),
             "settings": {**dataclasses.asdict(settings), "run": run, "d": model.manifest.feature_dim,
                          "sizes": args.sizes, "threads": cfg.threads, "faiss_threads": faiss.omp_get_max_threads(),
                          "exports": args.exports, "data": args.data, "split": args.split, "batch_size": args.batch_size,
                          "build_images": args.build_images, "quality_classes": args.quality_classes,
                          "thresholds_test": compared, "example_plot": args.example_plot},
             "queries": queries, "gemm_gflops": float(np.median([g for q in queries.values() for g in q["gemm_gflops"]])),
             "build": builds, "quality": {**quality, "runs": runs}, "example": examples,
             "goals": goals(queries, quality["max_abs_diff"])}
    write_outputs(study, Path(args.metrics), Path(args.table), Path(args.plot))
    print(f"wrote {args.metrics}, {args.table}, {args.plot} and {args.example_plot}")


if __name__ == "__main__":
    run_stage(main)
