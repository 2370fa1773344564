"""How the benchmark measures: onnxruntime sessions, latency spread, memory bandwidth, peak RSS.

Kept apart from what is measured (`benchmark.py`) so that every number in `results/speedup.md`
comes from one small set of rules: a fixed thread count, warm-up runs before the clock starts,
the models compared with each other timed interleaved, many repeats summarised by median and
p10/p90 (one lucky run proves nothing on a shared machine), and the session options written down
next to the figures.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

GRAPH_OPTIMIZATION = "ORT_ENABLE_ALL"


def session_settings(threads: int, prepacking: bool, providers: list[str]) -> dict:
    """The options every benchmark session is created with, as recorded in the results."""
    return {"providers": providers, "intra_op_threads": threads, "inter_op_threads": 1,
            "execution_mode": "ORT_SEQUENTIAL", "graph_optimization_level": GRAPH_OPTIMIZATION,
            "prepacking": prepacking}


def open_session(path: Path, settings: dict):
    """An InferenceSession with `settings`; also returns the providers onnxruntime really used."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = settings["intra_op_threads"]
    options.inter_op_num_threads = settings["inter_op_threads"]
    options.execution_mode = getattr(ort.ExecutionMode, settings["execution_mode"])
    options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, settings["graph_optimization_level"])
    options.log_severity_level = 3  # warnings about skipped constant folding of huge heads are expected
    # Prepacking copies constant weights into the GEMM kernel's layout: it doubles the memory of a
    # 3.3 GB head and, for the one-row GEMV of batch 1, was measured slower than the plain layout.
    options.add_session_config_entry("session.disable_prepacking", "0" if settings["prepacking"] else "1")
    session = ort.InferenceSession(str(path), options, providers=settings["providers"])
    return session, session.get_providers()


def spread(seconds: list[float]) -> dict[str, float]:
    """Median and p10/p90 in milliseconds (plus min and mean) of repeated timings."""
    ms = np.asarray(seconds, dtype=np.float64) * 1e3
    if ms.size == 0:
        raise ValueError("spread: no timings (benchmark.repeats must be positive)")
    p10, median, p90 = np.percentile(ms, [10, 50, 90])
    return {"median_ms": float(median), "p10_ms": float(p10), "p90_ms": float(p90),
            "min_ms": float(ms.min()), "mean_ms": float(ms.mean()), "repeats": int(ms.size)}


def time_call(call: Callable[[], object], warmup: int, repeats: int) -> dict[str, float]:
    """Run `call` `warmup` times untimed (allocations, caches, lazy init), then time `repeats` runs."""
    for _ in range(warmup):
        call()
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        seconds.append(time.perf_counter() - start)
    return spread(seconds)


def time_interleaved(calls: dict[str, Callable[[], object]], warmup: int, repeats: int) -> dict[str, dict]:
    """Time several models round-robin, one run of each per round with the order rotated, so a busy
    neighbour or a clock change between rounds slows every model alike and their ratios hold."""
    for call in calls.values():
        for _ in range(warmup):
            call()
    names = list(calls)
    seconds: dict[str, list[float]] = {name: [] for name in names}
    for round_ in range(repeats):
        for name in names[round_ % len(names):] + names[:round_ % len(names)]:
            start = time.perf_counter()
            calls[name]()
            seconds[name].append(time.perf_counter() - start)
    return {name: spread(seconds[name]) for name in names}


def memory_bandwidth(gemv: Path, settings: dict, repeats: int) -> dict:
    """B, the fastest rate main memory was read at here, in GB/s (1e9 bytes/s): the best of `repeats`
    runs of each of three reads of the same number of bytes, far above the last-level cache:
      onnxruntime  `gemv`, a (1, d) x (n, d)^T head alone (input `features`, output (1, n)) in a
                   session with the benchmark's `settings`: the very kernel a full model's head runs;
      torch        torch.sum over as many bytes, with the same number of threads;
      numpy        numpy's sum, one thread: a floor the others are expected to beat.
    The best run and the fastest probe, not a median, because B must bound from above what any
    kernel streams here: a full model reads its 4·d·k-byte head once per batch, so a correct
    measurement has
        full_ms >= backbone_ms + 4·d·k / B = predicted_full_ms
    up to the timing noise of backbone_ms. A probe that under-reads B shows up as full_ms < predicted_full_ms.
    """
    import torch

    if repeats <= 0:
        raise ValueError(f"memory_bandwidth: repeats={repeats} must be positive")
    session, _ = open_session(gemv, settings)
    (features,), (logits,) = session.get_inputs(), session.get_outputs()
    d, n = features.shape[1], logits.shape[1]
    nbytes = 4 * n * (d + 1)  # the (n, d) weight and the (n,) bias, float32
    feeds = {features.name: np.ones((1, d), np.float32)}
    threads = settings["intra_op_threads"]
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        buffer = torch.ones(nbytes // 4, dtype=torch.float32)
        flat = buffer.numpy()
        reads = {"onnxruntime_gemv": lambda: session.run(None, feeds), "torch_sum": buffer.sum, "numpy_sum": flat.sum}
        times = {name: time_call(read, warmup=1, repeats=repeats) for name, read in reads.items()}
    finally:
        torch.set_num_threads(previous)
    probes = {name: {"best_gbps": nbytes / t["min_ms"] / 1e6, "median_gbps": nbytes / t["median_ms"] / 1e6}
              for name, t in times.items()}
    gbps = max(probe["best_gbps"] for probe in probes.values())
    return {"gbps": gbps, "probes": probes, "threads": threads, "buffer_mib": nbytes / 2**20, "repeats": repeats,
            "method": f"the fastest of {repeats} reads of {nbytes / 2**20:.0f} MiB by onnxruntime's GEMV "
                      f"({probes['onnxruntime_gemv']['best_gbps']:.1f}), torch.sum "
                      f"({probes['torch_sum']['best_gbps']:.1f}), both {threads} threads, and numpy's sum "
                      f"({probes['numpy_sum']['best_gbps']:.1f}, one thread)"}
