"""`prepare` stage: validate a dataset, carve the validation split, compute normalisation (slc.preparation)."""
from __future__ import annotations

import argparse
from pathlib import Path

from slc.config import load_params
from slc.errors import run_stage
from slc.preparation import prepare


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--out", default="data/prepared")
    args = parser.parse_args(argv)
    params = load_params(args.params)
    meta = prepare(params.data, Path(args.out))
    print(f"prepared {meta['dataset']}: {meta['splits']} images of shape {meta['input_shape']}, "
          f"{meta['num_classes']} classes -> {args.out}")


if __name__ == "__main__":
    run_stage(main)
