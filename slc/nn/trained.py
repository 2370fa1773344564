"""A trained model on disk, `models/<run_name>/`: its weights (model.pt) and its config.json, all
that is needed to rebuild it; one writer (the train stage) and one reader (every later stage).
"""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import torch
from torch import nn

from slc.core.config import ModelConfig, RunConfig
from slc.core.errors import PipelineError
from slc.core.strict import from_dict
from slc.data.prepared import PreparedData
from slc.nn.models import SLCNet, build_model

TRAINED_INFO_KEYS = ("run_name", "loss", "seed", "model", "train", "dataset", "input_shape",
                     "num_classes", "class_names", "normalisation")


def save_trained(model: nn.Module, run_dir: str | Path, info: dict) -> None:
    """models/<run_name>/{model.pt, config.json}: weights plus all that is needed to rebuild them.

    A DistributedDataParallel wrapper is unwrapped, so the file loads into a plain SLCNet.
    """
    missing = [key for key in TRAINED_INFO_KEYS if key not in info]
    if missing:
        raise ValueError(f"save_trained: info lacks {', '.join(missing)}; it needs {', '.join(TRAINED_INFO_KEYS)}")
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    state = getattr(model, "module", model).state_dict()
    torch.save(state, run_dir / "model.pt.tmp")
    os.replace(run_dir / "model.pt.tmp", run_dir / "model.pt")
    (run_dir / "config.json").write_text(json.dumps(info, indent=2) + "\n")


def trained_info(config: RunConfig, data: PreparedData) -> dict:
    """The config.json of a trained model: what `save_trained` writes beside its weights."""
    return {"run_name": config.run_name, "loss": config.loss, "seed": config.seed,
            "model": dataclasses.asdict(config.model), "train": dataclasses.asdict(config.train),
            "dataset": data.meta["dataset"], "input_shape": list(data.input_shape),
            "num_classes": data.num_classes, "class_names": data.class_names,
            "normalisation": data.meta["normalisation"]}


class MissingModelError(PipelineError, FileNotFoundError):
    """models/<run>/ lacks its config.json or model.pt: the train stage has not made it."""


def load_trained(run_dir: str | Path) -> tuple[SLCNet, dict]:
    """A trained model on the CPU in eval mode, and its config.json."""
    run_dir = Path(run_dir)
    try:
        info = json.loads((run_dir / "config.json").read_text())
        state = torch.load(run_dir / "model.pt", map_location="cpu", weights_only=True)
    except FileNotFoundError as error:
        raise MissingModelError(f"{error.filename} not found: {run_dir} is not a trained model "
                                  f"(run the train stage, `dvc repro train`)") from None
    model = build_model(from_dict(ModelConfig, info["model"], "model"), tuple(info["input_shape"]), info["num_classes"])
    model.load_state_dict(state)
    return model.eval(), info
