"""The backbone as ONNX: image -> features, through torch.onnx's dynamo exporter, stripped of what
makes exports differ between machines. Every export file and every benchmarked model starts here.
"""
from __future__ import annotations

import onnx
import torch
from torch import nn


class _Features(nn.Module):
    """torch.onnx.export traces `forward`; this makes it the model's `features`."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.model.features(image)


def export_backbone(model: nn.Module, input_shape, opset: int):
    """image (N, C, H, W) -> features (N, d) as an in-memory ModelProto with inline weights (the
    caller moves them to a shared file). Batch 2 as example: torch.export specialises sizes 0/1."""
    example = torch.zeros(2, *input_shape)
    program = torch.onnx.export(_Features(model).eval(), (example,), dynamo=True, opset_version=opset,
                                input_names=["image"], output_names=["features"],
                                dynamic_shapes=({0: torch.export.Dim("batch")},), verbose=False)
    return strip_debug_info(program.model_proto)


def strip_debug_info(model: onnx.ModelProto) -> onnx.ModelProto:
    """Drop the exporter's per-node stack traces and FX dumps: they are most of a graph's bytes
    (repeated in every class file) and hold local paths that make exports differ between machines."""
    def strip(graph: onnx.GraphProto) -> None:
        for node in graph.node:
            del node.metadata_props[:]
            node.doc_string = ""
            for attribute in node.attribute:
                for subgraph in [attribute.g, *attribute.graphs]:
                    strip(subgraph)
    strip(model.graph)
    for function in model.functions:
        for node in function.node:
            del node.metadata_props[:]
    return model
