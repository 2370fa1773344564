"""`train` stage: every loss x seed of params.yaml's grid on Ray, recorded in MLflow (see slc.train.grid)."""
from __future__ import annotations

import argparse
import logging

from slc.core.errors import run_stage
from slc.params import load_params
from slc.train import grid

log = logging.getLogger(__name__)


def main(argv: list[str] | None = None) -> int:
    import ray

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--data", required=True, help="the prepare stage's output")
    parser.add_argument("--models", required=True, help="models/<run_name>/ per finished trial")
    parser.add_argument("--results", required=True, help="one record per trial")
    parser.add_argument("--ray-results", required=True, help="Ray's storage: checkpoints, trial logs")
    args = parser.parse_args(argv)
    try:
        records = grid.run_grid(load_params(args.params), args.data, args.models, args.results, args.ray_results)
    except (grid.GridInterrupted, KeyboardInterrupt) as error:
        log.warning("train interrupted: %s. %s and %s/ hold every trial that finished; `dvc repro` trains only "
                    "the others", error or "Ctrl-C", args.results, args.models)
        return 130
    finally:
        ray.shutdown()
    return grid.print_outcome(records)


if __name__ == "__main__":
    run_stage(main)
