"""What `make gpu-smoke` measures besides the pipeline's own stages: the device, whether the exports'
logits agree across providers, and the three ONNX graphs' latency on the accelerator.

onnxruntime-gpu lists CUDAExecutionProvider (and TensorrtExecutionProvider) whether or not they can
run, and falls back to the CPU with a log line; so every session here is checked for the provider
it really got, and a silent fallback is an error, not a figure.
"""
from __future__ import annotations

import ctypes
import subprocess
import tempfile
import time
from functools import partial
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import ray
import torch
from onnx import TensorProto, helper

from serving.machine import machine_info
from serving.manifest import read_manifest
from serving.model import SingleLogitModel
from slc.bench import timing
from slc.bench.benchmarking import input_shape, write_backbone, write_head, write_models
from slc.core.errors import PipelineError
from slc.data.prepared import PreparedData
from slc.export.exporting import verification_images
from slc.nn.trained import load_trained

CPU, CUDA, TENSORRT = "CPUExecutionProvider", "CUDAExecutionProvider", "TensorrtExecutionProvider"
# onnxruntime's CUDA provider runs float32 GEMMs and convolutions in TF32 by default (10-bit mantissa,
# about 1e-3 relative), as a server does: logits agree when |a - b| <= RTOL * max(1, max |reference|)
AGREEMENT_RTOL = 1e-2
TENSORRT_RESERVE_S = 120  # TensorRT builds an engine per graph and shape: only timed with this much budget left


PROBE_IR_VERSION = 9  # what onnxruntime 1.31 reads (onnx writes a newer one by default)


class NoGpuError(PipelineError, RuntimeError):
    """The smoke was asked for a GPU proof on a machine without a usable GPU."""


class ProviderError(PipelineError, RuntimeError):
    """onnxruntime opened a graph on another provider than the one asked for."""


def require_gpu(allow_cpu: bool) -> dict | None:
    """The GPU's description, or None (the CPU stand-in) with --allow-cpu; else NoGpuError, at once."""
    if not torch.cuda.is_available():
        why = "torch sees no CUDA device (torch.cuda.is_available() is False)"
    elif CUDA not in ort.get_available_providers():
        why = (f"onnxruntime {ort.__version__} has no {CUDA} (it offers {', '.join(ort.get_available_providers())}): "
               f"install requirements.lock, whose onnxruntime-gpu has it")
    else:
        why = onnxruntime_cuda_problem()
        if why is not None and hasattr(ort, "preload_dlls"):  # the CUDA and cuDNN of nvidia's wheels, found by path
            ort.preload_dlls()
            why = onnxruntime_cuda_problem()
    if why is None:
        props = torch.cuda.get_device_properties(0)
        return {"name": props.name, "count": torch.cuda.device_count(), "memory_gb": round(props.total_memory / 1e9, 1),
                "compute_capability": f"{props.major}.{props.minor}", "bf16": torch.cuda.is_bf16_supported(),
                "driver": driver_version()}
    if allow_cpu:
        print(f"no GPU here ({why}); --allow-cpu: the same steps on tiny data on the CPU")
        return None
    raise NoGpuError(f"no GPU here: {why}; run `make gpu-smoke` on a machine with a CUDA GPU, or pass --allow-cpu "
                     f"for the same steps on tiny data on the CPU")


def onnxruntime_cuda_problem() -> str | None:
    """Why onnxruntime cannot run a graph on CUDA here (a one-node graph, opened and run), or None."""
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "probe",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=PROBE_IR_VERSION)
    with tempfile.TemporaryDirectory() as folder:
        onnx.save(model, Path(folder) / "probe.onnx")
        try:
            session = ort.InferenceSession(str(Path(folder) / "probe.onnx"), providers=[CUDA, CPU])
            session.run(None, {"x": np.array([-1.0, 1.0], np.float32)})
        except Exception as error:  # onnxruntime's own untyped errors
            return f"onnxruntime cannot run a graph on {CUDA}: {str(error).splitlines()[0]}"
    used = session.get_providers()
    return None if used[0] == CUDA else (f"onnxruntime's {CUDA} did not load (sessions fall back to {used}): "
                                         f"check the CUDA and cuDNN libraries requirements.lock installs")


