"""The paper's experiments as presets: valid params, DVC-parsable, and runnable on their data's real formats."""
import dataclasses
from pathlib import Path

import pytest
import yaml

from pipeline import presets
from pipeline.presets import PRESETS, dvc_command, preset_params
from slc.core.config import RunConfig
from slc.core.errors import ConfigError
from slc.data.preparation import prepare
from slc.data.prepared import PreparedData
from slc.studies import cost
from slc.studies.cost import forward_flops, training_cost
from slc.train.training import train_one
from tests.conftest import HEAVY
from tests.formats import write_torchvision_dataset


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_a_preset_is_valid_params_with_its_changes_applied(name):
    params = preset_params(name)
    for dotted, value in PRESETS[name].items():
        section, *keys = dotted.split(".")
        found = getattr(params, section)
        for key in keys:
            found = getattr(found, key)
        assert found == value, dotted


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_the_dvc_command_sets_what_the_preset_says(name):
    command = dvc_command(name)
    assert command[:5] == ["dvc", "exp", "run", "--name", name]
    pairs = [arg.split("=", 1) for arg in command[6::2]]
    assert command[5::2] == ["-S"] * len(pairs)
    assert {key: yaml.safe_load(value) for key, value in pairs} == PRESETS[name]
    assert not [value for _, value in pairs if "\n" in value], "dvc's -S parser takes one line per value"


def test_the_readme_documents_every_preset():
    readme = Path("README.md").read_text()
    assert [name for name in PRESETS if f"python -m pipeline.presets {name}" not in readme] == []


def test_a_preset_key_that_params_yaml_lacks_is_refused(monkeypatch):
    monkeypatch.setitem(PRESETS, "typo", {"train.epoch": 3})
    with pytest.raises(ConfigError, match="preset key train.epoch is not in params.yaml"):
        preset_params("typo")
    with pytest.raises(ConfigError, match="unknown preset 'mnist'; presets: mnist_mlp"):
        preset_params("mnist")


def test_print_shows_the_command_without_running_it(capsys):
    assert presets.main(["svhn_conv6", "--print"]) == 0
    assert capsys.readouterr().out.startswith("dvc exp run --name svhn_conv6 -S data.name=svhn -S model.name=conv6")


def slow_if_heavy(name):
    """A preset whose network test_models builds only with the slow tests (inception_v3, here at
    its 299x299 input) trains with them too, as does the 400,000-class one, so `-m "not slow"` stays fast."""
    heavy = PRESETS[name].get("model.name") in HEAVY or PRESETS[name].get("data.name") == "tuples"  # 400,000 classes
    return pytest.param(name, marks=pytest.mark.slow) if heavy else name


@pytest.mark.parametrize("name", [slow_if_heavy(name) for name in sorted(PRESETS)])
def test_a_preset_trains_on_its_datasets_real_file_format(name, tmp_path, monkeypatch):
    """Its dataset in torchvision's (or ImageNet's) real layout, its network at its input size, one
    epoch of its first loss on CPU with its recipe (augmentation, schedule, autocast): everything but
    the GPU cluster's scale."""
    params = preset_params(name)
    write_torchvision_dataset(params.data.name, tmp_path / "raw", monkeypatch)
    prepare(dataclasses.replace(params.data, root=str(tmp_path / "raw"), train_limit=20), tmp_path / "prepared")
    data = PreparedData(tmp_path / "prepared")
    run = RunConfig(params.grid.losses[0], 0, params.model,
                    dataclasses.replace(params.train, epochs=1, warmup_epochs=0, batch_size=4))
    result = train_one(run, data, tmp_path / "work", progress=False)
    assert result.status == "finished" and result.epochs_completed == 1, result.error
    assert result.model.head.out_features == data.meta["num_classes"]


def test_the_forward_flops_are_counted_on_the_presets_network(params):
    """The paper's MNIST mlp: 784 x 1024 and 1024 x 10 multiply-adds, two FLOPs each."""
    mlp = preset_params("mnist_mlp")
    assert forward_flops(mlp, (1, 28, 28), 10) == 2 * (784 * 1024 + 1024 * 10)


def test_resnet50_at_224_counts_the_published_4_1_billion_multiply_adds_twice(params):
    """torchvision publishes 4.09 GFLOPS for ResNet-50 (multiply-adds); counted apart, about 8.2 billion."""
    resnet50 = dataclasses.replace(params, model=dataclasses.replace(params.model, name="resnet50", weights=None))
    assert forward_flops(resnet50, (3, 224, 224), 1000) == pytest.approx(2 * 4.09e9, rel=0.02)


# Training images of the public datasets, as their authors publish them (not the registry's record).
PUBLISHED_TRAIN_IMAGES = {"mnist": 60_000, "fashion_mnist": 60_000, "svhn": 73_257, "cifar10": 50_000,
                          "cifar100": 50_000, "imagenet": 1_281_167}


