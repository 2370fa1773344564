"""What a stage prints: our own progress at INFO, other libraries' lines only when something is wrong.

A successful run must read as one: no library INFO chatter (MLflow creating its tables, Ray starting,
Tune's experiment box), and nothing that looks like an error. A failure still shows its error: the
stage's own one-line message, and any library's WARNING or ERROR lines and tracebacks.
"""
from __future__ import annotations

import logging
import os
import sys

from slc.core.closure import PROJECT_PACKAGES

# Read by the libraries when they start (MLflow at import, Tune when a run begins, Ray's workers from
# the environment they inherit), so they are set before any of that; a value the user set is kept.
QUIET_ENVIRONMENT = {
    "MLFLOW_LOGGING_LEVEL": "WARNING",  # not "Creating initial MLflow database tables..." and the like
    "RAY_AIR_NEW_OUTPUT": "0",  # Tune's plain reporter, silent at verbose=0 (the new one prints a box per grid)
}
# Library loggers whose warnings are notices, not problems, on the machines the pipeline runs on.
NOTICES = ("ray._private.authentication",)  # "Token authentication is enabled for this Ray cluster"


def configure_stage_logging() -> None:
    """Logging for a stage's process: on stdout, our packages from INFO, everything else from WARNING."""
    for key, value in QUIET_ENVIRONMENT.items():
        os.environ.setdefault(key, value)
    # other libraries only from WARNING up, or the ONNX exporter's optimiser passes alone would add
    # dozens of INFO lines per export
    logging.basicConfig(level=logging.WARNING, format="%(message)s", stream=sys.stdout, force=True)
    for package in PROJECT_PACKAGES:  # our own
        logging.getLogger(package).setLevel(logging.INFO)
    logging.getLogger("mlflow").setLevel(logging.WARNING)  # where MLflow was imported before this
    for notice in NOTICES:
        logging.getLogger(notice).setLevel(logging.ERROR)
