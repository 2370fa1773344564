import copy
import dataclasses

import pytest
import yaml

from slc.core.config import Params
from slc.core.errors import ConfigError
from slc.core.strict import from_dict
from slc.params import load_params

RAW = yaml.safe_load(open("params.yaml"))


def params_with(path: str, value=None, delete: bool = False) -> dict:
    raw = copy.deepcopy(RAW)
    *parents, key = path.split(".")
    node = raw
    for parent in parents:
        node = node[parent]
    if delete:
        del node[key]
    else:
        node[key] = value
    return raw


def test_the_committed_params_file_loads():
    params = load_params("params.yaml")
    assert params.data.name == "fashion_mnist"
    assert params.grid.losses


def test_config_is_frozen():
    params = load_params("params.yaml")
    with pytest.raises(AttributeError):
        params.train.lr = 1.0


def test_replace_checks_the_new_values_too():
    train = load_params("params.yaml").train
    with pytest.raises(ConfigError, match=r"^train\.epochs = 0 is invalid: expected a positive integer$"):
        dataclasses.replace(train, epochs=0)
    with pytest.raises(ConfigError, match=r"^TrainConfig\.epochs = 'five' has the wrong type: expected int$"):
        dataclasses.replace(train, epochs="five")


def test_unknown_key_is_named_with_its_path():
    with pytest.raises(ConfigError, match=r"unknown key train\.learning_rate"):
        from_dict(Params, params_with("train.learning_rate", 0.1))


def test_missing_key_is_named_with_its_path_and_type():
    with pytest.raises(ConfigError, match=r"missing key data\.synthetic\.num_classes \(int\)"):
        from_dict(Params, params_with("data.synthetic.num_classes", delete=True))


def test_missing_section_is_named():
    with pytest.raises(ConfigError, match=r"missing key serving"):
        from_dict(Params, params_with("serving", delete=True))


@pytest.mark.parametrize("path, value, expected", [
    ("train.epochs", "ten", "int"),
    ("train.epochs", True, "int"),
    ("train.epochs", 2.5, "int"),
    ("ray.use_gpu", "yes", "bool"),
    ("data.root", 3, "str"),
    ("grid.seeds", 0, "list"),
])
def test_wrong_type_names_path_and_expected_type(path, value, expected):
    with pytest.raises(ConfigError, match=rf"{path.replace('.', r'[.]')} = .* expected .*{expected}"):
        from_dict(Params, params_with(path, value))


def test_wrong_list_item_type_names_the_item():
    with pytest.raises(ConfigError, match=r"grid\.seeds\[1\]"):
        from_dict(Params, params_with("grid.seeds", [0, "one"]))


def test_int_is_accepted_where_a_float_is_expected():
    params = from_dict(Params, params_with("train.lr", 1))
    assert params.train.lr == 1.0 and isinstance(params.train.lr, float)


def test_nullable_keys_take_null():
    assert from_dict(Params, params_with("data.train_limit", None)).data.train_limit is None


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.1, 1.5])
def test_val_fraction_outside_zero_one_is_refused(fraction):
    with pytest.raises(ConfigError, match=r"data\.val_fraction.*strictly between 0 and 1"):
        from_dict(Params, params_with("data.val_fraction", fraction))


def test_section_that_is_not_a_mapping_is_refused():
    with pytest.raises(ConfigError, match=r"^data: expected a mapping"):
        from_dict(Params, params_with("data", "fashion_mnist"))


def test_invalid_yaml_and_missing_file_say_so(tmp_path):
    bad = tmp_path / "params.yaml"
    bad.write_text("data: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_params(bad)
    with pytest.raises(ConfigError, match="not found"):
        load_params(tmp_path / "absent.yaml")


@pytest.mark.parametrize("wait", [0, -1.5])
def test_a_batch_wait_of_zero_or_less_is_refused(wait):
    with pytest.raises(ConfigError, match=r"serving\.batch_wait_ms = .* expected null \(no batching\) or a positive"):
        from_dict(Params, params_with("serving.batch_wait_ms", wait))


def test_serving_defaults_batch_nothing_and_need_no_token():
    serving = load_params("params.yaml").serving
    assert serving.batch_wait_ms is None and serving.token_file is None and serving.host == "127.0.0.1"
