"""Bundles an attacker could publish: a good bundle (``cnn_bundle``) altered in one way.
Shared by the floor's reader tests and the worker's."""

from __future__ import annotations

from pathlib import Path

import onnx
from onnx import TensorProto, numpy_helper


def with_metadata(bundle: Path, **changes: str) -> bytes:
    """The bundle with ``onnxcam.<key>`` metadata set to the given strings."""
    model = onnx.load(str(bundle))
    props = {p.key: p.value for p in model.metadata_props}
    props.update({f"onnxcam.{key}": value for key, value in changes.items()})
    del model.metadata_props[:]
    for key, value in props.items():
        model.metadata_props.add(key=key, value=value)
    return model.SerializeToString()


def reading_outside(bundle: Path, location: str) -> tuple[bytes, int]:
    """The bundle with its smallest float weight stored as external data at the
    relative ``location``: onnxruntime reads it from its working folder. Returns the
    bytes and how many bytes of that file the weight takes."""
    model = onnx.load(str(bundle))
    weight = min((t for t in model.graph.initializer if t.data_type == TensorProto.FLOAT
                  and t.dims), key=lambda t: numpy_helper.to_array(t).size)
    length = 4 * numpy_helper.to_array(weight).size
    weight.ClearField("raw_data")
    weight.ClearField("float_data")
    weight.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", "0"), ("length", str(length))):
        weight.external_data.add(key=key, value=value)
    return model.SerializeToString(), length
