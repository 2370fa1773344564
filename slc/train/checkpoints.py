"""A run's checkpoints: one folder per epoch in the run's work directory, written atomically, and
resumed only by a run of the same configuration.
"""
from __future__ import annotations

import dataclasses
import os
import shutil
from pathlib import Path

import torch

from slc.core.config import RunConfig

CHECKPOINT_FILE = "checkpoint.pt"


def latest(workdir: Path) -> Path | None:
    done = sorted(workdir.glob(f"epoch-*/{CHECKPOINT_FILE}"))
    return done[-1].parent if done else None


def folder(workdir: Path, epoch: int) -> Path:
    return workdir / f"epoch-{epoch:04d}"


def save(target: Path, state: dict) -> None:
    """target/checkpoint.pt, written atomically; the other epochs' directories are removed after."""
    target.mkdir(parents=True, exist_ok=True)
    torch.save(state, target / f"{CHECKPOINT_FILE}.tmp")
    os.replace(target / f"{CHECKPOINT_FILE}.tmp", target / CHECKPOINT_FILE)
    for old in target.parent.glob("epoch-*"):
        if old != target:
            shutil.rmtree(old, ignore_errors=True)


def resume_key(config: RunConfig) -> dict:
    """What a checkpoint must agree on to be resumed; not `epochs`, so a finished run can be extended,
    nor `loader_workers`, which does not change what is trained."""
    fingerprint = dataclasses.asdict(config)
    for key in ("epochs", "loader_workers"):
        del fingerprint["train"][key]
    return fingerprint


def load(directory: Path, config: RunConfig) -> dict:
    state = torch.load(directory / CHECKPOINT_FILE, map_location="cpu", weights_only=False)
    if state["config"] != resume_key(config):
        raise ValueError(f"{directory} holds a checkpoint of another configuration ({state['config']}), "
                         f"not {resume_key(config)}: delete it or train in another directory")
    return state
