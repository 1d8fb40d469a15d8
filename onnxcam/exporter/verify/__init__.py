"""Check a finished bundle against its source before anything is written: ``checks``
holds the bundle against the source (or float64 differences of the ``float64_head``,
run with the reference ``kernels``)."""

from __future__ import annotations

from onnxcam.exporter.verify.checks import Report, verify_bundle

__all__ = ["Report", "verify_bundle"]
