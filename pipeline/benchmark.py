"""`benchmark` stage: the paper's Table 2 in onnxruntime beside the memory-bandwidth limit (see slc.benchmarking)."""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from slc import speedup_report
from slc.benchmarking import run_benchmark
from slc.config import load_params
from slc.errors import run_stage


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--exports", type=Path, default=Path("exports"), help="the trained runs' exports")
    parser.add_argument("--metrics", type=Path, default=Path("metrics/speedup.json"))
    parser.add_argument("--table", type=Path, default=Path("results/speedup.md"))
    parser.add_argument("--plots", type=Path, default=Path("plots"))
    parser.add_argument("--workdir", type=Path, default=None,
                        help="where the models are built (default: a temporary folder, removed after)")
    parser.add_argument("--no-mlflow", action="store_true", help="do not log the figures to MLflow")
    args = parser.parse_args(argv)
    params = load_params(args.params)

    with tempfile.TemporaryDirectory(prefix="slc-benchmark-", dir=args.workdir) as workdir:
        results = run_benchmark(params, args.exports, Path(workdir))
    speedup_report.write_outputs(results, args.metrics, args.table, args.plots)
    if not args.no_mlflow:
        speedup_report.log_to_mlflow(results, params.mlflow, args.table, args.plots)
    return results


if __name__ == "__main__":
    run_stage(main)
