"""Waiting for a server that was just started: poll its health URL until it answers 200, and stop
at once when its process ends instead (the server's own output says why), or at a deadline."""
from __future__ import annotations

import subprocess
import time
import urllib.error
import urllib.request


class NotUp(RuntimeError):
    """The server's process ended, or it did not answer in time; the message says which."""


def wait_until_answers(url: str, process: subprocess.Popen | None, timeout_s: float, every_s: float = 0.2) -> None:
    """Return once GET `url` answers 200; `process` (None: a server run elsewhere) must stay alive meanwhile."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise NotUp(f"the server exited with status {process.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=min(2.0, timeout_s)) as answer:
                if answer.status == 200:
                    return
        except (OSError, urllib.error.URLError):
            pass
        time.sleep(every_s)
    raise NotUp(f"{url} did not answer within {timeout_s:.0f} s")
