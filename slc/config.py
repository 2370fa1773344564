"""params.yaml -> frozen dataclasses, checked by pydantic.

Every stage reads its settings only through `load_params`, so a typo in params.yaml fails loudly
with the key's dotted path instead of silently falling back to a default.
"""
from __future__ import annotations

import dataclasses
import json
import re
import typing
from pathlib import Path

import yaml
from pydantic import ConfigDict, ValidationError
from pydantic.dataclasses import dataclass

from slc.errors import PipelineError

PARAMS_FILE = Path("params.yaml")


class ConfigError(PipelineError, ValueError):
    """A params.yaml value that is missing, unknown or of the wrong type."""


def _config(cls):
    """A frozen pydantic dataclass, strict ("five", 2.5 or true for an int is an error, not a guess;
    an int still makes a float). It stays a dataclass, so `dataclasses.replace` (which re-validates)
    and `asdict` work, and its every failure, a direct construction's too, is a ConfigError."""
    cls = dataclass(frozen=True, config=ConfigDict(extra="forbid", strict=True))(cls)
    validate = cls.__init__

    def __init__(self, *args, **kwargs):
        try:
            validate(self, *args, **kwargs)
        except ValidationError as error:
            raise _config_error(type(self), error, type(self).__name__) from None

    cls.__init__ = __init__
    return cls


@_config
class SyntheticConfig:
    num_classes: int
    train_per_class: int
    test_per_class: int
    image_size: int


@_config
class TuplesConfig:
    num_classes: int
    train_per_class: int
    val_per_class: int
    test_per_class: int
    long_tail: float

    def __post_init__(self):
        _require(2 <= self.num_classes <= 10**7, "data.tuples.num_classes", self.num_classes,
                 "2 to 10,000,000 classes (one per ordered tuple of Fashion-MNIST classes)")
        for key in ("train_per_class", "val_per_class", "test_per_class"):
            _require(getattr(self, key) > 0, f"data.tuples.{key}", getattr(self, key), "a positive integer")
        _require(self.long_tail >= 0, "data.tuples.long_tail", self.long_tail,
                 "0 (every class equally frequent) or a positive Zipf exponent, e.g. 1.0")


@_config
class DataConfig:
    name: str
    root: str
    val_fraction: float
    seed: int
    train_limit: int | None
    image_size: int
    npz_path: str | None
    synthetic: SyntheticConfig
    tuples: TuplesConfig

    def __post_init__(self):
        _require(0.0 < self.val_fraction < 1.0, "data.val_fraction", self.val_fraction,
                 "a fraction strictly between 0 and 1, e.g. 0.1")
        _require(self.train_limit is None or self.train_limit > 0, "data.train_limit",
                 self.train_limit, "null (all images) or a positive count")
        _require(self.image_size > 0, "data.image_size", self.image_size, "a positive size")


@_config
class ModelConfig:
    name: str
    hidden: int
    channels: int
    weights: str | None


@_config
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
    candidates: int | None
    val_classes: int | None
    lr_schedule: str
    warmup_epochs: int
    augment: str
    amp: bool
    loader_workers: int | None

    def __post_init__(self):
        for key in ("epochs", "batch_size", "nce_noise_samples"):
            _require(getattr(self, key) > 0, f"train.{key}", getattr(self, key), "a positive integer")
        _require(self.candidates is None or self.candidates >= 1, "train.candidates", self.candidates,
                 "null (every class, the exact losses) or a number of sampled negative classes >= 1")
        _require(self.val_classes is None or self.val_classes >= 1, "train.val_classes", self.val_classes,
                 "null (every class) or a number of classes to validate on >= 1")
        for key in ("lr", "margin", "self_norm_alpha"):
            _require(getattr(self, key) > 0, f"train.{key}", getattr(self, key), "a positive number")
        _require(0 <= self.warmup_epochs < self.epochs, "train.warmup_epochs", self.warmup_epochs,
                 f"0 or more epochs, fewer than train.epochs ({self.epochs})")
        _require(self.loader_workers is None or self.loader_workers >= 0, "train.loader_workers",
                 self.loader_workers, "null (one per CPU of a Train worker, less one), 0 (load in the training "
                 "process) or a positive count")


@_config
class GridConfig:
    losses: list[str]
    seeds: list[int]

    def __post_init__(self):
        _require(len(self.losses) > 0, "grid.losses", self.losses, "a non-empty list of losses")
        _require(len(self.seeds) > 0, "grid.seeds", self.seeds, "a non-empty list of seeds")


@_config
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
        for key in ("num_workers", "max_concurrent_trials"):
            _require(getattr(self, key) > 0, f"ray.{key}", getattr(self, key), "a positive integer")
        _require(self.cpus_per_worker is None or self.cpus_per_worker > 0, "ray.cpus_per_worker",
                 self.cpus_per_worker, "null (share the CPUs out) or a positive number")
        _require(self.max_failures >= -1, "ray.max_failures", self.max_failures,
                 "0 (no restarts), a positive count, or -1 (restart forever)")


@_config
class MlflowConfig:
    experiment: str
    tracking_uri: str | None


@_config
class EvaluateConfig:
    recalls: list[float]
    batch_size: int
    hist_bins: int
    classes: int | None

    def __post_init__(self):
        _require(all(0.0 < r <= 1.0 for r in self.recalls) and self.recalls, "evaluate.recalls",
                 self.recalls, "a non-empty list of recall targets in (0, 1]")
        _require(self.batch_size > 0, "evaluate.batch_size", self.batch_size, "a positive integer")
        _require(self.hist_bins > 0, "evaluate.hist_bins", self.hist_bins, "a positive integer")
        _require(self.classes is None or self.classes >= 1, "evaluate.classes", self.classes,
                 "null (every class) or a number of classes to sample >= 1")


