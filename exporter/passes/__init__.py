"""Graph rewrites that turn a classifier into a bundle, one small pass per file.

Each pass takes a model and returns a ``PassResult``: the model and whether the
pass changed anything. Passes find each other's work through the bundle's
output names (``onnxcam.bundle``), so they chain without hidden state.
"""

from __future__ import annotations

from dataclasses import dataclass

import onnx


@dataclass
class PassResult:
    model: onnx.ModelProto
    changed: bool


__all__ = ["PassResult"]
