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

# A full model below 0.95 of its round's bandwidth floor read its head faster than the round's B allows:
# the floor's goal (a figure of every round that is not an outlier, `Ratio`).
FLOOR_TOLERANCE = 0.95


class _Record(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Timing(_Record):
    """One model's latency over repeated runs (`slc.bench.timing.spread`), and how its session was opened."""
    median_ms: float
    p10_ms: float
    p90_ms: float
    min_ms: float
    mean_ms: float
    repeats: int                 # timed samples
    runs_per_sample: int = 1     # back-to-back runs a sample averages (more than 1 for a fast model; 1 before it was)
    rounds_ms: list[float]       # the median of each round (`slc.bench.timing.time_interleaved`)
    load_s: float
    providers_used: list[str]


class Ratio(_Record):
    """A ratio of two models' times taken within each round, so both figures share the machine's state.
    `median`, `min` and `max` leave out the `outliers` (`slc.bench.benchmarking.outlier_rounds`): rounds
    whose two sessions of the backbone differ by more than FLOOR_TOLERANCE allows, or whose backbone
    time is beyond Tukey's fences of that k's rounds. `rounds` holds every round."""
    median: float
    min: float
    max: float
    rounds: list[float]
    outliers: list[int]          # indices into `rounds`


class AtK(_Record):
    """One architecture with a k-class head: the models' times, the bandwidth read in the same rounds,
    and the ratios the goals are judged on."""
    backbone: Timing
    control: Timing | None = None  # the backbone again, in a second session: what noise alone makes of a ratio
                                   # of 1 (None in a run from before it was timed)
    full: Timing
    single_logit: Timing
    head: Timing                 # the head alone (features -> k logits): exactly the bytes the floor counts
    gbps: list[float]            # B per round: the fastest of the bandwidth reads and the head alone
    predicted_full_ms: float     # the floor, median over rounds: backbone + 4·d·k / B of the same round
    full_vs_floor: Ratio         # >= 1 for a correct measurement, up to each round's noise
    full_vs_backbone_plus_head: Ratio
    single_vs_backbone: Ratio
    speedup: float               # full / single_logit, medians over every run
    speedup_limit: float         # predicted full / backbone: the speedup over a full model at the floor
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
    bandwidth: dict              # B over every round (`slc.bench.benchmarking.bandwidth_summary`)
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
