"""What a user can fix is one line on stderr and exit status 2, never a traceback."""
import subprocess
import sys
from pathlib import Path

import pytest


def stage(module: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", f"pipeline.{module}", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=300, env={"PYTHONPATH": str(Path.cwd()), "PATH": "/usr/bin:/bin"})


@pytest.mark.parametrize("module, change, args, message", [
    ("train", ("  epochs: 5", "  epochs: five"), (), "error: train.epochs = 'five' has the wrong type: expected int"),
    ("prepare", ("  name: fashion_mnist ", "  name: fashion-mnist "), ("--out", "prepared"),
     "error: unknown dataset data.name='fashion-mnist'; known: fashion_mnist"),
    ("prepare", ("  name: fashion_mnist ", "  name: cifar10 "), ("--out", "prepared"),
     "error: CIFAR10 is missing or corrupt under data/raw and could not be downloaded"),
    ("evaluate", None, ("--trials", "missing.json"), "error: missing.json not found: run the train stage first"),
])
def test_a_stage_names_what_to_fix_without_a_traceback(tmp_path, module, change, args, message):
    params = Path("params.yaml").read_text()
    if change:
        assert change[0] in params
        params = params.replace(change[0], change[1])
    (tmp_path / "params.yaml").write_text(params)
    result = stage(module, *args, cwd=tmp_path)
    assert result.returncode == 2, result.stderr[-2000:]
    assert message in result.stderr and "Traceback" not in result.stderr, result.stderr[-2000:]
