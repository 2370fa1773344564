"""params.yaml's sections as frozen, strict dataclasses (see slc.core.strict), and a trial's run config.

Every stage reads its settings through `slc.params.load_params`, so a typo in params.yaml fails
loudly with the key's dotted path instead of silently falling back to a default.
"""
from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass

from slc.core.strict import require, strict


@strict
class SyntheticConfig:
    num_classes: int
    train_per_class: int
    test_per_class: int
    image_size: int


@strict
class TuplesConfig:
    num_classes: int
    train_per_class: int
    val_per_class: int
    test_per_class: int
    long_tail: float

    def __post_init__(self):
        require(2 <= self.num_classes <= 10**7, "data.tuples.num_classes", self.num_classes,
                 "2 to 10,000,000 classes (one per ordered tuple of Fashion-MNIST classes)")
        for key in ("train_per_class", "val_per_class", "test_per_class"):
            require(getattr(self, key) > 0, f"data.tuples.{key}", getattr(self, key), "a positive integer")
        require(self.long_tail >= 0, "data.tuples.long_tail", self.long_tail,
                 "0 (every class equally frequent) or a positive Zipf exponent, e.g. 1.0")


@strict
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
        require(0.0 < self.val_fraction < 1.0, "data.val_fraction", self.val_fraction,
                 "a fraction strictly between 0 and 1, e.g. 0.1")
        require(self.train_limit is None or self.train_limit > 0, "data.train_limit",
                 self.train_limit, "null (all images) or a positive count")
        require(self.image_size > 0, "data.image_size", self.image_size, "a positive size")


@strict
class ModelConfig:
    name: str
    hidden: int
    channels: int
    weights: str | None
    head: str
    scale: float | None

    def __post_init__(self):
        require(self.scale is None or self.scale > 0, "model.scale", self.scale,
                 "null (sqrt(2) ln(k - 1), at least 1) or a positive number")
        require(self.scale is None or self.head == "cosine", "model.scale", self.scale,
                 "null: only model.head: cosine has a scale (its logits are scale x cosine + bias)")


@strict
class ZLossConfig:
    a: float  # softness of the hinge
    b: float  # how far the standardised true logit is pushed


@strict
class SmoothTopKConfig:
    alpha: float  # the margin of a subset that misses the true class
    tau: float    # temperature (0 would be the hard top-k SVM)


@strict
class MarginHeadConfig:
    scale: float   # the cosine head's s
    margin: float  # m, in cosine (CosFace) or radians (ArcFace)


@strict
class ThresholdHeadConfig:
    scale: float
    margin: float
    lam: float  # SphereFace2: the positive term's weight (the negatives' is 1 - lam); UniFace: the negatives'


