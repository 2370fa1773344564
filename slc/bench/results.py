"""metrics/speedup.json: the benchmark's figures as typed records, with one writer and one reader.

`slc.bench.benchmarking` measures into these records, `slc.bench.report` and the README's results
read them; a figure renamed on one side fails here, naming the field, not as a KeyError in a table.
"""
from __future__ import annotations

import json
from pathlib import Path

from pydantic import BaseModel, ConfigDict, ValidationError

from slc.core.errors import PipelineError
from slc.core.files import write_json


class _Record(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Timing(_Record):
    """One model's latency over repeated runs (`slc.bench.timing.spread`), and how its session was opened."""
    median_ms: float
    p10_ms: float
    p90_ms: float
    min_ms: float
    mean_ms: float
    repeats: int
    load_s: float
    providers_used: list[str]


class AtK(_Record):
    """One architecture with a k-class head: the three models' times and what they are judged by."""
    backbone: Timing
    full: Timing
    single_logit: Timing
    predicted_full_ms: float     # the floor: the backbone plus one read of the head at the bandwidth bound B
    full_vs_predicted: float     # >= 1 for a correct measurement (up to the backbone's noise)
    single_vs_backbone: float
    speedup: float               # full / single_logit
    speedup_limit: float         # predicted full / backbone: the speedup over a full model at the floor;
                                 # speedup >= speedup_limit * backbone / single_logit
    peak_rss_gb: float
    head_gb: float


class Architecture(_Record):
    """A network timed at one or more k: a benchmarked architecture, or a trained run's export at its k."""
    d: int                       # feature size: the head is d x k
    input_shape: list[int]
    k: dict[int, AtK]

    @property
    def largest(self) -> AtK:
        return self.k[max(self.k)]


class SpeedupResults(_Record):
    machine: dict                # serving.machine.machine_info plus torch and the GPU
    settings: dict               # params.yaml's benchmark section and the session options
    bandwidth: dict              # slc.bench.timing.memory_bandwidth
    architectures: dict[str, Architecture]
    exports: dict[str, Architecture]       # trained run -> its export at its own k
    goals: dict[str, float | bool]         # flat, so that `dvc metrics` shows them


class ResultsError(PipelineError, ValueError):
    """A speedup.json that is missing or does not hold the benchmark's records."""


def read_speedup(path: str | Path) -> SpeedupResults:
    path = Path(path)
    try:
        return parse_speedup(json.loads(path.read_text()), path)
    except FileNotFoundError:
        raise ResultsError(f"{path} not found: run the benchmark stage (`dvc repro benchmark`)") from None


def parse_speedup(figures, path: str | Path) -> SpeedupResults:
    """The records from speedup.json's parsed JSON; a file of an older layout fails naming the field."""
    try:
        return SpeedupResults.model_validate(figures)
    except ValidationError as error:
        first = error.errors()[0]
        where = ".".join(str(part) for part in first["loc"])
        raise ResultsError(f"{path}: {where}: {first['msg']}; run `dvc repro benchmark` to write it anew") from None


def write_speedup(path: str | Path, results: SpeedupResults) -> None:
    write_json(path, results.model_dump(mode="json"))