@_config
class ExportConfig:
    runs: str | list[str]
    classes: str | int | list[int]
    opset: int
    verify_atol: float
    verify_images: int
    verify_classes: int
    registered_model: str | None
    registered_alias: str
    signing_key: str | None  # an EC private key (PEM) to sign each export with (serving.signing); SLC_SIGNING_KEY wins

    def __post_init__(self):
        _require(self.runs == "all" or isinstance(self.runs, list), "export.runs", self.runs,
                 "'all' or a list of run names")
        _require(self.classes in ("all", "none") or isinstance(self.classes, list)
                 or (isinstance(self.classes, int) and self.classes >= 0), "export.classes", self.classes,
                 "a count of classes to sample (e.g. 32), a list of class ids, 'all' or 'none'")
        _require(self.opset >= 18, "export.opset", self.opset, "18 or newer (torch.onnx.export's dynamo exporter)")
        _require(self.verify_atol > 0, "export.verify_atol", self.verify_atol, "a positive tolerance, e.g. 1e-4")
        _require(self.verify_images >= 2, "export.verify_images", self.verify_images,
                 "at least 2 (files are checked on batch 1 and on a larger batch)")
        _require(self.verify_classes >= 2, "export.verify_classes", self.verify_classes,
                 "at least 2 (the first and the last class are always among them)")
        name, alias = self.registered_model, self.registered_alias
        _require(name is None or (name.strip() != "" and "/" not in name and ":" not in name), "export.registered_model",
                 name, "null (do not register) or a name without '/' or ':', e.g. slc")
        _require(re.fullmatch(r"[\w-]+", alias) is not None and alias.lower() != "latest" and not re.fullmatch(r"[vV]\d+", alias),
                 "export.registered_alias", alias, "letters, digits, _ or -, but not 'latest' or v<number> (MLflow "
                 "reserves them), e.g. champion")


@_config
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


@_config
class ServingConfig:
    host: str
    port: int
    max_batch: int
    replicas: int
    request_threads: int | None
    onnx_threads: int | None
    batch_wait_ms: float | None
    token_file: str | None
    public_key: str | None  # the EC public key (PEM) an export's signature must verify with; SLC_PUBLIC_KEY wins
    max_header_bytes: int
    max_headers: int
    request_timeout_s: float

    def __post_init__(self):
        _require(0 < self.port < 65536, "serving.port", self.port, "a TCP port, 1 to 65535")
        _require(self.max_batch > 0, "serving.max_batch", self.max_batch, "a positive number of images")
        _require(self.replicas > 0, "serving.replicas", self.replicas, "a positive number of replicas")
        for key in ("request_threads", "onnx_threads"):
            value = getattr(self, key)
            _require(value is None or value > 0, f"serving.{key}", value, "null (the default) or a positive count")
        _require(self.batch_wait_ms is None or self.batch_wait_ms > 0, "serving.batch_wait_ms", self.batch_wait_ms,
                 "null (no batching) or a positive number of milliseconds")
        for key in ("max_header_bytes", "max_headers", "request_timeout_s"):
            _require(getattr(self, key) > 0, f"serving.{key}", getattr(self, key), "a positive number")


@_config
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
    """Build config class `cls` from nested dicts; `path` is where `raw` sits in params.yaml."""
    # via JSON: strict Python mode takes only instances for the sections, strict JSON mode takes objects
    try:
        return cls.__pydantic_validator__.validate_json(json.dumps(raw, default=str))
    except ValidationError as error:
        raise _config_error(cls, error, path) from None


def _config_error(cls, error: ValidationError, path: str) -> ConfigError:
    """pydantic's first error as one line that names the key's dotted path (an unknown key first:
    it is likely the typo of a missing one)."""
    first = min(error.errors(), key=lambda e: not e["type"].startswith("unexpected"))
    if first["type"] == "value_error" and isinstance(first["ctx"]["error"], ConfigError):
        return first["ctx"]["error"]  # a range check of __post_init__, already worded
    hint, where = cls, path
    for key in first["loc"]:  # down to the key's declared type; a union's option name or an unknown key stops it
        if isinstance(key, int) and dataclasses.is_dataclass(hint) and key < len(hint.__pydantic_fields__):
            key = list(hint.__pydantic_fields__)[key]  # a positional argument of a direct construction
        if isinstance(key, int) and typing.get_origin(hint) is list:
            hint, where = typing.get_args(hint)[0], f"{where}[{key}]"
        elif dataclasses.is_dataclass(hint) and key in hint.__pydantic_fields__:
            hint, where = hint.__pydantic_fields__[key].annotation, f"{where}.{key}".lstrip(".")
        else:
            break
    expected = str(hint) if typing.get_args(hint) else hint.__name__
    if first["type"].startswith("unexpected"):
        key = f"{where}.{first['loc'][-1]}".lstrip(".")
        names = ", ".join(field.name for field in dataclasses.fields(hint))
        return ConfigError(f"unknown key {key}: the keys of {where or 'params.yaml'} are {names}")
    if first["type"] == "missing":
        return ConfigError(f"missing key {where} ({expected})")
    if first["type"] == "dataclass_type":
        return ConfigError(f"{where or 'params.yaml'}: expected a mapping of keys, got {first['input']!r}")
    return ConfigError(f"{where} = {first['input']!r} has the wrong type: expected {expected}")


def _require(ok: bool, path: str, value, expected: str):
    if not ok:
        raise ConfigError(f"{path} = {value!r} is invalid: expected {expected}")
