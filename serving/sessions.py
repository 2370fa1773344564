"""onnxruntime sessions as serving opens them: which providers really run (CUDA only where a device
answers), how many threads, and a load failure said as what to do; the benchmark uses the same rule.
"""
from __future__ import annotations

import ctypes
from pathlib import Path

import onnxruntime as ort

from serving.errors import ExportError
from serving.manifest import REEXPORT

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"


def choose_providers(providers: str | list[str] = "auto") -> list[str]:
    """onnxruntime providers: "auto" takes CUDA only when a CUDA device really answers, else the CPU;
    a provider name or a list of them is taken as given once this onnxruntime build has each one.

    onnxruntime-gpu lists CUDAExecutionProvider whether or not a GPU is present, and falls back to
    the CPU with only a log line, so the driver is asked for its device count instead. The
    pipeline's benchmark uses this same rule, reporting its ValueError as a benchmark.providers error.
    """
    available = ort.get_available_providers()
    if providers == "auto":
        return [CUDA, CPU] if CUDA in available and cuda_device_count() > 0 else [CPU]
    if isinstance(providers, str):
        providers = [providers]
    if not providers:
        raise ValueError(f"no onnxruntime provider named; available: {', '.join(available)} (or 'auto')")
    missing = [p for p in providers if p not in available]
    if missing:
        raise ValueError(f"onnxruntime provider {missing[0]!r} is not available here; available: "
                         f"{', '.join(available)} (or 'auto')")
    return list(providers)


def cuda_device_count() -> int:
    """CUDA devices the driver reports (0 without a driver or a device), without torch."""
    try:
        driver = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return 0
    count = ctypes.c_int(0)
    if driver.cuInit(0) != 0 or driver.cuDeviceGetCount(ctypes.byref(count)) != 0:
        return 0
    return count.value


def session_options(threads: int | None) -> ort.SessionOptions:
    """`threads` intra-op threads (None: onnxruntime's default, one per core), never spinning.

    A server shares its cores between concurrent requests and HTTP work: idle onnxruntime threads
    that spin-wait for the next operator burn exactly the CPU those need.
    """
    options = ort.SessionOptions()
    if threads is not None:
        options.intra_op_num_threads = threads
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return options


def open_session(path: Path, providers: list[str], opset: int, threads: int | None) -> ort.InferenceSession:
    try:
        return ort.InferenceSession(str(path), session_options(threads), providers=providers)
    except Exception as error:  # onnxruntime raises its own untyped errors (Fail, InvalidGraph, ...)
        raise ExportError(f"onnxruntime {ort.__version__} cannot load {path} (opset {opset}): "
                          f"{str(error).splitlines()[0]}; upgrade onnxruntime or {REEXPORT}") from None