def driver_version() -> str | None:
    """The NVIDIA driver's release (nvidia-smi), else the CUDA version the driver supports (libcuda)."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30, check=True).stdout
        return out.splitlines()[0].strip()
    except (OSError, subprocess.SubprocessError, IndexError):
        pass
    try:
        version = ctypes.c_int(0)
        if ctypes.CDLL("libcuda.so.1").cuDriverGetVersion(ctypes.byref(version)) == 0:
            return f"supports CUDA {version.value // 1000}.{version.value % 1000 // 10} (nvidia-smi absent)"
    except OSError:
        pass
    return None


def device_info(gpu: dict | None) -> dict:
    """The machine, the software the figures depend on, and the GPU (None on the CPU stand-in)."""
    return {**machine_info(), "torch": torch.__version__, "torch_cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version() if torch.cuda.is_available() else None, "ray": ray.__version__,
            "onnxruntime_providers": ort.get_available_providers(), "gpu": gpu}


def checked_providers(used: list[str], asked: list[str], what: str) -> list[str]:
    if used[0] != asked[0]:
        raise ProviderError(f"onnxruntime opened {what} on {used[0]}, not {asked[0]} as asked: that provider did "
                            f"not load here (see onnxruntime's log above)")
    return used


def _logits(export_dir: Path, graph: str, providers: list[str], images: np.ndarray, ids: np.ndarray):
    """The export's logits as serving loads it (hashes checked): all k (full) or one per image (single_logit)."""
    model = SingleLogitModel.load(export_dir, graph=graph, providers=providers)
    used = checked_providers(model.providers, providers, f"{export_dir.name}'s {graph} graph")
    feeds = {"image": images, **({"class_id": ids} if graph == "single_logit" else {})}
    return model.session.run(None, feeds)[0], used


def agreement(exports: dict[str, tuple[Path, Path, Path]], gpu: bool, n_images: int) -> dict:
    """Each export's logits on the GPU against the CPU's (the CPU stand-in: onnxruntime's CPU provider
    against PyTorch), on `n_images` test images; `exports` maps a run to (export, prepared data, model) folders."""
    runs = {}
    for run, (export_dir, data_dir, model_dir) in exports.items():
        manifest = read_manifest(export_dir)
        info = {"run_name": run, "input_shape": manifest.input["shape"], "normalisation": manifest.normalisation}
        images = verification_images(PreparedData(data_dir), info, n_images).numpy()
        ids = np.random.default_rng(0).integers(0, manifest.num_classes, len(images))
        if gpu:
            reference = {graph: _logits(export_dir, graph, [CPU], images, ids)[0] for graph in ("full", "single_logit")}
        else:
            model, _ = load_trained(model_dir)
            with torch.inference_mode():
                full = model.eval()(torch.from_numpy(images)).numpy()
            reference = {"full": full, "single_logit": full[np.arange(len(ids)), ids]}
        runs[run] = {}
        for graph, expected in reference.items():
            got, used = _logits(export_dir, graph, [CUDA, CPU] if gpu else [CPU], images, ids)
            runs[run][graph] = {**compare_logits(got, expected), "providers_used": used}
    return {"reference": "onnxruntime CPUExecutionProvider" if gpu else "PyTorch on the CPU",
            "candidate": f"onnxruntime {CUDA}" if gpu else f"onnxruntime {CPU}", "images": n_images,
            "rtol": AGREEMENT_RTOL, "rule": f"max |candidate - reference| <= {AGREEMENT_RTOL:g} x max(1, max |reference|)",
            "runs": runs, "max_abs_diff": max(g["max_abs_diff"] for r in runs.values() for g in r.values()),
            "ok": all(g["ok"] for r in runs.values() for g in r.values())}


def compare_logits(got: np.ndarray, expected: np.ndarray) -> dict:
    """The largest difference, and whether it is within AGREEMENT_RTOL of the logits' scale."""
    if got.shape != expected.shape:
        raise ProviderError(f"logits of shape {got.shape} where the reference has {expected.shape}")
    diff, scale = float(np.max(np.abs(got - expected))), float(np.max(np.abs(expected)))
    allowed = AGREEMENT_RTOL * max(1.0, scale)
    return {"max_abs_diff": diff, "max_abs_logit": scale, "allowed": allowed, "ok": diff <= allowed,
            "shape": list(got.shape)}


