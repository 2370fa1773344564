"""`benchmark` stage: the paper's Table 2 in onnxruntime beside the memory-bandwidth limit (see slc.bench.benchmarking)."""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from slc.bench import report as speedup_report
from slc.bench.benchmarking import run_benchmark
from slc.core import tracking
from slc.core.errors import run_stage
from slc.params import load_params


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--exports", type=Path, required=True, help="the trained runs' exports")
    parser.add_argument("--metrics", type=Path, required=True)
    parser.add_argument("--table", type=Path, required=True)
    parser.add_argument("--plots", type=Path, required=True)
    parser.add_argument("--workdir", type=Path, default=None,
                        help="where the models are built (default: a temporary folder, removed after)")
    parser.add_argument("--no-mlflow", action="store_true", help="do not log the figures to MLflow")
    args = parser.parse_args(argv)
    params = load_params(args.params)

    with tempfile.TemporaryDirectory(prefix="slc-benchmark-", dir=args.workdir) as workdir:
        results = run_benchmark(params, args.exports, Path(workdir))
    speedup_report.write_outputs(results, args.metrics, args.table, args.plots)
    if not args.no_mlflow:
        tracking.log_stage_run(tracking.tracking_uri(params.mlflow), params.mlflow.experiment, "benchmark",
                               speedup_report.mlflow_log(results, args.table, args.plots))
    return results


if __name__ == "__main__":
    run_stage(main)
