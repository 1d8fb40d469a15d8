"""onnxcam shows where an image classifier looks when it decides.

The public API, from one import name. Names load on first use, so importing
``onnxcam`` loads neither the exporter nor the engine (nor TensorFlow or torch):

    onnxcam.errors, onnxcam.bundle   the shared floor: error tree and bundle format
    onnxcam.exporter                 models in, bundles out (TensorFlow, torch lazily)
    onnxcam.engine                   bundles and images in, heatmaps out
    onnxcam.worker                   the Celery worker service: jobs, client and store
    onnxcam.audit                    explains whole data sets
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from onnxcam._version import __version__

# Public name -> the module that defines it.
_EXPORTS = {
    "BadImageError": "onnxcam.errors",
    "BadMethodError": "onnxcam.errors",
    "BadTargetError": "onnxcam.errors",
    "BundleError": "onnxcam.errors",
    "BundleInfo": "onnxcam.bundle",
    "Contrast": "onnxcam.engine.targets",
    "Explainer": "onnxcam.engine.explainer",
    "Explanation": "onnxcam.engine.explainer",
    "ExportError": "onnxcam.errors",
    "ExportResult": "onnxcam.exporter",
    "JobError": "onnxcam.errors",
    "OnnxcamError": "onnxcam.errors",
    "Region": "onnxcam.engine.targets",
    "Weighting": "onnxcam.engine.targets",
    "export": "onnxcam.exporter",
    "heatmaps": "onnxcam.engine",
    "list_layers": "onnxcam.exporter",
    "overlay": "onnxcam.engine",
    "read_bundle_info": "onnxcam.bundle",
}

__all__ = [
    "BadImageError",
    "BadMethodError",
    "BadTargetError",
    "BundleError",
    "BundleInfo",
    "Contrast",
    "Explainer",
    "Explanation",
    "ExportError",
    "ExportResult",
    "JobError",
    "OnnxcamError",
    "Region",
    "Weighting",
    "__version__",
    "export",
    "heatmaps",
    "list_layers",
    "overlay",
    "read_bundle_info",
]

if TYPE_CHECKING:
    from onnxcam.bundle import BundleInfo, read_bundle_info
    from onnxcam.engine import heatmaps, overlay
    from onnxcam.engine.explainer import Explainer, Explanation
    from onnxcam.engine.targets import Contrast, Region, Weighting
    from onnxcam.errors import (
        BadImageError,
        BadMethodError,
        BadTargetError,
        BundleError,
        ExportError,
        JobError,
        OnnxcamError,
    )
    from onnxcam.exporter import ExportResult, export, list_layers


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'onnxcam' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
