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


def _argv(stage: str) -> list[str]:
    """The stage's dvc.yaml `cmd`, split as a shell would."""
    return shlex.split(yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"][stage]["cmd"])


def command(stage: str, params: str) -> list[str]:
    """The stage's dvc.yaml command with this interpreter and `--params params`: what `dvc repro` runs."""
    argv = _argv(stage)
    if argv[:2] != ["python", "-m"]:
        raise ValueError(f"dvc.yaml: stage {stage}'s cmd is not `python -m <module> ...`: {argv}")
    return [sys.executable, *argv[1:], "--params", params]


def path_of(stage: str, option: str) -> Path:
    """The path the stage's command passes for `option` (e.g. evaluate's --metrics), relative to its folder."""
    argv = _argv(stage)
    if option not in argv:
        raise ValueError(f"dvc.yaml: stage {stage}'s cmd has no {option}: {argv}")
    return Path(argv[argv.index(option) + 1])
