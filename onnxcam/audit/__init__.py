"""The batch audit: where a classifier looks, over a whole data set."""

from __future__ import annotations

from onnxcam.audit.backend import (
    AuditRow,
    Backend,
    ExplainSettings,
    LocalBackend,
    RowOutcome,
)
from onnxcam.audit.runner import AuditOptions, run_audit
from onnxcam.audit.summary import Summary, Thresholds

__all__ = [
    "AuditOptions",
    "AuditRow",
    "Backend",
    "ExplainSettings",
    "LocalBackend",
    "RowOutcome",
    "Summary",
    "Thresholds",
    "run_audit",
]
