"""params.yaml -> frozen dataclasses.

Every stage reads its settings only through `load_params`, so a typo in params.yaml fails loudly
with the key's dotted path instead of silently falling back to a default.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass
from pathlib import Path

import yaml

from slc.errors import PipelineError

PARAMS_FILE = Path("params.yaml")


class ConfigError(PipelineError, ValueError):
    """A params.yaml value that is missing, unknown or of the wrong type."""


@dataclass(frozen=True)
class SyntheticConfig:
    num_classes: int
    train_per_class: int
    test_per_class: int
    image_size: int


@dataclass(frozen=True)
class DataConfig:
    name: str
    root: str
    val_fraction: float
    seed: int
    train_limit: int | None
    image_size: int
    npz_path: str | None
    synthetic: SyntheticConfig

    def __post_init__(self):
        _require(0.0 < self.val_fraction < 1.0, "data.val_fraction", self.val_fraction,
                 "a fraction strictly between 0 and 1, e.g. 0.1")
        _require(self.train_limit is None or self.train_limit > 0, "data.train_limit",
                 self.train_limit, "null (all images) or a positive count")
        _require(self.image_size > 0, "data.image_size", self.image_size, "a positive size")


@dataclass(frozen=True)
class ModelConfig:
    name: str
    hidden: int
    channels: int


@dataclass(frozen=True)
class TrainConfig:
    epochs: int
    batch_size: int
    optimizer: str
    lr: float
    weight_decay: float
    margin: float
    self_norm_alpha: float
    nce_noise_samples: int
    nce_noise: str

    def __post_init__(self):
        for key in ("epochs", "batch_size", "nce_noise_samples"):
            _require(getattr(self, key) > 0, f"train.{key}", getattr(self, key), "a positive integer")
        for key in ("lr", "margin", "self_norm_alpha"):
            _require(getattr(self, key) > 0, f"train.{key}", getattr(self, key), "a positive number")


@dataclass(frozen=True)
class GridConfig:
    losses: list[str]
    seeds: list[int]

    def __post_init__(self):
        _require(len(self.losses) > 0, "grid.losses", self.losses, "a non-empty list of losses")
        _require(len(self.seeds) > 0, "grid.seeds", self.seeds, "a non-empty list of seeds")


@dataclass(frozen=True)
class RayConfig:
    address: str | None
    num_cpus: int | None
    num_workers: int
    use_gpu: bool
    cpus_per_worker: float | None
    max_concurrent_trials: int
    max_failures: int

    def __post_init__(self):
        _require(self.num_cpus is None or self.num_cpus > 0, "ray.num_cpus", self.num_cpus,
                 "null (every CPU of this machine) or a positive count")
        _require(self.num_workers > 0, "ray.num_workers", self.num_workers, "a positive integer")
        _require(self.cpus_per_worker is None or self.cpus_per_worker > 0, "ray.cpus_per_worker",
                 self.cpus_per_worker, "null (share the CPUs out) or a positive number")
        _require(self.max_concurrent_trials > 0, "ray.max_concurrent_trials", self.max_concurrent_trials,
                 "a positive integer")
        _require(self.max_failures >= -1, "ray.max_failures", self.max_failures,
                 "0 (no restarts), a positive count, or -1 (restart forever)")


@dataclass(frozen=True)
class MlflowConfig:
    experiment: str
    tracking_uri: str | None


@dataclass(frozen=True)
class EvaluateConfig:
    recalls: list[float]
    batch_size: int
    hist_bins: int

    def __post_init__(self):
        _require(all(0.0 < r <= 1.0 for r in self.recalls) and self.recalls, "evaluate.recalls",
                 self.recalls, "a non-empty list of recall targets in (0, 1]")
        _require(self.batch_size > 0, "evaluate.batch_size", self.batch_size, "a positive integer")
        _require(self.hist_bins > 0, "evaluate.hist_bins", self.hist_bins, "a positive integer")


@dataclass(frozen=True)
class ExportConfig:
    runs: str | list[str]
    classes: str | list[int]
    opset: int
    verify_atol: float
    verify_images: int

    def __post_init__(self):
        _require(self.runs == "all" or isinstance(self.runs, list), "export.runs", self.runs,
                 "'all' or a list of run names")
        _require(self.classes in ("all", "none") or isinstance(self.classes, list),
                 "export.classes", self.classes, "'all', 'none' or a list of class ids")
        _require(self.opset >= 18, "export.opset", self.opset, "18 or newer (torch.onnx.export's dynamo exporter)")
        _require(self.verify_atol > 0, "export.verify_atol", self.verify_atol, "a positive tolerance, e.g. 1e-4")
        _require(self.verify_images >= 2, "export.verify_images", self.verify_images,
                 "at least 2 (files are checked on batch 1 and on a larger batch)")


@dataclass(frozen=True)
class BenchmarkConfig:
    architectures: list[str]
    num_classes: list[int]
    batch_size: int
    threads: int
    warmup: int
    repeats: int
    providers: str | list[str]
    prepacking: bool
    bandwidth_mib: int

    def __post_init__(self):
        _require(len(self.architectures) > 0, "benchmark.architectures", self.architectures,
                 "a non-empty list such as [resnet50]")
        _require(len(self.num_classes) > 0 and all(k > 0 for k in self.num_classes), "benchmark.num_classes",
                 self.num_classes, "a non-empty list of positive class counts, e.g. [1, 16384, 400000]")
        for key in ("batch_size", "threads", "repeats", "bandwidth_mib"):
            _require(getattr(self, key) > 0, f"benchmark.{key}", getattr(self, key), "a positive integer")
        _require(self.warmup >= 0, "benchmark.warmup", self.warmup, "0 or more warm-up runs")


@dataclass(frozen=True)
class ServingConfig:
    host: str
    port: int
    max_batch: int
    replicas: int
    request_threads: int | None
    onnx_threads: int | None

    def __post_init__(self):
        _require(0 < self.port < 65536, "serving.port", self.port, "a TCP port, 1 to 65535")
        _require(self.max_batch > 0, "serving.max_batch", self.max_batch, "a positive number of images")
        _require(self.replicas > 0, "serving.replicas", self.replicas, "a positive number of replicas")
        for key in ("request_threads", "onnx_threads"):
            value = getattr(self, key)
            _require(value is None or value > 0, f"serving.{key}", value, "null (the default) or a positive count")


@dataclass(frozen=True)
class Params:
    data: DataConfig
    model: ModelConfig
    train: TrainConfig
    grid: GridConfig
    ray: RayConfig
    mlflow: MlflowConfig
    evaluate: EvaluateConfig
    export: ExportConfig
    benchmark: BenchmarkConfig
    serving: ServingConfig


def load_params(path: str | Path = PARAMS_FILE) -> Params:
    """Read and validate params.yaml (the only way stages get their settings)."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path} not found: run from the repository root, where params.yaml is") from None
    except yaml.YAMLError as error:
        raise ConfigError(f"{path} is not valid YAML: {error}") from None
    return from_dict(Params, raw)


