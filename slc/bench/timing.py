"""How the benchmark measures: onnxruntime sessions, latency spread in rounds, memory bandwidth reads.

Kept apart from what is measured (`benchmark.py`) so that every number in `results/speedup.md`
comes from one small set of rules: a fixed thread count, warm-up runs before the clock starts,
the models compared with each other timed interleaved, in rounds whose figures share the machine's
state (so ratios are taken within a round), many repeats summarised by median and p10/p90 (one
lucky run proves nothing on a shared machine), and the session options written down next to the
figures.
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

GRAPH_OPTIMIZATION = "ORT_ENABLE_ALL"
MIN_SAMPLE_S = 0.005  # a timed sample of a faster model is the mean of back-to-back runs this long


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
    # A session's threads spin after each call by default, taking the cores from the next model timed: on
    # 2 cores a model timed after another onnxruntime session ran 1.39x as long, whatever its k.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
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


def time_interleaved(calls: dict[str, Callable[[], object]], warmup: int, repeats: int,
                     rounds: int = 1) -> dict[str, dict]:
    """Time several models interleaved, one timed sample of each per sweep, so a busy neighbour or a
    clock change slows every model alike and their ratios hold. A call can slow the one after it (a
    1 GiB read leaves the caches cold: a 0.2 ms model timed after it ran up to 2.3x as long; torch.sum's
    threads slowed the next model 5%), so each sample follows an untimed run of the same model, and
    each sweep goes in a new seeded order. A sample is one run, or for a model faster than
    MIN_SAMPLE_S the mean of as many back-to-back runs as make it that long (`runs_per_sample`, from
    the warm-up's pace): a 0.1 ms model's single runs jittered by a third. The sweeps are cut into
    `rounds` consecutive blocks and each model's median per block is kept (`rounds_ms`): figures of one
    round share the machine's state, so a ratio taken within a round does not see the drift between
    rounds (a shared machine's bandwidth and clock change within minutes)."""
    if not 1 <= rounds <= repeats:
        raise ValueError(f"time_interleaved: rounds={rounds} must be between 1 and repeats={repeats}")
    runs = {}
    for name, call in calls.items():
        start = time.perf_counter()
        for _ in range(warmup):
            call()
        runs[name] = max(1, math.ceil(MIN_SAMPLE_S * warmup / (time.perf_counter() - start))) if warmup else 1
    order = np.random.default_rng(0)
    seconds: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(repeats):
        for name in order.permutation(list(calls)):
            calls[name]()  # untimed: the sample finds the caches as this model leaves them
            start = time.perf_counter()
            for _ in range(runs[name]):
                calls[name]()
            seconds[name].append((time.perf_counter() - start) / runs[name])
    return {name: {**spread(seconds[name]), "runs_per_sample": runs[name],
                   "rounds_ms": [float(np.median(block)) * 1e3 for block in np.array_split(seconds[name], rounds)]}
            for name in calls}


@contextmanager
def bandwidth_reads(gemv: Path, settings: dict) -> Iterator[tuple[int, dict]]:
    """A read of memory far above the last-level cache whose rate bounds what memory streams here, B:
    onnxruntime's `gemv`, a (1, d) x (n, d)^T head alone (input `features`, output (1, n)) in a session
    with the benchmark's `settings`, the very kernel a full model's head runs. A full model reads its
    4·d·k-byte head once per batch, so a correct measurement has full_ms >= backbone_ms + 4·d·k / B;
    B drifts within minutes on a shared machine, so the benchmark times this read in the same rounds
    as the models. (torch.sum is not among the reads: its threads spin after it and slowed the model
    timed next by 5%.) Yields (bytes each read reads, {name: call})."""
    session, _ = open_session(gemv, settings)
    (features,), (logits,) = session.get_inputs(), session.get_outputs()
    d, n = features.shape[1], logits.shape[1]
    feeds = {features.name: np.ones((1, d), np.float32)}
    yield 4 * n * (d + 1), {"onnxruntime_gemv": lambda: session.run(None, feeds)}  # float32 weight and bias
