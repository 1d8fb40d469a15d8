"""The engine: bundles and images in, heatmaps out, on onnxruntime alone.

It is the ground floor of the worker side: the service (``onnxcam.worker``)
and the audit (``onnxcam.audit``) stand on it, and it imports neither.
"""

from __future__ import annotations

from onnxcam.engine.explainer import Explainer, Explanation
from onnxcam.engine.maps import heatmaps, overlay

__all__ = ["Explainer", "Explanation", "heatmaps", "overlay"]
