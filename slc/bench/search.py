"""The search benchmark's timings (`make search-bench`): a class query at N stored images beside the
cost of reading their features once and the cost of the full head, and an index's build rate.

At each N the stored features are random float32 of the export's feature dim d (a query's cost depends
on how many there are and their size, not on their values), written as a real index of each kind
(serving.index_store), bound to the export as a build binds one, and queried through
serving.search.SearchIndex with the export's own head rows: (a) exact (flat), (b) compressed (sq8).
Random features make a class's calibrated threshold meaningless, so each query's threshold keeps a
fixed share of the images (`found`). (c) The alternative without PoLS: every stored image's k logits,
features @ W^T + b over a random (k, d) head, a chunk of images at a time (numpy's BLAS). A head above
`full_rows` rows is not computed whole: a GEMM of a slice (slice_images x slice_rows x d) is timed and
scaled by N k / (slice_images slice_rows), the whole product's FLOPs at the slice's rate, F. Every call
of one N is timed interleaved in rounds with the benchmark's bandwidth read B (slc.bench.timing), and a
query's limit, reading N d 4 bytes once at B, is taken round by round.
"""
from __future__ import annotations

import itertools
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from serving import index_store as store
from serving.features import Backbone, HeadRows, bound_files
from serving.index_build import build
from serving.index_store import IndexManifest
from serving.model import SingleLogitModel
from serving.search import SearchIndex
from slc.bench import timing

BYTES_PER_FEATURE = 4  # float32: what a flat index stores and a query reads
LOGIT_ELEMENTS = 1 << 22  # logits of one chunk of the full-head alternative: 16 MB, whatever k is


@dataclass(frozen=True)
class QuerySettings:
    """How one N is timed (the benchmark's warm-up, repeats and rounds are params.benchmark's)."""
    found: float        # share of the stored images each query's threshold keeps
    ks: list[int]       # head sizes of the full-logit alternative
    full_rows: int      # the largest k computed whole; above it, extrapolated from the GEMM slice
    slice_rows: int     # head rows of the GEMM slice
    slice_images: int   # images of the GEMM slice (at most N)
    chunk_images: int   # images per index segment
    warmup: int
    repeats: int
    rounds: int
    seed: int = 0


class Recorded:
    """A call that keeps the seconds of each of its runs: time_interleaved summarises by median and
    p10/p90, and a query's p99 wants every run. Its p99 is over every run after the warm-up, those
    time_interleaved runs untimed (to warm the caches for the timed one) included: a tail has them too."""

    def __init__(self, call: Callable[[], object]):
        self.call, self.seconds = call, []

    def __call__(self) -> None:
        start = time.perf_counter()
        self.call()
        self.seconds.append(time.perf_counter() - start)

    def p99_ms(self, warmup: int) -> float:
        return float(np.percentile(self.seconds[warmup:], 99)) * 1e3


def write_random_index(folder: Path, kind: str, features: np.ndarray, model: SingleLogitModel, chunk: int) -> None:
    """`features` as an index of `kind` in `folder`, a segment every `chunk` images, bound to `model`'s export."""
    backbone = Backbone(model.export_dir, model.manifest, model.providers)
    files = bound_files(model.manifest, backbone, HeadRows(model.export_dir, model.manifest), model.export_dir)
    n, d = features.shape
    manifest = IndexManifest(store.FORMAT_VERSION, kind, d,
                             {"dir": os.fspath(model.export_dir.resolve()), "run_name": model.run_name, "files": files},
                             {"source": "random float32 features", "images": n, "indexed": 0}, [])
    folder.mkdir(parents=True)
    template = store.KINDS[kind](d)
    template.train(features[:chunk])  # sq8 learns its ranges on the first chunk, as a build does; flat needs none
    for start in range(0, n, chunk):
        segment = store.write_segment(folder, manifest, template, features[start:start + chunk], None)
        manifest = manifest.with_segment(segment, indexed=start + segment["count"])
    store.write_manifest(folder, manifest)


def thresholds_finding(features: np.ndarray, head: HeadRows, classes: list[int], found: float) -> dict[int, float]:
    """Per class, the logit that the best `found` share of the stored images reach."""
    n = len(features)
    keep = max(1, round(found * n))
    out = {}
    for class_id in classes:
        row, bias = head.row(class_id)
        out[class_id] = float(np.partition(features @ row + np.float32(bias), n - keep)[n - keep])
    return out


