"""`prepare` stage: validate a dataset, carve the validation split, compute normalisation (slc.data.preparation)."""
from __future__ import annotations

import argparse
from pathlib import Path

from slc.core.errors import run_stage
from slc.data.preparation import prepare
from slc.params import load_params


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    params = load_params(args.params)
    meta = prepare(params.data, Path(args.out))
    print(f"prepared {meta['dataset']}: {meta['splits']} images of shape {meta['input_shape']}, "
          f"{meta['num_classes']} classes -> {args.out}")


if __name__ == "__main__":
    run_stage(main)
