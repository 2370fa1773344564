"""An export taken apart for search: features of images from backbone.onnx (onnxruntime), and row
W[c] and bias b[c] of any class memory-mapped from head.weights, so z_c(x) = features(x) . W[c] + b[c],
exactly what single_logit.onnx computes (a cosine head's scale is folded into its rows at export).

The export writes the head once into head.weights and single_logit.onnx points at it (offset,
length) through the external data of its initializers `slc_head_weight` (k, d) and `slc_head_bias`
(k,) (slc.export.onnx_graphs). Those pointers are read here with protobuf, which onnxruntime
depends on, through the few fields of onnx.proto they live in; every other field of the graph is
skipped, so a 400,000-class head is mapped, never read whole.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from google.protobuf.message import DecodeError as ProtobufDecodeError

from serving.errors import ExportError, InputError
from serving.manifest import REEXPORT, Manifest
from serving.sessions import open_session

WEIGHT, BIAS = "slc_head_weight", "slc_head_bias"
FLOAT = 1  # onnx TensorProto.FLOAT
EXTERNAL = 1  # onnx TensorProto.EXTERNAL
# onnx.proto's field numbers for the path ModelProto.graph.initializer[].external_data[]
ONNX_FIELDS = {
    "Model": [("graph", 7, "Graph", False)],
    "Graph": [("initializer", 5, "Tensor", True)],
    "Tensor": [("dims", 1, "int64", True), ("data_type", 2, "int32", False), ("name", 8, "string", False),
               ("external_data", 13, "Entry", True), ("data_location", 14, "int32", False)],
    "Entry": [("key", 1, "string", False), ("value", 2, "string", False)],
}


@dataclass(frozen=True)
class ExternalTensor:
    """An initializer whose bytes live in another file of the export."""
    name: str
    dims: tuple[int, ...]
    data_type: int
    location: str
    offset: int
    length: int


@cache
def _model_class():
    """ModelProto reduced to ONNX_FIELDS: protobuf keeps the other fields as unknown bytes."""
    scalar = {"int64": descriptor_pb2.FieldDescriptorProto.TYPE_INT64,
              "int32": descriptor_pb2.FieldDescriptorProto.TYPE_INT32,
              "string": descriptor_pb2.FieldDescriptorProto.TYPE_STRING}
    proto = descriptor_pb2.FileDescriptorProto(name="slc_onnx_subset.proto", package="slc_onnx_subset", syntax="proto2")
    for message, fields in ONNX_FIELDS.items():
        described = proto.message_type.add(name=message)
        for name, number, kind, repeated in fields:
            field = described.field.add(name=name, number=number, label=3 if repeated else 1)
            if kind in scalar:
                field.type = scalar[kind]
            else:
                field.type, field.type_name = descriptor_pb2.FieldDescriptorProto.TYPE_MESSAGE, f".slc_onnx_subset.{kind}"
    pool = descriptor_pool.DescriptorPool()
    pool.Add(proto)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("slc_onnx_subset.Model"))


def external_tensors(path: Path) -> dict[str, ExternalTensor]:
    """The initializers of the ONNX graph at `path` whose data is in an external file, by name."""
    model = _model_class()()
    try:
        model.ParseFromString(Path(path).read_bytes())
    except (OSError, ProtobufDecodeError) as error:
        raise ExportError(f"{path} cannot be read as an ONNX graph ({error}); {REEXPORT}") from None
    tensors = {}
    for tensor in model.graph.initializer:
        if tensor.data_location != EXTERNAL:
            continue
        entries = {entry.key: entry.value for entry in tensor.external_data}
        tensors[tensor.name] = ExternalTensor(tensor.name, tuple(tensor.dims), tensor.data_type, entries.get("location", ""),
                                              int(entries.get("offset", 0)), int(entries.get("length", -1)))
    return tensors


def graph_files(export_dir: Path, graph: str) -> list[str]:
    """The graph file and the weights files it reads: what its output depends on."""
    return [graph, *sorted({t.location for t in external_tensors(Path(export_dir) / graph).values()})]


class HeadRows:
    """W (k, d) and b (k,) of an export, float32, memory-mapped: a row costs d reads, whatever k is."""

    def __init__(self, export_dir: Path, manifest: Manifest):
        graph = Path(export_dir) / manifest.models["single_logit"]
        tensors = external_tensors(graph)
        k, d = manifest.num_classes, manifest.feature_dim
        weight, bias = (_checked(tensors, name, shape, graph) for name, shape in ((WEIGHT, (k, d)), (BIAS, (k,))))
        if weight.location != bias.location:
            raise ExportError(f"{graph}: {WEIGHT} and {BIAS} are in different files; {REEXPORT}")
        self.file = weight.location
        self.weight, self.bias = mapped(export_dir, weight), mapped(export_dir, bias)

    def row(self, class_id: int) -> tuple[np.ndarray, float]:
        """w_c as float32 (d,) and b_c: z_c(x) = features(x) . w_c + b_c."""
        return np.array(self.weight[class_id], np.float32), float(self.bias[class_id])


def mapped(folder: Path, tensor: ExternalTensor) -> np.memmap:
    """A read-only memory map of a float32 external tensor where its graph points (file, offset, dims)."""
    return np.memmap(Path(folder) / tensor.location, np.dtype("<f4"), "r", tensor.offset, tensor.dims)


def _checked(tensors: dict[str, ExternalTensor], name: str, shape: tuple[int, ...], graph: Path) -> ExternalTensor:
    tensor = tensors.get(name)
    expected = f"float32 {shape} in an external file"
    if tensor is None or tensor.dims != shape or tensor.data_type != FLOAT or tensor.length != 4 * int(np.prod(shape)):
        found = "no such external initializer" if tensor is None else f"{tensor.dims}, type {tensor.data_type}"
        raise ExportError(f"{graph}: the head's {name} is not {expected} ({found}); {REEXPORT}")
    if Path(tensor.location).name != tensor.location:
        raise ExportError(f"{graph}: {name} points at {tensor.location!r}, outside the export's folder; {REEXPORT}")
    return tensor


class Backbone:
    """backbone.onnx in onnxruntime: images -> features (N, d), d = the manifest's feature_dim."""

    def __init__(self, export_dir: Path, manifest: Manifest, providers: list[str], threads: int | None = None):
        name = manifest.models.get("backbone")
        if name not in manifest.files:
            raise ExportError(f"{export_dir} has no backbone graph (models.backbone = {name!r}): search needs "
                              f"features; {REEXPORT}")
        self.file = name
        self.session = open_session(Path(export_dir) / name, providers, manifest.opset, threads)
        output = self.session.get_outputs()
        if len(output) != 1 or output[0].shape[1:] != [manifest.feature_dim]:
            raise ExportError(f"{export_dir / name} outputs {[o.shape for o in output]}, expected one [N, "
                              f"{manifest.feature_dim}]; {REEXPORT}")
        self.output = output[0].name

    def features(self, batch: np.ndarray) -> np.ndarray:
        """float32 (N, d) of a prepared batch; an image whose features overflow is refused, not stored."""
        features = self.session.run([self.output], {"image": batch})[0]
        bad = np.flatnonzero(~np.isfinite(features).all(axis=1))
        if bad.size:
            raise InputError(f"image {bad[0]} gives non-finite features ({bad.size} of {len(batch)} images): its "
                             f"values overflow the network; send raw uint8 pixels or float input normalised as "
                             f"the export's manifest says")
        return np.ascontiguousarray(features, np.float32)


def bound_files(manifest: Manifest, backbone: Backbone, head: HeadRows, export_dir: Path) -> dict[str, str]:
    """sha256 of backbone.onnx, the weights it reads and the head's weights file, as the manifest lists them:
    what an index's features and rows come from, so what binds an index to its export."""
    names = [*graph_files(export_dir, backbone.file), head.file]
    return {name: manifest.files[name]["sha256"] for name in names}
