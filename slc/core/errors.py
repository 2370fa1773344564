"""What a user can fix gets one line, not a traceback: the base class and the stages' entry point."""
from __future__ import annotations

import sys
from collections.abc import Callable
from typing import NoReturn

from serving.errors import ExportError
from slc.core.logs import configure_stage_logging


class PipelineError(Exception):
    """A problem the user can fix (bad params, missing data, stages run out of order); its message
    says what is wrong and how to fix it."""


class ConfigError(PipelineError, ValueError):
    """A params.yaml value that is missing, unknown or of the wrong type."""


USER_ERRORS = (PipelineError, ExportError)  # an export that cannot be trusted is the user's to re-make


def run_stage(main: Callable[[], object]) -> NoReturn:
    """Run a stage's `main` with logging on stdout (slc.core.logs): an int it returns is the exit status, anything
    else (say, the stage's results) is success; a user-fixable error is printed alone as
    `error: ...` on stderr and exits with status 2."""
    configure_stage_logging()
    try:
        status = main()
    except USER_ERRORS as error:
        print(f"error: {error}", file=sys.stderr)
        status = 2
    sys.exit(status if isinstance(status, int) else 0)
