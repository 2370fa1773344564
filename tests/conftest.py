"""The settings tests run on: the repository's params.yaml, read once, and the shrunken copy that
the pipeline tests train with (the real pipeline on a scale two CPU cores finish in seconds)."""
import dataclasses
import functools
from pathlib import Path

import pytest
import yaml

from slc.core.config import Params, RunConfig
from slc.data.preparation import prepare
from slc.data.prepared import PreparedData
from slc.params import load_params

PARAMS_YAML = Path(__file__).resolve().parents[1] / "params.yaml"


# Building and running these on 2 CPU cores takes several seconds each (hundreds of millions of
# parameters, or a 224x224 input): they run with the slow tests.
HEAVY = {"regnet_y_128gf", "regnet_y_32gf", "regnet_x_32gf", "regnet_y_16gf", "vit_h_14", "vit_l_16",
         "vit_l_32", "vit_b_16", "vit_b_32", "maxvit_t", "convnext_large", "convnext_base",
         "efficientnet_v2_l", "wide_resnet101_2", "swin_v2_b", "swin_b", "vgg19_bn", "vgg19",
         "vgg16_bn", "vgg16", "vgg13_bn", "vgg13", "vgg11_bn", "vgg11", "resnext101_32x8d",
         "resnext101_64x4d", "inception_v3"}


@functools.cache
def repo_params() -> Params:
    """params.yaml as the stages read it; for module-level constants, where no fixture reaches."""
    return load_params(PARAMS_YAML)


def shrunken(params: Params, mlflow_dir: Path, losses=("ce", "bce"), epochs=1, batch_size=64, hidden=32,
             **ray_changes) -> Params:
    """`params` at test scale: an mlp of `hidden` units, `epochs` epochs of `batch_size` images,
    seed 0 of each of `losses`, a new local Ray of 2 CPUs (`ray_changes` on top), and MLflow in
    `mlflow_dir`/mlflow.db under the experiment "slc-test"."""
    return dataclasses.replace(
        params, model=dataclasses.replace(params.model, name="mlp", hidden=hidden),
        train=dataclasses.replace(params.train, epochs=epochs, batch_size=batch_size),
        grid=dataclasses.replace(params.grid, losses=list(losses), seeds=[0]),
        ray=dataclasses.replace(params.ray, address=None, num_cpus=2, cpus_per_worker=None, **ray_changes),
        mlflow=dataclasses.replace(params.mlflow, experiment="slc-test",
                                   tracking_uri=f"sqlite:///{mlflow_dir}/mlflow.db"))


def write_params(params: Params, path: Path) -> Path:
    """`params` as a params.yaml file, for a stage run by its command line."""
    path.write_text(yaml.safe_dump(dataclasses.asdict(params), sort_keys=False))
    return path


@pytest.fixture(scope="session")
def params() -> Params:
    """The repository's params.yaml."""
    return repo_params()


@pytest.fixture
def tiny_params(params, tmp_path):
    """`tiny_params(losses=..., epochs=..., **ray_changes)`: the shrunken params (see `shrunken`),
    with MLflow in this test's tmp_path."""
    return functools.partial(shrunken, params, tmp_path)


def prepared_synthetic(params: Params, root: Path, num_classes: int, train_per_class: int, test_per_class: int,
                       image_size: int) -> PreparedData:
    """Seeded synthetic data (prototypes plus noise) of these sizes, prepared under `root`."""
    synthetic = dataclasses.replace(params.data.synthetic, num_classes=num_classes, train_per_class=train_per_class,
                                    test_per_class=test_per_class, image_size=image_size)
    prepare(dataclasses.replace(params.data, name="synthetic", root=str(root / "raw"), synthetic=synthetic),
            root / "prepared")
    return PreparedData(root / "prepared")


@pytest.fixture
def tiny_run(tiny_params):
    """`tiny_run(loss, epochs, **train)`: a run of a 16-unit mlp on batches of 32 (`batch_size` changes it)."""
    def run_config(loss="ce", epochs=2, **train) -> RunConfig:
        shrunk = tiny_params(epochs=epochs, batch_size=32, hidden=16)
        return RunConfig(loss, 0, shrunk.model, dataclasses.replace(shrunk.train, **train))
    return run_config