def from_dict(cls, raw, path: str = ""):
    """Build dataclass `cls` from nested dicts, checking keys and types on the way down."""
    where = path or "params.yaml"
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping of keys, got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = [field.name for field in dataclasses.fields(cls)]
    unknown = sorted(set(raw) - set(names))
    if unknown:
        raise ConfigError(f"unknown key {_join(path, unknown[0])}: the keys of {where} are {', '.join(names)}")
    missing = [name for name in names if name not in raw]
    if missing:
        raise ConfigError(f"missing key {_join(path, missing[0])} ({_type_name(hints[missing[0]])})")
    return cls(**{name: _convert(raw[name], hints[name], _join(path, name)) for name in names})


def _convert(value, hint, path: str):
    if dataclasses.is_dataclass(hint):
        return from_dict(hint, value, path)
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        for option in typing.get_args(hint):
            try:
                return _convert(value, option, path)
            except ConfigError:
                continue
        raise _type_error(path, hint, value)
    if origin is list:
        if not isinstance(value, list):
            raise _type_error(path, hint, value)
        (item,) = typing.get_args(hint)
        return [_convert(v, item, f"{path}[{i}]") for i, v in enumerate(value)]
    if hint is type(None):
        if value is None:
            return None
        raise _type_error(path, hint, value)
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, hint) or (hint is int and isinstance(value, bool)):
        raise _type_error(path, hint, value)
    return value


def _require(ok: bool, path: str, value, expected: str):
    if not ok:
        raise ConfigError(f"{path} = {value!r} is invalid: expected {expected}")


def _type_error(path: str, hint, value) -> ConfigError:
    return ConfigError(f"{path} = {value!r} has the wrong type: expected {_type_name(hint)}")


def _type_name(hint) -> str:
    if hint is type(None):
        return "null"
    if isinstance(hint, type) and not typing.get_args(hint):
        return hint.__name__
    return str(hint).replace("typing.", "")


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key
