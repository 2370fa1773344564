"""What a user can fix is one line on stderr and exit status 2, never a traceback."""
import importlib
import subprocess
from pathlib import Path

import pytest
import torchvision

from pipeline import stages
from slc.core.errors import run_stage
from slc.nn.trained import load_trained

PARAMS = Path("params.yaml").read_text()


def broken_params(folder: Path, old: str, new: str) -> Path:
    assert old in PARAMS
    (folder / "params.yaml").write_text(PARAMS.replace(old, new))
    return folder / "params.yaml"


@pytest.mark.parametrize("module, change, args, message", [
    ("prepare", ("  name: fashion_mnist ", "  name: fashion-mnist "), ("--out", "prepared"),
     "error: data.name = 'fashion-mnist' is unknown: valid names are fashion_mnist"),
    ("prepare", ("  name: fashion_mnist ", "  name: mnist "), ("--out", "prepared"),
     "error: MNIST is missing or corrupt under data/raw and could not be downloaded"),
    ("evaluate", ("", ""), ("--trials", "missing.json", "--models", "models", "--data", "prepared", "--metrics", "m.json",
                            "--table", "t.md", "--thresholds", "t.json", "--thresholds-test", "tt.json", "--plots", "p"),
     "error: missing.json not found: run the train stage first"),
    ("export", ("", ""), ("--models", "none", "--thresholds", "t.json", "--data", "prepared", "--out", "exports",
                          "--trials", "trials.json", "--metrics", "e.json", "--evaluation", "m.json"),
     "error: no trained model under none: run `dvc repro train` first"),
])
def test_a_stage_names_what_to_fix_and_exits_2(tmp_path, monkeypatch, capsys, module, change, args, message):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(torchvision.datasets.MNIST, "mirrors", ["http://127.0.0.1:9/"])  # no network here
    params = broken_params(tmp_path, *change)
    main = importlib.import_module(f"pipeline.{module}").main
    with pytest.raises(SystemExit) as exit:
        run_stage(lambda: main(["--params", str(params), *args]))
    assert exit.value.code == 2 and message in capsys.readouterr().err


def test_the_stage_command_prints_a_params_typo_without_a_traceback(tmp_path):
    """The whole path a user sees: `python -m pipeline.train` as dvc.yaml runs it."""
    broken_params(tmp_path, "  epochs: 5", "  epochs: five")
    result = subprocess.run(stages.command("train", "params.yaml"), cwd=tmp_path, capture_output=True, text=True,
                            timeout=300, env={"PYTHONPATH": str(Path.cwd()), "PATH": "/usr/bin:/bin"})
    assert result.returncode == 2
    assert result.stderr == "error: train.epochs = 'five' has the wrong type: expected int\n"


@pytest.mark.parametrize("returned, status", [(None, 0), ({"results": [1, 2]}, 0), (0, 0), (1, 1), (130, 130)])
def test_what_a_stage_returns_is_its_exit_status_only_when_it_is_an_int(returned, status):
    with pytest.raises(SystemExit) as exit:
        run_stage(lambda: returned)
    assert exit.value.code == status


def test_a_missing_trained_model_is_one_error_line_naming_the_train_stage(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit:
        run_stage(lambda: load_trained(tmp_path / "ce-s0"))
    err = capsys.readouterr().err
    assert exit.value.code == 2
    assert err == f"error: {tmp_path / 'ce-s0' / 'config.json'} not found: {tmp_path / 'ce-s0'} is not a trained " \
                  f"model (run the train stage, `dvc repro train`)\n"
