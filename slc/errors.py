"""What a user can fix gets one line, not a traceback: the base class and the stages' entry point."""
from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from typing import NoReturn

from serving.errors import ExportError


class PipelineError(Exception):
    """A problem the user can fix (bad params, missing data, stages run out of order); its message
    says what is wrong and how to fix it."""


USER_ERRORS = (PipelineError, ExportError)  # an export that cannot be trusted is the user's to re-make
OUR_PACKAGES = ("slc", "pipeline", "serving")


def run_stage(main: Callable[[], object]) -> NoReturn:
    """Run a stage's `main` with logging on stdout: an int it returns is the exit status, anything
    else (say, the stage's results) is success; a user-fixable error is printed alone as
    `error: ...` on stderr and exits with status 2."""
    # our own INFO lines (progress, per-epoch figures); other libraries' only from WARNING up, or the
    # ONNX exporter's optimiser passes alone would add dozens of INFO lines per export
    logging.basicConfig(level=logging.WARNING, format="%(message)s", stream=sys.stdout, force=True)
    for package in OUR_PACKAGES:
        logging.getLogger(package).setLevel(logging.INFO)
    try:
        status = main()
    except USER_ERRORS as error:
        print(f"error: {error}", file=sys.stderr)
        status = 2
    sys.exit(status if isinstance(status, int) else 0)
