"""SingleLogitModel: one exported run, answering "is this image of class c?" with onnxruntime.

`score` gives the logit z_c(x); `decide` compares it with the per-class threshold calibrated on
the validation split for a recall target (z_c(x) >= threshold, the rule the thresholds were
chosen with). Pairs of images and classes are formed in one way everywhere: a batch of N images
with one class, one image with M classes, or N images with N classes, pair by pair.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from serving.errors import ExportError, InputError, NonFiniteLogitError, ThresholdError, UnknownClassError
from serving.images import to_model_input
from serving.manifest import REEXPORT, Manifest, read_manifest, recall_keys
from serving.sessions import choose_providers, open_session
from serving.signing import verify_signature

DEFAULT_RECALL = 0.99


@dataclass(frozen=True)
class Graph:
    """A graph serving can run: the signature it must have (checked at load) and how to run it."""
    inputs: dict[str, list]          # input name -> shape after the batch axis
    outputs: dict[str, list]
    run: Callable[[ort.InferenceSession, np.ndarray, np.ndarray], np.ndarray]


def _run_single_logit(session, images: np.ndarray, class_ids: np.ndarray) -> np.ndarray:
    """Gather the class's head row inside the graph: the cost does not grow with the number of classes."""
    if len(images) != len(class_ids):  # one image, several classes: one row per pair
        images = np.ascontiguousarray(np.broadcast_to(images, (len(class_ids), *images.shape[1:])))
    return session.run(["logit"], {"image": images, "class_id": class_ids})[0]


def _run_full(session, images: np.ndarray, class_ids: np.ndarray) -> np.ndarray:
    """All k logits, then the asked-for one per pair (the baseline single logit classification beats)."""
    logits = session.run(["logits"], {"image": images})[0]
    rows = np.arange(len(class_ids)) if len(images) == len(class_ids) else np.zeros(len(class_ids), np.int64)
    return logits[rows, class_ids]


def _single_logit_graph(input_shape: list[int], num_classes: int) -> Graph:
    return Graph({"image": list(input_shape), "class_id": []}, {"logit": []}, _run_single_logit)


def _full_graph(input_shape: list[int], num_classes: int) -> Graph:
    return Graph({"image": list(input_shape)}, {"logits": [num_classes]}, _run_full)


# Graph name (a key of the manifest's `models`) -> its expected signature and runner.
GRAPHS: dict[str, Callable[[list[int], int], Graph]] = {
    "single_logit": _single_logit_graph,
    "full": _full_graph,
}


@dataclass(frozen=True)
class Decisions:
    """What `classify` found for each (image, class) pair."""
    class_ids: np.ndarray        # (n,) int64
    logits: np.ndarray           # (n,) float32
    thresholds: np.ndarray       # (n,) float64, NaN where a class has no calibrated threshold
    decisions: np.ndarray        # (n,) bool: logits >= thresholds
    recall: float | None