@pytest.fixture
def one_gflop_forward(monkeypatch):
    """forward_flops at 1 GFLOP an image, recording the (input shape, classes) it was asked about."""
    asked = []
    monkeypatch.setattr(cost, "forward_flops", lambda params, shape, k: asked.append((shape, k)) or 1e9)
    return asked


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_an_epoch_is_the_published_training_set_less_the_validation_fraction(name, one_gflop_forward):
    params = preset_params(name)
    if params.data.name == "tuples":  # made on the fly: k classes of train_per_class images
        expected = params.data.tuples.num_classes * params.data.tuples.train_per_class
    else:
        expected = round(PUBLISHED_TRAIN_IMAGES[params.data.name] * (1 - params.data.val_fraction))
    assert training_cost(params, tflops=100).images_per_epoch == expected


@pytest.mark.parametrize("name, shape, classes", [("mnist_mlp", (1, 28, 28), 10), ("svhn_conv6", (3, 32, 32), 10),
                                                  ("cifar10_conv6", (3, 32, 32), 10),
                                                  ("cifar100_conv6", (3, 32, 32), 100),
                                                  ("imagenet_inception_v3", (3, 299, 299), 1000),
                                                  ("many_classes_400k", (1, 28, 28 * 6), 400_000)])
def test_the_network_is_counted_at_its_datasets_input_shape_and_classes(name, shape, classes, one_gflop_forward):
    training_cost(preset_params(name), tflops=100)
    assert one_gflop_forward == [(shape, classes)]


def test_gpu_hours_grow_linearly_with_the_epochs(one_gflop_forward):
    params = preset_params("cifar10_conv6")
    longer = dataclasses.replace(params, train=dataclasses.replace(params.train, epochs=3 * params.train.epochs))
    assert training_cost(longer, tflops=100).gpu_hours == pytest.approx(3 * training_cost(params, tflops=100).gpu_hours)


def test_twice_the_assumed_throughput_halves_the_gpu_hours_and_doubles_the_images_a_gpu_needs(one_gflop_forward):
    params = preset_params("cifar10_conv6")
    slow, fast = training_cost(params, tflops=50), training_cost(params, tflops=100)
    assert fast.gpu_hours == pytest.approx(slow.gpu_hours / 2)
    assert fast.images_per_s_per_gpu == pytest.approx(2 * slow.images_per_s_per_gpu)
    assert fast.total_pflop == slow.total_pflop


def test_twice_the_seeds_is_twice_the_runs_and_the_work(one_gflop_forward):
    params = preset_params("cifar10_conv6")
    seeds = list(range(2 * len(params.grid.seeds)))
    doubled = dataclasses.replace(params, grid=dataclasses.replace(params.grid, seeds=seeds))
    once, twice = training_cost(params, tflops=100), training_cost(doubled, tflops=100)
    assert (once.runs, twice.runs) == (7 * 3, 7 * 6)  # the 7 losses of params.yaml's grid, 3 seeds, then 6
    assert twice.total_pflop == pytest.approx(2 * once.total_pflop)
    assert twice.gpu_hours == pytest.approx(2 * once.gpu_hours)


def test_a_training_step_costs_three_forwards(one_gflop_forward):
    """Forward, then the backward's activation and weight gradients: 1 GFLOP images at 3 TFLOP/s, 1,000 a second."""
    assert training_cost(preset_params("cifar10_conv6"), tflops=3).images_per_s_per_gpu == pytest.approx(1000)


def test_a_gpu_hour_at_one_tflops_is_3_6_pflop(one_gflop_forward):
    """Units: total PFLOP over the assumed TFLOP/s, in hours, whatever the network."""
    c = training_cost(preset_params("mnist_mlp"), tflops=1)
    assert c.gpu_hours == pytest.approx(c.total_pflop / 3.6)


def test_cost_prints_a_row_for_every_preset(capsys, monkeypatch):
    monkeypatch.setattr(presets, "training_cost", lambda params, tflops: training_cost(
        dataclasses.replace(params, model=dataclasses.replace(params.model, name="mlp", hidden=8)), tflops))
    assert presets.main(["--cost", "--tflops", "50"]) == 0
    out = capsys.readouterr().out
    assert "GPU-hours at 50 TFLOP/s" in out
    assert [name for name in PRESETS if f"| {name} |" not in out] == []


def test_cost_of_a_dataset_without_known_size_is_refused(params):
    with pytest.raises(ValueError, match="no size on record for data.name 'folder'"):
        training_cost(dataclasses.replace(params, data=dataclasses.replace(params.data, name="folder")), 100)


def test_the_readme_shows_each_presets_recipe_as_it_runs():
    assert presets.recipe_table() in Path("README.md").read_text()
