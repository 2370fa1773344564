"""`make serve`: serve every exported run with `slc serve`, the best (lowest test 1-AUPRC in
metrics/slc.json) as the default one.

serving/ never reads params.yaml or the pipeline's files; this bridge does, then hands over.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from serving import cli
from slc.core.errors import run_stage
from slc.export.model_registry import best_run
from slc.params import load_params


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--metrics", type=Path, default=Path("metrics/slc.json"))
    parser.add_argument("--exports", type=Path, default=Path("exports"))
    args = parser.parse_args(argv)
    cfg = load_params(args.params).serving
    run = best_run(args.metrics, args.exports)
    print(f"serving every run of {args.exports}/, by default {run} (lowest 1-AUPRC of the exported runs)")
    serve_args = ["serve", str(args.exports), "--default-run", run, "--host", cfg.host, "--port", str(cfg.port),
                  "--max-batch", str(cfg.max_batch), "--max-header-bytes", str(cfg.max_header_bytes),
                  "--max-headers", str(cfg.max_headers), "--request-timeout-s", str(cfg.request_timeout_s)]
    for flag, value in (("--request-threads", cfg.request_threads), ("--onnx-threads", cfg.onnx_threads),
                        ("--batch-wait-ms", cfg.batch_wait_ms), ("--token-file", cfg.token_file),
                        ("--public-key", cfg.public_key)):
        if value is not None:
            serve_args += [flag, str(value)]
    return cli.main(serve_args)


if __name__ == "__main__":
    run_stage(main)