class SingleLogitModel:
    """An export that passed every check, with one graph open; made by `load`, which refuses the rest."""

    def __init__(self, export_dir: Path, manifest: Manifest, graph: str, session: ort.InferenceSession,
                 max_batch: int | None):
        self.export_dir = export_dir
        self.manifest = manifest
        self.graph = graph
        self.session = session
        self.max_batch = max_batch
        self._graph = GRAPHS[graph](manifest.input["shape"], manifest.num_classes)
        self._recalls = recall_keys(manifest.thresholds)
        # made once: from the manifest's list per request they would cost 11 ms at 400,000 classes
        self._thresholds = {key: _read_only(np.array(values, np.float64)) for key, values in manifest.thresholds.items()}

    @classmethod
    def load(cls, export_dir: str | Path, *, graph: str = "single_logit", providers: str | list[str] = "auto",
             max_batch: int | None = None, threads: int | None = None,
             public_key: str | Path | None = None) -> SingleLogitModel:
        """Check the export (signature, hashes, schema), open `graph` ("single_logit" or "full") and check its shapes.

        `max_batch` caps the images per call (None: no cap); `threads` is onnxruntime's intra-op
        thread count (None: its default); with a `public_key`, the export must carry a signature it
        verifies (serving.signing), or it is refused.
        """
        if graph not in GRAPHS:
            raise ValueError(f"unknown graph {graph!r}; choose one of {', '.join(GRAPHS)}")
        for name, value in (("max_batch", max_batch), ("threads", threads)):
            if value is not None and value < 1:
                raise ValueError(f"{name} = {value} is invalid: expected a positive count or None")
        export_dir = Path(export_dir)
        if public_key is not None:
            verify_signature(export_dir, Path(public_key))
        manifest = read_manifest(export_dir)
        path = export_dir / manifest.models[graph]
        session = open_session(path, choose_providers(providers), manifest.opset, threads)
        _check_signature(session, path, GRAPHS[graph](manifest.input["shape"], manifest.num_classes))
        return cls(export_dir, manifest, graph, session, max_batch)

    @property
    def run_name(self) -> str:
        return self.manifest.run_name

    @property
    def class_names(self) -> list[str]:
        return self.manifest.class_names

    @property
    def num_classes(self) -> int:
        return self.manifest.num_classes

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return tuple(self.manifest.input["shape"])

    @property
    def recalls(self) -> list[float]:
        """The recall targets that have calibrated thresholds (empty when exported without them)."""
        return sorted(self._recalls)

    @property
    def default_recall(self) -> float | None:
        """0.99 when calibrated, else the highest calibrated target, else None (logits only)."""
        if not self._recalls:
            return None
        return DEFAULT_RECALL if DEFAULT_RECALL in self._recalls else max(self._recalls)

    @property
    def providers(self) -> list[str]:
        return self.session.get_providers()

    def prepare(self, images) -> np.ndarray:
        """Images in any accepted form (serving.images) -> the float32 (N, C, H, W) network input."""
        return to_model_input(images, self.input_shape, self.manifest.normalisation, self.max_batch)

    def score(self, images, class_id) -> np.ndarray:
        """The logit of class `class_id` (an int, or one per pair) for each pair: float32 (n,)."""
        return self.classify(images, class_id, recall=None).logits

    def decide(self, images, class_id, recall: float = DEFAULT_RECALL) -> np.ndarray:
        """Is each image of its class, at the threshold that kept `recall` on validation? bool (n,)."""
        result = self.classify(images, class_id, recall)
        undefined = result.class_ids[np.isnan(result.thresholds)]
        if undefined.size:
            raise ThresholdError(f"class {undefined[0]} has no threshold at recall {recall:g} (the validation "
                                 f"split had no example of it); use score() and choose a threshold yourself")
        return result.decisions

    def classify(self, images, class_id, recall: float | None = DEFAULT_RECALL) -> Decisions:
        """Logits, thresholds and decisions in one pass; decisions are False where a threshold is NaN,
        as they all are with `recall=None` (logits only, for an export without thresholds)."""
        thresholds_of = np.full(self.num_classes, np.nan) if recall is None else self.thresholds(recall)
        batch = self.prepare(images)
        ids = self.class_ids(class_id, len(batch))
        logits = check_finite(self.logits(batch, ids), ids)
        thresholds = thresholds_of[ids]
        with np.errstate(invalid="ignore"):
            return Decisions(ids, logits, thresholds, logits >= thresholds, recall)

    def logits(self, batch: np.ndarray, ids: np.ndarray) -> np.ndarray:
        """One onnxruntime call on input `prepare` made and ids `class_ids` checked, as it comes: a
        non-finite logit is the caller's to refuse (`check_finite`), request by request when several
        requests share the call (serving.batching), so one client's overflow fails no other's."""
        return self._graph.run(self.session, batch, ids)

    def thresholds(self, recall: float = DEFAULT_RECALL) -> np.ndarray:
        """Per-class thresholds (k,) for a recall target, NaN for classes that could not be calibrated
        (read-only: one array serves every request)."""
        key = self._recalls.get(_as_recall(recall))
        if key is None:
            have = ", ".join(f"{r:g}" for r in self.recalls) or "none (the export has no thresholds)"
            raise ThresholdError(f"no thresholds for recall {recall!r}: the export has them for {have}; "
                                 f"add the target to evaluate.recalls and re-run evaluate and export")
        return self._thresholds[key]

    def class_ids(self, class_id, n_images: int) -> np.ndarray:
        """Validated int64 class ids, one per pair (see the module docstring for how pairs form)."""
        ids = np.asarray(class_id)
        if ids.ndim > 1 or ids.size == 0 or ids.dtype == bool or not np.issubdtype(ids.dtype, np.integer):
            raise UnknownClassError(f"class ids must be one integer or a list of integers, got {class_id!r}; "
                                    f"valid ids are 0..{self.num_classes - 1}")
        ids = np.atleast_1d(ids).astype(np.int64)
        bad = ids[(ids < 0) | (ids >= self.num_classes)]
        if bad.size:
            raise UnknownClassError(f"class {int(bad[0])} is not in this model: class ids are "
                                    f"0..{self.num_classes - 1} ({self._some_names()})")
        if len(ids) == 1:
            return np.repeat(ids, n_images)
        if n_images not in (1, len(ids)):
            raise InputError(f"{n_images} images and {len(ids)} class ids cannot be paired: send one class "
                             f"id, one image, or as many class ids as images")
        return ids

    def describe(self) -> dict:
        """What a client needs to call the model (served at GET /v1/model and printed by `slc info`)."""
        keys = ("run_name", "loss", "dataset", "class_names", "num_classes", "feature_dim", "input",
                "normalisation", "opset", "thresholds", "max_abs_diff")
        return {**{key: getattr(self.manifest, key) for key in keys}, "recalls": self.recalls, "graph": self.graph,
                "graph_file": self.manifest.models[self.graph], "providers": self.providers,
                "max_batch": self.max_batch}

    def _some_names(self) -> str:
        names = [f"{i}: {name}" for i, name in enumerate(self.class_names[:5])]
        return ", ".join(names) + (", ..." if self.num_classes > 5 else "")


