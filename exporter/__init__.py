"""onnxcam's exporter: Keras or ONNX classifiers in, Grad-CAM bundles out.

TensorFlow and tf2onnx are imported only when a Keras model is converted.
"""

from __future__ import annotations

from exporter.pipeline import ExportResult, build_bundle, export, load_source

__all__ = ["ExportResult", "build_bundle", "export", "load_source"]
