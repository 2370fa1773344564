"""The pipeline's stages as dvc.yaml declares them, for a study that runs them in a folder of its own
(pipeline.scaling): each stage's command, and the paths its options name, read from dvc.yaml
itself, so those paths are named there alone.
"""
from __future__ import annotations

import shlex
import sys
from pathlib import Path

import yaml

from slc.core.closure import ROOT


def _stages() -> dict:
    return yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


def command(stage: str, params: str) -> list[str]:
    """The stage's dvc.yaml command with this interpreter and `--params params`: what `dvc repro` runs."""
    argv = shlex.split(_stages()[stage]["cmd"])
    if argv[:2] != ["python", "-m"]:
        raise ValueError(f"dvc.yaml: stage {stage}'s cmd is not `python -m <module> ...`: {argv}")
    return [sys.executable, *argv[1:], "--params", params]


def path_of(stage: str, option: str) -> Path:
    """The path the stage's command passes for `option` (e.g. evaluate's --metrics), relative to its folder."""
    argv = shlex.split(_stages()[stage]["cmd"])
    if option not in argv:
        raise ValueError(f"dvc.yaml: stage {stage}'s cmd has no {option}: {argv}")
    return Path(argv[argv.index(option) + 1])
