"""`make ui` in a real browser: headless Chromium on a real `mlflow server`, over a store whose runs the
train stage's own MLflow calls made. The link opens the experiment on its runs, with the prepared data
in the Dataset column; `make ui-screenshot` writes the picture. Skipped where Chromium is absent."""
import dataclasses
import shutil
import subprocess

import pytest

from pipeline import ui
from serving.loadtest import free_port
from slc.core import tracking
from tests.conftest import write_params

BROWSER = next(filter(None, map(shutil.which, ui.BROWSERS)), None)
pytestmark = [pytest.mark.slow, pytest.mark.skipif(BROWSER is None, reason="needs Chromium (apt-get install chromium)")]


@pytest.fixture
def store(tmp_path, params, monkeypatch):
    """A grid run and two trial runs as the train stage creates them, and params.yaml pointing at them."""
    monkeypatch.delenv(tracking.TRACKING_URI_ENV, raising=False)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    parent = tracking.start_grid(uri, "slc", "grid-20260101-000000", {}, {})
    trials = [tracking.start_trial(uri, parent, name, {}, tracking.trial_tags(name[:-3], True, "fashion_mnist", "mlp"))
              for name in ("bce-s0", "nce-s0")]
    tracking.log_prepared_data(uri, [parent, *trials], {"dataset": "fashion_mnist", "checksums": {}}, tmp_path)
    for run in [*trials, parent]:
        tracking.end_run(uri, run, "FINISHED")
    return write_params(dataclasses.replace(params, mlflow=dataclasses.replace(params.mlflow, tracking_uri=uri)),
                        tmp_path / "params.yaml"), uri


def rendered(url: str) -> str:
    """The page's DOM once its scripts have fetched and drawn."""
    return subprocess.run([BROWSER, "--headless", "--no-sandbox", "--disable-gpu", f"--virtual-time-budget={ui.RENDER_MS}",
                           "--dump-dom", url], capture_output=True, text=True, check=True, timeout=300).stdout


def test_the_link_opens_the_experiment_on_its_runs_with_their_dataset(store):
    _, uri = store
    port = free_port()
    server = ui.start_server(uri, "127.0.0.1", port)
    try:
        ui.wait_until_up(f"http://127.0.0.1:{port}", server)
        page = rendered(tracking.runs_url(f"http://127.0.0.1:{port}", tracking.experiment_id(uri, "slc")))
    finally:
        server.terminate()
        server.wait()
    assert ">Runs<" in page and "grid-20260101-000000" in page  # the runs table, not the GenAI overview
    assert "fashion_mnist" in page  # the Dataset column: the prepared data
    assert "Detect Issues" not in page


def test_make_ui_screenshot_writes_the_runs_page_as_a_png(store, tmp_path, capsys):
    path, _ = store
    assert ui.main(["--params", str(path), "--port", str(free_port()), "--screenshot", str(tmp_path / "runs.png")]) == 0
    assert (tmp_path / "runs.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "runs?workflowType=machine_learning" in capsys.readouterr().out
