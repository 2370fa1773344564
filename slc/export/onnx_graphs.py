"""Hand-built ONNX heads for single logit classification, with weights kept in external files.

The network up to its features comes from `torch.onnx.export`; what follows the features is
small enough to write by hand with `onnx.helper`, and must be, because it is where SLC differs:
`single_logit` gathers one row of W and b per example instead of computing all k logits. The
weights never enter a protobuf: they are streamed into raw files in row chunks and the graphs
only reference them (offset, length), so a 2048 x 400,000 head (3.3 GB, past protobuf's 2 GB
limit) is written and loaded like a small one. No torch here, so the benchmark can use it alone.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

ALIGN = 4096           # page-aligned offsets let onnxruntime map tensors instead of copying them
CHUNK_BYTES = 64 << 20  # bytes of rows written at a time: bounded memory whatever k is
DEFAULT_OPSET = 18
DEFAULT_IR_VERSION = 10  # what torch.onnx.export writes; onnxruntime refuses IR versions it does not know


class Rows(Protocol):
    """What a head's weight can be: an ndarray, a np.memmap or `SyntheticRows` (sliced by rows)."""
    shape: tuple[int, ...]

    def __getitem__(self, rows: slice) -> np.ndarray: ...


class WeightsFile:
    """One raw file of tensors that several models reference (a model names its path relative to
    itself, and onnxruntime refuses `..`, so every referencing model sits in the same folder)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._file = open(self.path, "wb")

    def __enter__(self) -> WeightsFile:
        return self

    def __exit__(self, *exc) -> None:
        self._file.close()

    def add(self, name: str, array: np.ndarray | Rows, chunk_rows: int | None = None) -> TensorProto:
        """Append `array` (in row chunks) and return a tensor that points at it."""
        offset = self._file.seek(0, 2)
        offset = self._file.seek(offset + (-offset) % ALIGN)
        shape = tuple(array.shape)
        dtype = np.dtype(getattr(array, "dtype", np.float32))
        if not shape:  # a scalar: one chunk
            self._file.write(np.asarray(array, dtype.newbyteorder("<")).tobytes())
        row_bytes = dtype.itemsize * math.prod(shape[1:])
        chunk = chunk_rows or max(1, CHUNK_BYTES // max(row_bytes, 1))
        for start in range(0, shape[0] if shape else 0, chunk):
            block = np.asarray(array[start:start + chunk], dtype.newbyteorder("<"))
            self._file.write(np.ascontiguousarray(block).tobytes())
        tensor = TensorProto(name=name, dims=shape, data_location=TensorProto.EXTERNAL,
                             data_type=helper.np_dtype_to_tensor_dtype(dtype))
        for key, value in (("location", self.path.name), ("offset", offset), ("length", self._file.tell() - offset)):
            tensor.external_data.add(key=key, value=str(value))
        return tensor


@dataclass
class SyntheticRows:
    """A seeded (k, d) float32 weight matrix made on demand, block by block, so benchmarks and tests
    can write heads far larger than memory; rows are the same however they are sliced."""
    k: int
    d: int
    seed: int = 0
    block: int = 1024

    @property
    def shape(self) -> tuple[int, int]:
        return (self.k, self.d)

    def _block(self, b: int) -> np.ndarray:
        n = min(self.block, self.k - b * self.block)
        rng = np.random.default_rng([self.seed, b])
        return (rng.standard_normal((n, self.d), dtype=np.float32) / np.float32(math.sqrt(self.d)))

    def __getitem__(self, rows: slice) -> np.ndarray:
        start, stop, step = rows.indices(self.k)
        if start >= stop:
            return np.zeros((0, self.d), np.float32)
        blocks = range(start // self.block, (stop - 1) // self.block + 1)
        data = np.concatenate([self._block(b) for b in blocks])
        first = blocks[0] * self.block
        return data[start - first:stop - first:step]

    def rows(self, ids) -> np.ndarray:
        """Rows `ids` (any order), generating only the blocks they fall in."""
        return np.stack([self[i:i + 1][0] for i in np.asarray(ids).ravel()])


def externalize(model: onnx.ModelProto, weights: WeightsFile, min_bytes: int = 1024) -> onnx.ModelProto:
    """Move the initializers of `model` (e.g. torch's backbone) into `weights`, in place.

    Tensors under `min_bytes` stay inline (onnx's own threshold): they are shapes, axes and scales
    that shape inference must read when onnxruntime loads the model, and it cannot read files.
    Not onnx.external_data_helper (convert_model_to_external_data + save_model): it packs tensors
    without the page alignment mmap needs (offsets 0, 1200, 5200, ...), writes each model its own
    copy, and needs every tensor's bytes in the protobuf first, which a 400,000-row head never is.
    """
    for i, tensor in enumerate(model.graph.initializer):
        array = numpy_helper.to_array(tensor)
        if array.nbytes >= min_bytes:
            model.graph.initializer[i].CopyFrom(weights.add(tensor.name, array))
    return model


@dataclass(frozen=True)
class HeadNodes:
    """The nodes after the features, the extra inputs they need and the model's one output."""
    nodes: list[onnx.NodeProto]
    initializers: list[TensorProto]
    inputs: list[onnx.ValueInfoProto]
    output: onnx.ValueInfoProto


def full_head(features: str, weight: TensorProto, bias: TensorProto, batch: str) -> HeadNodes:
    """All k logits: Gemm(features, W^T) + b, what a k-way classifier computes."""
    k = weight.dims[0]
    return HeadNodes([helper.make_node("Gemm", [features, weight.name, bias.name], ["logits"], transB=1)],
                [weight, bias], [], helper.make_tensor_value_info("logits", TensorProto.FLOAT, [batch, k]))


def single_logit_head(features: str, weight: TensorProto, bias: TensorProto, batch: str) -> HeadNodes:
    """One logit per example, of the class it asks about: gather W[c], b[c], then a row-wise dot.
    Its cost is d multiply-adds per example whatever k is (the point of SLC)."""
    axes = numpy_helper.from_array(np.array([1], np.int64), "slc_sum_axes")
    nodes = [helper.make_node("Gather", [weight.name, "class_id"], ["slc_rows"], axis=0),
             helper.make_node("Gather", [bias.name, "class_id"], ["slc_bias"], axis=0),
             helper.make_node("Mul", [features, "slc_rows"], ["slc_products"]),
             helper.make_node("ReduceSum", ["slc_products", "slc_sum_axes"], ["slc_dot"], keepdims=0),
             helper.make_node("Add", ["slc_dot", "slc_bias"], ["logit"])]
    class_id = helper.make_tensor_value_info("class_id", TensorProto.INT64, [batch])
    return HeadNodes(nodes, [weight, bias, axes], [class_id],
                helper.make_tensor_value_info("logit", TensorProto.FLOAT, [batch]))


def class_head(features: str, weight: TensorProto, bias: TensorProto, batch: str) -> HeadNodes:
    """A fixed class: weight is its row (d,), bias a scalar, both inline (d + 1 floats)."""
    nodes = [helper.make_node("MatMul", [features, weight.name], ["slc_dot"]),
             helper.make_node("Add", ["slc_dot", bias.name], ["logit"])]
    return HeadNodes(nodes, [weight, bias], [], helper.make_tensor_value_info("logit", TensorProto.FLOAT, [batch]))


HEADS: dict[str, Callable[[str, TensorProto, TensorProto, str], HeadNodes]] = {
    "full": full_head,
    "single_logit": single_logit_head,
    "class": class_head,
}


def class_row(weight: np.ndarray | Rows, bias: np.ndarray, c: int) -> tuple[TensorProto, TensorProto]:
    """Class c's slice of the head as small inline tensors."""
    row = np.ascontiguousarray(weight[c:c + 1][0], dtype=np.float32)
    return (numpy_helper.from_array(row, f"slc_class_{c}_weight"),
            numpy_helper.from_array(np.asarray(bias[c], np.float32), f"slc_class_{c}_bias"))


def build_head_graph(kind: str, weight: TensorProto, bias: TensorProto, *,
                     backbone: onnx.ModelProto | None = None, feature_dim: int | None = None,
                     opset: int = DEFAULT_OPSET) -> onnx.ModelProto:
    """A head of `HEADS` on top of `backbone` (a model whose one output is the features), or on its
    own with input `features` (N, feature_dim) when there is no backbone (benchmarks of the head).
    Weight tensors are used as given: external references stay references."""
    if kind not in HEADS:
        raise KeyError(f"unknown head kind {kind!r}; known: {', '.join(HEADS)}")
    if backbone is not None:
        model = onnx.ModelProto()
        model.CopyFrom(backbone)
        if len(model.graph.output) != 1:
            raise ValueError(f"a backbone has one output (the features), this one has {len(model.graph.output)}")
        features = onnx.ValueInfoProto()
        features.CopyFrom(model.graph.output[0])
        batch = features.type.tensor_type.shape.dim[0].dim_param or "batch"
        del model.graph.output[:]
    else:
        if feature_dim is None:
            raise ValueError("build_head_graph: give feature_dim when there is no backbone")
        batch = "batch"
        features = helper.make_tensor_value_info("features", TensorProto.FLOAT, [batch, feature_dim])
        model = helper.make_model(helper.make_graph([], "slc_head", [features], []),
                                  opset_imports=[helper.make_opsetid("", opset)])
        model.ir_version = DEFAULT_IR_VERSION
    head = HEADS[kind](features.name, weight, bias, batch)
    model.graph.node.extend(head.nodes)
    model.graph.initializer.extend(head.initializers)
    model.graph.input.extend(head.inputs)
    model.graph.output.append(head.output)
    model.graph.name = f"slc_{kind}"
    return model


def save_checked(model: onnx.ModelProto, path: Path) -> Path:
    """Write the graph (its big weights are references, so it is small) and run onnx.checker on
    the file, which also checks that every external reference stays in the model's folder."""
    path = Path(path)
    path.write_bytes(model.SerializeToString())
    onnx.checker.check_model(str(path))
    return path


def write_single_logit(out_dir: Path, weight: np.ndarray | Rows, bias: np.ndarray, *,
                       backbone: onnx.ModelProto | None = None, kinds: tuple[str, ...] = ("full", "single_logit"),
                       weights_name: str = "head.weights", opset: int = DEFAULT_OPSET) -> dict[str, Path]:
    """Write the (k, d) head once into `out_dir/weights_name`, and model.onnx (all k logits) and/or
    single_logit.onnx referencing it; head_model.onnx / head_single_logit.onnx (input `features`)
    when there is no backbone.

    `backbone`'s own weights must already be external files in `out_dir` (see `externalize`).
    """
    out_dir = Path(out_dir)
    k, d = weight.shape
    if np.shape(bias) != (k,):
        raise ValueError(f"bias has shape {np.shape(bias)}, expected ({k},) for a ({k}, {d}) weight")
    with WeightsFile(out_dir / weights_name) as file:
        w = file.add("slc_head_weight", weight)
        b = file.add("slc_head_bias", np.asarray(bias, np.float32))
    prefix = "" if backbone is not None else "head_"
    names = {"full": f"{prefix}model.onnx", "single_logit": f"{prefix}single_logit.onnx"}
    return {kind: save_checked(build_head_graph(kind, w, b, backbone=backbone, feature_dim=d, opset=opset),
                               out_dir / names[kind]) for kind in kinds}
