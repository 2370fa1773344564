"""Export: each trained run -> exports/<run_name>/, single-logit ONNX models, verified.

Layout (every path is also in manifest.json, which is what serving reads):
  backbone.onnx      image -> features (N, d); its weights in backbone.weights
  model.onnx         image -> logits (N, k); head W, b in head.weights
  single_logit.onnx  image, class_id -> logit (N,); gathers W[c], b[c] from head.weights
  class_<c>.onnx     image -> logit (N,) of class c: the backbone plus its own d + 1 floats
  manifest.json      classes, input, normalisation, thresholds, sha256 of every file, measured error
All models sit in one folder beside the weights files they share, because onnxruntime refuses an
external-data path that climbs up (`../`): so `class_<c>.onnx`, not `classes/<c>.onnx`.
Every file is run in onnxruntime on real test images and fails if one disagrees with
PyTorch, so a broken export never reaches serving.

At any k the export stays bounded: the head is written once (model.onnx and single_logit.onnx
reference the same head.weights), class files are made for a bounded sample of classes, and
single_logit.onnx is checked on a seeded sample of class ids; only the manifest's class names and
thresholds grow with k.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from serving.errors import ExportError
from serving.manifest import FORMAT_VERSION, MANIFEST, SIGNATURE, Manifest, parse_manifest
from serving.signing import SIGNING_KEY_ENV, configured_key, sign_export
from slc.core import peak_memory, tracking
from slc.core.config import ExportConfig
from slc.core.files import sha256, write_json
from slc.core.sampling import seeded_sample
from slc.data.prepared import PreparedData, renormalisation
from slc.export.backbone import export_backbone
from slc.export.onnx_graphs import WeightsFile, build_head_graph, class_row, externalize, save_checked, write_single_logit
from slc.export.verify import verified_classes, verify_export
from slc.nn.trained import load_trained

INFO_KEYS = ("run_name", "loss", "dataset", "class_names", "input_shape", "normalisation", "pixel_scale")
ALL_CLASSES_AT_MOST = 1024  # export.classes = all beyond this is refused: a file and a verification per class


def select_classes(classes: str | int | list[int], k: int, d: int) -> list[int]:
    """export.classes -> the class ids that get their own file: a count is a seeded sample, so the
    number of files stays bounded whatever k is; 'all' is refused where it would not be."""
    if classes == "all":
        if k > ALL_CLASSES_AT_MOST:
            raise ExportError(f"export.classes = 'all' asks for {k:,} class files: at least {4 * k * (d + 1) / 1e6:,.1f}"
                              f" MB (each holds {4 * (d + 1):,} bytes of head and a copy of the backbone's graph) and "
                              f"{k:,} onnxruntime sessions to verify them; 'all' is refused above "
                              f"{ALL_CLASSES_AT_MOST:,} classes. single_logit.onnx answers every class already: give "
                              f"a count for a seeded sample (e.g. 32), a list of ids, or the count {k} to mean all")
        return list(range(k))
    if classes == "none":
        return []
    if isinstance(classes, int):
        return seeded_sample(k, classes).tolist()
    bad = [c for c in classes if not isinstance(c, int) or not 0 <= c < k]
    if bad:
        raise ExportError(f"export.classes has {bad}, not class ids of this model: use ids in [0, {k - 1}], "
                          f"a count, 'all' or 'none'")
    return sorted(set(classes))


def write_models(model: nn.Module, out_dir: Path, input_shape, opset: int, class_ids: list[int]) -> dict:
    """Write every ONNX file of an export into `out_dir`; returns the manifest's `models`."""
    backbone = export_backbone(model, input_shape, opset)
    with WeightsFile(out_dir / "backbone.weights") as weights:
        externalize(backbone, weights)
    save_checked(backbone, out_dir / "backbone.onnx")
    weight, bias = (t.detach().float().numpy() for t in model.rows())
    write_single_logit(out_dir, weight, bias, backbone=backbone, opset=opset)
    classes = {}
    for c in tqdm(class_ids, desc="class models", leave=False, disable=None):
        w, b = class_row(weight, bias, c)
        classes[str(c)] = save_checked(build_head_graph("class", w, b, backbone=backbone),
                                       out_dir / f"class_{c}.onnx").name
    return {"full": "model.onnx", "backbone": "backbone.onnx", "single_logit": "single_logit.onnx",
            "classes": classes}


