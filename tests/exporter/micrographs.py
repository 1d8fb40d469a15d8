"""Tiny ONNX graphs built in code with ``onnx.helper``, and drafts around them, for the
pass and graph-helper tests."""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from onnxcam.exporter.draft import Draft, Options
from onnxcam.exporter.frontends import Tap
from onnxcam.layout import Layout
from onnxcam.runtime import cpu_session

OPSET = 17


def info(name: str, shape: list | None = None, dtype: int = TensorProto.FLOAT
         ) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, dtype, shape)


def init(name: str, value: Any, dtype: Any = np.float32) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(value, dtype), name)


def model_of(nodes: list, inputs: list, outputs: list, inits: Any = ()) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, outputs, list(inits))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=8)


def run(model: onnx.ModelProto, feeds: dict) -> list[np.ndarray]:
    return cpu_session(model.SerializeToString()).run(None, feeds)


def outputs_of(model: onnx.ModelProto, feeds: dict) -> dict[str, np.ndarray]:
    names = [o.name for o in model.graph.output]
    return dict(zip(names, run(model, feeds)))


def draft_of(model: onnx.ModelProto, layout: str = "nchw", taps: list[tuple[str, str]] = (),
             size: tuple[int, int, int] = (4, 4, 3), **options: Any) -> Draft:
    """A draft around ``model``: ``taps`` are (tensor, activation layout) pairs, and
    ``size`` is the image's (height, width, channels)."""
    height, width, channels = size
    return Draft(model=model, layout=Layout.of(layout), height=height, width=width,
                 channels=channels,
                 taps=[Tap(f"layer{i}", tensor, Layout.of(tap_layout))
                       for i, (tensor, tap_layout) in enumerate(taps)],
                 options=Options(**options))


def snapshot(model: onnx.ModelProto) -> bytes:
    """The model's bytes: equal snapshots mean a pass left it exactly as it was."""
    return model.SerializeToString(deterministic=True)
