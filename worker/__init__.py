"""The engine: bundles and images in, heatmaps out, on onnxruntime alone.

It is the ground floor of the worker side: the service (``onnxcam.worker.service``)
and the audit (``onnxcam.worker.audit``) stand on it, and it imports neither.
"""

from __future__ import annotations

from onnxcam.worker.explainer import Explainer, Explanation
from onnxcam.worker.maps import heatmaps, overlay

__all__ = ["Explainer", "Explanation", "heatmaps", "overlay"]
