"""The paper's experiments as presets: valid params, DVC-parsable, and runnable on their data's real formats."""
import dataclasses
from pathlib import Path

import pytest
import yaml

from pipeline import presets
from pipeline.presets import PRESETS, dvc_command, preset_params
from slc.config import ConfigError
from slc.cost import forward_flops, training_cost
from slc.data import PreparedData
from slc.preparation import prepare
from slc.training import RunConfig, train_one
from tests.formats import write_torchvision_dataset
from tests.unit.test_models import HEAVY


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


def test_the_cost_of_a_grid_is_three_forwards_per_image_epoch_and_run():
    cost = training_cost(preset_params("cifar10_conv6"), tflops=100)
    assert (cost.images_per_epoch, cost.epochs, cost.runs) == (45_000, 50, 21)
    assert cost.total_pflop * 1e15 == pytest.approx(3 * cost.forward_gflop * 1e9 * 45_000 * 50 * 21)
    assert cost.gpu_hours == pytest.approx(cost.total_pflop * 1e15 / 100e12 / 3600)
    assert cost.images_per_s_per_gpu == pytest.approx(100e12 / (3 * cost.forward_gflop * 1e9))


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
