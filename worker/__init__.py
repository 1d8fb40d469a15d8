"""onnxcam's serving side: bundles in, heatmaps out, on onnxruntime alone."""

from __future__ import annotations

from worker.bundle import BundleInfo, read_bundle_info
from worker.engine import Explainer, Explanation
from worker.errors import (
    BadImageError,
    BadMethodError,
    BadTargetError,
    BundleError,
    ExportError,
    JobError,
    OnnxcamError,
)

__version__ = "0.1.0"

__all__ = [
    "BadImageError",
    "BadMethodError",
    "BadTargetError",
    "BundleError",
    "BundleInfo",
    "Explainer",
    "Explanation",
    "ExportError",
    "JobError",
    "OnnxcamError",
    "__version__",
    "read_bundle_info",
]
