"""results/trials.json: one typed record per trial, with one writer (the train stage) and one reader.

A record is what later stages and a re-run know of a trial; a field renamed on one side and not
the other fails here, with the file and the trial named, instead of as a KeyError three stages on.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, ValidationError

from slc.core.errors import PipelineError
from slc.core.files import write_json


class RecordError(PipelineError, ValueError):
    """A trials.json that is missing or does not hold trial records."""


class TrialRecord(BaseModel):
    """One (loss, seed) trial of the grid as it ended; None where it did not get that far."""
    model_config = ConfigDict(extra="forbid", frozen=True)

    run_name: str
    loss: str
    seed: int
    status: Literal["finished", "failed"]
    error: str | None = None
    mlflow_run_id: str | None = None
    fingerprint: str | None = None      # what decided the model: an unchanged one is kept on re-run
    wall_time_s: float | None = None
    samples_per_s: float | None = None  # training throughput over every DDP worker
    head_init_s: float | None = None    # seconds train.head_init took before the first step
    # where a trial's wall time went (pipeline.ray_overhead): its Train worker starting (controller, worker
    # process, process group), of which the part until the worker's process existed, train_one (epochs,
    # validation, checkpoints, and reporting to Ray), the part of that blocked in Ray's report, and the
    # driver saving the model and logging it to MLflow
    startup_s: float | None = None
    spawn_s: float | None = None
    train_s: float | None = None
    report_s: float | None = None
    save_s: float | None = None
    epochs: int = 0
    train_loss: float | None = None
    val_accuracy: float | None = None
    val_mean_auprc: float | None = None
    model_dir: str | None = None
    resumed_from_epoch: int | None = None  # > 0 when Ray restarted a worker group from a checkpoint
    world_size: int | None = None
    shard_sizes: list[int] | None = None
    distinct_samples: int | None = None  # training examples seen by some worker (all of them under DDP)

    @property
    def finished(self) -> bool:
        return self.status == "finished"


def read_trials(path: str | Path) -> list[TrialRecord]:
    """trials.json as the train stage wrote it; anything else is a RecordError saying what to do."""
    path = Path(path)
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise RecordError(f"{path} not found: run the train stage first (`dvc repro train`)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise RecordError(f"{path} is not valid JSON ({error}); run `dvc repro train` to write it anew") from None
    if not isinstance(raw, list):
        raise RecordError(f"{path} must hold a JSON list of trial records, got {type(raw).__name__}")
    records = []
    for i, item in enumerate(raw):
        try:
            records.append(TrialRecord.model_validate(item))
        except ValidationError as error:
            first = error.errors()[0]
            where = ".".join(str(part) for part in first["loc"]) or "the record"
            name = item.get("run_name", f"#{i}") if isinstance(item, dict) else f"#{i}"
            raise RecordError(f"{path}: trial {name}: {where}: {first['msg']}; every record needs run_name, "
                              f"loss, seed and status ('finished' or 'failed')") from None
    return records


def write_trials(path: str | Path, records: list[TrialRecord]) -> None:
    write_json(path, [record.model_dump() for record in records])
