"""What a user can fix gets a message, not a traceback: the base class and the stages' entry point."""
from __future__ import annotations

import sys
from typing import Callable, NoReturn


class PipelineError(Exception):
    """A problem the user can fix (bad params, missing data, stages run out of order); its message
    says what is wrong and how to fix it."""


def run_stage(main: Callable[[], object]) -> NoReturn:
    """Run a stage's `main`: an int it returns is the exit status, anything else (say, the
    stage's results) is success; a PipelineError is printed alone and exits with status 2."""
    try:
        status = main()
    except PipelineError as error:
        print(f"error: {error}", file=sys.stderr)
        status = 2
    sys.exit(status if isinstance(status, int) else 0)
