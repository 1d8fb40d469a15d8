"""onnxruntime sessions: provider choice, CUDA probing and thread settings."""

from __future__ import annotations

import logging
import os

import onnxruntime as ort

log = logging.getLogger(__name__)


def session_options(threads: int | None = None) -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = threads
    return options


def cpu_session(model: bytes | str, threads: int | None = None) -> ort.InferenceSession:
    """A plain CPU session, as the exporter uses for probing and verification."""
    return ort.InferenceSession(
        model, session_options(threads), providers=["CPUExecutionProvider"]
    )


def cpu_threads() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
