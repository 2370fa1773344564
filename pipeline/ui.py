"""`make ui`: the MLflow UI on the pipeline's tracking store, opened on the experiment's runs.

MLflow 3.17's UI shows an experiment as GenAI (overview, traces) or as model training (runs) by its
sidebar toggle, GenAI unless a link or the user says otherwise; the link printed here says model
training (slc.core.tracking.runs_url). `--screenshot PATH` (`make ui-screenshot`) saves that page as
headless Chromium draws it: what a user sees, checked without a browser.
"""
from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

from serving.probe import NotUp, wait_until_answers
from slc.core import tracking
from slc.core.errors import PipelineError, run_stage
from slc.params import load_params

BROWSERS = ("chromium", "chromium-browser", "google-chrome")
RENDER_MS = 15_000  # virtual time the page gets to fetch and draw the runs before the picture
START_TIMEOUT_S = 120


class UiError(PipelineError):
    """The UI did not come up, or no browser is there to take the screenshot."""


def start_server(uri: str, host: str, port: int) -> subprocess.Popen:
    """`mlflow server` on the store at `uri`; one worker, as one person looks at it."""
    return subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--backend-store-uri", uri,
                             "--host", host, "--port", str(port), "--workers", "1"])


def wait_until_up(server: str, process: subprocess.Popen | None) -> None:
    try:
        wait_until_answers(f"{server}/health", process, START_TIMEOUT_S, every_s=1.0)
    except NotUp as error:
        raise UiError(f"the MLflow UI did not come up: {error} (its output is above; is the port taken? pass "
                      f"--port)") from None


def screenshot(url: str, path: Path, window: str) -> None:
    """The page as headless Chromium renders it (without its sandbox, which refuses to run as root)."""
    browser = next(filter(None, map(shutil.which, BROWSERS)), None)
    if browser is None:
        raise UiError(f"a screenshot needs Chromium, and none of {', '.join(BROWSERS)} is on PATH: "
                      f"apt-get install chromium")
    path.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                    f"--window-size={window}", f"--virtual-time-budget={RENDER_MS}",
                    f"--screenshot={path.resolve()}", url], check=True, capture_output=True, timeout=300)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=5000)
    parser.add_argument("--screenshot", type=Path, default=None, help="save the runs page as this PNG and stop")
    parser.add_argument("--window", default="1600,900", help="the screenshot's width,height in pixels")
    args = parser.parse_args(argv)
    params = load_params(args.params)
    uri = tracking.tracking_uri(params.mlflow)
    remote = uri.startswith(("http://", "https://"))  # a tracking server is its own UI
    server = uri.rstrip("/") if remote else f"http://{args.host}:{args.port}"
    url = tracking.runs_url(server, tracking.experiment_id(uri, params.mlflow.experiment))
    process = None if remote else start_server(uri, args.host, args.port)
    try:
        wait_until_up(server, process)
        if args.screenshot is not None:
            screenshot(url, args.screenshot, args.window)
            print(f"{args.screenshot}: {url}")
            return 0
        print(f"MLflow UI, experiment {params.mlflow.experiment!r} of {uri}: {url}", flush=True)
        if process is not None:
            process.wait()
    finally:
        if process is not None and process.poll() is None:
            process.terminate()
            process.wait()
    return 0


if __name__ == "__main__":
    run_stage(main)