def check_finite(logits: np.ndarray, class_ids) -> np.ndarray:
    """The logits, once each is a number: an inf or NaN logit comes from input that overflows the
    network (finite float32 of 3e38, say), and is refused rather than compared with a threshold."""
    bad = np.flatnonzero(~np.isfinite(logits))
    if bad.size:
        i, ids = int(bad[0]), np.broadcast_to(class_ids, logits.shape)
        raise NonFiniteLogitError(f"image {i} gives the logit {logits[i]} for class {int(ids[i])}"
                                  f" ({bad.size} of {logits.size} images non-finite): its values overflow the network; "
                                  f"send raw uint8 pixels, or float input normalised as GET /v1/model says (values of a "
                                  f"few units)")
    return logits


def _read_only(array: np.ndarray) -> np.ndarray:
    array.flags.writeable = False
    return array


def _as_recall(recall) -> float | None:
    try:
        return float(recall)
    except (TypeError, ValueError):
        return None


def _check_signature(session: ort.InferenceSession, path: Path, graph: Graph) -> None:
    """The graph's inputs and outputs are the ones the manifest promises (batch axis free)."""
    for kind, found, expected in (("inputs", session.get_inputs(), graph.inputs),
                                  ("outputs", session.get_outputs(), graph.outputs)):
        have = {arg.name: arg.shape for arg in found}
        if set(have) != set(expected):
            raise ExportError(f"{path} has {kind} {sorted(have)}, expected {sorted(expected)}; {REEXPORT}")
        for name, shape in expected.items():
            fixed = have[name][1:]
            if len(have[name]) != len(shape) + 1 or any(isinstance(d, int) and d != e for d, e in zip(fixed, shape)):
                raise ExportError(f"{path}: {kind[:-1]} {name!r} has shape {have[name]}, expected "
                                  f"[N, {', '.join(map(str, shape))}]; {REEXPORT}")
