"""Per-op vector-Jacobian product rules, one small function per ONNX op.

A rule receives the forward node and the gradients of its outputs (``None`` where
an output does not lead to the differentiated value) and returns one gradient
name per input (``None`` where the input needs none). Rules add nodes through
``ctx.b`` and read static shapes from ``ctx``; they never touch the forward graph.
"""

from __future__ import annotations

from collections.abc import Callable

import onnx

from onnxcam.exporter.vjp.context import VjpContext

Rule = Callable[[VjpContext, onnx.NodeProto, list[str | None]], list[str | None]]

RULES: dict[str, Rule] = {}


def rule(*op_types: str) -> Callable[[Rule], Rule]:
    """Register a rule for one or more op types."""

    def register(fn: Rule) -> Rule:
        for op_type in op_types:
            RULES[op_type] = fn
        return fn

    return register


def load_rules() -> dict[str, Rule]:
    """Import every rule module once and return the registry."""
    from onnxcam.exporter.vjp import (  # noqa: F401
        activations,
        elementwise,
        linear,
        normalization,
        pooling,
        resize,
        roi_align,
        selection,
        shape,
    )

    return RULES


__all__ = ["RULES", "Rule", "VjpContext", "load_rules", "rule"]
