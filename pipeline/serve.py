"""`make serve`: serve the best exported run (lowest test 1-AUPRC in metrics/slc.json) with `slc serve`.

serving/ never reads params.yaml or the pipeline's files; this bridge does, then hands over.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from serving import cli
from slc.config import load_params
from slc.errors import PipelineError, run_stage


class NothingToServeError(PipelineError):
    """No metrics to rank the runs by, or no exported run: the stages before serving have not run."""


def best_run(metrics_path: Path, exports: Path) -> str:
    """The exported run whose single logits rank best (lowest mean 1-AUPRC over classes)."""
    try:
        runs = json.loads(metrics_path.read_text())["runs"]
    except FileNotFoundError:
        raise NothingToServeError(f"{metrics_path} not found, so no run can be chosen to serve: "
                                  f"run the pipeline first (`make run` or `dvc repro`)") from None
    exported = {run: m["1-auprc"] for run, m in runs.items() if (exports / run / "manifest.json").exists()}
    if not exported:
        raise NothingToServeError(f"no exported run of {metrics_path} under {exports}/ (none has a "
                                  f"manifest.json): run `dvc repro export` first")
    return min(exported, key=exported.get)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--metrics", type=Path, default=Path("metrics/slc.json"))
    parser.add_argument("--exports", type=Path, default=Path("exports"))
    args = parser.parse_args(argv)
    cfg = load_params(args.params).serving
    run = best_run(args.metrics, args.exports)
    print(f"serving {run} (lowest 1-AUPRC of the exported runs)")
    serve_args = ["serve", str(args.exports / run), "--host", cfg.host, "--port", str(cfg.port),
                  "--max-batch", str(cfg.max_batch)]
    for flag, value in (("--request-threads", cfg.request_threads), ("--onnx-threads", cfg.onnx_threads)):
        if value is not None:
            serve_args += [flag, str(value)]
    return cli.main(serve_args)


if __name__ == "__main__":
    run_stage(main)
