"""Writing results so that a reader never sees half a file, and hashing them: one way for every stage."""
from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
from pathlib import Path

import numpy as np


def finite_or_none(value):
    """JSON has no NaN: undefined numbers (a class without positives, 0/0) are written as null."""
    if isinstance(value, dict):
        return {key: finite_or_none(v) for key, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_none(v) for v in value]
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    return value


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write via a temp file and rename, so a crash never leaves a half file for the next stage."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}-", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
        os.chmod(tmp, 0o644)  # mkstemp's 0600 would hide results from other users
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_json(path: str | Path, value) -> None:
    """Indented JSON, atomically, with NaN and infinities written as null."""
    write_text_atomic(path, json.dumps(finite_or_none(value), indent=2, allow_nan=False) + "\n")


def sha256(path: str | Path) -> str:
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def save_figure(figure, path: str | Path, dpi: int) -> None:
    """A matplotlib figure as a PNG at `path` (its folder made), then freed: pyplot keeps every open one."""
    import matplotlib.pyplot as plt

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=dpi)
    plt.close(figure)
