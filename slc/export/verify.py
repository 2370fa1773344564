"""Every file of an export run in onnxruntime against the PyTorch model it came from, so a broken
export never reaches serving: on batch 1 and a larger batch, and single_logit.onnx on a bounded,
seeded sample of class ids, so that verification costs the same at 400,000 classes as at 100.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from torch import nn
from tqdm import tqdm

from serving.errors import ExportError
from slc.core.sampling import seeded_sample


def verified_classes(k: int, n: int) -> np.ndarray:
    """The class ids single_logit.onnx is checked on: the first and the last (the gather's edge
    rows, where an offset or length error shows) and a seeded sample of the rest, n in all
    (every class when k <= n), so verification costs the same at 400,000 classes as at 100."""
    if k <= n:
        return np.arange(k)
    return np.concatenate([[0], 1 + seeded_sample(k - 2, n - 2), [k - 1]])


def class_id_rounds(n: int, classes: np.ndarray) -> list[np.ndarray]:
    """Class ids for a batch of n: a different class per row (the row-wise gather is what can go
    wrong), shifted round by round until every one of `classes` was asked; batch 1 asks for the last."""
    m = len(classes)
    starts = range(0, m, n) if n > 1 else [m - 1]
    return [classes[(np.arange(n) + start) % m] for start in starts]


def verify_export(model: nn.Module, export_dir: Path, models: dict, images: torch.Tensor,
                  atol: float, single_logit_classes: np.ndarray, rtol: float = 0.0) -> dict[str, float]:
    """Run every file in onnxruntime on batch 1 and the whole batch; max |ORT - PyTorch| per file,
    single_logit.onnx on `single_logit_classes`. The reference logits are the model's own forward,
    so a model whose forward is not head(features(x)) fails here instead of exporting something else.
    Each value must be within atol + rtol·|PyTorch's| (numpy's allclose): float32's rounding grows with
    a logit's size, and a cosine head at scale 64 has logits of tens."""
    with torch.inference_mode():
        refs = [(x.numpy(), model.features(x).numpy(), model(x).numpy()) for x in (images[:1], images)]
    cases = {models["backbone"]: [({"image": x}, f) for x, f, _ in refs],
             models["full"]: [({"image": x}, z) for x, _, z in refs],
             models["single_logit"]: [({"image": x, "class_id": ids}, z[np.arange(len(x)), ids])
                                      for x, _, z in refs for ids in class_id_rounds(len(x), single_logit_classes)]}
    cases.update({path: [({"image": x}, z[:, int(c)]) for x, _, z in refs]
                  for c, path in models["classes"].items()})
    diffs = {}
    for path, runs in tqdm(cases.items(), desc="verify", leave=False, disable=None):
        session = ort.InferenceSession(str(export_dir / path), providers=["CPUExecutionProvider"])
        diff = excess = 0.0
        for feeds, expected in runs:
            (got,) = session.run(None, feeds)
            if got.shape != expected.shape:
                raise ExportError(f"{path} gives shape {got.shape} for batch {len(feeds['image'])}, PyTorch "
                                  f"{expected.shape}: the exported graph is wrong")
            error = np.abs(got - expected)
            diff = max(diff, float(np.max(error)))
            excess = max(excess, float(np.max(error - rtol * np.abs(expected))))
        if not excess <= atol:
            raise ExportError(f"{path} differs from PyTorch by {diff:.3g} (max abs), more than export.verify_atol "
                              f"= {atol:g} + export.verify_rtol = {rtol:g} x |logit| allows: the export is wrong, or "
                              "raise them if this error is float noise")
        diffs[path] = diff
    return diffs