def query_call(index: SearchIndex, thresholds: dict[int, float]) -> Callable[[], object]:
    """One query a call, each for the next class in turn, at its threshold."""
    turns = itertools.cycle(thresholds.items())

    def call():
        class_id, threshold = next(turns)
        return index.search(class_id, threshold=threshold)
    return call


def logits_call(features: np.ndarray, weight: np.ndarray, bias: np.ndarray) -> Callable[[], None]:
    """Every image's logits features @ weight^T + bias, a chunk of images at a time into one buffer."""
    rows = min(len(features), max(1, LOGIT_ELEMENTS // len(weight)))
    out = np.empty((rows, len(weight)), np.float32)

    def call():
        for start in range(0, len(features), rows):
            chunk = features[start:start + rows]
            np.matmul(chunk, weight.T, out=out[:len(chunk)])
            out[:len(chunk)] += bias
    return call


def head_of(k: int, d: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.standard_normal((k, d), dtype=np.float32), rng.standard_normal(k, dtype=np.float32)


def hits_of(index: SearchIndex, thresholds: dict[int, float]) -> dict[int, set[int]]:
    return {class_id: set(index.search(class_id, threshold=t).ids.tolist()) for class_id, t in thresholds.items()}


def time_queries(model: SingleLogitModel, n: int, cfg: QuerySettings, reads: tuple[int, dict], folder: Path) -> dict:
    """Every figure of one N: the queries, the full-head alternative and the bandwidth read, interleaved."""
    d = model.manifest.feature_dim
    features = np.random.default_rng(cfg.seed).standard_normal((n, d), dtype=np.float32)
    indexes, written = {}, {}
    for kind in ("flat", "sq8"):
        start = time.perf_counter()
        write_random_index(folder / kind, kind, features, model, cfg.chunk_images)
        written[kind] = time.perf_counter() - start
        indexes[kind] = SearchIndex.open(folder / kind, model)
    classes = list(range(min(model.num_classes, 16)))
    thresholds = thresholds_finding(features, indexes["flat"].head, classes, cfg.found)
    exact, compressed = hits_of(indexes["flat"], thresholds), hits_of(indexes["sq8"], thresholds)
    slice_images = min(cfg.slice_images, n)
    calls = {"exact": Recorded(query_call(indexes["flat"], thresholds)),
             "compressed": Recorded(query_call(indexes["sq8"], thresholds)),
             "gemm_slice": Recorded(logits_call(features[:slice_images], *head_of(cfg.slice_rows, d, cfg.seed)))}
    whole = [k for k in cfg.ks if k <= cfg.full_rows]
    for k in whole:
        calls[f"full_{k}"] = Recorded(logits_call(features, *head_of(k, d, cfg.seed)))
    nbytes, probes = reads
    times = timing.time_interleaved({**calls, **probes}, cfg.warmup, cfg.repeats, cfg.rounds)
    ms = {name: np.asarray(times[name]["rounds_ms"]) for name in times}
    gbps = np.max([nbytes / ms[name] / 1e6 for name in probes], axis=0)  # each round's fastest read
    gflops = 2 * slice_images * cfg.slice_rows * d / ms["gemm_slice"] / 1e6
    limit = BYTES_PER_FEATURE * n * d / gbps / 1e6  # ms to read the stored features once at B
    full, predicted = {}, {}
    for k in cfg.ks:
        full[k] = ms[f"full_{k}"] if k in whole else ms["gemm_slice"] * (n / slice_images) * (k / cfg.slice_rows)
        # physics: the k logits cost the larger of their FLOPs at F and reading features and head at B
        predicted[k] = np.maximum(2 * n * k * d / gflops / 1e6, BYTES_PER_FEATURE * (n + k) * d / gbps / 1e6) / limit
    median = lambda name: times[name]["median_ms"]
    found = [len(hits) for hits in exact.values()]
    return {"n": n, "d": d, "classes": len(classes), "found_mean": float(np.mean(found)),
            "compressed_recall": float(np.mean([len(exact[c] & compressed[c]) / max(1, len(exact[c])) for c in exact])),
            "exact_ms": median("exact"), "exact_p99_ms": calls["exact"].p99_ms(cfg.warmup),
            "exact_qps": 1e3 / median("exact"), "limit_ms": float(np.median(limit)),
            "exact_vs_limit": float(np.median(ms["exact"] / limit)),
            "compressed_ms": median("compressed"), "compressed_p99_ms": calls["compressed"].p99_ms(cfg.warmup),
            "compressed_qps": 1e3 / median("compressed"), "compressed_limit_ms": float(np.median(limit)) / BYTES_PER_FEATURE,
            "full_ms": {str(k): (median(f"full_{k}") if k in whole else float(np.median(full[k]))) for k in cfg.ks},
            "full_p99_ms": {str(k): calls[f"full_{k}"].p99_ms(cfg.warmup) if k in whole else None for k in cfg.ks},
            "full_extrapolated": {str(k): k not in whole for k in cfg.ks},
            "full_vs_exact": {str(k): float(np.median(full[k] / ms["exact"])) for k in cfg.ks},
            "predicted_full_vs_exact": {str(k): float(np.median(predicted[k])) for k in cfg.ks},
            "gbps": gbps.tolist(), "gemm_gflops": gflops.tolist(), "slice": [slice_images, cfg.slice_rows],
            "index_write_s": written, "timings": times}


def time_builds(export_dir: Path, source: Path, folder: Path, threads: int, batch_size: int, ray: bool) -> dict:
    """Images/s of `slc index build` of `source`, in this process and through Ray Data (a new local Ray on this
    machine's CPUs, its start timed apart; the actors' start is in the build's time). Both indexes must be equal."""
    out = {"single": _timed_build(export_dir, source, folder / "single", threads=threads, batch_size=batch_size)}
    if ray:
        import ray as ray_module

        start = time.perf_counter()
        ray_module.init(address="local", num_cpus=len(os.sched_getaffinity(0)), include_dashboard=False,
                        log_to_driver=False)
        try:
            out["ray_init_s"] = time.perf_counter() - start
            out["ray"] = _timed_build(export_dir, source, folder / "ray", threads=1, batch_size=batch_size, on_ray=True)
        finally:
            ray_module.shutdown()
        out["same_index"] = store.read_manifest(folder / "ray").segments == store.read_manifest(folder / "single").segments
    return out


def _timed_build(export_dir: Path, source: Path, out: Path, **options) -> dict:
    start = time.perf_counter()
    manifest = build(export_dir, source, out, **options)
    wall = time.perf_counter() - start
    return {"images": manifest.count, "wall_s": wall, "images_per_s": manifest.count / wall,
            "threads": options["threads"], "batch_size": options["batch_size"]}



def bandwidth(queries: dict[str, dict], nbytes: int, threads: int) -> dict:
    """B over every round of every N: what the report states above the tables."""
    gbps = np.concatenate([q["gbps"] for q in queries.values()])
    return {"gbps": float(np.median(gbps)), "min_gbps": float(gbps.min()), "max_gbps": float(gbps.max()),
            "rounds": int(gbps.size), "threads": threads, "buffer_mib": nbytes / 2**20,
            "method": f"onnxruntime's GEMV over {nbytes / 2**20:.0f} MiB ({threads} threads) in every round; median "
                      f"of {gbps.size} rounds {np.median(gbps):.1f} GB/s, range {gbps.min():.1f}-{gbps.max():.1f}"}


def goals(queries: dict[str, dict], quality_max_abs_diff: float) -> dict:
    """The issue's goals as measured at the largest N and k (not asserted: a busy machine may miss them)."""
    out = {"quality_max_abs_diff": quality_max_abs_diff, "quality_within_1e-6": quality_max_abs_diff <= 1e-6}
    if queries:
        n = max(queries, key=int)
        top = queries[n]
        k = max(top["full_ms"], key=int)
        out.update(n=int(n), k=int(k), exact_vs_limit=top["exact_vs_limit"],
                   exact_within_1_5x_of_limit=top["exact_vs_limit"] <= 1.5, full_vs_exact=top["full_vs_exact"][k],
                   predicted_full_vs_exact=top["predicted_full_vs_exact"][k],
                   slc_at_least_k_over_20_faster=top["full_vs_exact"][k] >= int(k) / 20)
    return out