@strict
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
    head_init: str
    head_init_per_class: int | None
    head_lr: float | None
    z_loss: ZLossConfig
    smooth_topk: SmoothTopKConfig
    cosface: MarginHeadConfig
    arcface: MarginHeadConfig
    sphereface2: ThresholdHeadConfig
    uniface: ThresholdHeadConfig

    def __post_init__(self):
        for section in ("z_loss", "smooth_topk", "cosface", "arcface", "sphereface2", "uniface"):
            for key, value in dataclasses.asdict(getattr(self, section)).items():
                require(value >= 0 if key == "margin" else value > 0, f"train.{section}.{key}", value,
                        "0 or more" if key == "margin" else "a positive number")
        require(self.sphereface2.lam < 1, "train.sphereface2.lam", self.sphereface2.lam,
                "a weight below 1 (the negatives weigh 1 - lam)")
        require(self.arcface.margin < math.pi / 2, "train.arcface.margin", self.arcface.margin,
                "an angle below pi / 2 radians (the paper's 0.5)")
        for key in ("epochs", "batch_size", "nce_noise_samples"):
            require(getattr(self, key) > 0, f"train.{key}", getattr(self, key), "a positive integer")
        require(self.candidates is None or self.candidates >= 1, "train.candidates", self.candidates,
                 "null (every class, the exact losses) or a number of sampled negative classes >= 1")
        require(self.val_classes is None or self.val_classes >= 1, "train.val_classes", self.val_classes,
                 "null (every class) or a number of classes to validate on >= 1")
        for key in ("lr", "margin", "self_norm_alpha"):
            require(getattr(self, key) > 0, f"train.{key}", getattr(self, key), "a positive number")
        require(0 <= self.warmup_epochs < self.epochs, "train.warmup_epochs", self.warmup_epochs,
                 f"0 or more epochs, fewer than train.epochs ({self.epochs})")
        require(self.head_init_per_class is None or self.head_init_per_class >= 1, "train.head_init_per_class",
                self.head_init_per_class, "null (every training image) or a number of images per class >= 1")
        require(self.head_lr is None or self.head_lr > 0, "train.head_lr", self.head_lr,
                 "null (train.lr) or a positive learning rate for the head's rows")
        require(self.loader_workers is None or self.loader_workers >= 0, "train.loader_workers",
                 self.loader_workers, "null (one per CPU of a Train worker, less one), 0 (load in the training "
                 "process) or a positive count")


@strict
class GridConfig:
    losses: list[str]
    seeds: list[int]

    def __post_init__(self):
        require(len(self.losses) > 0, "grid.losses", self.losses, "a non-empty list of losses")
        require(len(self.seeds) > 0, "grid.seeds", self.seeds, "a non-empty list of seeds")


@strict
class RayConfig:
    address: str | None
    num_cpus: int | None
    num_workers: int
    use_gpu: bool
    cpus_per_worker: float | None
    max_concurrent_trials: int
    max_failures: int

    def __post_init__(self):
        require(self.num_cpus is None or self.num_cpus > 0, "ray.num_cpus", self.num_cpus,
                 "null (every CPU of this machine) or a positive count")
        for key in ("num_workers", "max_concurrent_trials"):
            require(getattr(self, key) > 0, f"ray.{key}", getattr(self, key), "a positive integer")
        require(self.cpus_per_worker is None or self.cpus_per_worker > 0, "ray.cpus_per_worker",
                 self.cpus_per_worker, "null (share the CPUs out) or a positive number")
        require(self.max_failures >= -1, "ray.max_failures", self.max_failures,
                 "0 (no restarts), a positive count, or -1 (restart forever)")


@strict
class MlflowConfig:
    experiment: str
    tracking_uri: str | None


@strict
class EvaluateConfig:
    recalls: list[float]
    batch_size: int
    hist_bins: int
    classes: int | None

    def __post_init__(self):
        require(all(0.0 < r <= 1.0 for r in self.recalls) and self.recalls, "evaluate.recalls",
                 self.recalls, "a non-empty list of recall targets in (0, 1]")
        require(self.batch_size > 0, "evaluate.batch_size", self.batch_size, "a positive integer")
        require(self.hist_bins > 0, "evaluate.hist_bins", self.hist_bins, "a positive integer")
        require(self.classes is None or self.classes >= 1, "evaluate.classes", self.classes,
                 "null (every class) or a number of classes to sample >= 1")