def file_table(export_dir: Path) -> dict[str, dict]:
    """sha256 and size of every file of an export but the manifest itself."""
    files = sorted(p for p in export_dir.rglob("*") if p.is_file() and p.name != MANIFEST)
    return {p.relative_to(export_dir).as_posix(): {"sha256": sha256(p), "bytes": p.stat().st_size} for p in files}


def _check_thresholds(thresholds: dict[str, list[float]] | None, k: int, run: str) -> dict:
    """k thresholds per recall target; a class without one (NaN or null) is written as JSON null."""
    for key, values in (thresholds or {}).items():
        if len(values) != k:
            raise ExportError(f"{run}: thresholds for recall {key} have {len(values)} values, the model has {k} "
                              f"classes; re-run `dvc repro evaluate` for this model")
    return {key: [float(v) if v is not None and np.isfinite(v) else None for v in values]
            for key, values in (thresholds or {}).items()}


def export_model(model: nn.Module, out_dir: Path, info: dict, thresholds: dict[str, list[float]] | None,
                 images: torch.Tensor, *, opset: int = 18, classes: str | int | list[int] = "all",
                 atol: float = 1e-4, rtol: float = 1e-5, verify_classes: int = 64, signing_key: Path | None = None) -> Manifest:
    """Write and verify exports/<run_name>/ atomically (a temp folder renamed into place, so a
    failed export leaves the previous one, or nothing), signed with `signing_key` when one is given
    (model.sig: serving.signing); returns the manifest."""
    missing = [key for key in INFO_KEYS if key not in info]
    if missing:
        raise ExportError(f"export_model: info lacks {', '.join(missing)}; it needs {', '.join(INFO_KEYS)}")
    model = model.eval()
    k, d = model.head.out_features, model.head.in_features
    if len(info["class_names"]) != k:
        raise ExportError(f"{info['run_name']}: {len(info['class_names'])} class names for a model with {k} logits")
    class_ids, thresholds = select_classes(classes, k, d), _check_thresholds(thresholds, k, info["run_name"])
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    tmp.chmod(0o755)  # mkdtemp's 0700 would make the export unreadable to a serving user
    try:
        models = write_models(model, tmp, info["input_shape"], opset, class_ids)
        diffs = verify_export(model, tmp, models, images.float(), atol, verified_classes(k, verify_classes), rtol)
        draft = {"format_version": FORMAT_VERSION, "run_name": info["run_name"], "loss": info["loss"],
                 "dataset": info["dataset"], "class_names": list(info["class_names"]), "num_classes": k,
                 "feature_dim": d, "input": {"name": "image", "shape": list(info["input_shape"]), "dtype": "float32"},
                 "normalisation": {"mean": list(info["normalisation"]["mean"]),
                                   "std": list(info["normalisation"]["std"]), "pixel_scale": float(info["pixel_scale"])},
                 "opset": opset, "thresholds": thresholds,
                 "class_id_range": [0, k - 1], "models": models, "files": file_table(tmp), "max_abs_diff": diffs}
        # serving's own rules, on the JSON as a server will read it: an export it would refuse never lands
        manifest = parse_manifest(json.loads(json.dumps(draft, allow_nan=False)), tmp / MANIFEST)
        (tmp / MANIFEST).write_text(manifest.to_json())
        if signing_key is not None:
            sign_export(tmp, signing_key)
        _replace_dir(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return manifest


def _replace_dir(new: Path, target: Path) -> None:
    """Two renames: a reader sees the old export or the new one, never half of each."""
    old = target.with_name(f".{target.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if target.exists():
        os.replace(target, old)
    os.replace(new, target)
    shutil.rmtree(old, ignore_errors=True)


def _read_thresholds(path: Path, runs: list[str]) -> dict[str, dict]:
    hint = "run `dvc repro evaluate` first (it calibrates the thresholds export ships)"
    try:
        table = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ExportError(f"{path} not found: {hint}") from None
    lacking = [run for run in runs if run not in table]
    if lacking:
        raise ExportError(f"{path} has no thresholds for {', '.join(lacking)}: {hint}")
    return table


def export_runs(cfg: ExportConfig, models_dir: Path, thresholds_path: Path, data_dir: Path,
                out_dir: Path, metrics: Path | None = None) -> dict[str, Manifest]:
    """The stage: export the selected trained runs; returns their manifests by run name. What each
    export cost (`export_cost`) goes to `metrics` as JSON, for scaling studies over k."""
    available = sorted(p.parent.name for p in Path(models_dir).glob("*/config.json"))
    if not available:
        raise ExportError(f"no trained model under {models_dir}: run `dvc repro train` first")
    runs = available if cfg.runs == "all" else list(cfg.runs)
    unknown = [run for run in runs if run not in available]
    if unknown:
        raise ExportError(f"export.runs names {', '.join(unknown)}, not trained; available runs: {', '.join(available)}")
    thresholds = _read_thresholds(thresholds_path, runs)
    data = PreparedData(data_dir)
    manifests, costs = {}, {}
    for run in tqdm(runs, desc="export", disable=None):
        peak_memory.reset_peak_rss()
        start = time.perf_counter()
        model, info = load_trained(Path(models_dir) / run)
        images = verification_images(data, info, cfg.verify_images)
        info = {"pixel_scale": data.meta["pixel_scale"], **info}
        manifests[run] = export_model(model, Path(out_dir) / run, info, thresholds[run], images,
                                      opset=cfg.opset, classes=cfg.classes, atol=cfg.verify_atol, rtol=cfg.verify_rtol,
                                      verify_classes=cfg.verify_classes,
                                      signing_key=configured_key(cfg.signing_key, SIGNING_KEY_ENV))
        costs[run] = export_cost(manifests[run], Path(out_dir) / run, time.perf_counter() - start, cfg.verify_classes)
        del model  # before the next run loads: two 400,000-class models need not be in memory at once
    if metrics is not None:
        write_json(metrics, {"wall_s": sum(c["wall_s"] for c in costs.values()),
                             "bytes": sum(c["bytes"] for c in costs.values()), "runs": costs})
    return manifests


def export_cost(manifest: Manifest, export_dir: Path, wall_s: float, verify_classes: int) -> dict:
    """One run's export in figures: wall time (loading the model to the manifest), bytes on disk
    with the manifest (and signature), files, peak RSS since `peak_memory.reset_peak_rss`, classes checked."""
    unlisted = [export_dir / name for name in (MANIFEST, SIGNATURE) if (export_dir / name).is_file()]
    return {"wall_s": wall_s, "bytes": sum(f["bytes"] for f in manifest.files.values())
            + sum(path.stat().st_size for path in unlisted), "files": len(manifest.files) + len(unlisted),
            "num_classes": manifest.num_classes, "class_files": len(manifest.models["classes"]),
            "single_logit_classes_verified": min(manifest.num_classes, verify_classes),
            "peak_rss_gb": peak_memory.peak_rss_gb()}


def verification_images(data: PreparedData, info: dict, n: int) -> torch.Tensor:
    """The first n test images, normalised as the trained model `info` expects."""
    if tuple(info["input_shape"]) != tuple(data.input_shape):
        raise ExportError(f"{info['run_name']} takes images of shape {tuple(info['input_shape'])} but {data.root} "
                          f"has {tuple(data.input_shape)}: verify on data prepared at the model's image size")
    test = data.split("test")
    images = torch.stack([image for image, _ in test.__getitems__(list(range(min(n, len(test)))))])
    scale, shift = renormalisation(data.meta["normalisation"], info["normalisation"])
    return images * scale + shift


def mlflow_logs(exports_dir: Path, manifests: dict[str, Manifest], data: PreparedData) -> dict[str, tracking.RunLog]:
    """Per run, what its trial's MLflow run gets: the export's full and single-logit models (`mlflow.onnx`,
    two test images as the input example) and its manifest."""
    logs = {}
    for run, manifest in manifests.items():
        export_dir = Path(exports_dir) / run
        model_info = {"run_name": run, "input_shape": manifest.input["shape"], "normalisation": manifest.normalisation}
        images = verification_images(data, model_info, 2).numpy()
        class_ids = np.array([0, manifest.num_classes - 1], dtype=np.int64)
        logs[run] = tracking.RunLog(
            onnx_models=[("onnx_model", export_dir / manifest.models["full"], {"image": images}),
                         ("onnx_single_logit", export_dir / manifest.models["single_logit"],
                          {"image": images, "class_id": class_ids})],
            files=[(export_dir / MANIFEST, "export")])
    return logs
