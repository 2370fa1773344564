"""`export` stage: each trained run -> exports/<run_name>/, ONNX models verified against PyTorch (slc.export.exporting)."""
from __future__ import annotations

import argparse
from pathlib import Path

from slc.core import tracking
from slc.core.errors import run_stage
from slc.core.records import read_trials
from slc.data.prepared import PreparedData
from slc.export.exporting import export_runs, mlflow_logs
from slc.export.model_registry import register_best
from slc.params import load_params


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--models", required=True, help="holds one <run_name>/ per trained model")
    parser.add_argument("--thresholds", required=True, help="written by evaluate")
    parser.add_argument("--data", required=True, help="test images to verify the exports on")
    parser.add_argument("--out", required=True, help="gets one <run_name>/ per exported run")
    parser.add_argument("--trials", required=True, help="the trials' MLflow run ids")
    parser.add_argument("--metrics", required=True, help="gets each export's wall time and bytes")
    parser.add_argument("--evaluation", required=True, help="evaluate's metrics: which export to register")
    parser.add_argument("--no-mlflow", action="store_true", help="do not log to the trials' MLflow runs nor register")
    args = parser.parse_args(argv)
    params = load_params(args.params)
    manifests = export_runs(params.export, Path(args.models), Path(args.thresholds), Path(args.data), Path(args.out),
                            Path(args.metrics))
    if not args.no_mlflow:
        tracking.log_to_trials(tracking.tracking_uri(params.mlflow), read_trials(Path(args.trials)),
                               mlflow_logs(Path(args.out), manifests, PreparedData(args.data)), "export")
        if params.export.registered_model is not None:
            register_best(tracking.tracking_uri(params.mlflow), params.mlflow.experiment, params.export,
                          Path(args.evaluation), Path(args.out), read_trials(Path(args.trials)))
    for run, manifest in manifests.items():
        worst = max(manifest.max_abs_diff.values())
        size = sum(entry["bytes"] for entry in manifest.files.values())
        print(f"{run}: {len(manifest.files)} files, {size / 2**20:.1f} MiB, max |ORT - PyTorch| = {worst:.2e}")


if __name__ == "__main__":
    run_stage(main)
