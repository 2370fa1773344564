"""This process's peak resident memory, restartable, so that a stage or a benchmark can report what
one piece of its work (one export, one k) cost in memory."""
from __future__ import annotations

import sys
from pathlib import Path

PROC_STATUS = Path("/proc/self/status")
PROC_CLEAR_REFS = Path("/proc/self/clear_refs")


def reset_peak_rss() -> bool:
    """Restart the kernel's resident-set high-water mark (Linux: write 5 to clear_refs), so that
    the peak is per k rather than since the process began; False where that is not possible."""
    try:
        PROC_CLEAR_REFS.write_text("5")
        return True
    except OSError:
        return False


def peak_rss_gb() -> float:
    """Peak resident memory of this process in GB since the last `reset_peak_rss`.

    Read from VmHWM in /proc, the mark clear_refs resets: psutil has no peak, and ru_maxrss starts
    at the peak of the process that launched this one (the kernel carries it over exec), e.g. dvc's.
    ru_maxrss only where /proc is missing (kilobytes, bytes on macOS), with no reset there.
    """
    try:
        for line in PROC_STATUS.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024 / 1e9
    except OSError:
        pass
    import resource

    unit = 1 if sys.platform == "darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * unit / 1e9
