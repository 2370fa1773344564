"""`evaluate` stage: single-logit errors of every finished trial, Table 1, thresholds, plots (slc.evaluation)."""
from __future__ import annotations

import argparse
from pathlib import Path

from slc import tracking
from slc.config import load_params
from slc.errors import run_stage
from slc.evaluation import Outputs, evaluate, log_to_mlflow


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--trials", default="results/trials.json")
    parser.add_argument("--models", default="models", help="holds one <run_name>/ per trained model")
    parser.add_argument("--data", default="data/prepared", help="a prepared dataset with the same classes")
    parser.add_argument("--val-split", default="val", help="split the thresholds are chosen on")
    parser.add_argument("--test-split", default="test", help="split the errors are measured on")
    parser.add_argument("--metrics", default=str(Outputs.metrics))
    parser.add_argument("--table", default=str(Outputs.table))
    parser.add_argument("--thresholds", default=str(Outputs.thresholds))
    parser.add_argument("--thresholds-test", default=str(Outputs.thresholds_test))
    parser.add_argument("--plots", default=str(Outputs.plots))
    parser.add_argument("--no-mlflow", action="store_true", help="do not log to the trials' MLflow runs")
    args = parser.parse_args(argv)
    params = load_params(args.params)
    out = Outputs(Path(args.metrics), Path(args.table), Path(args.thresholds),
                  Path(args.thresholds_test), Path(args.plots))
    done = evaluate(Path(args.trials), Path(args.models), Path(args.data), params.evaluate, out,
                    args.val_split, args.test_split)
    if not args.no_mlflow:
        log_to_mlflow(tracking.tracking_uri(params.mlflow), done["trials"], done["results"], done["files"])
    print(Path(args.table).read_text())


if __name__ == "__main__":
    run_stage(main)