def tensorrt_usable(model: Path, threads: int) -> dict:
    """Whether onnxruntime really runs `model` on TensorRT here (it lists the provider without its libraries)."""
    if TENSORRT not in ort.get_available_providers():
        return {"usable": False, "why": f"onnxruntime {ort.__version__} does not offer {TENSORRT}"}
    try:
        _, used = timing.open_session(model, timing.session_settings(threads, False, [TENSORRT, CUDA, CPU]))
    except Exception as error:  # onnxruntime's own untyped errors: the reason is the figure
        return {"usable": False, "why": str(error).splitlines()[0]}
    if used[0] != TENSORRT:
        return {"usable": False, "why": f"onnxruntime offers it but it did not load (its log above says why; "
                                        f"requirements.lock holds no TensorRT libraries): sessions fell back to "
                                        f"{', '.join(used)}"}
    return {"usable": True, "why": None}


def time_at_k(paths: dict[str, Path], providers: list[str], k: int, batches: list[int], shape, threads: int,
              warmup: int, repeats: int) -> list[dict]:
    """Open the backbone, full and single_logit graphs once on `providers`, then time them interleaved
    (slc.bench.timing) at each batch size: host arrays in, host arrays out, as a server calls them."""
    settings = timing.session_settings(threads, False, providers)
    sessions, load_s = {}, {}
    for kind, path in paths.items():
        began = time.perf_counter()
        session, used = timing.open_session(path, settings)
        sessions[kind] = (session, checked_providers(used, providers, path.name))
        load_s[kind] = round(time.perf_counter() - began, 3)
    rng, rows = np.random.default_rng(0), []
    for batch in batches:
        feeds = {"image": rng.standard_normal((batch, *shape), dtype=np.float32),
                 "class_id": rng.integers(0, k, batch, dtype=np.int64)}
        calls = {kind: partial(session.run, None, {i.name: feeds[i.name] for i in session.get_inputs()})
                 for kind, (session, _) in sessions.items()}
        times = timing.time_interleaved(calls, warmup, repeats)
        ms = {kind: times[kind]["median_ms"] for kind in paths}
        rows.append({"provider": providers[0], "k": k, "batch": batch, **{f"{kind}_ms": ms[kind] for kind in paths},
                     "speedup": ms["full"] / ms["single_logit"], "single_vs_backbone": ms["single_logit"] / ms["backbone"],
                     "spread": times, "load_s": load_s, "providers_used": {kind: s[1] for kind, s in sessions.items()}})
    return rows


def time_graphs(architecture: str, ks: list[int], batches: list[int], params, gpu: bool, warmup: int, repeats: int,
                folder: Path, budget_left_s: float) -> dict:
    """`architecture`'s backbone.onnx, model.onnx and single_logit.onnx (random weights, as the benchmark
    stage builds them: one head file for the largest k, a prefix of it per k) timed at every k and batch
    on CUDA (the CPU stand-in: the CPU), and on TensorRT at the smallest and largest k, batch 1, when it
    loads and the budget leaves TENSORRT_RESERVE_S."""
    began = time.perf_counter()
    folder.mkdir(parents=True, exist_ok=True)
    threads = params.benchmark.threads
    backbone, d = write_backbone(architecture, params.model, folder)
    weight, bias = write_head(folder, max(ks), d)
    tensorrt = tensorrt_usable(folder / "backbone.onnx", threads) if gpu else {"usable": False, "why": "no GPU"}
    rows = []
    for k in ks:
        paths = {"backbone": folder / "backbone.onnx", **write_models(folder, backbone, weight, bias, k)}
        rows += time_at_k(paths, [CUDA, CPU] if gpu else [CPU], k, batches, input_shape(architecture), threads,
                          warmup, repeats)
        left = budget_left_s - (time.perf_counter() - began)
        if tensorrt["usable"] and k in (min(ks), max(ks)):
            if left >= TENSORRT_RESERVE_S:
                rows += time_at_k(paths, [TENSORRT, CUDA, CPU], k, batches[:1], input_shape(architecture), threads,
                                  warmup, repeats)
            else:
                tensorrt = {**tensorrt, "skipped_k": [*tensorrt.get("skipped_k", []), k],
                            "why": f"{left:.0f} s of the budget left, under {TENSORRT_RESERVE_S} s"}
    return {"architecture": architecture, "d": d, "input_shape": list(input_shape(architecture)), "ks": ks,
            "batches": batches, "warmup": warmup, "repeats": repeats, "intra_op_threads": threads,
            "tensorrt": tensorrt, "rows": rows}
