"""onnxcam's exporter: Keras or ONNX classifiers in, Grad-CAM bundles out.

TensorFlow and tf2onnx are imported only when a Keras model is converted.
"""

from __future__ import annotations

from onnxcam.exporter.layers import LayerInfo, describe
from onnxcam.exporter.pipeline import ExportResult, build_bundle, export, list_layers, load_source

__all__ = [
    "ExportResult",
    "LayerInfo",
    "build_bundle",
    "describe",
    "export",
    "list_layers",
    "load_source",
]
