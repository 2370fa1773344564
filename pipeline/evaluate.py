"""`evaluate` stage: single-logit errors of every finished trial, Table 1, thresholds, plots (slc.evaluate.evaluation)."""
from __future__ import annotations

import argparse
from pathlib import Path

from slc.core import tracking
from slc.core.errors import run_stage
from slc.evaluate.evaluation import Outputs, evaluate, mlflow_logs
from slc.params import load_params


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--trials", required=True)
    parser.add_argument("--models", required=True, help="holds one <run_name>/ per trained model")
    parser.add_argument("--data", required=True, help="a prepared dataset with the same classes")
    parser.add_argument("--val-split", default="val", help="split the thresholds are chosen on")
    parser.add_argument("--test-split", default="test", help="split the errors are measured on")
    parser.add_argument("--metrics", required=True)
    parser.add_argument("--table", required=True)
    parser.add_argument("--thresholds", required=True)
    parser.add_argument("--thresholds-test", required=True)
    parser.add_argument("--plots", required=True)
    parser.add_argument("--no-mlflow", action="store_true", help="do not log to the trials' MLflow runs")
    args = parser.parse_args(argv)
    params = load_params(args.params)
    out = Outputs(Path(args.metrics), Path(args.table), Path(args.thresholds),
                  Path(args.thresholds_test), Path(args.plots))
    done = evaluate(Path(args.trials), Path(args.models), Path(args.data), params.evaluate, out,
                    args.val_split, args.test_split)
    if not args.no_mlflow:
        tracking.log_to_trials(tracking.tracking_uri(params.mlflow), done["trials"],
                               mlflow_logs(done["results"], done["files"]), "evaluation")
    print(Path(args.table).read_text())


if __name__ == "__main__":
    run_stage(main)