@strict
class ExportConfig:
    runs: str | list[str]
    classes: str | int | list[int]
    opset: int
    verify_atol: float
    verify_rtol: float
    verify_images: int
    verify_classes: int
    registered_model: str | None
    registered_alias: str
    signing_key: str | None  # an EC private key (PEM) to sign each export with (serving.signing); SLC_SIGNING_KEY wins

    def __post_init__(self):
        require(self.runs == "all" or isinstance(self.runs, list), "export.runs", self.runs,
                 "'all' or a list of run names")
        require(self.classes in ("all", "none") or isinstance(self.classes, list)
                 or (isinstance(self.classes, int) and self.classes >= 0), "export.classes", self.classes,
                 "a count of classes to sample (e.g. 32), a list of class ids, 'all' or 'none'")
        require(self.opset >= 18, "export.opset", self.opset, "18 or newer (torch.onnx.export's dynamo exporter)")
        require(self.verify_atol > 0, "export.verify_atol", self.verify_atol, "a positive tolerance, e.g. 1e-4")
        require(0 <= self.verify_rtol < 1, "export.verify_rtol", self.verify_rtol,
                "a tolerance per unit of |logit| in [0, 1), e.g. 1e-5")
        require(self.verify_images >= 2, "export.verify_images", self.verify_images,
                 "at least 2 (files are checked on batch 1 and on a larger batch)")
        require(self.verify_classes >= 2, "export.verify_classes", self.verify_classes,
                 "at least 2 (the first and the last class are always among them)")
        name, alias = self.registered_model, self.registered_alias
        require(name is None or (name.strip() != "" and "/" not in name and ":" not in name), "export.registered_model",
                 name, "null (do not register) or a name without '/' or ':', e.g. slc")
        require(re.fullmatch(r"[\w-]+", alias) is not None and alias.lower() != "latest" and not re.fullmatch(r"[vV]\d+", alias),
                 "export.registered_alias", alias, "letters, digits, _ or -, but not 'latest' or v<number> (MLflow "
                 "reserves them), e.g. champion")


@strict
class BenchmarkConfig:
    architectures: list[str]
    num_classes: list[int]
    batch_size: int
    threads: int
    warmup: int
    repeats: int
    rounds: int
    providers: str | list[str]
    prepacking: bool
    bandwidth_mib: int

    def __post_init__(self):
        require(len(self.architectures) > 0, "benchmark.architectures", self.architectures,
                 "a non-empty list such as [resnet50]")
        require(len(self.num_classes) > 0 and all(k > 0 for k in self.num_classes), "benchmark.num_classes",
                 self.num_classes, "a non-empty list of positive class counts, e.g. [1, 16384, 400000]")
        for key in ("batch_size", "threads", "repeats", "bandwidth_mib"):
            require(getattr(self, key) > 0, f"benchmark.{key}", getattr(self, key), "a positive integer")
        require(self.warmup >= 0, "benchmark.warmup", self.warmup, "0 or more warm-up runs")
        require(1 <= self.rounds <= self.repeats, "benchmark.rounds", self.rounds,
                f"between 1 and benchmark.repeats ({self.repeats}); 4 or more to leave out outlier rounds")


@strict
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
        require(0 < self.port < 65536, "serving.port", self.port, "a TCP port, 1 to 65535")
        require(self.max_batch > 0, "serving.max_batch", self.max_batch, "a positive number of images")
        require(self.replicas > 0, "serving.replicas", self.replicas, "a positive number of replicas")
        for key in ("request_threads", "onnx_threads"):
            value = getattr(self, key)
            require(value is None or value > 0, f"serving.{key}", value, "null (the default) or a positive count")
        require(self.batch_wait_ms is None or self.batch_wait_ms > 0, "serving.batch_wait_ms", self.batch_wait_ms,
                 "null (no batching) or a positive number of milliseconds")
        for key in ("max_header_bytes", "max_headers", "request_timeout_s"):
            require(getattr(self, key) > 0, f"serving.{key}", getattr(self, key), "a positive number")


@strict
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


def run_name(loss: str, seed: int) -> str:
    """`<loss>-s<seed>`: the name of a trial, its MLflow run and its `models/` directory."""
    return f"{loss}-s{seed}"


@dataclass(frozen=True)
class RunConfig:
    """What makes one trial: the loss, the seed, and the model and train settings."""
    loss: str
    seed: int
    model: ModelConfig
    train: TrainConfig

    @property
    def run_name(self) -> str:
        return run_name(self.loss, self.seed)
