"""The worker service: Celery workers that take explain jobs from Redis and store heatmaps.

It stands on the engine (``onnxcam.engine``); the engine never imports it. Until 0.3
the engine's public names are also found here, where 0.1 kept them
(``onnxcam.worker.Explainer``), with a DeprecationWarning.
"""

from __future__ import annotations

import importlib
import warnings
from typing import Any

_MOVED_TO_ENGINE = ("Explainer", "Explanation", "heatmaps", "overlay")


def __getattr__(name: str) -> Any:
    if name not in _MOVED_TO_ENGINE:
        raise AttributeError(f"module 'onnxcam.worker' has no attribute {name!r}")
    warnings.warn(f"onnxcam.worker.{name} is onnxcam.engine.{name} (or onnxcam.{name}) "
                  "now; the old name goes in 0.3", DeprecationWarning, stacklevel=2)
    return getattr(importlib.import_module("onnxcam.engine"), name)
