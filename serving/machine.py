"""The machine a figure was measured on: a latency or a speedup means little without it.

Shared by the benchmark stage and the serving load test so that both describe a machine the same
way. Torch-free, so a deployment can run the load test: a caller that has torch adds its version
and GPU itself.
"""
from __future__ import annotations

import os
import platform
from pathlib import Path

import onnxruntime as ort
import psutil


def cpu_model() -> str:
    """The marketing name (`model name` in /proc/cpuinfo); platform's guess where that is missing."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info() -> dict:
    """CPU, the cores this process may use (affinity, not the host's count), memory, software
    versions, and the load average, which says whether other work shared the CPUs."""
    available = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else range(os.cpu_count() or 0)
    return {"cpu": cpu_model(), "cores": len(available),
            "memory_gb": round(psutil.virtual_memory().total / 1e9, 1),
            "onnxruntime": ort.__version__, "python": platform.python_version(),
            "platform": platform.platform(), "load_average": list(psutil.getloadavg())}
